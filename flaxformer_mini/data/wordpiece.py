"""BERT WordPiece tokenization (e.g. all-MiniLM-L6-v2's) through Hugging Face `tokenizers`.

    tok = WordPiece.from_dir(bert.minilm_dir())        # tokenizer.json (or vocab.txt)
    batch = tok.encode_batch(['a fine film', 'dull'], max_len=64)
    batch['input_ids']        # [2, 64] int32: [CLS] a fine film [SEP] [PAD] ...
    batch['attention_mask']   # [2, 64] int32, 1 on real tokens
    batch['token_type_ids']   # [2, 64] int32, 1 on the second text of a pair

Pairs (question, context) are encoded as ``[CLS] q [SEP] c [SEP]``, truncation
'only_second' (the context is cut), 'only_first' or 'longest_first', done by `tokenizers`
itself so rows equal ``BertTokenizerFast``'s (the slow Python ``BertTokenizer`` splits an
odd longest_first tie the other way). `WordPiece.hf` is the underlying
`tokenizers.Tokenizer` (offsets, overflowing windows with a stride) for extractive QA.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import numpy as np

TOKENIZER_FILE = 'tokenizer.json'
VOCAB_FILE = 'vocab.txt'
_TRUNCATION = ('longest_first', 'only_first', 'only_second')


class WordPiece:
  """A BERT WordPiece tokenizer with [CLS]/[SEP]/[PAD] ids and fixed-length batches.

  Args:
    hf: a `tokenizers.Tokenizer` whose post-processor adds [CLS]/[SEP] (as BERT's does).
    path: the file it was read from (recorded as the run's asset).
  """

  def __init__(self, hf, path: str = ''):
    self.hf, self.path = hf, path
    ids = {}
    for name in ('[CLS]', '[SEP]', '[PAD]', '[UNK]', '[MASK]'):
      i = hf.token_to_id(name)
      if i is None and name in ('[CLS]', '[SEP]', '[PAD]'):
        raise ValueError(f'{path or "tokenizer"}: no {name} token in the vocabulary; a BERT '
                         'WordPiece vocabulary is needed')
      ids[name] = i
    self.cls_id, self.sep_id, self.pad_id = ids['[CLS]'], ids['[SEP]'], ids['[PAD]']
    self.unk_id, self.mask_id = ids['[UNK]'], ids['[MASK]']
    # Our fixed-length padding and truncation, never the file's (MiniLM's pads to 128).
    self.hf.no_padding()
    self.hf.no_truncation()

  @classmethod
  def from_file(cls, path: str, lowercase: bool = True) -> WordPiece:
    """From a `tokenizer.json` or a BERT `vocab.txt` (uncased unless lowercase=False)."""
    import tokenizers
    if not os.path.isfile(path):
      raise FileNotFoundError(f'WordPiece tokenizer file not found: {path}')
    if path.endswith('.json'):
      try:
        hf = tokenizers.Tokenizer.from_file(path)
      except Exception as e:  # tokenizers raises a plain Exception for a bad file
        raise ValueError(f'{path}: not a Hugging Face tokenizer.json ({e})') from None
    else:
      with open(path, encoding='utf-8') as f:
        vocab = {line.rstrip('\r\n') for line in f}
      missing = [t for t in ('[CLS]', '[SEP]', '[PAD]', '[UNK]') if t not in vocab]
      if missing:  # tokenizers would raise a TypeError naming no file
        raise ValueError(f'{path}: no {missing[0]} token in the vocabulary; a BERT '
                         'WordPiece vocabulary is needed')
      hf = tokenizers.BertWordPieceTokenizer.from_file(path, lowercase=lowercase)._tokenizer
    return cls(hf, path)

  @classmethod
  def from_dir(cls, directory: str) -> WordPiece:
    """From a model directory's `tokenizer.json`, else its `vocab.txt`."""
    for name in (TOKENIZER_FILE, VOCAB_FILE):
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        return cls.from_file(path)
    raise FileNotFoundError(f'{directory}: neither {TOKENIZER_FILE} nor {VOCAB_FILE}')

  @property
  def vocab_size(self) -> int:
    return self.hf.get_vocab_size()

  def tokenize(self, text: str) -> list[str]:
    """WordPiece tokens of one text, without [CLS]/[SEP]."""
    return self.hf.encode(text, add_special_tokens=False).tokens

  def encode_batch(self, texts: Sequence[str], max_len: int,
                   pairs: Sequence[str] | None = None,
                   truncation: str = 'longest_first') -> dict[str, np.ndarray]:
    """Encodes texts (or (text, pair) pairs) to fixed-length rows.

    Args:
      texts: b strings (the first text of each pair).
      max_len: row length, incl. [CLS] and [SEP]s; longer inputs are truncated.
      pairs: optional b second texts (e.g. contexts after questions).
      truncation: 'longest_first' | 'only_first' | 'only_second' (pairs).
    Returns:
      input_ids, attention_mask, token_type_ids: [b, max_len] int32; lengths: [b] int32
      (real tokens incl. specials); truncated: [b] bool.
    """
    if truncation not in _TRUNCATION:
      raise ValueError(f'truncation={truncation!r} is not one of {_TRUNCATION}')
    specials = 3 if pairs is not None else 2
    if max_len < specials + 1:
      raise ValueError(f'max_len={max_len} leaves no room for a token next to the '
                       f'{specials} special tokens')
    texts = list(texts)
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise TypeError(f'text {i} is a {type(t).__name__}, not a str')
    if pairs is not None:
      pairs = list(pairs)
      if len(pairs) != len(texts):
        raise ValueError(f'{len(texts)} texts but {len(pairs)} pairs')
      for i, t in enumerate(pairs):
        if not isinstance(t, str):
          raise TypeError(f'pair {i} is a {type(t).__name__}, not a str')
      inputs = list(zip(texts, pairs))
    else:
      inputs = texts
    full = self._encode_truncated(inputs, max_len, truncation)
    b = len(texts)
    out = {k: np.zeros((b, max_len), np.int32)
           for k in ('input_ids', 'attention_mask', 'token_type_ids')}
    out['input_ids'][:] = self.pad_id
    lengths = np.zeros(b, np.int32)
    truncated = np.zeros(b, bool)
    for i, enc in enumerate(full):
      n = len(enc.ids)
      out['input_ids'][i, :n] = enc.ids
      out['token_type_ids'][i, :n] = enc.type_ids
      out['attention_mask'][i, :n] = 1
      lengths[i] = n
      truncated[i] = bool(enc.overflowing)
    out['lengths'], out['truncated'] = lengths, truncated
    return out

  def _encode_truncated(self, inputs: list, max_len: int, strategy: str) -> list:
    """`tokenizers`' own truncation (HF's exact longest_first split); the file's settings
    are put back afterwards."""
    saved = self.hf.truncation
    self.hf.enable_truncation(max_len, strategy=strategy)
    try:
      return self.hf.encode_batch(inputs)
    except Exception as e:  # tokenizers raises a plain Exception
      error = e
    finally:
      if saved is None:
        self.hf.no_truncation()
      else:
        self.hf.enable_truncation(**saved)
    # Only a pair can fail: the text that must stay whole is longer than max_len allows.
    kept = 0 if strategy == 'only_second' else 1
    for i, pair in enumerate(inputs):
      n = len(self.tokenize(pair[kept])) if isinstance(pair, tuple) else 0
      if n > max_len - 3:
        raise ValueError(f'pair {i}: the {("first", "second")[kept]} text alone has {n} '
                         f'tokens, more than max_len={max_len} - 3 allows with {strategy} '
                         'truncation')
    raise ValueError(f'tokenizers could not truncate to max_len={max_len}: {error}')

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text, specials and padding dropped."""
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


def run_tokenizer(workdir: str, source: str, *, trained: bool) -> WordPiece:
  """The run's tokenizer ``<workdir>/tokenizer.json``, written from ``source`` (a
  tokenizer.json or a vocab.txt) unless the workdir already holds the same one.

  Args:
    workdir: the run directory.
    source: ``config.data.tokenizer`` resolved to a file.
    trained: the workdir holds checkpoints: a tokenizer there that differs from ``source``
      is then refused (the checkpoints were trained on its ids), else it is replaced.
  """
  wanted = WordPiece.from_file(source)
  path = os.path.join(workdir, TOKENIZER_FILE)
  if os.path.isfile(path) and WordPiece.from_file(path).hf.to_str() != wanted.hf.to_str():
    if trained:
      raise ValueError(f'{path} is not config.data.tokenizer={source!r} (the run in {workdir} '
                       'was trained with the former); use a fresh --workdir for another '
                       'tokenizer')
    os.remove(path)
  if not os.path.isfile(path):
    if source.endswith('.json'):
      shutil.copyfile(source, path)
    else:  # a vocab.txt: save the tokenizer it makes
      wanted.hf.save(path)
  return WordPiece.from_file(path)
