"""The ``lm`` task: a decoder-only LM (`DecoderOnlyLM`) on the English corpus, next-token loss.

Data (``config.data``):
  * ``corpus``: gzip'd UTF-8 text, documents separated by a blank line
    (../shared/data/lm/en_corpus.txt.gz: Bibles, Brown, Debian descriptions, fortunes);
  * a fixed train/dev split by a hash of each document (``dev_permille`` of them to dev);
  * a SentencePiece model (`flaxformer_mini.data.tokenizer`, fixed special ids) trained
    on the lines of ``spm_sample_docs`` random train documents, kept as ``<workdir>/spm.model``;
  * each document becomes ``[BOS] tokens [EOS]``; the documents (shuffled each epoch) are
    concatenated and cut into rows of ``seq_len`` (`PackedRows`), so a row holds several
    documents (``segmentation`` 1, 2, ...; ``positions`` restart in each) and a long
    document continues in the next row. Attention stays inside a segment; the loss
    covers every input whose next token belongs to the same document.

Batches: ``inputs``, ``targets``, ``segmentation``, ``positions`` [batch, seq_len] int32
and ``weights`` [batch, seq_len] float32 (0 where the next token starts another document
and on rows that only pad the last dev batch).

`evaluate` greedy-decodes ``config.eval.prompts`` with the KV cache (`lm_decoding_fns` +
`decoding.greedy_search`).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_mini import data as data_lib
from flaxformer_mini import decoding, training
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.data import textfile
from flaxformer_mini.models import DecoderOnlyLM, lm_decoding_fns

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("inputs", "targets", "segmentation", "positions", "weights")


def read_documents(path: str) -> list[str]:
  """Documents of a (gzip'd) UTF-8 text file: blocks separated by blank lines, stripped.

  Raises ValueError naming the file for an unreadable one (`data.textfile.read_lines`:
  not gzip, truncated, invalid UTF-8 with its line) or one without documents.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LM corpus not found: {path!r} (config.data.corpus; the shared "
                            "corpus is ../shared/data/lm/en_corpus.txt.gz from the repo root)")
  text = "\n".join(line for _, line in textfile.read_lines(path))
  docs = [d.strip() for d in text.split("\n\n") if d.strip()]
  if not docs:
    raise ValueError(f"{path}: empty file (no documents)")
  return docs


def split_documents(docs: Sequence[str], dev_permille: int) -> tuple[list[str], list[str]]:
  """(train, dev): a document goes to dev iff crc32(text) % 1000 < dev_permille.

  Stable under reordering or growing the corpus; identical documents land together.
  """
  if not 0 < dev_permille < 1000:
    raise ValueError(f"data.dev_permille={dev_permille} must be in (0, 1000)")
  train, dev = [], []
  for d in docs:
    (dev if zlib.crc32(d.encode("utf-8")) % 1000 < dev_permille else train).append(d)
  return train, dev


class PackedRows:
  """Iterator of packed LM batches over documents; resumable (``get_state``/``set_state``).

  The stream is ``[BOS] doc [EOS] [BOS] doc [EOS] ...`` with documents in a permutation
  of ``docs`` (reshuffled each epoch from ``seed`` when ``shuffle``). Row ``r`` reads
  stream positions ``[r*L, r*L + L]`` (``L + 1`` tokens: the extra one is the last
  target), so rows overlap by one token and no token is skipped.

  Args:
    docs: document strings.
    tokenizer: `flaxformer_mini.data.Tokenizer`.
    seq_len: L, tokens per row.
    batch_size: rows per batch.
    repeat: cycle epochs forever (train) or stop after one pass (dev; the last batch
      is padded with zero-weight rows).
  """

  def __init__(self, docs: Sequence[str], tokenizer, *, seq_len: int, batch_size: int,
               seed: int = 0, shuffle: bool = True, repeat: bool = True):
    if not docs:
      raise ValueError("PackedRows needs at least one document")
    self.docs, self.tok = docs, tokenizer
    self.seq_len, self.batch_size = seq_len, batch_size
    self.seed, self.shuffle, self.repeat = seed, shuffle, repeat
    self._state = {"epoch": 0, "index": 0, "offset": 0}
    self._order_epoch, self._order = None, None
    self._cached: tuple[int | None, np.ndarray | None] = (None, None)

  # -- state -------------------------------------------------------------------------
  def get_state(self) -> dict[str, int]:
    """JSON-able position: epoch, index into that epoch's order, token offset in the doc."""
    return dict(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    missing = {"epoch", "index", "offset"} - set(state)
    if missing:
      raise ValueError(f"PackedRows state lacks {sorted(missing)}: {state}")
    self._state = {k: int(state[k]) for k in ("epoch", "index", "offset")}

  # -- stream ------------------------------------------------------------------------
  def _doc_tokens(self, epoch: int, index: int) -> np.ndarray:
    if self._order_epoch != epoch:
      self._order_epoch = epoch
      self._order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.docs))
                     if self.shuffle else np.arange(len(self.docs)))
    doc = int(self._order[index])
    if self._cached[0] != doc:
      ids = self.tok.encode([self.docs[doc]])[0]
      self._cached = (doc, np.concatenate([[data_lib.BOS_ID], ids, [data_lib.EOS_ID]]))
    return self._cached[1]

  def _take(self, state: dict[str, int], n: int):
    """Up to n tokens from ``state``: (tokens, doc serial numbers, new state); fewer at the end."""
    toks, docs = [], []
    s = dict(state)
    while n > 0:
      if s["index"] >= len(self.docs):
        if not self.repeat:
          break
        s = {"epoch": s["epoch"] + 1, "index": 0, "offset": 0}
      ids = self._doc_tokens(s["epoch"], s["index"])
      piece = ids[s["offset"]:s["offset"] + n]
      toks.append(piece)
      docs.append(np.full(len(piece), s["epoch"] * len(self.docs) + s["index"], np.int64))
      n -= len(piece)
      s["offset"] += len(piece)
      if s["offset"] >= len(ids):
        s = {"epoch": s["epoch"], "index": s["index"] + 1, "offset": 0}
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros((0,), dt)
    return cat(toks, np.int32), cat(docs, np.int64), s

  def _row(self) -> Batch | None:
    L = self.seq_len
    toks, docs, after = self._take(self._state, L)
    if len(toks) < 2:
      return None
    nxt, nxt_doc, _ = self._take(after, 1)
    self._state = after
    toks, docs = np.concatenate([toks, nxt]), np.concatenate([docs, nxt_doc])
    n = len(toks) - 1                             # inputs in this row (L unless at the end)
    row = {k: np.zeros((L,), np.int32) for k in BATCH_KEYS[:-1]}
    row["weights"] = np.zeros((L,), np.float32)
    start = np.concatenate([[True], docs[1:n] != docs[:n - 1]])
    seg = np.cumsum(start)
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    row["inputs"][:n], row["targets"][:n] = toks[:n], toks[1:n + 1]
    row["segmentation"][:n], row["positions"][:n] = seg, np.arange(n) - first
    row["weights"][:n] = docs[1:n + 1] == docs[:n]
    return row

  def __iter__(self) -> PackedRows:
    return self

  def __next__(self) -> Batch:
    rows = []
    while len(rows) < self.batch_size:
      row = self._row()
      if row is None:
        break
      rows.append(row)
    if not rows:
      raise StopIteration
    while len(rows) < self.batch_size:            # dev only: zero-weight padding rows
      rows.append({k: np.zeros_like(v) for k, v in rows[0].items()})
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


class LMTask:
  """`tasks.Task` for next-token language modelling with `DecoderOnlyLM`.

  Reads ``config.model`` (`TransformerConfig.from_dict`), ``config.data`` (corpus,
  dev_permille, vocab_size, spm_sample_docs, spm_model_type, seq_len, eval_rows,
  eval_batch_size), ``config.batch_size``, ``config.seed``,
  ``config.loss.label_smoothing`` and ``config.eval`` (prompts, max_decode_len).
  """

  name = "lm"

  def __init__(self, config, workdir: str):
    self.config = config
    d = config.data
    os.makedirs(workdir, exist_ok=True)
    self.train_docs, self.dev_docs = split_documents(read_documents(d.corpus), d.dev_permille)
    logging.info("lm corpus: %d train / %d dev documents", len(self.train_docs),
                 len(self.dev_docs))
    spm_path = os.path.join(workdir, data_lib.tokenizer.MODEL_FILENAME)
    if not os.path.isfile(spm_path):
      rng = np.random.default_rng(config.seed)
      n = min(d.spm_sample_docs or len(self.train_docs), len(self.train_docs))
      sample = rng.choice(len(self.train_docs), size=n, replace=False)
      lines = (line for i in sample for line in self.train_docs[i].split("\n") if line.strip())
      logging.info("training SentencePiece on %d documents (vocab %d) -> %s", n,
                   d.vocab_size, spm_path)
      data_lib.train_tokenizer(lines, workdir, vocab_size=d.vocab_size,
                               model_type=d.spm_model_type)
    self.tokenizer = data_lib.load_tokenizer(spm_path)
    self.assets = {data_lib.tokenizer.MODEL_FILENAME: spm_path}

    model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    self.model_config = TransformerConfig.from_dict(model)
    data_lib.check_vocab(self.tokenizer, self.model_config.vocab_size)
    longest = max(d.seq_len, config.eval.max_decode_len)
    if longest > self.model_config.max_len:
      raise ValueError(f"data.seq_len / eval.max_decode_len up to {longest} exceed "
                       f"model.max_len={self.model_config.max_len}")
    self.model = DecoderOnlyLM(self.model_config)
    self._eval_cache: list[Batch] | None = None
    self._generate = jax.jit(self._generate_batch, static_argnames=("max_len",))

  # -- model and loss ------------------------------------------------------------------
  @property
  def d_model(self) -> int:
    """The model's width, which the 'rsqrt' learning-rate schedule scales by."""
    return self.model_config.d_model

  def init_params(self, rng: jax.Array):
    ids = jnp.ones((1, self.config.data.seq_len), jnp.int32)
    return jax.jit(self.model.init)(rng, ids)["params"]

  def loss_and_metrics(self, params, batch, rng, deterministic):
    logits = self.model.apply({"params": params}, batch["inputs"],
                              segmentation=batch["segmentation"], positions=batch["positions"],
                              deterministic=deterministic, rngs={"dropout": rng})
    sums = training.cross_entropy_sums(logits, batch["targets"], batch["weights"],
                                       self.config.loss.label_smoothing)
    return sums["loss"], sums

  # -- data ----------------------------------------------------------------------------
  def train_iterator(self) -> Iterator[Batch]:
    return PackedRows(self.train_docs, self.tokenizer, seq_len=self.config.data.seq_len,
                      batch_size=self.config.batch_size, seed=self.config.seed)

  def eval_batches(self) -> Iterable[Batch]:
    """The first ``data.eval_rows`` rows of the dev documents in file order (fixed)."""
    if self._eval_cache is None:
      d = self.config.data
      rows = PackedRows(self.dev_docs, self.tokenizer, seq_len=d.seq_len, batch_size=1,
                        shuffle=False, repeat=False)
      picked = [r for _, r in zip(range(d.eval_rows or 1 << 30), rows)]
      self._eval_cache = []
      for start in range(0, len(picked), d.eval_batch_size):
        chunk = picked[start:start + d.eval_batch_size]
        blank = {k: np.zeros_like(v) for k, v in chunk[0].items()}
        rows = chunk + [blank] * (d.eval_batch_size - len(chunk))
        self._eval_cache.append({k: np.concatenate([r[k] for r in rows]) for k in BATCH_KEYS})
    return list(self._eval_cache)

  # -- generation ----------------------------------------------------------------------
  def _generate_batch(self, params, prompt, *, max_len: int):
    fn, cache = lm_decoding_fns(self.model, params, prompt.shape[0], max_len)
    return decoding.greedy_search(fn, cache, batch_size=prompt.shape[0], max_decode_len=max_len,
                                  bos_id=data_lib.BOS_ID, eos_id=data_lib.EOS_ID,
                                  pad_id=data_lib.PAD_ID, prompt=prompt)

  def complete(self, params, prompts: Sequence[str], max_len: int | None = None) -> list[str]:
    """Greedy continuations (text after each prompt) of up to ``max_len`` tokens in total."""
    max_len = max_len or self.config.eval.max_decode_len
    ids = self.tokenizer.encode(prompts)
    width = max(1, max(len(x) for x in ids))
    if width >= max_len:
      raise ValueError(f"a prompt has {width} tokens; eval.max_decode_len={max_len} leaves "
                       "no room to generate")
    prompt = np.zeros((len(prompts), width), np.int32)
    for i, x in enumerate(ids):
      prompt[i, :len(x)] = x
    out = np.asarray(self._generate(params, jnp.asarray(prompt), max_len=max_len))
    return self.tokenizer.decode([row[len(x):] for row, x in zip(out, ids)])

  def evaluate(self, params) -> tuple[dict[str, float], list[str]]:
    """Greedy continuations of ``config.eval.prompts`` (no extra metrics: dev ppl comes
    from the loss)."""
    prompts = list(self.config.eval.prompts)
    if not prompts:
      return {}, []
    return {}, [f"  {p!r} -> {c!r}" for p, c in zip(prompts, self.complete(params, prompts))]
