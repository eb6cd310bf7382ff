"""The embedded default: pt->en on the 30k-pair sample shipped in the package.

Sized to finish in about 5 minutes on 2 quiet CPU cores, tokenizer training and the
final greedy dev BLEU included (measured 3 min 35 s on 2026-11-27 with huge pages: setup
17 s, 600 steps 2 min 58 s, dev decode 11 s; 4 min 1 s without them; dev BLEU 4.79 -- a
demo of the pipeline, not a usable translator); `python train.py` with no arguments runs
this. At this
budget the model sees a fraction of one epoch, so it is small, has no dropout (it
underfits, it cannot overfit) and uses a short warmup + cosine decay to zero.
"""

from configs import common


def get_config():
  c = common.base_config()
  c.batch_size = 32
  c.batch_chunks = 4                  # loss over 4 x 8 rows in one step: same gradient,
                                      # a faster CPU step (benchmarks/README.md)
  c.num_train_steps = 600
  c.log_every = 10
  c.eval_every = 0                    # dev loss only at the end (it costs train time)
  c.checkpoint_every = 50
  c.model.update(vocab_size=2000, d_model=128, num_heads=4, d_ff=512,
                 num_encoder_layers=2, num_decoder_layers=2, max_len=128,
                 dropout_rate=0.0)
  c.data.max_source_len = 64
  c.data.max_target_len = 64
  c.data.eval_batch_size = 100
  c.data.spm_max_sentences = 8000     # tokenizer on 8k pairs: ~4x faster, same pieces mostly
  c.optimizer.schedule = 'cosine'
  c.optimizer.learning_rate = 7e-3
  c.optimizer.warmup_steps = 40
  c.loss.label_smoothing = 0.1
  c.eval.max_decode_len = 48
  c.eval.decode_batch_size = 100
  return c
