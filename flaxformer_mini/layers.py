"""Building blocks: feed-forward, norms, input embedding, encoder layer, decoder layer.

Every layer takes activations ``x: [batch, length, d_model]`` and the shared
`TransformerConfig`. Residual + norm comes in the paper's post-LN order
(``x = Norm(x + Dropout(Sublayer(x)))``) or pre-LN
(``x = x + Dropout(Sublayer(Norm(x)))``), chosen by ``cfg.norm_placement``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxformer_mini import positions as positions_lib
from flaxformer_mini import sharding
from flaxformer_mini.attention import MultiHeadAttention
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.dropout import Dropout

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}


def make_norm(cfg: TransformerConfig, name: str) -> nn.Module:
  """LayerNorm (scale + bias) or RMSNorm (scale only), per ``cfg.norm_kind``."""
  if cfg.norm_kind == "rmsnorm":
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
  return nn.LayerNorm(epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name=name)


def make_attention(cfg: TransformerConfig, name: str, rotary: bool = False) -> MultiHeadAttention:
  return MultiHeadAttention(
      num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      use_bias=cfg.use_bias, fused_qkv=cfg.fused_qkv, dropout_rate=cfg.attention_dropout_rate,
      dropout_impl=cfg.dropout_impl, rotary=rotary, rotary_base=cfg.rotary_base,
      attention_scale=cfg.attention_scale,
      dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


class FeedForward(nn.Module):
  """Position-wise feed-forward: Dense(d_ff) -> act -> dropout -> Dense(d_model).

  Gated (``cfg.ffn_gated``, e.g. SwiGLU / GeGLU): act(x·W0) * (x·W1) -> Dense.
  Params: ``wi`` (or ``wi_0``/``wi_1``) [d_model, d_ff] and ``wo`` [d_ff, d_model].
  """

  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """x: [batch, length, d_model] -> [batch, length, d_model]."""
    cfg = self.cfg
    dense = functools.partial(nn.Dense, use_bias=cfg.use_bias, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype,
                              kernel_init=nn.initializers.xavier_uniform())
    act = ACTIVATIONS[cfg.ffn_activation]
    if cfg.ffn_gated:
      h = act(dense(cfg.d_ff, name="wi_0")(x)) * dense(cfg.d_ff, name="wi_1")(x)
    else:
      h = act(dense(cfg.d_ff, name="wi")(x))
    h = Dropout(cfg.dropout_rate, cfg.dropout_impl)(h, deterministic=deterministic)
    return dense(x.shape[-1], name="wo")(h)


class InputEmbedding(nn.Module):
  """Token embedding (a shared module passed in), * sqrt(d_model), + absolute positions, dropout."""

  cfg: TransformerConfig
  embed: nn.Module

  @nn.compact
  def __call__(self, ids: Array, positions: Array | None = None, *,
               deterministic: bool = True) -> Array:
    """ids: [batch, length] int, checked by the calling stack; positions: [batch, length]
    (default 0..length-1).

    Returns:
      [batch, length, d_model] in cfg.dtype.
    """
    cfg = self.cfg
    x = self.embed(ids).astype(jnp.float32)
    if cfg.scale_embeddings:
      x = x * jnp.sqrt(jnp.float32(cfg.d_model))
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    if cfg.position_kind == "sinusoidal":
      x = x + positions_lib.sinusoidal_encoding(positions, cfg.d_model)
    elif cfg.position_kind == "learned":
      x = x + positions_lib.LearnedPositions(cfg.max_len, cfg.d_model, cfg.param_dtype,
                                             name="position_embedding")(positions)
    x = Dropout(cfg.dropout_rate, cfg.dropout_impl)(x, deterministic=deterministic)
    return x.astype(cfg.dtype)


def _residual(cfg: TransformerConfig, norm: nn.Module, x: Array,
              sublayer: Callable[[Array], Array], deterministic: bool) -> Array:
  """One sublayer with residual, dropout and norm in post- or pre-LN order."""
  drop = Dropout(cfg.dropout_rate, cfg.dropout_impl)
  if cfg.norm_placement == "pre":
    out = x + drop(sublayer(norm(x)), deterministic=deterministic)
  else:
    out = norm(x + drop(sublayer(x), deterministic=deterministic))
  # Under a device mesh: rows split like the batch, features whole (sharding.constrain).
  return sharding.constrain(out, sharding.ACTIVATION)


class EncoderLayer(nn.Module):
  """Self-attention + feed-forward, each with residual and norm."""

  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, bias: Array | None = None,
               positions: Array | None = None, deterministic: bool = True) -> Array:
    """x: [batch, length, d_model]; mask/bias broadcastable to [batch, heads, length, length].

    positions: [batch, length] (RoPE). Every argument may be positional: `remat_layer`
    marks ``deterministic`` (argnum 5, ``self`` = 0) static for ``jax.checkpoint``.

    Returns:
      [batch, length, d_model].
    """
    cfg = self.cfg
    attn = make_attention(cfg, "self_attention", rotary=cfg.position_kind == "rotary")
    x = _residual(
        cfg, make_norm(cfg, "norm_attention"), x,
        lambda h: attn(h, None, mask, bias, positions=positions, deterministic=deterministic),
        deterministic)
    ffn = FeedForward(cfg, name="ffn")
    return _residual(cfg, make_norm(cfg, "norm_ffn"), x, lambda h: ffn(h, deterministic),
                     deterministic)


class DecoderLayer(nn.Module):
  """Masked self-attention, encoder-decoder cross-attention (if ``cross``), feed-forward."""

  cfg: TransformerConfig
  cross: bool = True

  @nn.compact
  def __call__(self, x: Array, encoded: Array | None = None, self_mask: Array | None = None,
               cross_mask: Array | None = None, self_bias: Array | None = None,
               positions: Array | None = None, deterministic: bool = True,
               decode: bool = False) -> Array:
    """x: [batch, tgt_len, d_model]; encoded: [batch, src_len, d_model].

    self_mask: [batch|1, 1, tgt_len, tgt_len] (causal & padding);
    cross_mask: [batch, 1, tgt_len, src_len]; self_bias: [1, heads, tgt_len, kv_len];
    positions: [batch, tgt_len]. In ``decode`` mode tgt_len == 1 and the caches
    supply keys/values (``encoded`` may then be None). Every argument may be
    positional: `remat_layer` marks ``deterministic`` and ``decode`` (argnums 7, 8)
    static.

    Returns:
      [batch, tgt_len, d_model].
    """
    cfg = self.cfg
    self_attn = make_attention(cfg, "self_attention", rotary=cfg.position_kind == "rotary")
    x = _residual(
        cfg, make_norm(cfg, "norm_self_attention"), x,
        lambda h: self_attn(h, None, self_mask, self_bias, positions=positions,
                            deterministic=deterministic, decode=decode), deterministic)
    if self.cross:
      cross_attn = make_attention(cfg, "cross_attention")
      x = _residual(
          cfg, make_norm(cfg, "norm_cross_attention"), x,
          lambda h: cross_attn(h, encoded, cross_mask, deterministic=deterministic,
                               decode=decode), deterministic)
    ffn = FeedForward(cfg, name="ffn")
    return _residual(cfg, make_norm(cfg, "norm_ffn"), x, lambda h: ffn(h, deterministic),
                     deterministic)


# Remat (``cfg.remat``): which intermediates the backward pass keeps; the rest is
# recomputed. "full" keeps only the layer inputs; "dots" also keeps matmul outputs
# without batch dims (the Dense projections), so only cheap elementwise ops, norms
# and the attention einsums are recomputed.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
# Argnums (``self`` = 0) of the Python-bool arguments: jax.checkpoint would trace them.
_STATIC_ARGNUMS = {"EncoderLayer": (5,), "DecoderLayer": (7, 8)}


def remat_layer(layer_cls: type, cfg: TransformerConfig, *, decode: bool = False,
                prevent_cse: bool = True) -> type:
  """``layer_cls`` (`EncoderLayer` / `DecoderLayer`), wrapped in ``nn.remat`` per ``cfg.remat``.

  The wrapped class has the same parameter paths. Call it with every argument
  positional (the bools must be static). Returns ``layer_cls`` itself for
  ``remat="none"`` and for ``decode`` (incremental decoding runs no backward pass,
  and the cache writes are simplest outside a checkpoint). ``prevent_cse=False`` is
  the cheaper choice inside ``nn.scan``, where CSE cannot undo the remat.
  """
  if cfg.remat == "none" or decode:
    return layer_cls
  return nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=prevent_cse,
                  static_argnums=_STATIC_ARGNUMS[layer_cls.__name__])
