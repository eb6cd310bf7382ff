"""SentencePiece tokenizer: train a joint source+target model, load it, encode/decode.

The special ids below are fixed for the whole library (model, losses, decoding, data):
padding is 0 so that `ids > 0` is the token mask, EOS ends every target segment and BOS
starts every decoder input segment.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BOS_ID = 3
MODEL_FILENAME = 'spm.model'


def train_tokenizer(sentences: Iterable[str], model_dir: str, *, vocab_size: int,
                    model_type: str = 'unigram', character_coverage: float = 1.0,
                    max_sentence_length: int = 4192, num_threads: int = 1,
                    model_filename: str = MODEL_FILENAME) -> str:
  """Trains a SentencePiece model and writes `<model_dir>/<model_filename>` (+ `.vocab`).

  Args:
    sentences: raw text lines; for a joint vocabulary pass source AND target sentences.
    model_dir: directory for the model (created), e.g. the run directory.
    vocab_size: total pieces including the 4 special ids.
    model_type: 'unigram' or 'bpe' (also 'char', 'word').
    num_threads: SentencePiece training threads; 1 keeps the result reproducible.
  Returns: path of the written `.model` file.
  """
  if vocab_size <= BOS_ID + 1:
    raise ValueError(f'vocab_size={vocab_size} must exceed the {BOS_ID + 1} special ids')
  os.makedirs(model_dir, exist_ok=True)
  prefix = os.path.join(model_dir, model_filename.removesuffix('.model'))
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_prefix=prefix,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=character_coverage,
      max_sentence_length=max_sentence_length,
      num_threads=num_threads,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
      pad_piece='<pad>', eos_piece='</s>', unk_piece='<unk>', bos_piece='<s>',
      minloglevel=2,
  )
  return prefix + '.model'


class Tokenizer:
  """A loaded SentencePiece model with batched numpy encode/decode."""

  def __init__(self, model_path: str):
    if os.path.isdir(model_path):
      model_path = os.path.join(model_path, MODEL_FILENAME)
    if not os.path.isfile(model_path):
      raise FileNotFoundError(
          f'SentencePiece model not found: {model_path!r} (train one with train_tokenizer)')
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    specials = {'pad': (self._sp.pad_id(), PAD_ID), 'eos': (self._sp.eos_id(), EOS_ID),
                'unk': (self._sp.unk_id(), UNK_ID), 'bos': (self._sp.bos_id(), BOS_ID)}
    wrong = {k: v for k, v in specials.items() if v[0] != v[1]}
    if wrong:
      raise ValueError(f'{model_path}: special ids (got, expected) {wrong}; '
                       'the model was not trained with train_tokenizer')

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
    """texts: [batch] strings -> list of [len_i] int32 ids (no EOS/BOS added)."""
    return [np.asarray(ids, np.int32) for ids in self._sp.encode(list(texts))]

  def encode_padded(self, texts: Sequence[str], max_len: int, *, append_eos: bool = False
                    ) -> np.ndarray:
    """texts: [batch] -> [batch, max_len] int32, truncated then PAD_ID-padded.

    With append_eos the last kept token is EOS_ID (truncation keeps room for it).
    """
    out = np.full((len(texts), max_len), PAD_ID, np.int32)
    for i, ids in enumerate(self.encode(texts)):
      if append_eos:
        ids = np.append(ids[:max_len - 1], EOS_ID)
      ids = ids[:max_len]
      out[i, :len(ids)] = ids
    return out

  def decode(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
    """ids: [batch, len] -> [batch] strings; stops at the first EOS, drops PAD/BOS."""
    texts = []
    for row in ids:
      row = [int(t) for t in row]
      if EOS_ID in row:
        row = row[:row.index(EOS_ID)]
      texts.append(self._sp.decode([t for t in row if t not in (PAD_ID, BOS_ID)]))
    return texts

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def load_tokenizer(model_path: str) -> Tokenizer:
  """Loads a model file, or `<dir>/spm.model` when given a directory."""
  return Tokenizer(model_path)


def check_vocab(tokenizer: Tokenizer, expected_vocab_size: int) -> None:
  """Raises ValueError when the tokenizer does not match the model's vocab size."""
  if tokenizer.vocab_size != expected_vocab_size:
    raise ValueError(
        f'tokenizer {tokenizer.model_path!r} has vocab_size={tokenizer.vocab_size}, '
        f'expected vocab_size={expected_vocab_size} (config/model embedding size)')
