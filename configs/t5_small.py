"""A small T5 v1.1-style Transformer for pt->en translation (the default translation task).

    python train.py --config=configs/t5_small.py --workdir=runs/t5_small

Same data and schedule as configs/default.py; the model is
`flaxformer_mini.variants.t5.t5_config('1.1', ...)`: pre-norm RMSNorm, relative position
bias (32 buckets, max distance 128, shared per stack), unscaled attention, gated-GELU
feed-forward, no biases, shared unscaled embedding, untied output.
"""

import ml_collections

from configs import common
from flaxformer_mini.variants import t5

# Also the model of configs/summarize_debian_t5.py.
MODEL = t5.t5_config('1.1', vocab_size=8000, d_model=256, num_heads=4, head_dim=64, d_ff=640,
                     num_encoder_layers=3, max_len=128)


def get_config() -> ml_collections.ConfigDict:
  c = common.base_config()
  c.model = common.model_section(MODEL)
  c.data.vocab_size = c.model.get_ref('vocab_size')
  # T5 trains with a constant-then-rsqrt schedule (Adafactor); with Adam the library's
  # rsqrt schedule works as for the paper model.
  return c
