"""flaxformer_mini: a compact, readable Transformer library in JAX/Flax."""

from flaxformer_mini.attention import (
  MultiHeadAttention,
  causal_mask,
  combine_masks,
  dot_product_attention,
  padding_mask,
  segment_mask,
)
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.layers import DecoderLayer, EncoderLayer, FeedForward
from flaxformer_mini.models import (
  Decoder,
  DecoderOnlyLM,
  Encoder,
  Transformer,
  lm_decoding_fns,
  seq2seq_decoding_fns,
)
from flaxformer_mini.positions import (
  apply_rotary,
  relative_position_bucket,
  sinusoidal_encoding,
  sinusoidal_table,
)

__version__ = "0.1.0"
