"""The official SQuAD v1.1 metrics: exact match and token F1 after answer normalization.

Same definitions as ``evaluate-v1.1.py`` of the SQuAD release: answers are lowercased,
punctuation (``string.punctuation``) removed, the articles a/an/the removed and
whitespace collapsed; F1 is over the multiset of whitespace tokens; each prediction
takes the maximum over its gold answers; the dataset scores are percentages.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r'\b(a|an|the)\b')


def normalize_answer(s: str) -> str:
  """Lower text and remove punctuation, articles and extra whitespace."""
  s = s.lower()
  s = ''.join(ch for ch in s if ch not in _PUNCT)
  s = _ARTICLES.sub(' ', s)
  return ' '.join(s.split())


def f1_score(prediction: str, ground_truth: str) -> float:
  """Token F1 of the normalized strings (0 when they share no token)."""
  pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
  common = collections.Counter(pred) & collections.Counter(gold)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def max_over_ground_truths(metric, prediction: str, ground_truths: Sequence[str]) -> float:
  return max(metric(prediction, gt) for gt in ground_truths)


def squad_v1(predictions: Mapping[str, str], gold: Mapping[str, Sequence[str]]
             ) -> dict[str, float]:
  """Dataset EM and F1 in percent, over every question of ``gold``.

  Args:
    predictions: question id -> predicted text (a missing id scores 0, as officially).
    gold: question id -> its gold answer texts.

  Returns:
    {'exact_match': .., 'f1': ..} in [0, 100].
  """
  if not gold:
    raise ValueError('no gold questions to score')
  em = f1 = 0.0
  for qid, answers in gold.items():
    if not answers:
      raise ValueError(f'question {qid!r} has no gold answer')
    if qid not in predictions:
      continue
    em += max_over_ground_truths(exact_match_score, predictions[qid], answers)
    f1 += max_over_ground_truths(f1_score, predictions[qid], answers)
  return {'exact_match': 100.0 * em / len(gold), 'f1': 100.0 * f1 / len(gold)}
