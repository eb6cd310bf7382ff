"""Run any trained run directory on new inputs: one command for every task.

    python -m flaxformer_mini.predict --workdir=runs/classify_movie "a gorgeous, witty film"
    python -m flaxformer_mini.predict --workdir=runs/summarize --input=docs.txt --output=out.txt
    python -m flaxformer_mini.predict --workdir=runs/qa_faq --input=questions.jsonl --json
    python -m flaxformer_mini.predict --workdir=runs/pt_en "Bom dia."

The run's ``config.task`` picks the predictor: `Translator` (translation, distill),
`Summarizer` (summarization), `Classifier` (classification) or `QuestionAnswerer` (qa).
Inputs are the positional texts, else ``--input`` (one text a line), else stdin; empty
lines give empty outputs, so output line i belongs to input line i. For QA each input
line is a JSON object ``{"question": ..., "context": ...}`` (a ``.jsonl`` file, or
``--context_file`` once for every question given as plain text).

Output: one line per input. Plain text by default (the translation, the summary, the
label and its probability separated by a tab, or the answer); ``--json`` writes one JSON
object per line with every field (all class probabilities, answer span and score).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

TASKS = ('translation', 'distill', 'summarization', 'classification', 'distill_classifier',
         'qa')


def _qa_inputs(lines: Sequence[str], context: str | None, where: str
               ) -> list[tuple[str, str] | None]:
  out: list[tuple[str, str] | None] = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      out.append(None)
      continue
    if context is not None:
      out.append((line, context))
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{where} line {n}: not JSON ({e.msg}); a QA input line is '
                       '{"question": ..., "context": ...} (or pass --context_file)') from None
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                            for k in ('question', 'context')):
      raise ValueError(f'{where} line {n}: expected an object with non-empty "question" '
                       'and "context" strings')
    out.append((row['question'], row['context']))
  return out


def predictor(workdir: str, step: int | None = None, *, batch_size: int | None = None
              ) -> tuple[str, Callable[[list[str], str | None, str], list[Any]]]:
  """(task name, fn(lines, qa context, where) -> one prediction per line) of a run."""
  from flaxformer_mini import checkpoints
  task = checkpoints.run_task(workdir, step)
  kw = {} if batch_size is None else {'batch_size': batch_size}
  if task in ('translation', 'distill'):
    from flaxformer_mini.translate import Translator
    model = Translator.from_workdir(workdir, step, **kw)
    return task, lambda lines, _, __: model.translate(lines)
  if task == 'summarization':
    from flaxformer_mini.tasks.summarization import Summarizer
    model = Summarizer.from_workdir(workdir, step, **kw)
    return task, lambda lines, _, __: model.summarize(lines)
  if task in ('classification', 'distill_classifier'):
    from flaxformer_mini.tasks.classification import Classifier
    model = Classifier.from_workdir(workdir, step, **kw)

    def classify(lines, _, __):
      keep = [i for i, line in enumerate(lines) if line.strip()]
      out: list[Any] = [None] * len(lines)
      for i, p in zip(keep, model.classify([lines[i] for i in keep])):
        out[i] = p
      return out
    return task, classify
  if task == 'qa':
    from flaxformer_mini.tasks.qa import QuestionAnswerer
    model = QuestionAnswerer.from_workdir(workdir, step, **kw)

    def answer(lines, context, where):
      pairs = _qa_inputs(lines, context, where)
      keep = [i for i, p in enumerate(pairs) if p is not None]
      out: list[Any] = [None] * len(lines)
      answers = model.answer([pairs[i][0] for i in keep], [pairs[i][1] for i in keep])
      for i, a in zip(keep, answers):
        out[i] = a
      return out
    return task, answer
  raise ValueError(f'{workdir!r} is a {task!r} run; predict handles {TASKS}')


def format_prediction(task: str, prediction: Any, as_json: bool) -> str:
  """One output line (without the newline) for one prediction (None = empty input)."""
  if prediction is None:
    return '{}' if as_json else ''
  if task in ('translation', 'distill', 'summarization'):
    return json.dumps({'text': prediction}, ensure_ascii=False) if as_json else prediction
  if task in ('classification', 'distill_classifier'):
    if as_json:
      return json.dumps(dataclasses.asdict(prediction), ensure_ascii=False)
    return f'{prediction.label}\t{prediction.probability:.4f}'
  if as_json:
    return json.dumps(dataclasses.asdict(prediction), ensure_ascii=False)
  return ' '.join(prediction.text.split())


def _read(path: str, what: str) -> list[str]:
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise FileNotFoundError(f'cannot read {what} {path!r}: {e.strerror}') from None
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b'\n') + 1
    raise ValueError(f'{what} {path!r} line {line}: not valid UTF-8') from None
  return text.splitlines()


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m flaxformer_mini.predict',
                              description=__doc__.split('\n')[0])
  p.add_argument('texts', nargs='*', help='inputs (instead of --input or stdin)')
  p.add_argument('--workdir', required=True, help='a trained run directory')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default newest)')
  p.add_argument('--input', default=None, help='file with one input a line')
  p.add_argument('--output', default=None, help='write here (default stdout)')
  p.add_argument('--context_file', default=None,
                 help='QA: the context of every question (inputs are then plain questions)')
  p.add_argument('--json', action='store_true', help='one JSON object per line, every field')
  p.add_argument('--batch_size', type=int, default=None, help='inputs per batch')
  args = p.parse_args(argv)
  if args.input is not None and args.texts:
    p.error('give inputs either with --input or as arguments, not both')
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    if args.input is not None:
      lines, where = _read(args.input, '--input'), args.input
    elif args.texts:
      lines, where = list(args.texts), 'argument'
    else:
      lines, where = sys.stdin.read().splitlines(), 'stdin'
    context = _read(args.context_file, '--context_file') if args.context_file else None
    context = '\n'.join(context) if context is not None else None
    task, predict = predictor(args.workdir, args.step, batch_size=args.batch_size)
    if context is not None and task != 'qa':
      raise ValueError(f'--context_file is for QA runs; {args.workdir!r} is a {task!r} run')
    out = [format_prediction(task, x, args.json) for x in predict(lines, context, where)]
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  text = ''.join(line + '\n' for line in out)
  if args.output:
    with open(args.output, 'w', encoding='utf-8') as f:
      f.write(text)
  else:
    sys.stdout.write(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
