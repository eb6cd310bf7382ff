"""Tasks: what to train (model, loss, data, evaluation) behind one small protocol.

`train.py` and `flaxformer_mini.training` know nothing about translation; they ask the
task named by ``config.task`` for everything model- or data-specific.

Adding a task (e.g. ``lm`` or ``vit_digits``) in your own file::

    # flaxformer_mini/lm_task.py
    from flaxformer_mini import tasks

    class LMTask:                      # implements tasks.Task
      def __init__(self, config, workdir): ...
      ...

    tasks.register_task('lm', LMTask)  # factory(config, workdir) -> Task

and set ``config.task = 'lm'`` in your config. `get_task` imports the module of a
built-in task (`BUILTIN_TASK_MODULES`) on first use; your own task module just has to be
imported before ``get_task`` runs.

Batches are dicts of numpy arrays with a leading batch axis (any keys the task
likes). ``loss_and_metrics`` returns SUMS (see `flaxformer_mini.training`): the loss
summed over tokens/examples and a metrics dict of sums containing ``'weight'``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_mini import data as data_lib
from flaxformer_mini import decoding
from flaxformer_mini import training
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.models import STATIC_CACHE_KEYS, Transformer, seq2seq_decoding_fns

PyTree = Any
Batch = dict[str, np.ndarray]


class Task(Protocol):
  """What `train.py` needs from a task. Built by ``factory(config, workdir)``.

  Attributes:
    name: registry name.
    assets: {filename: path} of files a run needs at inference time, kept in the
      run dir (e.g. the tokenizer); `checkpoints` records their sha256.
  """
  name: str
  assets: dict[str, str]

  def init_params(self, rng: jax.Array) -> PyTree:
    """Fresh parameters (host or device arrays)."""

  def loss_and_metrics(self, params: PyTree, batch: Batch, rng: jax.Array,
                       deterministic: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss sum, metric sums incl. 'weight'); pure and jittable."""

  def train_iterator(self) -> Iterator[Batch]:
    """Infinite iterator of train batches with ``get_state()`` (JSON) / ``set_state()``.

    A task may also take ``(shard_index, shard_count)`` and yield only that input
    shard's ``batch_size / shard_count`` rows; then ``config.data.input_shards > 1``
    lets each process of a multi-process run read only its own shards."""

  def eval_batches(self) -> Iterable[Batch]:
    """One pass over the dev set (a fresh iterable each call); batch rows fixed."""

  def evaluate(self, params: PyTree) -> tuple[dict[str, float], list[str]]:
    """Optional: task metrics (e.g. {'bleu': ..}) and printable samples. Return ({}, [])
    when there is nothing beyond the loss."""


TaskFactory = Callable[[Any, str], Task]
_REGISTRY: dict[str, TaskFactory] = {}


def register_task(name: str, factory: TaskFactory, *, overwrite: bool = False) -> None:
  """Registers ``factory(config, workdir) -> Task`` under ``name``."""
  if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
    raise ValueError(f'task {name!r} is already registered ({_REGISTRY[name]}); '
                     'pass overwrite=True to replace it')
  _REGISTRY[name] = factory


def registered_tasks() -> list[str]:
  return sorted(_REGISTRY)


# Built-in tasks defined outside this file, imported (and so registered) on first use.
BUILTIN_TASK_MODULES = {
    'lm': 'flaxformer_mini.variants.lm_task',
    'vit_digits': 'flaxformer_mini.variants.vit_task',
}


def get_task(config, workdir: str) -> Task:
  """Builds the task named ``config.task``."""
  name = config.task
  if name not in _REGISTRY and name in BUILTIN_TASK_MODULES:
    importlib.import_module(BUILTIN_TASK_MODULES[name])
  if name not in _REGISTRY:
    known = sorted(set(registered_tasks()) | set(BUILTIN_TASK_MODULES))
    raise ValueError(f'unknown task config.task={name!r}; known tasks: {known}')
  return _REGISTRY[name](config, workdir)


# ----------------------------------------------------------------------------- translation


def _data_paths(d) -> dict[str, str]:
  if d.source == 'embedded':
    return data_lib.embedded_paths(d.pair)
  if d.source == 'shared':
    root = os.path.abspath(d.shared_root)
    try:
      return data_lib.shared_paths(root, d.pair)
    except FileNotFoundError as e:
      raise FileNotFoundError(
          f'{e}. config.data.shared_root={d.shared_root!r} (resolved {root!r}) must contain '
          f'data/translate/{d.pair}.{{train,dev}}.tsv.gz; pass '
          '--config.data.shared_root=/path/to/shared or use --config.data.source=embedded'
      ) from None
  raise ValueError(f"config.data.source={d.source!r} is not one of ('embedded', 'shared')")


class TranslationTask:
  """Seq2seq translation (``config.data.src_lang`` -> ``tgt_lang``) with `Transformer`.

  Setup (idempotent, so a resumed run finds everything in place):
    * TFDS array_record dataset from the TSV files, in ``data.tfds_dir`` or
      ``<workdir>/tfds``;
    * a joint SentencePiece model ``<workdir>/spm.model``, trained on the train split
      unless it exists (a resumed run reuses it);
    * the train and eval splits tokenized once, on first use, and cached in
      ``<workdir>/tokenized/`` keyed by the tokenizer's sha256 (`data.tokenize_source`),
      so the input pipeline only slices arrays and a restarted run reads the cache;
    * the model from ``config.model`` (its vocab_size must match the tokenizer).
  """

  name = 'translation'

  def __init__(self, config, workdir: str):
    self.config = config
    d = config.data
    if 'en' not in (d.src_lang, d.tgt_lang) or d.src_lang == d.tgt_lang:
      raise ValueError(f'data.src_lang={d.src_lang!r}, data.tgt_lang={d.tgt_lang!r}: one of '
                       f'them must be "en" and the other the non-English side of {d.pair!r}')
    self.src_key, self.tgt_key = d.src_lang, d.tgt_lang
    other = d.tgt_lang if d.src_lang == 'en' else d.src_lang
    os.makedirs(workdir, exist_ok=True)
    tfds_dir = d.tfds_dir or os.path.join(workdir, 'tfds')
    self.builder = data_lib.prepare_tsv_builder(_data_paths(d), other_lang=other,
                                                data_dir=tfds_dir)
    self.train_source = data_lib.translation_source(self.builder, d.train_split)
    self.eval_source = data_lib.translation_source(self.builder, d.eval_split)

    spm_path = os.path.join(workdir, data_lib.tokenizer.MODEL_FILENAME)
    if not os.path.isfile(spm_path):
      n = len(self.train_source) if not d.spm_max_sentences else min(
          d.spm_max_sentences, len(self.train_source))
      logging.info('training SentencePiece (%d pairs, vocab %d) -> %s', n, d.vocab_size,
                   spm_path)
      sentences = (data_lib.as_text(ex[k])
                   for chunk in data_lib.read_chunks(self.train_source, n)
                   for ex in chunk for k in (self.src_key, self.tgt_key))
      data_lib.train_tokenizer(sentences, workdir, vocab_size=d.vocab_size,
                               model_type=d.spm_model_type)
    self.tokenizer = data_lib.load_tokenizer(spm_path)
    self.assets = {data_lib.tokenizer.MODEL_FILENAME: spm_path}
    self._tokenized_dir = os.path.join(workdir, 'tokenized')

    self.model_config = TransformerConfig.from_dict(config.model)
    data_lib.check_vocab(self.tokenizer, self.model_config.vocab_size)
    longest = max(d.max_source_len, d.max_target_len, config.eval.max_decode_len)
    if longest > self.model_config.max_len:
      raise ValueError(f'data/eval lengths up to {longest} exceed model.max_len='
                       f'{self.model_config.max_len}')
    self.model = Transformer(self.model_config)
    self._decode = jax.jit(self._decode_batch, static_argnames=('max_len',))

  # -- model and loss ------------------------------------------------------------------

  def init_params(self, rng: jax.Array) -> PyTree:
    d = self.config.data
    src = jnp.ones((1, d.max_source_len), jnp.int32)
    tgt = jnp.ones((1, d.max_target_len), jnp.int32)
    return jax.jit(self.model.init)(rng, src, tgt)['params']

  def loss_and_metrics(self, params, batch, rng, deterministic):
    """batch: the pipeline's packed/padded dict (see flaxformer_mini.data.pipeline)."""
    logits = self.model.apply(
        {'params': params}, batch['inputs'], batch['decoder_inputs'],
        inputs_segmentation=batch['inputs_segmentation'],
        targets_segmentation=batch['targets_segmentation'],
        inputs_positions=batch['inputs_position'],
        targets_positions=batch['targets_position'],
        deterministic=deterministic, rngs={'dropout': rng})
    sums = training.cross_entropy_sums(logits, batch['targets'],
                                       batch['targets_segmentation'] > 0,
                                       self.config.optimizer.label_smoothing)
    return sums['loss'], sums

  # -- data ----------------------------------------------------------------------------

  def _pipeline_config(self, batch_size: int, seed: int) -> data_lib.PipelineConfig:
    d = self.config.data
    return data_lib.PipelineConfig(batch_size=batch_size, max_source_len=d.max_source_len,
                                   max_target_len=d.max_target_len, overlong=d.overlong,
                                   seed=seed)

  def _tokenize(self, source) -> data_lib.TokenizedSource:
    return data_lib.tokenize_source(source, self.tokenizer, src_key=self.src_key,
                                    tgt_key=self.tgt_key, cache_dir=self._tokenized_dir)

  @functools.cached_property
  def train_tokens(self) -> data_lib.TokenizedSource:
    """The train split, tokenized once (``<workdir>/tokenized/`` cache)."""
    return self._tokenize(self.train_source)

  @functools.cached_property
  def eval_tokens(self) -> data_lib.TokenizedSource:
    """The eval split, tokenized once (``<workdir>/tokenized/`` cache)."""
    return self._tokenize(self.eval_source)

  def train_iterator(self, shard_index: int = 0, shard_count: int = 1):
    """Train batches; with ``shard_count > 1`` the ``batch_size / shard_count`` rows of
    input shard ``shard_index`` (every shard_count-th example, shuffled on its own)."""
    cfg = dataclasses.replace(
        self._pipeline_config(self.config.batch_size // shard_count, self.config.seed),
        shard_index=shard_index, shard_count=shard_count)
    ds = data_lib.make_dataset(self.train_tokens, self.tokenizer, cfg, src_key=self.src_key,
                               tgt_key=self.tgt_key, train=True, pack=self.config.data.pack)
    return iter(ds)

  def eval_batches(self):
    cfg = self._pipeline_config(self.config.data.eval_batch_size, 0)
    return data_lib.make_dataset(self.eval_tokens, self.tokenizer, cfg, src_key=self.src_key,
                                 tgt_key=self.tgt_key, train=False, pack=False)

  # -- BLEU ----------------------------------------------------------------------------

  def _decode_batch(self, params, inputs, *, max_len: int):
    """inputs: [batch, src_len] -> [batch, max_len] ids (no BOS, EOS then PAD)."""
    e = self.config.eval
    t2l, cache = seq2seq_decoding_fns(self.model, params, inputs, max_len)
    common = dict(batch_size=inputs.shape[0], max_decode_len=max_len,
                  bos_id=data_lib.BOS_ID, eos_id=data_lib.EOS_ID, pad_id=data_lib.PAD_ID)
    if e.beam_size > 1:
      seqs, _ = decoding.beam_search(t2l, cache, static_cache_keys=STATIC_CACHE_KEYS,
                                     beam_size=e.beam_size, alpha=e.alpha,
                                     num_return=1, **common)
      return seqs[:, 0]
    return decoding.greedy_search(t2l, cache, **common)

  def translate(self, params, sources: list[str]) -> list[str]:
    """Detokenized translations of raw source sentences.

    Sentences are sorted by length and padded to power-of-two lengths (<= model.max_len)
    in fixed-size batches, so only a few shapes are ever compiled.
    """
    e = self.config.eval
    bs, max_len = e.decode_batch_size, self.model_config.max_len
    encoded = self.tokenizer.encode(sources)
    order = np.argsort([len(x) for x in encoded], kind='stable')
    out = [''] * len(sources)
    for start in range(0, len(sources), bs):
      idx = order[start:start + bs]
      longest = max(1, max(len(encoded[i]) for i in idx))
      length = min(max_len, 1 << (longest - 1).bit_length())
      ids = np.zeros((bs, length), np.int32)
      for row, i in enumerate(idx):
        ids[row, :min(length, len(encoded[i]))] = encoded[i][:length]
      seqs = self._decode(params, jnp.asarray(ids), max_len=e.max_decode_len)
      for row, text in enumerate(self.tokenizer.decode(np.asarray(seqs))[:len(idx)]):
        out[idx[row]] = text
    return out

  def evaluate(self, params) -> tuple[dict[str, float], list[str]]:
    """Dev BLEU (sacrebleu corpus BLEU on detokenized text) and sample translations."""
    import sacrebleu
    e = self.config.eval
    n = len(self.eval_source) if not e.bleu_examples else min(e.bleu_examples,
                                                               len(self.eval_source))
    examples = data_lib.read_examples(self.eval_source, 0, n)
    sources = [data_lib.as_text(x[self.src_key]) for x in examples]
    refs = [data_lib.as_text(x[self.tgt_key]) for x in examples]
    hyps = self.translate(params, sources)
    bleu = sacrebleu.corpus_bleu(hyps, [refs])
    samples = [f'  src: {s}\n  ref: {r}\n  hyp: {h}'
               for s, r, h in list(zip(sources, refs, hyps))[:e.num_samples]]
    return {'bleu': bleu.score, 'bleu_examples': float(n)}, samples


register_task('translation', TranslationTask)
