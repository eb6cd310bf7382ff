"""Mixed precision: float32 master params with bfloat16/float16 compute, dynamic loss scaling
for float16 (a deliberately overflowing run recovers instead of writing NaN), bfloat16
training that tracks float32 on the smoke config, and a T5 trained in bfloat16 without NaN."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import train
from configs import smoke
from flaxformer_mini import training
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.models import Transformer
from flaxformer_mini.variants import t5


def _reference_scales(finite_steps, initial, period, factor):
  """The scale before each step, by the rule written out in plain Python."""
  scale, good, out = initial, 0, []
  for finite in finite_steps:
    out.append(scale)
    if not finite:
      scale, good = max(scale / factor, 1.0), 0
    elif good + 1 >= period:
      scale, good = scale * factor, 0
    else:
      good += 1
  return out


def test_loss_scale_halves_on_overflow_doubles_after_a_period_and_stays_at_least_one():
  pattern = [True] * 5 + [False] * 3 + [True] * 7 + [False] * 12 + [True] * 4
  ls = training.LossScale.create(initial=8.0, period=3, factor=2.0)
  adjust = jax.jit(lambda s, f: s.adjust(f))
  got = []
  for finite in pattern:
    got.append(float(ls.scale))
    ls = adjust(ls, jnp.asarray(finite))
  assert got == _reference_scales(pattern, 8.0, 3, 2.0)
  assert min(got) == 1.0
  with pytest.raises(ValueError, match=r'initial=0\.5'):
    training.LossScale.create(initial=0.5)


def test_make_loss_scale_follows_the_compute_dtype():
  c = ml_collections.ConfigDict({'loss_scale': 'auto', 'model': {'dtype': 'float16'}})
  assert isinstance(training.make_loss_scale(c), training.LossScale)
  c.model.dtype = 'bfloat16'
  assert training.make_loss_scale(c) is None
  c.loss_scale = 'dynamic'
  assert training.make_loss_scale(c) is not None
  c.loss_scale = 'static'
  with pytest.raises(ValueError, match="loss_scale='static'"):
    training.make_loss_scale(c)


TINY = TransformerConfig(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_encoder_layers=1,
                         num_decoder_layers=1, max_len=16, dropout_rate=0.0)


def _tiny_step(dtype, loss_scale=None):
  cfg = TINY.replace(dtype=dtype)
  model = Transformer(cfg)
  rng = np.random.default_rng(0)
  src = jnp.asarray(rng.integers(4, 64, (8, 12)), jnp.int32)
  tgt = jnp.asarray(rng.integers(4, 64, (8, 10)), jnp.int32)
  batch = {'src': src, 'tgt_in': jnp.pad(tgt[:, :-1], ((0, 0), (1, 0)), constant_values=2),
           'tgt': tgt}

  def loss_fn(params, b, rng, deterministic):
    logits = model.apply({'params': params}, b['src'], b['tgt_in'])
    sums = training.cross_entropy_sums(logits, b['tgt'], jnp.ones(b['tgt'].shape))
    return sums['loss'], sums
  params = model.init(jax.random.PRNGKey(0), src, tgt)['params']
  tx = optax.adam(3e-3)
  state = training.TrainState.create(params, tx, jax.random.PRNGKey(1), loss_scale)
  step = jax.jit(lambda s, b: training.train_step(s, b, loss_fn=loss_fn, tx=tx))
  return state, step, batch


def test_overflowing_float16_run_recovers_through_loss_scaling():
  # 2^24 x the loss overflows float16's 65504 in the backward pass for sure.
  state, step, batch = _tiny_step(jnp.float16, training.LossScale.create(initial=2.0 ** 24,
                                                                         period=1000))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
  overflows, losses = [], []
  for _ in range(40):
    state, m = step(state, batch)
    overflows.append(float(m['overflow']))
    assert float(m['nonfinite']) == 0.0
    if not m['overflow']:
      losses.append(float(m['loss']) / float(m['weight']))
  assert overflows[0] == 1.0 and overflows[-1] == 0.0
  n = int(sum(overflows))
  assert overflows[:n] == [1.0] * n  # halving until the gradients fit, then none
  assert float(state.loss_scale.scale) == 2.0 ** 24 / 2 ** n
  for x in jax.tree_util.tree_leaves(state.params):
    assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))
  assert losses[-1] < 0.8 * losses[0]


def test_float16_without_loss_scaling_reports_the_overflow_as_nonfinite():
  state, step, batch = _tiny_step(jnp.float16)
  big = jax.tree_util.tree_map(lambda x: x * 3e4, state.params)  # activations overflow
  state2, m = step(state.replace(params=big), batch)
  assert float(m['nonfinite']) == 1.0 and 'overflow' not in m
  for a, b in zip(jax.tree_util.tree_leaves(state2.params), jax.tree_util.tree_leaves(big)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # update never applied


def _smoke(workdir, dtype, steps=24):
  c = smoke.get_config()
  c.model.dtype = dtype
  c.model.dropout_rate = 0.0
  c.num_train_steps = steps
  c.checkpoint_every = steps
  c.eval_every = 0
  c.eval.final_bleu = False
  c.log_every = 4
  c.data.train_split = 'train[:1000]'
  c.data.spm_max_sentences = 500
  final = train.train_and_evaluate(c, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return final, [r for r in records if 'train/loss' in r]


@pytest.mark.slow
def test_bfloat16_and_float16_training_track_float32_on_the_smoke_config(tmp_path):
  _final_f32, f32 = _smoke(str(tmp_path / 'f32'), 'float32')
  final_bf16, bf16 = _smoke(str(tmp_path / 'bf16'), 'bfloat16')
  final_f16, f16 = _smoke(str(tmp_path / 'f16'), 'float16')
  ref = np.array([r['train/loss'] for r in f32])
  loss = np.array([r['train/loss'] for r in bf16])
  assert np.all(np.isfinite(loss)) and np.isfinite(final_bf16['dev/loss'])
  # Same data, init and steps: each logged mean loss within 3 % of float32's.
  np.testing.assert_allclose(loss, ref, rtol=0.03)
  assert 'train/loss_scale' not in bf16[0]
  # float16 starts at scale 2^15 and skips the first steps that overflow, so its curve runs
  # a few updates behind: no NaN, few skips, and the end within 5 % of float32's.
  skipped = sum(r.get('train/overflow_steps', 0) for r in f16)
  assert 0 < skipped <= 8 and all(r['train/loss_scale'] >= 1 for r in f16)
  assert np.all(np.isfinite([r['train/loss'] for r in f16]))
  np.testing.assert_allclose(f16[-1]['train/loss'], ref[-1], rtol=0.05)
  np.testing.assert_allclose(final_f16['dev/loss'], _final_f32['dev/loss'], rtol=0.05)


@pytest.mark.slow
def test_t5_trains_in_bfloat16_without_nan():
  cfg = t5.t5_config('1.1', vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                     num_encoder_layers=2, max_len=16, dropout_rate=0.0).replace(
                         dtype=jnp.bfloat16)
  model = Transformer(cfg)
  rng = np.random.default_rng(0)
  src = jnp.asarray(rng.integers(2, 64, (8, 12)), jnp.int32)
  tgt = jnp.asarray(rng.integers(2, 64, (8, 10)), jnp.int32)
  tgt_in = jnp.pad(tgt[:, :-1], ((0, 0), (1, 0)))

  def loss_fn(params, b, rng, deterministic):
    logits = model.apply({'params': params}, b[0], b[1])
    assert logits.dtype == jnp.float32
    sums = training.cross_entropy_sums(logits, b[2], jnp.ones(b[2].shape))
    return sums['loss'], sums
  params = model.init(jax.random.PRNGKey(0), src, tgt)['params']
  tx = optax.adafactor(1e-2)
  state = training.TrainState.create(params, tx, jax.random.PRNGKey(1))
  step = jax.jit(lambda s, b: training.train_step(s, b, loss_fn=loss_fn, tx=tx))
  losses = []
  for _ in range(30):
    state, m = step(state, (src, tgt_in, tgt))
    assert float(m['nonfinite']) == 0.0
    losses.append(float(m['loss']) / float(m['weight']))
  assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(state.params))
