"""Position information: sinusoidal, learned absolute, rotary (RoPE), T5 relative bias.

Pure functions first; the two modules with parameters (`LearnedPositions`,
`RelativePositionBias`) at the end.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array


def sinusoidal_encoding(positions: Array, d_model: int, max_timescale: float = 10000.0) -> Array:
  """The paper's encoding at arbitrary (e.g. packed) positions.

      PE(pos, 2i)   = sin(pos / max_timescale^(2i / d_model))
      PE(pos, 2i+1) = cos(pos / max_timescale^(2i / d_model))

  Args:
    positions: [...] int or float positions.
    d_model: encoding width (even or odd; an odd width drops the last cos).

  Returns:
    [..., d_model] float32, sin at even and cos at odd dimensions.
  """
  two_i = jnp.arange(0, d_model, 2, dtype=jnp.float32)            # 2i
  inv_freq = jnp.power(max_timescale, -two_i / d_model)            # [ceil(d/2)]
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)     # [..., d/2, 2]
  pe = pe.reshape(*angles.shape[:-1], -1)                          # interleave
  return pe[..., :d_model]


def sinusoidal_table(num_positions: int, d_model: int, max_timescale: float = 10000.0) -> Array:
  """[num_positions, d_model] table of `sinusoidal_encoding` for 0..num_positions-1."""
  return sinusoidal_encoding(jnp.arange(num_positions), d_model, max_timescale)


def rotary_frequencies(positions: Array, head_dim: int, base: float = 10000.0):
  """cos/sin of RoPE angles pos * base^(-2i/head_dim).

  Args:
    positions: [batch, length] int.

  Returns:
    (cos, sin), each [batch, length, 1, head_dim] float32 (the half-width
    angles repeated twice, the "rotate half" layout used by Llama/GPT-NeoX).
  """
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq   # [b, l, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]    # [b, l, 1, d]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: Array, positions: Array, base: float = 10000.0) -> Array:
  """Rotary position embedding (RoPE), rotate-half convention.

  Args:
    x: [batch, length, heads, head_dim].
    positions: [batch, length] int.

  Returns:
    [batch, length, heads, head_dim], same dtype as x; computed in float32.
  """
  cos, sin = rotary_frequencies(positions, x.shape[-1], base)
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


def relative_position_bucket(relative_position: Array, *, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> Array:
  """T5's bucketing of relative positions (memory_position - query_position).

  Half of the buckets (per direction, if bidirectional) are exact small
  distances; the rest grow logarithmically up to ``max_distance``; farther
  distances share the last bucket.

  Args:
    relative_position: [...] int.

  Returns:
    [...] int32 in [0, num_buckets).
  """
  relative_position = jnp.asarray(relative_position, jnp.int32)
  ret = jnp.zeros_like(relative_position)
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) /
      np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


class LearnedPositions(nn.Module):
  """Learned absolute position embeddings: a [max_len, d_model] table."""

  max_len: int
  d_model: int
  param_dtype: Any = jnp.float32
  embedding_init: Any = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, positions: Array) -> Array:
    """positions: [batch, length] int -> [batch, length, d_model]."""
    table = self.param("embedding", self.embedding_init, (self.max_len, self.d_model),
                       self.param_dtype)
    return jnp.take(table, positions, axis=0)


class RelativePositionBias(nn.Module):
  """T5 relative position bias: a learned scalar per (bucket, head).

  Computed once per stack and shared by all its layers.
  """

  num_heads: int
  bidirectional: bool = True
  num_buckets: int = 32
  max_distance: int = 128
  param_dtype: Any = jnp.float32
  embedding_init: Any = nn.initializers.normal(stddev=1.0)

  @nn.compact
  def __call__(self, q_positions: Array, k_positions: Array) -> Array:
    """q_positions: [batch, q_len], k_positions: [batch, kv_len] ints.

    Returns:
      [batch, heads, q_len, kv_len] float32 bias to add to attention logits.
    """
    rel = k_positions[:, None, :] - q_positions[:, :, None]          # [b, q, k]
    buckets = relative_position_bucket(rel, bidirectional=self.bidirectional,
                                       num_buckets=self.num_buckets,
                                       max_distance=self.max_distance)
    table = self.param("rel_embedding", self.embedding_init,
                       (self.num_buckets, self.num_heads), self.param_dtype)
    bias = jnp.take(table, buckets, axis=0)                            # [b, q, k, h]
    return jnp.transpose(bias, (0, 3, 1, 2)).astype(jnp.float32)
