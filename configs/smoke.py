"""Tiny translation run for tests: ~2k embedded pairs, 1+1 layers, a few dozen steps."""

from configs import common


def get_config():
  c = common.base_config()
  c.batch_size = 16
  c.num_train_steps = 16
  c.log_every = 1
  c.eval_every = 8
  c.checkpoint_every = 4
  c.keep = 2
  c.async_checkpointing = False
  c.model.update(vocab_size=400, d_model=32, num_heads=2, d_ff=64, num_encoder_layers=1,
                 num_decoder_layers=1, max_len=32, dropout_rate=0.1)
  c.data.train_split = 'train[:2000]'
  c.data.eval_split = 'validation[:64]'
  c.data.spm_max_sentences = 2000
  c.data.max_source_len = 32
  c.data.max_target_len = 32
  c.data.eval_batch_size = 32
  c.optimizer.warmup_steps = 10
  c.optimizer.lr_factor = 2.0
  c.eval.bleu_examples = 16
  c.eval.max_decode_len = 16
  c.eval.decode_batch_size = 16
  c.eval.num_samples = 1
  return c
