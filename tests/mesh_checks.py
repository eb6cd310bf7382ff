"""Mesh training on 4 simulated CPU devices (run by tests/test_sharding.py in a fresh process).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python3 -m pytest -q tests/mesh_checks.py

Every mesh layout must train like one device: the same losses and, after a few Adam
steps, the same params up to float32 reassociation (the sums are split differently
across devices). Dropout is on: with ``jax_threefry_partitionable`` (the default) and
the hash dropout one global key gives the same masks on any mesh.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxformer_mini import checkpoints, models, sharding, training
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.variants import llama

pytestmark = pytest.mark.skipif(
    jax.device_count() < 4, reason='needs XLA_FLAGS=--xla_force_host_platform_device_count=4')

MESHES = {
    'data4': {'data': 4, 'fsdp': 1, 'tensor': 1},
    'fsdp4': {'data': 1, 'fsdp': 4, 'tensor': 1},
    'data2_tensor2': {'data': 2, 'fsdp': 1, 'tensor': 2},
    'fsdp2_tensor2': {'data': 1, 'fsdp': 2, 'tensor': 2},
}
ROWS, LEN, VOCAB, STEPS = 8, 8, 32, 3
# float32 sums split over 4 devices differ in the last bits (losses: relative; params,
# which start near 0: absolute, about 1 % of one step's update).
LOSS_RTOL, PARAM_ATOL = 2e-5, 2e-5


def _config(kind, dropout=0.1):
  if kind == 'lm':
    return llama.llama_config(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=4,
                              num_kv_heads=2, d_ff=32, max_len=16, dropout_rate=dropout)
  return TransformerConfig(vocab_size=VOCAB, d_model=16, num_heads=4, d_ff=32,
                           num_encoder_layers=2, num_decoder_layers=2, max_len=16,
                           dropout_rate=dropout, norm_placement='pre')


def _setup(kind, dropout=0.1):
  cfg = _config(kind, dropout)
  if kind == 'lm':
    model = models.DecoderOnlyLM(cfg)

    def loss_fn(params, batch, rng, deterministic):
      logits = model.apply({'params': params}, batch['inputs'], deterministic=deterministic,
                           rngs={'dropout': rng})
      sums = training.cross_entropy_sums(logits, batch['targets'], batch['targets'] > 0, 0.1)
      return sums['loss'], sums
    init = lambda rng: model.init(rng, jnp.ones((1, LEN), jnp.int32))['params']
  else:
    model = models.Transformer(cfg)

    def loss_fn(params, batch, rng, deterministic):
      logits = model.apply({'params': params}, batch['inputs'], batch['decoder_inputs'],
                           deterministic=deterministic, rngs={'dropout': rng})
      sums = training.cross_entropy_sums(logits, batch['targets'], batch['targets'] > 0, 0.1)
      return sums['loss'], sums
    ones = jnp.ones((1, LEN), jnp.int32)
    init = lambda rng: model.init(rng, ones, ones)['params']
  # eps=1e-3: a gradient that is zero in exact arithmetic (attention key biases) is
  # float noise that differs per layout; Adam with a tiny eps would scale it up to lr.
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-3, eps=1e-3))
  init_state = lambda: training.TrainState.create(init(jax.random.PRNGKey(0)), tx,
                                                  jax.random.PRNGKey(1))
  return loss_fn, tx, init_state


def _batches(seed=0, n=STEPS + 1):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = rng.integers(1, VOCAB, size=(ROWS, LEN + 1)).astype(np.int32)
    ids[rng.random((ROWS, LEN + 1)) < 0.15] = 0  # some padding
    out.append({'inputs': ids[:, :-1], 'decoder_inputs': ids[:, :-1], 'targets': ids[:, 1:]})
  return out


def _train(kind, parallel, mesh=None, *, dropout=0.1, chunks=1, steps=STEPS):
  loss_fn, tx, init_state = _setup(kind, dropout)
  fns = training.make_step_fns(loss_fn, tx, parallel, chunks, mesh_sizes=mesh)
  state = fns.create_state(init_state)
  losses = []
  for batch in _batches()[:steps]:
    state, m = fns.train(state, fns.put_batch(batch))
    losses.append(float(m['loss']) / float(m['weight']))
  return state, losses, fns


@functools.cache
def _reference(kind, dropout=0.1):
  state, losses, fns = _train(kind, 'jit', dropout=dropout)
  return jax.device_get(fns.get_state(state).params), losses


def _assert_same(params, losses, want_params, want_losses):
  np.testing.assert_allclose(losses, want_losses, rtol=LOSS_RTOL)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0],
                          jax.tree_util.tree_leaves(want_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=PARAM_ATOL,
                               err_msg=sharding.path_str(path))


@pytest.mark.parametrize('kind', ['seq2seq', 'lm'])
@pytest.mark.parametrize('layout', sorted(MESHES))
def test_every_mesh_trains_like_one_device(kind, layout):
  state, losses, fns = _train(kind, 'mesh', MESHES[layout])
  assert fns.num_devices == 4
  want_params, want_losses = _reference(kind)
  assert losses[0] > losses[-1] - 1.0  # a real run, not constants
  _assert_same(state.params, losses, want_params, want_losses)


def _leaf(tree, suffix):
  hits = [x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if sharding.path_str(p).endswith(suffix)]
  assert hits, suffix
  return hits


def test_params_and_adam_moments_are_really_sharded():
  state, _, _ = _train('seq2seq', 'mesh', MESHES['fsdp2_tensor2'], steps=1)
  wi = _leaf(state.params, 'encoder/layer_0/ffn/wi/kernel')[0]  # [16, 32]: embed, mlp
  assert tuple(wi.sharding.spec) == ('fsdp', 'tensor')
  assert {s.data.shape for s in wi.addressable_shards} == {(8, 16)}
  q = _leaf(state.params, 'decoder/layer_1/self_attention/query/kernel')[0]  # [16, 4, 4]
  assert tuple(q.sharding.spec) == ('fsdp', 'tensor', None)
  assert {s.data.shape for s in q.addressable_shards} == {(8, 2, 4)}
  emb = _leaf(state.params, 'embedding/embedding')[0]  # [vocab 32, embed 16]
  assert tuple(emb.sharding.spec) == ('tensor', 'fsdp')
  moments = _leaf(state.opt_state, 'encoder/layer_0/ffn/wi/kernel')  # Adam mu and nu
  assert len(moments) == 2
  for m in moments:
    assert m.sharding == wi.sharding
  assert tuple(_leaf(state.params, 'encoder/layer_0/norm_ffn/scale')[0].sharding.spec) == (None,)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state.params))
  assert sharding.per_device_bytes(state.params) < 0.35 * total  # norms/biases replicated


def test_a_dimension_that_does_not_divide_names_parameter_axis_and_sizes():
  # llama: 2 key/value heads cannot be split 4 ways over tensor.
  with pytest.raises(ValueError, match=(
      r"parameter 'decoder/layer_0/self_attention/key/kernel': dimension 1 \(logical axis "
      r"'heads'\) has size 2, which does not divide over mesh axis tensor \(tensor=4")):
    _train('lm', 'mesh', {'data': 1, 'fsdp': 1, 'tensor': 4}, steps=1)


def test_save_on_one_mesh_restore_on_another_and_continue(tmp_path):
  kind, batches = 'seq2seq', _batches()
  loss_fn, tx, init_state = _setup(kind)
  saver = training.make_step_fns(loss_fn, tx, 'mesh', mesh_sizes=MESHES['fsdp2_tensor2'])
  state = saver.create_state(init_state)
  for b in batches[:2]:
    state, _ = saver.train(state, saver.put_batch(b))
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=1, keep_best=0, async_save=False)
  ckpt.save(2, saver.get_state(state), data_state={'pos': 2}, config={'model': {}})
  ckpt.close()
  _, m = saver.train(state, saver.put_batch(batches[2]))
  want = float(m['loss']) / float(m['weight'])
  for layout in ('data4', 'jit'):
    fns = training.make_step_fns(loss_fn, tx, 'jit' if layout == 'jit' else 'mesh',
                                 mesh_sizes=MESHES.get(layout))
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep=1, keep_best=0, async_save=False)
    step, restored, data_state, _ = ckpt.restore_latest(fns.abstract_state(init_state))
    ckpt.close()
    assert step == 2 and data_state == {'pos': 2}
    wi = _leaf(restored.params, 'encoder/layer_0/ffn/wi/kernel')[0]
    assert len(wi.sharding.device_set) == (4 if layout == 'data4' else 1)
    _, m = fns.train(fns.put_state(restored), fns.put_batch(batches[2]))
    np.testing.assert_allclose(float(m['loss']) / float(m['weight']), want, rtol=LOSS_RTOL,
                               err_msg=layout)


def test_pmap_still_matches_the_mesh():
  # pmap folds the device index into the dropout key, so compare without dropout.
  want_params, want_losses = _reference('seq2seq', dropout=0.0)
  state, losses, fns = _train('seq2seq', 'pmap', dropout=0.0)
  assert fns.num_devices == 4
  _assert_same(fns.get_state(state).params, losses, want_params, want_losses)


def test_batch_chunks_on_a_sharded_batch_match_without_moving_rows():
  want_params, want_losses = _reference('seq2seq', dropout=0.0)
  state, losses, fns = _train('seq2seq', 'mesh', MESHES['data4'], dropout=0.0, chunks=2)
  _assert_same(state.params, losses, want_params, want_losses)
  hlo = fns.lower_train(state, fns.put_batch(_batches()[0])).compile().as_text()
  assert 'all-reduce' in hlo  # the gradient sum: the step really is data-parallel
  assert 'collective-permute' not in hlo and 'all-to-all' not in hlo
