"""configs/summarize_debian.py with a small T5 v1.1 model instead of the paper Transformer.

    python3 train.py --config=configs/summarize_debian_t5.py --workdir=runs/summarize_t5

The model is `flaxformer_mini.variants.t5.t5_config('1.1', ...)` (RMSNorm, relative position
bias, gated-GELU, no biases, untied output) at the size of configs/t5_small.py.
"""

from configs import common, summarize_debian, t5_small


def get_config():
  c = summarize_debian.get_config()
  c.model = common.model_section(t5_small.MODEL)
  c.data.vocab_size = c.model.get_ref('vocab_size')
  c.num_train_steps = 700             # its step costs more: the same 60-minute CPU budget
  return c
