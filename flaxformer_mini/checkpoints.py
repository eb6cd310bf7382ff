"""The Orbax wrapper: save / restore-latest-good / load-for-inference of a run directory.

Layout of a run dir (``--workdir``)::

    <run_dir>/
      spm.model                 tokenizer (task asset; sha256 recorded in each checkpoint)
      config.json               the config of the latest (re)start, for humans
      metrics.jsonl, tb/        written by train.py
      checkpoints/<step>/       one orbax checkpoint per saved step, items:
          state/                TrainState: step, params, opt_state, rng   (StandardSave)
          data/                 train-iterator state (grain get_state)     (JsonSave)
          config/               the full ConfigDict                        (JsonSave)
          meta/                 step, task, asset sha256s, dev metrics     (JsonSave)
      corrupt/<step>-<time>/    checkpoints found unreadable, moved aside

Atomicity: orbax writes each step into ``checkpoints/<step>.orbax-checkpoint-tmp-*``
and renames it to ``checkpoints/<step>`` only after every item is written
(``AtomicRenameTemporaryPath``, the default on local filesystems; a POSIX rename is
atomic). A crash or SIGKILL mid-save leaves only a tmp dir, which `CheckpointManager`
ignores when listing steps and deletes on the next start (``cleanup_tmp_directories``),
so the previous checkpoint is never touched. Retention: the last ``keep`` steps plus
the best ``keep_best`` by dev ``nll`` (orbax preservation policies ``LatestN`` and
``BestN``).

Corruption that happens after a save (a truncated or deleted file) is caught at
restore: `Checkpointer.restore_latest` logs a warning naming the step and the error,
moves that step to ``corrupt/`` and tries the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

PyTree = Any
CHECKPOINT_SUBDIR = 'checkpoints'
CORRUPT_SUBDIR = 'corrupt'
ITEMS = ('state', 'data', 'config', 'meta')
BEST_METRIC = 'dev/nll'

log = logging.getLogger(__name__)


def config_to_dict(config) -> dict:
  """ConfigDict -> plain JSON-able dict (FieldReferences resolved)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config)))


class Checkpointer:
  """CheckpointManager over ``<run_dir>/checkpoints`` with the items listed above.

  Args:
    run_dir: the run directory (created).
    keep: how many of the latest checkpoints to keep (>= 1).
    keep_best: how many more to keep by lowest ``metrics[BEST_METRIC]`` (0 = none).
    async_save: let orbax write in a background thread (`wait` joins it).
  """

  def __init__(self, run_dir: str, *, keep: int = 2, keep_best: int = 1,
               async_save: bool = True):
    if keep < 1:
      raise ValueError(f'keep={keep} must be >= 1 (the latest checkpoint is needed to resume)')
    self.run_dir = os.path.abspath(run_dir)
    self.directory = os.path.join(self.run_dir, CHECKPOINT_SUBDIR)
    preserve = [policies.LatestN(n=keep)]
    if keep_best > 0:
      preserve.append(policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True,
                                     n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save,
        preservation_policy=policies.AnyPreservationPolicy(preserve))
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  # -- save ----------------------------------------------------------------------------

  def save(self, step: int, state: PyTree, *, data_state: Optional[dict], config,
           assets: Optional[dict[str, str]] = None, task: str = '',
           metrics: Optional[dict[str, float]] = None) -> None:
    """Saves ``state`` (host arrays, unreplicated) as checkpoint ``step``.

    Args:
      step: checkpoint number (train.py uses optimizer updates).
      state: the TrainState pytree.
      data_state: JSON-able train-iterator state (``iterator.get_state()``).
      config: the run's ConfigDict.
      assets: {filename: path} files kept in the run dir; their sha256 is recorded.
      task: task name.
      metrics: dev metrics of this step; ``metrics[BEST_METRIC]`` ranks the best ones.
    """
    from flaxformer_mini.data.tokenized import file_sha256
    meta = {'step': int(step), 'task': task, 'time': time.time(),
            'assets': {name: file_sha256(p) for name, p in (assets or {}).items()},
            'metrics': metrics or {}}
    best = {BEST_METRIC: metrics[BEST_METRIC]} if metrics and BEST_METRIC in metrics else None
    self.manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state if data_state is not None else {}),
            config=ocp.args.JsonSave(config_to_dict(config)),
            meta=ocp.args.JsonSave(meta)),
        metrics=best, force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  # -- restore -------------------------------------------------------------------------

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, target: PyTree, *, expect_model: Optional[dict] = None
                     ) -> Optional[tuple[int, PyTree, dict, dict]]:
    """Restores the newest readable checkpoint into the structure of ``target``.

    Unreadable checkpoints (missing/truncated files) are reported with
    `logging.warning` naming the step and the error, moved to ``<run_dir>/corrupt/``
    and skipped. A readable checkpoint of a *different model* is not corruption: it
    raises ValueError (use a fresh run dir).

    Args:
      target: a TrainState of the right structure/shapes/dtypes (e.g. freshly initialised).
      expect_model: the current ``config.model`` as a dict; compared with the saved one.
    Returns:
      (step, state, data_state, meta), or None when there is no readable checkpoint.
    """
    for step in reversed(self.steps()):
      try:
        saved = self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
      except Exception as e:  # pylint: disable=broad-except  (any failure = unusable)
        self._quarantine(step, e)
        continue
      if expect_model is not None:
        _check_same_model(saved.get('model', {}), expect_model, step, self.directory)
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                          data=ocp.args.JsonRestore(),
                                          meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        self._quarantine(step, e)
        continue
      _check_same_structure(target, restored['state'], step)
      return step, restored['state'], restored['data'], restored['meta']
    return None

  def _quarantine(self, step: int, error: Exception) -> None:
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.run_dir, CORRUPT_SUBDIR, f'{step}-{int(time.time())}')
    message = str(error).strip().splitlines()
    log.warning('checkpoint step %d at %s is unreadable (%s: %s); moved it to %s and '
                'falling back to the previous checkpoint', step, src, type(error).__name__,
                message[0][:300] if message else '', dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.exists(src):
      shutil.move(src, dst)
    self.manager.reload()


def _check_same_model(saved: dict, current: dict, step: int, directory: str) -> None:
  keys = sorted(set(saved) | set(current))
  diff = {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}
  if diff:
    raise ValueError(f'checkpoint step {step} in {directory!r} was trained with a different '
                     f'model config, {{key: (saved, current)}} = {diff}; use a fresh --workdir '
                     'or the same config.model')


def _check_same_structure(target: PyTree, restored: PyTree, step: int) -> None:
  want = jax.tree_util.tree_structure(target)
  got = jax.tree_util.tree_structure(restored)
  if want != got:
    raise ValueError(f'checkpoint step {step}: state tree structure differs from the model '
                     f'being trained (changed model/optimizer config?)')
  for a, b in zip(jax.tree_util.tree_leaves(target), jax.tree_util.tree_leaves(restored)):
    if getattr(a, 'shape', None) != getattr(b, 'shape', None):
      raise ValueError(f'checkpoint step {step}: a leaf has shape {b.shape}, expected {a.shape}')


# ----------------------------------------------------------------------------- inference


def load_for_inference(run_dir: str, step: Optional[int] = None):
  """Loads what a decode CLI needs from a run directory.

  Args:
    run_dir: the training ``--workdir``.
    step: checkpoint step; None = the newest readable one (unreadable newer ones are
      reported and skipped, not moved).
  Returns:
    (config: ConfigDict, params: nested dict of arrays, tokenizer: data.Tokenizer).
    Build the model with ``Transformer(TransformerConfig.from_dict(config.model))``.
  Raises:
    FileNotFoundError naming the missing run dir / checkpoint dir / step / tokenizer file.
  """
  from flaxformer_mini import data as data_lib
  from flaxformer_mini.data.tokenized import file_sha256
  run_dir = os.path.abspath(run_dir)
  ckpt_dir = os.path.join(run_dir, CHECKPOINT_SUBDIR)
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f'run directory not found: {run_dir!r}')
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'no checkpoints in {run_dir!r}: missing {ckpt_dir!r}')
  manager = ocp.CheckpointManager(
      ckpt_dir, item_names=ITEMS,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  available = sorted(manager.all_steps())
  if not available:
    raise FileNotFoundError(f'{ckpt_dir!r} holds no finished checkpoint')
  if step is not None and int(step) not in available:
    raise FileNotFoundError(f'checkpoint step {step} not found in {ckpt_dir!r}; available '
                            f'steps: {available}')
  candidates = [int(step)] if step is not None else list(reversed(available))
  errors = []
  for s in candidates:
    try:
      restored = manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
      params = restored['state']['params']
      break
    except Exception as e:  # pylint: disable=broad-except
      log.warning('checkpoint step %d in %s is unreadable (%s: %s)', s, ckpt_dir,
                  type(e).__name__, str(e).strip()[:300])
      errors.append(f'step {s}: {type(e).__name__}')
  else:
    raise RuntimeError(f'no readable checkpoint in {ckpt_dir!r}: {errors}')
  manager.close()
  config = ml_collections.ConfigDict(restored['config'])
  spm_name = data_lib.tokenizer.MODEL_FILENAME
  spm_path = os.path.join(run_dir, spm_name)
  if not os.path.isfile(spm_path):
    raise FileNotFoundError(f'tokenizer file missing: {spm_path!r} (written by training '
                            f'next to {CHECKPOINT_SUBDIR}/)')
  expected = restored['meta'].get('assets', {}).get(spm_name)
  if expected and file_sha256(spm_path) != expected:
    raise ValueError(f'{spm_path!r} is not the tokenizer checkpoint step {s} was trained '
                     f'with (sha256 differs)')
  return config, params, data_lib.load_tokenizer(spm_path)
