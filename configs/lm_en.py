"""Llama-style decoder-only LM on the shared English corpus: a few minutes on 2 CPU cores.

    python train.py --config=configs/lm_en.py --workdir=runs/lm_en

../shared/data/lm/en_corpus.txt.gz (Bibles, Brown, Debian descriptions, fortunes):
0.5% of the documents (by hash) held out as dev; a 4k SentencePiece vocabulary trained on
20k train documents; documents packed into 128-token rows. Model: 4 pre-RMSNorm layers,
d_model 128, 4 query / 2 key-value heads, d_ff 352, rotary positions, SwiGLU, tied embeddings
(`flaxformer_mini.variants.llama.llama_config`). Reports dev
next-token perplexity (``dev/ppl``, per SentencePiece token) and greedy continuations of
``eval.prompts``.
"""

import os

import ml_collections

from configs import common
from flaxformer_mini.variants import llama


def get_config() -> ml_collections.ConfigDict:
  c = common.base_config()
  c.task = 'lm'
  c.seed = 0
  c.batch_size = 16
  c.num_train_steps = 300
  c.log_every = 50
  c.eval_every = 100
  c.checkpoint_every = 100
  c.async_checkpointing = False

  c.model = common.model_section(llama.llama_config(
      vocab_size=4096, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=352,
      max_len=128, tie_embeddings=True))

  c.data = ml_collections.ConfigDict()
  c.data.corpus = os.path.join(common.REPO_ROOT, '..', 'shared', 'data', 'lm',
                               'en_corpus.txt.gz')
  c.data.dev_permille = 5             # documents with crc32 % 1000 < 5 are dev
  c.data.vocab_size = c.model.get_ref('vocab_size')
  c.data.spm_model_type = 'unigram'
  c.data.spm_sample_docs = 20000      # train documents whose lines train SentencePiece
  c.data.seq_len = 128                # tokens per packed row
  c.data.eval_rows = 128              # dev rows evaluated (first ones, fixed); 0 = all
  c.data.eval_batch_size = 32

  c.optimizer.schedule = 'cosine'
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 30
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.loss.label_smoothing = 0.0

  c.eval.final_bleu = True            # (train.py's name) run task.evaluate at the end
  c.eval.max_decode_len = 40
  c.eval.prompts = ['In the beginning God', 'This package provides',
                    'The committee said that', 'And Jesus said unto']
  return c
