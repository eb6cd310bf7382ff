"""Attention: the pure math and masks first, then the `MultiHeadAttention` module.

Axis names used in shapes and einsum strings:
  b batch, q query length, k key/value length, h heads, g query heads per key/value
  head (grouped-query attention), d head_dim.

Masks are boolean, ``True`` where attention is allowed, and broadcastable to
``[batch, heads, q_len, kv_len]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxformer_mini import dropout as dropout_lib
from flaxformer_mini import positions as positions_lib

Array = jax.Array
Dtype = Any

# ---------------------------------------------------------------------------
# Masks (pure functions).
# ---------------------------------------------------------------------------


def padding_mask(query_valid: Array, key_valid: Array | None = None) -> Array:
  """Mask from per-token validity.

  Args:
    query_valid: [batch, q_len] bool (or 0/1) — which query tokens are real.
    key_valid: [batch, kv_len]; defaults to ``query_valid`` (self-attention).

  Returns:
    [batch, 1, q_len, kv_len] bool, True where both tokens are real.
  """
  if key_valid is None:
    key_valid = query_valid
  return jnp.logical_and(query_valid.astype(bool)[:, None, :, None],
                         key_valid.astype(bool)[:, None, None, :])


def causal_mask(length: int, kv_length: int | None = None) -> Array:
  """Lower-triangular mask: query i may attend to keys j <= i.

  Returns:
    [1, 1, length, kv_length] bool.
  """
  kv_length = length if kv_length is None else kv_length
  q = jnp.arange(length)[:, None]
  k = jnp.arange(kv_length)[None, :]
  return (k <= q)[None, None]


def segment_mask(query_segments: Array, key_segments: Array | None = None) -> Array:
  """Mask for packed sequences: attend only within the same non-zero segment.

  Args:
    query_segments: [batch, q_len] int, 1, 2, ... per packed example, 0 = padding.
    key_segments: [batch, kv_len]; defaults to ``query_segments``.

  Returns:
    [batch, 1, q_len, kv_len] bool.
  """
  if key_segments is None:
    key_segments = query_segments
  same = query_segments[:, None, :, None] == key_segments[:, None, None, :]
  real = jnp.logical_and(query_segments[:, None, :, None] > 0,
                         key_segments[:, None, None, :] > 0)
  return jnp.logical_and(same, real)


def combine_masks(*masks: Array | None) -> Array | None:
  """Logical AND of the given masks, ignoring ``None``; None if all are None."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0].astype(bool)
  for m in masks[1:]:
    out = jnp.logical_and(out, m.astype(bool))
  return out


def encoder_self_attention_mask(valid: Array | None = None,
                                segmentation: Array | None = None) -> Array:
  """Bidirectional self-attention mask of a (possibly packed) sequence.

  Args:
    valid: [batch, length] bool, the real (non-pad) tokens; used when not packed.
    segmentation: [batch, length] int segment ids of packed examples (0 = padding);
      when given, tokens attend only within their own segment and ``valid`` is ignored.

  Returns:
    [batch, 1, length, length] bool: ``[b, 0, i, j]`` is True where token i may read j.
  """
  if segmentation is not None:
    return segment_mask(segmentation)
  if valid is None:
    raise ValueError("a self-attention mask needs valid [batch, length] or segmentation")
  return padding_mask(valid)


def decoder_self_attention_mask(valid: Array | None = None,
                                segmentation: Array | None = None) -> Array:
  """`encoder_self_attention_mask` AND causal: position i reads positions j <= i.

  Args:
    valid: [batch, tgt_len] bool, the real (non-pad) decoder inputs.
    segmentation: [batch, tgt_len] int segment ids of packed examples (replaces ``valid``).

  Returns:
    [batch, 1, tgt_len, tgt_len] bool.
  """
  base = encoder_self_attention_mask(valid, segmentation)
  return jnp.logical_and(causal_mask(base.shape[-1]), base)


def cross_attention_mask(decoder_valid: Array | None, encoder_valid: Array, *,
                         decoder_segmentation: Array | None = None,
                         encoder_segmentation: Array | None = None) -> Array:
  """Which source tokens each decoder position may read.

  Args:
    decoder_valid: [batch, tgt_len] bool real decoder inputs, or None when every query
      is real (a decode step): the mask is then [batch, 1, 1, src_len].
    encoder_valid: [batch, src_len] bool real source tokens.
    decoder_segmentation / encoder_segmentation: [batch, tgt_len] / [batch, src_len]
      segment ids of packed examples. Both given: target segment s reads only source
      segment s. Only one given: its ``> 0`` replaces that side's validity (e.g. packed
      targets of one source per row).

  Returns:
    [batch, 1, tgt_len, src_len] bool.
  """
  if decoder_segmentation is not None and encoder_segmentation is not None:
    return segment_mask(decoder_segmentation, encoder_segmentation)
  if encoder_segmentation is not None:
    encoder_valid = encoder_segmentation > 0
  if decoder_segmentation is not None:
    decoder_valid = decoder_segmentation > 0
  if decoder_valid is None:
    return encoder_valid.astype(bool)[:, None, None, :]
  return padding_mask(decoder_valid, encoder_valid)


# ---------------------------------------------------------------------------
# Scaled dot-product attention (pure function).
# ---------------------------------------------------------------------------


def _check_broadcastable(name: str, shape, target) -> None:
  ok = len(shape) == len(target) and all(s in (1, t) for s, t in zip(shape, target))
  if not ok:
    raise ValueError(
        f"expected {name} broadcastable to [batch, heads, q_len, kv_len] = "
        f"{tuple(target)}, got {tuple(shape)}")


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None = None,
    bias: Array | None = None,
    *,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    deterministic: bool = True,
    return_weights: bool = False,
    dropout_impl: str = "hash",
):
  """softmax(q·kᵀ·scale + bias, masked) · v.

  Args:
    query: [batch, q_len, heads, head_dim].
    key: [batch, kv_len, kv_heads, head_dim]; ``heads`` must be a multiple of
      ``kv_heads`` (grouped-query attention: query head ``i`` reads key/value
      head ``i // (heads // kv_heads)``).
    value: [batch, kv_len, kv_heads, head_dim_v].
    mask: bool, broadcastable to [batch, heads, q_len, kv_len]; True = attend.
    bias: float, broadcastable to [batch, heads, q_len, kv_len], added to logits.
    scale: logit scale; default 1/sqrt(head_dim).
    dropout_rate: dropout on the attention weights (when not deterministic).
    dropout_rng: PRNG key for that dropout.
    dropout_impl: its keep-mask generator, "hash" or "threefry" (see dropout.py).
    deterministic: disables dropout.
    return_weights: also return the weights [batch, heads, q_len, kv_len].

  Returns:
    [batch, q_len, heads, head_dim_v] in the query dtype (and the float32
    weights if ``return_weights``). Softmax runs in float32. A query row whose
    keys are all masked gets zero weights and a zero output (never NaN).
  """
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError("expected query/key/value of rank 4 [batch, length, heads, head_dim], "
                     f"got {query.shape}, {key.shape}, {value.shape}")
  b, q_len, heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  if key.shape[-1] != head_dim or value.shape[:3] != key.shape[:3]:
    raise ValueError(f"key {key.shape} / value {value.shape} do not match query {query.shape}")
  if heads % kv_heads:
    raise ValueError(f"query heads={heads} is not a multiple of key/value heads={kv_heads}")
  target = (b, heads, q_len, kv_len)
  if mask is not None:
    _check_broadcastable("mask", mask.shape, target)
  if bias is not None:
    _check_broadcastable("bias", bias.shape, target)
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

  groups = heads // kv_heads
  q = query.reshape(b, q_len, kv_heads, groups, head_dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, key,
                      preferred_element_type=jnp.float32)
  logits = logits.reshape(b, heads, q_len, kv_len) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    # Fully-masked rows would be uniform over masked keys: make them zero.
    weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
  if not deterministic and dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("dropout_rate > 0 and deterministic=False need a dropout_rng")
    weights = dropout_lib.dropout(weights, dropout_rng, dropout_rate, impl=dropout_impl)
  w = weights.astype(value.dtype).reshape(b, kv_heads, groups, q_len, kv_len)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", w, value)
  out = out.reshape(b, q_len, heads, value.shape[-1]).astype(query.dtype)
  return (out, weights) if return_weights else out


# ---------------------------------------------------------------------------
# Beam folding (pure functions).
#
# Beam search keeps the encoder K/V cache at [batch, ...] while the queries come as
# [batch * beams, ...] (rows b*beams .. b*beams+beams-1 belong to batch row b): folding
# the beams into the query length reads each row's K/V once per step.
# ---------------------------------------------------------------------------


def fold_beams_into_queries(query: Array, kv_rows: int) -> tuple[Array, int]:
  """[kv_rows * beams, q_len, heads, d] -> ([kv_rows, beams * q_len, heads, d], beams)."""
  rows = query.shape[0]
  if rows % kv_rows:
    raise ValueError(f"cross-attention cache has {kv_rows} rows, which does not divide the "
                     f"{rows} query rows (beams must be contiguous per batch row)")
  group = rows // kv_rows
  return query.reshape((kv_rows, group * query.shape[1]) + query.shape[2:]), group


def unfold_beams(out: Array, weights: Array, rows: int) -> tuple[Array, Array]:
  """Inverse of `fold_beams_into_queries` on the attention output and weights.

  Args:
    out: [kv_rows, beams * q_len, heads, d].
    weights: [kv_rows, heads, beams * q_len, kv_len].
    rows: kv_rows * beams.

  Returns:
    (out [rows, q_len, heads, d], weights [rows, heads, q_len, kv_len]).
  """
  kv_rows = out.shape[0]
  group = rows // kv_rows
  out = out.reshape((rows, out.shape[1] // group) + out.shape[2:])
  w = weights.reshape((kv_rows, weights.shape[1], group, -1, weights.shape[-1]))
  weights = jnp.swapaxes(w, 1, 2).reshape((rows,) + w.shape[1:2] + w.shape[3:])
  return out, weights


# ---------------------------------------------------------------------------
# Multi-head attention module.
# ---------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
  """Multi-head attention: per-head projections, parallel heads, concat, output projection.

  Parameter layout matches ``flax.linen.MultiHeadDotProductAttention``:
  ``query``/``key``/``value`` kernels [d_model, heads, head_dim] and ``out``
  kernel [heads, head_dim, out_features]. With ``fused_qkv`` self-attention
  uses one ``qkv`` kernel [d_model, heads + 2*kv_heads, head_dim] (and
  cross-attention one ``kv`` kernel).

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); default num_heads.
    head_dim: default in_features // num_heads.
    out_features: default the query input width.
    rotary: apply rotary position embeddings (RoPE) to queries and keys.
    attention_scale: logit scale; default 1/sqrt(head_dim).
  """

  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  fused_qkv: bool = False
  dropout_rate: float = 0.0
  dropout_impl: str = "hash"
  rotary: bool = False
  rotary_base: float = 10000.0
  attention_scale: float | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self,
               inputs_q: Array,
               inputs_kv: Array | None = None,
               mask: Array | None = None,
               bias: Array | None = None,
               *,
               positions: Array | None = None,
               deterministic: bool = True,
               decode: bool = False,
               return_weights: bool = False):
    """Attend from ``inputs_q`` to ``inputs_kv`` (itself when None).

    The steps: project queries/keys/values (`_project_qkv`, or read the cached
    cross-attention keys/values), rotate them (`_rotate`, RoPE only), write this step
    into the self-attention cache (`_update_cache`, decode only), attend
    (`_attend`, folding beams onto a smaller cross-attention cache), project out.

    Args:
      inputs_q: [batch, q_len, d_model].
      inputs_kv: [batch, kv_len, d_kv], or None for self-attention. In
        ``decode`` mode cross-attention projects it once into the cache and
        later steps may pass None.
      mask: bool broadcastable to [batch, heads, q_len, kv_len].
      bias: float broadcastable to [batch, heads, q_len, kv_len].
      positions: [batch, q_len] int, positions for RoPE (default 0..q_len-1,
        or the cache index when decoding).
      deterministic: disables dropout.
      decode: incremental decoding with a key/value cache (collection
        ``cache``). The first call (under ``init`` or with a full-length
        input) creates the cache; later calls take one token, q_len == 1.
      return_weights: also return the [batch, heads, q_len, kv_len] float32 weights.
        They are sown into ``intermediates/attention_weights`` when this is set or
        the ``intermediates`` collection is mutable (``apply(..., mutable=
        ["intermediates"])``); otherwise they are never materialised.

    Returns:
      [batch, q_len, out_features] (and the weights if ``return_weights``).
    """
    d_in = inputs_q.shape[-1]
    head_dim, kv_heads = self._head_sizes(d_in)
    cached_cross = decode and self.has_variable("cache", "cross_key")
    is_cross = inputs_kv is not None or cached_cross

    if cached_cross:  # the encoder K/V were projected into the cache on the first call
      query = self._dense((self.num_heads, head_dim), "query")(inputs_q)
      key = jnp.swapaxes(self.get_variable("cache", "cross_key"), 1, 2)
      value = jnp.swapaxes(self.get_variable("cache", "cross_value"), 1, 2)
    else:
      query, key, value = self._project_qkv(inputs_q, inputs_kv, head_dim, kv_heads)
      if is_cross and decode:  # stored [batch, kv_heads, src_len, head_dim], see _update_cache
        self.variable("cache", "cross_key", lambda: jnp.swapaxes(key, 1, 2))
        self.variable("cache", "cross_value", lambda: jnp.swapaxes(value, 1, 2))
    if self.rotary and not is_cross:
      query, key = self._rotate(query, key, positions, decode)
    if decode and not is_cross:
      key, value, mask = self._update_cache(key, value, mask)

    out, weights = self._attend(query, key, value, mask, bias, deterministic,
                                fold_beams=is_cross and decode)
    if return_weights or self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "attention_weights", weights)
    out = nn.DenseGeneral(
        features=self.out_features or d_in, axis=(-2, -1), use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
        name="out")(out)
    return (out, weights) if return_weights else out

  def _head_sizes(self, d_in: int) -> tuple[int, int]:
    """(head_dim, kv_heads), checked against the input width ``d_in``."""
    if self.head_dim is None and d_in % self.num_heads:
      raise ValueError(f"d_model={d_in} is not divisible by num_heads={self.num_heads}")
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={kv_heads}")
    return self.head_dim or d_in // self.num_heads, kv_heads

  def _dense(self, features: tuple[int, int], name: str) -> nn.Module:
    """A [d_in] -> [heads, head_dim] projection named ``name``."""
    return nn.DenseGeneral(features=features, axis=-1, use_bias=self.use_bias, dtype=self.dtype,
                           param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name)

  def _project_qkv(self, inputs_q: Array, inputs_kv: Array | None, head_dim: int,
                   kv_heads: int) -> tuple[Array, Array, Array]:
    """Queries [batch, q_len, heads, head_dim], keys/values [batch, kv_len, kv_heads, head_dim].

    Kernels ``query``/``key``/``value``; with ``fused_qkv`` one ``qkv`` kernel for
    self-attention (``inputs_kv`` None) or ``query`` + ``kv`` for cross-attention.
    """
    heads = self.num_heads
    if inputs_kv is None and self.fused_qkv:
      qkv = self._dense((heads + 2 * kv_heads, head_dim), "qkv")(inputs_q)
      return tuple(jnp.split(qkv, [heads, heads + kv_heads], axis=-2))
    kv_in = inputs_q if inputs_kv is None else inputs_kv
    query = self._dense((heads, head_dim), "query")(inputs_q)
    if self.fused_qkv:
      key, value = jnp.split(self._dense((2 * kv_heads, head_dim), "kv")(kv_in), 2, axis=-2)
    else:
      key = self._dense((kv_heads, head_dim), "key")(kv_in)
      value = self._dense((kv_heads, head_dim), "value")(kv_in)
    return query, key, value

  def _rotate(self, query: Array, key: Array, positions: Array | None,
              decode: bool) -> tuple[Array, Array]:
    """RoPE on query/key [batch, len, heads, head_dim] at ``positions`` [batch, len].

    Default positions: the cache index on a decode step, else 0..len-1.
    """
    shape = query.shape[:2]
    if positions is None:
      if decode and self.has_variable("cache", "cache_index"):
        index = self.get_variable("cache", "cache_index")
        positions = jnp.broadcast_to(index[:, None] if index.ndim else index, shape)
      else:
        positions = jnp.broadcast_to(jnp.arange(shape[1]), shape)
    return (positions_lib.apply_rotary(query, positions, self.rotary_base),
            positions_lib.apply_rotary(key, positions, self.rotary_base))

  def _attend(self, query: Array, key: Array, value: Array, mask: Array | None,
              bias: Array | None, deterministic: bool, *,
              fold_beams: bool) -> tuple[Array, Array]:
    """`dot_product_attention` with this module's scale and dropout.

    ``fold_beams``: a cross-attention cache of fewer rows than the queries serves
    contiguous beams (`fold_beams_into_queries` / `unfold_beams`).

    Returns:
      (out [batch, q_len, heads, head_dim_v], weights [batch, heads, q_len, kv_len]).
    """
    rows, group = query.shape[0], 1
    if fold_beams and rows != key.shape[0]:
      query, group = fold_beams_into_queries(query, key.shape[0])
    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng("dropout")
    out, weights = dot_product_attention(
        query, key, value, mask, bias, scale=self.attention_scale,
        dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
        deterministic=deterministic, return_weights=True, dropout_impl=self.dropout_impl)
    if group > 1:
      out, weights = unfold_beams(out, weights, rows)
    return out, weights

  def _update_cache(self, key: Array, value: Array, mask: Array | None):
    """Writes one step's key/value at ``cache_index``; returns the full cache.

    key/value: [batch, 1, kv_heads, head_dim] on a step; the full-length
    [batch, max_len, kv_heads, head_dim] on the call that creates the cache.
    The cache is stored as [batch, kv_heads, max_len, head_dim], the layout
    the attention matmuls read, so a decode step moves no cache data besides
    the one-token write (the swapaxes below cancel inside XLA). ``cache_index`` is
    a scalar, or [batch] when rows decode at different steps (`models.rows_cache`).
    """
    initialized = self.has_variable("cache", "cached_key")
    to_cache = lambda x: jnp.swapaxes(x, 1, 2)
    cached_key = self.variable("cache", "cached_key", jnp.zeros, to_cache(key).shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, to_cache(value).shape,
                                 value.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return key, value, mask  # creating the cache: plain full attention
    b, kv_heads, max_len, head_dim = cached_key.value.shape
    if key.shape != (b, 1, kv_heads, head_dim):
      raise ValueError(f"decode step expects one token per call: key {(b, 1, kv_heads, head_dim)}, "
                       f"got {key.shape}")
    i = cache_index.value
    if i.ndim:  # one index per row (step-level batching: rows start at different steps)
      write = jax.vmap(lambda c, x, j: jax.lax.dynamic_update_slice(c, x, (0, j, 0)))
      step_mask = (jnp.arange(max_len)[None, :] <= i[:, None])[:, None, None, :]
    else:
      write = lambda c, x, j: jax.lax.dynamic_update_slice(c, x, (0, 0, j, 0))
      step_mask = (jnp.arange(max_len) <= i)[None, None, None, :]
    cached_key.value = write(cached_key.value, to_cache(key).astype(cached_key.value.dtype), i)
    cached_value.value = write(cached_value.value,
                               to_cache(value).astype(cached_value.value.dtype), i)
    cache_index.value = i + 1
    return (jnp.swapaxes(cached_key.value, 1, 2), jnp.swapaxes(cached_value.value, 1, 2),
            combine_masks(step_mask, mask))
