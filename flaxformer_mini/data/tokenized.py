"""Pre-tokenized seq2seq examples: tokenize a text source once, keep ragged int32 arrays.

    text source (len, [i] -> {src_key: text, tgt_key: text, ...})
      -> bulk read (tfds `__getitems__`) -> batched multi-threaded SentencePiece encode
      -> TokenizedSource: flat ids + offsets per side, targets with EOS appended
      -> optional cache file <cache_dir>/<split>-<src>-<tgt>-<digest>.npz

The grain pipeline (`pipeline.make_dataset`) then only slices arrays per example; reading
and decoding a tfds example one at a time (~200-450 us measured on 2 cores; 80-90 us in
bulk) and SentencePiece per pair (~100-500 us, mostly thread start-up) no longer run in
the training input path once per example per epoch.

Storage is int32 (not int16): a slice is then exactly what the pipeline consumes, with
no per-example conversion, and 4 bytes a token is small (the 30k-pair embedded split is
~1M tokens a side, ~8 MB in all).

The cache is keyed by the tokenizer file's sha256, the source identity (tfds dataset
full name + split, or a caller-given id), its length and the two keys; the key is stored
in the file and checked on load. An unreadable, inconsistent or mismatched file is
reported with `logging.warning` naming it and rebuilt, never used; so is one holding an
id outside the tokenizer's vocabulary. `TokenizedSource.check_ids` is the same check for
`pipeline.make_dataset`, so an out-of-range id fails on the host, naming the source, and
never reaches a jitted embedding lookup.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from flaxformer_mini.data.tokenizer import EOS_ID

CACHE_FORMAT = 1
_ARRAYS = ('src_ids', 'src_offsets', 'tgt_ids', 'tgt_offsets')


class TokenizedSource:
  """Random-access pre-tokenized examples stored as two ragged int32 arrays.

  Attributes:
    src_ids: [total_source_tokens] int32, every source concatenated (no EOS).
    src_offsets: [n + 1] int64, 0 first; example i's source is
      src_ids[src_offsets[i]:src_offsets[i + 1]].
    tgt_ids: [total_target_tokens] int32, every target with EOS_ID appended.
    tgt_offsets: [n + 1] int64, the same for targets.
    src_key / tgt_key: the text fields the two sides were read from (e.g. 'pt', 'en').
    origin: where the ids came from (cache file or source id), named in errors; or None.

  `len(ts)` is n and `ts[i]` is {'inputs': [n_i] int32, 'targets': [m_i] int32}: what
  tokenizing example i on its own gives (targets end with EOS). The arrays are read-only
  and `ts[i]` returns views of them.
  """

  def __init__(self, src_ids: np.ndarray, src_offsets: np.ndarray, tgt_ids: np.ndarray,
               tgt_offsets: np.ndarray, *, src_key: str, tgt_key: str,
               origin: str | None = None):
    self.src_ids = _frozen(src_ids, np.int32)
    self.src_offsets = _frozen(src_offsets, np.int64)
    self.tgt_ids = _frozen(tgt_ids, np.int32)
    self.tgt_offsets = _frozen(tgt_offsets, np.int64)
    self.src_key, self.tgt_key = src_key, tgt_key
    self.origin = origin
    _check_ragged('src', self.src_ids, self.src_offsets)
    _check_ragged('tgt', self.tgt_ids, self.tgt_offsets)
    if len(self.src_offsets) != len(self.tgt_offsets):
      raise ValueError(f'src_offsets has {len(self.src_offsets)} entries, tgt_offsets '
                       f'{len(self.tgt_offsets)}; both must be n + 1')
    ends = self.tgt_offsets[1:]
    if (np.diff(self.tgt_offsets) < 1).any() or (self.tgt_ids[ends - 1] != EOS_ID).any():
      raise ValueError(f'every target must end with EOS_ID={EOS_ID}')

  def __len__(self) -> int:
    return len(self.src_offsets) - 1

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i = int(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f'index {i} out of range for {len(self)} examples')
    i %= len(self)
    s, t = self.src_offsets, self.tgt_offsets
    return {'inputs': self.src_ids[s[i]:s[i + 1]], 'targets': self.tgt_ids[t[i]:t[i + 1]]}

  def lengths(self) -> tuple[np.ndarray, np.ndarray]:
    """([n] source lengths, [n] target lengths incl. EOS), int64."""
    return np.diff(self.src_offsets), np.diff(self.tgt_offsets)

  @functools.cached_property
  def max_id(self) -> int:
    """The largest id on either side (-1 when there are none), computed once."""
    return max([int(x.max()) for x in (self.src_ids, self.tgt_ids) if x.size] or [-1])

  def check_ids(self, vocab_size: int) -> None:
    """Raises ValueError naming the source, side, example and id when an id is not in
    [0, vocab_size) (ids < 0 are already refused at construction)."""
    if self.max_id < vocab_size:
      return
    for side, ids, offsets in (('source', self.src_ids, self.src_offsets),
                               ('target', self.tgt_ids, self.tgt_offsets)):
      bad = np.flatnonzero(ids >= vocab_size)
      if bad.size:
        example = int(np.searchsorted(offsets, bad[0], side='right')) - 1
        raise ValueError(
            f'{self.origin or repr(self)}: {side} token id {int(ids[bad[0]])} (example '
            f'{example}) is not in [0, vocab_size={vocab_size}); the ids were made with '
            'a larger vocabulary (a stale tokenize cache? delete it to re-tokenize)')

  def __repr__(self) -> str:
    return (f'TokenizedSource({len(self)} examples, {self.src_key}->{self.tgt_key}, '
            f'{self.src_ids.size}+{self.tgt_ids.size} tokens)')

  # -- files ---------------------------------------------------------------------------

  def save(self, path: str, meta: dict[str, Any]) -> None:
    """Writes an uncompressed .npz (the 4 arrays + `meta` as JSON) atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp-{os.getpid()}'
    meta = {**meta, 'src_key': self.src_key, 'tgt_key': self.tgt_key}
    try:
      with open(tmp, 'wb') as f:
        np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)),
                 **{k: getattr(self, k) for k in _ARRAYS})
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  @classmethod
  def load(cls, path: str) -> tuple[TokenizedSource, dict[str, Any]]:
    """Reads a file written by `save`; returns (source, meta).

    Raises ValueError (or OSError / zipfile.BadZipFile) for unreadable or inconsistent
    files: zip CRCs catch flipped bytes, the ragged checks catch wrong offsets.
    """
    with np.load(path, allow_pickle=False) as z:
      missing = [k for k in ('meta',) + _ARRAYS if k not in z.files]
      if missing:
        raise ValueError(f'{path}: missing arrays {missing}')
      meta = json.loads(str(z['meta']))
      arrays = {k: z[k] for k in _ARRAYS}
    return cls(**arrays, src_key=meta['src_key'], tgt_key=meta['tgt_key'],
               origin=path), meta


def _frozen(x: np.ndarray, dtype) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 1 or x.dtype != dtype:
    raise ValueError(f'expected a 1-D {np.dtype(dtype).name} array, got {x.dtype} '
                     f'{x.shape}')
  x = x.view()
  x.flags.writeable = False
  return x


def _check_ragged(name: str, ids: np.ndarray, offsets: np.ndarray) -> None:
  if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(ids):
    raise ValueError(f'{name}_offsets must run from 0 to len({name}_ids)={len(ids)}, got '
                     f'{offsets[:1].tolist()}..{offsets[-1:].tolist()}')
  if (np.diff(offsets) < 0).any():
    raise ValueError(f'{name}_offsets must be non-decreasing')
  if len(ids) and ids.min() < 0:
    raise ValueError(f'{name}_ids has negative ids')


# ----------------------------------------------------------------------------- building


def as_text(x: Any) -> str:
  """A tfds text feature (bytes) or a str as str."""
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def read_examples(source, start: int, stop: int) -> list:
  """source[start:stop] as a list of dicts, in bulk when the source can.

  tfds data sources read records in bulk with `__getitems__` (~1.7x faster per example
  than `[i]`: one array_record read, then the same per-example decode). Sequences
  without it (lists), and sources whose `__getitems__` fails with TypeError (the one
  `tfds.testing.mock_data` patches in), are read one index at a time.
  """
  getitems = getattr(source, '__getitems__', None)
  if getitems is not None:
    try:
      return list(getitems(list(range(start, stop))))
    except TypeError:
      pass
  return [source[i] for i in range(start, stop)]


def read_chunks(source, stop: int, chunk_size: int = 65536) -> Iterator[list]:
  """source[0:stop] as consecutive lists of up to `chunk_size` examples (`read_examples`)."""
  for start in range(0, stop, chunk_size):
    yield read_examples(source, start, min(stop, start + chunk_size))


def _ragged(rows: Sequence[Sequence[int]], append: int | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
  """rows: [n] id sequences -> (flat [total] int32, lengths [n] int64), + `append`."""
  lengths = np.fromiter(map(len, rows), np.int64, len(rows))
  flat = (np.concatenate([np.asarray(r, np.int32) for r in rows]) if rows
          else np.zeros(0, np.int32)).astype(np.int32, copy=False)
  if append is None:
    return flat, lengths
  ends = np.cumsum(lengths)
  return np.insert(flat, ends, np.int32(append)), lengths + 1


def tokenize_examples(source, tokenizer, *, src_key: str, tgt_key: str,
                      chunk_size: int = 65536, origin: str | None = None
                      ) -> TokenizedSource:
  """Tokenizes every example of a text source once (no cache).

  Args:
    source: random access (len, [i] -> dict with src_key and tgt_key texts, str or
      bytes), e.g. `pipeline.translation_source(...)` or a list of dicts.
    tokenizer: anything with `encode(texts: list[str]) -> [len(texts)] id sequences`;
      `tokenizer.Tokenizer` runs SentencePiece's batched C++ encoder on all cores.
    src_key / tgt_key: the text fields of the two sides.
    chunk_size: examples read and encoded at a time (bounds the Python lists held).
    origin: the result's `origin`; default `source_identity(source)`.
  Returns:
    TokenizedSource with len(source) examples in source order.
  """
  n = len(source)
  if n == 0:
    raise ValueError(f'data source {source!r} is empty')
  first = source[0]
  missing = [k for k in (src_key, tgt_key) if k not in first]
  if missing:
    raise KeyError(f'language keys {missing} not in the examples; available keys '
                   f'{sorted(first)}')
  parts = {'src': [], 'tgt': [], 'src_len': [], 'tgt_len': []}
  for examples in read_chunks(source, n, chunk_size):
    for side, key, append in (('src', src_key, None), ('tgt', tgt_key, EOS_ID)):
      ids, lengths = _ragged(tokenizer.encode([as_text(ex[key]) for ex in examples]), append)
      parts[side].append(ids)
      parts[f'{side}_len'].append(lengths)

  def offsets(lengths):
    return np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)

  return TokenizedSource(np.concatenate(parts['src']), offsets(parts['src_len']),
                         np.concatenate(parts['tgt']), offsets(parts['tgt_len']),
                         src_key=src_key, tgt_key=tgt_key,
                         origin=origin or source_identity(source))


def source_identity(source) -> str | None:
  """'<tfds full name>:<split>' for a tfds data source, else None (caller names it)."""
  info, split = getattr(source, 'dataset_info', None), getattr(source, 'split', None)
  if info is None or split is None:
    return None
  return f'{info.full_name}:{split}'


def file_sha256(path: str) -> str:
  """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def tokenize_source(source, tokenizer, *, src_key: str, tgt_key: str,
                    cache_dir: str | None = None, source_id: str | None = None,
                    chunk_size: int = 65536) -> TokenizedSource:
  """`tokenize_examples`, cached in `cache_dir` across runs and restarts.

  Args:
    source, tokenizer, src_key, tgt_key, chunk_size: as in `tokenize_examples`.
    cache_dir: e.g. '<workdir>/tokenized'; None tokenizes in memory only. The file is
      `<cache_dir>/<split>-<src_key>-<tgt_key>-<16 hex of the key digest>.npz`, split
      being the tfds split (else source_id) with other than [A-Za-z0-9_.-] as '_'.
    source_id: the source's identity in the cache key; default `source_identity(source)`
      (tfds dataset full name, whose config name fingerprints the TSV files, and split).
      Required with cache_dir for sources that are not tfds data sources.
  Returns:
    TokenizedSource, from the cache file when it exists and matches the key (tokenizer
    file sha256, source id, len(source), keys, format), else freshly tokenized and
    written there (atomically: temporary file + os.replace).
  """
  if cache_dir is None:
    return tokenize_examples(source, tokenizer, src_key=src_key, tgt_key=tgt_key,
                             chunk_size=chunk_size)
  source_id = source_id or source_identity(source)
  if source_id is None:
    raise ValueError(f'cannot name {type(source).__name__} in a cache key; pass '
                     'source_id=... or cache_dir=None')
  model_path = getattr(tokenizer, 'model_path', None)
  if model_path is None:
    raise ValueError(f'tokenizer {tokenizer!r} has no model_path file to key the cache '
                     'with; pass cache_dir=None')
  key = {'format': CACHE_FORMAT, 'source': source_id, 'num_examples': len(source),
         'src_key': src_key, 'tgt_key': tgt_key, 'tokenizer_sha256': file_sha256(model_path)}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  split = getattr(source, 'split', None) or source_id
  name = re.sub(r'[^A-Za-z0-9_.-]+', '_', f'{split}-{src_key}-{tgt_key}')[:80]
  path = os.path.join(cache_dir, f'{name}-{digest}.npz')

  if os.path.exists(path):
    try:
      cached, meta = TokenizedSource.load(path)
      stored = {k: meta.get(k) for k in key}
      if stored != key:
        raise ValueError(f'cache key {stored} != expected {key}')
      if len(cached) != len(source):
        raise ValueError(f'{len(cached)} examples, source has {len(source)}')
      if hasattr(tokenizer, 'vocab_size'):
        cached.check_ids(tokenizer.vocab_size)
      logging.info('tokenized %s: %s (cached)', source_id, path)
      return cached
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      logging.warning('tokenized cache %s is unusable (%s: %s); rebuilding it', path,
                      type(e).__name__, e)
  t = time.perf_counter()
  tokens = tokenize_examples(source, tokenizer, src_key=src_key, tgt_key=tgt_key,
                             chunk_size=chunk_size, origin=path)
  tokens.save(path, key)
  logging.info('tokenized %s: %d examples in %.1f s -> %s', source_id, len(tokens),
               time.perf_counter() - t, path)
  return tokens
