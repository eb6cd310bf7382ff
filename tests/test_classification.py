"""Tests of flaxformer_mini.tasks.classification and configs/classify_*.py.

* Metrics against scikit-learn on random labels; the confusion text spelled out.
* `TextClassifier` heads against a NumPy float64 reference on the encoder's states.
* The task on tiny tables: labels read from the data, bad dev labels (stop / skip),
  a TFDS dataset with a ClassLabel feature, the MiniLM init (slow).
* One tiny end-to-end train.py run (in-process, module-scoped; slow): it learns a
  keyword signal, writes its outputs, `Classifier.from_workdir` reproduces its dev
  predictions, and the workdir refuses data with other labels or another tokenizer.
"""

import json
import logging
import os
import random
import sys
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from sklearn import metrics as skm

from flaxformer_mini import training
from flaxformer_mini.data import records, wordpiece
from flaxformer_mini.tasks import classification as cls_lib
from flaxformer_mini.variants import bert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402
from configs import classify_movie, classify_topics  # noqa: E402

# Made-up labels, each marked by one keyword among filler words: learnable in a few steps.
KEYWORDS = {'zorp': 'apple', 'blick': 'river', 'quaff': 'stone'}
FILLER = ['the', 'a', 'of', 'and', 'to', 'in', 'is', 'it', 'that', 'was', 'for', 'on', 'with',
          'as', 'his', 'they', 'be', 'at', 'one', 'have', 'this', 'from', 'or', 'had', 'by',
          'hot', 'but', 'some', 'what', 'there', 'we', 'can', 'out', 'other', 'were', 'all']
SPECIALS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']


def _rows(n, seed, keywords=KEYWORDS):
  r = random.Random(seed)
  out = []
  for _ in range(n):
    label = r.choice(sorted(keywords))
    words = r.sample(FILLER, r.randint(3, 8))
    words.insert(r.randrange(len(words) + 1), keywords[label])
    out.append((' '.join(words), label))
  return out


def _write_table(path, rows):
  with open(path, 'w') as f:
    f.write('text\tlabel\n' + ''.join(f'{t}\t{l}\n' for t, l in rows))
  return str(path)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """train.tsv / dev.tsv with the keyword signal and a 40-word vocab.txt."""
  root = tmp_path_factory.mktemp('classify_data')
  vocab = root / 'vocab.txt'
  vocab.write_text('\n'.join(SPECIALS + sorted(set(FILLER) | {'apple', 'river', 'stone',
                                                                'pebble'})) + '\n')
  return {'train': _write_table(root / 'train.tsv', _rows(96, 0)),
          'dev': _write_table(root / 'dev.tsv', _rows(24, 1)),
          'vocab': str(vocab), 'root': root}


def _config(data, **overrides):
  """configs/classify_movie.py:scratch made tiny: a 2-layer d=32 BERT on the vocab.txt."""
  c = classify_movie.get_config('scratch')
  c.model.encoder.update(vocab_size=64, d_model=32, num_heads=2, d_ff=64,
                         num_encoder_layers=2, max_len=16)
  c.data.update(train_file=data['train'], dev_file=data['dev'], tokenizer=data['vocab'],
                max_len=16, length_bucket=8, eval_batch_size=16)
  c.update(batch_size=16, num_train_steps=40, log_every=5, eval_every=0, checkpoint_every=40,
           async_checkpointing=False)
  c.optimizer.update(warmup_steps=5, learning_rate=3e-3)
  c.eval.num_samples = 2
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


# -------------------------------------------------------------------------------- metrics


def test_metrics_match_scikit_learn(rng):
  c = 5
  y_true = rng.integers(0, 4, size=200)          # class 4 never true ...
  y_pred = rng.integers(0, 5, size=200)          # ... but predicted
  y_pred[:120] = y_true[:120]
  assert 4 not in y_true and 4 in y_pred
  matrix = cls_lib.confusion_matrix(y_true, y_pred, c)
  np.testing.assert_array_equal(matrix, skm.confusion_matrix(y_true, y_pred, labels=range(c)))
  assert cls_lib.accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred),
                                                           abs=1e-12)
  np.testing.assert_allclose(cls_lib.per_class_f1(matrix), skm.f1_score(
      y_true, y_pred, labels=range(c), average=None, zero_division=0), atol=1e-12)
  assert cls_lib.macro_f1(y_true, y_pred, c) == pytest.approx(
      skm.f1_score(y_true, y_pred, average='macro'), abs=1e-12)
  # A class in neither y_true nor y_pred does not count (sklearn without labels=).
  assert cls_lib.macro_f1(y_true, y_pred, c + 3) == pytest.approx(
      skm.f1_score(y_true, y_pred, average='macro'), abs=1e-12)


def test_metric_edge_cases():
  assert cls_lib.accuracy([], []) == 0.0 and cls_lib.macro_f1([], [], 3) == 0.0
  assert cls_lib.macro_f1([0, 0], [1, 1], 2) == 0.0
  with pytest.raises(ValueError, match=r'y_pred has a class outside \[0, 2\)'):
    cls_lib.confusion_matrix([0, 1], [0, 2], 2)
  with pytest.raises(ValueError, match=r'y_true \(2,\) and y_pred \(3,\) differ in shape'):
    cls_lib.confusion_matrix([0, 1], [0, 1, 1], 2)


def test_format_confusion():
  text = cls_lib.format_confusion(np.array([[5, 0, 1], [2, 12, 0], [0, 0, 1234567]]),
                                  ['neg', 'positive', 'neutral'])
  # columns: 8 wide (longest count + 1), names cut to 7; rows: labels right-aligned to 8
  assert text.split('\n') == [
      '         |      neg positiv neutral  <- predicted',
      '     neg |        5       0       1',
      'positive |        2      12       0',
      ' neutral |        0       0 1234567']


# ---------------------------------------------------------------------------------- model


@pytest.fixture(scope='module')
def tiny_bert():
  enc = bert.bert_encoder_config(vocab_size=40, d_model=16, num_heads=2, d_ff=32,
                                 num_encoder_layers=2, max_len=12)
  ids = np.array([[2, 7, 9, 11, 3, 0, 0, 0], [2, 5, 6, 8, 12, 13, 14, 3]], np.int32)
  cfg, mask = bert.BertConfig(enc, num_labels=3), (ids != 0).astype(np.int32)
  # one init for both poolings: 'mean' has the same tree and leaves the pooler unused
  params = jax.jit(cls_lib.TextClassifier(cfg).init)(jax.random.PRNGKey(0), ids, mask)
  return cfg, ids, mask, params['params']


@pytest.mark.parametrize('pooling', ['cls', 'mean'])
def test_text_classifier_head_matches_numpy(tiny_bert, pooling):
  cfg, ids, mask, params = tiny_bert
  model = cls_lib.TextClassifier(cfg, pooling)
  assert set(params) == {'bert', 'classifier'}
  apply = jax.jit(lambda i, m: model.apply({'params': params}, i, m))
  logits = np.asarray(apply(ids, mask))
  hidden, pooled = jax.jit(bert.BertModel(cfg).apply)({'params': params['bert']}, ids, mask)
  h = np.asarray(hidden, np.float64)
  if pooling == 'cls':  # the pooler: tanh(dense(hidden[:, 0]))
    p = params['bert']['pooler']
    feature = np.tanh(h[:, 0] @ np.float64(p['kernel']) + np.float64(p['bias']))
    np.testing.assert_allclose(np.asarray(pooled), feature, atol=1e-6)
  else:  # the mean over real tokens
    m = mask[..., None].astype(np.float64)
    feature = (h * m).sum(1) / m.sum(1)
  head = params['classifier']
  want = feature @ np.float64(head['kernel']) + np.float64(head['bias'])
  np.testing.assert_allclose(logits, want, atol=1e-5)
  assert logits.dtype == np.float32 and logits.shape == (2, 3)
  # padding: other ids under mask 0, or more of it, leave the logits alone
  noisy = np.where(mask == 1, ids, 17)
  longer = np.pad(ids, ((0, 0), (0, 3))), np.pad(mask, ((0, 0), (0, 3)))
  for i, m in ((noisy, mask), longer):
    np.testing.assert_allclose(apply(i, m), logits, atol=1e-5)


def test_text_classifier_refuses_bad_pooling(tiny_bert):
  cfg, ids, mask, _ = tiny_bert
  with pytest.raises(ValueError, match=r"config.model.pooling='max' is not one of"):
    cls_lib.TextClassifier(cfg, 'max').init(jax.random.PRNGKey(0), ids, mask)
  no_pooler = bert.BertConfig(cfg.encoder, num_labels=3, pooler=False)
  with pytest.raises(ValueError, match=r"pooling='cls' needs the pooler: config.model.pooler"):
    cls_lib.TextClassifier(no_pooler, 'cls').init(jax.random.PRNGKey(0), ids, mask)


# ----------------------------------------------------------------------------- the configs


@pytest.mark.parametrize('module', [classify_movie, classify_topics])
@pytest.mark.parametrize('variant', ['', 'scratch'])
def test_config_schedule_warms_up_then_decays(module, variant):
  c = module.get_config(variant)
  training.validate_config(c)
  o, total = c.optimizer, c.num_train_steps
  assert o.schedule == 'cosine' and 0 < o.warmup_steps < total
  sched = training.make_schedule(o, 1, total)
  steps = np.arange(total + 1)
  got = np.asarray(sched(jnp.asarray(steps)), np.float64)
  lr, w = o.learning_rate, o.warmup_steps
  # optax's definition: linear 0 -> lr over w steps, then lr * (1 + cos(pi * t)) / 2
  want = np.where(steps < w, lr * steps / w,
                  lr * 0.5 * (1 + np.cos(np.pi * (steps - w) / (total - w))))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=lr * 1e-6)  # float32 schedule
  assert got[0] == 0 and got[w] == pytest.approx(lr) and got[total] < lr * 1e-6
  assert (np.diff(got[:w + 1]) > 0).all() and (np.diff(got[w:]) < 0).all()


# ------------------------------------------------------------------------------- the task


def test_labels_come_from_the_train_split(data, tmp_path):
  task = cls_lib.ClassificationTask(_config(data), str(tmp_path))
  assert task.labels == ['blick', 'quaff', 'zorp']
  with open(tmp_path / cls_lib.LABELS_FILE) as f:
    assert json.load(f) == ['blick', 'quaff', 'zorp']
  ids, mask, labels = task.dev_arrays
  want = [task.labels.index(l) for _, l in _rows(24, 1)]
  np.testing.assert_array_equal(labels, want)
  assert ids.shape == mask.shape == (24, 16)
  # the tokenizer saved from the vocab.txt encodes as the vocab.txt does
  direct = wordpiece.WordPiece.from_file(data['vocab']).encode_batch(task.dev_texts, 16)
  np.testing.assert_array_equal(ids, direct['input_ids'])
  batch = next(task.train_iterator())
  assert batch['input_ids'].shape[0] == 16 and batch['input_ids'].shape[1] % 8 == 0
  assert batch['attention_mask'][:, 0].all()
  # no checkpoint in the workdir yet: other data simply replaces the labels
  other = _write_table(tmp_path / 'other.tsv', _rows(30, 4, {'ping': 'apple', 'pong': 'stone'}))
  task = cls_lib.ClassificationTask(_config(data, **{'data.train_file': other,
                                                     'data.dev_file': other}), str(tmp_path))
  with open(tmp_path / cls_lib.LABELS_FILE) as f:
    assert json.load(f) == task.labels == ['ping', 'pong']


def test_dev_label_not_in_train_is_a_bad_row(data, tmp_path, caplog):
  rows = _rows(24, 1)
  rows.insert(4, ('a pebble on the river', 'glim'))  # file line 6 (header is line 1)
  dev = _write_table(tmp_path / 'dev_glim.tsv', rows)
  with pytest.raises(records.BadRowError) as e:
    cls_lib.ClassificationTask(_config(data, **{'data.dev_file': dev}), str(tmp_path / 'stop'))
  assert str(e.value).startswith(f'{dev} line 6: unknown label "glim" (not among the 3 train '
                                 'labels)')
  with caplog.at_level(logging.WARNING, 'flaxformer_mini'):
    task = cls_lib.ClassificationTask(
        _config(data, **{'data.dev_file': dev, 'data.on_bad_row': 'skip'}), str(tmp_path / 's'))
  assert len(task.dev_texts) == 24 and 'a pebble on the river' not in task.dev_texts
  assert task.labels == ['blick', 'quaff', 'zorp']
  assert 'skipped 1 bad rows of 25' in caplog.text and f'{dev} line 6' in caplog.text


def test_too_few_labels_or_too_long_rows_are_refused(data, tmp_path):
  one = _write_table(tmp_path / 'one.tsv', _rows(10, 2, {'zorp': 'apple'}))
  with pytest.raises(ValueError, match=r"the train split has 1 label\(s\) \['zorp'\]"):
    cls_lib.ClassificationTask(_config(data, **{'data.train_file': one,
                                                'data.dev_file': one}), str(tmp_path / 'a'))
  with pytest.raises(ValueError, match=r"config.data.max_len=32 exceeds the model's position "
                     r'table \(16\)'):
    cls_lib.ClassificationTask(_config(data, **{'data.max_len': 32}), str(tmp_path / 'b'))
  with pytest.raises(ValueError, match='more than model vocab_size=20'):
    cls_lib.ClassificationTask(_config(data, **{'model.encoder.vocab_size': 20}),
                               str(tmp_path / 'c'))


class TinyReviews(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset with a ClassLabel feature, prepared locally (no download)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES: ClassVar[dict[str, str]] = {'1.0.0': 'Initial release.'}
  ROWS: ClassVar[dict] = {
      'train': [('a hot apple', 1), ('the cold river', 0), ('  ', 1), ('hot stone', 1),
                ('cold cold', 0)],
      'test': [('hot river', 1), ('cold apple', 0)]}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # as tables.UserTable: no importlib_resources
    return epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'sentence': tfds.features.Text(),
        'polarity': tfds.features.ClassLabel(names=['negative', 'positive'])}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(rows) for split, rows in self.ROWS.items()}

  def _generate_examples(self, rows):
    for i, (text, label) in enumerate(rows):
      yield i, {'sentence': text, 'polarity': label}


def test_tfds_dataset_by_name_with_class_labels(data, tmp_path):
  tfds_dir = str(tmp_path / 'tfds')
  TinyReviews(data_dir=tfds_dir, file_format='array_record').download_and_prepare()
  overrides = {'data.tfds_name': 'tiny_reviews', 'data.tfds_dir': tfds_dir,
               'data.tfds_text_feature': 'sentence', 'data.tfds_label_feature': 'polarity',
               'data.eval_split': 'test', 'data.train_file': '', 'data.dev_file': ''}
  with pytest.raises(records.BadRowError, match=r'^tfds:tiny_reviews/train example 2: empty '
                     r'text \(tfds:tiny_reviews train;'):
    cls_lib.ClassificationTask(_config(data, **overrides), str(tmp_path / 'stop'))
  task = cls_lib.ClassificationTask(_config(data, **overrides, **{'data.on_bad_row': 'skip'}),
                                    str(tmp_path / 'skip'))
  assert task.labels == ['negative', 'positive']
  assert task.dev_texts == ['hot river', 'cold apple']
  np.testing.assert_array_equal(task.dev_arrays[2], [1, 0])
  np.testing.assert_array_equal(task.train_arrays[2], [1, 0, 1, 0])


@pytest.mark.slow
def test_minilm_init_puts_the_pretrained_encoder_under_bert(data, tmp_path):
  config = _config(data, **{'model.init_from': 'minilm', 'data.tokenizer': '',
                            'data.max_len': 16})
  task = cls_lib.ClassificationTask(config, str(tmp_path))
  params = task.init_params(jax.random.PRNGKey(0))
  _, want = bert.load_hf_bert(bert.minilm_dir(), pooler=True)
  got_leaves = jax.tree_util.tree_leaves_with_path(params['bert'])
  want_leaves = jax.tree_util.tree_leaves_with_path(want)
  assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
  for (path, a), (_, b) in zip(got_leaves, want_leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=jax.tree_util.keystr(path))
  assert params['classifier']['kernel'].shape == (384, 3)
  assert task.bert_config.encoder.num_encoder_layers == 6
  # MiniLM's own tokenizer became the run's asset
  assert task.tokenizer.vocab_size == 30522
  with open(tmp_path / cls_lib.MODEL_FILE) as f:
    assert json.load(f)['encoder']['d_model'] == 384


# ------------------------------------------------------------------------ end to end run


@pytest.fixture(scope='module')
def run(data):
  workdir = str(data['root'] / 'run')
  final = train.train_and_evaluate(_config(data), workdir)
  return workdir, final


def _json(path):
  with open(path) as f:
    return json.load(f)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


@pytest.mark.slow
def test_run_learns_and_writes_its_outputs(run, data):
  workdir, final = run
  for name in ('labels.json', 'model.json', 'tokenizer.json', 'confusion_matrix.json',
               'confusion_matrix.tsv', 'dev_predictions.jsonl', 'metrics.jsonl'):
    assert os.path.isfile(os.path.join(workdir, name)), name
  logged = _jsonl(os.path.join(workdir, 'metrics.jsonl'))
  losses = [m['train/loss'] for m in logged if 'train/loss' in m]
  assert len(losses) == 40 // 5 and losses[-1] < 0.5 * losses[0], losses
  assert final['dev/accuracy'] >= 0.75, final  # chance is about 1/3

  labels = _json(os.path.join(workdir, 'labels.json'))
  assert labels == ['blick', 'quaff', 'zorp']
  predictions = _jsonl(os.path.join(workdir, 'dev_predictions.jsonl'))
  assert [(p['text'], p['label']) for p in predictions] == _rows(24, 1)
  y_true = [labels.index(p['label']) for p in predictions]
  y_pred = [labels.index(p['predicted']) for p in predictions]
  want_matrix = skm.confusion_matrix(y_true, y_pred, labels=range(3))
  saved = _json(os.path.join(workdir, 'confusion_matrix.json'))
  assert saved['labels'] == labels and saved['matrix'] == want_matrix.tolist()
  f1 = skm.f1_score(y_true, y_pred, labels=range(3), average=None, zero_division=0)
  np.testing.assert_allclose([saved['f1'][l] for l in labels], f1, atol=1e-12)
  with open(os.path.join(workdir, 'confusion_matrix.tsv')) as f:
    tsv = [line.rstrip('\n').split('\t') for line in f]
  assert tsv[0] == ['true\\predicted', *labels]
  assert [[int(v) for v in row[1:]] for row in tsv[1:]] == want_matrix.tolist()
  last = logged[-1]
  assert last['final/accuracy'] == pytest.approx(skm.accuracy_score(y_true, y_pred))
  assert last['final/macro_f1'] == pytest.approx(skm.f1_score(y_true, y_pred, average='macro'))
  assert final['dev/macro_f1'] == last['final/macro_f1']


@pytest.mark.slow
def test_classifier_from_workdir_reproduces_dev_predictions(run):
  workdir, _ = run
  predictions = _jsonl(os.path.join(workdir, 'dev_predictions.jsonl'))
  classifier = cls_lib.Classifier.from_workdir(workdir, batch_size=8)
  got = classifier.classify([p['text'] for p in predictions])
  assert [g.label for g in got] == [p['predicted'] for p in predictions]
  np.testing.assert_allclose([g.probability for g in got],
                             [p['probability'] for p in predictions], atol=1e-5)
  for g in got:
    assert set(g.probabilities) == {'blick', 'quaff', 'zorp'}
    assert sum(g.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert g.probabilities[g.label] == g.probability == max(g.probabilities.values())
  assert classifier.classify([]) == []


@pytest.mark.slow
def test_workdir_refuses_other_labels_or_tokenizer(run, data, tmp_path):
  workdir, _ = run
  cls_lib.ClassificationTask(_config(data), workdir)  # the same data: accepted
  other = dict(KEYWORDS, glim='pebble')
  train_file = _write_table(tmp_path / 'train4.tsv', _rows(40, 3, other))
  with pytest.raises(ValueError, match=r"labels.json holds labels \['blick', 'quaff', 'zorp'\] "
                     r"of the run trained there, the train data has \['blick', 'glim', 'quaff', "
                     r"'zorp'\]; use a fresh --workdir"):
    cls_lib.ClassificationTask(_config(data, **{'data.train_file': train_file}), workdir)
  vocab = tmp_path / 'vocab2.txt'
  vocab.write_text(epath.Path(data['vocab']).read_text() + 'extra\n')
  with pytest.raises(ValueError, match=r"tokenizer.json is not config.data.tokenizer=.*vocab2"
                     r"\.txt.*use a fresh --workdir for another tokenizer"):
    cls_lib.ClassificationTask(_config(data, **{'data.tokenizer': str(vocab)}), workdir)
  with open(os.path.join(workdir, 'labels.json')) as f:
    assert json.load(f) == ['blick', 'quaff', 'zorp']  # untouched by the refusals


@pytest.mark.slow
def test_predict_cli_labels_lines_like_the_classifier(run, tmp_path, capsys):
  from flaxformer_mini import predict
  workdir, _ = run
  texts = [p['text'] for p in _jsonl(os.path.join(workdir, 'dev_predictions.jsonl'))][:6]
  src = tmp_path / 'in.txt'
  src.write_text('\n'.join(texts[:3] + [''] + texts[3:]) + '\n', encoding='utf-8')
  assert predict.main([f'--workdir={workdir}', f'--input={src}']) == 0
  lines = capsys.readouterr().out.splitlines()
  want = cls_lib.Classifier.from_workdir(workdir).classify(texts)
  assert lines[3] == '' and len(lines) == 7
  got = [line.split('\t') for line in lines[:3] + lines[4:]]
  assert [g[0] for g in got] == [w.label for w in want]
  np.testing.assert_allclose([float(g[1]) for g in got], [w.probability for w in want],
                             atol=1e-4)
  assert predict.main([f'--workdir={workdir}', '--json', texts[0]]) == 0
  row = json.loads(capsys.readouterr().out)
  assert row['label'] == want[0].label and set(row['probabilities']) == set(want[0].probabilities)


# ------------------------------------------------------------ encoder-only distillation


def _student_config(data, teacher_dir, **distill):
  """A smaller student (1 layer, d=16) of the tiny classifier, distilled from ``teacher_dir``."""
  import ml_collections
  c = _config(data, task='distill_classifier')
  c.model.encoder.update(d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1)
  c.distill = ml_collections.ConfigDict(dict(teacher_workdir=teacher_dir, teacher_step=0,
                                             alpha=0.5, temperature=2.0))
  c.distill.update(distill)
  return c


@pytest.mark.slow
def test_distilled_classifier_loss_mixes_label_ce_and_teacher_kl(run, data, tmp_path):
  from flaxformer_mini.tasks import distill
  teacher_dir, _ = run
  task = distill.ClassifierDistillationTask(
      _student_config(data, teacher_dir, alpha=0.3, temperature=2.0), str(tmp_path / 's'))
  batch = next(task.train_iterator())
  params = task.init_params(jax.random.PRNGKey(0))
  loss, sums = jax.jit(lambda p, b: task.loss_and_metrics(p, b, jax.random.PRNGKey(1), True))(
      params, batch)
  student = np.asarray(task.model.apply({'params': params}, batch['input_ids'],
                                        batch['attention_mask']), np.float64)
  teacher = cls_lib.Classifier.from_workdir(teacher_dir)
  t_logits = np.asarray(cls_lib.TextClassifier(teacher.cfg, teacher.pooling).apply(
      {'params': teacher.params}, batch['input_ids'], batch['attention_mask']), np.float64)
  w = np.asarray(batch['weight'], np.float64)

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  log_t, log_s = log_softmax(t_logits / 2.0), log_softmax(student / 2.0)
  kd = 4.0 * np.sum(w * np.sum(np.exp(log_t) * (log_t - log_s), -1))
  ce = -np.sum(w * np.take_along_axis(log_softmax(student),
                                      np.asarray(batch['label'])[:, None], -1)[:, 0])
  np.testing.assert_allclose(float(sums['kd']), kd, rtol=1e-4)
  np.testing.assert_allclose(float(sums['label_loss']), ce, rtol=1e-5)
  np.testing.assert_allclose(float(loss), 0.7 * ce + 0.3 * kd, rtol=1e-5)


@pytest.mark.slow
def test_distilled_classifier_trains_and_is_predicted_as_a_classifier(run, data, tmp_path,
                                                                       capsys):
  from flaxformer_mini import predict
  teacher_dir, _ = run
  workdir = str(tmp_path / 'student')
  final = train.train_and_evaluate(_student_config(data, teacher_dir), workdir)
  assert final['dev/accuracy'] >= 0.75, final  # chance is about 1/3
  logged = _jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert all(m['train/kd'] >= 0 for m in logged if 'train/kd' in m)
  texts = [t for t, _ in _rows(6, 7)]
  want = [p.label for p in cls_lib.Classifier.from_workdir(workdir).classify(texts)]
  capsys.readouterr()  # the training's own output
  assert predict.main(['--workdir', workdir, *texts]) == 0
  assert [line.split('\t')[0] for line in capsys.readouterr().out.splitlines()] == want


@pytest.mark.slow
def test_distilled_classifier_refuses_other_labels_or_tokenizer(run, data, tmp_path):
  from flaxformer_mini.tasks import distill
  teacher_dir, _ = run
  other = dict(KEYWORDS, glim='pebble')
  c = _student_config(data, teacher_dir)
  c.data.train_file = _write_table(tmp_path / 'train4.tsv', _rows(40, 3, other))
  with pytest.raises(ValueError, match=r"has labels \['blick', 'quaff', 'zorp'\], the student's "
                     r"train data \['blick', 'glim', 'quaff', 'zorp'\]"):
    distill.ClassifierDistillationTask(c, str(tmp_path / 'a'))
  vocab = tmp_path / 'vocab2.txt'
  vocab.write_text(epath.Path(data['vocab']).read_text() + 'extra\n')
  c = _student_config(data, teacher_dir)
  c.data.tokenizer = str(vocab)
  with pytest.raises(ValueError, match=r'set config.data.tokenizer to the teacher'):
    distill.ClassifierDistillationTask(c, str(tmp_path / 'b'))
  with pytest.raises(ValueError, match=r'config.distill.teacher_workdir is empty'):
    distill.ClassifierDistillationTask(_student_config(data, ''), str(tmp_path / 'c'))
