"""SQuAD v1.1 JSON for extractive QA: reading, TFDS storage, featurizing, post-processing.

Reading (`read_squad`): the file is ``{"version", "data": [{"title", "paragraphs":
[{"context", "qas": [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}``,
plain or .gz. A question is a bad row (reported through `records.RowErrors` with its
JSON path and id in place of a line number) when it has no id or a repeated one, when
its question or context is empty, when it has no answer (``require_answers``), or when
an answer's ``answer_start`` does not point at its ``text`` in the context.
`tfds_examples` reads the same questions from a TFDS dataset by name (TFDS's ``squad``)
with the same checks, a bad one named by its index in the split.

Storage (`prepare_squad_builder`): the good questions of each split are written once into
a TFDS array_record dataset of string columns (`tables.UserTable`, answers as JSON) keyed
on the files' sha256, so a rerun reads them back (`squad_examples`) instead of the JSON.

Featurizing (`featurize`), as in BERT's run_squad.py: each (question, context) becomes
one or more windows ``[CLS] question [SEP] context window [SEP]``. Windows hold
``max_seq_len - len(question) - 3`` context tokens and start every ``doc_stride`` tokens
(the step between window starts, BERT's meaning; Hugging Face's ``stride`` is the
overlap, ``window - doc_stride``), so consecutive windows share ``window - doc_stride``
tokens. Each token keeps its character span in the context (``offsets``, -1 outside the
context) so a predicted token span maps back to the original text. A training label is
the answer's first and last token inside the window, or (0, 0) - the [CLS] index - when
the answer is not wholly inside it.

Post-processing (`best_spans`): per example, over all its windows, the best (start, end)
pair among each window's ``n_best`` start and end candidates.

Shapes: ``n`` windows (features), ``l`` = max_seq_len, ``e`` examples.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flaxformer_mini.data import records

Features = dict[str, np.ndarray]
COLUMNS = ('id', 'title', 'question', 'context', 'answers', 'where')
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SquadExample:
  """One question about one context.

  Attributes:
    qid: the question's ``id``.
    question, context: the texts as in the file.
    answers: gold answer texts (one in train, several possible in dev).
    answer_starts: character offset of each answer in ``context``.
    where: the JSON path that names the question in messages.
    title: the article's title.
  """
  qid: str
  question: str
  context: str
  answers: tuple[str, ...] = ()
  answer_starts: tuple[int, ...] = ()
  where: str = ''
  title: str = ''


def _load_json(path: str) -> Any:
  """The parsed file; ValueError naming the path (and line/column for bad JSON)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'SQuAD file not found: {path!r}')
  with open(path, 'rb') as f:
    raw = f.read()
  if path.endswith('.gz') or raw[:2] == b'\x1f\x8b':
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise ValueError(f'{path}: not a readable gzip file ({e})') from None
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: invalid UTF-8 at byte {e.start}') from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})') from None


def _list(node: Any, key: str, path: str, where: str) -> list:
  value = node.get(key) if isinstance(node, dict) else None
  if not isinstance(value, list):
    raise ValueError(f'{path}: {where} has no list "{key}" (expected SQuAD v1.1 JSON: '
                     '{"data": [{"paragraphs": [{"context", "qas": [...]}]}]})')
  return value


def read_squad(path: str, errors: records.RowErrors, *, require_answers: bool = True
               ) -> list[SquadExample]:
  """Reads the questions of a SQuAD v1.1 JSON file (plain or .gz).

  Args:
    path: the file.
    errors: collects bad questions (``line`` = their JSON path and id); the caller
      calls ``errors.finish()``.
    require_answers: a question without answers is bad (train and dev); False for
      files of questions to answer.

  Returns:
    The good questions in file order.

  Raises:
    FileNotFoundError / ValueError naming the file for an unreadable file or a
    structure that is not SQuAD JSON (with the JSON path of the offending node);
    `records.BadRowError` per ``errors``.
  """
  doc = _load_json(path)
  out: list[SquadExample] = []
  seen: set[str] = set()
  for i, article in enumerate(_list(doc, 'data', path, 'the top level')):
    title = str(article.get('title', '')) if isinstance(article, dict) else ''
    for j, para in enumerate(_list(article, 'paragraphs', path, f'data[{i}]')):
      context = para.get('context') if isinstance(para, dict) else None
      for k, qa in enumerate(_list(para, 'qas', path, f'data[{i}].paragraphs[{j}]')):
        raw_id = qa.get('id') if isinstance(qa, dict) else None
        qid = str(raw_id) if isinstance(raw_id, (str, int)) else ''
        where = f'data[{i}].paragraphs[{j}].qas[{k}]' + (f' (id {qid})' if qid else '')
        example = _checked_example(qa, context, qid, seen, require_answers, where, title,
                                   errors, path)
        if example:
          out.append(example)
  return out


def _checked_example(qa: Any, context: Any, qid: str, seen: set[str], require_answers: bool,
                     where: str, title: str, errors: records.RowErrors, path: str
                     ) -> SquadExample | None:
  """The example of a good question (its id added to ``seen``); a bad one goes to
  ``errors.bad(path, where, why)`` and gives None."""
  why = _check_question(qa, context, require_answers)
  if not why and not qid.strip():
    why = 'no "id" (a non-empty string names the question in predictions)'
  if not why and qid in seen:
    why = f'id {qid!r} repeats an earlier question\'s id'
  if why:
    errors.bad(path, where, why)
    return None
  seen.add(qid)
  answers = qa.get('answers') or []
  errors.ok()
  return SquadExample(qid=qid, question=qa['question'], context=context,
                      answers=tuple(a['text'] for a in answers),
                      answer_starts=tuple(int(a['answer_start']) for a in answers),
                      where=where, title=title)


def _check_question(qa: Any, context: Any, require_answers: bool) -> str | None:
  """The reason a question cannot be used, or None."""
  if not isinstance(qa, dict):
    return f'a question must be a JSON object, got {type(qa).__name__}'
  if not isinstance(context, str) or not context.strip():
    return 'empty context'
  question = qa.get('question')
  if not isinstance(question, str) or not question.strip():
    return 'empty question'
  answers = qa.get('answers', [])
  if not isinstance(answers, list):
    return f'"answers" must be a list, got {type(answers).__name__}'
  if require_answers and not answers:
    return 'no answers'
  for a, answer in enumerate(answers):
    if not isinstance(answer, dict) or not isinstance(answer.get('text'), str):
      return f'answers[{a}] has no "text"'
    text, start = answer['text'], answer.get('answer_start')
    if not text.strip():
      return f'answers[{a}]: empty answer text'
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
      return f'answers[{a}]: answer_start must be an integer >= 0, got {start!r}'
    if context[start:start + len(text)] != text:
      found = context.find(text)
      hint = f' (the text occurs at {found})' if found >= 0 else ' (the text is not in it)'
      return (f'answer span not in its context: answers[{a}] answer_start={start} does not '
              f'point at its text {text[:40]!r}{hint}')
  return None


# ------------------------------------------------------------------------------ storage


def _to_row(ex: SquadExample) -> dict[str, str]:
  answers = [{'text': t, 'answer_start': s} for t, s in zip(ex.answers, ex.answer_starts)]
  return {'id': ex.qid, 'title': ex.title, 'question': ex.question, 'context': ex.context,
          'answers': json.dumps(answers, ensure_ascii=False), 'where': ex.where}


def _from_row(row: Mapping[str, str]) -> SquadExample:
  answers = json.loads(row['answers'])
  return SquadExample(qid=row['id'], question=row['question'], context=row['context'],
                      answers=tuple(a['text'] for a in answers),
                      answer_starts=tuple(a['answer_start'] for a in answers),
                      where=row['where'], title=row['title'])


def prepare_squad_builder(files: Mapping[str, str], data_dir: str, on_bad_row: str,
                          name: str = 'squad'):
  """Reads and checks the SQuAD files once and writes them as a TFDS dataset.

  Args:
    files: split -> SQuAD JSON path, e.g. {'train': ..., 'validation': ...}.
    data_dir: TFDS data dir (the dataset lands in ``user_table/<name>_<hash>/1.0.0``).
    on_bad_row: 'stop' | 'skip' (``config.data.on_bad_row``).
    name: a readable prefix of the dataset's config name.

  Returns:
    The prepared `tables.UserTable` (columns `COLUMNS`); read it with `squad_examples`.
    The bad-question counts of the build are kept beside it and reported on every use.
  Raises:
    records.BadRowError: a bad question with on_bad_row='stop' (also for a cached build
      that skipped some), or a split with no good question.
  """
  from flaxformer_mini.data import tables
  if on_bad_row not in records.ON_ERROR:
    raise ValueError(f'config.data.on_bad_row={on_bad_row!r} is not one of '
                     f'{records.ON_ERROR}')
  for split, path in files.items():
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{split} file not found: {path!r}')
  h = hashlib.sha256(b'squad-v1\0')
  for split in sorted(files):
    h.update(f'{split}\0{tables.file_key(files[split])}\0'.encode())
  config = tables.TableConfig(name=f'{name}_{h.hexdigest()[:12]}', columns=COLUMNS,
                              files={s: os.path.abspath(p) for s, p in files.items()})
  builder = tables.UserTable(config=config, data_dir=data_dir, file_format='array_record')
  report = os.path.join(builder.data_dir, tables.BAD_ROWS_FILE)
  if builder.is_prepared() and os.path.isfile(report):
    with open(report) as f:
      summary = json.load(f)
    for split, s in summary.items():
      if s['bad_rows'] and on_bad_row == 'stop':
        raise records.BadRowError(f'{s["first"][0]} ({split} split, prepared earlier with '
                                  'on_bad_row=skip; set config.data.on_bad_row=skip to '
                                  'skip such questions)')
      if s['bad_rows']:
        log.warning('%s split: skipped %d bad questions of %d (first: %s)', split,
                    s['bad_rows'], s['bad_rows'] + s['good_rows'], s['first'][0])
    return builder
  rows, summary = {}, {}
  for split, path in files.items():
    errors = records.RowErrors(on_bad_row, what=f'{split} split ({path})')
    rows[split] = [_to_row(ex) for ex in read_squad(path, errors)]
    errors.finish()
    summary[split] = dict(errors.summary(), first=errors.first)
  builder = tables.UserTable(config=config, data_dir=data_dir, file_format='array_record',
                             rows=rows)
  builder.download_and_prepare()
  with open(report, 'w') as f:
    json.dump(summary, f, indent=1)
  return builder


def squad_examples(builder, split: str) -> list[SquadExample]:
  """The questions of a split of a `prepare_squad_builder` dataset, in file order."""
  from flaxformer_mini.data import tables
  source = tables.table_source(builder, split)
  return [_from_row(source[i]) for i in range(len(source))]


TFDS_FEATURES = ('id', 'question', 'context', 'answers')  # and 'title', if it has one


def _text(value: Any) -> str:
  """A TFDS text value as str: bytes from a data source, str or numpy str otherwise."""
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def tfds_examples(name: str, split: str, errors: records.RowErrors, *,
                  data_dir: str | None = None) -> list[SquadExample]:
  """Reads the questions of a TFDS dataset with SQuAD's features, by name.

  Args:
    name: e.g. 'squad' (v1.1), read with `tfds.data_source` (array_record, no TensorFlow);
      it must be prepared in ``data_dir``. Its features are those of TFDS's squad: ``id``,
      ``question``, ``context``, ``answers`` {``text``: [..], ``answer_start``: [..]}
      and optionally ``title``.
    split: TFDS split syntax ('train', 'validation[:500]').
    errors: collects bad questions, named ``tfds:<name>/<split> example <i> (id <id>)``
      with the checks of `read_squad`; the caller calls ``errors.finish()``.
    data_dir: the TFDS data dir; None is TFDS's own.
  Returns:
    The good questions in dataset order.
  Raises:
    ValueError naming the dataset and the SQuAD features it lacks.
  """
  import tensorflow_datasets as tfds
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  features = source.dataset_info.features
  missing = [f for f in TFDS_FEATURES if f not in features]
  if not missing:
    answers = getattr(features['answers'], 'feature', {})
    missing = [f'answers.{f}' for f in ('text', 'answer_start') if f not in answers]
  if missing:
    raise ValueError(f'TFDS dataset {name!r} has no feature(s) {missing}; a SQuAD-style dataset '
                   f'has {list(TFDS_FEATURES)} with answers {{text, answer_start}}; it has '
                   f'{sorted(features)}')
  path, seen, out = f'tfds:{name}/{split}', set(), []
  for i in range(len(source)):
    row = source[i]
    qid = _text(row['id'])
    texts, starts = row['answers']['text'], row['answers']['answer_start']
    qa = {'question': _text(row['question']),
          'answers': [{'text': _text(t), 'answer_start': int(s)}
                      for t, s in zip(texts, starts)]}
    where = f'example {i}' + (f' (id {qid})' if qid else '')
    title = _text(row['title']) if 'title' in features else ''
    example = _checked_example(qa, _text(row['context']), qid, seen, True, where, title,
                               errors, path)
    if example:
      out.append(example)
  return out


# ---------------------------------------------------------------------------- featurize


@dataclasses.dataclass(frozen=True)
class WindowConfig:
  """How questions and contexts become model inputs.

  Attributes:
    max_seq_len: tokens per window incl. [CLS] and two [SEP] (l).
    doc_stride: context tokens between the starts of consecutive windows.
    max_query_len: question tokens kept (the rest is cut).
  """
  max_seq_len: int = 384
  doc_stride: int = 128
  max_query_len: int = 64

  def __post_init__(self):
    if self.max_query_len < 1 or self.doc_stride < 1:
      raise ValueError(f'config.data.max_query_len={self.max_query_len} and '
                       f'config.data.doc_stride={self.doc_stride} must be >= 1')
    if self.max_seq_len < self.max_query_len + 4:
      raise ValueError(f'config.data.max_seq_len={self.max_seq_len} leaves no room for context '
                       f'after a question of config.data.max_query_len={self.max_query_len} '
                       'tokens')
    if self.doc_stride > self.max_seq_len - self.max_query_len - 3:
      raise ValueError(f'config.data.doc_stride={self.doc_stride} is longer than a window '
                       f'({self.max_seq_len - self.max_query_len - 3} context tokens after a '
                       f'config.data.max_query_len={self.max_query_len} question): context '
                       'would be skipped')


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  cls: int
  sep: int
  pad: int


def special_ids(tokenizer) -> SpecialIds:
  """[CLS]/[SEP]/[PAD] ids of a `tokenizers.Tokenizer` (BERT WordPiece)."""
  ids = {t: tokenizer.token_to_id(t) for t in ('[CLS]', '[SEP]', '[PAD]')}
  missing = [t for t, i in ids.items() if i is None]
  if missing:
    raise ValueError(f'the tokenizer has no {missing} token(s): extractive QA needs a BERT '
                     'WordPiece vocabulary')
  return SpecialIds(ids['[CLS]'], ids['[SEP]'], ids['[PAD]'])


def plain_tokenizer(tokenizer):
  """A copy of a `tokenizers.Tokenizer` without truncation or padding (windows are cut
  here)."""
  from tokenizers import Tokenizer
  tok = Tokenizer.from_str(tokenizer.to_str())
  tok.no_truncation()
  tok.no_padding()
  return tok


def window_starts(num_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
  """[(start, length)] of the windows over ``num_tokens`` context tokens: BERT's loop
  (the last window ends at the last token)."""
  out, start = [], 0
  while True:
    length = min(num_tokens - start, window)
    out.append((start, length))
    if start + length >= num_tokens:
      return out
    start += min(length, stride)


def answer_token_span(offsets: np.ndarray, start_char: int, end_char: int
                      ) -> tuple[int, int] | None:
  """First and last context token overlapping chars [start_char, end_char), or None.

  offsets: [t, 2] character (start, end) of each context token.
  """
  ends_after = np.flatnonzero(offsets[:, 1] > start_char)
  starts_before = np.flatnonzero(offsets[:, 0] < end_char)
  if not len(ends_after) or not len(starts_before):
    return None
  first, last = int(ends_after[0]), int(starts_before[-1])
  return (first, last) if first <= last else None


def featurize(examples: Sequence[SquadExample], tokenizer, cfg: WindowConfig, *,
              with_labels: bool = True) -> Features:
  """Windows of every example (see the module docstring).

  Args:
    examples: questions with their contexts (and answers when ``with_labels``).
    tokenizer: a `tokenizers.Tokenizer` (e.g. ``WordPiece.hf``); copied without its
      truncation/padding.
    cfg: window sizes.
    with_labels: compute start/end labels from each example's first answer.

  Returns:
    dict of numpy arrays, one row per window:
      input_ids, token_type_ids, attention_mask: [n, l] int32 (pad [PAD] / type 0 / 0);
      offsets: [n, l, 2] int32 character span in the context, -1 outside it;
      max_context: [n, l] bool, the window in which this context token has the most
        context on both sides (BERT's rule for which window's prediction of a start counts);
      example_index: [n] int32 into ``examples``; window_start: [n] int32 first context
        token of the window; start_positions, end_positions: [n] int32 labels (0 = [CLS],
        answer not wholly in the window; all 0 without labels).
  Raises:
    ValueError naming the example whose context yields no tokens.
  """
  ids = special_ids(tokenizer)
  tok = plain_tokenizer(tokenizer)
  l = cfg.max_seq_len
  contexts: dict[str, Any] = {}
  unique = list(dict.fromkeys(ex.context for ex in examples))
  for text, enc in zip(unique, tok.encode_batch(unique, add_special_tokens=False)):
    contexts[text] = (np.asarray(enc.ids, np.int32),
                      np.asarray(enc.offsets, np.int32).reshape(-1, 2))
  questions = tok.encode_batch([ex.question for ex in examples], add_special_tokens=False)
  rows: dict[str, list] = {k: [] for k in (
      'input_ids', 'token_type_ids', 'attention_mask', 'offsets', 'max_context',
      'example_index', 'window_start', 'start_positions', 'end_positions')}
  for e, (ex, q_enc) in enumerate(zip(examples, questions)):
    c_ids, c_off = contexts[ex.context]
    if not len(c_ids):
      raise ValueError(f'{ex.where or ex.qid}: the context has no tokens')
    q_ids = np.asarray(q_enc.ids[:cfg.max_query_len], np.int32)
    first = len(q_ids) + 2                       # [CLS] q [SEP] -> first context position
    window = l - first - 1
    span = None
    if with_labels and ex.answers:
      s = ex.answer_starts[0]
      span = answer_token_span(c_off, s, s + len(ex.answers[0]))
    windows = window_starts(len(c_ids), window, cfg.doc_stride)
    best = _max_context_windows(len(c_ids), windows)
    for w, (ws, length) in enumerate(windows):
      input_ids = np.full((l,), ids.pad, np.int32)
      seq = np.concatenate([[ids.cls], q_ids, [ids.sep], c_ids[ws:ws + length], [ids.sep]])
      input_ids[:len(seq)] = seq
      types = np.zeros((l,), np.int32)
      types[first:len(seq)] = 1
      mask = np.zeros((l,), np.int32)
      mask[:len(seq)] = 1
      offsets = np.full((l, 2), -1, np.int32)
      offsets[first:first + length] = c_off[ws:ws + length]
      max_ctx = np.zeros((l,), bool)
      max_ctx[first:first + length] = best[ws:ws + length] == w
      start = end = 0
      if span is not None and ws <= span[0] and span[1] < ws + length:
        start, end = span[0] - ws + first, span[1] - ws + first
      for key, value in (('input_ids', input_ids), ('token_type_ids', types),
                         ('attention_mask', mask), ('offsets', offsets),
                         ('max_context', max_ctx), ('example_index', e), ('window_start', ws),
                         ('start_positions', start), ('end_positions', end)):
        rows[key].append(value)
  return {k: np.asarray(v, bool if k == 'max_context' else np.int32) for k, v in rows.items()}


def _max_context_windows(num_tokens: int, windows: Sequence[tuple[int, int]]) -> np.ndarray:
  """[t] index of the window where each token has the most context (BERT's score:
  min(tokens left, tokens right) + 0.01 * window length; the first window wins ties)."""
  best = np.zeros((num_tokens,), np.int32)
  score = np.full((num_tokens,), -np.inf)
  for w, (ws, length) in enumerate(windows):
    pos = np.arange(ws, ws + length)
    s = np.minimum(pos - ws, ws + length - 1 - pos) + 0.01 * length
    better = s > score[pos]
    best[pos[better]], score[pos[better]] = w, s[better]
  return best


def select_rows(features: Features, index: np.ndarray) -> Features:
  """The rows ``index`` of every feature array."""
  return {k: v[index] for k, v in features.items()}


def sample_windows(features: Features, negatives: int, seed: int) -> np.ndarray:
  """Sorted row indices: every window with an answer plus up to ``negatives`` answerless
  windows per example, drawn without replacement (``negatives < 0`` keeps them all)."""
  positive = features['start_positions'] > 0
  if negatives < 0:
    return np.arange(len(positive))
  rng = np.random.default_rng(seed)
  keep = [np.flatnonzero(positive)]
  example = features['example_index']
  order = np.argsort(example, kind='stable')
  bounds = np.flatnonzero(np.diff(example[order])) + 1
  for rows in np.split(order, bounds):
    neg = rows[~positive[rows]]
    if len(neg) > negatives:
      neg = rng.choice(neg, negatives, replace=False)
    keep.append(neg)
  return np.sort(np.concatenate(keep))


# ------------------------------------------------------------------------ post-processing


@dataclasses.dataclass(frozen=True)
class Span:
  """The best answer span of one example.

  Attributes:
    window: the feature row it was read from; start, end: its first/last token there.
    score: start logit + end logit.
    start_char, end_char: the answer is ``context[start_char:end_char]``.
  """
  window: int
  start: int
  end: int
  score: float
  start_char: int
  end_char: int


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, features: Features,
               num_examples: int, *, n_best: int = 20, max_answer_len: int = 30
               ) -> list[Span | None]:
  """The highest scoring answer span of every example, over all its windows.

  In each window the ``n_best`` highest start logits among tokens that may start an
  answer (context tokens of their max-context window) and the ``n_best`` highest end
  logits among context tokens are paired; a pair counts when start <= end and it spans at
  most ``max_answer_len`` tokens; its score is start logit + end logit. BERT takes the
  top n over all positions and drops invalid pairs afterwards; ranking only valid
  positions finds the same best span whenever that one is among its candidates, and a
  valid one where BERT's list holds none.

  Args:
    start_logits, end_logits: [n, l] float scores of the windows.
    features: `featurize` output for the same rows (offsets, max_context, example_index).
    num_examples: e, the number of examples the windows index.
    n_best: start and end candidates per window.
    max_answer_len: longest answer in tokens.
  Returns:
    e entries: the best `Span`, or None for an example without a valid pair.
  """
  start_logits = np.asarray(start_logits, np.float64)
  end_logits = np.asarray(end_logits, np.float64)
  offsets = features['offsets']
  if start_logits.shape != end_logits.shape or start_logits.shape != offsets.shape[:2]:
    raise ValueError(f'expected start/end logits [n, l] = {offsets.shape[:2]} like the '
                     f'features, got {start_logits.shape} and {end_logits.shape}')
  if n_best < 1 or max_answer_len < 1:
    raise ValueError(f'n_best={n_best} and max_answer_len={max_answer_len} must be >= 1')
  in_context = offsets[..., 0] >= 0
  s = np.where(features['max_context'] & in_context, start_logits, -np.inf)
  e = np.where(in_context, end_logits, -np.inf)
  k = min(n_best, s.shape[1])
  s_idx = np.argsort(-s, axis=1, kind='stable')[:, :k]                 # [n, k]
  e_idx = np.argsort(-e, axis=1, kind='stable')[:, :k]
  s_val = np.take_along_axis(s, s_idx, 1)
  e_val = np.take_along_axis(e, e_idx, 1)
  length = e_idx[:, None, :] - s_idx[:, :, None] + 1                    # [n, k, k]
  score = s_val[:, :, None] + e_val[:, None, :]
  score = np.where((length >= 1) & (length <= max_answer_len), score, -np.inf)
  flat = score.reshape(len(score), -1)
  pick = flat.argmax(1)                                                 # first max wins ties
  window_score = flat[np.arange(len(flat)), pick]
  out: list[Span | None] = [None] * num_examples
  for w in np.flatnonzero(np.isfinite(window_score)):
    ex = int(features['example_index'][w])
    if out[ex] is not None and out[ex].score >= window_score[w]:
      continue
    i, j = divmod(int(pick[w]), k)
    start, end = int(s_idx[w, i]), int(e_idx[w, j])
    out[ex] = Span(int(w), start, end, float(window_score[w]),
                   int(offsets[w, start, 0]), int(offsets[w, end, 1]))
  return out
