"""Tests for flaxformer_mini.attention.

* `dot_product_attention` against a float64 NumPy reference (GQA, q_len != kv_len,
  padding / causal masks, bias), fully-masked rows, bf16, returned weights, dropout.
* The mask builders against boolean arrays written out by hand; the model-level masks
  (encoder, decoder, cross; padded and packed) against a NumPy loop over pairs.
* `MultiHeadAttention` against `flax.linen.MultiHeadDotProductAttention` with the
  same weights; fused q/k/v == unfused; the key/value cache == full causal attention;
  weights sown into `intermediates` only when that collection is mutable.
* Error messages that name the expected and the actual value.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from flaxformer_mini import attention

T, F = True, False

# Each call site runs one compiled program instead of dozens of eagerly dispatched
# primitives (much cheaper on the shared CPUs); the math is the library's.
dpa = jax.jit(attention.dot_product_attention,
              static_argnames=("scale", "dropout_rate", "deterministic", "return_weights"))


# ---------------------------------------------------------------------------
# float64 NumPy reference.
# ---------------------------------------------------------------------------


def np_attention(q, k, v, mask=None, bias=None):
  """softmax(q·kᵀ/sqrt(d) + bias) · v in float64; fully-masked rows -> 0.

  q: [b, q_len, heads, d]; k, v: [b, kv_len, kv_heads, d]. Query head i reads
  key/value head i // (heads // kv_heads).
  Returns (out [b, q_len, heads, d], weights [b, heads, q_len, kv_len]).
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k = np.repeat(k, groups, axis=2)
  v = np.repeat(v, groups, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  allowed = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(
      np.asarray(mask, bool), logits.shape)
  row_max = np.where(allowed, logits, -np.inf).max(-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  e = np.where(allowed, np.exp(logits - row_max), 0.0)
  total = e.sum(-1, keepdims=True)
  weights = np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)
  return np.einsum("bhqk,bkhd->bqhd", weights, v), weights


def _qkv(rng, b, q_len, kv_len, heads, kv_heads, d):
  q = rng.standard_normal((b, q_len, heads, d)).astype(np.float32)
  k = rng.standard_normal((b, kv_len, kv_heads, d)).astype(np.float32)
  v = rng.standard_normal((b, kv_len, kv_heads, d)).astype(np.float32)
  return q, k, v


def _valid(lengths, total):
  return np.arange(total)[None, :] < np.asarray(lengths)[:, None]


# (b, q_len, kv_len, heads, kv_heads, d, mask kind, with bias)
CASES = [
    (2, 5, 5, 4, 4, 8, None, False),
    (2, 3, 7, 4, 2, 8, "padding", True),        # cross-attention shape, GQA
    (2, 6, 6, 6, 1, 4, "causal+padding", True),  # multi-query attention
    (3, 4, 9, 2, 2, 8, "padding-keys", False),  # mask broadcast over heads
]


def _mask_for(kind, b, q_len, kv_len, rng):
  if kind is None:
    return None
  kv_lengths = rng.integers(1, kv_len + 1, size=b)
  key_valid = _valid(kv_lengths, kv_len)
  if kind == "padding":
    q_valid = _valid(rng.integers(1, q_len + 1, size=b), q_len)
    return np.asarray(attention.padding_mask(jnp.asarray(q_valid), jnp.asarray(key_valid)))
  if kind == "padding-keys":
    return np.asarray(attention.padding_mask(jnp.ones((b, q_len), bool), jnp.asarray(key_valid)))
  if kind == "causal+padding":
    valid = _valid(rng.integers(1, q_len + 1, size=b), q_len)
    return np.asarray(attention.combine_masks(attention.causal_mask(q_len),
                                              attention.padding_mask(jnp.asarray(valid))))
  raise ValueError(kind)


@pytest.mark.parametrize("b,q_len,kv_len,heads,kv_heads,d,mask_kind,with_bias", CASES)
def test_dot_product_attention_matches_numpy(rng, b, q_len, kv_len, heads, kv_heads, d,
                                             mask_kind, with_bias):
  q, k, v = _qkv(rng, b, q_len, kv_len, heads, kv_heads, d)
  mask = _mask_for(mask_kind, b, q_len, kv_len, rng)
  bias = rng.standard_normal((1, heads, q_len, kv_len)).astype(np.float32) if with_bias else None
  out, weights = dpa(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
      None if mask is None else jnp.asarray(mask),
      None if bias is None else jnp.asarray(bias), return_weights=True)
  ref_out, ref_weights = np_attention(q, k, v, mask, bias)
  # float32 compute of O(1) values vs float64: 1e-5 absolute.
  np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(weights), ref_weights, atol=1e-6, rtol=0)
  assert out.dtype == jnp.float32 and weights.shape == (b, heads, q_len, kv_len)


def test_custom_scale_matches_numpy(rng):
  q, k, v = _qkv(rng, 1, 3, 4, 2, 2, 8)
  out = dpa(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=1.0)
  # scale=1.0 == the reference's 1/sqrt(d) applied to q * sqrt(d).
  ref, _ = np_attention(q * np.sqrt(8.0), k, v)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_fully_masked_rows_are_zero_not_nan(rng):
  q, k, v = _qkv(rng, 2, 4, 5, 2, 2, 4)
  q_valid = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  k_valid = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], bool)  # row 1 has no real key
  mask = attention.padding_mask(jnp.asarray(q_valid), jnp.asarray(k_valid))
  out, weights = dpa(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                                 mask, return_weights=True)
  out, weights = np.asarray(out), np.asarray(weights)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(weights))
  np.testing.assert_array_equal(out[0, 2:], 0.0)
  np.testing.assert_array_equal(out[1], 0.0)
  np.testing.assert_array_equal(weights[1], 0.0)
  # The rows that do have keys are unaffected: equal to the reference.
  ref, _ = np_attention(q, k, v, np.asarray(mask))
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_weights_sum_to_one_on_unmasked_rows(rng):
  q, k, v = _qkv(rng, 2, 6, 6, 4, 2, 4)
  valid = _valid([6, 3], 6)
  mask = attention.combine_masks(attention.causal_mask(6),
                                 attention.padding_mask(jnp.asarray(valid)))
  bias = jnp.asarray(rng.standard_normal((2, 4, 6, 6)).astype(np.float32)) * 3.0
  _, weights = dpa(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                               mask, bias, return_weights=True)
  weights, mask = np.asarray(weights), np.broadcast_to(np.asarray(mask), weights.shape)
  sums = weights.sum(-1)
  has_key = mask.any(-1)
  np.testing.assert_allclose(sums[has_key], 1.0, atol=1e-6)
  np.testing.assert_array_equal(sums[~has_key], 0.0)
  np.testing.assert_array_equal(weights[~mask], 0.0)  # masked keys get exactly zero weight


def test_bfloat16_stays_finite_and_close_to_float32(rng):
  q, k, v = _qkv(rng, 2, 5, 7, 4, 2, 8)
  mask = attention.padding_mask(jnp.ones((2, 5), bool), jnp.asarray(_valid([7, 4], 7)))
  out32 = dpa(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  out16 = dpa(bf(q), bf(k), bf(v), mask)
  assert out16.dtype == jnp.bfloat16
  out16 = np.asarray(out16.astype(jnp.float32))
  assert np.all(np.isfinite(out16))
  # bf16 keeps 8 mantissa bits (eps 2^-8 ~ 0.004) on O(1) values: 3e-2 absolute.
  np.testing.assert_allclose(out16, np.asarray(out32), atol=3e-2, rtol=0)


# ---------------------------------------------------------------------------
# Dropout on the attention weights.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dropout_inputs():
  r = np.random.default_rng(1)
  q, k, v = _qkv(r, 2, 32, 32, 2, 2, 4)
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def test_dropout_ignored_when_deterministic(dropout_inputs):
  q, k, v = dropout_inputs
  plain = dpa(q, k, v)
  kept = dpa(q, k, v, dropout_rate=0.5,
                                         dropout_rng=jax.random.key(0), deterministic=True)
  np.testing.assert_array_equal(np.asarray(kept), np.asarray(plain))


def test_dropout_zeroes_at_rate_and_rescales(dropout_inputs):
  q, k, v = dropout_inputs
  rate = 0.3
  _, w_plain = dpa(q, k, v, return_weights=True)
  _, w_drop = dpa(q, k, v, dropout_rate=rate,
                                              dropout_rng=jax.random.key(0),
                                              deterministic=False, return_weights=True)
  w_plain, w_drop = np.asarray(w_plain), np.asarray(w_drop)
  dropped = w_drop == 0.0
  # 4096 weights, Bernoulli(0.3): std of the fraction ~ 0.007; allow 0.03 (> 4 sigma).
  assert abs(dropped.mean() - rate) < 0.03
  np.testing.assert_allclose(w_drop[~dropped], w_plain[~dropped] / (1.0 - rate), rtol=1e-6)
  _, w_other = dpa(q, k, v, dropout_rate=rate,
                                               dropout_rng=jax.random.key(1),
                                               deterministic=False, return_weights=True)
  assert not np.array_equal(np.asarray(w_other) == 0.0, dropped)  # the key drives the mask
  with pytest.raises(ValueError, match="dropout_rng"):
    dpa(q, k, v, dropout_rate=rate, deterministic=False)


# ---------------------------------------------------------------------------
# Mask builders: exact arrays, written out by hand.
# ---------------------------------------------------------------------------


def test_padding_mask_exact():
  got = attention.padding_mask(jnp.array([[1, 1, 0]]), jnp.array([[1, 0, 1, 1]]))
  expected = np.array([[[[T, F, T, T],
                         [T, F, T, T],
                         [F, F, F, F]]]])
  assert got.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(got), expected)
  got_self = attention.padding_mask(jnp.array([[True, True, False], [True, False, False]]))
  expected_self = np.array([[[[T, T, F], [T, T, F], [F, F, F]]],
                            [[[T, F, F], [F, F, F], [F, F, F]]]])
  np.testing.assert_array_equal(np.asarray(got_self), expected_self)


def test_causal_mask_exact():
  np.testing.assert_array_equal(np.asarray(attention.causal_mask(3)),
                                np.array([[[[T, F, F],
                                            [T, T, F],
                                            [T, T, T]]]]))
  np.testing.assert_array_equal(np.asarray(attention.causal_mask(2, 4)),
                                np.array([[[[T, F, F, F],
                                            [T, T, F, F]]]]))


def test_segment_mask_exact():
  got = attention.segment_mask(jnp.array([[1, 1, 2, 0]]))
  expected = np.array([[[[T, T, F, F],
                         [T, T, F, F],
                         [F, F, T, F],
                         [F, F, F, F]]]])
  np.testing.assert_array_equal(np.asarray(got), expected)
  got_cross = attention.segment_mask(jnp.array([[1, 2, 0]]), jnp.array([[1, 1, 2, 2, 0]]))
  expected_cross = np.array([[[[T, T, F, F, F],
                               [F, F, T, T, F],
                               [F, F, F, F, F]]]])
  np.testing.assert_array_equal(np.asarray(got_cross), expected_cross)


def test_combine_masks_exact():
  got = attention.combine_masks(attention.causal_mask(3), None,
                                attention.padding_mask(jnp.array([[1, 1, 0]])))
  expected = np.array([[[[T, F, F],
                         [T, T, F],
                         [F, F, F]]]])
  assert got.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(got), expected)
  assert attention.combine_masks(None, None) is None
  only = attention.combine_masks(None, jnp.array([[[[1, 0]]]]))
  np.testing.assert_array_equal(np.asarray(only), np.array([[[[T, F]]]]))


# ---------------------------------------------------------------------------
# The model-level mask builders against a NumPy loop over (query, key) pairs.
# ---------------------------------------------------------------------------


def np_model_masks(tgt_valid, src_valid, tgt_seg=None, src_seg=None):
  """(encoder self, decoder self, cross) masks, [batch, 1, q, k], one pair at a time.

  Rules: a pair is allowed when both tokens are real (segment > 0 when packed), in the
  same segment when both sides are packed, and (decoder self) key <= query.
  """
  b, t = tgt_valid.shape
  s = src_valid.shape[1]
  tgt_real = tgt_valid if tgt_seg is None else tgt_seg > 0
  src_real = src_valid if src_seg is None else src_seg > 0
  enc = np.zeros((b, 1, s, s), bool)
  dec = np.zeros((b, 1, t, t), bool)
  cross = np.zeros((b, 1, t, s), bool)
  for r in range(b):
    for i in range(s):
      for j in range(s):
        same = src_seg is None or src_seg[r, i] == src_seg[r, j]
        enc[r, 0, i, j] = src_real[r, i] and src_real[r, j] and same
    for i in range(t):
      for j in range(t):
        same = tgt_seg is None or tgt_seg[r, i] == tgt_seg[r, j]
        dec[r, 0, i, j] = tgt_real[r, i] and tgt_real[r, j] and same and j <= i
      for j in range(s):
        same = tgt_seg is None or src_seg is None or tgt_seg[r, i] == src_seg[r, j]
        cross[r, 0, i, j] = tgt_real[r, i] and src_real[r, j] and same
  return enc, dec, cross


@pytest.mark.parametrize("packed", ["none", "both", "targets"])
def test_model_masks_match_numpy(packed):
  tgt_valid = _valid([5, 3, 1], 5)
  src_valid = _valid([6, 2, 4], 6)
  tgt_seg = src_seg = None
  if packed in ("both", "targets"):  # row 0: three examples; row 1: two; row 2: padding only
    tgt_seg = np.array([[1, 1, 2, 3, 3], [1, 2, 2, 2, 0], [0, 0, 0, 0, 0]])
  if packed == "both":
    src_seg = np.array([[1, 2, 2, 3, 3, 0], [1, 1, 2, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
  enc, dec, cross = np_model_masks(tgt_valid, src_valid, tgt_seg, src_seg)
  j = lambda a: None if a is None else jnp.asarray(a)
  got_enc = attention.encoder_self_attention_mask(j(src_valid), j(src_seg))
  got_dec = attention.decoder_self_attention_mask(j(tgt_valid), j(tgt_seg))
  got_cross = attention.cross_attention_mask(j(tgt_valid), j(src_valid),
                                             decoder_segmentation=j(tgt_seg),
                                             encoder_segmentation=j(src_seg))
  for name, got, want in [("encoder", got_enc, enc), ("decoder", got_dec, dec),
                          ("cross", got_cross, cross)]:
    assert got.dtype == jnp.bool_ and got.shape == want.shape, (name, got.shape)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)


def test_cross_attention_mask_for_a_decode_step_reads_every_real_source_token():
  src_valid = jnp.asarray(_valid([3, 1], 4))
  got = attention.cross_attention_mask(None, src_valid)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(src_valid)[:, None, None, :])
  with pytest.raises(ValueError, match="needs valid"):
    attention.decoder_self_attention_mask(None, None)


# ---------------------------------------------------------------------------
# MultiHeadAttention.
# ---------------------------------------------------------------------------

D_MODEL, HEADS = 16, 4


@pytest.fixture(scope="module")
def mha_data():
  r = np.random.default_rng(2)
  x = jnp.asarray(r.standard_normal((2, 5, D_MODEL)).astype(np.float32))
  memory = jnp.asarray(r.standard_normal((2, 6, 12)).astype(np.float32))  # d_kv != d_model
  return x, memory


def _randomize(params, seed):
  """Fresh N(0, 0.3^2) values for every leaf of a param tree (or of its shapes).

  No parameter stays trivial (flax initialises biases to zero).
  """
  r = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda l: jnp.asarray(0.3 * r.standard_normal(l.shape), np.float32), params)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_mha_matches_flax_multi_head_dot_product_attention(mha_data, cross):
  x, memory = mha_data
  kv = memory if cross else x
  # Causal (self) or key padding (cross); every query keeps at least one key,
  # since flax makes fully-masked rows uniform where we make them zero.
  if cross:
    mask = attention.padding_mask(jnp.ones((2, 5), bool), jnp.asarray(_valid([6, 2], 6)))
  else:
    mask = attention.combine_masks(attention.causal_mask(5),
                                   attention.padding_mask(jnp.ones((2, 5), bool),
                                                          jnp.asarray(_valid([5, 3], 5))))
  ref_module = nn.MultiHeadDotProductAttention(num_heads=HEADS)
  shapes = jax.eval_shape(ref_module.init, jax.random.key(0), x, kv, mask=mask)["params"]
  params = _randomize(shapes, 1)
  expected = jax.jit(ref_module.apply)({"params": params}, x, kv, mask=mask)
  ours = attention.MultiHeadAttention(num_heads=HEADS)
  got = jax.jit(ours.apply)({"params": params}, x, kv if cross else None, mask)
  # Same float32 math in a different order: 1e-5 absolute on O(1) outputs.
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)


def test_fused_qkv_equals_unfused(mha_data):
  x, memory = mha_data
  mask = attention.causal_mask(5)
  unfused = attention.MultiHeadAttention(num_heads=HEADS, num_kv_heads=2)
  p = _randomize(jax.eval_shape(unfused.init, jax.random.key(0), x, None, mask)["params"], 2)
  fused = attention.MultiHeadAttention(num_heads=HEADS, num_kv_heads=2, fused_qkv=True)
  cat = lambda name, *parts: jnp.concatenate([p[n][name] for n in parts],
                                             axis=0 if name == "bias" else 1)
  fused_params = {"qkv": {"kernel": cat("kernel", "query", "key", "value"),
                          "bias": cat("bias", "query", "key", "value")},
                  "out": p["out"]}
  # The fused module's own init must produce exactly this layout.
  init_shapes = jax.tree_util.tree_map(
      jnp.shape, jax.eval_shape(fused.init, jax.random.key(0), x, None, mask)["params"])
  assert init_shapes == jax.tree_util.tree_map(jnp.shape, fused_params)
  np.testing.assert_allclose(np.asarray(jax.jit(fused.apply)({"params": fused_params}, x, None,
                                                             mask)),
                             np.asarray(jax.jit(unfused.apply)({"params": p}, x, None, mask)),
                             atol=1e-6, rtol=0)
  # Cross-attention: one fused `kv` kernel over the memory.
  pc = _randomize(jax.eval_shape(unfused.init, jax.random.key(0), x, memory)["params"], 3)
  fused_cross = {"query": pc["query"], "out": pc["out"],
                 "kv": {"kernel": jnp.concatenate([pc["key"]["kernel"], pc["value"]["kernel"]], 1),
                        "bias": jnp.concatenate([pc["key"]["bias"], pc["value"]["bias"]], 0)}}
  np.testing.assert_allclose(np.asarray(jax.jit(fused.apply)({"params": fused_cross}, x, memory)),
                             np.asarray(jax.jit(unfused.apply)({"params": pc}, x, memory)),
                             atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_kv_heads,rotary", [(None, False), (2, True)], ids=["mha", "gqa-rope"])
def test_kv_cache_decode_equals_full_causal_attention(mha_data, num_kv_heads, rotary):
  x, _ = mha_data
  length = x.shape[1]
  module = attention.MultiHeadAttention(num_heads=HEADS, num_kv_heads=num_kv_heads, rotary=rotary)
  variables = jax.jit(module.init, static_argnames="decode")(jax.random.key(0), x, decode=True)
  params, cache = _randomize(variables["params"], 4), variables["cache"]
  full = np.asarray(jax.jit(module.apply)({"params": params}, x, None,
                                          attention.causal_mask(length)))
  step = jax.jit(lambda c, xi: module.apply({"params": params, "cache": c}, xi,
                                            decode=True, mutable=["cache"]))
  for i in range(length):
    out, state = step(cache, x[:, i:i + 1])
    cache = state["cache"]
    # Same math over a zero-padded, masked cache: 1e-5 absolute.
    np.testing.assert_allclose(np.asarray(out)[:, 0], full[:, i], atol=1e-5, rtol=0,
                               err_msg=f"step {i}")
  assert int(cache["cache_index"]) == length


@pytest.mark.parametrize("num_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_cross_attention_cache_with_fewer_rows_serves_contiguous_beams(mha_data, num_kv_heads):
  # Beam search keeps the encoder K/V cache at [batch, ...] and sends [batch*beams, 1, d]
  # queries (rows b*beams .. b*beams+beams-1 belong to batch row b); the result must
  # equal attending a cache repeated to every beam, weights included.
  x, memory = mha_data
  beams = 3
  module = attention.MultiHeadAttention(num_heads=HEADS, num_kv_heads=num_kv_heads)
  variables = jax.jit(module.init, static_argnames="decode")(jax.random.key(0), x[:, :1], memory,
                                                             decode=True)
  params, cache = _randomize(variables["params"], 5), variables["cache"]
  mask = jnp.asarray(_valid([6, 2], 6))[:, None, None, :]                 # [batch, 1, 1, kv]
  queries = jnp.asarray(np.random.default_rng(6).standard_normal((2 * beams, 1, D_MODEL)),
                        jnp.float32)
  step = jax.jit(lambda c, q, m: module.apply({"params": params, "cache": c}, q, None, m,
                                              decode=True, return_weights=True,
                                              mutable=["cache"])[0])
  out, weights = step(cache, queries, mask)
  repeated = jax.tree_util.tree_map(lambda a: jnp.repeat(a, beams, axis=0), cache)
  ref_out, ref_weights = step(repeated, queries, jnp.repeat(mask, beams, axis=0))
  assert out.shape == (2 * beams, 1, D_MODEL) and weights.shape == ref_weights.shape
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-6, rtol=0)
  # 1e-6: one float32 rounding of a softmax weight apart (GPU reductions differ by ~1 ulp).
  np.testing.assert_allclose(np.asarray(weights), np.asarray(ref_weights), atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match="does not divide the 5 query rows"):
    step(cache, queries[:5], mask)


# ---------------------------------------------------------------------------
# Errors that name the bad value.
# ---------------------------------------------------------------------------


def test_error_d_model_not_divisible_by_heads(mha_data):
  x, _ = mha_data
  with pytest.raises(ValueError, match=r"d_model=16 is not divisible by num_heads=3"):
    attention.MultiHeadAttention(num_heads=3).init(jax.random.key(0), x)


def test_error_mask_of_wrong_shape_names_expected_and_actual(rng):
  q, k, v = _qkv(rng, 2, 5, 5, 4, 4, 4)
  with pytest.raises(ValueError,
                     match=re.escape("(2, 4, 5, 5), got (2, 7)")):
    attention.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                    jnp.ones((2, 7), bool))
  with pytest.raises(ValueError, match=re.escape("got (2, 1, 5, 6)")):
    attention.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                    jnp.ones((2, 1, 5, 6), bool))
  with pytest.raises(ValueError, match="not a multiple"):
    attention.dot_product_attention(jnp.asarray(q), jnp.asarray(k[:, :, :3]),
                                    jnp.asarray(v[:, :, :3]))


# ---------------------------------------------------------------------------
# Attention weights sown into ``intermediates`` only when asked for.
# ---------------------------------------------------------------------------


def test_weights_are_sown_only_when_intermediates_are_mutable(mha_data):
  x, memory = mha_data
  module = attention.MultiHeadAttention(num_heads=HEADS)
  params = _randomize(jax.eval_shape(module.init, jax.random.key(0), x, memory)["params"], 7)
  mask = attention.padding_mask(jnp.ones((2, 5), bool), jnp.asarray(_valid([6, 2], 6)))
  plain = module.apply({"params": params}, x, memory, mask)
  out, state = module.apply({"params": params}, x, memory, mask, mutable=["intermediates"])
  (weights,) = state["intermediates"]["attention_weights"]
  np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
  _, ref_weights = module.apply({"params": params}, x, memory, mask, return_weights=True)
  np.testing.assert_array_equal(np.asarray(weights), np.asarray(ref_weights))
  assert weights.shape == (2, HEADS, 5, 6)
  # Rows sum to 1 over the real keys (1e-6: float32 softmax), masked keys get exactly 0.
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6, rtol=0)
  assert np.all(np.asarray(weights)[1, :, :, 2:] == 0.0)
  # Without a mutable intermediates collection nothing is sown (no extra output).
  _, state = module.apply({"params": params}, x, memory, mask, mutable=["cache"])
  assert "intermediates" not in state
