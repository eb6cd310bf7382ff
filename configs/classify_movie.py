"""Text classification: fine-tune all-MiniLM-L6-v2 on movie-review sentence polarity.

    python3 train.py --config=configs/classify_movie.py --workdir=runs/classify_movie
    # BERT from scratch (same WordPiece tokenizer) for comparison:
    python3 train.py --config=configs/classify_movie.py:scratch --workdir=runs/movie_scratch
    python3 -m flaxformer_mini.predict --workdir=runs/classify_movie "a gorgeous, witty film"

Your own data: --config.data.train_file=... --config.data.dev_file=... (TSV/CSV with a
header, or JSONL; .gz ok) with --config.data.text_column / label_column; a TFDS dataset
by name: --config.data.tfds_name=... with tfds_text_feature / tfds_label_feature.
Measured results: docs/classification.md.
"""

import os

import ml_collections

from configs import common

DATA = os.path.join(common.REPO_ROOT, '..', 'shared', 'data', 'classify')
VARIANTS = ('', 'scratch')            # fine-tune MiniLM | a small BERT from random init


def classification_config(dataset: str, variant: str = '') -> ml_collections.ConfigDict:
  """The shared classification settings for ``DATA/<dataset>.{train,dev}.tsv.gz``.

  variant: '' (fine-tune MiniLM) | 'scratch' (a small BERT from random init).
  """
  c = common.base_config()
  c.task = 'classification'
  c.batch_size = 32
  c.log_every = 50
  c.keep = 1
  c.keep_best = 0
  c.eval.final_bleu = True            # the final accuracy / macro-F1 / confusion matrix
  c.eval.num_samples = 4

  c.model = ml_collections.ConfigDict(dict(
      init_from='minilm',             # 'minilm' | '' (from scratch) | dir with a HF BERT
                                      # model.safetensors + config.json
      pooling='cls',                  # 'cls' (pooler on [CLS]) | 'mean' (mean token state)
      pooler=True,
      type_vocab_size=2,
      # From scratch only (a pretrained init takes its sizes from its config.json, except
      # the dropout rates): fed to bert.BertConfig's encoder (post-LN BERT defaults).
      encoder=dict(vocab_size=30522, d_model=256, num_heads=4, d_ff=1024,
                   num_encoder_layers=4, max_len=128, dropout_rate=0.1,
                   attention_dropout_rate=0.1)))

  d = c.data
  d.train_file = os.path.join(DATA, f'{dataset}.train.tsv.gz')
  d.dev_file = os.path.join(DATA, f'{dataset}.dev.tsv.gz')
  d.format = 'auto'                   # 'auto' (by extension) | 'tsv' | 'csv' | 'jsonl'
  d.text_column = 'text'
  d.label_column = 'label'
  d.tfds_name = ''                    # a TFDS dataset by name instead of the files
  d.tfds_text_feature = 'text'
  d.tfds_label_feature = 'label'      # a ClassLabel feature is read as its class names
  d.on_bad_row = 'stop'               # 'stop' | 'skip' rows with a missing column, empty
                                      # text or a dev label the train split lacks
  d.tokenizer = ''                    # tokenizer.json / vocab.txt; '' = MiniLM's WordPiece
  d.max_len = 64                      # WordPiece tokens incl. [CLS]/[SEP]; longer are cut
  d.length_bucket = 16                # batches cut to their longest row, rounded up to this
  d.eval_batch_size = 64

  o = c.optimizer
  o.schedule = 'cosine'               # linear warmup, then cosine decay to 0
  o.learning_rate = 5e-5
  o.warmup_steps = 50
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
  o.weight_decay = 0.01
  o.layer_decay = 1.0                 # e.g. 0.9: layer i of MiniLM's 6 at lr x 0.9^(6-i), the
                                      # embeddings 0.9^7 (ELECTRA/BEiT); 1.0 = off
  c.loss.label_smoothing = 0.0
  if variant == 'scratch':
    c.model.init_from = ''
    o.learning_rate = 5e-4
    o.warmup_steps = 100
    o.layer_decay = 1.0               # random layers: nothing pretrained to keep
  elif variant:
    raise ValueError(f"config variant {variant!r} is not one of {VARIANTS} ('' = MiniLM)")
  return c


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  c = classification_config('movie_sentiment', variant)
  c.num_train_steps = 500             # 2 epochs of the 8,035 train sentences at batch 32
  c.eval_every = 250
  c.checkpoint_every = 250
  return c
