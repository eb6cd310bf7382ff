"""Tests of flaxformer_mini.training / checkpoints / tasks and train.py on configs/smoke.py.

Cheap in-process checks first (loss, schedule, accumulation), then whole smoke runs:
in-process runs share one prepared TFDS dir and one tokenizer; only what must be a
separate process is one (4 simulated devices; a SIGKILLed run; flag parsing).
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxformer_mini import checkpoints, training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402
from configs import smoke  # noqa: E402  (configs/ is not a package on sys.path by default)

# ----------------------------------------------------------------------------- pure parts


def test_label_smoothed_loss_matches_numpy(rng):
  vocab, a = 7, 0.1
  logits = rng.normal(size=(2, 5, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, size=(2, 5))
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  got = training.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets),
                                    jnp.asarray(weights), a)
  x = logits.astype(np.float64)
  logp = x - x.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  soft = np.full(x.shape, a / vocab)
  np.put_along_axis(soft, targets[..., None], 1 - a + a / vocab, axis=-1)
  entropy = -(soft[0, 0] * np.log(soft[0, 0])).sum()
  ce = -(soft * logp).sum(-1)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(got['loss'], ((ce - entropy) * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(got['nll'], (nll * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(got['weight'], weights.sum())
  np.testing.assert_allclose(got['correct'], ((x.argmax(-1) == targets) * weights).sum())
  np.testing.assert_allclose(training.smoothed_entropy(vocab, a), entropy, rtol=1e-12)
  # Gradient wrt the logits: weight * (softmax - smoothed target).
  grad = jax.grad(lambda l: training.cross_entropy_sums(
      l, jnp.asarray(targets), jnp.asarray(weights), a)['loss'])(jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(grad), weights[..., None] * (np.exp(logp) - soft),
                             atol=1e-6)
  # A perfect (one-hot-matching) prediction of the smoothed target has loss ~0.
  perfect = jnp.log(jnp.asarray(soft, jnp.float32))
  zero = training.cross_entropy_sums(perfect, jnp.asarray(targets), jnp.ones((2, 5)), a)
  assert abs(float(zero['loss'])) < 1e-4


def test_rsqrt_schedule_matches_formula():
  d_model, warmup, factor = 256, 50, 2.0
  sched = training.rsqrt_schedule(d_model, warmup, factor)
  for count in (0, 1, 10, 49, 50, 51, 200, 10_000):
    s = count + 1  # optax counts applied updates from 0; the paper counts steps from 1
    want = factor * d_model ** -0.5 * min(s ** -0.5, s * warmup ** -1.5)
    np.testing.assert_allclose(float(sched(count)), want, rtol=1e-6)
  peak = [float(sched(c)) for c in range(200)]
  assert int(np.argmax(peak)) == warmup - 1


def test_rsqrt_scales_by_the_width_passed_and_needs_one():
  config = smoke.get_config()
  config.optimizer.update(schedule='rsqrt', warmup_steps=50, lr_factor=2.0)
  config.model.d_model = 32  # not read: the task states its model's width
  _, sched = training.make_optimizer(config, 256)
  np.testing.assert_allclose(float(sched(0)), 2.0 * 256 ** -0.5 * 50 ** -1.5, rtol=1e-6)
  for width in (None, 0):
    with pytest.raises(ValueError, match=r"^config\.optimizer\.schedule='rsqrt' scales the "
                       rf"learning rate by d_model\^-0\.5, but the model width is d_model={width}"):
      training.make_optimizer(config, width)
  config.optimizer.schedule = 'cosine'  # needs no width
  _, sched = training.make_optimizer(config, None)
  assert float(sched(0)) == 0.0 and float(sched(50)) == pytest.approx(1e-3)


def _toy_loss(params, batch, rng, deterministic):
  del rng, deterministic
  logits = batch['x'] @ params['w'] + params['b']
  sums = training.cross_entropy_sums(logits, batch['y'], batch['mask'], 0.1)
  return sums['loss'], sums


def test_grad_accumulation_equals_big_batch(rng):
  config = smoke.get_config()
  config.optimizer.update(schedule='constant', learning_rate=0.05, weight_decay=0.01)
  params = {'w': rng.normal(size=(6, 5)).astype(np.float32), 'b': np.zeros(5, np.float32)}
  k, rows = 4, 8
  big = {'x': jnp.asarray(rng.normal(size=(k * rows, 3, 6)), jnp.float32),
         'y': jnp.asarray(rng.integers(0, 5, size=(k * rows, 3))),
         'mask': jnp.ones((k * rows, 3))}  # equal tokens per micro-batch: mean of means == mean

  def run(accum, batches):
    config.optimizer.accum_steps = accum
    tx, _ = training.make_optimizer(config, None)
    fns = training.make_step_fns(_toy_loss, tx, 'jit')
    state = training.TrainState.create(jax.tree_util.tree_map(jnp.array, params), tx,
                                       jax.random.PRNGKey(0))  # own copies: steps donate
    for _ in range(2):  # two real updates
      for b in batches:
        state, _ = fns.train(state, b)
    return state.params

  micro = [jax.tree_util.tree_map(lambda x, i=i: x[i * rows:(i + 1) * rows], big)
           for i in range(k)]
  accumulated = run(k, micro)
  single = run(1, [big])
  for a, b in zip(jax.tree_util.tree_leaves(accumulated), jax.tree_util.tree_leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(accumulated['w'], params['w'])


def test_batch_chunks_give_the_unchunked_update(rng):
  config = smoke.get_config()
  config.optimizer.update(schedule='constant', learning_rate=0.05)
  params = {'w': rng.normal(size=(6, 5)).astype(np.float32), 'b': np.zeros(5, np.float32)}
  batch = {'x': jnp.asarray(rng.normal(size=(8, 3, 6)), jnp.float32),
           'y': jnp.asarray(rng.integers(0, 5, size=(8, 3))),
           'mask': jnp.asarray(rng.random((8, 3)) > 0.4, jnp.float32)}  # unequal per chunk
  tx, _ = training.make_optimizer(config, None)

  def run(chunks):
    fns = training.make_step_fns(_toy_loss, tx, 'jit', batch_chunks=chunks)
    state = training.TrainState.create(jax.tree_util.tree_map(jnp.array, params), tx,
                                       jax.random.PRNGKey(0))
    for _ in range(2):
      state, metrics = fns.train(state, batch)
    return state.params, metrics

  want_params, want_metrics = run(1)
  for chunks in (2, 4):
    got_params, got_metrics = run(chunks)
    for a, b in zip(jax.tree_util.tree_leaves(got_params), jax.tree_util.tree_leaves(want_params)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for k in want_metrics:
      np.testing.assert_allclose(got_metrics[k], want_metrics[k], rtol=1e-5, err_msg=k)
  assert not np.allclose(want_params['w'], params['w'])


def test_chunked_loss_keys_and_errors():
  def loss_fn(params, batch, rng, deterministic):  # records the key and rows it saw
    u = jax.random.uniform(rng, ())
    return jnp.sum(batch['x']) * u, {'u': u, 'rows': jnp.asarray(batch['x'].shape[0], jnp.float32)}

  key = jax.random.PRNGKey(3)
  x = {'x': jnp.ones((6, 2))}
  _, one = training.chunked_loss(loss_fn, None, x, key, 1)
  assert float(one['u']) == float(jax.random.uniform(key, ())) and float(one['rows']) == 6
  _, three = training.chunked_loss(loss_fn, None, x, key, 3)
  want = sum(float(jax.random.uniform(jax.random.fold_in(key, i), ())) for i in range(3))
  np.testing.assert_allclose(float(three['u']), want, rtol=1e-6)
  assert float(three['rows']) == 6
  with pytest.raises(ValueError, match=r'batch_chunks=4 must divide the rows .* \[6\]'):
    training.chunked_loss(loss_fn, None, x, key, 4)
  with pytest.raises(ValueError, match='batch_chunks=0'):
    training.make_step_fns(loss_fn, optax.sgd(0.1), 'jit', batch_chunks=0)


def test_weight_decay_mask_skips_embeddings_biases_and_norms():
  params = {'embedding': {'embedding': jnp.ones((4, 3))},
            'layer_0': {'dense': {'kernel': jnp.ones((3, 3)), 'bias': jnp.ones(3)},
                        'query': {'kernel': jnp.ones((3, 2, 4)), 'bias': jnp.ones((2, 4))},
                        'norm': {'scale': jnp.ones(3)}}}
  mask = training.decay_mask(params)
  assert mask == {'embedding': {'embedding': False},
                  'layer_0': {'dense': {'kernel': True, 'bias': False},
                              'query': {'kernel': True, 'bias': False},
                              'norm': {'scale': False}}}


def _bert_like_tree(rng):
  """Leaves named as a BERT classifier's: embeddings, layer_0/1, pooler, classifier."""
  leaf = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return {'bert': {'embeddings': {'word_embeddings': {'embedding': leaf(9, 4)},
                                  'norm': {'scale': leaf(4)}},
                   'layer_0': {'ffn': {'kernel': leaf(4, 4), 'bias': leaf(4)}},
                   'layer_1': {'ffn': {'kernel': leaf(4, 4), 'bias': leaf(4)}},
                   'pooler': {'kernel': leaf(4, 4)}},
          'classifier': {'kernel': leaf(4, 3), 'bias': leaf(3)}}


def test_layer_depths_follow_the_layer_names(rng):
  depths = training.layer_depths(_bert_like_tree(rng))
  assert depths == {'bert': {'embeddings': {'word_embeddings': {'embedding': 3},
                                            'norm': {'scale': 3}},
                             'layer_0': {'ffn': {'kernel': 2, 'bias': 2}},
                             'layer_1': {'ffn': {'kernel': 1, 'bias': 1}},
                             'pooler': {'kernel': 0}},
                    'classifier': {'kernel': 0, 'bias': 0}}
  # ViT: patch_embedding and cls_token sit below the layers; 12 layers, the last is 1
  vit = {'patch_embedding': {'kernel': 0}, 'cls_token': 0, 'layer_11': {'w': 0},
         'layer_0': {'w': 0}, 'head': {'kernel': 0}}
  assert training.layer_depths(vit) == {'patch_embedding': {'kernel': 13}, 'cls_token': 13,
                                        'layer_11': {'w': 1}, 'layer_0': {'w': 12},
                                        'head': {'kernel': 0}}
  with pytest.raises(ValueError, match=r"no parameter path has a layer_<i> part \(top-level "
                     r"names: \['decoder', 'encoder'\]\)"):
    training.layer_depths({'encoder': {'layers': {'kernel': 0}}, 'decoder': {'w': 0}})


def _one_adam_update(config, params, grads):
  tx, _ = training.make_optimizer(config, None)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_layer_decay_scales_each_group_of_a_one_step_adamw(rng):
  config = smoke.get_config()
  lr, wd, eps, decay = 0.01, 0.1, 1e-9, 0.5
  config.optimizer.update(schedule='constant', learning_rate=lr, clip_norm=0.0,
                          weight_decay=wd, eps=eps, layer_decay=decay)
  params = _bert_like_tree(rng)
  grads = jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  got = _one_adam_update(config, params, grads)
  # NumPy float64: Adam's bias-corrected first step is g / (|g| + eps); decoupled weight
  # decay on matrices (not embeddings, biases, scales); all times lr and the group's factor.
  factor = {'embeddings': decay ** 3, 'layer_0': decay ** 2, 'layer_1': decay ** 1,
            'pooler': 1.0, 'classifier': 1.0}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    names = [k.key for k in path]
    p, u = params, got
    for n in names:
      p, u = p[n], u[n]
    g64 = g.astype(np.float64)
    adam = g64 / (np.abs(g64) + eps)
    if names[-1] == 'kernel':
      adam = adam + wd * p.astype(np.float64)
    group = names[1] if names[0] == 'bert' else names[0]
    np.testing.assert_allclose(u, -lr * factor[group] * adam, rtol=1e-5, atol=1e-9,
                               err_msg=str(names))


def test_layer_decay_off_is_the_unchanged_optimizer(rng):
  params = _bert_like_tree(rng)
  grads = jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  config = smoke.get_config()
  config.optimizer.update(schedule='constant', learning_rate=0.01, weight_decay=0.1)
  assert config.optimizer.layer_decay == 1.0
  without = smoke.get_config()
  without.optimizer.update(schedule='constant', learning_rate=0.01, weight_decay=0.1)
  del without.optimizer['layer_decay']  # a config from before the field existed
  tx, _ = training.make_optimizer(config, None)
  tx_without, _ = training.make_optimizer(without, None)
  assert (jax.tree_util.tree_structure(tx.init(params))
          == jax.tree_util.tree_structure(tx_without.init(params)))  # checkpoints still fit
  for a, b in zip(jax.tree_util.tree_leaves(_one_adam_update(config, params, grads)),
                  jax.tree_util.tree_leaves(_one_adam_update(without, params, grads))):
    np.testing.assert_array_equal(a, b)


def test_layer_decay_errors_name_the_config_key():
  config = smoke.get_config()
  for bad in (0.0, 1.5, float('nan')):
    config.optimizer.layer_decay = bad
    with pytest.raises(ValueError, match=rf'config.optimizer.layer_decay={bad} must be a number '
                       r'in \(0, 1\]'):
      training.validate_config(config)
  config.optimizer.layer_decay = 0.9
  tx, _ = training.make_optimizer(config, config.model.d_model)
  with pytest.raises(ValueError, match=r'^config.optimizer.layer_decay=0.9: no parameter path '
                     r'has a layer_<i> part'):
    tx.init({'w': jnp.ones((2, 2))})


# ----------------------------------------------------------------------------- smoke runs


def _smoke_config(**overrides):
  c = smoke.get_config()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]


def _final_params(workdir):
  _, params, _ = checkpoints.load_for_inference(workdir)
  return params


def _subprocess(workdir, overrides, env=None):
  return subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'train.py'), f'--config={REPO}/configs/smoke.py',
       f'--workdir={workdir}', *[f'--config.{k}={v}' for k, v in overrides.items()]],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu', **(env or {})),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_after_first_checkpoint(proc, workdir):
  """Polls (in a thread) for the first finished checkpoint dir, then SIGKILLs ``proc``."""
  first = os.path.join(workdir, 'checkpoints', str(smoke.get_config().checkpoint_every))

  def poll():
    deadline = time.time() + 300
    while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.005)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
  thread = threading.Thread(target=poll, daemon=True)
  thread.start()
  return thread


NO_DROPOUT = {'model.dropout_rate': 0.0, 'eval.final_bleu': False}
NO_BLEU = {'eval.final_bleu': False}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """All smoke runs of this module, overlapped to fit the time budget.

  Two subprocesses start first and run while this process trains in-process:
    four:    parallel=pmap on 4 simulated CPU devices (XLA_FLAGS must precede jax init),
             dropout off, each device's rows in 2 chunks (batch_chunks=2);
    killed:  smoke defaults (dropout on), SIGKILLed once its first checkpoint exists,
             then resumed in-process to the end.
  In-process: reference (smoke defaults, uninterrupted, with final BLEU) and one
  (dropout off, jit on one device). Every run trains its own tokenizer (SentencePiece
  with one thread is deterministic; checked below) and shares one prepared TFDS dir.
  """
  from flaxformer_mini import data
  root = tmp_path_factory.mktemp('runs')
  tfds_dir = str(root / 'tfds')
  data.prepare_tsv_builder(data.embedded_paths(), other_lang='pt', data_dir=tfds_dir)
  dirs = {name: str(root / name) for name in ('four', 'killed', 'reference', 'one')}
  common = {'data.tfds_dir': tfds_dir}
  four = _subprocess(dirs['four'], {**common, **NO_DROPOUT, 'parallel': 'pmap', 'batch_chunks': 2},
                     env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  killed = _subprocess(dirs['killed'], {**common, **NO_BLEU})
  killer = _kill_after_first_checkpoint(killed, dirs['killed'])
  try:
    out = {'reference': train.train_and_evaluate(_smoke_config(**common), dirs['reference']),
           'one': train.train_and_evaluate(_smoke_config(**common, **NO_DROPOUT), dirs['one'])}
    killer.join()
    out['killed_output'] = killed.communicate()[0]
    out['killed_returncode'] = killed.returncode
    out['steps_after_kill'] = sorted(int(s) for s in os.listdir(
        os.path.join(dirs['killed'], 'checkpoints')) if s.isdigit())
    out['resumed'] = train.train_and_evaluate(_smoke_config(**common, **NO_BLEU),
                                              dirs['killed'])
    out['four_output'] = four.communicate(timeout=300)[0]
    out['four_returncode'] = four.returncode
  finally:
    for p in (four, killed):
      if p.poll() is None:
        p.kill()
  return dirs, out


@pytest.mark.slow
def test_loss_goes_down_and_outputs_exist(runs):
  dirs, out = runs
  workdir, final = dirs['reference'], out['reference']
  train_losses = [m['train/loss'] for m in _metrics(workdir) if 'train/loss' in m]
  assert len(train_losses) == smoke.get_config().num_train_steps
  assert np.mean(train_losses[-4:]) < 0.8 * np.mean(train_losses[:2])
  assert 'dev/bleu' in final and 0 <= final['dev/bleu'] <= 100
  assert final['dev/nll'] < np.log(smoke.get_config().model.vocab_size)
  # train.py gave make_optimizer the task's model width: the paper's rsqrt rate of d_model 32.
  c = smoke.get_config()
  for m in _metrics(workdir):
    if 'learning_rate' in m:
      s = m['step']
      want = c.optimizer.lr_factor * c.model.d_model ** -0.5 * min(
          s ** -0.5, s * c.optimizer.warmup_steps ** -1.5)
      np.testing.assert_allclose(m['learning_rate'], want, rtol=1e-6, err_msg=str(s))
  assert glob.glob(os.path.join(workdir, 'tb', 'events.out.tfevents.*'))
  config, params, tokenizer = checkpoints.load_for_inference(workdir)
  assert config.model.d_model == smoke.get_config().model.d_model
  assert tokenizer.vocab_size == config.model.vocab_size
  assert 'decoder' in params and 'encoder' in params


@pytest.mark.slow
def test_tokenizer_training_is_deterministic(runs):
  # The .model files differ in trainer metadata (model_prefix is the run dir); the
  # pieces, which the resume test relies on, must not.
  from flaxformer_mini import data
  dirs, _ = runs
  pieces = {}
  for name, d in dirs.items():
    tok = data.load_tokenizer(d)
    pieces[name] = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
  assert all(p == pieces['reference'] for p in pieces.values())


@pytest.mark.slow
def test_one_vs_four_devices_same_loss_curve(runs):
  dirs, out = runs
  assert out['four_returncode'] == 0, out['four_output'][-3000:]
  assert 'devices=4 (pmap 4 replicas' in out['four_output']
  a = [m for m in _metrics(dirs['one']) if 'train/loss' in m]
  b = [m for m in _metrics(dirs['four']) if 'train/loss' in m]
  assert [m['step'] for m in a] == [m['step'] for m in b]
  for key in ('train/loss', 'train/nll', 'train/tokens', 'train/accuracy'):
    np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=2e-5, atol=1e-5,
                               err_msg=key)
  # Parameters agree up to float reassociation, which Adam amplifies where the gradient
  # is ~0. Attention *key* biases have an exactly-zero gradient (softmax is invariant to
  # q.b_k, constant over keys), so they are float noise that Adam scales up: skip them.
  one, four = _final_params(dirs['one']), _final_params(dirs['four'])
  flat_four = dict(jax.tree_util.tree_flatten_with_path(four)[0])
  for path, x in jax.tree_util.tree_flatten_with_path(one)[0]:
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name:
      continue
    np.testing.assert_allclose(x, flat_four[path], atol=3e-3, err_msg=name)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(runs):
  dirs, out = runs
  total = smoke.get_config().num_train_steps
  assert out['killed_returncode'] == -signal.SIGKILL, (
      f"the run was not killed mid-training:\n{out['killed_output'][-2000:]}")
  assert out['steps_after_kill'] and out['steps_after_kill'][-1] < total, out['steps_after_kill']
  resumed, reference = _final_params(dirs['killed']), _final_params(dirs['reference'])
  for x, y in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(reference)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
  a = [m['train/loss'] for m in _metrics(dirs['killed']) if 'train/loss' in m]
  b = [m['train/loss'] for m in _metrics(dirs['reference']) if 'train/loss' in m]
  assert len(a) == total
  np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(runs, tmp_path, caplog):
  reference = runs[0]['reference']
  workdir = str(tmp_path / 'corrupt')
  shutil.copytree(os.path.join(reference, 'checkpoints'),
                  os.path.join(workdir, 'checkpoints'))
  ckpt = checkpoints.Checkpointer(workdir, keep=2, keep_best=1, async_save=False)
  steps = ckpt.steps()
  assert len(steps) >= 2, steps
  latest = steps[-1]
  data_files = glob.glob(os.path.join(workdir, 'checkpoints', str(latest), 'state', 'd', '*'))
  assert data_files
  for f in data_files:
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 2)
  c = smoke.get_config()
  tx, _ = training.make_optimizer(c, c.model.d_model)
  target = training.TrainState.create(_final_params(reference), tx, jax.random.PRNGKey(0))
  with caplog.at_level('WARNING'):
    step, state, data_state, meta = ckpt.restore_latest(target)
  assert step == steps[-2] and meta['step'] == steps[-2] and data_state
  assert int(state.step) == steps[-2] * c.optimizer.accum_steps
  assert f'checkpoint step {latest}' in caplog.text and 'unreadable' in caplog.text
  assert os.listdir(os.path.join(workdir, 'corrupt'))
  assert ckpt.steps() == steps[:-1]
  ckpt.close()


@pytest.mark.slow
def test_load_for_inference_errors_name_what_is_missing(runs, tmp_path):
  reference = runs[0]['reference']
  with pytest.raises(FileNotFoundError, match='run directory not found'):
    checkpoints.load_for_inference(str(tmp_path / 'nope'))
  with pytest.raises(FileNotFoundError, match=r'missing .*checkpoints'):
    checkpoints.load_for_inference(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'step 999 not found.*available steps: \['):
    checkpoints.load_for_inference(reference, step=999)
  copy = str(tmp_path / 'no_spm')
  shutil.copytree(os.path.join(reference, 'checkpoints'),
                  os.path.join(copy, 'checkpoints'))
  with pytest.raises(FileNotFoundError, match=r'tokenizer file missing.*spm\.model'):
    checkpoints.load_for_inference(copy)


def test_batch_chunks_must_divide_the_batch(tmp_path):
  with pytest.raises(ValueError, match=r'batch_chunks=3 must be >= 1 and divide batch_size=16'):
    train.train_and_evaluate(_smoke_config(batch_chunks=3), str(tmp_path))
  assert not os.listdir(tmp_path)  # refused before writing anything


@pytest.mark.slow
def test_unknown_config_key_is_a_clear_error(tmp_path):
  proc = _subprocess(str(tmp_path), {'optimizer.warmup_step': 3})
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert "unknown config field 'warmup_step' in --config.optimizer.warmup_step" in out, out[-2000:]
