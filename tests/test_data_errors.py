"""Bad data files and out-of-range token ids fail with errors that name the file (and the
line, the source, the id): flaxformer_mini.data.textfile, read_tsv, the TSV builder,
lm_task.read_documents, TokenizedSource.check_ids and make_dataset."""

import gzip
import re

import numpy as np
import pytest

from flaxformer_mini import data
from flaxformer_mini.data import EOS_ID
from flaxformer_mini.tasks import lm as lm_task

GOOD_ROWS = b'Open the file.\tAbra o arquivo.\tloui\nClose it.\tFeche-o.\tloui\n'
# 300 rows: the deflate stream is long enough that cutting it in half loses whole lines.
MANY_ROWS = ''.join(f'row {i}\tlinha {i}\tpairs\n' for i in range(300)).encode()
LATIN1_ROW = 'Coffee.\tCaf\xe9.\tloui\n'.encode('latin-1')  # 0xe9 alone is not UTF-8

# name: (file name, bytes, the whole message after the path)
BAD_FILES = {
    'not gzip': ('x.tsv.gz', GOOD_ROWS,
                 ": not a gzip file (starts with b'Op'); rename it to x.tsv or recompress it"),
    'gzip named .tsv': ('x.tsv', gzip.compress(GOOD_ROWS),
                        ': gzip data in a file not named .gz; rename it to x.tsv.gz'),
    'truncated gzip': ('x.tsv.gz', gzip.compress(MANY_ROWS, mtime=0)[:600],
                       ': truncated gzip stream after line '),
    'invalid UTF-8': ('x.tsv.gz', gzip.compress(GOOD_ROWS + LATIN1_ROW),
                      ' line 3: invalid UTF-8 (byte 0xe9 at column 12)'),
    'invalid UTF-8, plain': ('x.tsv', GOOD_ROWS + LATIN1_ROW,
                             ' line 3: invalid UTF-8 (byte 0xe9 at column 12)'),
    'empty file': ('x.tsv.gz', b'', ': empty file (no rows)'),
    'empty gzip': ('x.tsv.gz', gzip.compress(b'\n\n'), ': empty file (no rows)'),
    'two columns': ('x.tsv.gz', gzip.compress(GOOD_ROWS + b'only\ttwo\n'),
                    " line 3: expected 3 tab-separated columns (english, pt, source-tag), "
                    "got 2: 'only\\ttwo'"),
    'empty text': ('x.tsv.gz', gzip.compress(GOOD_ROWS + b'\n \tVazio.\tloui\n'),
                   " line 4: empty en text: ' \\tVazio.\\tloui'"),
}


def _write(tmp_path, name, blob):
  path = tmp_path / name
  path.write_bytes(blob)
  return str(path)


@pytest.mark.parametrize('case', list(BAD_FILES))
def test_read_tsv_errors_name_the_file_and_line(tmp_path, case):
  name, blob, message = BAD_FILES[case]
  path = _write(tmp_path, name, blob)
  with pytest.raises(ValueError, match='^' + re.escape(path + message)):
    list(data.read_tsv(path, 'pt'))


def test_truncated_gzip_names_the_last_good_line(tmp_path):
  path = _write(tmp_path, 'x.tsv.gz', gzip.compress(MANY_ROWS, mtime=0)[:600])
  read = []
  with pytest.raises(ValueError, match=r'truncated gzip stream after line (\d+)$') as e:
    read.extend(data.read_tsv(path, 'pt'))
  last = int(re.search(r'line (\d+)$', str(e.value)).group(1))
  assert 0 < last == len(read) < 300
  assert read[-1]['en'] == f'row {last - 1}'


def test_read_lines_strips_newlines_and_counts_from_one(tmp_path):
  path = _write(tmp_path, 'x.txt', b'a\r\nb\n\nc')
  assert list(data.textfile.read_lines(path)) == [(1, 'a'), (2, 'b'), (3, ''), (4, 'c')]


def test_tsv_builder_error_reaches_the_caller_intact(tmp_path):
  """What tasks.TranslationTask calls: the generator runs inside TFDS's split builder."""
  _, blob, message = BAD_FILES['invalid UTF-8']
  paths = {'train': _write(tmp_path, 'bad.train.tsv.gz', blob),
           'validation': _write(tmp_path, 'ok.dev.tsv.gz', gzip.compress(GOOD_ROWS))}
  with pytest.raises(ValueError, match='invalid UTF-8') as e:
    data.prepare_tsv_builder(paths, other_lang='pt', data_dir=str(tmp_path / 'tfds'))
  assert str(e.value) == paths['train'] + message


def test_lm_corpus_errors_name_the_file(tmp_path):
  docs = b'First document.\nStill first.\n\nSecond document.\n'
  path = _write(tmp_path, 'c.txt.gz', gzip.compress(docs))
  assert lm_task.read_documents(path) == ['First document.\nStill first.',
                                          'Second document.']
  cases = {
      'c.txt.gz': (docs, ": not a gzip file (starts with b'Fi'); rename it to c.txt"),
      'u.txt.gz': (gzip.compress(docs + b'caf\xe9\n'), ' line 5: invalid UTF-8 (byte 0xe9'),
      't.txt.gz': (gzip.compress(MANY_ROWS)[:600], ': truncated gzip stream after line'),
      'e.txt': (b'\n \n', ': empty file (no documents)'),
  }
  for name, (blob, message) in cases.items():
    path = _write(tmp_path, name, blob)
    with pytest.raises(ValueError, match='^' + re.escape(path + message)):
      lm_task.read_documents(path)


# ------------------------------------------------------------------------ token ids


class WordTokenizer:
  """Stub: '5 6' -> [5 % vocab_size, 6 % vocab_size]; `model_path` keys the cache."""

  def __init__(self, model_path, vocab_size):
    self.model_path, self.vocab_size = model_path, vocab_size

  def encode(self, texts):
    return [np.array([int(w) % self.vocab_size for w in t.split()], np.int32)
            for t in texts]


PAIRS = [{'src': '5 6', 'tgt': '7'}, {'src': '8', 'tgt': '900 9'}]


def test_check_ids_names_source_side_example_and_id():
  tokens = data.TokenizedSource(
      np.array([5, 6, 8], np.int32), np.array([0, 2, 3]), np.array([7, EOS_ID, 900, 9, EOS_ID],
                                                                    np.int32),
      np.array([0, 2, 5]), src_key='src', tgt_key='tgt', origin='/run/tokenized/x.npz')
  assert tokens.max_id == 900
  tokens.check_ids(901)
  with pytest.raises(ValueError, match=re.escape(
      '/run/tokenized/x.npz: target token id 900 (example 1) is not in '
      '[0, vocab_size=128)')):
    tokens.check_ids(128)


def test_make_dataset_refuses_ids_outside_the_vocab_before_any_batch():
  cfg = data.PipelineConfig(batch_size=2, max_source_len=4, max_target_len=4)
  tokens = data.tokenize_examples(PAIRS, WordTokenizer('', 1000), src_key='src',
                                  tgt_key='tgt', origin='train split')
  small = WordTokenizer('', 128)
  for kwargs in ({'vocab_size': 128}, {}):  # explicit, or the tokenizer's vocab_size
    with pytest.raises(ValueError, match=r'^train split: target token id 900 \(example 1\)'
                       r'.*vocab_size=128\)'):
      data.make_dataset(tokens, small, cfg, src_key='src', tgt_key='tgt', train=True,
                        **kwargs)
  batch = next(iter(data.make_dataset(tokens, None, cfg, src_key='src', tgt_key='tgt',
                                      train=False, vocab_size=1000)))
  assert batch['targets'].max() == 900


def test_stale_cache_with_a_larger_vocab_is_rebuilt(tmp_path, caplog):
  """Same tokenizer file (so the same cache key) but a smaller vocab than the ids."""
  model = _write(tmp_path, 'spm.model', b'stub model')
  cache = str(tmp_path / 'tokenized')
  big = data.tokenize_source(PAIRS, WordTokenizer(model, 1000), src_key='src',
                             tgt_key='tgt', cache_dir=cache, source_id='train')
  assert big.max_id == 900 and big.origin.startswith(cache)
  with caplog.at_level('WARNING'):
    small = data.tokenize_source(PAIRS, WordTokenizer(model, 128), src_key='src',
                                 tgt_key='tgt', cache_dir=cache, source_id='train')
  assert small.max_id < 128
  assert any(big.origin in r.getMessage() and 'token id 900' in r.getMessage()
             and 'rebuilding' in r.getMessage() for r in caplog.records), caplog.text
