"""Translate with a trained run directory: `Translator` and the ``translate`` CLI.

    python -m flaxformer_mini.translate --workdir=runs/smoke "Bom dia." "Obrigado."
    python -m flaxformer_mini.translate --workdir=runs/smoke --greedy < dev.pt > dev.hyp
    python -m flaxformer_mini.translate --workdir=runs/smoke --step=200 --beam=4 --alpha=0.6 \
        --input=dev.pt --output=dev.hyp --reference=dev.en

From Python::

    from flaxformer_mini.translate import SearchConfig, Translator
    translator = Translator.from_workdir('runs/smoke')          # newest checkpoint
    translator.translate(['Bom dia.'])                          # beam 4, alpha 0.6
    translator.translate(['Bom dia.'], SearchConfig('sample', temperature=0.7, top_p=0.9))

Batching: sentences are sorted by token length and cut into batches of
``batch_size``; each batch is padded to a *bucket* shape, the next power of two
of its row count (at most ``batch_size``) by the next power of two of its
longest source (at least 4, at most ``model.max_len``). The search is jitted
once per (model, search options, bucket shape), so a long file compiles a
handful of shapes, not one per batch. Filler rows and padding tokens do not
change the real rows' results (rows are independent; the source padding mask
hides padding tokens).

Empty (or whitespace-only) lines are not fed to the model; they come back as
empty translations, so output line ``i`` always belongs to input line ``i``.

Input must be UTF-8: a line that is not is refused with its line number and
where it came from (stdin, the ``--input`` file, an argument). Token ids given
to `Translator.search_ids` are checked on the host before the jitted search
(under ``jit`` an out-of-range id would read a NaN embedding silently).

A source longer than the model's ``max_len`` tokens (the encoder's position
limit) is truncated to ``max_len`` with a warning naming its line
(``on_long='truncate'``, the default) or refused with `InputTooLongError`
(``on_long='error'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_mini import decoding
from flaxformer_mini import quantize as _quantize
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, check_vocab
from flaxformer_mini.models import (
  STATIC_CACHE_KEYS,
  Transformer,
  rows_cache,
  seq2seq_decoding_fns,
  seq2seq_step_fn,
)

PyTree = Any
log = logging.getLogger(__name__)

METHODS = ('beam', 'greedy', 'sample')
ON_LONG = ('truncate', 'error')
_QUANTIZE = _quantize.METHODS
MIN_LENGTH_BUCKET = 4


class InputTooLongError(ValueError):
  """A source sentence has more tokens than the model's ``max_len`` (``on_long='error'``)."""


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """How to pick the output tokens (see `flaxformer_mini.decoding`).

  Attributes:
    method: 'beam' | 'greedy' | 'sample'.
    beam_size, alpha: beam search width and GNMT length-penalty exponent.
    temperature, top_k, top_p: sampling (0 = greedy, 0 = off, 1.0 = off).
    The float options must be finite (NaN would silently give empty translations).
    seed: sampling seed; batch ``i`` (in length order) uses ``fold_in(key(seed), i)``,
      so samples depend on ``batch_size`` and on which other sentences are translated.
  """
  method: str = 'beam'
  beam_size: int = 4
  alpha: float = 0.6
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'method={self.method!r} is not one of {METHODS}')
    if self.beam_size < 1:
      raise ValueError(f'beam_size={self.beam_size} must be >= 1')
    for name in ('alpha', 'temperature', 'top_p'):
      value = getattr(self, name)
      if not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise ValueError(f'{name}={value!r} must be a finite number')
    if self.temperature < 0:
      raise ValueError(f'temperature={self.temperature} must be >= 0')
    if self.top_k < 0:
      raise ValueError(f'top_k={self.top_k} must be >= 0 (0 = off)')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p={self.top_p} must be in (0, 1] (1 = off)')


def _next_pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def bucket_sizes(limit: int, start: int) -> list[int]:
  """start, 2 start, 4 start, ... below ``limit``, then ``limit``: every bucket size."""
  out, n = [], start
  while n < limit:
    out.append(n)
    n *= 2
  return out + [limit]


def _bucket_inputs(seqs: Sequence[np.ndarray], rows: int, max_len: int) -> np.ndarray:
  """seqs (at most ``rows``, each at most ``max_len`` ids) as [rows, length] int32 inputs:
  ``length`` the next power of two of the longest (at least ``MIN_LENGTH_BUCKET``, at most
  ``max_len``), ``PAD_ID``-padded; filler rows repeat the last sequence, so they never keep
  a search running after the real rows finish."""
  longest = max(len(ids) for ids in seqs)
  length = min(max_len, max(MIN_LENGTH_BUCKET, _next_pow2(longest)))
  inputs = np.full((rows, length), PAD_ID, np.int32)
  for row, ids in enumerate(seqs):
    inputs[row, :len(ids)] = ids
  inputs[len(seqs):] = inputs[len(seqs) - 1]
  return inputs


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def check_params(model_config: TransformerConfig, params: PyTree) -> None:
  """Raises ValueError naming the first parameter path where ``params`` (e.g. from a
  checkpoint) differ from what ``Transformer(model_config)`` expects: missing,
  unexpected, or of another shape."""
  model = Transformer(model_config)
  ids = jnp.ones((1, 1), jnp.int32)
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids))['params']
  want = {_path_str(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
  if _quantize.is_quantized(params):
    params = jax.eval_shape(_quantize.dequantize_params, params)
  got = {_path_str(p): tuple(np.shape(x))
         for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  for path in sorted(set(want) | set(got)):
    if path not in got:
      problem = f'missing from the checkpoint (config expects shape {want[path]})'
    elif path not in want:
      problem = f'in the checkpoint (shape {got[path]}) but not in the model the config builds'
    elif want[path] != got[path]:
      problem = f'has shape {got[path]} in the checkpoint, the config expects {want[path]}'
    else:
      continue
    raise ValueError(f'checkpoint params do not match config.model: first differing path '
                     f'{path!r} {problem} ({len(got)} checkpoint arrays, {len(want)} expected)')


@functools.partial(jax.jit, static_argnames=('model_config', 'max_decode_len', 'search'))
def _search(params, inputs, rng, *, model_config: TransformerConfig, max_decode_len: int,
            search: SearchConfig):
  """inputs: [batch, src_len] -> (sequences [batch, max_decode_len], scores [batch] | None).

  Module-level, keyed on the (hashable) model config: every `Translator` of the same
  model shares the compiled searches.
  """
  model = Transformer(model_config)
  params = _quantize.dequantize_params(params)  # int8 weights become float here, in the jit
  t2l, cache = seq2seq_decoding_fns(model, params, inputs, max_decode_len)
  common = dict(batch_size=inputs.shape[0], max_decode_len=max_decode_len,
                bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID)
  if search.method == 'beam':
    seqs, scores = decoding.beam_search(t2l, cache, static_cache_keys=STATIC_CACHE_KEYS,
                                        beam_size=search.beam_size,
                                        alpha=search.alpha, num_return=1, **common)
    return seqs[:, 0], scores[:, 0]
  if search.method == 'greedy':
    return decoding.greedy_search(t2l, cache, **common), None
  return decoding.sample(t2l, cache, rng, temperature=search.temperature, top_k=search.top_k,
                         top_p=search.top_p, **common), None


def compiled_shapes() -> int:
  """How many (model, options, shape) variants of the searches (`Translator`'s and
  `BeamSlots`') this process has compiled."""
  # pylint: disable=protected-access
  return _search._cache_size() + _rows_start._cache_size() + _rows_advance._cache_size()


class Translator:
  """A model, its params and tokenizer, ready to translate lists of sentences.

  Args:
    model_config: the model's `TransformerConfig`.
    params: its parameters (checked against ``model_config``).
    tokenizer: the run's tokenizer (its vocab must equal ``model_config.vocab_size``).
    max_decode_len: output tokens per sentence, EOS included (<= ``model_config.max_len``).
    batch_size: sentences per batch (the largest batch bucket).
    on_long: 'truncate' (warn) or 'error' for sources longer than ``model_config.max_len``.
    quantize: 'int8' quantizes float ``params`` (`flaxformer_mini.quantize`) and decodes
      from the int8 weights; params that are already int8 are used as they are.
  """

  def __init__(self, model_config: TransformerConfig, params: PyTree, tokenizer: Tokenizer, *,
               max_decode_len: int | None = None, batch_size: int = 32,
               on_long: str = 'truncate', quantize: str = 'none'):
    if quantize not in _QUANTIZE:
      raise ValueError(f'quantize={quantize!r} is not one of {_QUANTIZE}')
    check_params(model_config, params)
    if quantize == 'int8' and not _quantize.is_quantized(params):
      params = _quantize.quantize_params(params)
    check_vocab(tokenizer, model_config.vocab_size)
    max_decode_len = model_config.max_len if max_decode_len is None else int(max_decode_len)
    if not 1 <= max_decode_len <= model_config.max_len:
      raise ValueError(f'max_decode_len={max_decode_len} must be in [1, model max_len='
                       f'{model_config.max_len}]')
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be >= 1')
    if on_long not in ON_LONG:
      raise ValueError(f'on_long={on_long!r} is not one of {ON_LONG}')
    self.model_config = model_config
    self.model = Transformer(model_config)
    self.params = jax.device_put(params)
    self.tokenizer = tokenizer
    self.max_decode_len = max_decode_len
    self.batch_size = int(batch_size)
    self.on_long = on_long

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, **kwargs) -> Translator:
    """Loads checkpoint ``step`` (default: the newest readable) of a training run dir.

    ``max_decode_len`` defaults to the run's ``config.eval.max_decode_len``; other
    keyword arguments go to the constructor. Errors (missing dir/step/tokenizer,
    params or tokenizer that do not match the saved config) name the run dir.
    """
    from flaxformer_mini import checkpoints
    config, params, tokenizer = checkpoints.load_for_inference(workdir, step)
    model_config = TransformerConfig.from_dict(config.model)
    if kwargs.get('max_decode_len') is None:
      eval_len = config.get('eval', {}).get('max_decode_len', model_config.max_len)
      kwargs['max_decode_len'] = min(int(eval_len), model_config.max_len)
    try:
      return cls(model_config, params, tokenizer, **kwargs)
    except ValueError as e:
      where = f'step {step}' if step is not None else 'the newest checkpoint'
      raise ValueError(f'{os.path.abspath(workdir)!r} ({where}): {e}') from None

  # -- search --------------------------------------------------------------------------

  def search_ids(self, inputs, search: SearchConfig = SearchConfig(), rng=None):
    """Decodes token ids as they are (no bucketing; jitted per shape and options).

    Args:
      inputs: [batch, src_len] int source ids, ``PAD_ID``-padded, no EOS; every id in
        ``[0, model vocab_size)``. Checked here on the host, before the jitted search
        (ValueError naming the first bad id, its row and position, and the vocab size).
      search: the search options (its ``seed`` is ignored; pass ``rng``).
      rng: PRNG key for sampling (default ``key(search.seed)``).
    Returns:
      (sequences [batch, max_decode_len] int32 without BOS, EOS then PAD;
       scores [batch] float32 length-penalised beam scores, or None unless beam).
    """
    host = np.asarray(inputs)
    if host.ndim != 2 or host.shape[1] > self.model_config.max_len:
      raise ValueError(f'expected inputs [batch, src_len <= {self.model_config.max_len}], '
                       f'got shape {host.shape}')
    if not np.issubdtype(host.dtype, np.integer):
      raise TypeError(f'expected integer token ids for inputs, got dtype {host.dtype}')
    decoding.check_token_ids(host, self.model_config.vocab_size, 'inputs')
    inputs = jnp.asarray(host, jnp.int32)
    if rng is None:
      rng = jax.random.PRNGKey(search.seed)
    return _search(self.params, inputs, rng, model_config=self.model_config,
                   max_decode_len=self.max_decode_len,
                   search=dataclasses.replace(search, seed=0))

  # -- text ----------------------------------------------------------------------------

  def encode(self, sentences: Sequence[str], on_long: str | None = None
             ) -> list[np.ndarray | None]:
    """Source ids per sentence, None for empty ones; enforces ``on_long`` (line = index + 1)."""
    on_long = on_long or self.on_long
    if on_long not in ON_LONG:
      raise ValueError(f'on_long={on_long!r} is not one of {ON_LONG}')
    limit = self.model_config.max_len
    nonempty = [i for i, s in enumerate(sentences) if s.strip()]
    encoded: list[np.ndarray | None] = [None] * len(sentences)
    for i, ids in zip(nonempty, self.tokenizer.encode([sentences[i] for i in nonempty])):
      if len(ids) > limit:
        if on_long == 'error':
          raise InputTooLongError(
              f'input line {i + 1} has {len(ids)} tokens, more than the model max_len={limit} '
              f'(use on_long=truncate / --on_long=truncate to cut it)')
        log.warning('input line %d has %d tokens, more than the model max_len=%d; '
                    'truncated to the first %d', i + 1, len(ids), limit, limit)
        ids = ids[:limit]
      encoded[i] = ids
    return encoded

  def batches(self, encoded: Sequence[np.ndarray | None]):
    """Yields (indices into ``encoded``, inputs [rows, length] int32) in length order.

    Skips None (empty lines); ``rows`` and ``length`` are bucketed (module docstring).
    The first ``len(indices)`` rows are the sentences; the filler rows after them repeat
    the last one, so they never keep the search running after the real rows finish.
    """
    todo = [i for i, ids in enumerate(encoded) if ids is not None]
    todo.sort(key=lambda i: len(encoded[i]))  # stable: equal lengths keep input order
    for start in range(0, len(todo), self.batch_size):
      idx = todo[start:start + self.batch_size]
      rows = min(self.batch_size, _next_pow2(len(idx)))
      yield idx, _bucket_inputs([encoded[i] for i in idx], rows, self.model_config.max_len)

  def translate(self, sentences: Sequence[str], search: SearchConfig = SearchConfig(), *,
                on_long: str | None = None) -> list[str]:
    """Translations of ``sentences`` (same length and order; empty in, empty out)."""
    if isinstance(sentences, str):
      raise TypeError('translate takes a list of sentences, got a single str')
    return self.translate_encoded(self.encode(sentences, on_long), search)

  def translate_encoded(self, encoded: Sequence[np.ndarray | None],
                        search: SearchConfig = SearchConfig()) -> list[str]:
    """Translations of `encode`'s output (None -> ''), batched as `batches` describes."""
    out = [''] * len(encoded)
    base_rng = jax.random.PRNGKey(search.seed)
    for n, (idx, inputs) in enumerate(self.batches(encoded)):
      seqs, _ = self.search_ids(inputs, search, jax.random.fold_in(base_rng, n))
      for i, text in zip(idx, self.tokenizer.decode(np.asarray(seqs)[:len(idx)])):
        out[i] = text
    return out


# ------------------------------------------------------------------ step-level batching


@functools.partial(jax.jit, static_argnames=('model_config', 'max_decode_len'),
                   donate_argnums=(1,))
def _rows_start(params, state, inputs, slots, *, model_config: TransformerConfig,
                max_decode_len: int):
  """Encodes inputs [n, src_len] and starts them in ``slots`` [n] of the pool ``state``."""
  model = Transformer(model_config)
  params = _quantize.dequantize_params(params)
  _, cache = seq2seq_decoding_fns(model, params, inputs, max_decode_len)
  src_len = state.cache['decoder']['encoder_valid'].shape[1]
  return decoding.beam_rows_start(state, slots, rows_cache(cache, src_len), bos_id=BOS_ID,
                                  pad_id=PAD_ID, static_cache_keys=STATIC_CACHE_KEYS)


@functools.partial(jax.jit, static_argnames=('model_config', 'max_decode_len', 'alpha'),
                   donate_argnums=(1,))
def _rows_advance(params, state, max_steps, *, model_config: TransformerConfig,
                  max_decode_len: int, alpha: float):
  """Up to ``max_steps`` steps of the pool; (state, finished [rows], best [rows, len])."""
  model = Transformer(model_config)
  params = _quantize.dequantize_params(params)
  state, finished = decoding.beam_rows_advance(
      seq2seq_step_fn(model, params), state, max_steps, max_decode_len=max_decode_len,
      eos_id=EOS_ID, bos_id=BOS_ID, pad_id=PAD_ID, alpha=alpha,
      static_cache_keys=STATIC_CACHE_KEYS)
  return state, finished, state.fin_seqs[:, 0]


class BeamSlots:
  """Step-level beam search over a `Translator`: sentences join and leave between steps.

  A pool of ``rows`` slots (`decoding.beam_rows_advance`): `start` puts sentences in free
  slots, `advance` steps every busy one and hands back each sentence as soon as its own
  search ends, so a server never waits for the longest sentence of a batch, and a
  sentence gets the tokens `Translator.translate` gives it (the same search, row by row).
  New sentences are encoded in power-of-two buckets (rows by source length, as
  `Translator.batches`); the pool holds sources of up to ``model.max_len`` tokens.

  Args:
    translator: the model, params and tokenizer.
    search: a beam search (``method='beam'``).
    rows: slots in the pool (default ``translator.batch_size``).
  """

  def __init__(self, translator: Translator, search: SearchConfig, rows: int | None = None):
    if search.method != 'beam':
      raise ValueError(f'BeamSlots runs beam search, got method={search.method!r}')
    self.translator, self.search = translator, search
    self.rows = int(rows or translator.batch_size)
    if self.rows < 1:
      raise ValueError(f'rows={rows} must be >= 1')
    cfg, n = translator.model_config, translator.max_decode_len
    self._static = dict(model_config=cfg, max_decode_len=n)
    dummy = jnp.zeros((self.rows, cfg.max_len), jnp.int32)
    shapes = jax.eval_shape(lambda p: rows_cache(seq2seq_decoding_fns(
        translator.model, _quantize.dequantize_params(p), dummy, n)[1], cfg.max_len),
        translator.params)
    self._empty = lambda: decoding.beam_rows_init(
        jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes),
        rows=self.rows, beam_size=search.beam_size, max_decode_len=n, pad_id=PAD_ID,
        static_cache_keys=STATIC_CACHE_KEYS)
    self.reset()

  def reset(self) -> None:
    """Empties the pool (every slot free), e.g. after a failed step."""
    self._state = self._empty()
    self._owner: list[Any] = [None] * self.rows   # what `start` was given, per busy slot

  @property
  def free(self) -> int:
    return self._owner.count(None)

  @property
  def busy(self) -> int:
    return self.rows - self.free

  def start(self, items: Sequence[tuple[Any, np.ndarray]]) -> None:
    """Starts ``(tag, source ids)`` pairs in free slots (at most `free` of them); a tag
    is any value but None, handed back by `advance`."""
    if not items:
      return
    if any(tag is None for tag, _ in items):
      raise ValueError('a sentence tag must not be None (None marks a free slot)')
    slots = [r for r, o in enumerate(self._owner) if o is None][:len(items)]
    if len(slots) < len(items):
      raise ValueError(f'{len(items)} sentences for {len(slots)} free slots')
    cfg = self.translator.model_config
    n = min(self.rows, _next_pow2(len(items)))
    for start in range(0, len(items), n):  # more than the bucket: several calls
      chunk, where = items[start:start + n], slots[start:start + n]
      inputs = _bucket_inputs([ids[:cfg.max_len] for _, ids in chunk], n, cfg.max_len)
      index = np.full((n,), self.rows, np.int32)  # filler rows go to no slot
      index[:len(chunk)] = where
      self._state = _rows_start(self.translator.params, self._state, jnp.asarray(inputs),
                                jnp.asarray(index), **self._static)
      for (tag, _), slot in zip(chunk, where):
        self._owner[slot] = tag

  def advance(self, max_steps: int) -> list[tuple[Any, np.ndarray]]:
    """Steps the busy slots up to ``max_steps`` times, stopping early when one finishes.

    Returns ``(tag, tokens [max_decode_len])`` for each sentence that finished (its
    best hypothesis, without BOS, EOS then PAD); their slots are free again.
    """
    if not self.busy:
      return []
    self._state, finished, best = _rows_advance(
        self.translator.params, self._state, jnp.int32(max_steps), alpha=self.search.alpha,
        **self._static)
    done = []
    best = np.asarray(best)
    for slot in np.flatnonzero(np.asarray(finished)):
      done.append((self._owner[slot], best[slot]))
      self._owner[slot] = None
    return done

  def warm_up(self) -> int:
    """Compiles `start` for every bucket shape and `advance`; returns the shapes run."""
    count = 0
    for rows in bucket_sizes(self.rows, 1):
      for length in bucket_sizes(self.translator.model_config.max_len, MIN_LENGTH_BUCKET):
        self.start([('warm-up', np.full((length,), 3, np.int32))] * rows)
        count += 1
        while self.busy:
          self.advance(self.translator.max_decode_len)
    return count


# --------------------------------------------------------------------------------- CLI


def score(hypotheses: Sequence[str], references: Sequence[str]) -> list[str]:
  """sacrebleu corpus BLEU and chrF (detokenized), each as ``<signature> = <score>``."""
  from sacrebleu.metrics import BLEU, CHRF
  lines = []
  for metric in (BLEU(), CHRF()):
    result = metric.corpus_score(list(hypotheses), [list(references)])
    lines.append(result.format(signature=str(metric.get_signature())))
  return lines


def _decode_lines(data: bytes, where: str) -> list[str]:
  """UTF-8 ``data`` split into lines as a text file reads them (no line ends).

  Raises ValueError naming ``where`` and the 1-based line of the first invalid byte.
  """
  try:
    data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    column = e.start - (data.rfind(b'\n', 0, e.start) + 1) + 1
    raise ValueError(f'{where} line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x} '
                     f'at column {column}); convert the input to UTF-8') from None
  with io.TextIOWrapper(io.BytesIO(data), encoding='utf-8') as f:
    return [line.rstrip('\r\n') for line in f]


def _read_lines(path: str, what: str) -> list[str]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} file not found: {path!r}')
  with open(path, 'rb') as f:
    return _decode_lines(f.read(), f'{what} {path!r}')


def _read_stdin() -> list[str]:
  buffer = getattr(sys.stdin, 'buffer', None)
  if buffer is None:  # an in-memory text stream: already decoded
    return [line.rstrip('\r\n') for line in sys.stdin]
  return _decode_lines(buffer.read(), 'stdin')


def _check_arguments_utf8(sentences: Sequence[str]) -> None:
  """Arguments with bytes that are not UTF-8 arrive as lone surrogates; refuse them."""
  for i, s in enumerate(sentences):
    try:
      s.encode('utf-8')
    except UnicodeEncodeError:
      raise ValueError(f'sentence argument {i + 1} is not valid UTF-8') from None


def _check_output(path: str) -> None:
  """Raises ValueError unless ``path`` can be written: checked before any decoding work."""
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ValueError(f'--output {path!r} is a directory, expected a file path')
  if not os.path.isdir(parent):
    raise ValueError(f'--output {path!r}: directory {parent!r} does not exist')
  if not os.access(parent, os.W_OK | os.X_OK) or (
      os.path.exists(path) and not os.access(path, os.W_OK)):
    raise ValueError(f'--output {path!r} is not writable')


def _finite_float(text: str) -> float:
  """argparse type: a finite float (argparse reports 'argument --x: ...', exit 2)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f'expected a finite number, got {text!r}')
  return value


def _positive_int(text: str) -> int:
  """argparse type: an integer >= 1."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {text!r}')
  return value


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m flaxformer_mini.translate',
      description='Translate with the latest (or --step) checkpoint of a training run. '
      'Input: --input FILE, else positional sentences, else stdin; one output line per '
      'input line (empty lines stay empty).')
  p.add_argument('sentences', nargs='*', help='sentences to translate (instead of --input)')
  p.add_argument('--workdir', required=True, help='training run dir (train.py --workdir)')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
  method = p.add_mutually_exclusive_group()
  method.add_argument('--beam', type=int, default=None, metavar='N',
                      help='beam search with N beams (default 4)')
  method.add_argument('--greedy', action='store_true', help='greedy search')
  method.add_argument('--sample', action='store_true', help='ancestral sampling')
  p.add_argument('--alpha', type=_finite_float, default=None,
                 help='beam length penalty (0.6)')
  p.add_argument('--temperature', type=_finite_float, default=None,
                 help='sampling temperature (1.0)')
  p.add_argument('--top_k', type=int, default=None, help='sample from the k best (0 = off)')
  p.add_argument('--top_p', type=_finite_float, default=None, help='nucleus mass (1.0 = off)')
  p.add_argument('--seed', type=int, default=None, help='sampling seed (0)')
  p.add_argument('--max_decode_len', type=_positive_int, default=None,
                 help='output tokens incl. EOS (default: the run\'s eval.max_decode_len)')
  p.add_argument('--batch_size', type=_positive_int, default=32,
                 help='sentences per batch (32)')
  p.add_argument('--on_long', choices=ON_LONG, default='truncate',
                 help='source longer than model max_len: truncate with a warning, or error')
  p.add_argument('--quantize', choices=_QUANTIZE, default='none',
                 help='int8: decode from per-channel int8 weights (flaxformer_mini.quantize)')
  p.add_argument('--input', default=None, help='file with one source sentence per line')
  p.add_argument('--output', default=None, help='write translations here (default stdout)')
  p.add_argument('--reference', default=None,
                 help='reference translations, one per input line: print sacrebleu BLEU and '
                 'chrF (to stdout with --output, else to stderr)')
  return p


def _search_config(args, parser) -> SearchConfig:
  sampling = {k: getattr(args, k) for k in ('temperature', 'top_k', 'top_p', 'seed')
              if getattr(args, k) is not None}
  if sampling and not args.sample:
    parser.error(f'--{"/--".join(sampling)} only apply with --sample')
  if args.alpha is not None and (args.greedy or args.sample):
    parser.error('--alpha only applies to beam search')
  try:
    if args.sample:
      return SearchConfig('sample', **sampling)
    if args.greedy:
      return SearchConfig('greedy')
    return SearchConfig('beam', beam_size=4 if args.beam is None else args.beam,
                        alpha=0.6 if args.alpha is None else args.alpha)
  except ValueError as e:
    parser.error(str(e))


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  search = _search_config(args, parser)
  if args.input is not None and args.sentences:
    parser.error('give sentences either with --input or as arguments, not both')
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's read-only notices off
  try:
    if args.output is not None:
      _check_output(args.output)
    if args.input is not None:
      sources = _read_lines(args.input, '--input')
    elif args.sentences:
      _check_arguments_utf8(args.sentences)
      sources = list(args.sentences)
    else:
      sources = _read_stdin()
    references = None
    if args.reference is not None:
      references = _read_lines(args.reference, '--reference')
      if len(references) != len(sources):
        raise ValueError(f'--reference {args.reference!r} has {len(references)} lines, the '
                         f'input has {len(sources)}; they must align line by line')
    t0 = time.time()
    translator = Translator.from_workdir(args.workdir, args.step,
                                         max_decode_len=args.max_decode_len,
                                         batch_size=args.batch_size, on_long=args.on_long,
                                         quantize=args.quantize)
    t1 = time.time()
    hypotheses = translator.translate(sources, search)
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  text = ''.join(h + '\n' for h in hypotheses)
  if args.output is not None:
    try:
      with open(args.output, 'w', encoding='utf-8') as f:
        f.write(text)
    except OSError as e:  # e.g. removed or filled since the check at start
      print(f'error: cannot write --output {args.output!r}: {e}', file=sys.stderr)
      return 1
  else:
    sys.stdout.write(text)
    sys.stdout.flush()
  print(f'translated {sum(bool(s.strip()) for s in sources)} of {len(sources)} lines '
        f'({search.method}) in {time.time() - t1:.1f}s after {t1 - t0:.1f}s loading; '
        f'{compiled_shapes()} compiled shape(s)', file=sys.stderr)
  if references is not None:
    report = sys.stdout if args.output is not None else sys.stderr
    for line in score(hypotheses, references):
      print(line, file=report)
  return 0


if __name__ == '__main__':
  sys.exit(main())
