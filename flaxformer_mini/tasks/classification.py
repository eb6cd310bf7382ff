"""The ``classification`` task: a BERT text classifier (fine-tuned MiniLM or from scratch).

Data: a user's table files (TSV/CSV with a header, JSONL; `data.tables`) with a text and a
label column, or a TFDS dataset by name (``config.data.tfds_name``). Bad rows (missing
column, empty text, a dev label the train split does not have) are reported with file and
line and skipped or fatal by ``config.data.on_bad_row``. The label set is read from the
train split (sorted) and saved with the run as ``labels.json``.

Model (``config.model``): `TextClassifier` = `bert.BertModel` + [CLS] pooler (or the mean
of the token states) + dropout + dense. ``init_from='minilm'`` (or a directory holding a
Hugging Face BERT ``model.safetensors`` + ``config.json``) loads the pretrained encoder
and sizes from there and initialises only the head; ``init_from=''`` trains the
``config.model.encoder`` sizes from scratch. Either way the WordPiece tokenizer is
``config.data.tokenizer`` (default MiniLM's) and is saved as a run asset.

Evaluation: accuracy, macro-F1 and the confusion matrix (printed, and written to
``<workdir>/confusion_matrix.{json,tsv}``), every dev prediction to
``<workdir>/dev_predictions.jsonl``. `Classifier` loads a run on one device.

Batches: ``input_ids``, ``attention_mask`` [b, l] int32 (l <= data.max_len, trimmed to the
batch's longest row rounded up to ``data.length_bucket``), ``label`` [b] int32, ``weight``
[b] float32 (0 on rows that pad the last eval batch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxformer_mini import checkpoints, training
from flaxformer_mini.data import records, tables, wordpiece
from flaxformer_mini.dropout import Dropout
from flaxformer_mini.tasks.base import PyTree
from flaxformer_mini.variants import bert

Batch = dict[str, np.ndarray]
LABELS_FILE = 'labels.json'
MODEL_FILE = 'model.json'
POOLING = ('cls', 'mean')
log = logging.getLogger(__name__)
CLASSIFIER_TASKS = ('classification', 'distill_classifier')  # runs a Classifier loads


# ------------------------------------------------------------------------------ metrics


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int
                     ) -> np.ndarray:
  """[num_classes, num_classes] int64 counts: row = true class, column = predicted."""
  y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
  if y_true.shape != y_pred.shape:
    raise ValueError(f'y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape')
  for name, y in (('y_true', y_true), ('y_pred', y_pred)):
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise ValueError(f'{name} has a class outside [0, {num_classes})')
  return np.bincount(y_true * num_classes + y_pred,
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
  """Fraction of equal entries."""
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  return float(np.mean(y_true == y_pred)) if y_true.size else 0.0


def per_class_f1(matrix: np.ndarray) -> np.ndarray:
  """[c] F1 of each class from a confusion matrix; 0 where precision + recall is 0."""
  m = np.asarray(matrix, np.float64)
  tp = np.diag(m)
  denom = m.sum(0) + m.sum(1)  # 2 tp + fp + fn
  return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> float:
  """Unweighted mean F1 over the classes that occur in y_true or y_pred (as
  ``sklearn.metrics.f1_score(average='macro')`` without ``labels``)."""
  m = confusion_matrix(y_true, y_pred, num_classes)
  present = (m.sum(0) + m.sum(1)) > 0
  return float(per_class_f1(m)[present].mean()) if present.any() else 0.0


def format_confusion(matrix: np.ndarray, labels: Sequence[str]) -> str:
  """The matrix as aligned text: a row per true label, a column per predicted one."""
  width = max(6, max(len(str(v)) for v in np.asarray(matrix).ravel()) + 1)
  names = [l[:width - 1] for l in labels]
  head = max(len(l) for l in labels)
  lines = [' ' * head + ' | ' + ''.join(n.rjust(width) for n in names) + '  <- predicted']
  for label, row in zip(labels, np.asarray(matrix)):
    lines.append(label.rjust(head) + ' | ' + ''.join(str(v).rjust(width) for v in row))
  return '\n'.join(lines)


# -------------------------------------------------------------------------------- model


class TextClassifier(nn.Module):
  """BERT + pooling + dropout + dense. Params: ``bert`` (`bert.BertModel`), ``classifier``.

  pooling: 'cls' = the pooler (dense + tanh on [CLS], as BertForSequenceClassification);
  'mean' = the mean of the last hidden states over real tokens (sentence-transformers).
  """

  cfg: bert.BertConfig
  pooling: str = 'cls'

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *,
               deterministic: bool = True) -> jax.Array:
    """input_ids, attention_mask: [b, l] int -> logits [b, num_labels] float32."""
    if self.pooling not in POOLING:
      raise ValueError(f'config.model.pooling={self.pooling!r} is not one of {POOLING}')
    if self.pooling == 'cls' and not self.cfg.pooler:
      raise ValueError("pooling='cls' needs the pooler: config.model.pooler=True")
    enc = self.cfg.encoder
    hidden, pooled = bert.BertModel(self.cfg, name='bert')(
        input_ids, attention_mask, deterministic=deterministic)
    if self.pooling == 'mean':
      mask = attention_mask.astype(jnp.float32)[..., None]
      pooled = (hidden.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    pooled = Dropout(enc.dropout_rate, enc.dropout_impl)(pooled, deterministic=deterministic)
    logits = nn.Dense(self.cfg.num_labels, dtype=enc.dtype, param_dtype=enc.param_dtype,
                      name='classifier')(pooled)
    return logits.astype(jnp.float32)


def model_config(m, num_labels: int) -> tuple[bert.BertConfig, str]:
  """(BertConfig, pretrained dir or '') from ``config.model`` and the label count."""
  return bert.config_from_init(m.init_from, m.encoder, type_vocab_size=m.type_vocab_size,
                               pooler=bool(m.pooler), num_labels=num_labels)


def config_to_json(cfg: bert.BertConfig, pooling: str) -> dict:
  encoder = {k: (jnp.dtype(v).name if k in ('dtype', 'param_dtype') else v)
             for k, v in dataclasses.asdict(cfg.encoder).items()}
  return {'encoder': encoder,
          'type_vocab_size': cfg.type_vocab_size, 'pooler': cfg.pooler,
          'num_labels': cfg.num_labels, 'pooling': pooling}


def config_from_json(d: dict) -> tuple[bert.BertConfig, str]:
  d = dict(d)
  pooling = d.pop('pooling', 'cls')
  return bert.BertConfig.from_dict(d), pooling


# --------------------------------------------------------------------------------- data


def _split_of(split_spec: str) -> str:
  return split_spec.split('[')[0]


def read_split(source, label_column_ok, what: str, errors: records.RowErrors
               ) -> tuple[list[str], list[str]]:
  """All (text, label) rows of a random-access source of {'text', 'label'} dicts; a bad
  row is reported by its index in the source (``example 7``)."""
  texts, labels = [], []
  for i in range(len(source)):
    row = source[i]
    why = label_column_ok(row)
    if why:
      errors.bad(what, f'example {i}', why)
      continue
    errors.ok()
    texts.append(row['text'])
    labels.append(row['label'])
  errors.finish()
  return texts, labels


class _Rows:
  """Random access over encoded rows: {'input_ids' [l], 'attention_mask' [l], 'label'}."""

  def __init__(self, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray):
    self.ids, self.mask, self.labels = ids, mask, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i):
    return {'input_ids': self.ids[i], 'attention_mask': self.mask[i],
            'label': self.labels[i], 'weight': np.float32(1.0)}


def trim_batch(batch: Batch, bucket: int) -> Batch:
  """Cuts [b, l] columns to the longest row rounded up to a multiple of ``bucket``."""
  if bucket <= 0:
    return batch
  longest = int(batch['attention_mask'].sum(1).max()) if batch['attention_mask'].size else 1
  length = min(batch['input_ids'].shape[1], max(bucket, -(-longest // bucket) * bucket))
  out = dict(batch)
  out['input_ids'] = batch['input_ids'][:, :length]
  out['attention_mask'] = batch['attention_mask'][:, :length]
  return out


def _eval_batches(ids, mask, labels, batch_size: int, bucket: int) -> list[Batch]:
  out = []
  for start in range(0, len(labels), batch_size):
    n = min(batch_size, len(labels) - start)
    b = {'input_ids': np.zeros((batch_size, ids.shape[1]), np.int32),
         'attention_mask': np.zeros((batch_size, ids.shape[1]), np.int32),
         'label': np.zeros((batch_size,), np.int32),
         'weight': np.zeros((batch_size,), np.float32)}
    b['input_ids'][:n] = ids[start:start + n]
    b['attention_mask'][:n] = mask[start:start + n]
    b['label'][:n] = labels[start:start + n]
    b['weight'][:n] = 1.0
    out.append(trim_batch(b, bucket))
  return out


# --------------------------------------------------------------------------- predictor


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One text's predicted label, its probability and every label's probability."""
  label: str
  probability: float
  probabilities: dict


class Classifier:
  """Labels texts with a trained classifier on one device.

  Args:
    cfg / pooling: the model (`TextClassifier`).
    params: its params (``{'bert': ..., 'classifier': ...}``).
    tokenizer: the run's `wordpiece.WordPiece`.
    labels: class names, index = class id.
    max_len: token rows are cut to this length; batch_size / bucket: batching.
  """

  def __init__(self, cfg: bert.BertConfig, pooling: str, params: PyTree,
               tokenizer: wordpiece.WordPiece, labels: Sequence[str], *, max_len: int,
               batch_size: int = 64, bucket: int = 16):
    if len(labels) != cfg.num_labels:
      raise ValueError(f'{len(labels)} labels for a model with {cfg.num_labels} classes')
    self.cfg, self.pooling = cfg, pooling
    self.labels, self.tokenizer = list(labels), tokenizer
    self.max_len, self.batch_size, self.bucket = max_len, batch_size, bucket
    device = jax.local_devices()[0]
    self.params = jax.device_put(params, device)
    model = TextClassifier(cfg, pooling)
    self._probs = jax.jit(lambda p, ids, mask: jax.nn.softmax(
        model.apply({'params': p}, ids, mask), -1))

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, **kwargs) -> Classifier:
    """Loads a ``classification`` run (newest readable checkpoint, or ``step``)."""
    config, params, assets = checkpoints.load_run(workdir, step)
    if config.task not in CLASSIFIER_TASKS:
      raise ValueError(f'{workdir} is a {config.task!r} run, not a classification run')
    for name in (LABELS_FILE, MODEL_FILE, wordpiece.TOKENIZER_FILE):
      if name not in assets:
        raise FileNotFoundError(f'{workdir}: the run has no asset {name}')
    with open(assets[LABELS_FILE]) as f:
      labels = json.load(f)
    with open(assets[MODEL_FILE]) as f:
      cfg, pooling = config_from_json(json.load(f))
    tokenizer = wordpiece.WordPiece.from_file(assets[wordpiece.TOKENIZER_FILE])
    kwargs.setdefault('max_len', config.data.max_len)
    kwargs.setdefault('bucket', config.data.length_bucket)
    return cls(cfg, pooling, params, tokenizer, labels, **kwargs)

  def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    return self.tokenizer.encode_batch(texts, self.max_len)

  def probabilities(self, texts: Sequence[str]) -> np.ndarray:
    """[n, num_labels] float32 class probabilities of n texts."""
    enc = self.encode(texts)
    return self.probabilities_of_ids(enc['input_ids'], enc['attention_mask'])

  def probabilities_of_ids(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """ids, mask: [n, l] -> [n, num_labels] probabilities (padded, bucketed batches)."""
    n = len(ids)
    out = np.zeros((n, self.cfg.num_labels), np.float32)
    labels = np.zeros(n, np.int32)
    for start, b in zip(range(0, n, self.batch_size),
                        _eval_batches(ids, mask, labels, self.batch_size, self.bucket)):
      k = min(self.batch_size, n - start)
      probs = self._probs(self.params, b['input_ids'], b['attention_mask'])
      out[start:start + k] = np.asarray(probs)[:k]
    return out

  def classify(self, texts: Sequence[str]) -> list[Prediction]:
    """The predicted label and the probabilities of each text."""
    texts = list(texts)
    if not texts:
      return []
    probs = self.probabilities(texts)
    out = []
    for p in probs:
      k = int(np.argmax(p))
      out.append(Prediction(self.labels[k], float(p[k]),
                            {l: float(v) for l, v in zip(self.labels, p)}))
    return out


# -------------------------------------------------------------------------------- task


class ClassificationTask:
  """`tasks.Task` for text classification. Reads ``config.model`` (init_from, pooling,
  pooler, encoder, type_vocab_size), ``config.data`` (train_file, dev_file, format,
  text_column, label_column, tfds_name, tfds_text_feature, tfds_label_feature,
  train_split, eval_split, on_bad_row, tokenizer, max_len, length_bucket,
  eval_batch_size, tfds_dir), ``config.batch_size``, ``config.seed``,
  ``config.eval.num_samples`` and ``config.loss.label_smoothing``.

  Setup writes ``labels.json``, ``model.json`` (the resolved model sizes) and the
  tokenizer (``tokenizer.json``) into the workdir: the run's assets.
  """

  name = 'classification'

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, os.path.abspath(workdir)
    d = config.data
    os.makedirs(self.workdir, exist_ok=True)
    train_texts, train_labels, dev_texts, dev_labels = self._read_data()
    self.labels = sorted(set(train_labels))
    if len(self.labels) < 2:
      raise ValueError(f'the train split has {len(self.labels)} label(s) {self.labels}; a '
                       'classifier needs at least 2 (config.data.label_column)')
    trained = checkpoints.has_checkpoints(self.workdir)
    labels_path = os.path.join(self.workdir, LABELS_FILE)
    if os.path.isfile(labels_path):
      with open(labels_path) as f:
        saved = json.load(f)
      if saved != self.labels and trained:
        raise ValueError(f'{labels_path} holds labels {saved} of the run trained there, the '
                         f'train data has {self.labels}; use a fresh --workdir for other data')
    with open(labels_path, 'w') as f:
      json.dump(self.labels, f, indent=1)
    index = {l: i for i, l in enumerate(self.labels)}

    tokenizer_src = d.tokenizer or os.path.join(bert.minilm_dir(), wordpiece.TOKENIZER_FILE)
    self.tokenizer = wordpiece.run_tokenizer(self.workdir, tokenizer_src, trained=trained)
    tokenizer_path = self.tokenizer.path

    self.bert_config, self.init_dir = model_config(config.model, len(self.labels))
    enc = self.bert_config.encoder
    if self.tokenizer.vocab_size > enc.vocab_size:
      raise ValueError(f'the tokenizer has {self.tokenizer.vocab_size} tokens, more than '
                       f'model vocab_size={enc.vocab_size} (config.model.encoder.vocab_size)')
    if d.max_len > enc.max_len:
      raise ValueError(f'config.data.max_len={d.max_len} exceeds the model\'s position table '
                       f'({enc.max_len})')
    model_path = os.path.join(self.workdir, MODEL_FILE)
    with open(model_path, 'w') as f:
      json.dump(config_to_json(self.bert_config, config.model.pooling), f, indent=1)
    self.model = TextClassifier(self.bert_config, config.model.pooling)
    self.assets = {LABELS_FILE: labels_path, MODEL_FILE: model_path,
                   wordpiece.TOKENIZER_FILE: tokenizer_path}

    def encode(texts, labels):
      enc = self.tokenizer.encode_batch(texts, d.max_len)
      return (enc['input_ids'], enc['attention_mask'],
              np.array([index[l] for l in labels], np.int32))
    self.train_arrays = encode(train_texts, train_labels)
    self.dev_arrays = encode(dev_texts, dev_labels)
    self.dev_texts = dev_texts
    self._predictor = None

  # -- data ----------------------------------------------------------------------------

  def _read_data(self):
    d = self.config.data
    train_split, eval_split = _split_of(d.train_split), _split_of(d.eval_split)
    if d.tfds_name:
      # A prepared TFDS dataset lives in TFDS's own data dir unless tfds_dir names one.
      tfds_dir = d.tfds_dir or None
      columns = {'text': d.tfds_text_feature, 'label': d.tfds_label_feature}
      train = tables.tfds_table_source(d.tfds_name, d.train_split, columns, data_dir=tfds_dir)
      dev = tables.tfds_table_source(d.tfds_name, d.eval_split, columns, data_dir=tfds_dir)
      empty = lambda row: None if row['text'].strip() else 'empty text'
      what = f'tfds:{d.tfds_name}'
      texts, labels = read_split(train, empty, f'{what}/{d.train_split}',
                                 records.RowErrors(d.on_bad_row, f'{what} {d.train_split}'))
      known = set(labels)
      dev_ok = lambda row: empty(row) or (None if row['label'] in known else
                                          f'unknown label "{row["label"]}" (not in train)')
      dev_texts, dev_labels = read_split(
          dev, dev_ok, f'{what}/{d.eval_split}',
          records.RowErrors(d.on_bad_row, f'{what} {d.eval_split}'))
      return texts, labels, dev_texts, dev_labels
    tfds_dir = d.tfds_dir or os.path.join(self.workdir, 'tfds')
    if not d.train_file or not d.dev_file:
      raise ValueError('set config.data.train_file and config.data.dev_file (or '
                       'config.data.tfds_name)')
    if train_split == eval_split:
      raise ValueError(f'config.data.train_split and eval_split name the same split '
                       f'{train_split!r}')
    seen: set[str] = set()
    label = d.label_column

    def collect(row):
      seen.add(row[label])

    def known(row):
      if row[label] not in seen:
        return f'unknown label "{row[label]}" (not among the {len(seen)} train labels)'
      return None
    builder = tables.prepare_table_builder(
        {train_split: d.train_file, eval_split: d.dev_file},
        columns=(d.text_column, d.label_column), data_dir=tfds_dir, name='classification',
        on_bad_row=d.on_bad_row, check_row={train_split: collect, eval_split: known},
        fmt=d.format)
    out = []
    for spec in (d.train_split, d.eval_split):
      source = tables.table_source(builder, spec)
      rows = [source[i] for i in range(len(source))]
      out += [[r[d.text_column] for r in rows], [r[d.label_column] for r in rows]]
    return tuple(out)

  def train_iterator(self, shard_index: int = 0, shard_count: int = 1) -> Iterator[Batch]:
    """Shuffled (reseeded each epoch), repeated, fixed-size train batches; resumable."""
    ds = grain.MapDataset.source(_Rows(*self.train_arrays))
    if shard_count > 1:
      ds = ds[shard_index::shard_count]
    ds = ds.shuffle(seed=self.config.seed).repeat(None)
    ds = ds.batch(self.config.batch_size // shard_count, drop_remainder=True)
    bucket = self.config.data.length_bucket
    ds = ds.map(lambda b: trim_batch(b, bucket))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

  def eval_batches(self) -> Iterable[Batch]:
    return _eval_batches(*self.dev_arrays, self.config.data.eval_batch_size,
                         self.config.data.length_bucket)

  # -- model and loss ------------------------------------------------------------------

  @property
  def d_model(self) -> int:
    """The model's width, which the 'rsqrt' learning-rate schedule scales by."""
    return self.bert_config.encoder.d_model

  def init_params(self, rng: jax.Array) -> PyTree:
    """Random params; with ``init_from`` the encoder (``bert``) is the pretrained one."""
    ids = jnp.ones((1, 8), jnp.int32)
    params = jax.jit(self.model.init)(rng, ids, ids)['params']
    if self.init_dir:
      params = {**params, 'bert': bert.pretrained_encoder(self.init_dir, params['bert'])}
    return params

  def logits_and_sums(self, params, batch, rng, deterministic):
    """(class logits [rows, num_labels], the label cross-entropy sums) of a batch."""
    logits = self.model.apply({'params': params}, batch['input_ids'], batch['attention_mask'],
                              deterministic=deterministic, rngs={'dropout': rng})
    return logits, training.cross_entropy_sums(logits, batch['label'], batch['weight'],
                                               self.config.loss.label_smoothing)

  def loss_and_metrics(self, params, batch, rng, deterministic):
    _, sums = self.logits_and_sums(params, batch, rng, deterministic)
    return sums['loss'], sums

  # -- evaluation ----------------------------------------------------------------------

  def classifier(self, params: PyTree) -> Classifier:
    d = self.config.data
    return Classifier(self.bert_config, self.config.model.pooling, params, self.tokenizer,
                      self.labels, max_len=d.max_len, batch_size=d.eval_batch_size,
                      bucket=d.length_bucket)

  def evaluate(self, params) -> tuple[dict[str, float], list[str]]:
    """Dev accuracy, macro-F1 and confusion matrix (also written to the workdir)."""
    ids, mask, y_true = self.dev_arrays
    probs = self.classifier(params).probabilities_of_ids(ids, mask)
    y_pred = probs.argmax(-1)
    c = len(self.labels)
    matrix = confusion_matrix(y_true, y_pred, c)
    f1 = per_class_f1(matrix)
    metrics = {'accuracy': accuracy(y_true, y_pred), 'macro_f1': macro_f1(y_true, y_pred, c),
               'examples': float(len(y_true))}
    if jax.process_index() == 0:
      self._write_eval(matrix, f1, y_true, y_pred, probs)
    samples = [f'confusion matrix (rows: true, columns: predicted):\n'
               f'{format_confusion(matrix, self.labels)}']
    for i in range(min(self.config.eval.num_samples, len(y_true))):
      samples.append(f'  text: {self.dev_texts[i][:200]}\n  label: {self.labels[y_true[i]]}'
                     f'  predicted: {self.labels[y_pred[i]]} (p={probs[i, y_pred[i]]:.3f})')
    return metrics, samples

  def _write_eval(self, matrix, f1, y_true, y_pred, probs) -> None:
    with open(os.path.join(self.workdir, 'confusion_matrix.json'), 'w') as f:
      json.dump({'labels': self.labels, 'matrix': matrix.tolist(),
                 'f1': dict(zip(self.labels, f1.tolist()))}, f, indent=1)
    with open(os.path.join(self.workdir, 'confusion_matrix.tsv'), 'w') as f:
      f.write('true\\predicted\t' + '\t'.join(self.labels) + '\n')
      for label, row in zip(self.labels, matrix):
        f.write(label + '\t' + '\t'.join(str(v) for v in row) + '\n')
    with open(os.path.join(self.workdir, 'dev_predictions.jsonl'), 'w') as f:
      for text, t, p, pr in zip(self.dev_texts, y_true, y_pred, probs):
        f.write(json.dumps({'text': text, 'label': self.labels[t],
                            'predicted': self.labels[p], 'probability': float(pr[p])}) + '\n')

