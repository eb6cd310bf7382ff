"""The Task protocol: what `train.py` asks of a task (model, loss, data, evaluation).

`train.py` and `flaxformer_mini.training` know nothing about translation or any other
task; they ask the task named by ``config.task`` (see `flaxformer_mini.tasks.get_task`)
for everything model- or data-specific. A task module imports only this one, never the
registry.

Batches are dicts of numpy arrays with a leading batch axis (any keys the task likes).
``loss_and_metrics`` returns SUMS (see `flaxformer_mini.training`): the loss summed over
tokens/examples and a metrics dict of sums containing ``'weight'``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import jax
import numpy as np

PyTree = Any
Batch = dict[str, np.ndarray]


class Task(Protocol):
  """What `train.py` needs from a task. Built by ``factory(config, workdir)``.

  Attributes:
    name: registry name.
    assets: {filename: path} of files a run needs at inference time, kept in the
      run dir (e.g. the tokenizer); `checkpoints` records their sha256.
    d_model: the trained model's width, which the 'rsqrt' learning-rate schedule scales
      by (`training.make_optimizer`); None for a model without one single width.
  """
  name: str
  assets: dict[str, str]
  d_model: int | None

  def init_params(self, rng: jax.Array) -> PyTree:
    """Fresh parameters (host or device arrays)."""

  def loss_and_metrics(self, params: PyTree, batch: Batch, rng: jax.Array,
                       deterministic: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss sum, metric sums incl. 'weight'); pure and jittable."""

  def train_iterator(self) -> Iterator[Batch]:
    """Infinite iterator of train batches with ``get_state()`` (JSON) / ``set_state()``.

    A task may also take ``(shard_index, shard_count)`` and yield only that input
    shard's ``batch_size / shard_count`` rows; then ``config.data.input_shards > 1``
    lets each process of a multi-process run read only its own shards."""

  def eval_batches(self) -> Iterable[Batch]:
    """One pass over the dev set (a fresh iterable each call); batch rows fixed."""

  def evaluate(self, params: PyTree) -> tuple[dict[str, float], list[str]]:
    """Optional: task metrics (e.g. {'bleu': ..}) and printable samples. Return ({}, [])
    when there is nothing beyond the loss."""


TaskFactory = Callable[[Any, str], Task]
