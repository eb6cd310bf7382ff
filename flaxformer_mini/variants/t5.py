"""T5 (v1.0 and v1.1) as a configuration of the core `Transformer`, plus the HF importer.

What makes a `Transformer` a T5:

  * pre-norm RMSNorm ("T5 LayerNorm": no mean, no bias, eps 1e-6) and a final norm
    after each stack;
  * no absolute positions: a learned relative-position bias (``position_kind="relative"``),
    bidirectional in the encoder and causal in the decoder, computed once per stack in
    its first layer and shared by all layers; none in cross-attention;
  * unscaled attention logits (``attention_scale=1.0``; T5 folds the 1/sqrt(d) into init)
    and ``head_dim`` (``d_kv``) independent of ``d_model / num_heads``;
  * no biases anywhere, one embedding shared by encoder and decoder, not scaled;
  * v1.0: ReLU feed-forward, logits tied to the embedding after scaling the decoder
    output by ``d_model ** -0.5`` (``scale_tied_logits``);
    v1.1: gated-GELU (tanh) feed-forward, a separate, unscaled output projection.

Hugging Face's T5 starts decoder inputs with ``decoder_start_token_id = pad = 0``.
Our `Transformer` masks ``pad_id`` tokens in an unsegmented full pass, so for a
teacher-forced pass on HF-style inputs give the masks explicitly::

    cfg, params = load_hf_t5(hf_model.state_dict(), hf_model.config)
    logits = Transformer(cfg).apply(
        {"params": params}, input_ids, decoder_input_ids,
        inputs_segmentation=attention_mask,                   # 1 = real token
        targets_segmentation=jnp.ones_like(decoder_input_ids))

Cached decoding (`seq2seq_decoding_fns` + `decoding.greedy_search(bos_id=0, ...)`) needs
nothing special: decoder steps never mask the start token.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.models import Transformer
from flaxformer_mini.variants import hf_import
from flaxformer_mini.variants.hf_import import Rule

_VERSIONS = {  # version -> (ffn_activation, ffn_gated, tie_output)
    "1.0": ("relu", False, True),
    "1.1": ("gelu_tanh", True, False),
}


def t5_config(version: str = "1.1", *, vocab_size: int = 32128, d_model: int = 512,
              num_heads: int = 8, head_dim: int = 64, d_ff: int = 2048,
              num_encoder_layers: int = 6, num_decoder_layers: int | None = None,
              relative_num_buckets: int = 32, relative_max_distance: int = 128,
              dropout_rate: float = 0.1, norm_eps: float = 1e-6, max_len: int = 512,
              pad_id: int = 0, ffn_activation: str | None = None,
              ffn_gated: bool | None = None, tie_output: bool | None = None,
              dtype: Any = jnp.float32) -> TransformerConfig:
  """A T5 `TransformerConfig`; the defaults are T5-small.

  Args:
    version: "1.0" (ReLU, tied and scaled logits) or "1.1" (gated-GELU, untied).
    head_dim: T5's ``d_kv``; ``num_heads * head_dim`` need not equal ``d_model``.
    num_decoder_layers: default ``num_encoder_layers``.
    max_len: longest input/target (relative positions have no table; this bounds
      inputs and decode caches).
    ffn_activation, ffn_gated, tie_output: override the version's choice (HF's
      ``feed_forward_proj`` and ``tie_word_embeddings`` are independent).
  """
  if version not in _VERSIONS:
    raise ValueError(f"version={version!r} is not one of {sorted(_VERSIONS)}")
  act, gated, tied = _VERSIONS[version]
  act = act if ffn_activation is None else ffn_activation
  gated = gated if ffn_gated is None else ffn_gated
  tied = tied if tie_output is None else tie_output
  return TransformerConfig(
      vocab_size=vocab_size, d_model=d_model, num_heads=num_heads, head_dim=head_dim,
      d_ff=d_ff, num_encoder_layers=num_encoder_layers,
      num_decoder_layers=num_encoder_layers if num_decoder_layers is None else num_decoder_layers,
      dropout_rate=dropout_rate, attention_dropout_rate=0.0, max_len=max_len, dtype=dtype,
      norm_placement="pre", norm_kind="rmsnorm", norm_eps=norm_eps, final_norm=True,
      position_kind="relative", relative_num_buckets=relative_num_buckets,
      relative_max_distance=relative_max_distance, ffn_activation=act, ffn_gated=gated,
      use_bias=False, share_embeddings=True, tie_output=tied, scale_embeddings=False,
      scale_tied_logits=tied, attention_scale=1.0, pad_id=pad_id)


def _hf_feed_forward(proj: str) -> tuple[str, bool]:
  """HF ``feed_forward_proj`` ("relu", "gated-gelu", ...) -> (our activation, gated)."""
  gated = proj.startswith("gated-")
  act = proj[len("gated-"):] if gated else proj
  if proj == "gated-gelu":  # HF special case: gated-gelu means the tanh approximation
    return "gelu_tanh", True
  ours = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "silu": "silu"}.get(act)
  if ours is None:
    raise ValueError(f"unsupported T5 feed_forward_proj={proj!r}; supported: relu, gelu, "
                     "gelu_new, silu, each optionally 'gated-'")
  return ours, gated


def config_from_hf_t5(hf_config: Any, *, max_len: int = 512) -> TransformerConfig:
  """`t5_config` from a transformers ``T5Config`` (or its ``to_dict()``)."""
  get = lambda k, *d: hf_import.config_get(hf_config, k, *d)
  act, gated = _hf_feed_forward(get("feed_forward_proj", "relu"))
  tied = bool(get("tie_word_embeddings", True))
  return t5_config(
      "1.0", vocab_size=get("vocab_size"), d_model=get("d_model"), num_heads=get("num_heads"),
      head_dim=get("d_kv"), d_ff=get("d_ff"), num_encoder_layers=get("num_layers"),
      num_decoder_layers=get("num_decoder_layers", None) or get("num_layers"),
      relative_num_buckets=get("relative_attention_num_buckets", 32),
      relative_max_distance=get("relative_attention_max_distance", 128),
      dropout_rate=float(get("dropout_rate", 0.1)),
      norm_eps=float(get("layer_norm_epsilon", 1e-6)), max_len=max_len,
      pad_id=int(get("pad_token_id", 0) or 0), ffn_activation=act, ffn_gated=gated,
      tie_output=tied)


def _attention_rules(ours: tuple, hf: str, heads: int, head_dim: int) -> list[Rule]:
  return [
      Rule(ours + ("query", "kernel"), hf + "q.weight", hf_import.split_heads(heads, head_dim)),
      Rule(ours + ("key", "kernel"), hf + "k.weight", hf_import.split_heads(heads, head_dim)),
      Rule(ours + ("value", "kernel"), hf + "v.weight", hf_import.split_heads(heads, head_dim)),
      Rule(ours + ("out", "kernel"), hf + "o.weight", hf_import.merge_heads(heads, head_dim)),
  ]


def _ffn_rules(ours: tuple, hf: str, gated: bool) -> list[Rule]:
  wi = ["wi_0", "wi_1"] if gated else ["wi"]
  return ([Rule(ours + (w, "kernel"), hf + f"{w}.weight", hf_import.linear) for w in wi]
          + [Rule(ours + ("wo", "kernel"), hf + "wo.weight", hf_import.linear)])


def load_hf_t5(state_dict: Any, hf_config: Any, *, max_len: int = 512
               ) -> tuple[TransformerConfig, dict]:
  """Imports a Hugging Face ``T5ForConditionalGeneration`` into our `Transformer`.

  Args:
    state_dict: the torch model or its ``state_dict()`` (torch tensors or numpy),
      HF names (``encoder.block.{i}.layer.0.SelfAttention.q.weight`` ...).
    hf_config: its ``T5Config`` (or dict); ``feed_forward_proj`` and
      ``tie_word_embeddings`` choose v1.0 / v1.1 behaviour.
    max_len: see `t5_config`.

  Returns:
    (cfg, params) for ``Transformer(cfg)``; params are nested float32 numpy arrays,
    e.g. ``encoder/layer_{i}/self_attention/query/kernel`` [d_model, heads, d_kv] from
    ``q.weight`` [heads * d_kv, d_model] and ``encoder/relative_bias/rel_embedding``
    [num_buckets, heads] from block 0's ``relative_attention_bias.weight``.

  Raises:
    ValueError naming missing or unexpected tensors and shape mismatches.
  """
  cfg = config_from_hf_t5(hf_config, max_len=max_len)
  sd = hf_import.to_numpy_state_dict(state_dict)
  h, hd = cfg.num_heads, cfg.head_size
  rel = "layer.0.SelfAttention.relative_attention_bias.weight"
  rules = [Rule(("embedding", "embedding"), "shared.weight"),
           Rule(("encoder", "relative_bias", "rel_embedding"), f"encoder.block.0.{rel}"),
           Rule(("encoder", "final_norm", "scale"), "encoder.final_layer_norm.weight"),
           Rule(("decoder", "relative_bias", "rel_embedding"), f"decoder.block.0.{rel}"),
           Rule(("decoder", "final_norm", "scale"), "decoder.final_layer_norm.weight")]
  if not cfg.tie_output:
    rules.append(Rule(("decoder", "logits", "kernel"), "lm_head.weight", hf_import.linear))
  for i in range(cfg.num_encoder_layers):
    ours, hf = ("encoder", f"layer_{i}"), f"encoder.block.{i}.layer."
    rules += _attention_rules(ours + ("self_attention",), hf + "0.SelfAttention.", h, hd)
    rules += [Rule(ours + ("norm_attention", "scale"), hf + "0.layer_norm.weight"),
              Rule(ours + ("norm_ffn", "scale"), hf + "1.layer_norm.weight")]
    rules += _ffn_rules(ours + ("ffn",), hf + "1.DenseReluDense.", cfg.ffn_gated)
  for i in range(cfg.num_decoder_layers):
    ours, hf = ("decoder", f"layer_{i}"), f"decoder.block.{i}.layer."
    rules += _attention_rules(ours + ("self_attention",), hf + "0.SelfAttention.", h, hd)
    rules += _attention_rules(ours + ("cross_attention",), hf + "1.EncDecAttention.", h, hd)
    rules += [Rule(ours + ("norm_self_attention", "scale"), hf + "0.layer_norm.weight"),
              Rule(ours + ("norm_cross_attention", "scale"), hf + "1.layer_norm.weight"),
              Rule(ours + ("norm_ffn", "scale"), hf + "2.layer_norm.weight")]
    rules += _ffn_rules(ours + ("ffn",), hf + "2.DenseReluDense.", cfg.ffn_gated)

  # Copies of the shared embedding that HF's state dict lists under more names.
  copies = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
  if cfg.tie_output:
    copies.append("lm_head.weight")
  for name in copies:
    shared = sd.get("shared.weight")
    if name in sd and shared is not None and not (
        sd[name].shape == shared.shape and np.array_equal(sd[name], shared)):
      raise ValueError(f"{name} differs from shared.weight, but this T5 ties them "
                       f"(tie_word_embeddings={cfg.tie_output})")
  expected = hf_import.expected_params(Transformer(cfg), jnp.zeros((1, 1), jnp.int32),
                                       jnp.zeros((1, 1), jnp.int32))
  params = hf_import.assemble(rules, sd, expected, ignore=lambda n: n in copies,
                              what="T5 checkpoint")
  return cfg, params
