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
  c.batch_size = 48
  c.num_train_steps = 1500
  c.log_every = 25
  c.eval_every = 500
  c.checkpoint_every = 250
  c.model.update(vocab_size=6000, d_model=192, num_heads=4, d_ff=768,
                 num_encoder_layers=3, num_decoder_layers=3, max_len=128,
                 dropout_rate=0.1)
  c.data.max_source_len = 64
  c.data.max_target_len = 64
  c.data.eval_batch_size = 100
  c.optimizer.schedule = 'rsqrt'
  c.optimizer.lr_factor = 1.0
  c.optimizer.warmup_steps = 300
  c.eval.bleu_every = 0
  c.eval.max_decode_len = 96
  return c
