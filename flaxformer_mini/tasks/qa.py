"""The ``qa`` task: extractive question answering (SQuAD v1.1) with a BERT span head.

Data: SQuAD v1.1 JSON train and dev files (``config.data.train_file`` / ``dev_file``, plain
or .gz; by default the FAQ set in ``../shared/data/qa``), or a prepared TFDS dataset with
SQuAD's features by name (``config.data.tfds_name``, e.g. 'squad'; `squad.tfds_examples`).
Bad questions (no or repeated id, empty question or context, no answer, an ``answer_start``
that does not point at its text) are reported with file, JSON path and id (or the TFDS
split and index), and skipped or fatal by ``config.data.on_bad_row``; the good ones of the
files are stored once as a TFDS array_record dataset (`squad.prepare_squad_builder`) that
later runs read instead of the JSON.

Features (`squad.featurize`): ``[CLS] question [SEP] context window [SEP]`` windows of
``data.max_seq_len`` tokens every ``data.doc_stride`` context tokens, labelled with the
answer's first/last token or (0, 0) when the answer is not wholly inside. Long contexts
give many answerless windows; training keeps every answer window and
``data.train_negatives`` answerless ones per question (seeded), since the answerless ones
would otherwise fill most of each batch for little signal.

Model: `bert.BertForQuestionAnswering`; ``init_from='minilm'`` (or a directory with a
Hugging Face BERT ``model.safetensors`` + ``config.json``) loads the pretrained encoder
and initialises only the span head, ``init_from=''`` trains ``config.model.encoder``
sizes from scratch; the WordPiece tokenizer (``config.data.tokenizer``, default
MiniLM's) is saved as a run asset. Loss per window: (CE(start) + CE(end)) / 2.

Evaluation: every window of every dev question, `squad.best_spans` (``eval.n_best``,
``eval.max_answer_len``), the official EM/F1 (`metrics_squad`), ``dev_predictions.json``
({id: answer}) in the workdir, a few printed examples, and three baselines on the same
questions: the context's first sentence, the context sentence closest to the question by
TF-IDF cosine, and that sentence continued to the median train answer length.
`QuestionAnswerer` loads a run on one device.

Batches: ``input_ids``, ``token_type_ids``, ``attention_mask`` [b, l] int32 (l trimmed to
the batch's longest row rounded up to ``data.length_bucket``), ``start_positions``,
``end_positions`` [b] int32, ``weight`` [b] float32 (0 on rows padding an eval batch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
from collections.abc import Iterable, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_mini import checkpoints, metrics_squad, training
from flaxformer_mini.data import records, squad, wordpiece
from flaxformer_mini.tasks.base import PyTree
from flaxformer_mini.variants import bert

Batch = dict[str, np.ndarray]
MODEL_FILE = 'model.json'
PREDICTIONS_FILE = 'dev_predictions.json'
TOKEN_KEYS = ('input_ids', 'token_type_ids', 'attention_mask')

# ----------------------------------------------------------------------------- baselines

_WORD = re.compile(r'(?u)\b\w\w+\b')          # scikit-learn's default token_pattern
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+')


def sentence_spans(text: str) -> list[tuple[int, int]]:
  """[(start, end)] character spans of the sentences of ``text``: a sentence ends at
  . ! or ? followed by whitespace; spans are stripped of surrounding whitespace."""
  out, start = [], 0
  for m in [*_SENTENCE_END.finditer(text), None]:
    end = m.start() if m else len(text)
    piece = text[start:end]
    if piece.strip():
      lead = len(piece) - len(piece.lstrip())
      out.append((start + lead, start + len(piece.rstrip())))
    if m:
      start = m.end()
  return out


def tfidf_similarities(query: str, documents: Sequence[str]) -> np.ndarray:
  """[d] cosine similarity of ``query`` to each document under TF-IDF fitted on the
  documents, as scikit-learn's ``TfidfVectorizer()`` defaults (lowercase, words of 2+
  characters, idf = ln((1 + d) / (1 + df)) + 1, raw counts, l2-normalised rows)."""
  docs = [_WORD.findall(t.lower()) for t in documents]
  vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
  counts = np.zeros((len(docs), len(vocab)))
  for r, d in enumerate(docs):
    np.add.at(counts[r], [vocab[w] for w in d], 1.0)
  idf = np.log((1 + len(docs)) / (1 + (counts > 0).sum(0))) + 1
  q = np.zeros(len(vocab))
  np.add.at(q, [vocab[w] for w in _WORD.findall(query.lower()) if w in vocab], 1.0)
  x, q = counts * idf, q * idf
  x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
  return x @ (q / max(np.linalg.norm(q), 1e-300))


def baseline_answers(question: str, context: str, passage_words: int) -> dict[str, str]:
  """The three baselines' answers: 'first_sentence' of the context, 'tfidf_sentence' (the
  sentence most similar to the question, the first on ties), 'tfidf_passage' (that
  sentence and the ones after it until ``passage_words`` whitespace words)."""
  spans = sentence_spans(context)
  best = int(np.argmax(tfidf_similarities(question, [context[s:e] for s, e in spans])))
  last, words = best, len(context[slice(*spans[best])].split())
  while words < passage_words and last + 1 < len(spans):
    last += 1
    words += len(context[slice(*spans[last])].split())
  return {'first_sentence': context[slice(*spans[0])],
          'tfidf_sentence': context[slice(*spans[best])],
          'tfidf_passage': context[spans[best][0]:spans[last][1]]}


def baseline_metrics(examples: Sequence[squad.SquadExample], passage_words: int
                     ) -> dict[str, float]:
  """EM/F1 of each baseline: {'baseline_<name>_exact_match' / '_f1': ..}."""
  preds: dict[str, dict[str, str]] = {}
  for ex in examples:
    for name, text in baseline_answers(ex.question, ex.context, passage_words).items():
      preds.setdefault(name, {})[ex.qid] = text
  gold = {ex.qid: list(ex.answers) for ex in examples}
  out = {}
  for name, p in preds.items():
    for k, v in metrics_squad.squad_v1(p, gold).items():
      out[f'baseline_{name}_{k}'] = v
  return out


# --------------------------------------------------------------------------------- model


def span_loss_sums(start_logits: jax.Array, end_logits: jax.Array, batch: Batch
                   ) -> dict[str, jax.Array]:
  """(CE(start) + CE(end)) / 2 summed over weighted windows, pad positions masked.

  Args:
    start_logits, end_logits: [b, l] float.
    batch: ``start_positions``, ``end_positions`` [b] int, ``attention_mask`` [b, l],
      ``weight`` [b].
  Returns:
    sums: ``loss``, ``start_accuracy`` / ``end_accuracy`` (argmax hits), ``weight``.
  """
  valid = batch['attention_mask'] > 0
  sums = [training.cross_entropy_sums(jnp.where(valid, logits, -1e9), batch[key],
                                      batch['weight'])
          for logits, key in ((start_logits, 'start_positions'), (end_logits, 'end_positions'))]
  return {'loss': (sums[0]['loss'] + sums[1]['loss']) / 2,
          'start_accuracy': sums[0]['correct'], 'end_accuracy': sums[1]['correct'],
          'weight': sums[0]['weight']}


def model_config(m) -> tuple[bert.BertConfig, str]:
  """(BertConfig without pooler, pretrained dir or '') from ``config.model``."""
  return bert.config_from_init(m.init_from, m.encoder, type_vocab_size=m.type_vocab_size,
                               pooler=False)


def config_to_json(cfg: bert.BertConfig) -> dict:
  encoder = {k: (jnp.dtype(v).name if k in ('dtype', 'param_dtype') else v)
             for k, v in dataclasses.asdict(cfg.encoder).items()}
  return {'encoder': encoder, 'type_vocab_size': cfg.type_vocab_size, 'pooler': cfg.pooler}


def pretrained_params(init_dir: str, params: PyTree) -> PyTree:
  """``params`` with the encoder (``bert``) replaced by the checkpoint's (pooler dropped:
  the span head reads token states only)."""
  return {**params, 'bert': bert.pretrained_encoder(init_dir, params['bert'])}


# ---------------------------------------------------------------------------------- data


class _Rows:
  """Random access over feature rows (the training keys only) with weight 1."""

  def __init__(self, features: squad.Features):
    self.f = {k: features[k] for k in (*TOKEN_KEYS, 'start_positions', 'end_positions')}

  def __len__(self) -> int:
    return len(self.f['input_ids'])

  def __getitem__(self, i):
    return {**{k: v[i] for k, v in self.f.items()}, 'weight': np.float32(1.0)}


def trim_batch(batch: Batch, bucket: int) -> Batch:
  """Cuts the [b, l] columns to the longest row rounded up to a multiple of ``bucket``."""
  mask = batch['attention_mask']
  if bucket <= 0 or not mask.size:
    return batch
  longest = int(mask.sum(1).max())
  length = min(mask.shape[1], max(bucket, -(-longest // bucket) * bucket))
  return {k: (v[:, :length] if k in TOKEN_KEYS else v) for k, v in batch.items()}


def padded_batches(features: squad.Features, batch_size: int, bucket: int,
                   keys: Sequence[str] = (*TOKEN_KEYS, 'start_positions', 'end_positions')
                   ) -> Iterator[Batch]:
  """Fixed-size batches of the rows in order; ``weight`` 0 on rows padding the last."""
  n = len(features['input_ids'])
  for start in range(0, n, batch_size):
    k = min(batch_size, n - start)
    b = {}
    for key in keys:
      v = features[key]
      b[key] = np.zeros((batch_size, *v.shape[1:]), v.dtype)
      b[key][:k] = v[start:start + k]
    b['weight'] = (np.arange(batch_size) < k).astype(np.float32)
    yield trim_batch(b, bucket)


# ---------------------------------------------------------------------------- predictor


@dataclasses.dataclass(frozen=True)
class Answer:
  """The predicted answer to one question: its text, score (start + end logit) and
  character span in the context (``-1, -1`` and '' when no span was valid)."""
  text: str
  score: float
  start_char: int
  end_char: int


class QuestionAnswerer:
  """Answers questions about contexts with a trained span model on one device.

  Args:
    cfg: the encoder (`bert.BertForQuestionAnswering`); params: its params.
    tokenizer: the run's `wordpiece.WordPiece`.
    windows: how contexts are cut (`squad.WindowConfig`).
    n_best / max_answer_len: `squad.best_spans`.
    batch_size / bucket: windows per forward pass, lengths rounded up to ``bucket``.
  """

  def __init__(self, cfg: bert.BertConfig, params: PyTree, tokenizer: wordpiece.WordPiece,
               windows: squad.WindowConfig, *, n_best: int = 20, max_answer_len: int = 256,
               batch_size: int = 32, bucket: int = 64):
    if windows.max_seq_len > cfg.encoder.max_len:
      raise ValueError(f'config.data.max_seq_len={windows.max_seq_len} exceeds the model\'s '
                       f'position table ({cfg.encoder.max_len})')
    self.cfg, self.tokenizer, self.windows = cfg, tokenizer, windows
    self.n_best, self.max_answer_len = n_best, max_answer_len
    self.batch_size, self.bucket = batch_size, bucket
    self.set_params(params)
    model = bert.BertForQuestionAnswering(cfg)
    self._logits = jax.jit(lambda p, b: model.apply(
        {'params': p}, b['input_ids'], b['attention_mask'], b['token_type_ids']))

  def set_params(self, params: PyTree) -> None:
    self.params = jax.device_put(params, jax.local_devices()[0])

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, **kwargs
                   ) -> QuestionAnswerer:
    """Loads a ``qa`` run (newest readable checkpoint, or ``step``)."""
    config, params, assets = checkpoints.load_run(workdir, step)
    if config.task != 'qa':
      raise ValueError(f'{workdir} is a {config.task!r} run, not a qa run')
    for name in (MODEL_FILE, wordpiece.TOKENIZER_FILE):
      if name not in assets:
        raise FileNotFoundError(f'{workdir}: the run has no asset {name}')
    with open(assets[MODEL_FILE]) as f:
      cfg = bert.BertConfig.from_dict(json.load(f))
    tokenizer = wordpiece.WordPiece.from_file(assets[wordpiece.TOKENIZER_FILE])
    d, e = config.data, config.eval
    kwargs.setdefault('n_best', e.n_best)
    kwargs.setdefault('max_answer_len', e.max_answer_len)
    kwargs.setdefault('batch_size', d.eval_batch_size)
    kwargs.setdefault('bucket', d.length_bucket)
    return cls(cfg, params, tokenizer, window_config(d), **kwargs)

  def logits(self, features: squad.Features) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) logits [n, l] float32 of the feature rows (0 past a row's batch
    length, which `squad.best_spans` never reads: it lies outside the context)."""
    n, l = features['input_ids'].shape
    start, end = np.zeros((n, l), np.float32), np.zeros((n, l), np.float32)
    for i, b in enumerate(padded_batches(features, self.batch_size, self.bucket, TOKEN_KEYS)):
      rows = slice(i * self.batch_size, min((i + 1) * self.batch_size, n))
      k, length = rows.stop - rows.start, b['input_ids'].shape[1]
      s, e = self._logits(self.params, {key: b[key] for key in TOKEN_KEYS})
      start[rows, :length], end[rows, :length] = np.asarray(s)[:k], np.asarray(e)[:k]
    return start, end

  def predict(self, examples: Sequence[squad.SquadExample],
              features: squad.Features | None = None) -> list[Answer]:
    """The best answer of each example (``features``: its windows, if already made)."""
    if features is None:
      features = squad.featurize(examples, self.tokenizer.hf, self.windows, with_labels=False)
    start, end = self.logits(features)
    spans = squad.best_spans(start, end, features, len(examples), n_best=self.n_best,
                             max_answer_len=self.max_answer_len)
    return [Answer('', float('-inf'), -1, -1) if s is None else
            Answer(ex.context[s.start_char:s.end_char], s.score, s.start_char, s.end_char)
            for ex, s in zip(examples, spans)]

  def answer(self, questions: Sequence[str], contexts: Sequence[str]) -> list[Answer]:
    """One answer per (question, context) pair: a span of the context."""
    questions, contexts = list(questions), list(contexts)
    if len(questions) != len(contexts):
      raise ValueError(f'{len(questions)} questions but {len(contexts)} contexts')
    for i, (q, c) in enumerate(zip(questions, contexts)):
      for what, text in (('question', q), ('context', c)):
        if not isinstance(text, str) or not text.strip():
          raise ValueError(f'{what} {i} is empty or not a string')
    if not questions:
      return []
    return self.predict([squad.SquadExample(str(i), q, c, where=f'question {i}')
                         for i, (q, c) in enumerate(zip(questions, contexts))])


def window_config(d) -> squad.WindowConfig:
  """`squad.WindowConfig` from ``config.data``."""
  return squad.WindowConfig(max_seq_len=d.max_seq_len, doc_stride=d.doc_stride,
                            max_query_len=d.max_query_len)


# ---------------------------------------------------------------------------------- task


class QATask:
  """`tasks.Task` for extractive QA. Reads ``config.model`` (init_from, encoder,
  type_vocab_size), ``config.data`` (train_file, dev_file, tfds_name, train_split, eval_split,
  on_bad_row, tokenizer, max_seq_len, doc_stride, max_query_len, train_negatives,
  length_bucket, eval_batch_size, tfds_dir), ``config.eval`` (n_best, max_answer_len,
  num_samples), ``config.batch_size`` and ``config.seed``.

  Setup writes the run's assets ``tokenizer.json`` and ``model.json`` (the resolved
  model sizes) into the workdir.
  """

  name = 'qa'

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, os.path.abspath(workdir)
    d = config.data
    self.windows = window_config(d)
    os.makedirs(self.workdir, exist_ok=True)
    train_examples, self.dev_examples = self._read_data()

    tokenizer_src = d.tokenizer or os.path.join(bert.minilm_dir(), wordpiece.TOKENIZER_FILE)
    self.tokenizer = wordpiece.run_tokenizer(
        self.workdir, tokenizer_src, trained=checkpoints.has_checkpoints(self.workdir))
    tokenizer_path = self.tokenizer.path

    self.bert_config, self.init_dir = model_config(config.model)
    enc = self.bert_config.encoder
    if self.tokenizer.vocab_size > enc.vocab_size:
      raise ValueError(f'the tokenizer has {self.tokenizer.vocab_size} tokens, more than '
                       f'model vocab_size={enc.vocab_size} (config.model.encoder.vocab_size)')
    if d.max_seq_len > enc.max_len:
      raise ValueError(f'config.data.max_seq_len={d.max_seq_len} exceeds the model\'s '
                       f'position table ({enc.max_len}, config.model.encoder.max_len)')
    model_path = os.path.join(self.workdir, MODEL_FILE)
    with open(model_path, 'w') as f:
      json.dump(config_to_json(self.bert_config), f, indent=1)
    self.model = bert.BertForQuestionAnswering(self.bert_config)
    self.assets = {MODEL_FILE: model_path, wordpiece.TOKENIZER_FILE: tokenizer_path}

    train = squad.featurize(train_examples, self.tokenizer.hf, self.windows)
    self.train_features = squad.select_rows(
        train, squad.sample_windows(train, d.train_negatives, config.seed))
    self.dev_features = squad.featurize(self.dev_examples, self.tokenizer.hf, self.windows)
    self.dev_loss_features = squad.select_rows(
        self.dev_features, squad.sample_windows(self.dev_features, d.train_negatives,
                                                config.seed))
    self.answer_in_a_window = 100.0 * len(set(
        self.dev_features['example_index'][self.dev_features['start_positions'] > 0])) / len(
            self.dev_examples)
    # Baselines see only the dev questions; the passage length is the train answers' median.
    self.passage_words = int(statistics.median(len(ex.answers[0].split())
                                               for ex in train_examples))
    self.baselines = baseline_metrics(self.dev_examples, self.passage_words)
    if jax.process_index() == 0:
      self._report(train_examples, train)
    self._answerer: QuestionAnswerer | None = None

  def _read_data(self):
    d = self.config.data
    if d.tfds_name:
      # A prepared TFDS dataset lives in TFDS's own data dir unless tfds_dir names one.
      out = []
      for split in (d.train_split, d.eval_split):
        errors = records.RowErrors(d.on_bad_row, f'tfds:{d.tfds_name} {split}')
        out.append(squad.tfds_examples(d.tfds_name, split, errors, data_dir=d.tfds_dir or None))
        errors.finish()
      return tuple(out)
    tfds_dir = d.tfds_dir or os.path.join(self.workdir, 'tfds')
    if not d.train_file or not d.dev_file:
      raise ValueError('set config.data.train_file and config.data.dev_file (SQuAD v1.1 JSON) '
                       'or config.data.tfds_name')
    train_split, eval_split = (s.split('[')[0] for s in (d.train_split, d.eval_split))
    if train_split == eval_split:
      raise ValueError(f'config.data.train_split and eval_split name the same split '
                       f'{train_split!r}')
    builder = squad.prepare_squad_builder({train_split: d.train_file, eval_split: d.dev_file},
                                          tfds_dir, d.on_bad_row, name='qa')
    return (squad.squad_examples(builder, d.train_split),
            squad.squad_examples(builder, d.eval_split))

  def _report(self, train_examples, train_all) -> None:
    pos = train_all['start_positions'] > 0
    fitted = len(set(train_all['example_index'][pos]))
    print(f'qa: train {len(train_examples)} questions -> {len(pos)} windows, {pos.sum()} '
          f'holding their answer ({fitted} questions; the others\' answers fit no window), '
          f'{len(self.train_features["input_ids"])} kept with data.train_negatives='
          f'{self.config.data.train_negatives}; dev {len(self.dev_examples)} questions -> '
          f'{len(self.dev_features["input_ids"])} windows, answer inside one for '
          f'{self.answer_in_a_window:.1f}%', flush=True)

  def train_iterator(self, shard_index: int = 0, shard_count: int = 1) -> Iterator[Batch]:
    """Shuffled (reseeded each epoch), repeated, fixed-size train batches; resumable."""
    ds = grain.MapDataset.source(_Rows(self.train_features))
    if shard_count > 1:
      ds = ds[shard_index::shard_count]
    ds = ds.shuffle(seed=self.config.seed).repeat(None)
    ds = ds.batch(self.config.batch_size // shard_count, drop_remainder=True)
    bucket = self.config.data.length_bucket
    ds = ds.map(lambda b: trim_batch(b, bucket))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

  def eval_batches(self) -> Iterable[Batch]:
    """The dev loss: answer windows plus the same sampled share of answerless ones."""
    d = self.config.data
    return list(padded_batches(self.dev_loss_features, d.eval_batch_size, d.length_bucket))

  @property
  def d_model(self) -> int:
    """The model's width, which the 'rsqrt' learning-rate schedule scales by."""
    return self.bert_config.encoder.d_model

  def init_params(self, rng: jax.Array) -> PyTree:
    """Random params; with ``init_from`` the encoder (``bert``) is the pretrained one."""
    ids = jnp.ones((1, 8), jnp.int32)
    params = jax.jit(self.model.init)(rng, ids, ids, ids)['params']
    return pretrained_params(self.init_dir, params) if self.init_dir else params

  def loss_and_metrics(self, params, batch, rng, deterministic):
    start, end = self.model.apply(
        {'params': params}, batch['input_ids'], batch['attention_mask'],
        batch['token_type_ids'], deterministic=deterministic, rngs={'dropout': rng})
    sums = span_loss_sums(start, end, batch)
    return sums['loss'], sums

  def answerer(self, params: PyTree) -> QuestionAnswerer:
    """The run's `QuestionAnswerer` with ``params`` (compiled once per task)."""
    if self._answerer is None:
      d, e = self.config.data, self.config.eval
      self._answerer = QuestionAnswerer(
          self.bert_config, params, self.tokenizer, self.windows, n_best=e.n_best,
          max_answer_len=e.max_answer_len, batch_size=d.eval_batch_size,
          bucket=d.length_bucket)
    else:
      self._answerer.set_params(params)
    return self._answerer

  def evaluate(self, params) -> tuple[dict[str, float], list[str]]:
    """Dev EM/F1 over all windows, the baselines, ``dev_predictions.json``, examples."""
    answers = self.answerer(params).predict(self.dev_examples, self.dev_features)
    preds = {ex.qid: a.text for ex, a in zip(self.dev_examples, answers)}
    gold = {ex.qid: list(ex.answers) for ex in self.dev_examples}
    metrics = metrics_squad.squad_v1(preds, gold)
    metrics.update(self.baselines)
    metrics.update(answer_in_a_window=self.answer_in_a_window,
                   examples=float(len(self.dev_examples)))
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, PREDICTIONS_FILE), 'w') as f:
        json.dump(preds, f, indent=1, ensure_ascii=False)
    cut = lambda t: t if len(t) <= 300 else t[:300] + ' ...'
    samples = [f'dev EM {metrics["exact_match"]:.2f} F1 {metrics["f1"]:.2f}; baselines F1: '
               + ', '.join(f'{k[9:-3]} {v:.2f}' for k, v in self.baselines.items()
                           if k.endswith('_f1'))]
    for ex, a in list(zip(self.dev_examples, answers))[:self.config.eval.num_samples]:
      f1 = metrics_squad.max_over_ground_truths(metrics_squad.f1_score, a.text, ex.answers)
      samples.append(f'  question: {ex.question}\n  gold: {cut(ex.answers[0])}\n'
                     f'  predicted (F1 {100 * f1:.1f}): {cut(a.text)}')
    return metrics, samples
