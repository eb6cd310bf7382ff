"""Dropout keep-masks: the counter-hash default against statistics, threefry against flax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from flaxformer_mini import TransformerConfig
from flaxformer_mini import dropout as dropout_lib

N = 1 << 20  # mask elements per statistical check


def _sigmas(observed, expected, n, p):
  return abs(observed - expected) / np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_hash_keep_fraction(rate):
  keep = np.asarray(dropout_lib.keep_mask(jax.random.key(3), (16, 256, 256), rate))
  assert keep.dtype == bool and keep.shape == (16, 256, 256)
  assert _sigmas(keep.mean(), 1 - rate, keep.size, rate) < 5


def test_hash_bits_are_uniform_per_bit_position():
  bits = np.asarray(dropout_lib.hash_bits(jax.random.key(0), (N,)))
  per_bit = np.stack([(bits >> b) & 1 for b in range(32)]).mean(axis=1)
  assert max(_sigmas(m, 0.5, N, 0.5) for m in per_bit) < 5, per_bit


@pytest.mark.parametrize("lag", [1, 2, 64, 256, 4096])
def test_hash_mask_has_no_correlation_along_the_flat_index(lag):
  # lags 64/256/4096 are the strides of the other axes of a [16, 16, 64, 64]-like tensor.
  keep = np.asarray(dropout_lib.keep_mask(jax.random.key(1), (N,), 0.5)).astype(np.float64)
  corr = np.corrcoef(keep[:-lag], keep[lag:])[0, 1]
  assert abs(corr) < 5 / np.sqrt(N), corr


def test_hash_masks_from_different_keys_are_independent():
  rate = 0.1
  key = jax.random.key(7)
  a = np.asarray(dropout_lib.keep_mask(jax.random.fold_in(key, 0), (N,), rate))
  b = np.asarray(dropout_lib.keep_mask(jax.random.fold_in(key, 1), (N,), rate))
  # Independent masks agree with probability p^2 + (1-p)^2; equal masks would agree always.
  agree = 1 - (1 - rate) ** 2 - rate ** 2
  assert _sigmas((a != b).mean(), agree, N, agree) < 5
  both_kept = (a & b).mean()
  assert _sigmas(both_kept, (1 - rate) ** 2, N, (1 - rate) ** 2) < 5


def test_hash_mask_is_deterministic_and_jit_invariant():
  key = jax.random.key(11)
  eager = dropout_lib.keep_mask(key, (8, 33, 5), 0.3)
  jitted = jax.jit(lambda k: dropout_lib.keep_mask(k, (8, 33, 5), 0.3))(key)
  np.testing.assert_array_equal(eager, jitted)
  np.testing.assert_array_equal(eager, dropout_lib.keep_mask(key, (8, 33, 5), 0.3))


def test_dropout_scales_kept_values_and_keeps_the_mean():
  x = jnp.asarray(np.random.RandomState(0).uniform(1, 2, size=(N,)), jnp.float32)
  rate = 0.25
  y = np.asarray(dropout_lib.dropout(x, jax.random.key(5), rate))
  kept = y != 0
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
  assert _sigmas(kept.mean(), 1 - rate, N, rate) < 5
  assert abs(y.mean() - float(x.mean())) < 5 * y.std() / np.sqrt(N)
  np.testing.assert_array_equal(dropout_lib.dropout(x, None, rate, deterministic=True), x)
  np.testing.assert_array_equal(dropout_lib.dropout(x, None, 0.0), x)


def test_threefry_impl_equals_flax_dropout_bit_for_bit():
  x = jnp.asarray(np.random.RandomState(1).normal(size=(4, 16, 32)), jnp.float32)
  rngs = {"dropout": jax.random.key(9)}
  ours = dropout_lib.Dropout(0.3, impl="threefry").apply({}, x, deterministic=False, rngs=rngs)
  flax_out = nn.Dropout(0.3).apply({}, x, deterministic=False, rngs=rngs)
  np.testing.assert_array_equal(ours, flax_out)
  hashed = dropout_lib.Dropout(0.3).apply({}, x, deterministic=False, rngs=rngs)
  assert not np.array_equal(hashed, flax_out)  # the default really is the other generator
  np.testing.assert_array_equal(dropout_lib.Dropout(0.3).apply({}, x, deterministic=True), x)


def test_transformer_dropout_impl_switches_the_masks_only():
  from flaxformer_mini import Transformer
  base = dict(vocab_size=40, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
              num_decoder_layers=1, max_len=16, dropout_rate=0.2, attention_dropout_rate=0.2)
  ids = jnp.asarray(np.random.RandomState(2).randint(3, 40, size=(2, 7)), jnp.int32)
  outs = {}
  for impl in dropout_lib.IMPLS:
    model = Transformer(TransformerConfig(**base, dropout_impl=impl))
    params = model.init(jax.random.key(0), ids, ids)["params"]
    outs[impl] = model.apply({"params": params}, ids, ids, deterministic=False,
                             rngs={"dropout": jax.random.key(1)})
    outs[impl + "_det"] = model.apply({"params": params}, ids, ids)
  np.testing.assert_array_equal(outs["hash_det"], outs["threefry_det"])
  assert not np.allclose(outs["hash"], outs["threefry"])
  assert np.all(np.isfinite(outs["hash"]))


def test_bad_dropout_arguments_are_named():
  with pytest.raises(ValueError, match="dropout impl='philox'"):
    dropout_lib.keep_mask(jax.random.key(0), (3,), 0.1, impl="philox")
  with pytest.raises(ValueError, match=r"rate=1\.0"):
    dropout_lib.keep_mask(jax.random.key(0), (3,), 1.0)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    dropout_lib.dropout(jnp.ones(3), None, 0.1)
  with pytest.raises(ValueError, match="dropout_impl='philox'"):
    TransformerConfig(dropout_impl="philox")
