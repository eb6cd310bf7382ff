"""`TransformerConfig`: the one small frozen dataclass every module takes.

Experiments are ConfigDicts in ``configs/``; `TransformerConfig.from_dict`
turns their ``model`` block into this dataclass and rejects unknown keys, and
`TransformerConfig.to_dict` writes a preset back as such a block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

_CHOICES = {
    "norm_placement": ("post", "pre"),
    "norm_kind": ("layernorm", "rmsnorm"),
    "position_kind": ("sinusoidal", "learned", "rotary", "relative", "none"),
    "ffn_activation": ("relu", "gelu", "gelu_tanh", "silu"),
    "dropout_impl": ("hash", "threefry"),
    "remat": ("none", "full", "dots"),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of a Transformer stack (encoder-decoder or decoder-only).

  The defaults are the base model of "Attention Is All You Need".

  ``remat`` and ``scan_layers`` trade compute / layout for memory and compile time
  without changing the function computed: ``remat="full"`` recomputes each layer in
  the backward pass (``jax.checkpoint``, nothing saved), ``"dots"`` saves the matmul
  outputs without batch dims and recomputes the rest; ``scan_layers`` runs each stack
  as ``nn.scan`` over one layer, so params live under ``layers`` with a leading
  [num_layers] axis (``models.stack_layers`` converts unscanned params).
  """

  vocab_size: int = 32000
  output_vocab_size: int | None = None         # default: vocab_size
  d_model: int = 512
  num_heads: int = 8
  num_kv_heads: int | None = None              # grouped-query attention; default num_heads
  head_dim: int | None = None                  # default d_model // num_heads
  d_ff: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dropout_rate: float = 0.1                    # residual, embedding and FFN-hidden dropout
  attention_dropout_rate: float = 0.0          # dropout on attention weights
  dropout_impl: str = "hash"                   # keep-mask generator (dropout.py); "threefry" = flax
  max_len: int = 256                           # longest sequence for absolute positions
  dtype: Any = jnp.float32                     # compute dtype
  param_dtype: Any = jnp.float32
  norm_placement: str = "post"                 # "post" (paper) or "pre"
  norm_kind: str = "layernorm"                 # or "rmsnorm"
  norm_eps: float = 1e-5
  final_norm: bool | None = None               # norm after each stack; default: pre-LN only
  position_kind: str = "sinusoidal"            # sinusoidal | learned | rotary | relative | none
  rotary_base: float = 10000.0
  relative_num_buckets: int = 32
  relative_max_distance: int = 128
  ffn_activation: str = "relu"                 # relu | gelu | gelu_tanh | silu
  ffn_gated: bool = False                      # GLU variants: act(x W0) * (x W1)
  use_bias: bool = True
  fused_qkv: bool = False
  share_embeddings: bool = True                # encoder and decoder share the input embedding
  tie_output: bool = True                      # logits = decoder output · embeddingᵀ
  scale_embeddings: bool = True                # multiply embeddings by sqrt(d_model)
  embedding_init_std: float | None = None      # default d_model^-0.5 if scale_embeddings else 1.0
  scale_tied_logits: bool = False              # T5: output * d_model^-0.5 before tied logits
  attention_scale: float | None = None         # default 1/sqrt(head_dim); T5 uses 1.0
  pad_id: int = 0
  # Memory / compile-time knobs of the core Encoder/Decoder stacks (models.py):
  remat: str = "none"                          # none | full (save nothing) | dots (save matmuls)
  scan_layers: bool = False                    # nn.scan over one layer: params under `layers`
                                               # with a leading [num_layers] axis

  def __post_init__(self):
    for key, allowed in _CHOICES.items():
      if getattr(self, key) not in allowed:
        raise ValueError(f"{key}={getattr(self, key)!r} is not one of {allowed}")
    for key in ("vocab_size", "d_model", "num_heads", "d_ff", "max_len"):
      if int(getattr(self, key)) < 1:
        raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
    if self.num_heads % self.kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.kv_heads}")
    for key in ("dropout_rate", "attention_dropout_rate"):
      if not 0.0 <= getattr(self, key) < 1.0:
        raise ValueError(f"{key}={getattr(self, key)} must be in [0, 1)")
    if self.embedding_init_std is not None and not self.embedding_init_std > 0:
      raise ValueError(f"embedding_init_std={self.embedding_init_std} must be > 0")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"scan_layers={self.scan_layers!r} must be a bool")
    if self.position_kind == "rotary" and self.head_size % 2:
      raise ValueError(f"position_kind='rotary' needs an even head_dim, got {self.head_size}")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def out_vocab_size(self) -> int:
    return self.output_vocab_size or self.vocab_size

  @property
  def use_final_norm(self) -> bool:
    return self.norm_placement == "pre" if self.final_norm is None else self.final_norm

  def replace(self, **changes) -> TransformerConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> TransformerConfig:
    """Builds a config from a mapping (e.g. ``config.model`` of a ConfigDict).

    dtypes may be given as strings ("bfloat16"). Unknown keys are an error.
    """
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {sorted(names)}")
    for key in ("dtype", "param_dtype"):
      if isinstance(d.get(key), str):
        if d[key] not in _DTYPES:
          raise ValueError(f"model.{key}={d[key]!r} is not one of {sorted(_DTYPES)}")
        d[key] = _DTYPES[d[key]]
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    """Every field, dtypes by name: JSON-able, and ``from_dict(cfg.to_dict()) == cfg``.

    What a config file stores as its ``model`` section when it starts from a preset
    (``llama.llama_config(...)``, ``t5.t5_config(...)``).
    """
    d = dataclasses.asdict(self)
    for key in ("dtype", "param_dtype"):
      d[key] = jnp.dtype(d[key]).name
    return d
