"""Checkpoint averaging: one run directory whose params are the mean of several checkpoints.

    python -m flaxformer_mini.average --workdir=runs/student_deep --last=3 \\
        --out=runs/student_deep_avg
    python -m flaxformer_mini.average --workdir=runs/pt_en --steps=1000,1250,1500 --out=...

The mean of the last few checkpoints of a run is a smoother model than any one of them
(Vaswani et al. 2017 average the last 5 or 20): a free gain at decode time, no training. The
new directory holds the run's config and task assets (tokenizer) and one params-only
checkpoint at the newest averaged step, with ``meta['averaged_steps']``; every loader of run
directories (`Translator.from_workdir`, ``translate``, ``serve``, ``quantize``) reads it.
"""

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

PyTree = Any


def run_steps(workdir: str) -> list[int]:
  """The finished checkpoint steps of a run directory, oldest first."""
  from flaxformer_mini import checkpoints
  path = os.path.join(workdir, checkpoints.CHECKPOINT_SUBDIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no checkpoint directory {os.path.abspath(path)!r}')
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def average_params(trees: Sequence[PyTree]) -> PyTree:
  """The leafwise mean of params trees of one structure, accumulated in float64 and cast
  back to each leaf's dtype. ValueError names the first path whose shape differs."""
  if len(trees) < 2:
    raise ValueError(f'averaging needs at least 2 checkpoints, got {len(trees)}')
  first = jax.tree_util.tree_flatten_with_path(trees[0])[0]
  for n, tree in enumerate(trees[1:], 1):
    other = jax.tree_util.tree_flatten_with_path(tree)[0]
    if [p for p, _ in other] != [p for p, _ in first]:
      raise ValueError(f'checkpoint {n} has other param names than checkpoint 0')
    for (path, a), (_, b) in zip(first, other):
      if np.shape(a) != np.shape(b):
        raise ValueError(f'param {jax.tree_util.keystr(path)} has shape {np.shape(b)} in '
                         f'checkpoint {n} and {np.shape(a)} in checkpoint 0')

  def mean(*leaves):
    total = np.zeros(np.shape(leaves[0]), np.float64)
    for leaf in leaves:
      total += np.asarray(leaf, np.float64)
    return (total / len(leaves)).astype(np.asarray(leaves[0]).dtype)
  return jax.tree_util.tree_map(mean, *trees)


def average_run(workdir: str, out: str, steps: Sequence[int]) -> int:
  """Writes ``out``: a run directory whose params average ``steps`` of ``workdir``.

  Returns the step the new checkpoint carries (the newest averaged one). Raises
  FileExistsError for an ``out`` that holds checkpoints, FileNotFoundError naming a missing
  step, ValueError for int8 params or params of different shapes.
  """
  from flaxformer_mini import checkpoints
  from flaxformer_mini.quantize import is_quantized
  checkpoints.check_new_run_dir(out)
  steps = sorted({int(s) for s in steps})
  if len(steps) < 2:
    raise ValueError(f'averaging needs at least 2 distinct steps, got {steps}')
  have = run_steps(workdir)
  missing = [s for s in steps if s not in have]
  if missing:
    raise FileNotFoundError(f'{os.path.abspath(workdir)!r} has no checkpoint step '
                            f'{missing[0]} (it has {have})')
  trees = []
  for step in steps:
    config, params, assets = checkpoints.load_run(workdir, step)
    if is_quantized(params):
      raise ValueError(f'{workdir!r} step {step} holds int8 params; average float ones')
    trees.append(params)
  checkpoints.write_params_run(out, steps[-1], average_params(trees), config, assets,
                               {'averaged_steps': steps, 'source': os.path.abspath(workdir)})
  return steps[-1]


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m flaxformer_mini.average',
                              description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='the trained run directory')
  p.add_argument('--out', required=True, help='the new run directory for the mean params')
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument('--steps', help='comma-separated checkpoint steps to average')
  which.add_argument('--last', type=int, help='average the newest N checkpoints')
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
  try:
    if args.steps is not None:
      try:
        steps = [int(s) for s in args.steps.split(',') if s.strip()]
      except ValueError:
        raise ValueError(f'--steps={args.steps!r} must be comma-separated integers') from None
    else:
      if args.last < 2:
        raise ValueError(f'--last={args.last} must be >= 2')
      steps = run_steps(args.workdir)[-args.last:]
      if len(steps) < args.last:
        raise ValueError(f'--last={args.last}: {args.workdir!r} has {len(steps)} '
                         'checkpoints')
    step = average_run(args.workdir, args.out, steps)
  except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {args.out}: the mean of steps {sorted(set(steps))} of {args.workdir}, '
        f'saved as step {step}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
