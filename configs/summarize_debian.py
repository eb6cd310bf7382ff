"""Summarization: Debian package description -> synopsis (../shared/data/summarize, 58k pairs).

    python3 train.py --config=configs/summarize_debian.py --workdir=runs/summarize

Transformer-small (pre-LN, d_model 256, 3+3 layers, 8k SentencePiece vocabulary trained on
both columns), documents cut to 128 tokens and summaries to 32; dev ROUGE-1/2/L with beam 4
beside the lead baselines, every dev summary in <workdir>/dev_predictions.jsonl
(docs/summarization.md). configs/summarize_debian_t5.py is the
same run with the T5 v1.1 model. Your own table:

    --config.data.source=files --config.data.train_file=a.tsv --config.data.eval_file=b.tsv
    [--config.data.document_column=text --config.data.summary_column=title]
    [--config.data.on_bad_row=skip]
"""

from configs import common


def get_config():
  c = common.base_config()
  c.task = 'summarization'
  c.data.source = 'shared'            # 'shared' (../shared/data/summarize) | 'files' | 'tfds'
  c.data.train_file = ''              # source='files': TSV/CSV with a header, or JSONL (.gz ok)
  c.data.eval_file = ''
  c.data.tfds_name = ''               # source='tfds': a prepared TFDS dataset by name
  c.data.document_column = 'document'  # column (or TFDS feature) names
  c.data.summary_column = 'summary'
  c.data.table_name = 'debian_synopsis'  # prefix of the built TFDS dataset's config name
  c.data.on_bad_row = 'stop'          # 'stop' | 'skip' rows with a missing or empty column
  c.data.max_source_len = 128         # documents longer than this are cut (also at inference)
  c.data.max_target_len = 32
  c.data.eval_batch_size = 64
  c.model.update(vocab_size=8000, d_model=256, num_heads=4, d_ff=1024,
                 num_encoder_layers=3, num_decoder_layers=3, max_len=128, dropout_rate=0.1)
  c.batch_size = 64
  c.batch_chunks = 8                  # CPU: loss over 8 x 8 rows per step, same gradient
  c.num_train_steps = 900             # with setup and the final beam evaluation, a 60-minute
                                      # CPU run (docs/summarization.md, 'Time budget')
  c.log_every = 25
  c.eval_every = 250
  c.checkpoint_every = 250
  c.optimizer.schedule = 'rsqrt'
  c.optimizer.warmup_steps = 400
  c.eval.beam_size = 4
  c.eval.alpha = 0.6
  c.eval.max_decode_len = 32
  c.eval.decode_batch_size = 64
  c.eval.rouge_examples = 0           # dev documents decoded for ROUGE; 0 = all
  c.eval.num_samples = 4
  return c
