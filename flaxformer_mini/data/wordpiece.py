"""BERT WordPiece tokenization (e.g. all-MiniLM-L6-v2's) through Hugging Face `tokenizers`.

    tok = WordPiece.from_dir(bert.minilm_dir())        # tokenizer.json (or vocab.txt)
    batch = tok.encode_batch(['a fine film', 'dull'], max_len=64)
    batch['input_ids']        # [2, 64] int32: [CLS] a fine film [SEP] [PAD] ...
    batch['attention_mask']   # [2, 64] int32, 1 on real tokens
    batch['token_type_ids']   # [2, 64] int32, 1 on the second text of a pair

Pairs (question, context) are encoded as ``[CLS] q [SEP] c [SEP]``, truncation
'only_second' (the context is cut) or 'longest_first'. `WordPiece.hf` is the underlying
`tokenizers.Tokenizer` (offsets, overflowing windows with a stride) for extractive QA.
"""

from __future__ import annotations

import os
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
  def from_file(cls, path: str, lowercase: bool = True) -> 'WordPiece':
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
      hf = tokenizers.BertWordPieceTokenizer(path, lowercase=lowercase)._tokenizer
    return cls(hf, path)

  @classmethod
  def from_dir(cls, directory: str) -> 'WordPiece':
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
      full = self.hf.encode_batch(list(zip(texts, pairs)))
    else:
      full = self.hf.encode_batch(texts)
    b = len(texts)
    out = {k: np.zeros((b, max_len), np.int32)
           for k in ('input_ids', 'attention_mask', 'token_type_ids')}
    out['input_ids'][:] = self.pad_id
    lengths = np.zeros(b, np.int32)
    truncated = np.zeros(b, bool)
    for i, enc in enumerate(full):
      ids, types = enc.ids, enc.type_ids
      if len(ids) > max_len:
        truncated[i] = True
        if pairs is not None:
          ids, types = self._truncate_pair(enc, max_len, truncation)
        else:
          ids = ids[:max_len - 1] + [self.sep_id]
          types = types[:max_len]
      n = len(ids)
      out['input_ids'][i, :n] = ids
      out['token_type_ids'][i, :n] = types
      out['attention_mask'][i, :n] = 1
      lengths[i] = n
    out['lengths'], out['truncated'] = lengths, truncated
    return out

  def _truncate_pair(self, enc, max_len: int, strategy: str) -> tuple[list[int], list[int]]:
    """[CLS] a [SEP] b [SEP] cut to max_len tokens by ``strategy`` (as HF truncation)."""
    parts = zip(enc.ids, enc.type_ids, enc.special_tokens_mask)
    first, second = [], []
    for token, segment, special in parts:
      if not special:
        (second if segment else first).append(token)
    budget = max_len - 3
    if strategy == 'only_second':
      second = second[:max(budget - len(first), 0)]
      if len(first) > budget:
        raise ValueError(f'the first text alone has {len(first)} tokens, more than '
                         f'max_len={max_len} - 3 allows with only_second truncation')
    elif strategy == 'only_first':
      first = first[:max(budget - len(second), 0)]
      if len(second) > budget:
        raise ValueError(f'the second text alone has {len(second)} tokens, more than '
                         f'max_len={max_len} - 3 allows with only_first truncation')
    else:
      while len(first) + len(second) > budget:
        if len(first) > len(second):
          first.pop()
        else:
          second.pop()
    ids = [self.cls_id] + first + [self.sep_id] + second + [self.sep_id]
    types = [0] * (len(first) + 2) + [1] * (len(second) + 1)
    return ids, types

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text, specials and padding dropped."""
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)
