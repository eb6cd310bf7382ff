"""Extractive QA: fine-tune all-MiniLM-L6-v2 on the FAQ set (SQuAD v1.1 JSON).

    python3 train.py --config=configs/qa_faq.py --workdir=runs/qa_faq
    # a small BERT from scratch (same WordPiece tokenizer) for comparison:
    python3 train.py --config=configs/qa_faq.py:scratch --workdir=runs/qa_faq_scratch

Your own data: --config.data.train_file=... --config.data.dev_file=... (SQuAD v1.1 JSON,
.gz ok), or a prepared TFDS dataset by name: --config.data.tfds_name=squad (SQuAD's
sizes: docs/qa.md). The FAQ answers are long (median ~180 WordPiece tokens) and the contexts
whole pages (median ~3,000 tokens), hence long windows, a long max_answer_len and few
answerless windows per question. Sizes, step time and results: docs/qa.md.
"""

import os

import ml_collections

from configs import common

DATA = os.path.join(common.REPO_ROOT, '..', 'shared', 'data', 'qa')
VARIANTS = ('', 'scratch')            # fine-tune MiniLM | a small BERT from random init


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  """variant: '' (fine-tune MiniLM) | 'scratch' (a small BERT from random init)."""
  c = common.base_config()
  c.task = 'qa'
  c.batch_size = 16
  c.num_train_steps = 100             # ~2 epochs of the ~780 kept train windows
  c.log_every = 10
  c.eval_every = 0                    # dev loss and EM/F1 at the end only: EM/F1 reads
  c.checkpoint_every = 50             # every dev window, the costliest part of a CPU run
  c.keep = 1
  c.keep_best = 0
  c.eval.final_bleu = True            # the final EM/F1, baselines, dev_predictions.json
  c.eval.num_samples = 3              # dev answers printed
  c.eval.n_best = 20                  # start and end candidates per window
  c.eval.max_answer_len = 384         # tokens; covers ~80 % of the FAQ answers (median 180)

  c.model = ml_collections.ConfigDict(dict(
      init_from='minilm',             # 'minilm' | '' (from scratch) | dir with a HF BERT
                                      # model.safetensors + config.json
      type_vocab_size=2,
      # From scratch only (a pretrained init takes its sizes from its config.json, except
      # the dropout rates): fed to bert.BertConfig's encoder (post-LN BERT defaults).
      encoder=dict(vocab_size=30522, d_model=256, num_heads=4, d_ff=1024,
                   num_encoder_layers=4, max_len=512, dropout_rate=0.1,
                   attention_dropout_rate=0.1)))

  d = c.data
  d.train_file = os.path.join(DATA, 'faq_squad.train.json.gz')
  d.dev_file = os.path.join(DATA, 'faq_squad.dev.json.gz')
  d.tfds_name = ''                    # a prepared TFDS dataset with SQuAD's features instead
                                      # of the files, e.g. 'squad' (docs/qa.md)
  d.train_split = 'train'             # TFDS split names of the stored questions; slices
  d.eval_split = 'validation'         # such as 'validation[:20]' work
  d.on_bad_row = 'stop'               # 'stop' | 'skip' bad questions (docs/qa.md lists them)
  d.tokenizer = ''                    # tokenizer.json / vocab.txt; '' = MiniLM's WordPiece
  d.max_seq_len = 512                 # window tokens incl. [CLS] question [SEP] ... [SEP]
  d.doc_stride = 320                  # context tokens between window starts
  d.max_query_len = 64                # question tokens kept
  d.train_negatives = 1               # answerless windows kept per train question (-1 = all)
  d.length_bucket = 64                # batches cut to their longest row, rounded up to this
  d.eval_batch_size = 32

  o = c.optimizer
  o.schedule = 'cosine'               # linear warmup, then cosine decay to 0
  o.learning_rate = 1e-4
  o.warmup_steps = 10
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
  o.weight_decay = 0.01
  c.loss.label_smoothing = 0.0        # unused: the span loss is plain cross-entropy
  if variant == 'scratch':
    c.model.init_from = ''
    o.learning_rate = 3e-4
  elif variant:
    raise ValueError(f"config variant {variant!r} is not one of {VARIANTS} ('' = MiniLM)")
  return c
