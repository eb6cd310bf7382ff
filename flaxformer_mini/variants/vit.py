"""Vision Transformer (ViT, Dosovitskiy et al. 2020), composed from the core.

  images [b, H, W, C]
    -> `patchify`: non-overlapping p x p patches, row-major      [b, N, p*p*C]
    -> `PatchEmbedding`: one dense over each patch                [b, N, d]
       (the same as a p x p convolution with stride p)
    -> prepend a learned class token                              [b, 1 + N, d]
    -> + `LearnedPositions`, dropout
    -> ``num_encoder_layers`` x core `EncoderLayer` (pre-LN by default), final norm
    -> dense head on the class token                              [b, num_classes]

``N = (H / p) * (W / p)``; images are channels-last (NHWC).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.dropout import Dropout
from flaxformer_mini.layers import EncoderLayer, make_norm
from flaxformer_mini.positions import LearnedPositions

Array = jax.Array


def vit_encoder_config(**overrides) -> TransformerConfig:
  """The `TransformerConfig` of a ViT encoder: pre-LN, GELU, learned positions, final norm.

  Defaults are a tiny model; pass any `TransformerConfig` field to override.
  """
  fields = dict(vocab_size=1, d_model=64, num_heads=4, d_ff=128, num_encoder_layers=4,
                num_decoder_layers=0, dropout_rate=0.0, attention_dropout_rate=0.0, max_len=65,
                norm_placement="pre", norm_eps=1e-6, position_kind="learned",
                ffn_activation="gelu", scale_embeddings=False)
  fields.update(overrides)
  return TransformerConfig(**fields)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """A `TransformerConfig` for the encoder plus the image geometry and the head.

  Attributes:
    encoder: the stack; ``max_len`` must be >= 1 + num_patches (class token).
    image_size: (height, width) in pixels.
    patch_size: side of the square, non-overlapping patches; divides both sides.
    num_channels: C of the NHWC input.
    num_classes: outputs of the head.
  """

  encoder: TransformerConfig = dataclasses.field(default_factory=vit_encoder_config)
  image_size: tuple[int, int] = (8, 8)
  patch_size: int = 2
  num_channels: int = 1
  num_classes: int = 10

  def __post_init__(self):
    if isinstance(self.image_size, int):
      object.__setattr__(self, "image_size", (self.image_size, self.image_size))
    object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
    h, w = self.image_size
    p = self.patch_size
    if p < 1 or h % p or w % p:
      raise ValueError(f"patch_size={p} must divide image_size={self.image_size}")
    for key in ("num_channels", "num_classes"):
      if int(getattr(self, key)) < 1:
        raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
    if self.encoder.position_kind != "learned":
      raise ValueError(f"ViT uses learned positions: encoder.position_kind must be 'learned', "
                       f"got {self.encoder.position_kind!r}")
    if self.encoder.max_len < self.num_tokens:
      raise ValueError(f"encoder.max_len={self.encoder.max_len} < 1 + num_patches = "
                       f"{self.num_tokens} (image_size={self.image_size}, patch_size={p})")

  @property
  def num_patches(self) -> int:
    return (self.image_size[0] // self.patch_size) * (self.image_size[1] // self.patch_size)

  @property
  def num_tokens(self) -> int:
    return 1 + self.num_patches

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ViTConfig:
    """From ``{"encoder": {...TransformerConfig fields}, "patch_size": 2, ...}``.

    The ``encoder`` block overrides `vit_encoder_config` defaults; ``encoder.max_len``
    defaults to 1 + num_patches. Unknown keys are an error.
    """
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)  # also an ml_collections ConfigDict
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown ViT config key(s) {unknown}; valid keys: {sorted(names)}")
    size = d.get("image_size", cls.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    p = max(int(d.get("patch_size", cls.patch_size)), 1)
    enc = dict(vit_encoder_config().__dict__)
    enc["max_len"] = 1 + (size[0] // p) * (size[1] // p)
    enc.update(dict(d.pop("encoder", {})))
    return cls(encoder=TransformerConfig.from_dict(enc), **d)


def patchify(images: Array, patch_size: int) -> Array:
  """Cuts images into non-overlapping square patches, row-major over the patch grid.

  Args:
    images: [b, H, W, C]; H and W divisible by ``patch_size`` (p).

  Returns:
    [b, (H/p) * (W/p), p * p * C]; patch n = (row n // (W/p), column n % (W/p)),
    its pixels flattened in (y, x, channel) order.
  """
  if images.ndim != 4:
    raise ValueError(f"expected images [batch, height, width, channels], got {images.shape}")
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"patch_size={p} does not divide image height/width {(h, w)}")
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)                   # [b, H/p, W/p, p, p, C]
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class PatchEmbedding(nn.Module):
  """Linear projection of flattened patches: ``kernel`` [p*p*C, d], ``bias`` [d].

  Equals ``nn.Conv(d, (p, p), strides=(p, p))`` with kernel ``kernel.reshape(p, p, C, d)``.
  """

  patch_size: int
  d_model: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """images: [b, H, W, C] -> [b, N, d]."""
    patches = patchify(images, self.patch_size)
    return nn.Dense(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.initializers.lecun_normal(), name="projection")(patches)


class ViT(nn.Module):
  """ViT classifier. Params: ``patch_embedding``, ``cls_token`` [1, 1, d],
  ``position_embedding`` [1 + N, d], ``layer_i``, ``final_norm``, ``head``.

  Example:
    >>> cfg = ViTConfig.from_dict({"image_size": (8, 8), "patch_size": 2})
    >>> images = jnp.zeros((3, 8, 8, 1))
    >>> params = ViT(cfg).init(jax.random.key(0), images)["params"]
    >>> ViT(cfg).apply({"params": params}, images).shape
    (3, 10)
  """

  cfg: ViTConfig

  def setup(self):
    enc = self.cfg.encoder
    self.patch_embedding = PatchEmbedding(self.cfg.patch_size, enc.d_model, enc.dtype,
                                          enc.param_dtype)
    self.cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, enc.d_model),
                                enc.param_dtype)
    self.position_embedding = LearnedPositions(self.cfg.num_tokens, enc.d_model,
                                               enc.param_dtype)
    self.dropout = Dropout(enc.dropout_rate, enc.dropout_impl)
    self.layers = [EncoderLayer(enc, name=f"layer_{i}") for i in range(enc.num_encoder_layers)]
    if enc.use_final_norm:
      self.final_norm = make_norm(enc, "final_norm")
    self.head = nn.Dense(self.cfg.num_classes, dtype=enc.dtype, param_dtype=enc.param_dtype,
                         kernel_init=nn.initializers.zeros)

  def embed(self, images: Array, *, deterministic: bool = True) -> Array:
    """images: [b, H, W, C] -> tokens [b, 1 + N, d]: [class token; patches] + positions."""
    expected = (*self.cfg.image_size, self.cfg.num_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"expected images [batch, {expected[0]}, {expected[1]}, {expected[2]}] "
                       f"(image_size, num_channels), got {images.shape}")
    x = self.patch_embedding(images.astype(self.cfg.encoder.dtype))
    cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    positions = jnp.arange(self.cfg.num_tokens)[None, :]
    x = x + self.position_embedding(positions).astype(x.dtype)
    return self.dropout(x, deterministic=deterministic)

  def encode(self, images: Array, *, deterministic: bool = True) -> Array:
    """images: [b, H, W, C] -> [b, 1 + N, d] encoder output (after the final norm)."""
    x = self.embed(images, deterministic=deterministic)
    for layer in self.layers:
      x = layer(x, None, deterministic=deterministic)
    if self.cfg.encoder.use_final_norm:
      x = self.final_norm(x)
    return x

  def __call__(self, images: Array, *, deterministic: bool = True) -> Array:
    """images: [b, H, W, C] -> [b, num_classes] float32 logits from the class token."""
    x = self.encode(images, deterministic=deterministic)
    return self.head(x[:, 0]).astype(jnp.float32)
