"""configs/summarize_debian.py with a small T5 v1.1 model instead of the paper Transformer.

    python3 train.py --config=configs/summarize_debian_t5.py --workdir=runs/summarize_t5

The model is `flaxformer_mini.variants.t5.t5_config('1.1', ...)` (RMSNorm, relative position
bias, gated-GELU, no biases, untied output) at the size of configs/t5_small.py.
"""

import dataclasses

import ml_collections

from configs import summarize_debian
from flaxformer_mini.variants import t5


def get_config():
  c = summarize_debian.get_config()
  model = t5.t5_config('1.1', vocab_size=8000, d_model=256, num_heads=4, head_dim=64,
                       d_ff=640, num_encoder_layers=3, max_len=128, dropout_rate=0.1)
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
  fields.update(dtype='float32', param_dtype='float32')  # JSON-able names, not numpy types
  c.model = ml_collections.ConfigDict(fields)
  c.data.vocab_size = c.model.get_ref('vocab_size')
  c.num_train_steps = 700             # its step costs more: the same 60-minute CPU budget
  return c
