"""Dropout with cheap keep-masks.

``jax.random.bernoulli`` draws every mask element from Threefry-2x32 (20 rounds
of add/rotate/xor per pair of 32-bit words). On a CPU that is about 15 % of a
Transformer train step (measured on the benchmark model, see
benchmarks/README.md). Dropout needs independent, unbiased coin flips, not a
cryptographic-strength stream, so the default here (``impl="hash"``) takes two
32-bit seeds from the PRNG key (one small Threefry call per dropout site) and
hashes each element's flat index with them:

    bits[i] = mix(mix(i ^ seed0) ^ seed1),   keep[i] = bits[i] >= round(rate * 2**32)

``mix`` is C. Wellons' ``lowbias32``, a bijective 32-bit integer hash with near
ideal avalanche; the whole mask is one elementwise XLA fusion. The keep
probability is exact to 2**-32. Masks repeat every 2**32 elements of one call,
and two call sites collide only if their seeds do (probability 2**-64 per pair).
``impl="threefry"`` is exactly ``flax.linen.Dropout`` (``jax.random.bernoulli``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
IMPLS = ("hash", "threefry")


def _mix32(x: Array) -> Array:
  """lowbias32: bijective uint32 -> uint32 hash (xorshift-multiply, 2 rounds)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_bits(key: Array, shape: tuple[int, ...]) -> Array:
  """uint32 pseudo-random bits of ``shape`` from a PRNG key (counter hash, see module doc)."""
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  return _mix32(_mix32(index ^ seeds[0]) ^ seeds[1])


def keep_mask(key: Array, shape: tuple[int, ...], rate: float, impl: str = "hash") -> Array:
  """Bool mask, True with probability ``1 - rate`` per element.

  Args:
    key: a PRNG key (typed or raw uint32[2]).
    shape: mask shape, e.g. ``[batch, length, d_model]``.
    rate: drop probability in [0, 1).
    impl: "hash" (counter hash, the default) or "threefry" (``jax.random.bernoulli``).
  """
  if impl not in IMPLS:
    raise ValueError(f"dropout impl={impl!r} is not one of {IMPLS}")
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate={rate} must be in [0, 1)")
  shape = tuple(int(s) for s in shape)
  if impl == "threefry":
    return jax.random.bernoulli(key, 1.0 - rate, shape)
  threshold = min(round(rate * 2.0 ** 32), 2 ** 32 - 1)
  return hash_bits(key, shape) >= jnp.uint32(threshold)


def dropout(x: Array, key: Array | None, rate: float, *, impl: str = "hash",
            deterministic: bool = False) -> Array:
  """Inverted dropout: zero elements with probability ``rate``, scale the rest by 1/(1-rate).

  x: any shape; returns the same shape and dtype. Identity when ``deterministic``
  or ``rate == 0``.
  """
  if deterministic or rate == 0.0:
    return x
  if key is None:
    raise ValueError("dropout with rate > 0 and deterministic=False needs a PRNG key")
  keep = keep_mask(key, x.shape, rate, impl)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class Dropout(nn.Module):
  """Drop-in for ``flax.linen.Dropout`` with a choice of mask generator (``impl``).

  Takes its key from the ``dropout`` RNG collection: ``module.apply(...,
  rngs={"dropout": key})``. With ``impl="threefry"`` the output equals
  ``flax.linen.Dropout(rate)`` bit for bit.
  """

  rate: float
  impl: str = "hash"
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """x: any shape -> same shape."""
    if deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.make_rng(self.rng_collection), self.rate, impl=self.impl)
