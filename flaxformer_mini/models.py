"""Stacks and whole models: `Encoder`, `Decoder`, `Transformer` (encoder-decoder), `DecoderOnlyLM`.

Plus the glue that turns a model and its params into the
``tokens_to_logits(ids, cache)`` callback that `flaxformer_mini.decoding` needs, and
`stack_layers` / `unstack_layers` between the two parameter layouts of a stack:

  unscanned (default)   ``encoder/layer_{i}/self_attention/query/kernel`` [d_model, heads, head_dim]
  ``cfg.scan_layers``   ``encoder/layers/self_attention/query/kernel``
                        [num_layers, d_model, heads, head_dim]

Under a scanned stack every leaf of a path with a ``layers`` component has a leading
[num_layers] axis; its ``cache`` leaves stay batch-major (see `_run_layers`).
``cfg.remat`` wraps each layer in ``nn.remat`` (not when decoding) without changing paths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxformer_mini import attention as attn_lib
from flaxformer_mini import decoding, sharding
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.layers import (
  DecoderLayer,
  EncoderLayer,
  InputEmbedding,
  make_norm,
  remat_layer,
)
from flaxformer_mini.positions import RelativePositionBias

Array = jax.Array


def _check_ids(cfg: TransformerConfig, ids: Array, what: str,
               vocab_size: int | None = None) -> None:
  """Shape, dtype and length of [batch, length] ids; their range too when they are concrete.

  Out-of-range ids would otherwise read NaN embeddings (``jnp.take``'s fill mode). The
  range check runs on eager calls only: under ``jit`` the values are not known.
  """
  if ids.ndim != 2:
    raise ValueError(f"expected {what} of shape [batch, length], got {ids.shape}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"expected integer token ids for {what}, got dtype {ids.dtype}")
  if ids.shape[1] > cfg.max_len:
    raise ValueError(f"{what} length {ids.shape[1]} exceeds max_len={cfg.max_len}")
  if vocab_size is None or ids.size == 0:
    return
  values = decoding.host_ids(ids)
  if values is not None:
    decoding.check_token_ids(values, vocab_size, what)


def _default_positions(ids: Array, positions: Array | None) -> Array:
  if positions is None:
    return jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
  return positions


def make_embedding(cfg: TransformerConfig, vocab_size: int, name: str) -> nn.Embed:
  """Token embedding [vocab_size, d_model], N(0, std²) init.

  std = ``cfg.embedding_init_std``, by default d_model^-0.5 when the embeddings are
  scaled by sqrt(d_model) (so they enter at unit scale) and 1.0 otherwise (T5, whose
  tied logits are rescaled by ``scale_tied_logits``). Unscaled, tied GPT/Llama-style LMs
  want a small std (e.g. 0.02), else the initial logits have std ~sqrt(d_model).
  """
  std = cfg.embedding_init_std
  if std is None:
    std = cfg.d_model ** -0.5 if cfg.scale_embeddings else 1.0
  return nn.Embed(vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(stddev=std),
                  dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


# ---------------------------------------------------------------------------
# The layer stack: a Python loop of ``layer_{i}`` modules, or one scanned ``layers``.
# ---------------------------------------------------------------------------

SCANNED_LAYERS = "layers"  # module name of a scanned stack; its leaves lead with [num_layers]


def _run_layers(layer_cls: type, cfg: TransformerConfig, num_layers: int, x: Array,
                args: Sequence[Any], static: Sequence[bool], *, decode: bool = False,
                **layer_kwargs) -> Array:
  """Applies ``num_layers`` layers ``layer_cls(cfg, **layer_kwargs)`` to ``x``
  [batch, len, d_model].

  Call from a compact method: the layers become children of the calling module.
  ``args`` (arrays or None, the same for every layer) and ``static`` (the Python
  bools ``deterministic`` [, ``decode``]) follow ``x`` positionally.

  Unscanned: children ``layer_0`` .. ``layer_{n-1}``. With ``cfg.scan_layers``: one
  child ``layers`` run by ``nn.scan``; every param (and ``intermediates``) leaf gets
  a leading [num_layers] axis. Its ``cache`` is stored batch-major instead, since
  `flaxformer_mini.decoding` reads every cache leaf with ndim >= 1 as [batch, ...]:
  ``cached_key`` [batch, num_layers, kv_heads, max_len, head_dim] (likewise
  ``cached_value`` and the cross ``cross_key``/``cross_value``) and one scalar
  ``cache_index``; ``nn.map_variables`` converts to and from the [num_layers, ...]
  layout the scan slices (a transpose of the cache per decode step).
  """
  if not cfg.scan_layers:
    cls = remat_layer(layer_cls, cfg, decode=decode)
    for i in range(num_layers):
      x = cls(cfg, **layer_kwargs, name=f"layer_{i}")(x, *args, *static)
    return x

  cls = remat_layer(layer_cls, cfg, decode=decode, prevent_cse=False)

  def body(layer, carry, *xs):
    return layer(carry, *xs, *static), None

  stack = nn.scan(body, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                  split_rngs={"params": True, "dropout": True},
                  in_axes=(nn.broadcast,) * len(args), length=num_layers)
  if decode:
    is_index = lambda path: getattr(path[-1], "key", None) == "cache_index"

    def to_scan(variables):  # [batch, L, ...] -> [L, batch, ...]; index -> [L, ...]
      return jax.tree_util.tree_map_with_path(
          lambda p, v: (jnp.broadcast_to(v, (num_layers,) + v.shape) if is_index(p)
                        else jnp.moveaxis(v, 1, 0)), variables)

    # All layers step together, so their cache_index values are equal: keep one
    # (a scalar, or [batch] when rows decode at different steps).
    def from_scan(variables):  # [L, batch, ...] -> [batch, L, ...]; index [L, ...] -> [...]
      return jax.tree_util.tree_map_with_path(
          lambda p, v: v[0] if is_index(p) else jnp.moveaxis(v, 0, 1), variables)

    stack = nn.map_variables(stack, "cache", to_scan, from_scan, mutable=True)
  x, _ = stack(cls(cfg, **layer_kwargs, name=SCANNED_LAYERS), x, *args)
  return x


class Encoder(nn.Module):
  """Embedding + positions, ``num_encoder_layers`` x `EncoderLayer`, optional final norm.

  The layers are ``layer_{i}``, or one scanned ``layers`` with ``cfg.scan_layers``.
  """

  cfg: TransformerConfig
  embed: nn.Module

  @nn.compact
  def __call__(self, inputs: Array, segmentation: Array | None = None,
               positions: Array | None = None, *, deterministic: bool = True) -> Array:
    """inputs: [batch, src_len] ids; segmentation/positions: [batch, src_len] (packed inputs).

    Returns:
      [batch, src_len, d_model].
    """
    cfg = self.cfg
    _check_ids(cfg, inputs, "inputs", getattr(self.embed, "num_embeddings", None))
    positions = _default_positions(inputs, positions)
    x = InputEmbedding(cfg, self.embed, name="input_embedding")(
        inputs, positions, deterministic=deterministic)
    mask = attn_lib.encoder_self_attention_mask(inputs != cfg.pad_id, segmentation)
    bias = None
    if cfg.position_kind == "relative":
      bias = RelativePositionBias(cfg.num_heads, True, cfg.relative_num_buckets,
                                  cfg.relative_max_distance, cfg.param_dtype,
                                  name="relative_bias")(positions, positions)
    x = _run_layers(EncoderLayer, cfg, cfg.num_encoder_layers, x, (mask, bias, positions),
                    (deterministic,))
    if cfg.use_final_norm:
      x = make_norm(cfg, "final_norm")(x)
    return x


class Decoder(nn.Module):
  """Embedding + positions, ``num_decoder_layers`` x `DecoderLayer`, final norm, logits.

  ``cross=False`` drops cross-attention (decoder-only language model). The layers are
  ``layer_{i}``, or one scanned ``layers`` with ``cfg.scan_layers``.
  """

  cfg: TransformerConfig
  embed: nn.Module
  cross: bool = True

  @nn.compact
  def __call__(self, decoder_inputs: Array, encoded: Array | None = None,
               encoder_valid: Array | None = None, *,
               segmentation: Array | None = None,
               encoder_segmentation: Array | None = None,
               positions: Array | None = None,
               deterministic: bool = True, decode: bool = False) -> Array:
    """Logits for each decoder position.

    Args:
      decoder_inputs: [batch, tgt_len] ids (targets shifted right, BOS first).
      encoded: [batch, src_len, d_model] encoder output (cross=True).
      encoder_valid: [batch, src_len] bool, real (non-pad) source tokens.
      segmentation / encoder_segmentation: [batch, tgt_len] / [batch, src_len]
        segment ids of packed examples (replace the padding masks).
      positions: [batch, tgt_len] positions within each packed example.
      decode: incremental decoding. The first call with the full-length
        ``decoder_inputs`` (and ``encoded``, ``encoder_valid``) creates the
        ``cache`` collection; each later call takes ``[batch, 1]`` ids and
        reads everything else from the cache. Per layer ``cached_key`` is
        [batch, kv_heads, max_len, head_dim]; scanned, ``layers/.../cached_key`` is
        [batch, num_layers, kv_heads, max_len, head_dim] (layer axis second).

    Returns:
      [batch, tgt_len, out_vocab_size] float32 logits.
    """
    cfg = self.cfg
    _check_ids(cfg, decoder_inputs, "decoder_inputs",
               getattr(self.embed, "num_embeddings", None))
    stepping = decode and self.has_variable("cache", "decode_index")
    self_bias = None
    if stepping:
      if decoder_inputs.shape[1] != 1:
        raise ValueError(f"a decode step takes [batch, 1] ids, got {decoder_inputs.shape}")
      index_var = self.variable("cache", "decode_index", lambda: jnp.array(0, jnp.int32))
      index = index_var.value
      index_var.value = index + 1
      if index.ndim:  # one step per row; a row past max_len is a finished one, kept in range
        index = jnp.minimum(index, cfg.max_len - 1)[:, None]
      positions = jnp.broadcast_to(index, decoder_inputs.shape)
      self_mask = None  # the attention caches mask keys beyond the current step
      cross_mask = None
      if self.cross:
        valid = self.variable("cache", "encoder_valid", lambda: None).value
        cross_mask = attn_lib.cross_attention_mask(None, valid)  # [batch, 1, 1, src_len]
      # cached_key: [batch, kv_heads, max_decode_len, head_dim], or
      # [batch, num_layers, kv_heads, max_decode_len, head_dim] when scanned
      layer = SCANNED_LAYERS if cfg.scan_layers else "layer_0"
      max_len = self.variables["cache"][layer]["self_attention"]["cached_key"].shape[-2]
      k_positions = jnp.arange(max_len, dtype=jnp.int32)[None, :]
    else:
      positions = _default_positions(decoder_inputs, positions)
      if decode:  # creating the cache
        self.variable("cache", "decode_index", lambda: jnp.array(0, jnp.int32))
        if self.cross:
          self.variable("cache", "encoder_valid", lambda: encoder_valid.astype(bool))
      valid = decoder_inputs != cfg.pad_id
      self_mask = attn_lib.decoder_self_attention_mask(valid, segmentation)
      cross_mask = None
      if self.cross:
        cross_mask = attn_lib.cross_attention_mask(
            valid, encoder_valid, decoder_segmentation=segmentation,
            encoder_segmentation=encoder_segmentation)
      k_positions = positions
    if cfg.position_kind == "relative":
      self_bias = RelativePositionBias(cfg.num_heads, False, cfg.relative_num_buckets,
                                       cfg.relative_max_distance, cfg.param_dtype,
                                       name="relative_bias")(positions, k_positions)
    x = InputEmbedding(cfg, self.embed, name="input_embedding")(
        decoder_inputs, positions, deterministic=deterministic)
    x = _run_layers(DecoderLayer, cfg, cfg.num_decoder_layers, x,
                    (encoded, self_mask, cross_mask, self_bias, positions),
                    (deterministic, decode), decode=decode, cross=self.cross)
    if cfg.use_final_norm:
      x = make_norm(cfg, "final_norm")(x)
    if cfg.tie_output:
      if cfg.scale_tied_logits:
        x = x * cfg.d_model ** -0.5
      logits = self.embed.attend(x.astype(cfg.dtype))
    else:
      logits = nn.Dense(cfg.out_vocab_size, use_bias=cfg.use_bias, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, name="logits")(x)
    return sharding.constrain(logits.astype(jnp.float32), sharding.LOGITS)


class Transformer(nn.Module):
  """The encoder-decoder Transformer of "Attention Is All You Need", configurable.

  Example:
    >>> cfg = TransformerConfig(vocab_size=100, d_model=32, num_heads=4, d_ff=64,
    ...                         num_encoder_layers=2, num_decoder_layers=2)
    >>> model = Transformer(cfg)
    >>> src = jnp.ones((2, 7), jnp.int32); tgt = jnp.ones((2, 5), jnp.int32)
    >>> params = model.init(jax.random.key(0), src, tgt)["params"]
    >>> model.apply({"params": params}, src, tgt).shape
    (2, 5, 100)
  """

  cfg: TransformerConfig

  def setup(self):
    cfg = self.cfg
    if cfg.share_embeddings:
      if cfg.out_vocab_size != cfg.vocab_size:
        raise ValueError(f"share_embeddings needs output_vocab_size == vocab_size, got "
                         f"{cfg.out_vocab_size} != {cfg.vocab_size}")
      encoder_embed = decoder_embed = make_embedding(cfg, cfg.vocab_size, "embedding")
    else:
      encoder_embed = make_embedding(cfg, cfg.vocab_size, "encoder_embedding")
      decoder_embed = make_embedding(cfg, cfg.out_vocab_size, "decoder_embedding")
    self.encoder = Encoder(cfg, encoder_embed)
    self.decoder = Decoder(cfg, decoder_embed, cross=True)

  def encode(self, inputs: Array, inputs_segmentation: Array | None = None,
             inputs_positions: Array | None = None, *, deterministic: bool = True) -> Array:
    """inputs: [batch, src_len] ids -> [batch, src_len, d_model]."""
    return self.encoder(inputs, inputs_segmentation, inputs_positions,
                        deterministic=deterministic)

  def decode(self, encoded: Array | None, inputs: Array | None, decoder_inputs: Array, *,
             inputs_segmentation: Array | None = None,
             targets_segmentation: Array | None = None,
             targets_positions: Array | None = None,
             deterministic: bool = True, decode: bool = False) -> Array:
    """Decoder logits [batch, tgt_len, vocab] given the encoder output.

    ``inputs`` ([batch, src_len] ids) give the source padding mask. For
    ``decode=True`` steps ``encoded`` and ``inputs`` may be None (cached).
    """
    encoder_valid = None
    if inputs is not None:
      encoder_valid = (inputs_segmentation > 0 if inputs_segmentation is not None
                       else inputs != self.cfg.pad_id)
    return self.decoder(decoder_inputs, encoded, encoder_valid,
                        segmentation=targets_segmentation,
                        encoder_segmentation=inputs_segmentation,
                        positions=targets_positions, deterministic=deterministic,
                        decode=decode)

  def __call__(self, inputs: Array, decoder_inputs: Array, *,
               inputs_segmentation: Array | None = None,
               targets_segmentation: Array | None = None,
               inputs_positions: Array | None = None,
               targets_positions: Array | None = None,
               deterministic: bool = True) -> Array:
    """inputs: [batch, src_len], decoder_inputs: [batch, tgt_len] -> logits
    [batch, tgt_len, vocab]."""
    encoded = self.encode(inputs, inputs_segmentation, inputs_positions,
                          deterministic=deterministic)
    return self.decode(encoded, inputs, decoder_inputs,
                       inputs_segmentation=inputs_segmentation,
                       targets_segmentation=targets_segmentation,
                       targets_positions=targets_positions, deterministic=deterministic)


class DecoderOnlyLM(nn.Module):
  """Decoder-only language model (GPT / Llama style, by config): `Decoder` without
  cross-attention."""

  cfg: TransformerConfig

  def setup(self):
    self.embedding = make_embedding(self.cfg, self.cfg.vocab_size, "embedding")
    self.decoder = Decoder(self.cfg, self.embedding, cross=False)

  def __call__(self, inputs: Array, *, segmentation: Array | None = None,
               positions: Array | None = None, deterministic: bool = True,
               decode: bool = False) -> Array:
    """inputs: [batch, length] ids -> [batch, length, vocab] next-token logits."""
    return self.decoder(inputs, segmentation=segmentation, positions=positions,
                        deterministic=deterministic, decode=decode)


# ---------------------------------------------------------------------------
# Converting params between the unscanned (layer_{i}) and scanned (layers) layouts.
# ---------------------------------------------------------------------------

_STACKS = (("encoder", "num_encoder_layers"), ("decoder", "num_decoder_layers"))


def stack_layers(params: Mapping[str, Any], cfg: TransformerConfig) -> dict:
  """Params of an unscanned `Transformer` / `DecoderOnlyLM` -> those of ``scan_layers=True``.

  ``{encoder,decoder}/layer_{i}/...`` leaves of shape S become one
  ``{encoder,decoder}/layers/...`` leaf of shape [num_layers, *S] (row i = layer i);
  everything else is passed through. Also fits a tree of the same structure
  (e.g. optimizer moments). ``params`` is the ``params`` collection, not
  ``{"params": ...}``.
  """
  out = dict(params)
  for stack, num_key in _STACKS:
    if stack not in out:
      continue
    sub, n = dict(out[stack]), getattr(cfg, num_key)
    names = [f"layer_{i}" for i in range(n)]
    missing = [k for k in names if k not in sub]
    if missing or SCANNED_LAYERS in sub:
      raise ValueError(f"stack_layers: {stack} needs unscanned layer_0..layer_{n - 1} "
                       f"({num_key}={n}); missing {missing}, has {sorted(sub)}")
    layers = [sub.pop(k) for k in names]
    extra = sorted(k for k in sub if k.startswith("layer_"))
    if extra:
      raise ValueError(f"stack_layers: {stack} has more layers than {num_key}={n}: {extra}")
    sub[SCANNED_LAYERS] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    out[stack] = sub
  return out


def unstack_layers(params: Mapping[str, Any], cfg: TransformerConfig) -> dict:
  """Inverse of `stack_layers`: ``{encoder,decoder}/layers/...`` [num_layers, *S] ->
  ``layer_{i}``."""
  out = dict(params)
  for stack, num_key in _STACKS:
    if stack not in out:
      continue
    sub, n = dict(out[stack]), getattr(cfg, num_key)
    if SCANNED_LAYERS not in sub:
      raise ValueError(f"unstack_layers: {stack} has no scanned '{SCANNED_LAYERS}', "
                       f"has {sorted(sub)}")
    layers = sub.pop(SCANNED_LAYERS)
    bad = [x.shape for x in jax.tree_util.tree_leaves(layers) if not x.shape or x.shape[0] != n]
    if bad:
      raise ValueError(f"unstack_layers: {stack}/{SCANNED_LAYERS} leaves must lead with "
                       f"{num_key}={n}, got shapes {bad[:3]}")
    for i in range(n):
      sub[f"layer_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], layers)
    out[stack] = sub
  return out


# ---------------------------------------------------------------------------
# Glue for flaxformer_mini.decoding: (model, params) -> tokens_to_logits, cache.
# ---------------------------------------------------------------------------

TokensToLogits = Callable[[Array, dict], tuple[Array, dict]]

# Cache entries that stay fixed while decoding and are equal across beams
# (pass as ``decoding.beam_search(..., static_cache_keys=STATIC_CACHE_KEYS)``).
STATIC_CACHE_KEYS = ("cross_key", "cross_value", "encoder_valid")


def _grow_self_attention_cache(cache: dict, length: int) -> dict:
  """Zero-pads ``cached_key``/``cached_value`` to ``length`` along their length axis.

  That axis is the second to last both unscanned ([batch, heads, len, head_dim]) and
  scanned ([batch, num_layers, heads, len, head_dim]).
  """
  def grow(path, x):
    if getattr(path[-1], "key", None) in ("cached_key", "cached_value"):
      pad = [(0, 0)] * x.ndim
      pad[-2] = (0, length - x.shape[-2])
      return jnp.pad(x, pad)
    return x
  return jax.tree_util.tree_map_with_path(grow, cache)


def seq2seq_decoding_fns(model: Transformer, params, inputs: Array,
                         max_decode_len: int) -> tuple[TokensToLogits, dict]:
  """Encodes ``inputs`` once and builds the decoder cache.

  Args:
    inputs: [batch, src_len] source ids.
    max_decode_len: cache length (longest output, BOS step included).

  Returns:
    (tokens_to_logits, cache): ``tokens_to_logits(ids [batch, 1], cache) ->
    (logits [batch, vocab] float32, cache)``; cache leaves are
    [batch, ...] except the scalar step indices, scanned or not (a scanned stack
    puts its layer axis second, e.g. ``cached_key`` [batch, num_layers, kv_heads,
    max_decode_len, head_dim]).
  """
  if max_decode_len > model.cfg.max_len:
    raise ValueError(f"max_decode_len={max_decode_len} exceeds the model's "
                     f"max_len={model.cfg.max_len}")
  variables = {"params": params}
  encoded = model.apply(variables, inputs, method=Transformer.encode)
  # Create the cache with a one-token pass (it projects the encoder K/V), then
  # grow the self-attention caches to max_decode_len with zeros.
  dummy = jnp.zeros((inputs.shape[0], 1), jnp.int32)
  _, state = model.apply(variables, encoded, inputs, dummy, decode=True, mutable=["cache"],
                         method=Transformer.decode)
  state = {"cache": _grow_self_attention_cache(state["cache"], max_decode_len)}
  # The barrier materialises the cache as built. Without it XLA sinks the cross-attention
  # K/V transpose ([batch, src_len, heads, head_dim] -> [batch, heads, src_len, head_dim])
  # into the decode loop and redoes it at every step (2 copies per layer per step).
  return seq2seq_step_fn(model, params), jax.lax.optimization_barrier(state["cache"])


def seq2seq_step_fn(model: Transformer, params) -> TokensToLogits:
  """The ``tokens_to_logits(ids [batch, 1], cache) -> (logits [batch, vocab], cache)``
  of `seq2seq_decoding_fns`, for a cache built elsewhere (e.g. `rows_cache`)."""
  def tokens_to_logits(ids: Array, cache: dict):
    logits, new_state = model.apply({"params": params, "cache": cache}, None, None, ids,
                                    decode=True, mutable=["cache"], method=Transformer.decode)
    return logits[:, -1], new_state["cache"]
  return tokens_to_logits


def rows_cache(cache: dict, src_len: int) -> dict:
  """A `seq2seq_decoding_fns` cache made ready for step-level batching
  (`decoding.beam_rows_start`): the scalar step indices become [batch] zeros, one per
  row, and the encoder entries are padded to ``src_len`` source positions (masked).

  ``cross_key``/``cross_value`` [batch, (num_layers,) kv_heads, src, head_dim] and
  ``encoder_valid`` [batch, src] grow along their source axis; ``src_len`` >= src.
  """
  batch = jax.tree_util.tree_leaves(cache["decoder"]["encoder_valid"])[0].shape[0]

  def fix(path, x):
    key = getattr(path[-1], "key", None)
    if key in ("cache_index", "decode_index"):
      return jnp.zeros((batch,), jnp.int32)
    axis = {"cross_key": -2, "cross_value": -2, "encoder_valid": -1}.get(key)
    if axis is None:
      return x
    if x.shape[axis] > src_len:
      raise ValueError(f"{key} has {x.shape[axis]} source positions, more than "
                       f"src_len={src_len}")
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, src_len - x.shape[axis])
    return jnp.pad(x, pad)
  return jax.tree_util.tree_map_with_path(fix, cache)


def lm_decoding_fns(model: DecoderOnlyLM, params, batch_size: int,
                    max_decode_len: int) -> tuple[TokensToLogits, dict]:
  """Like `seq2seq_decoding_fns` for a `DecoderOnlyLM`: an empty cache of ``max_decode_len``."""
  if max_decode_len > model.cfg.max_len:
    raise ValueError(f"max_decode_len={max_decode_len} exceeds the model's "
                     f"max_len={model.cfg.max_len}")
  dummy = jnp.zeros((batch_size, max_decode_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.apply({"params": params}, dummy, decode=True,
                                              mutable=["cache"])[1]["cache"])
  cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def tokens_to_logits(ids: Array, cache: dict):
    logits, new_state = model.apply({"params": params, "cache": cache}, ids, decode=True,
                                    mutable=["cache"])
    return logits[:, -1], new_state["cache"]

  return tokens_to_logits, cache
