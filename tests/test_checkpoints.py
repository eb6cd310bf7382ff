"""What happens when things go wrong: resume rules, retention, divergence, bad input, disk full.

Most tests drive `checkpoints.Checkpointer` and `training.train_step` on a toy state (fast);
the train.py-level ones fail before any data is built, except the divergence and
model-mismatch runs, which use the smoke config on a few dozen embedded pairs.
"""

import contextlib
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train  # noqa: E402
from configs import smoke  # noqa: E402
from flaxformer_mini import checkpoints, training  # noqa: E402

CONFIG = ml_collections.ConfigDict({'model': {'d': 3}, 'optimizer': {'clip_norm': 1.0}})


def _tx(clip=True, accum=1):
  parts = ([optax.clip_by_global_norm(1.0)] if clip else []) + [
      optax.scale_by_adam(), optax.scale_by_learning_rate(optax.linear_schedule(0.0, 1.0, 10))]
  tx = optax.chain(*parts)
  return optax.MultiSteps(tx, accum) if accum > 1 else tx


def _state(tx, value=1.0):
  params = {'dense': {'kernel': jnp.full((3, 4), value), 'bias': jnp.zeros(4)}}
  return training.TrainState.create(params, tx, jax.random.PRNGKey(0))


def _save(ckpt, step, state, metrics=None, config=CONFIG):
  ckpt.save(step, state, data_state={'pos': step}, config=config, metrics=metrics)


def _smoke(**overrides):
  c = smoke.get_config()
  c.eval.final_bleu = False
  c.data.train_split = 'train[:200]'
  c.data.spm_max_sentences = 200
  c.model.vocab_size = 200
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


# ----------------------------------------------------------------------------- resume rules


def test_changed_optimizer_is_a_clear_error_and_touches_nothing(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2, keep_best=0, async_save=False)
  _save(ckpt, 4, _state(_tx()))
  ckpt.close()
  before = sorted(os.listdir(tmp_path / 'checkpoints'))
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2, keep_best=0, async_save=False)
  changed = CONFIG.to_dict()
  changed['optimizer']['accum_steps'] = 2
  with pytest.raises(checkpoints.ResumeError,
                     match=r"(?s)step 4 .*state path 'opt_state/.*"
                           r"optimizer\.accum_steps \(None -> 2\).*restore_params_only"):
    ckpt.restore_latest(_state(_tx(accum=2)), config=changed)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == before
  assert not os.path.exists(tmp_path / 'corrupt')
  # clip_norm=0 removes the clipping state: also refused, the config field named.
  changed = CONFIG.to_dict()
  changed['optimizer']['clip_norm'] = 0
  with pytest.raises(checkpoints.ResumeError, match=r'optimizer\.clip_norm \(1\.0 -> 0\)'):
    ckpt.restore_latest(_state(_tx(clip=False, accum=2)), config=changed)
  ckpt.close()


def test_run_saved_before_label_smoothing_moved_resumes_and_loads(tmp_path, caplog):
  old = ml_collections.ConfigDict({'model': {'d': 3}, 'optimizer': {'clip_norm': 1.0,
                                                                    'label_smoothing': 0.1}})
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2, keep_best=0, async_save=False)
  _save(ckpt, 4, _state(_tx(), value=2.0), config=old)
  new = {'model': {'d': 3}, 'optimizer': {'clip_norm': 1.0}, 'loss': {'label_smoothing': 0.1}}
  with caplog.at_level('WARNING'):
    step, state, _, _ = ckpt.restore_latest(_state(_tx()), config=new)
  assert step == 4 and 'changed settings' not in caplog.text, caplog.text
  np.testing.assert_array_equal(state.params['dense']['kernel'], 2.0)
  new['loss']['label_smoothing'] = 0.0  # a real change is named under the new key
  with caplog.at_level('WARNING'):
    ckpt.restore_latest(_state(_tx()), config=new)
  assert 'changed settings: loss.label_smoothing (0.1 -> 0.0)' in caplog.text, caplog.text
  ckpt.close()
  # Inference reads the saved config as it is (only its model/data/eval sections matter).
  config, params, _ = checkpoints.load_run(str(tmp_path))
  assert config.optimizer.label_smoothing == 0.1 and config.model.d == 3
  np.testing.assert_array_equal(params['dense']['kernel'], 2.0)


def test_model_section_compared_by_the_model_it_builds(tmp_path):
  """A config rewritten from a preset lists every field; a run saved before still resumes."""
  from flaxformer_mini.variants import llama
  full = llama.llama_config(vocab_size=64, d_model=16, num_layers=1, num_heads=2,
                            d_ff=32).to_dict()
  spelled_out = {k: v for k, v in full.items() if k not in ('fused_qkv', 'remat', 'head_dim')}
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2, keep_best=0, async_save=False)
  _save(ckpt, 2, _state(_tx()), config=ml_collections.ConfigDict({'model': spelled_out}))
  assert ckpt.restore_latest(_state(_tx()), expect_model=full)[0] == 2
  with pytest.raises(checkpoints.ResumeError, match=r"different model config.*'d_ff': \(32, 48\)"):
    ckpt.restore_latest(_state(_tx()), expect_model=dict(full, d_ff=48))
  ckpt.close()


def test_restore_params_only_keeps_params_step_and_schedule(tmp_path):
  tx = _tx()
  state = _state(tx, value=2.5).replace(step=jnp.asarray(8, jnp.int32))
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2, keep_best=0, async_save=False)
  _save(ckpt, 8, state)
  new_tx = _tx(accum=2)
  step, restored, data, _ = ckpt.restore_latest(_state(new_tx, value=0.0), params_only=True,
                                                tx=new_tx)
  assert step == 8 and data == {'pos': 8} and int(restored.step) == 8
  np.testing.assert_array_equal(restored.params['dense']['kernel'], 2.5)
  assert int(restored.opt_state.gradient_step) == 8  # the schedule goes on, no new warmup
  inner = restored.opt_state.inner_opt_state
  assert int(inner[-1].count) == 8 and int(inner[1].count) == 0  # fresh Adam moments
  np.testing.assert_array_equal(inner[1].mu['dense']['kernel'], 0.0)
  # The step still runs with the new optimizer.
  loss = lambda p, b, r, d: (jnp.sum(p['dense']['kernel'] ** 2), {'weight': jnp.ones(())})
  new, _ = jax.jit(lambda s: training.train_step(s, {}, loss_fn=loss, tx=new_tx))(restored)
  assert int(new.step) == 9
  ckpt.close()


def test_all_unreadable_stops_unless_start_over(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2, keep_best=0, async_save=False)
  for step in (2, 4):
    _save(ckpt, step, _state(_tx()))
  ckpt.close()
  for f in glob.glob(str(tmp_path / 'checkpoints' / '*' / 'state' / 'd' / '*')):
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 2)
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2, keep_best=0, async_save=False)
  with pytest.raises(checkpoints.NoReadableCheckpointError,
                     match=r'(?s)no checkpoint .* is readable \(step 4: .*step 2: .*'
                           r'Nothing was moved.*start_over_if_unreadable'):
    ckpt.restore_latest(_state(_tx()))
  assert ckpt.steps() == [2, 4] and not os.path.exists(tmp_path / 'corrupt')
  assert ckpt.restore_latest(_state(_tx()), start_over=True) is None
  assert ckpt.steps() == [] and len(os.listdir(tmp_path / 'corrupt')) == 2
  ckpt.close()


# ----------------------------------------------------------------------------- retention


def test_keep_best_survives_restarts_and_never_ranks_nan(tmp_path):
  def open_ckpt():
    return checkpoints.Checkpointer(str(tmp_path), keep=1, keep_best=1, async_save=False)
  state = _state(_tx())
  ckpt = open_ckpt()
  _save(ckpt, 1, state, {'dev/nll': 1.0})
  _save(ckpt, 2, state, {'dev/nll': 2.0})
  ckpt.close()
  assert ckpt.steps() == [1, 2]
  ckpt = open_ckpt()  # a restart: the ranking comes from each step's meta item
  _save(ckpt, 3, state)
  _save(ckpt, 4, state, {'dev/nll': float('nan')})
  _save(ckpt, 5, state, {'dev/nll': float('inf')})
  ckpt.close()
  assert ckpt.steps() == [1, 5]
  ckpt = open_ckpt()
  _save(ckpt, 6, state, {'dev/nll': 0.5})
  _save(ckpt, 7, state)
  ckpt.close()
  assert ckpt.steps() == [6, 7]
  with open(tmp_path / 'checkpoints' / '6' / 'meta' / 'metadata') as f:
    assert json.load(f)['metrics'] == {'dev/nll': 0.5}


@pytest.mark.slow
def test_every_evaluation_is_saved_when_keep_best(tmp_path):
  # eval_every=3 is not a multiple of checkpoint_every=4: step 3 must still be saved and ranked.
  workdir = str(tmp_path / 'run')
  config = _smoke(eval_every=3, checkpoint_every=4, num_train_steps=6, keep=3, keep_best=1)
  train.train_and_evaluate(config, workdir)
  ckpt = checkpoints.Checkpointer(workdir, keep=3, keep_best=1, async_save=False)
  assert ckpt.steps() == [3, 4, 6]
  assert np.isfinite(ckpt.metric(3)) and np.isfinite(ckpt.metric(6))
  assert ckpt.metric(4) is None
  ckpt.close()


# ----------------------------------------------------------------------------- divergence


def test_nonfinite_update_is_never_applied():
  tx = _tx()
  state = _state(tx)

  def loss(params, batch, rng, deterministic):
    del rng, deterministic
    return jnp.sum(params['dense']['kernel']) * batch['scale'], {
        'loss': jnp.sum(params['dense']['kernel']) * batch['scale'], 'weight': jnp.ones(())}
  step = jax.jit(lambda s, b: training.train_step(s, b, loss_fn=loss, tx=tx))
  good, m = step(state, {'scale': jnp.float32(1.0)})
  good, m = step(good, {'scale': jnp.float32(1.0)})  # the schedule's first rate is 0
  assert float(m['nonfinite']) == 0.0 and not np.allclose(good.params['dense']['kernel'], 1.0)
  bad, m = step(good, {'scale': jnp.float32(np.nan)})
  assert float(m['nonfinite']) == 1.0 and float(m['loss']) == 0.0 and int(bad.step) == 3
  for a, b in zip(jax.tree_util.tree_leaves((good.params, good.opt_state)),
                  jax.tree_util.tree_leaves((bad.params, bad.opt_state))):
    np.testing.assert_array_equal(a, b)


def test_checkpointer_refuses_a_nonfinite_state(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2, keep_best=0, async_save=False)
  with pytest.raises(ValueError, match=r'refusing to save checkpoint step 3: .*NaN/inf'):
    _save(ckpt, 3, _state(_tx(), value=np.nan))
  assert ckpt.steps() == []
  ckpt.close()


def _poison_after(monkeypatch, good_steps):
  """Makes the task's loss NaN from micro-batch ``good_steps + 1`` on (a host counter)."""
  from flaxformer_mini import tasks
  calls = [0]

  def factor():
    calls[0] += 1
    return np.float32(1.0 if calls[0] <= good_steps else np.nan)
  get_task = tasks.get_task

  def poisoned(config, workdir):
    task = get_task(config, workdir)
    loss_fn = task.loss_and_metrics

    def loss(params, batch, rng, deterministic):
      total, metrics = loss_fn(params, batch, rng, deterministic)
      if deterministic:
        return total, metrics
      f = jax.pure_callback(factor, jax.ShapeDtypeStruct((), jnp.float32))
      return total * f, metrics
    task.loss_and_metrics = loss
    return task
  monkeypatch.setattr(tasks, 'get_task', poisoned)


@pytest.mark.slow
def test_divergence_stops_naming_the_step_and_last_good_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  config = _smoke(checkpoint_every=2, num_train_steps=12)
  _poison_after(monkeypatch, good_steps=5)
  with pytest.raises(train.TrainingDiverged,
                     match=r'step 6: non-finite .*last good checkpoint is .*checkpoints/4 '):
    train.train_and_evaluate(config, workdir)
  ckpt = checkpoints.Checkpointer(workdir, keep=2, keep_best=0, async_save=False)
  assert ckpt.steps() == [2, 4]
  _, params, _ = checkpoints.load_for_inference(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
  ckpt.close()
  # skip: the run finishes, counting the skipped updates; params stay finite.
  config.nonfinite = 'skip'
  config.num_train_steps = 8
  config.checkpoint_every = 8
  monkeypatch.undo()
  _poison_after(monkeypatch, good_steps=5)
  train.train_and_evaluate(config, str(tmp_path / 'skip'))
  with open(tmp_path / 'skip' / 'metrics.jsonl') as f:
    rows = [json.loads(l) for l in f if 'train/skipped_steps' in l]
  assert [r['train/skipped_steps'] for r in rows] == [0] * 5 + [1] * 3
  _, params, _ = checkpoints.load_for_inference(str(tmp_path / 'skip'))
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize('field,value,message', [
    ('checkpoint_every', 0, 'config.checkpoint_every=0 must be an integer >= 1'),
    ('log_every', 0, 'config.log_every=0 must be an integer >= 1'),
    ('num_train_steps', -1, 'config.num_train_steps=-1 must be an integer >= 1'),
    ('eval_every', -5, 'config.eval_every=-5 must be an integer >= 0'),
    ('optimizer.learning_rate', 0.0, r'config.optimizer.learning_rate=0.0 must be a finite'),
    ('optimizer.lr_factor', float('nan'), r'config.optimizer.lr_factor=nan must be a finite'),
    ('optimizer.b2', 1.0, r'config.optimizer.b2=1.0 must be a number in \[0, 1\)'),
    ('loss.label_smoothing', 1.0, r'config.loss.label_smoothing=1.0 must be a number in \[0, 1'),
    ('optimizer.label_smoothing', 0.1,
     r'^config\.optimizer\.label_smoothing has moved to config\.loss\.label_smoothing'),
    ('parallel', 'gpu', "config.parallel='gpu' must be one of"),
    ('nonfinite', 'ignore', "config.nonfinite='ignore' must be one of"),
    ('keep', 0, 'config.keep=0 must be an integer >= 1'),
])
def test_bad_config_fields_are_named_before_anything_is_built(tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(_smoke(**{field: value}), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_empty_workdir_is_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for workdir in ('', '  '):
    with pytest.raises(ValueError, match='--workdir is empty'):
      train.train_and_evaluate(_smoke(), workdir)
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_config_file_missing_or_without_get_config(tmp_path):
  with pytest.raises(SystemExit, match=r"config file not found: '.*nope\.py'"):
    train._check_config_file(['train.py', f'--config={tmp_path}/nope.py'])
  (tmp_path / 'x.py').write_text('x = 1\n')
  with pytest.raises(SystemExit, match=r"x\.py' defines no get_config\(\)"):
    train._check_config_file(['train.py', '--config', str(tmp_path / 'x.py')])
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'),
                         f'--config={tmp_path}/nope.py', f'--workdir={tmp_path}/run'],
                        capture_output=True, text=True, timeout=120, cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith('train.py: error: config file not found')


@pytest.mark.slow
def test_bad_data_row_and_missing_data_file_are_one_line(tmp_path):
  train_tsv, dev_tsv = tmp_path / 'train.tsv', tmp_path / 'dev.tsv'
  train_tsv.write_text('text\tlabel\ngood film\tpos\nbad film\tneg\n', encoding='utf-8')
  dev_tsv.write_text('text\tlabel\nfine\tpos\nso so\tmeh\n', encoding='utf-8')
  base = [sys.executable, os.path.join(REPO, 'train.py'),
          '--config=configs/classify_movie.py:scratch', '--config.num_train_steps=1']
  for extra, message in (
      ([f'--config.data.train_file={train_tsv}', f'--config.data.dev_file={dev_tsv}'],
       f'{dev_tsv} line 3: unknown label "meh"'),
      ([f'--config.data.train_file={tmp_path}/none.tsv', f'--config.data.dev_file={dev_tsv}'],
       'train file not found')):
    proc = subprocess.run([*base, *extra, f'--workdir={tmp_path}/run'], capture_output=True,
                          text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith('train.py: error: ') and message in last, last


@pytest.mark.slow
def test_refused_resume_keeps_config_json(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_smoke(num_train_steps=2, checkpoint_every=2), workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    before = f.read()
  with pytest.raises(checkpoints.ResumeError, match=r"different model config.*'d_ff': \(64, 96\)"):
    train.train_and_evaluate(_smoke(**{'num_train_steps': 4, 'model.d_ff': 96}), workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == before
  assert not os.path.exists(os.path.join(workdir, 'corrupt'))


# ----------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def _tiny_filesystem(path, size='256k'):
  os.makedirs(path)
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path],
                    capture_output=True).returncode:
    pytest.skip('mounting a small tmpfs needs root')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', path], check=False)


@pytest.mark.parametrize('async_save', [False, True])
def test_disk_full_names_the_directory_and_keeps_the_last_good(tmp_path, async_save):
  with _tiny_filesystem(str(tmp_path / 'small')) as run_dir:
    ckpt = checkpoints.Checkpointer(run_dir, keep=3, keep_best=0, async_save=async_save)
    _save(ckpt, 1, _state(_tx()))
    ckpt.wait()
    noise = jax.random.normal(jax.random.PRNGKey(1), (256, 1024))  # incompressible
    big = training.TrainState.create({'w': noise}, _tx(), jax.random.PRNGKey(0))
    def save_and_wait():  # an async save reports the error from wait()
      _save(ckpt, 2, big)
      ckpt.wait()
    with pytest.raises(checkpoints.CheckpointWriteError) as info:
      save_and_wait()
    assert str(info.value).startswith(f'[Errno 28] no space left on {run_dir}/checkpoints: '
                                      'checkpoint step 2' if not async_save else
                                      f'[Errno 28] no space left on {run_dir}/checkpoints')
    assert 'last good checkpoint is' in str(info.value)
    fresh = checkpoints.Checkpointer(run_dir, keep=3, keep_best=0, async_save=False)
    assert fresh.steps() == [1]
    step, state, data, _ = fresh.restore_latest(_state(_tx()))
    assert step == 1 and data == {'pos': 1}
    np.testing.assert_array_equal(state.params['dense']['kernel'], 1.0)
    fresh.close()
    with contextlib.suppress(Exception):
      ckpt.manager.close()
