"""Runs a translator exported by `flaxformer_mini.export`, with only jax, numpy and sentencepiece.

This file is copied into every export directory as ``run_export.py`` and imports nothing
from flaxformer_mini, so an exported model runs where the training code is not installed::

    python model.export/run_export.py "Bom dia." "Obrigado."         # beam search
    python model.export/run_export.py --greedy < dev.pt > dev.hyp

From Python::

    runner = ExportedTranslator('model.export')
    runner.translate(['Bom dia.'], method='beam')

The export holds one serialized `jax.export.Exported` per search (``greedy.jaxexport``,
``beam.jaxexport``) with a symbolic batch and source length, the weights (``params.npz``,
keys are '/'-joined parameter paths), the SentencePiece model and ``export.json``.
Sentences are batched exactly as `flaxformer_mini.translate.Translator` batches them
(length-sorted, power-of-two buckets), so both give the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np
import sentencepiece as spm

FORMAT = 'flaxformer_mini.export/1'
METHODS = ('greedy', 'beam')
MIN_LENGTH_BUCKET = 4


def _next_pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  """{'a/b/c': array} -> {'a': {'b': {'c': array}}}."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


class ExportedTranslator:
  """An export directory loaded for translation.

  Args:
    export_dir: what ``python -m flaxformer_mini.export --out=...`` wrote.
    batch_size: sentences per batch (default: the batch size the export was made with).
  """

  def __init__(self, export_dir: str, batch_size: int | None = None):
    meta_path = os.path.join(export_dir, 'export.json')
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f'{export_dir!r} is not an export directory: no export.json')
    with open(meta_path, encoding='utf-8') as f:
      self.meta = json.load(f)
    if self.meta.get('format') != FORMAT:
      raise ValueError(f'{meta_path}: format {self.meta.get("format")!r}, expected {FORMAT!r}')
    with np.load(os.path.join(export_dir, 'params.npz')) as flat:
      self.params = jax.device_put(_unflatten({k: flat[k] for k in flat.files}))
    self.searches = {}
    for method in self.meta['methods']:
      with open(os.path.join(export_dir, f'{method}.jaxexport'), 'rb') as f:
        self.searches[method] = jax.export.deserialize(bytearray(f.read()))
    self.sp = spm.SentencePieceProcessor(
        model_file=os.path.join(export_dir, self.meta['tokenizer']))
    self.batch_size = int(batch_size or self.meta['batch_size'])
    self.max_len = int(self.meta['max_len'])

  def search_ids(self, inputs: np.ndarray, method: str = 'beam') -> np.ndarray:
    """inputs: [batch, src_len <= max_len] int32 ids, PAD-padded -> [batch, max_decode_len]."""
    if method not in self.searches:
      raise ValueError(f'method={method!r}: this export holds {sorted(self.searches)}')
    inputs = np.asarray(inputs, np.int32)
    if inputs.ndim != 2 or not 1 <= inputs.shape[1] <= self.max_len:
      raise ValueError(f'expected inputs [batch, 1..{self.max_len}], got {inputs.shape}')
    vocab = int(self.meta['vocab_size'])
    if inputs.size and (inputs.min() < 0 or inputs.max() >= vocab):
      raise ValueError(f'token ids must be in [0, {vocab}), got {inputs.min()}..{inputs.max()}')
    return np.asarray(self.searches[method].call(self.params, inputs))

  def _decode(self, row) -> str:
    ids = [int(t) for t in row]
    if self.meta['eos_id'] in ids:
      ids = ids[:ids.index(self.meta['eos_id'])]
    return self.sp.decode([t for t in ids if t not in (self.meta['pad_id'], self.meta['bos_id'])])

  def translate(self, sentences: Sequence[str], method: str = 'beam') -> list[str]:
    """Translations (same length and order; empty in, empty out; long sources truncated)."""
    if isinstance(sentences, str):
      raise TypeError('translate takes a list of sentences, got a single str')
    out = [''] * len(sentences)
    todo = [i for i, s in enumerate(sentences) if s.strip()]
    encoded = {i: np.asarray(ids[:self.max_len], np.int32)
               for i, ids in zip(todo, self.sp.encode([sentences[i] for i in todo]))}
    todo.sort(key=lambda i: len(encoded[i]))
    pad = self.meta['pad_id']
    for start in range(0, len(todo), self.batch_size):
      idx = todo[start:start + self.batch_size]
      rows = min(self.batch_size, _next_pow2(len(idx)))
      length = min(self.max_len, max(MIN_LENGTH_BUCKET, _next_pow2(len(encoded[idx[-1]]))))
      inputs = np.full((rows, length), pad, np.int32)
      for row, i in enumerate(idx):
        inputs[row, :len(encoded[i])] = encoded[i]
      inputs[len(idx):] = inputs[len(idx) - 1]
      for i, seq in zip(idx, self.search_ids(inputs, method)):
        out[i] = self._decode(seq)
    return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description='Translate with an exported flaxformer_mini model.')
  parser.add_argument('sentences', nargs='*', help='sentences (default: lines of stdin)')
  parser.add_argument('--export_dir', default=os.path.dirname(os.path.abspath(__file__)))
  parser.add_argument('--greedy', action='store_true', help='greedy instead of beam search')
  args = parser.parse_args(argv)
  runner = ExportedTranslator(args.export_dir)
  lines = args.sentences or sys.stdin.read().splitlines()
  for text in runner.translate(lines, 'greedy' if args.greedy else 'beam'):
    print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
