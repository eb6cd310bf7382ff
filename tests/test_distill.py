"""flaxformer_mini.tasks.distill: the word-level KL against float64 NumPy, the mixed loss of
a real student/teacher pair, the sequence-level corpus equal to the teacher's own
translations (and resumable), and a student trained end to end from the tiny smoke teacher."""

import gzip
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import train
from configs import smoke
from flaxformer_mini import translate
from flaxformer_mini.tasks import distill

pytestmark = pytest.mark.slow  # every test but the first two builds on the trained teacher


def _np_kl(s, t, w, temperature):
  s = np.asarray(s, np.float64) / temperature
  t = np.asarray(t, np.float64) / temperature
  log_ps = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(
      -1, keepdims=True)
  log_pt = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(
      -1, keepdims=True)
  return float((np.exp(log_pt) * (log_pt - log_ps)).sum(-1).__mul__(w).sum())


@pytest.mark.parametrize('temperature', [1.0, 2.0, 0.5])
def test_kl_divergence_sums_matches_numpy(rng, temperature):
  s = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  t = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  w = (rng.random((3, 5)) > 0.3).astype(np.float32)
  got = float(distill.kl_divergence_sums(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w),
                                         temperature))
  np.testing.assert_allclose(got, _np_kl(s, t, w, temperature), rtol=1e-5)
  assert float(distill.kl_divergence_sums(jnp.asarray(t), jnp.asarray(t), jnp.asarray(w),
                                          temperature)) == pytest.approx(0.0, abs=1e-5)
  with pytest.raises(ValueError, match='same vocabulary'):
    distill.kl_divergence_sums(jnp.asarray(s), jnp.asarray(t[..., :4]), jnp.asarray(w))


def test_kl_gradient_reaches_the_student_only(rng):
  s = jnp.asarray(rng.normal(size=(2, 4, 7)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(2, 4, 7)), jnp.float32)
  w = jnp.ones((2, 4))
  gs, gt = jax.grad(lambda a, b: distill.kl_divergence_sums(a, b, w, 2.0), (0, 1))(s, t)
  assert float(jnp.abs(gs).max()) > 0 and float(jnp.abs(gt).max()) == 0.0
  # d KL / d s = (softmax(s/T) - softmax(t/T)) / T per position.
  want = (jax.nn.softmax(s / 2.0) - jax.nn.softmax(t / 2.0)) / 2.0
  np.testing.assert_allclose(np.asarray(gs), np.asarray(want), atol=1e-6)


@pytest.fixture(scope='module')
def teacher_dir(smoke_run_dir, tmp_path_factory):
  """The smoke run with the EOS and word-boundary ('▁') embedding rows zeroed. The barely
  trained teacher otherwise emits only those, which decode to empty translations and make
  a corpus test vacuous; without them its outputs are non-empty (if repetitive) text."""
  from flaxformer_mini import checkpoints
  from flaxformer_mini.data.tokenizer import EOS_ID
  config, params, assets, meta = checkpoints.load_run(smoke_run_dir, with_meta=True)
  params = jax.tree_util.tree_map(np.array, params)  # writable host copies
  tokenizer = translate.Translator.from_workdir(smoke_run_dir).tokenizer
  boundary = next(i for i in range(tokenizer.vocab_size) if tokenizer.id_to_piece(i) == '▁')
  params['embedding']['embedding'][[EOS_ID, boundary]] = 0.0
  out = str(tmp_path_factory.mktemp('teacher') / 'run')
  os.makedirs(out)
  copied = {}
  for name, path in assets.items():
    copied[name] = os.path.join(out, name)
    with open(path, 'rb') as src, open(copied[name], 'wb') as dst:
      dst.write(src.read())
  writer = checkpoints.Checkpointer(out, keep=1, keep_best=0, async_save=False)
  writer.save(meta['step'], {'params': params}, data_state=None, config=config,
              assets=copied, task='translation')
  writer.close()
  return out


def _student_config(teacher_dir, tmp_path, kind, **distill):
  c = smoke.get_config()
  c.task = 'distill'
  c.distill = ml_collections.ConfigDict(dict(
      kind=kind, teacher_workdir=teacher_dir, teacher_step=0, alpha=0.5, temperature=2.0,
      beam_size=1, beam_alpha=0.6, cache_dir=str(tmp_path / 'distilled')))
  c.distill.update(distill)
  c.model.update(d_model=16, num_heads=2, d_ff=32)
  c.data.train_split = 'train[:48]'
  c.data.tfds_dir = str(tmp_path / 'tfds')
  c.num_train_steps = 4
  c.checkpoint_every = 4
  c.eval_every = 0
  c.eval.bleu_examples = 4
  return c


def test_word_level_loss_is_the_mix_of_label_loss_and_teacher_kl(teacher_dir, tmp_path):
  config = _student_config(teacher_dir, tmp_path, 'word', alpha=0.3, temperature=2.0)
  task = distill.DistillationTask(config, str(tmp_path / 'student'))
  batch = next(task.train_iterator())
  params = task.init_params(jax.random.PRNGKey(0))
  loss, sums = jax.jit(lambda p, b: task.loss_and_metrics(p, b, jax.random.PRNGKey(1), True))(
      params, batch)
  student = task.model.apply({'params': params}, batch['inputs'], batch['decoder_inputs'],
                             inputs_segmentation=batch['inputs_segmentation'],
                             targets_segmentation=batch['targets_segmentation'],
                             inputs_positions=batch['inputs_position'],
                             targets_positions=batch['targets_position'])
  teacher = translate.Translator.from_workdir(teacher_dir)
  t_logits = teacher.model.apply({'params': teacher.params}, batch['inputs'],
                                 batch['decoder_inputs'],
                                 inputs_segmentation=batch['inputs_segmentation'],
                                 targets_segmentation=batch['targets_segmentation'],
                                 inputs_positions=batch['inputs_position'],
                                 targets_positions=batch['targets_position'])
  w = np.asarray(batch['targets_segmentation'] > 0, np.float64)
  kd = 4.0 * _np_kl(student, t_logits, w, 2.0)
  np.testing.assert_allclose(float(sums['kd']), kd, rtol=1e-4)
  np.testing.assert_allclose(float(loss), 0.7 * float(sums['label_loss']) + 0.3 * kd,
                             rtol=1e-5)
  assert float(sums['loss']) == pytest.approx(float(loss))


def test_sequence_level_corpus_is_the_teachers_translation(teacher_dir, tmp_path,
                                                          monkeypatch):
  config = _student_config(teacher_dir, tmp_path, 'sequence')
  task = distill.DistillationTask(config, str(tmp_path / 'student'))
  with gzip.open(task.distilled_corpus_path, 'rt', encoding='utf-8') as f:
    rows = [line.rstrip('\n').split('\t') for line in f]
  from flaxformer_mini import data
  builder = data.prepare_tsv_builder(data.embedded_paths(), other_lang='pt',
                                     data_dir=config.data.tfds_dir)
  original = data.translation_source(builder, config.data.train_split)
  sources = [original[i]['pt'].decode() for i in range(len(original))]
  teacher = translate.Translator.from_workdir(teacher_dir,
                                              max_decode_len=config.data.max_target_len)
  outputs = teacher.translate(sources, translate.SearchConfig('greedy'))
  want = [[o, s, 'distilled'] for s, o in zip(sources, outputs) if o.strip()]
  assert rows == want and len(rows) == len(task.train_source)
  assert [task.train_source[i]['en'].decode() for i in range(3)] == [r[0] for r in want[:3]]
  # A second run with the same teacher reads the corpus instead of decoding again.
  monkeypatch.setattr(translate.Translator, 'translate',
                      lambda *a, **k: pytest.fail('decoded again'))
  again = distill.DistillationTask(config, str(tmp_path / 'student2'))
  assert again.distilled_corpus_path == task.distilled_corpus_path


def test_corpus_parts_are_reused_after_an_interruption(tmp_path, monkeypatch):
  monkeypatch.setattr(distill, 'PART_SIZE', 2)

  class Teacher:
    def __init__(self, fail_at=None):
      self.calls, self.fail_at = [], fail_at

    def translate(self, sources, search):
      self.calls.append(list(sources))
      if len(self.calls) == self.fail_at:
        raise KeyboardInterrupt  # killed while decoding this part
      return [s.upper() for s in sources]
  path = str(tmp_path / 'c.tsv.gz')
  sources = ['a b', 'c', 'd e', 'f', 'g', ' ']
  with pytest.raises(KeyboardInterrupt):
    distill.distilled_corpus(Teacher(fail_at=2), sources, None, path, tgt_is_english=True)
  assert not os.path.exists(path) and os.path.exists(path + '.part-00000')
  teacher = Teacher()
  written, dropped = distill.distilled_corpus(teacher, sources, None, path,
                                              tgt_is_english=True)
  assert (written, dropped) == (5, 1)  # the blank source gives an empty pair: dropped
  assert teacher.calls == [['d e', 'f'], ['g', ' ']]  # the first part was not decoded again
  with gzip.open(path, 'rt') as f:
    assert f.read().splitlines()[:2] == ['A B\ta b\tdistilled', 'C\tc\tdistilled']
  assert not [p for p in os.listdir(tmp_path) if '.part-' in p]


def test_student_trains_end_to_end_and_loads_as_a_translator(teacher_dir, tmp_path):
  config = _student_config(teacher_dir, tmp_path, 'both')
  workdir = str(tmp_path / 'student')
  final = train.train_and_evaluate(config, workdir)
  assert np.isfinite(final['dev/loss']) and 'dev/bleu' in final
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert any('train/kd' in r for r in records)
  student = translate.Translator.from_workdir(workdir)
  assert student.model_config.d_model == 16
  assert len(student.translate(['Obrigado.', ''])) == 2


@pytest.mark.parametrize('change, message', [
    (dict(kind='words'), "kind='words'"),
    (dict(teacher_workdir=''), 'teacher_workdir is empty'),
    (dict(alpha=1.5), 'alpha=1.5'),
])
def test_config_errors_name_the_field(teacher_dir, tmp_path, change, message):
  config = _student_config(teacher_dir, tmp_path, 'word')
  config.distill.update(change)
  with pytest.raises(ValueError, match=message):
    distill.DistillationTask(config, str(tmp_path / 's'))


def test_other_vocabulary_is_refused(teacher_dir, tmp_path):
  config = _student_config(teacher_dir, tmp_path, 'word')
  config.model.vocab_size = 300
  with pytest.raises(ValueError, match='vocab_size=300'):
    distill.DistillationTask(config, str(tmp_path / 's'))
