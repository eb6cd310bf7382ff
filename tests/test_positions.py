"""Tests for flaxformer_mini.positions.

* sinusoidal: the paper's formula, element by element, in a float64 NumPy loop.
* rotary: a NumPy rotate-half implementation, and q·k depending only on the
  position difference.
* T5 relative buckets: an independent NumPy transcription of Hugging Face's
  ``T5Attention._relative_position_bucket`` (and the HF function itself when
  transformers is importable), bidirectional and causal, many distances.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_mini import positions

# ---------------------------------------------------------------------------
# Sinusoidal.
# ---------------------------------------------------------------------------


def np_sinusoidal(pos_list, d_model):
  """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...), float64 loops."""
  pe = np.zeros((len(pos_list), d_model), np.float64)
  for row, pos in enumerate(pos_list):
    for i in range((d_model + 1) // 2):
      angle = pos / 10000.0 ** (2 * i / d_model)
      pe[row, 2 * i] = math.sin(angle)
      if 2 * i + 1 < d_model:
        pe[row, 2 * i + 1] = math.cos(angle)
  return pe


@pytest.mark.parametrize("d_model", [8, 7, 16])
def test_sinusoidal_matches_formula(d_model):
  n = 40
  table = np.asarray(positions.sinusoidal_table(n, d_model))
  assert table.shape == (n, d_model) and table.dtype == np.float32
  # float32 angles up to 40 rad: rounding ~ 40 * 6e-8; 1e-5 absolute.
  np.testing.assert_allclose(table, np_sinusoidal(range(n), d_model), atol=1e-5, rtol=0)


def test_sinusoidal_encoding_at_packed_positions():
  pos = np.array([[0, 1, 2, 0, 1], [5, 6, 0, 1, 2]])
  got = np.asarray(positions.sinusoidal_encoding(jnp.asarray(pos), 6))
  ref = np_sinusoidal(pos.reshape(-1), 6).reshape(2, 5, 6)
  np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------
# Rotary.
# ---------------------------------------------------------------------------


def np_rotary(x, pos, base=10000.0):
  """Rotate-half RoPE in float64: x [b, l, h, d], pos [b, l]."""
  x = np.asarray(x, np.float64)
  d = x.shape[-1]
  half = d // 2
  inv_freq = base ** (-np.arange(half) * 2.0 / d)                  # [d/2]
  ang = np.asarray(pos, np.float64)[..., None, None] * inv_freq    # [b, l, 1, d/2]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                         x2 * np.cos(ang) + x1 * np.sin(ang)], axis=-1)


def test_rotary_matches_numpy_rotate_half(rng):
  x = rng.standard_normal((2, 6, 3, 8)).astype(np.float32)
  pos = np.array([[0, 1, 2, 3, 4, 5], [7, 3, 0, 11, 19, 2]])
  got = np.asarray(jax.jit(positions.apply_rotary)(jnp.asarray(x), jnp.asarray(pos)))
  # float32 angles up to 19 rad on O(1) values: 1e-5 absolute.
  np.testing.assert_allclose(got, np_rotary(x, pos), atol=1e-5, rtol=0)
  # Position 0 is the identity; the rotation preserves norms.
  np.testing.assert_allclose(got[0, 0], x[0, 0], atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  bf = positions.apply_rotary(jnp.asarray(x, jnp.bfloat16), jnp.asarray(pos))
  assert bf.dtype == jnp.bfloat16


def test_rotary_dot_product_depends_only_on_offset(rng):
  d = 8
  q = rng.standard_normal((1, 1, 1, d)).astype(np.float32)
  k = rng.standard_normal((1, 1, 1, d)).astype(np.float32)
  pos = np.arange(0, 24)[None, :]
  rotate = lambda a: np.asarray(positions.apply_rotary(jnp.asarray(np.repeat(a, 24, 1)),
                                                       jnp.asarray(pos)))[0, :, 0]
  rq, rk = rotate(q), rotate(k)
  dots = rq @ rk.T                                   # dots[m, n] = <R_m q, R_n k>
  for offset in (-5, -1, 0, 2, 7):
    diag = np.diagonal(dots, offset=offset)
    # Every (m, m + offset) pair gives the same value, up to float32 rounding: 1e-4.
    np.testing.assert_allclose(diag, diag[0], atol=1e-4, err_msg=f"offset {offset}")
  # ...and the value does change with the offset (the encoding is not a no-op).
  assert abs(dots[0, 0] - dots[0, 3]) > 1e-3


def test_rotary_rejects_odd_head_dim():
  with pytest.raises(ValueError, match="even head_dim, got 5"):
    positions.apply_rotary(jnp.ones((1, 2, 1, 5)), jnp.zeros((1, 2), jnp.int32))


# ---------------------------------------------------------------------------
# T5 relative position buckets.
# ---------------------------------------------------------------------------


def np_t5_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
  """NumPy transcription of transformers' ``T5Attention._relative_position_bucket``.

  ``relative_position`` = memory_position - query_position. Like the torch
  original the log term is computed in float32.
  """
  relative_position = np.asarray(relative_position, np.int64)
  relative_buckets = np.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    relative_buckets += (relative_position > 0).astype(np.int64) * num_buckets
    relative_position = np.abs(relative_position)
  else:
    relative_position = -np.minimum(relative_position, np.zeros_like(relative_position))
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  with np.errstate(divide="ignore", invalid="ignore"):  # log(0) where is_small anyway
    large = max_exact + (
        np.log(relative_position.astype(np.float32) / max_exact)
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return relative_buckets + np.where(is_small, relative_position, large)


BUCKET_CASES = [(True, 32, 128), (False, 32, 128), (True, 16, 40), (False, 8, 20)]


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", BUCKET_CASES)
def test_relative_position_bucket_matches_t5(bidirectional, num_buckets, max_distance):
  rel = np.arange(-300, 301)
  got = np.asarray(positions.relative_position_bucket(
      jnp.asarray(rel), bidirectional=bidirectional, num_buckets=num_buckets,
      max_distance=max_distance))
  expected = np_t5_bucket(rel, bidirectional, num_buckets, max_distance)
  np.testing.assert_array_equal(got, expected)       # integers: exact
  assert got.min() == 0 and got.max() == num_buckets - 1
  if not bidirectional:
    np.testing.assert_array_equal(got[rel >= 0], 0)  # causal: future keys share bucket 0


def test_relative_position_bucket_matches_huggingface():
  torch = pytest.importorskip("torch")
  modeling_t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
  rel = np.arange(-300, 301)
  for bidirectional, num_buckets, max_distance in BUCKET_CASES:
    expected = modeling_t5.T5Attention._relative_position_bucket(
        torch.tensor(rel), bidirectional=bidirectional, num_buckets=num_buckets,
        max_distance=max_distance).numpy()
    got = np.asarray(positions.relative_position_bucket(
        jnp.asarray(rel), bidirectional=bidirectional, num_buckets=num_buckets,
        max_distance=max_distance))
    np.testing.assert_array_equal(got, expected, err_msg=str((bidirectional, num_buckets)))


def test_relative_position_bias_looks_up_table_by_bucket():
  module = positions.RelativePositionBias(num_heads=3, bidirectional=True, num_buckets=8,
                                          max_distance=16)
  q_pos = jnp.array([[0, 1, 2, 0]])      # packed: the last query restarts at 0
  k_pos = jnp.array([[0, 1, 2, 3, 9]])
  params = jax.jit(module.init)(jax.random.key(0), q_pos, k_pos)["params"]
  table = np.asarray(params["rel_embedding"])        # [buckets, heads]
  bias = np.asarray(jax.jit(module.apply)({"params": params}, q_pos, k_pos))
  assert bias.shape == (1, 3, 4, 5)
  rel = np.asarray(k_pos)[0][None, :] - np.asarray(q_pos)[0][:, None]
  expected = table[np_t5_bucket(rel, True, 8, 16)].transpose(2, 0, 1)
  np.testing.assert_array_equal(bias[0], expected)


def test_learned_positions_look_up_rows():
  module = positions.LearnedPositions(max_len=6, d_model=4)
  pos = jnp.array([[0, 5, 2], [1, 1, 3]])
  params = jax.jit(module.init)(jax.random.key(0), pos)["params"]
  got = np.asarray(jax.jit(module.apply)({"params": params}, pos))
  np.testing.assert_array_equal(got, np.asarray(params["embedding"])[np.asarray(pos)])
