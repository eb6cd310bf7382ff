"""Encoder-only distillation: a small BERT learns movie-review polarity from fine-tuned MiniLM.

    python3 train.py --config=configs/classify_movie.py --workdir=runs/classify_movie  # teacher
    python3 train.py --config=configs/distill_movie.py --workdir=runs/movie_student
    python3 train.py --config=configs/classify_movie.py:scratch --workdir=runs/movie_scratch

The student is configs/classify_movie.py:scratch (4 layers, d_model 256, MiniLM's WordPiece)
with the ``distill_classifier`` task: ``(1 - alpha) * CE + alpha * T^2 * KL`` to the teacher's
softened class distribution (tasks/distill.py). ``:scratch`` above is its baseline of equal
size and steps. Measured results: docs/classification.md.
"""

import ml_collections

from configs import classify_movie


def get_config() -> ml_collections.ConfigDict:
  c = classify_movie.get_config('scratch')
  c.task = 'distill_classifier'
  c.distill = ml_collections.ConfigDict(dict(
      teacher_workdir='runs/classify_movie',
      teacher_step=0,                 # 0 = the teacher's newest checkpoint
      alpha=0.5,                      # weight of the KL term
      temperature=2.0,                # softening of both distributions (loss x T^2)
  ))
  return c
