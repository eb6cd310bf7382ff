"""Non-neural baselines for the classification configs: majority class and TF-IDF + logistic
regression, trained on the train split and scored on the dev split.

The rows are read exactly as the ``classification`` task reads them (`data.tables.read_rows`
with the task's checks: a dev label the train split lacks is a bad row), so the baselines
and the fine-tuned models see the same examples. Settings (fixed, not tuned on dev):

  majority: sklearn DummyClassifier(strategy='most_frequent').
  tfidf_lr: TfidfVectorizer(lowercase=True, ngram_range=(1, 2), min_df=2, sublinear_tf=True)
            on word unigrams + bigrams (sklearn's default token pattern), then
            LogisticRegression(C=1.0, max_iter=2000) (lbfgs, L2; multinomial for > 2 classes).

  python3 benchmarks/classify_baselines.py [--datasets movie_sentiment debian_topics]
      [--data_dir ../shared/data/classify] [--out baselines.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import common  # also puts the repo root on sys.path
import sklearn
from sklearn import metrics
from sklearn.dummy import DummyClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from flaxformer_mini.data import records, tables

DATA_DIR = os.path.join(common.REPO_ROOT, '..', 'shared', 'data', 'classify')
TFIDF = dict(lowercase=True, ngram_range=(1, 2), min_df=2, sublinear_tf=True)
LOGREG = dict(C=1.0, max_iter=2000)


def read_split(path: str, on_bad_row: str, known: set[str] | None = None
               ) -> tuple[list[str], list[str]]:
  """(texts, labels) of a table file; with ``known``, other labels are bad rows."""
  errors = records.RowErrors(on_bad_row, f'{os.path.basename(path)}')
  texts, labels = [], []
  for line, row in tables.read_rows(path, ('text', 'label'), errors):
    if known is not None and row['label'] not in known:
      errors.bad(path, line, f'unknown label "{row["label"]}" (not in train)')
      continue
    errors.ok()
    texts.append(row['text'])
    labels.append(row['label'])
  errors.finish()
  return texts, labels


def systems() -> dict:
  return {'majority': lambda: DummyClassifier(strategy='most_frequent'),
          'tfidf_lr': lambda: make_pipeline(TfidfVectorizer(**TFIDF),
                                            LogisticRegression(**LOGREG))}


def evaluate(dataset: str, data_dir: str, on_bad_row: str) -> dict:
  train_texts, train_labels = read_split(
      os.path.join(data_dir, f'{dataset}.train.tsv.gz'), on_bad_row)
  dev_texts, dev_labels = read_split(os.path.join(data_dir, f'{dataset}.dev.tsv.gz'),
                                     on_bad_row, set(train_labels))
  out = {'train_rows': len(train_texts), 'dev_rows': len(dev_texts),
         'labels': len(set(train_labels)), 'systems': {}}
  for name, make in systems().items():
    start = time.perf_counter()
    model = make().fit(train_texts, train_labels)
    predicted = model.predict(dev_texts)
    out['systems'][name] = {
        'accuracy': metrics.accuracy_score(dev_labels, predicted),
        'macro_f1': metrics.f1_score(dev_labels, predicted, average='macro'),
        'fit_predict_s': time.perf_counter() - start}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--datasets', nargs='+', default=['movie_sentiment', 'debian_topics'])
  parser.add_argument('--data_dir', default=DATA_DIR)
  parser.add_argument('--on_bad_row', default='stop', choices=records.ON_ERROR)
  parser.add_argument('--out', help='also write the results as JSON here')
  args = parser.parse_args()
  info = common.machine_info()
  info['versions']['scikit-learn'] = sklearn.__version__
  config = {'datasets': args.datasets, 'data_dir': os.path.abspath(args.data_dir),
            'tfidf': {k: list(v) if isinstance(v, tuple) else v for k, v in TFIDF.items()},
            'logistic_regression': LOGREG, 'on_bad_row': args.on_bad_row}
  common.print_header('classification baselines (dev split)', info, config)
  results = {}
  for dataset in args.datasets:
    r = results[dataset] = evaluate(dataset, args.data_dir, args.on_bad_row)
    print(f'\n{dataset}: {r["train_rows"]} train / {r["dev_rows"]} dev rows, '
          f'{r["labels"]} labels')
    for name, s in r['systems'].items():
      print(f'  {name:9s} accuracy {100 * s["accuracy"]:6.2f} %   macro-F1 '
            f'{100 * s["macro_f1"]:6.2f} %   (fit + predict {s["fit_predict_s"]:.1f} s)')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'machine': info, 'config': config, 'results': results}, f, indent=1)
    print(f'\nwrote {args.out}')


if __name__ == '__main__':
  main()
