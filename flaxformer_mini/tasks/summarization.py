"""The ``summarization`` task: document -> summary with a seq2seq `Transformer`, dev ROUGE.

Data: a table with a document and a summary column (TSV/CSV with a header line, or JSONL;
by default ``../shared/data/summarize/debian_synopsis.{train,dev}.tsv.gz``), built into a
TFDS array_record dataset by `flaxformer_mini.data.tables`, or any TFDS dataset by name
(``config.data.tfds_name``, columns named by ``config.data.document_column`` /
``summary_column``). One SentencePiece vocabulary is trained on both columns; tokenizing,
the cache and the grain pipeline are translation's (`translation.Seq2SeqTask`).

Evaluation decodes the dev documents with beam search through
`flaxformer_mini.translate.Translator` and scores them with Google's ``rouge-score``
(ROUGE-1/2/L F-measure, Porter stemmer, averaged over documents, x100), beside two lead
baselines on the same documents: the first k words (k = the median summary length of the
train split, in words) and the first sentence.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import statistics
from collections.abc import Sequence

import jax
import numpy as np

from flaxformer_mini import data as data_lib
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.data import tables
from flaxformer_mini.data.tokenizer import Tokenizer
from flaxformer_mini.tasks.base import PyTree
from flaxformer_mini.tasks.translation import Seq2SeqTask
from flaxformer_mini.translate import SearchConfig, Translator

log = logging.getLogger(__name__)

ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL')
PREDICTIONS_FILE = 'dev_predictions.jsonl'  # the latest evaluation's summaries, one per line
SHARED_FILES = {'train': 'summarize/debian_synopsis.train.tsv.gz',
                'validation': 'summarize/debian_synopsis.dev.tsv.gz'}

# ------------------------------------------------------------------------------- metrics


@functools.lru_cache(maxsize=1)
def _scorer():
  try:
    from rouge_score import rouge_scorer
  except ImportError:
    raise ImportError('ROUGE needs the rouge-score package: python3 -m pip install '
                      'rouge-score') from None
  return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE-1/2/L F-measure over pairs, x100 (rouge-score, Porter stemmer).

  Args:
    hypotheses: [n] predicted summaries.
    references: [n] reference summaries (one per hypothesis).
  Returns:
    {'rouge1': .., 'rouge2': .., 'rougeL': ..}: the mean of each pair's F-measure (rouge-score
    lower-cases and keeps [a-z0-9] tokens), in [0, 100]. An empty hypothesis scores 0.
  """
  if isinstance(hypotheses, str) or isinstance(references, str):
    raise TypeError('rouge takes lists of texts (one per pair), got a single str')
  if len(hypotheses) != len(references):
    raise ValueError(f'rouge needs one reference per hypothesis: got {len(hypotheses)} '
                     f'hypotheses and {len(references)} references')
  if not hypotheses:
    raise ValueError('rouge needs at least one (hypothesis, reference) pair, got none')
  scorer = _scorer()
  sums = dict.fromkeys(ROUGE_TYPES, 0.0)
  for hyp, ref in zip(hypotheses, references):
    scores = scorer.score(ref, hyp)  # rouge-score's order: (target, prediction)
    for k in ROUGE_TYPES:
      sums[k] += scores[k].fmeasure
  return {k: 100.0 * v / len(hypotheses) for k, v in sums.items()}


# ------------------------------------------------------------------------------ baselines

# A sentence ends at . ! or ? followed by whitespace, unless the word is one of these.
_ABBREVIATIONS = frozenset(['e.g.', 'i.e.', 'etc.', 'vs.', 'cf.', 'mr.', 'mrs.', 'dr.',
                            'no.', 'approx.', 'incl.', 'ca.'])
_CLOSING, _OPENING = '"\')]', '"\'(['
_END = re.compile(r'[.!?]["\')\]]*(?=\s|$)')


def lead_words(document: str, k: int) -> str:
  """The first ``k`` whitespace-separated words of ``document``, joined by one space."""
  if k < 1:
    raise ValueError(f'k={k} must be >= 1')
  return ' '.join(document.split()[:k])


def first_sentence(document: str) -> str:
  """The first sentence of ``document``, whitespace runs (spaces, newlines) made one space.

  It ends at the first ``.``, ``!`` or ``?`` that ends a word followed by whitespace or the
  end of the text (closing quotes/brackets after it are kept), unless the word is an
  abbreviation such as ``e.g.`` (also ``(e.g.``); the whole document when there is none.
  """
  text = ' '.join(document.split())
  for m in _END.finditer(text):
    word = text[:m.end()].rsplit(' ', 1)[-1].lower()
    if word.rstrip(_CLOSING).lstrip(_OPENING) in _ABBREVIATIONS:
      continue
    return text[:m.end()]
  return text


def median_words(texts: Sequence[str]) -> int:
  """Median whitespace word count of ``texts``, rounded half up, at least 1."""
  if not texts:
    raise ValueError('median length of no texts')
  return max(1, int(np.floor(statistics.median(len(t.split()) for t in texts) + 0.5)))


def lead_baselines(documents: Sequence[str], references: Sequence[str], k: int
                   ) -> dict[str, float]:
  """ROUGE (see `rouge`) of the two lead baselines, keys ``lead_k_<rouge type>`` (first
  ``k`` words) and ``lead_sentence_<rouge type>`` (first sentence)."""
  out = {}
  for name, fn in (('lead_k', lambda d: lead_words(d, k)), ('lead_sentence', first_sentence)):
    out.update({f'{name}_{t}': v for t, v in rouge([fn(d) for d in documents],
                                                   references).items()})
  return out


# ---------------------------------------------------------------------------------- task


def _data_files(d) -> dict[str, str]:
  """split -> path from ``config.data`` (train_file / eval_file, or the shared files)."""
  if d.source == 'files':
    missing = [k for k in ('train_file', 'eval_file') if not d.get(k)]
    if missing:
      raise ValueError(f'config.data.source="files" needs config.data.{missing[0]}')
    return {'train': d.train_file, 'validation': d.eval_file}
  if d.source == 'shared':
    root = os.path.abspath(os.path.join(d.shared_root, 'data'))
    files = {split: os.path.join(root, rel) for split, rel in SHARED_FILES.items()}
    for path in files.values():
      if not os.path.isfile(path):
        raise FileNotFoundError(
            f'{path!r} not found: config.data.shared_root={d.shared_root!r} must contain '
            f'data/{SHARED_FILES["train"]}; pass --config.data.shared_root=/path/to/shared or '
            '--config.data.source=files with --config.data.train_file/eval_file')
    return files
  raise ValueError(f"config.data.source={d.source!r} is not one of ('shared', 'files', "
                   "'tfds')")


class SummarizationTask(Seq2SeqTask):
  """Document -> summary with the seq2seq `Transformer` (or any config of it, e.g. T5).

  Setup: the table's TFDS array_record dataset (in ``data.tfds_dir`` or
  ``<workdir>/tfds``; bad rows per ``data.on_bad_row``), or ``data.tfds_name``'s splits,
  then `Seq2SeqTask._setup_model` (joint SentencePiece model and the model).
  """

  name = 'summarization'

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, os.path.abspath(workdir)
    d = config.data
    self.src_key, self.tgt_key = d.document_column, d.summary_column
    if self.src_key == self.tgt_key:
      raise ValueError(f'config.data.document_column and summary_column are both '
                       f'{self.src_key!r}')
    os.makedirs(workdir, exist_ok=True)
    columns = {self.src_key: self.src_key, self.tgt_key: self.tgt_key}
    if d.source == 'tfds':
      if not d.get('tfds_name'):
        raise ValueError('config.data.source="tfds" needs config.data.tfds_name')
      self.dataset_name = d.tfds_name
      self.train_source, self.eval_source = (
          tables.tfds_table_source(d.tfds_name, split, columns, data_dir=d.tfds_dir or None)
          for split in (d.train_split, d.eval_split))
    else:
      builder = tables.prepare_table_builder(
          _data_files(d), columns=tuple(columns),
          data_dir=d.tfds_dir or os.path.join(workdir, 'tfds'), name=d.table_name,
          on_bad_row=d.on_bad_row)
      self.dataset_name = builder.info.full_name
      self.train_source = tables.table_source(builder, d.train_split)
      self.eval_source = tables.table_source(builder, d.eval_split)
    self._setup_model(workdir)

  def _tokenize(self, source) -> data_lib.TokenizedSource:
    # Table sources carry no TFDS identity: the cache key names the dataset and split.
    d = self.config.data
    split = d.train_split if source is self.train_source else d.eval_split
    return data_lib.tokenize_source(source, self.tokenizer, src_key=self.src_key,
                                    tgt_key=self.tgt_key, cache_dir=self._tokenized_dir,
                                    source_id=f'{self.dataset_name}:{split}')

  @functools.cached_property
  def lead_k(self) -> int:
    """k of the lead-k baseline: the median summary length of the train split, in words."""
    return median_words([data_lib.as_text(ex[self.tgt_key])
                         for chunk in data_lib.read_chunks(self.train_source,
                                                           len(self.train_source))
                         for ex in chunk])

  def _dev_pairs(self) -> tuple[list[str], list[str]]:
    e = self.config.eval
    n = len(self.eval_source)
    n = min(e.rouge_examples, n) if e.rouge_examples else n
    examples = data_lib.read_examples(self.eval_source, 0, n)
    return ([data_lib.as_text(x[self.src_key]) for x in examples],
            [data_lib.as_text(x[self.tgt_key]) for x in examples])

  @functools.cached_property
  def baselines(self) -> dict[str, float]:
    """Lead baselines' ROUGE on the evaluated dev documents (see `lead_baselines`)."""
    documents, references = self._dev_pairs()
    return {'lead_k': float(self.lead_k),
            **lead_baselines(documents, references, self.lead_k)}

  def summarizer(self, params: PyTree) -> Summarizer:
    """A `Summarizer` of ``params`` with the run's tokenizer and config."""
    return Summarizer(self.model_config, params, self.tokenizer, config=self.config)

  def evaluate(self, params) -> tuple[dict[str, float], list[str]]:
    """Dev ROUGE-1/2/L of the model's summaries and of the lead baselines, and samples;
    every summary also goes to ``<workdir>/dev_predictions.jsonl`` (`PREDICTIONS_FILE`)."""
    documents, references = self._dev_pairs()
    hyps = self.summarizer(params).summarize(documents)
    metrics = {**rouge(hyps, references), **self.baselines,
               'rouge_examples': float(len(documents))}
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, PREDICTIONS_FILE), 'w', encoding='utf-8') as f:
        for doc, ref, hyp in zip(documents, references, hyps):
          f.write(json.dumps({'document': doc, 'reference': ref, 'summary': hyp},
                             ensure_ascii=False) + '\n')
    k = self.lead_k
    samples = [f'  doc: {doc[:300]}\n  ref: {ref}\n  hyp: {hyp}\n  lead-{k}: '
               f'{lead_words(doc, k)}'
               for doc, ref, hyp in list(zip(documents, references, hyps))
               [:self.config.eval.num_samples]]
    return metrics, samples


# ----------------------------------------------------------------------------- predictor


class Summarizer:
  """A trained summarization model on one device: ``summarize(documents) -> summaries``.

  Args:
    model_config: the model's `TransformerConfig`.
    params: its parameters.
    tokenizer: the run's SentencePiece tokenizer.
    config: the run's config; ``data.max_source_len`` (documents are cut to that many
      tokens, as in training), ``eval.max_decode_len``, ``eval.decode_batch_size`` and
      ``eval.beam_size`` / ``eval.alpha`` (the search) come from it unless given.
    search: overrides the config's search.
  """

  def __init__(self, model_config: TransformerConfig, params: PyTree, tokenizer: Tokenizer,
               *, config=None, max_source_len: int | None = None,
               max_decode_len: int | None = None, batch_size: int | None = None,
               search: SearchConfig | None = None):
    e = config.eval if config is not None else {}
    if max_source_len is None:
      max_source_len = (config.data.max_source_len if config is not None
                        else model_config.max_len)
    if max_decode_len is None:
      max_decode_len = e.get('max_decode_len', 32)
    if batch_size is None:
      batch_size = e.get('decode_batch_size', 32)
    self.max_source_len = min(int(max_source_len), model_config.max_len)
    self.translator = Translator(model_config, params, tokenizer,
                                 max_decode_len=min(int(max_decode_len), model_config.max_len),
                                 batch_size=int(batch_size))
    if search is None:
      beam = int(e.get('beam_size', 4))
      search = (SearchConfig('beam', beam_size=beam, alpha=float(e.get('alpha', 0.6)))
                if beam > 1 else SearchConfig('greedy'))
    self.search = search
    self.tokenizer = tokenizer

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, **kwargs) -> Summarizer:
    """Loads checkpoint ``step`` (default: the newest readable) of a training run dir;
    keyword arguments go to the constructor."""
    from flaxformer_mini import checkpoints  # pylint: disable=import-outside-toplevel
    config, params, tokenizer = checkpoints.load_for_inference(workdir, step)
    if config.get('task') != SummarizationTask.name:
      raise ValueError(f'{os.path.abspath(workdir)!r} is a {config.get("task")!r} run, not '
                       f'{SummarizationTask.name!r}')
    model_config = TransformerConfig.from_dict(config.model)
    try:
      return cls(model_config, params, tokenizer, config=config, **kwargs)
    except ValueError as e:
      raise ValueError(f'{os.path.abspath(workdir)!r}: {e}') from None

  def encode(self, documents: Sequence[str]) -> list[np.ndarray | None]:
    """Source ids of ``documents`` as training sees them: each cut to its first
    ``max_source_len`` tokens (no EOS); None for an empty (whitespace) document."""
    if isinstance(documents, str):
      raise TypeError('Summarizer takes a list of documents, got a single str')
    nonempty = [i for i, doc in enumerate(documents) if doc.strip()]
    encoded: list[np.ndarray | None] = [None] * len(documents)
    for i, ids in zip(nonempty, self.tokenizer.encode([documents[i] for i in nonempty])):
      encoded[i] = ids[:self.max_source_len]
    return encoded

  def summarize(self, documents: Sequence[str]) -> list[str]:
    """Summaries of ``documents`` (same length and order; empty in, empty out).

    Each document is cut as `encode` says, then decoded with ``self.search`` by
    `Translator.translate_encoded` (length-bucketed batches, the evaluation's path).
    """
    return self.translator.translate_encoded(self.encode(documents), self.search)
