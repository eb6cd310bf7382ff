"""The ``vit_digits`` task: a `ViT` classifier on scikit-learn's real 8x8 handwritten digits.

Data: ``sklearn.datasets.load_digits()`` (1,797 images, 10 classes), a fixed stratified
train/test split (`digits_split`), pixels scaled by the train-set mean/std. Training
batches come from a grain pipeline (shuffle reseeded each epoch, optional random
+-``shift`` pixel translation, fixed-size batches); its iterator's ``get_state`` /
``set_state`` make runs resumable. Loss: cross-entropy (optional label smoothing);
metrics: accuracy, via `training.cross_entropy_sums`.

Batches: ``image`` [b, 8, 8, 1] float32, ``label`` [b] int32, ``weight`` [b] float32
(0 on rows that only pad the last eval batch).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_mini import training
from flaxformer_mini.variants.vit import ViT, ViTConfig

Batch = dict[str, np.ndarray]


def digits_split(test_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
  """Deterministic stratified split of ``load_digits()``.

  Returns:
    dict with ``train_index`` / ``test_index`` (disjoint, together all 1,797 rows,
    sorted), ``train_images`` / ``test_images`` [n, 8, 8, 1] float32 standardized by the
    train mean/std, ``train_labels`` / ``test_labels`` [n] int32, and ``mean``/``std``.
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
  digits = load_digits()
  images = digits.images.astype(np.float32)[..., None]        # [1797, 8, 8, 1], values 0..16
  labels = digits.target.astype(np.int32)
  train_index, test_index = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                             stratify=labels, random_state=seed)
  train_index, test_index = np.sort(train_index), np.sort(test_index)
  mean, std = images[train_index].mean(), images[train_index].std()
  norm = (images - mean) / std
  return dict(train_index=train_index, test_index=test_index,
              train_images=norm[train_index], train_labels=labels[train_index],
              test_images=norm[test_index], test_labels=labels[test_index],
              mean=np.float32(mean), std=np.float32(std))


class _Examples:
  """Random-access source of {'image', 'label'} examples over two arrays."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {"image": self.images[i], "label": self.labels[i]}


def random_shift(image: np.ndarray, rng: np.random.Generator, shift: int,
                 fill: float) -> np.ndarray:
  """Translates image [H, W, C] by up to +-``shift`` pixels per axis, filling with ``fill``."""
  if shift <= 0:
    return image
  h, w, _ = image.shape
  padded = np.pad(image, ((shift, shift), (shift, shift), (0, 0)), constant_values=fill)
  dy, dx = rng.integers(0, 2 * shift + 1, size=2)
  return padded[dy:dy + h, dx:dx + w]


def train_dataset(images: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int,
                  shift: int = 0, fill: float = 0.0) -> grain.IterDataset:
  """Infinite grain pipeline of training batches: shuffle (new order each epoch) ->
  random shift -> batch (drop the remainder so every batch has ``batch_size`` rows)."""
  def augment(ex, rng):
    return {"image": random_shift(ex["image"], rng, shift, fill), "label": ex["label"],
            "weight": np.float32(1.0)}
  ds = grain.MapDataset.source(_Examples(images, labels)).shuffle(seed=seed).repeat(None)
  ds = ds.random_map(augment, seed=seed + 1)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> list[Batch]:
  """One pass in order; the last batch is padded with zero-weight rows to ``batch_size``."""
  out = []
  for start in range(0, len(labels), batch_size):
    n = min(batch_size, len(labels) - start)
    batch = {"image": np.zeros((batch_size,) + images.shape[1:], np.float32),
             "label": np.zeros((batch_size,), np.int32),
             "weight": np.zeros((batch_size,), np.float32)}
    batch["image"][:n] = images[start:start + n]
    batch["label"][:n] = labels[start:start + n]
    batch["weight"][:n] = 1.0
    out.append(batch)
  return out


class ViTDigitsTask:
  """`tasks.Task` for ViT on load_digits. Reads ``config.model`` (`ViTConfig.from_dict`),
  ``config.data`` (test_fraction, split_seed, shift, eval_batch_size), ``config.batch_size``,
  ``config.seed`` and ``config.loss.label_smoothing``."""

  name = "vit_digits"

  def __init__(self, config, workdir: str):
    del workdir  # nothing to prepare on disk
    self.config = config
    self.model_config = ViTConfig.from_dict(config.model)
    if self.model_config.image_size != (8, 8) or self.model_config.num_channels != 1:
      raise ValueError(f"load_digits images are 8x8x1; got model.image_size="
                       f"{self.model_config.image_size}, num_channels="
                       f"{self.model_config.num_channels}")
    if self.model_config.num_classes != 10:
      raise ValueError(f"load_digits has 10 classes, got model.num_classes="
                       f"{self.model_config.num_classes}")
    self.model = ViT(self.model_config)
    d = config.data
    self.split = digits_split(d.test_fraction, d.split_seed)
    self.assets: dict[str, str] = {}
    self._predict = jax.jit(lambda p, x: jnp.argmax(self.model.apply({"params": p}, x), -1))

  @property
  def d_model(self) -> int:
    """The model's width, which the 'rsqrt' learning-rate schedule scales by."""
    return self.model_config.encoder.d_model

  def init_params(self, rng: jax.Array):
    images = jnp.zeros((1, *self.model_config.image_size, self.model_config.num_channels))
    return jax.jit(self.model.init)(rng, images)["params"]

  def loss_and_metrics(self, params, batch, rng, deterministic):
    logits = self.model.apply({"params": params}, batch["image"], deterministic=deterministic,
                              rngs={"dropout": rng})
    sums = training.cross_entropy_sums(logits, batch["label"], batch["weight"],
                                       self.config.loss.label_smoothing)
    return sums["loss"], sums

  def train_iterator(self) -> Iterator[Batch]:
    s, d = self.split, self.config.data
    # Shifted-in pixels are background: the normalized value of a 0 pixel.
    fill = float(-s["mean"] / s["std"])
    return iter(train_dataset(s["train_images"], s["train_labels"],
                              batch_size=self.config.batch_size, seed=self.config.seed,
                              shift=d.shift, fill=fill))

  def eval_batches(self) -> Iterable[Batch]:
    return eval_batches(self.split["test_images"], self.split["test_labels"],
                        self.config.data.eval_batch_size)

  def evaluate(self, params) -> tuple[dict[str, float], list[str]]:
    """Test accuracy over all test images and a few misclassified examples."""
    s = self.split
    preds = np.concatenate([np.asarray(self._predict(params, b["image"]))[b["weight"] > 0]
                            for b in self.eval_batches()])
    wrong = np.flatnonzero(preds != s["test_labels"])
    samples = [f"  load_digits row {s['test_index'][i]}: label {s['test_labels'][i]}, "
               f"predicted {preds[i]}" for i in wrong[:self.config.eval.num_samples]]
    return {"test_accuracy": float(np.mean(preds == s["test_labels"])),
            "test_errors": float(len(wrong)), "test_examples": float(len(preds))}, samples
