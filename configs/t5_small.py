"""A small T5 v1.1-style Transformer for pt->en translation (the default translation task).

    python train.py --config=configs/t5_small.py --workdir=runs/t5_small

Same data and schedule as configs/default.py; the model is
`flaxformer_mini.variants.t5.t5_config('1.1', vocab_size=8000, d_model=256, num_heads=4,
head_dim=64, d_ff=640, num_encoder_layers=3, max_len=128)` spelled out: pre-norm RMSNorm,
relative position bias (32 buckets, max distance 128, shared per stack), unscaled
attention, gated-GELU feed-forward, no biases, shared unscaled embedding, untied output.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.base_config()
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=8000, d_model=256, num_heads=4, head_dim=64, d_ff=640,
      num_encoder_layers=3, num_decoder_layers=3, dropout_rate=0.1,
      attention_dropout_rate=0.0, max_len=128, norm_placement='pre', norm_kind='rmsnorm',
      norm_eps=1e-6, final_norm=True, position_kind='relative', relative_num_buckets=32,
      relative_max_distance=128, ffn_activation='gelu_tanh', ffn_gated=True, use_bias=False,
      share_embeddings=True, tie_output=False, scale_embeddings=False,
      scale_tied_logits=False, attention_scale=1.0, dtype='float32'))
  c.data.vocab_size = c.model.get_ref('vocab_size')
  # T5 trains with a constant-then-rsqrt schedule (Adafactor); with Adam the library's
  # rsqrt schedule works as for the paper model.
  return c
