"""Tests of flaxformer_mini.data: TSV builder, tokenizer, packing pipeline, resume."""

import collections
import gzip
import itertools
import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from flaxformer_mini import data
from flaxformer_mini.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

# Quotes, a non-ASCII letter and a stray comma: the TSV must be split on tabs only.
TSV_ROWS = [
    ('Open the "File" menu.', 'Abra o menu "Arquivo".', 'loui'),
    ("Don't save, quit.", 'Não salve, saia.', 'loui'),
    ('Delete the selected rows.', 'Excluir as linhas selecionadas.', 'lohelp'),
    ('Press Enter to continue.', 'Pressione Enter para continuar.', 'syslocale'),
    ('The file was saved.', 'O arquivo foi salvo.', 'pairs'),
]
DEV_ROWS = [('Close the window.', 'Feche a janela.', 'gnomehelp')]


def _write_tsv(path, rows):
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    for row in rows:
      f.write('\t'.join(row) + '\n')
  return str(path)


@pytest.fixture(scope='module')
def tsv_paths(tmp_path_factory):
  d = tmp_path_factory.mktemp('tsv')
  return {'train': _write_tsv(d / 'tiny.train.tsv.gz', TSV_ROWS),
          'validation': _write_tsv(d / 'tiny.dev.tsv.gz', DEV_ROWS)}


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  # Real text: the first 300 pairs of the embedded dev sample plus the tiny TSV rows.
  pairs = list(data.read_tsv(data.embedded_paths()['validation'], 'pt'))[:300]
  sentences = [p['en'] for p in pairs] + [p['pt'] for p in pairs]
  sentences += [r[0] for r in TSV_ROWS] + [r[1] for r in TSV_ROWS]
  model_dir = tmp_path_factory.mktemp('spm')
  data.train_tokenizer(sentences, str(model_dir), vocab_size=128)
  return data.load_tokenizer(str(model_dir))


class IntTokenizer:
  """Stub tokenizer: '5 6' -> [5, 6], so packed batches can be written by hand."""

  def encode(self, texts):
    return [np.array([int(w) for w in t.split()], np.int32) for t in texts]


def _int_source(n, seed=0):
  """n examples with unique ids: source [k+10]*len, target [k+10]*len, random lengths."""
  rng = np.random.default_rng(seed)
  out = []
  for k in range(n):
    tok = str(k + 10)
    out.append({'src': ' '.join([tok] * rng.integers(1, 6)),
                'tgt': ' '.join([tok] * rng.integers(1, 5))})
  return out


def _segments(batch):
  """All packed segments of a batch as (source ids, target ids) tuples."""
  out = []
  for r in range(batch['inputs'].shape[0]):
    for s in range(1, batch['inputs_segmentation'][r].max() + 1):
      src = batch['inputs'][r][batch['inputs_segmentation'][r] == s]
      tgt = batch['targets'][r][batch['targets_segmentation'][r] == s]
      out.append((tuple(src.tolist()), tuple(tgt.tolist())))
  return out


# ------------------------------------------------------------------------ builder


def test_tsv_builder_round_trip(tsv_paths, tmp_path):
  builder = data.prepare_tsv_builder(tsv_paths, other_lang='pt', data_dir=str(tmp_path))
  train = builder.as_data_source('train')
  assert len(train) == len(TSV_ROWS)
  got = sorted((ex['en'].decode(), ex['pt'].decode(), ex['source'].decode())
               for ex in (train[i] for i in range(len(train))))
  assert got == sorted(TSV_ROWS)
  assert len(builder.as_data_source('validation')) == 1
  # The same prepared data read back by name through the pipeline's source function.
  name = builder.info.full_name.rsplit('/', 1)[0]
  by_name = data.translation_source(name, 'validation', data_dir=str(tmp_path))
  assert by_name[0]['pt'].decode() == DEV_ROWS[0][1]
  assert 'tensorflow' not in sys.modules


def test_tsv_errors_name_the_problem(tmp_path):
  bad = _write_tsv(tmp_path / 'bad.tsv.gz', [('only', 'two')])
  with pytest.raises(ValueError, match=r'bad.tsv.gz line 1: expected 3'):
    list(data.read_tsv(bad, 'pt'))
  with pytest.raises(FileNotFoundError, match=r'nope\.tsv\.gz'):
    data.tsv_builder({'train': str(tmp_path / 'nope.tsv.gz'), 'validation': bad},
                     other_lang='pt', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'en-pt\.train\.tsv\.gz'):
    data.shared_paths(str(tmp_path))


def test_embedded_assets_are_real_and_small():
  paths = data.embedded_paths()
  rows = list(data.read_tsv(paths['train'], 'pt'))
  assert len(rows) == 30_000
  assert {r['source'] for r in rows} <= {'lohelp', 'loui', 'pairs', 'syslocale', 'debref',
                                         'gnomehelp', 'handbook'}


# ---------------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_and_round_trip(tokenizer, tmp_path):
  assert tokenizer.vocab_size == 128
  assert [tokenizer.id_to_piece(i) for i in (PAD_ID, EOS_ID, UNK_ID, BOS_ID)] == [
      '<pad>', '</s>', '<unk>', '<s>']
  texts = [r[0] for r in TSV_ROWS[2:]] + [r[1] for r in TSV_ROWS[2:]]
  ids = tokenizer.encode(texts)
  assert all(i.dtype == np.int32 and i.min() > BOS_ID for i in ids)
  assert tokenizer.decode([list(i) for i in ids]) == texts
  padded = tokenizer.encode_padded(texts, 200, append_eos=True)
  assert padded.shape == (len(texts), 200)
  assert tokenizer.decode(padded) == texts  # stops at EOS, ignores PAD
  short = tokenizer.encode_padded(texts[:1], 4, append_eos=True)
  assert short[0, -1] == EOS_ID


def test_tokenizer_errors(tokenizer, tmp_path):
  with pytest.raises(FileNotFoundError, match=r'spm\.model'):
    data.load_tokenizer(str(tmp_path))
  data.check_vocab(tokenizer, 128)
  with pytest.raises(ValueError, match='vocab_size=128, expected vocab_size=32000'):
    data.check_vocab(tokenizer, 32000)


# ---------------------------------------------------------------- tokenize once


class CountingTokenizer:
  """Delegates to a Tokenizer and counts encode calls (the cache must skip them)."""

  def __init__(self, tokenizer):
    self._tokenizer, self.model_path, self.calls = tokenizer, tokenizer.model_path, 0

  def encode(self, texts):
    self.calls += 1
    return self._tokenizer.encode(texts)


def _per_example(source, tokenizer, src_key, tgt_key):
  """What the pipeline used to compute per example: (source ids, target ids + EOS)."""
  out = []
  for i in range(len(source)):
    ex = source[i]
    src, tgt = tokenizer.encode([data.as_text(ex[src_key]), data.as_text(ex[tgt_key])])
    out.append((src, np.append(tgt, np.int32(EOS_ID))))
  return out


def test_tokenized_source_equals_per_example_tokenization(tsv_paths, tokenizer, tmp_path):
  # Real text (embedded dev sample) plus an empty side, read in chunks of 7.
  pairs = list(data.read_tsv(data.embedded_paths()['validation'], 'pt'))[:40]
  pairs.append({'pt': '', 'en': 'Empty source.', 'source': 'x'})
  ts = data.tokenize_examples(pairs, tokenizer, src_key='pt', tgt_key='en', chunk_size=7)
  assert len(ts) == len(pairs) and (ts.src_key, ts.tgt_key) == ('pt', 'en')
  for i, (src, tgt) in enumerate(_per_example(pairs, tokenizer, 'pt', 'en')):
    assert ts[i]['inputs'].dtype == np.int32 and ts[i]['targets'].dtype == np.int32
    np.testing.assert_array_equal(ts[i]['inputs'], src)
    np.testing.assert_array_equal(ts[i]['targets'], tgt)
  assert len(ts[-1]['inputs']) == 0 and ts[-1]['targets'][-1] == EOS_ID
  src_len, tgt_len = ts.lengths()
  assert src_len[-1] == 0 and (tgt_len >= 2).all()
  with pytest.raises(ValueError, match='read-only'):
    ts[0]['inputs'][0] = 5
  # A tfds array_record source (read in bulk with __getitems__) gives the same ids.
  builder = data.prepare_tsv_builder(tsv_paths, other_lang='pt', data_dir=str(tmp_path))
  source = data.translation_source(builder, 'train')
  ts = data.tokenize_examples(source, tokenizer, src_key='en', tgt_key='pt', chunk_size=2)
  for i, (src, tgt) in enumerate(_per_example(source, tokenizer, 'en', 'pt')):
    np.testing.assert_array_equal(ts[i]['inputs'], src)
    np.testing.assert_array_equal(ts[i]['targets'], tgt)
  with pytest.raises(ValueError, match='make_dataset got'):
    data.make_dataset(ts, None, data.PipelineConfig(batch_size=2, max_source_len=8,
                                                    max_target_len=8),
                      src_key='pt', tgt_key='en', train=True)


def test_tokenized_source_validates_arrays():
  ok = dict(src_ids=np.array([5, 6], np.int32), src_offsets=np.array([0, 2], np.int64),
            tgt_ids=np.array([7, EOS_ID], np.int32), tgt_offsets=np.array([0, 2], np.int64))
  data.TokenizedSource(**ok, src_key='a', tgt_key='b')
  with pytest.raises(ValueError, match=r'src_offsets must run from 0 to len\(src_ids\)=2'):
    data.TokenizedSource(**{**ok, 'src_offsets': np.array([0, 3])}, src_key='a',
                         tgt_key='b')
  with pytest.raises(ValueError, match='every target must end with EOS_ID'):
    data.TokenizedSource(**{**ok, 'tgt_ids': np.array([7, 8], np.int32)}, src_key='a',
                         tgt_key='b')
  with pytest.raises(ValueError, match='expected a 1-D int32 array, got int64'):
    data.TokenizedSource(**{**ok, 'src_ids': np.array([5, 6])}, src_key='a', tgt_key='b')


def test_tokenize_source_cache_reused_then_rebuilt_when_bad(tsv_paths, tokenizer, tmp_path,
                                                            caplog):
  builder = data.prepare_tsv_builder(tsv_paths, other_lang='pt', data_dir=str(tmp_path))
  source = data.translation_source(builder, 'train')
  cache = tmp_path / 'tokenized'
  counting = CountingTokenizer(tokenizer)

  def build():
    counting.calls = 0
    return data.tokenize_source(source, counting, src_key='pt', tgt_key='en',
                                cache_dir=str(cache))

  def same(a, b):
    for k in ('src_ids', 'src_offsets', 'tgt_ids', 'tgt_offsets'):
      np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)

  fresh = build()
  assert counting.calls == 2  # one batched call per side
  (path,) = cache.iterdir()
  assert path.name.startswith('train-pt-en-') and path.suffix == '.npz'
  same(build(), fresh)
  assert counting.calls == 0  # read from the cache, the encoder never ran
  # A different split or key order is a different file.
  data.tokenize_source(source, counting, src_key='en', tgt_key='pt', cache_dir=str(cache))
  assert len(list(cache.iterdir())) == 2

  good = path.read_bytes()
  mid = len(good) // 2
  wrong_key = data.tokenize_examples(source, tokenizer, src_key='pt', tgt_key='en')
  bad_files = {
      'truncated': lambda: path.write_bytes(good[:mid]),
      'flipped byte': lambda: path.write_bytes(
          good[:mid] + bytes([good[mid] ^ 1]) + good[mid + 1:]),
      'other tokenizer': lambda: wrong_key.save(str(path), {'tokenizer_sha256': '0' * 64}),
  }
  for what, corrupt in bad_files.items():
    corrupt()
    caplog.clear()
    with caplog.at_level('WARNING'):
      rebuilt = build()
    assert counting.calls == 2, what
    assert any(str(path) in r.getMessage() and 'rebuilding' in r.getMessage()
               for r in caplog.records), (what, caplog.text)
    same(rebuilt, fresh)
    same(build(), fresh)  # the rewritten file is good again
    assert counting.calls == 0, what
  assert sorted(p.suffix for p in cache.iterdir()) == ['.npz', '.npz']  # no temp files left
  with pytest.raises(ValueError, match='pass source_id'):
    data.tokenize_source([{'pt': 'a', 'en': 'b'}], tokenizer, src_key='pt', tgt_key='en',
                         cache_dir=str(cache))


def test_make_dataset_same_batches_from_text_or_tokenized_source(tokenizer):
  pairs = list(data.read_tsv(data.embedded_paths()['validation'], 'pt'))[:60]
  cfg = data.PipelineConfig(batch_size=4, max_source_len=24, max_target_len=24, seed=1)
  tokens = data.tokenize_examples(pairs, tokenizer, src_key='pt', tgt_key='en')
  for train in (True, False):
    a = iter(data.make_dataset(pairs, tokenizer, cfg, src_key='pt', tgt_key='en',
                               train=train))
    b = iter(data.make_dataset(tokens, None, cfg, src_key='pt', tgt_key='en', train=train))
    for want, got in zip(itertools.islice(a, 8), itertools.islice(b, 8), strict=True):
      for key in data.BATCH_KEYS:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_translation_task_tokenizes_once_into_the_run_dir(tmp_path, monkeypatch):
  """tasks.TranslationTask: both splits cached under <workdir>/tokenized/; a restarted
  task (same workdir) reads them without encoding and yields the same batches."""
  from configs import smoke
  from flaxformer_mini import tasks
  c = smoke.get_config()
  c.data.train_split, c.data.spm_max_sentences = 'train[:300]', 300
  c.data.tfds_dir = str(tmp_path / 'tfds')
  workdir = str(tmp_path / 'run')
  first = tasks.get_task(c, workdir)
  want = next(first.train_iterator())
  want_eval = list(first.eval_batches())
  names = sorted(p.name for p in (tmp_path / 'run' / 'tokenized').iterdir())
  assert [n.split('-')[:3] for n in names] == [['train_300_', 'pt', 'en'],
                                               ['validation_64_', 'pt', 'en']], names
  calls = []
  encode = data.Tokenizer.encode
  monkeypatch.setattr(data.Tokenizer, 'encode',
                      lambda self, texts: calls.append(len(texts)) or encode(self, texts))
  second = tasks.get_task(c, workdir)
  got, got_eval = next(second.train_iterator()), list(second.eval_batches())
  assert calls == []
  for w, g in zip([want] + want_eval, [got] + got_eval, strict=True):
    for key in data.BATCH_KEYS:
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


# ------------------------------------------------------------------------ packing


def test_shift_right_per_segment():
  targets = np.array([[20, 21, 1, 22, 1, 0], [5, 6, 1, 0, 0, 0]])
  segs = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(
      data.shift_right_per_segment(targets, segs, BOS_ID),
      [[3, 20, 21, 3, 22, 0], [3, 5, 6, 0, 0, 0]])
  with pytest.raises(ValueError, match=r'\(2, 6\).*\(2, 5\)'):
    data.shift_right_per_segment(targets, segs[:, :5])


def test_packed_batches_by_hand():
  source = [{'src': '10 11', 'tgt': '20 21'}, {'src': '12 13 14', 'tgt': '22'},
            {'src': '15 16 17 18', 'tgt': '23 24 25'}, {'src': '19', 'tgt': '26'}]
  cfg = data.PipelineConfig(batch_size=2, max_source_len=6, max_target_len=5)
  ds = data.make_dataset(source, IntTokenizer(), cfg, src_key='src', tgt_key='tgt',
                         train=False, pack=True)
  first, second = list(ds)
  # First fit into 2 bins: ex0+ex1 fill bin 0, ex2 goes to bin 1, ex3 fits neither.
  expected_first = {
      'inputs': [[10, 11, 12, 13, 14, 0], [15, 16, 17, 18, 0, 0]],
      'inputs_segmentation': [[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]],
      'inputs_position': [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 0]],
      'targets': [[20, 21, 1, 22, 1], [23, 24, 25, 1, 0]],
      'targets_segmentation': [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]],
      'targets_position': [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]],
      'decoder_inputs': [[3, 20, 21, 3, 22], [3, 23, 24, 25, 0]],
  }
  assert sorted(first) == sorted(data.BATCH_KEYS)
  for key, want in expected_first.items():
    assert first[key].dtype == np.int32, key
    np.testing.assert_array_equal(first[key], want, err_msg=key)
  # Last batch: ex3 alone, then an all-zero padding row.
  np.testing.assert_array_equal(second['inputs'], [[19, 0, 0, 0, 0, 0], [0] * 6])
  np.testing.assert_array_equal(second['decoder_inputs'], [[3, 26, 0, 0, 0], [0] * 5])
  np.testing.assert_array_equal(second['targets_segmentation'], [[1, 1, 0, 0, 0], [0] * 5])


def test_unpacked_eval_batches():
  source = [{'src': '10 11', 'tgt': '20'}, {'src': '12', 'tgt': '22 23 24 25 26'}]
  cfg = data.PipelineConfig(batch_size=2, max_source_len=3, max_target_len=4)
  (batch,) = list(data.make_dataset(source, IntTokenizer(), cfg, src_key='src',
                                    tgt_key='tgt', train=False))
  np.testing.assert_array_equal(batch['inputs'], [[10, 11, 0], [12, 0, 0]])
  np.testing.assert_array_equal(batch['inputs_segmentation'], [[1, 1, 0], [1, 0, 0]])
  np.testing.assert_array_equal(batch['inputs_position'], [[0, 1, 0], [0, 0, 0]])
  # Truncated target keeps EOS as its last token.
  np.testing.assert_array_equal(batch['targets'], [[20, 1, 0, 0], [22, 23, 24, 1]])
  np.testing.assert_array_equal(batch['decoder_inputs'], [[3, 20, 0, 0], [3, 22, 23, 24]])
  np.testing.assert_array_equal(batch['targets_position'], [[0, 1, 0, 0], [0, 1, 2, 3]])
  dropped = data.PipelineConfig(batch_size=2, max_source_len=3, max_target_len=4,
                                overlong='drop')
  (batch,) = list(data.make_dataset(source, IntTokenizer(), dropped, src_key='src',
                                    tgt_key='tgt', train=False))
  np.testing.assert_array_equal(batch['inputs'], [[10, 11, 0], [0, 0, 0]])


def test_every_example_once_per_epoch_and_no_leakage():
  source = _int_source(60)
  cfg = data.PipelineConfig(batch_size=4, max_source_len=12, max_target_len=10, seed=3)
  ds = data.make_dataset(source, IntTokenizer(), cfg, src_key='src', tgt_key='tgt',
                         train=True, num_epochs=2)
  batches = list(ds)
  seen = collections.Counter(seg for b in batches for seg in _segments(b))
  expected = {(tuple(int(w) for w in ex['src'].split()),
               tuple(int(w) for w in ex['tgt'].split()) + (EOS_ID,)) for ex in source}
  assert set(seen) == expected and set(seen.values()) == {2}
  for b in batches:
    tgt, seg, dec = b['targets'], b['targets_segmentation'], b['decoder_inputs']
    start = (seg > 0) & (seg != np.pad(seg, ((0, 0), (1, 0)))[:, :-1])
    assert (dec[start] == BOS_ID).all()
    inner = (seg > 0) & ~start
    # Every non-start decoder input is the previous target of the SAME segment.
    assert (dec[:, 1:][inner[:, 1:]] == tgt[:, :-1][inner[:, 1:]]).all()
    assert (seg[:, :-1][inner[:, 1:]] == seg[:, 1:][inner[:, 1:]]).all()
    assert (dec[seg == 0] == 0).all() and (b['targets'][seg == 0] == 0).all()
    for key in ('inputs', 'targets'):  # positions restart at 0 in every segment
      s, p = b[f'{key}_segmentation'], b[f'{key}_position']
      for r in range(s.shape[0]):
        for k in range(1, s[r].max() + 1):
          np.testing.assert_array_equal(p[r][s[r] == k], np.arange((s[r] == k).sum()))


def test_same_seed_same_batches_other_seed_differs():
  source = _int_source(40)

  def first_batches(seed, n=5):
    cfg = data.PipelineConfig(batch_size=4, max_source_len=12, max_target_len=10,
                              seed=seed)
    it = iter(data.make_dataset(source, IntTokenizer(), cfg, src_key='src',
                                tgt_key='tgt', train=True))
    return np.concatenate([next(it)['inputs'] for _ in range(n)])

  np.testing.assert_array_equal(first_batches(0), first_batches(0))
  assert not np.array_equal(first_batches(0), first_batches(1))


@pytest.mark.parametrize('num_packing_bins', [None, 7])
def test_resume_from_state_gives_identical_batches(num_packing_bins):
  source = _int_source(50)
  cfg = data.PipelineConfig(batch_size=3, max_source_len=12, max_target_len=10, seed=5,
                            num_packing_bins=num_packing_bins)

  def make():
    return data.make_dataset(source, IntTokenizer(), cfg, src_key='src', tgt_key='tgt',
                             train=True)

  it = iter(make())
  for _ in range(9):  # crosses the 50-example epoch boundary and splits packed groups
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON
  expected = [next(it) for _ in range(6)]
  resumed = iter(make())
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in data.BATCH_KEYS:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_read_threads_do_not_change_batches_or_state():
  # Runs checkpointed with reader threads (the old default, 2) resume with 0 (the new).
  source = _int_source(50)

  def make(threads):
    cfg = data.PipelineConfig(batch_size=3, max_source_len=12, max_target_len=10, seed=5,
                              read_threads=threads)
    return iter(data.make_dataset(source, IntTokenizer(), cfg, src_key='src', tgt_key='tgt',
                                  train=True))

  threaded, plain = make(2), make(0)
  for _ in range(7):
    want, got = next(threaded), next(plain)
    for key in data.BATCH_KEYS:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  state = json.loads(json.dumps(threaded.get_state()))
  resumed = make(0)
  resumed.set_state(state)
  for _ in range(4):
    want, got = next(threaded), next(resumed)
    for key in data.BATCH_KEYS:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_end_to_end_tsv_builder_pipeline_resume(tsv_paths, tokenizer, tmp_path):
  builder = data.prepare_tsv_builder(tsv_paths, other_lang='pt', data_dir=str(tmp_path))
  cfg = data.PipelineConfig(batch_size=2, max_source_len=32, max_target_len=32)
  source = data.translation_source(builder, 'train')
  ds = data.make_dataset(source, tokenizer, cfg, src_key='pt', tgt_key='en', train=True)
  it = iter(ds)
  next(it)
  state = it.get_state()
  want = next(it)
  it2 = iter(ds)
  it2.set_state(state)
  got = next(it2)
  for key in data.BATCH_KEYS:
    np.testing.assert_array_equal(got[key], want[key])
  # Unpacked eval decodes back to the English validation text.
  ev = data.make_dataset(data.translation_source(builder, 'validation'), tokenizer, cfg,
                         src_key='pt', tgt_key='en', train=False)
  (batch,) = list(ev)
  assert tokenizer.decode(batch['targets'][:1]) == [DEV_ROWS[0][0]]
  with pytest.raises(KeyError, match=r"\['de'\] not in the examples.*'en', 'pt', 'source'"):
    data.make_dataset(source, tokenizer, cfg, src_key='de', tgt_key='en', train=True)
  assert 'tensorflow' not in sys.modules


def test_tfds_by_name_with_mock_data(tokenizer):
  # mock_data patches the array_record data source, so the by-name path runs offline.
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = data.translation_source('ted_hrlr_translate/pt_to_en', 'train')
    assert len(source) == 6
    cfg = data.PipelineConfig(batch_size=2, max_source_len=48, max_target_len=48)
    ds = data.make_dataset(source, tokenizer, cfg, src_key='pt', tgt_key='en',
                           train=False, pack=False)
    batches = list(ds)
  assert len(batches) == 3
  # Eval keeps source order; mock texts are random letters, which the tokenizer (full
  # character coverage of real text) decodes back up to whitespace normalisation.
  decoded = [t for b in batches for t in tokenizer.decode(b['targets'])]
  want = [' '.join(source[i]['en'].split()) for i in range(6)]
  assert decoded == want
  assert 'tensorflow' not in sys.modules


def test_split_for_devices():
  batch = {'inputs': np.zeros((8, 5), np.int32), 'targets': np.zeros((8, 3), np.int32)}
  out = data.split_for_devices(batch, 4)
  assert out['inputs'].shape == (4, 2, 5) and out['targets'].shape == (4, 2, 3)
  with pytest.raises(ValueError, match=r"batch\['inputs'\] has leading size 8, not "
                     r'divisible by num_devices=3'):
    data.split_for_devices(batch, 3)


def test_config_errors():
  with pytest.raises(ValueError, match="overlong='cut'"):
    data.PipelineConfig(batch_size=2, max_source_len=4, max_target_len=4, overlong='cut')
  with pytest.raises(ValueError, match='max_target_len=1'):
    data.PipelineConfig(batch_size=2, max_source_len=4, max_target_len=1)
