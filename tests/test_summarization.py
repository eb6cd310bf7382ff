"""The summarization task: ROUGE against rouge-score and hand counts, the lead baselines, and a
tiny end-to-end run (train.py's loop on a document/summary TSV cut from ../shared/data).

The end-to-end tests share one module-scoped run (a 1+1-layer model, 150 steps) and its
compiled searches; the bad-row and config tests stop before any model is built.
"""

import gzip
import json
import math
import os
import shutil
import statistics
import sys

import jax
import ml_collections
import numpy as np
import pytest
from rouge_score import rouge_scorer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train  # noqa: E402
from configs import summarize_debian, summarize_debian_t5  # noqa: E402
from flaxformer_mini.config import TransformerConfig  # noqa: E402
from flaxformer_mini.data import records  # noqa: E402
from flaxformer_mini.models import Transformer  # noqa: E402
from flaxformer_mini.tasks import summarization as summ  # noqa: E402

SHARED = os.path.join(REPO, '..', 'shared', 'data', 'summarize')
TRAIN_ROWS, DEV_ROWS = 400, 16
MAX_SOURCE_LEN = 32
TYPES = ('rouge1', 'rouge2', 'rougeL')


def _official(hyps, refs):
  """rouge-score itself: mean F-measure x100, Porter stemmer (the task's documented setting)."""
  scorer = rouge_scorer.RougeScorer(list(TYPES), use_stemmer=True)
  scores = [scorer.score(r, h) for h, r in zip(hyps, refs)]
  return {t: 100.0 * float(np.mean([s[t].fmeasure for s in scores])) for t in TYPES}


def _f(p, r):
  return 0.0 if p + r == 0 else 2 * p * r / (p + r)


# ------------------------------------------------------------------------------ metrics


def test_rouge_matches_hand_counts():
  # Words of <= 3 letters: the Porter stemmer leaves them alone, so the counts are by hand.
  refs = ['the cat sat on the mat', 'the cat sat on the mat']
  hyps = ['the cat lay on the red mat', 'on the mat the cat sat']
  # Pair 1: unigrams the x2, cat, on, mat = 5 of 7 (hyp) / 6 (ref); bigrams 'the cat', 'on
  # the' = 2 of 6 / 5; LCS 'the cat on the mat' = 5. Pair 2: all 6 unigrams; bigrams 'on
  # the', 'the mat', 'the cat', 'cat sat' = 4 of 5 / 5; LCS 'the cat sat' (or 'on the mat') = 3.
  want = {'rouge1': (_f(5 / 7, 5 / 6) + 1.0) / 2,
          'rouge2': (_f(2 / 6, 2 / 5) + _f(4 / 5, 4 / 5)) / 2,
          'rougeL': (_f(5 / 7, 5 / 6) + _f(3 / 6, 3 / 6)) / 2}
  got = summ.rouge(hyps, refs)
  for t in TYPES:
    assert got[t] == pytest.approx(100 * want[t], abs=1e-9), t
  assert want['rouge1'] == pytest.approx((10 / 13 + 1) / 2)  # the formula, written out
  assert summ.rouge([''], ['the cat']) == dict.fromkeys(TYPES, 0.0)


def _dev_pairs(n):
  with gzip.open(os.path.join(SHARED, 'debian_synopsis.dev.tsv.gz'), 'rt',
                 encoding='utf-8') as f:
    next(f)
    rows = [next(f).rstrip('\n').split('\t') for _ in range(n)]
  return [d for d, _ in rows], [s for _, s in rows]


def test_rouge_matches_rouge_score_on_real_pairs():
  docs, refs = _dev_pairs(40)
  hyps = [' '.join(d.split()[:8]) for d in docs]  # punctuation, capitals, stemmable words
  got, want = summ.rouge(hyps, refs), _official(hyps, refs)
  for t in TYPES:
    assert got[t] == pytest.approx(want[t], abs=1e-9), t
  assert 0 < got['rouge2'] < got['rouge1'] < 100


def test_rouge_errors():
  with pytest.raises(ValueError, match='2 hypotheses and 1 references'):
    summ.rouge(['a', 'b'], ['a'])
  with pytest.raises(ValueError, match='at least one'):
    summ.rouge([], [])
  with pytest.raises(TypeError, match='single str'):
    summ.rouge('a b', 'a b')


# ----------------------------------------------------------------------------- baselines


def test_lead_words():
  assert summ.lead_words('a  b\n\tc d', 3) == 'a b c'
  assert summ.lead_words('one two', 5) == 'one two'
  assert summ.lead_words('', 2) == ''
  with pytest.raises(ValueError, match='k=0'):
    summ.lead_words('a b', 0)


@pytest.mark.parametrize('document, want', [
    ('Foo is a tool, e.g. for bar. It does baz.', 'Foo is a tool, e.g. for bar.'),
    ('It needs nothing, i.e. no server. Second one.', 'It needs nothing, i.e. no server.'),
    ('Tools (e.g. grep) etc. work! More.', 'Tools (e.g. grep) etc. work!'),
    ('Formats (see e.g.) are listed. More.', 'Formats (see e.g.) are listed.'),
    ('He said "stop." Then he left.', 'He said "stop."'),
    ('A library (see foo.) More text.', 'A library (see foo.)'),
    ('Version 2.0 is out? Yes.', 'Version 2.0 is out?'),
    ('no full stop at all', 'no full stop at all'),
    ('  Multiple   spaces\n\nand\tnewlines. Next', 'Multiple spaces and newlines.'),
    ('Ends at the end.', 'Ends at the end.'),
    ('', ''),
])
def test_first_sentence(document, want):
  assert summ.first_sentence(document) == want


@pytest.mark.parametrize('texts, want', [
    (['a', 'a b', 'a b c'], 2),
    (['a', 'a b'], 2),                     # median 1.5 rounds half up
    (['a b', 'a b c d', 'x', 'v w x y z'], 3),  # 2, 4, 1, 5: median 3
    (['a', 'a b c', 'a b c d', 'a b'], 3),  # 2.5 -> 3 (round() would give 2)
    (['a b c d e f g', 'x'], 4),           # 4.0
    (['', ' '], 1),                        # at least 1
])
def test_median_words(texts, want):
  assert summ.median_words(texts) == want


def test_median_words_of_nothing():
  with pytest.raises(ValueError, match='no texts'):
    summ.median_words([])


def test_lead_baselines_by_hand():
  out = summ.lead_baselines(['The cat sat. It was on the mat.'], ['the cat sat'], k=2)
  # lead-2 'The cat': 2 of 2 unigrams, 2 of 3 reference ones; 'the cat' is 1 of 2 bigrams.
  assert out['lead_k_rouge1'] == pytest.approx(100 * _f(1, 2 / 3))
  assert out['lead_k_rouge2'] == pytest.approx(100 * _f(1, 1 / 2))
  assert out['lead_sentence_rougeL'] == pytest.approx(100.0)  # 'The cat sat.'
  assert set(out) == {f'{b}_{t}' for b in ('lead_k', 'lead_sentence') for t in TYPES}


# ------------------------------------------------------------------------- configuration


def _write_table(path, rows, header='document\tsummary'):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(header + '\n' + ''.join('\t'.join(r) + '\n' for r in rows))


def _shared_rows(name, n):
  with gzip.open(os.path.join(SHARED, f'debian_synopsis.{name}.tsv.gz'), 'rt',
                 encoding='utf-8') as f:
    next(f)
    return [tuple(next(f).rstrip('\n').split('\t')) for _ in range(n)]


@pytest.fixture(scope='module')
def tables_dir(tmp_path_factory):
  """train.tsv (400 real pairs) and dev.tsv (16), from the shared Debian synopsis files."""
  root = tmp_path_factory.mktemp('summ_data')
  _write_table(root / 'train.tsv', _shared_rows('train', TRAIN_ROWS))
  _write_table(root / 'dev.tsv', _shared_rows('dev', DEV_ROWS))
  return root


def _config(tables, **overrides):
  c = summarize_debian.get_config()
  c.data.update(source='files', train_file=str(tables / 'train.tsv'),
                eval_file=str(tables / 'dev.tsv'), tfds_dir=str(tables / 'tfds'),
                spm_max_sentences=0, max_source_len=MAX_SOURCE_LEN, max_target_len=16,
                eval_batch_size=16)
  c.model.update(vocab_size=256, d_model=32, num_heads=2, d_ff=64, num_encoder_layers=1,
                 num_decoder_layers=1, max_len=32)
  # 150 steps: fewer leave a model whose every beam ends at once (all summaries empty).
  c.update(batch_size=16, batch_chunks=1, num_train_steps=150, log_every=50, eval_every=0,
           checkpoint_every=150, keep=1, async_checkpointing=False)
  c.optimizer.update(warmup_steps=10, lr_factor=5.0)
  c.eval.update(beam_size=2, max_decode_len=16, decode_batch_size=8, rouge_examples=0,
                num_samples=1)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_bad_rows_stop_names_file_and_line(tables_dir, tmp_path):
  rows = _shared_rows('train', 6)
  bad = tmp_path / 'train.tsv'
  _write_table(bad, [rows[0], (rows[1][0], ' '), rows[2], (rows[3][0],), *rows[4:]])
  c = _config(tables_dir, **{'data.train_file': str(bad), 'data.tfds_dir': ''})
  with pytest.raises(records.BadRowError,
                     match=r'train\.tsv line 3: empty text in column "summary"'):
    summ.SummarizationTask(c, str(tmp_path / 'run'))
  _write_table(bad, [*rows[:3], (rows[3][0],), *rows[4:]])  # line 5: no summary field
  with pytest.raises(records.BadRowError, match=r'train\.tsv line 5: missing column "summary"'):
    summ.SummarizationTask(c, str(tmp_path / 'run'))
  _write_table(bad, rows, header='document\ttitle')
  with pytest.raises(ValueError, match=r"train\.tsv line 1: the header .* no column 'summary'"):
    summ.SummarizationTask(c, str(tmp_path / 'run'))


def test_bad_rows_skip(tables_dir, tmp_path):
  rows = _shared_rows('train', TRAIN_ROWS)
  bad = tmp_path / 'train.tsv'
  _write_table(bad, [rows[0], (rows[1][0], ''), (rows[2][0],), *rows[3:]])
  c = _config(tables_dir, **{'data.train_file': str(bad), 'data.tfds_dir': '',
                             'data.on_bad_row': 'skip'})
  task = summ.SummarizationTask(c, str(tmp_path / 'run'))
  assert len(task.train_source) == TRAIN_ROWS - 2
  assert task.train_source[1]['document'] == rows[3][0]  # rows 2 and 3 of the file skipped


def test_source_errors(tables_dir, tmp_path):
  c = _config(tables_dir, **{'data.source': 'tfds', 'data.tfds_name': ''})
  with pytest.raises(ValueError, match=r'source="tfds" needs config\.data\.tfds_name'):
    summ.SummarizationTask(c, str(tmp_path))
  c = _config(tables_dir, **{'data.eval_file': ''})
  with pytest.raises(ValueError, match=r'needs config\.data\.eval_file'):
    summ.SummarizationTask(c, str(tmp_path))
  c = _config(tables_dir, **{'data.source': 'nowhere'})
  with pytest.raises(ValueError, match=r"config\.data\.source='nowhere'"):
    summ.SummarizationTask(c, str(tmp_path))


@pytest.mark.parametrize('module', [summarize_debian, summarize_debian_t5])
def test_configs_build_their_model(module):
  c = module.get_config()
  cfg = TransformerConfig.from_dict(c.model)
  ids = jax.ShapeDtypeStruct((1, c.data.max_source_len), np.int32)
  tgt = jax.ShapeDtypeStruct((1, c.data.max_target_len), np.int32)
  params = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), ids, tgt)['params']
  n = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
  assert c.task == 'summarization' and c.data.vocab_size == cfg.vocab_size == 8000
  assert max(c.data.max_source_len, c.data.max_target_len, c.eval.max_decode_len) <= cfg.max_len
  assert 3e6 < n < 3e7, n
  if module is summarize_debian_t5:  # the T5 v1.1 recipe, not the paper's model
    assert (cfg.norm_kind, cfg.position_kind, cfg.ffn_gated) == ('rmsnorm', 'relative', True)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope='module')
def run(tables_dir, tmp_path_factory):
  """(workdir, config) of a tiny summarization run: 150 steps, then beam-2 dev ROUGE."""
  workdir = str(tmp_path_factory.mktemp('summ_run') / 'run')
  config = _config(tables_dir)
  train.train_and_evaluate(config, workdir)
  return workdir, config


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]


def _predictions(workdir):
  with open(os.path.join(workdir, summ.PREDICTIONS_FILE), encoding='utf-8') as f:
    return [json.loads(l) for l in f]


@pytest.mark.slow
def test_run_reports_rouge_and_baselines(run, tables_dir):
  workdir, _ = run
  final = _metrics(workdir)[-1]
  preds = _predictions(workdir)
  dev = _shared_rows('dev', DEV_ROWS)
  assert [(p['document'], p['reference']) for p in preds] == dev
  assert final['final/rouge_examples'] == DEV_ROWS
  # Independent recomputation: rouge-score on the written summaries and on the lead baselines.
  ours = _official([p['summary'] for p in preds], [r for _, r in dev])
  k = math.floor(statistics.median(len(s.split()) for _, s in
                                   _shared_rows('train', TRAIN_ROWS)) + 0.5)
  assert final['final/lead_k'] == k
  lead_k = _official([' '.join(d.split()[:k]) for d, _ in dev], [r for _, r in dev])
  for t in TYPES:
    assert final[f'final/{t}'] == pytest.approx(ours[t], abs=1e-6)
    assert final[f'final/lead_k_{t}'] == pytest.approx(lead_k[t], abs=1e-6)
    assert 0 < final[f'final/lead_sentence_{t}'] <= 100
  assert np.isfinite(final['final/loss'])


@pytest.mark.slow
def test_summarizer_equals_evaluation(run):
  workdir, _ = run
  preds = _predictions(workdir)
  assert len({p['summary'] for p in preds}) > 1  # not all empty, not all alike
  summarizer = summ.Summarizer.from_workdir(workdir)
  assert summarizer.search == summ.SearchConfig('beam', beam_size=2, alpha=0.6)
  assert summarizer.summarize([p['document'] for p in preds]) == [p['summary'] for p in preds]


@pytest.mark.slow
def test_long_documents_are_cut_as_in_training(run):
  workdir, config = run
  summarizer = summ.Summarizer.from_workdir(workdir)
  docs = [d for d, _ in _shared_rows('dev', DEV_ROWS)]
  full = summarizer.tokenizer.encode(docs)
  assert sum(len(ids) > MAX_SOURCE_LEN for ids in full) >= 4
  encoded = summarizer.encode(docs)
  for ids, cut in zip(full, encoded):
    np.testing.assert_array_equal(cut, ids[:MAX_SOURCE_LEN])
  # Training's rows: the eval pipeline (unpacked, source order) of the same run.
  task = summ.SummarizationTask(config, workdir)
  rows = np.concatenate([b['inputs'] for b in task.eval_batches()])[:DEV_ROWS]
  for row, cut in zip(rows, encoded):
    np.testing.assert_array_equal(row[row != 0], cut)
  # What lies past the cut does not change the summary.
  long_doc = next(d for d, ids in zip(docs, full) if len(ids) > MAX_SOURCE_LEN)
  a, b = summarizer.summarize([long_doc, long_doc + ' ' + docs[0]])
  assert a == b


@pytest.mark.slow
def test_empty_documents_give_empty_summaries(run):
  summarizer = summ.Summarizer.from_workdir(run[0])
  doc = _predictions(run[0])[0]
  out = summarizer.summarize(['', doc['document'], ' \n\t'])
  assert out == ['', doc['summary'], '']
  assert summarizer.summarize([]) == []
  with pytest.raises(TypeError, match='single str'):
    summarizer.summarize('a document')


@pytest.mark.slow
def test_summarizer_refuses_other_runs(smoke_run_dir):
  with pytest.raises(ValueError, match="is a 'translation' run, not 'summarization'"):
    summ.Summarizer.from_workdir(smoke_run_dir)


@pytest.mark.slow
def test_t5_config_trains_without_nan(run, tables_dir, tmp_path):
  workdir = str(tmp_path / 't5')
  os.makedirs(workdir)
  shutil.copy(os.path.join(run[0], 'spm.model'), workdir)  # same data: reuse its tokenizer
  c = summarize_debian_t5.get_config()
  c.data.update(_config(tables_dir).data.to_dict())
  c.model.update(vocab_size=256, d_model=32, num_heads=2, head_dim=16, d_ff=48,
                 num_encoder_layers=1, num_decoder_layers=1, max_len=32)
  c.update(batch_size=16, batch_chunks=1, num_train_steps=4, log_every=2, eval_every=0,
           checkpoint_every=4, keep=1, async_checkpointing=False)
  c.optimizer.warmup_steps = 2
  c.eval.final_bleu = False
  assert isinstance(c, ml_collections.ConfigDict) and c.data.vocab_size == 256
  final = train.train_and_evaluate(c, workdir)
  losses = [m['train/loss'] for m in _metrics(workdir) if 'train/loss' in m]
  assert len(losses) == 2 and np.all(np.isfinite(losses)) and np.isfinite(final['dev/loss'])
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)['model']
  assert (saved['norm_kind'], saved['position_kind']) == ('rmsnorm', 'relative')


@pytest.mark.slow
def test_predict_cli_summarizes_like_the_summarizer(run, capsys):
  from flaxformer_mini import predict
  workdir, _ = run
  docs = [p['document'] for p in _predictions(workdir)][:4]
  assert predict.main([f'--workdir={workdir}', *docs, '']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines == summ.Summarizer.from_workdir(workdir).summarize(docs) + ['']
