"""pt->en on the full shared data (../shared/data/translate/en-pt.*, 74.7k pairs).

Sized for a <= 60-minute CPU run. The data path is resolved relative to the repo root
(configs/common.py: REPO_ROOT/../shared); a missing file is a FileNotFoundError naming
the path and how to override it (--config.data.shared_root=...).
"""

from configs import common


def get_config():
  c = common.base_config()
  c.data.source = 'shared'
  c.data.pair = 'en-pt'
  c.data.src_lang = 'pt'
  c.data.tgt_lang = 'en'
  # Transformer-small: ~6 M parameters besides the 8k x 256 shared embedding. 64 packed
  # rows x 64 tokens per step; about 220 steps per epoch of the 74.7k pairs.
  c.model.update(vocab_size=8000, d_model=256, num_heads=4, d_ff=1024,
                 num_encoder_layers=3, num_decoder_layers=3, max_len=128,
                 dropout_rate=0.1)
  c.batch_size = 64
  c.batch_chunks = 8                  # CPU: loss over 8 x 8 rows per step, same gradient,
                                      # faster step, longer compile (benchmarks/README.md).
                                      # Use 1 on accelerators.
  c.num_train_steps = 4000            # the 60-minute budget stops it first (timeout -s TERM)
  c.log_every = 25
  c.eval_every = 250
  c.checkpoint_every = 250
  c.data.max_source_len = 64
  c.data.max_target_len = 64
  c.data.eval_batch_size = 100
  c.optimizer.schedule = 'rsqrt'      # independent of num_train_steps, so stopping early is fine
  c.optimizer.lr_factor = 1.0
  c.optimizer.warmup_steps = 500
  c.loss.label_smoothing = 0.1
  c.eval.bleu_every = 0
  c.eval.max_decode_len = 96
  return c
