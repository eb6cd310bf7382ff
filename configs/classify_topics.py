"""Text classification: fine-tune all-MiniLM-L6-v2 on Debian package descriptions -> section.

    python3 train.py --config=configs/classify_topics.py --workdir=runs/classify_topics

17 archive sections (games, net, science, ...), labels read from the train split. Settings
as configs/classify_movie.py (see there for your own data); longer texts, more classes.
Measured results: docs/classification.md.
"""

import ml_collections

from configs import classify_movie

VARIANTS = classify_movie.VARIANTS


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  c = classify_movie.classification_config('debian_topics', variant)
  c.data.max_len = 128                # synopsis + description: median 75, p75 122 tokens
  c.model.pooling = 'mean'            # with 128 tokens and 600 steps: docs/classification.md
  c.num_train_steps = 600             # ~1.1 epochs of 17,205 at batch 32
  c.eval_every = 300
  c.checkpoint_every = 300
  c.optimizer.learning_rate = 1e-4 if not variant else c.optimizer.learning_rate
  return c
