"""The Orbax wrapper: save / restore-latest-good / load-for-inference of a run directory.

Layout of a run dir (``--workdir``)::

    <run_dir>/
      spm.model                 tokenizer (task asset; sha256 recorded in each checkpoint)
      config.json               the config of the latest (re)start, for humans
      metrics.jsonl, tb/        written by train.py
      checkpoints/<step>/       one orbax checkpoint per saved step, items:
          state/                TrainState: step, params, opt_state, rng   (StandardSave)
          data/                 train-iterator state of each process       (ProcessJsonSave)
                                process_<i>-of-<n>.json, written by process i
          config/               the full ConfigDict                        (JsonSave)
          meta/                 step, task, asset sha256s, dev metrics     (JsonSave)
      corrupt/<step>-<time>/    checkpoints found unreadable, moved aside

Atomicity: orbax writes each step into ``checkpoints/<step>.orbax-checkpoint-tmp-*``
and renames it to ``checkpoints/<step>`` only after every item is written
(``AtomicRenameTemporaryPath``, the default on local filesystems; a POSIX rename is
atomic). A crash or SIGKILL mid-save leaves only a tmp dir, which `CheckpointManager`
ignores when listing steps and deletes on the next start (``cleanup_tmp_directories``),
so the previous checkpoint is never touched. Retention (`Checkpointer.prune`, run only
once a newer checkpoint has committed): the last ``keep`` steps plus the best
``keep_best`` by the finite dev ``nll`` stored in each step's ``meta`` item, so the
ranking survives restarts and a NaN never ranks.

Resume rules (`Checkpointer.restore_latest`): a checkpoint whose files cannot be read
is unreadable: it is reported, moved to ``corrupt/`` once an older readable one is
found, and the older one is used; when none is readable nothing is moved and
`NoReadableCheckpointError` says so (``start_over=True`` quarantines them all and
starts afresh). A readable checkpoint that does not fit the run (another model, or an
optimizer-state tree changed by new optimizer settings) is never quarantined: it is a
`ResumeError` naming the config fields and the first state path that differ;
``params_only=True`` takes params, step and RNG from it with a fresh optimizer state.
A run saved before a config field moved (``optimizer.label_smoothing`` ->
``loss.label_smoothing``) resumes; the field is compared under its new key.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.sharding import path_str
from flaxformer_mini.training import MOVED_FIELDS

PyTree = Any
CHECKPOINT_SUBDIR = 'checkpoints'
CORRUPT_SUBDIR = 'corrupt'
ITEMS = ('state', 'data', 'config', 'meta')
BEST_METRIC = 'dev/nll'

# Config fields that steer a run but never change what a checkpoint holds.
RUN_CONTROL_FIELDS = ('num_train_steps', 'log_every', 'eval_every', 'checkpoint_every', 'keep',
                      'keep_best', 'async_checkpointing', 'eval', 'restore_params_only',
                      'start_over_if_unreadable', 'nonfinite', 'parallel', 'mesh')

log = logging.getLogger(__name__)


class ResumeError(ValueError):
  """A readable checkpoint that does not fit the run being started (nothing was moved)."""


class NoReadableCheckpointError(RuntimeError):
  """Every checkpoint in the run directory is unreadable (nothing was moved)."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. no space left); older ones are intact."""


class ProcessJsonHandler(ocp.CheckpointHandler):
  """One JSON file per process (``process_<i>-of-<n>.json``), written by that process.

  Orbax's JsonCheckpointHandler writes on process 0 only, which would keep process 0's
  train-iterator position for all. Restoring with another process count reads the
  files only if they are all equal (each process then had the same position);
  a checkpoint written before this layout (one ``metadata`` file) reads as that file.
  """

  def save(self, directory, args):
    index, count = jax.process_index(), jax.process_count()
    path = os.path.join(os.fspath(directory), f'process_{index}-of-{count}.json')
    with open(path, 'w') as f:
      json.dump(args.item, f)

  def restore(self, directory, args=None):
    del args
    directory = os.fspath(directory)
    index, count = jax.process_index(), jax.process_count()
    mine = os.path.join(directory, f'process_{index}-of-{count}.json')
    if os.path.isfile(mine):
      with open(mine) as f:
        return json.load(f)
    names = sorted(n for n in os.listdir(directory) if n.startswith('process_'))
    if not names and os.path.isfile(os.path.join(directory, 'metadata')):
      with open(os.path.join(directory, 'metadata')) as f:
        return json.load(f)
    states = []
    for n in names:
      with open(os.path.join(directory, n)) as f:
        states.append(json.load(f))
    if states and all(x == states[0] for x in states):
      return states[0]
    raise ValueError(f'{directory!r} holds the data-iterator state of {len(names)} processes '
                     f'({", ".join(names) or "none"}), which differ; this run has {count}: '
                     'resume with the same process count')

  def metadata(self, directory):
    del directory
    return None

  def finalize(self, directory):
    del directory

  def close(self):
    pass


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  pass


def _handlers() -> dict:
  return {'state': ocp.StandardCheckpointHandler(), 'data': ProcessJsonHandler(),
          'config': ocp.JsonCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}


def abstract_with_sharding(saved_tree: PyTree, like: PyTree) -> PyTree:
  """``jax.ShapeDtypeStruct``s of a checkpoint's metadata tree, each with a sharding.

  A leaf whose path and shape are in ``like`` takes that leaf's sharding; the others
  are replicated over ``like``'s devices. Orbax restores a checkpoint saved on any
  mesh onto these shardings (it refuses a multi-device checkpoint without them).
  """
  from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
  known = {path_str(p): (tuple(x.shape), x.sharding)
           for p, x in jax.tree_util.tree_flatten_with_path(like)[0]
           if getattr(x, 'sharding', None) is not None}
  some = next(iter(known.values()), (None, SingleDeviceSharding(jax.local_devices()[0])))[1]
  if isinstance(some, NamedSharding):
    fallback = NamedSharding(some.mesh, PartitionSpec())
  else:
    fallback = SingleDeviceSharding(jax.local_devices()[0])

  def one(path, m):
    hit = known.get(path_str(path))
    sharding = hit[1] if hit is not None and hit[0] == tuple(m.shape) else fallback
    return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)
  return jax.tree_util.tree_map_with_path(one, saved_tree)


def _no_space(error: BaseException) -> bool:
  """True if ``error`` or anything in its cause/context chain is ENOSPC."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if getattr(error, 'errno', None) == errno.ENOSPC or 'No space left' in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def leaf_shapes(tree: PyTree) -> dict[str, tuple]:
  """{'opt_state/1/mu/decoder/...': shape} for every array leaf (orbax metadata too)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(path): tuple(getattr(x, 'shape', np.shape(x))) for path, x in flat}


def first_difference(saved: dict[str, tuple], current: dict[str, tuple]) -> str | None:
  """The first (sorted) state path that is missing on one side or has another shape."""
  for key in sorted(set(saved) | set(current)):
    if key not in saved:
      return f'{key!r} is in the run being started but not in the checkpoint'
    if key not in current:
      return f'{key!r} is in the checkpoint but not in the run being started'
    if saved[key] != current[key]:
      return f'{key!r} has shape {saved[key]} in the checkpoint, {current[key]} now'
  return None


def config_differences(saved: dict, current: dict, prefix: str = '') -> dict[str, tuple]:
  """{'optimizer.clip_norm': (saved, current)} for the fields that differ (nested)."""
  out = {}
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out.update(config_differences(a, b, f'{prefix}{key}.'))
    elif a != b:
      out[f'{prefix}{key}'] = (a, b)
  return out


def finite_metric(meta: dict | None) -> float | None:
  """``meta['metrics'][BEST_METRIC]`` if it is a finite number, else None."""
  value = ((meta or {}).get('metrics') or {}).get(BEST_METRIC)
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def all_finite(tree: PyTree) -> bool:
  """True if every float leaf of ``tree`` is free of NaN/inf."""
  leaves = [x for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(getattr(x, 'dtype', np.float32), jnp.floating)]
  return bool(jax.jit(lambda xs: jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in xs])))(
      leaves)) if leaves else True


def fresh_opt_state(tx: optax.GradientTransformation, params: PyTree, updates: int) -> PyTree:
  """``tx.init(params)`` with its schedule counters at ``updates`` (so warmup is not redone).

  Adam's own count stays 0: its bias correction belongs to the fresh (zero) moments.
  """
  def fix(node):
    if isinstance(node, optax.ScaleByScheduleState):
      return node._replace(count=jnp.asarray(updates, node.count.dtype))
    if isinstance(node, optax.MultiStepsState):
      return node._replace(gradient_step=jnp.asarray(updates, node.gradient_step.dtype),
                           inner_opt_state=fix(node.inner_opt_state))
    if isinstance(node, tuple) and not hasattr(node, '_fields'):
      return tuple(fix(n) for n in node)
    return node
  return fix(tx.init(params))


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
    if keep_best < 0:
      raise ValueError(f'keep_best={keep_best} must be >= 0')
    self.run_dir = os.path.abspath(run_dir)
    self.directory = os.path.join(self.run_dir, CHECKPOINT_SUBDIR)
    self.keep, self.keep_best = keep, keep_best
    self._metrics: dict[int, float | None] = {}
    # Retention is ours (`prune`): orbax's BestN ranks by metrics it does not reload
    # after a restart, and it ranks NaN as best.
    options = ocp.CheckpointManagerOptions(
        create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=_handlers())

  # -- save ----------------------------------------------------------------------------

  def save(self, step: int, state: PyTree, *, data_state: dict | None, config,
           assets: dict[str, str] | None = None, task: str = '',
           metrics: dict[str, float] | None = None,
           extra_meta: dict | None = None) -> None:
    """Saves ``state`` (host arrays, unreplicated) as checkpoint ``step``.

    Args:
      step: checkpoint number (train.py uses optimizer updates).
      state: the TrainState pytree.
      data_state: JSON-able train-iterator state (``iterator.get_state()``).
      config: the run's ConfigDict.
      assets: {filename: path} files kept in the run dir; their sha256 is recorded.
      task: task name.
      metrics: dev metrics of this step; ``metrics[BEST_METRIC]`` ranks the best ones.
      extra_meta: more JSON-able facts kept in the checkpoint's meta (e.g. quantization).
    """
    from flaxformer_mini.data.tokenized import file_sha256
    meta = {'step': int(step), 'task': task, 'time': time.time(),
            'assets': {name: file_sha256(p) for name, p in (assets or {}).items()},
            'metrics': metrics or {}, **(extra_meta or {})}
    if not all_finite(state):
      raise ValueError(f'refusing to save checkpoint step {step}: the state holds NaN/inf '
                       f'values; the last good checkpoint is {self.latest_path()}')
    self.wait()  # the previous save has committed: older steps may now go
    self.prune()
    with self._writing(step):
      self.manager.save(
          int(step),
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=ProcessJsonSave(data_state if data_state is not None else {}),
              config=ocp.args.JsonSave(config_to_dict(config)),
              meta=ocp.args.JsonSave(meta)),
          force=True)
    self._metrics[int(step)] = finite_metric(meta)

  def _writing(self, step: int | None):
    """Context that turns ENOSPC (however deeply orbax wraps it) into a first-line message."""
    checkpointer = self

    class _Guard:
      def __enter__(self):
        return self

      def __exit__(self, kind, error, tb):
        if error is not None and _no_space(error):
          what = f'checkpoint step {step}' if step is not None else 'the pending checkpoint'
          raise CheckpointWriteError(
              errno.ENOSPC, f'no space left on {checkpointer.directory}: {what} was not '
              f'written; the last good checkpoint is {checkpointer.latest_path()} (intact). '
              'Free space and rerun the same command to resume') from error
        return False
    return _Guard()

  def latest_path(self) -> str:
    """Path of the newest committed checkpoint, or 'none'."""
    steps = self.steps()
    return os.path.join(self.directory, str(steps[-1])) if steps else 'none'

  def wait(self) -> None:
    with self._writing(None):
      self.manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.prune()
    self.manager.close()

  def metric(self, step: int) -> float | None:
    """The finite ``BEST_METRIC`` stored with ``step`` (None if absent/non-finite)."""
    if step not in self._metrics:
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        self._metrics[step] = finite_metric(meta['meta'])
      except Exception:  # pylint: disable=broad-except  (unreadable: no rank)
        self._metrics[step] = None
    return self._metrics[step]

  def prune(self) -> list[int]:
    """Deletes committed steps other than the last ``keep`` and the best ``keep_best``.

    Returns the steps kept.
    """
    steps = self.steps()
    kept = set(steps[-self.keep:])
    ranked = sorted((m, s) for s in steps if (m := self.metric(s)) is not None)
    kept.update(s for _, s in ranked[:self.keep_best])
    for s in steps:
      if s not in kept:
        self.manager.delete(s)
        self._metrics.pop(s, None)
    return sorted(kept)

  # -- restore -------------------------------------------------------------------------

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, target: PyTree, *, expect_model: dict | None = None,
                     config: dict | None = None, params_only: bool = False,
                     tx: optax.GradientTransformation | None = None,
                     start_over: bool = False
                     ) -> tuple[int, PyTree, dict, dict] | None:
    """Restores the newest readable checkpoint into the structure of ``target``.

    Unreadable checkpoints (missing/truncated files) are reported with
    `logging.warning` naming the step and the error; once an older readable one is
    found they are moved to ``<run_dir>/corrupt/`` (a save would collide with them).

    Args:
      target: a TrainState of the right structure/shapes/dtypes (e.g. freshly initialised).
      expect_model: the current ``config.model`` as a dict; compared with the saved one.
      config: the current full config as a dict; named in errors and notices.
      params_only: take params, step and RNG from the checkpoint and start a fresh
        optimizer state (``tx`` required) with its schedule at the checkpoint's step.
      start_over: if every checkpoint is unreadable, quarantine them all and return None
        instead of raising `NoReadableCheckpointError`.
    Returns:
      (step, state, data_state, meta), or None when there is no checkpoint.
    Raises:
      ResumeError: the newest readable checkpoint is of another model or its state tree
        differs from ``target`` (nothing moved).
      NoReadableCheckpointError: there are checkpoints but none is readable.
    """
    unreadable = []
    for step in reversed(self.steps()):
      try:
        items = self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        saved_config, meta = items['config'], items['meta']
        saved_tree = self.manager.item_metadata(step)['state'].tree
      except Exception as e:  # pylint: disable=broad-except  (any failure = unusable)
        self._report_unreadable(step, e)
        unreadable.append((step, e))
        continue
      if expect_model is not None:
        _check_same_model(saved_config.get('model', {}), expect_model, step, self.directory)
      changed = _changed_fields(saved_config, config)
      want = leaf_shapes(target.params if params_only else target)
      have = leaf_shapes(saved_tree['params'] if params_only else saved_tree)
      problem = first_difference(have, want)
      if problem:
        fields = ', '.join(f'{k} ({a!r} -> {b!r})' for k, (a, b) in changed.items()) or 'none'
        hint = ('use the same settings, or --config.restore_params_only=True to continue '
                'from its params with a fresh optimizer state' if not params_only else
                'use the same config.model')
        raise ResumeError(f'checkpoint step {step} in {self.directory!r} does not fit this '
                          f'run: state path {problem}. Config fields that differ from the '
                          f'checkpoint: {fields}. Nothing was changed; {hint}')
      try:
        if params_only:
          abstract = abstract_with_sharding(saved_tree, target)
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract), data=ProcessJsonRestore()))
        else:
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target), data=ProcessJsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        self._report_unreadable(step, e)
        unreadable.append((step, e))
        continue
      for bad, _ in unreadable:
        self._quarantine(bad)
      if changed:
        log.warning('resuming from checkpoint step %d with changed settings: %s', step,
                    ', '.join(f'{k} ({a!r} -> {b!r})' for k, (a, b) in changed.items()))
      state = restored['state']
      if params_only:
        if tx is None:
          raise ValueError('params_only=True needs the optimizer (tx) for a fresh state')
        params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target.params),
                                              jax.tree_util.tree_leaves(state['params']))
        state = target.replace(step=jnp.asarray(state['step'], target.step.dtype),
                               params=params, rng=jnp.asarray(state['rng']),
                               opt_state=fresh_opt_state(tx, params, int(meta['step'])))
        log.warning('restored params, step and RNG of checkpoint step %d; the optimizer '
                    'state starts afresh (restore_params_only)', step)
      return step, state, restored['data'], meta
    if unreadable:
      listing = '; '.join(f'step {s}: {type(e).__name__}: {_first_line(e)}'
                          for s, e in unreadable)
      if not start_over:
        raise NoReadableCheckpointError(
            f'no checkpoint in {self.directory!r} is readable ({listing}). Nothing was moved. '
            'Rerun with --config.start_over_if_unreadable=True to move them to '
            f'{os.path.join(self.run_dir, CORRUPT_SUBDIR)!r} and train from step 0')
      log.error('no checkpoint in %s is readable (%s); moving them aside and starting from '
                'step 0 (start_over_if_unreadable)', self.directory, listing)
      for bad, _ in unreadable:
        self._quarantine(bad)
    return None

  def _report_unreadable(self, step: int, error: Exception) -> None:
    log.warning('checkpoint step %d at %s is unreadable (%s: %s)', step,
                os.path.join(self.directory, str(step)), type(error).__name__,
                _first_line(error))

  def _quarantine(self, step: int) -> None:
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.run_dir, CORRUPT_SUBDIR, f'{step}-{int(time.time())}')
    log.warning('moved unreadable checkpoint step %d to %s', step, dst)
    self._metrics.pop(step, None)
    if jax.process_index() == 0:  # one mover; the others see it after the barrier
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      if os.path.exists(src):
        shutil.move(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'quarantined {step}')
    self.manager.reload()


def _same_transformer(saved: dict, current: dict) -> bool:
  """Both sections build the same `TransformerConfig` (one may list fields at their
  defaults that the other leaves out: a config rewritten from a preset)."""
  try:
    return TransformerConfig.from_dict(saved) == TransformerConfig.from_dict(current)
  except (TypeError, ValueError):
    return False


def _check_same_model(saved: dict, current: dict, step: int, directory: str) -> None:
  if saved != current and _same_transformer(saved, current):
    return
  keys = sorted(set(saved) | set(current))
  diff = {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}
  if diff:
    raise ResumeError(f'checkpoint step {step} in {directory!r} was trained with a different '
                     f'model config, {{key: (saved, current)}} = {diff}; use a fresh --workdir '
                     'or the same config.model')


def with_moved_fields(saved: dict) -> dict:
  """A saved run config with the fields that moved since (`training.MOVED_FIELDS`) under
  their new keys, so an older run compares with today's config field by field."""
  out = json.loads(json.dumps(saved))
  for old, new in MOVED_FIELDS.items():
    (old_section, old_key), (new_section, new_key) = old.split('.'), new.split('.')
    if isinstance(out.get(old_section), dict) and old_key in out[old_section]:
      value = out[old_section].pop(old_key)
      out.setdefault(new_section, {}).setdefault(new_key, value)
  return out


def _changed_fields(saved: dict, current: dict | None) -> dict[str, tuple]:
  if current is None:
    return {}
  diff = config_differences(with_moved_fields(saved), current)
  return {k: v for k, v in diff.items() if k.split('.')[0] not in RUN_CONTROL_FIELDS}


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0][:300] if lines else ''


def has_checkpoints(run_dir: str) -> bool:
  """Whether a run was trained in ``run_dir`` (it holds a numbered checkpoint directory):
  the assets its checkpoints were trained with must then stay as they are."""
  path = os.path.join(run_dir, CHECKPOINT_SUBDIR)
  return os.path.isdir(path) and any(n.isdigit() for n in os.listdir(path))


# ----------------------------------------------------------------------------- inference


def run_task(run_dir: str, step: int | None = None) -> str:
  """``config.task`` of a run directory: from its ``config.json`` when there is one (train.py
  writes it), else from the checkpoint's config."""
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f'run directory not found: {os.path.abspath(run_dir)!r}')
  path = os.path.join(run_dir, 'config.json')
  if os.path.isfile(path):
    try:
      with open(path, encoding='utf-8') as f:
        return json.load(f).get('task', 'translation')
    except (ValueError, AttributeError) as e:
      raise ValueError(f'{path!r} is not a readable run config ({e})') from None
  config, _, _ = load_run(run_dir, step)
  return config.get('task', 'translation')


def check_new_run_dir(out: str) -> None:
  """FileExistsError unless ``out`` is free for `write_params_run` (no checkpoints yet)."""
  if os.path.exists(os.path.join(out, CHECKPOINT_SUBDIR)):
    raise FileExistsError(f'{out!r} already holds checkpoints; choose a new --out')


def write_params_run(out: str, step: int, params, config, assets: dict[str, str],
                     extra_meta: dict) -> None:
  """Writes ``out``: a run directory of one params-only checkpoint at ``step``, with
  ``config`` as config.json and copies of the task ``assets`` ({name: source path}), that
  every loader of run directories reads. ``extra_meta`` goes into the checkpoint's meta
  (what the params are: int8, an average, ...)."""
  check_new_run_dir(out)
  os.makedirs(out, exist_ok=True)
  copied = {}
  for name, path in assets.items():
    copied[name] = os.path.join(out, name)
    shutil.copyfile(path, copied[name])
  with open(os.path.join(out, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(config_to_dict(config), f, indent=2)
  writer = Checkpointer(out, keep=1, keep_best=0, async_save=False)
  writer.save(step, {'params': params}, data_state=None, config=config, assets=copied,
              task=config.get('task', ''), metrics={}, extra_meta=extra_meta)
  writer.close()


def load_run(run_dir: str, step: int | None = None, *, with_meta: bool = False):
  """Loads any task's trained run for inference, onto one device.

  Args:
    run_dir: the training ``--workdir``.
    step: checkpoint step; None = the newest readable one (unreadable newer ones are
      reported and skipped, not moved).
    with_meta: also return the checkpoint's meta dict (its 'step', 'metrics', ...).
  Returns:
    (config, params, assets[, meta]): the run's ConfigDict, its params (nested dict of
    arrays) and {asset name: path in run_dir} of the task assets the checkpoint recorded,
    each checked against the sha256 stored with the checkpoint.
  Raises:
    FileNotFoundError naming the missing run dir / checkpoint dir / step / asset file;
    ValueError for an asset whose sha256 differs from the checkpoint's.
  """
  from flaxformer_mini.data.tokenized import file_sha256
  config, params, meta, s = _restore_for_inference(run_dir, step)
  run_dir = os.path.abspath(run_dir)
  assets = {}
  for name, expected in meta.get('assets', {}).items():
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'asset file missing: {path!r} (written by training next to '
                              f'{CHECKPOINT_SUBDIR}/)')
    if expected and file_sha256(path) != expected:
      raise ValueError(f'{path!r} is not the {name} checkpoint step {s} was trained with '
                       '(sha256 differs)')
    assets[name] = path
  return (config, params, assets, meta) if with_meta else (config, params, assets)


def _restore_for_inference(run_dir: str, step: int | None):
  """-> (config, params on one device, meta dict, step) of the chosen checkpoint."""
  run_dir = os.path.abspath(run_dir)
  ckpt_dir = os.path.join(run_dir, CHECKPOINT_SUBDIR)
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f'run directory not found: {run_dir!r}')
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'no checkpoints in {run_dir!r}: missing {ckpt_dir!r}')
  manager = ocp.CheckpointManager(
      ckpt_dir, item_handlers=_handlers(),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  available = sorted(manager.all_steps())
  if not available:
    raise FileNotFoundError(f'{ckpt_dir!r} holds no finished checkpoint')
  if step is not None and int(step) not in available:
    raise FileNotFoundError(f'checkpoint step {step} not found in {ckpt_dir!r}; available '
                            f'steps: {available}')
  candidates = [int(step)] if step is not None else list(reversed(available))
  errors = []
  one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for s in candidates:
    try:
      # Onto one device whatever mesh saved it (orbax needs the target sharding).
      abstract = jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
          manager.item_metadata(s)['state'].tree)
      restored = manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), config=ocp.args.JsonRestore(),
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
  return ml_collections.ConfigDict(restored['config']), params, restored['meta'], s


def load_for_inference(run_dir: str, step: int | None = None):
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
  config, params, meta, s = _restore_for_inference(run_dir, step)
  run_dir = os.path.abspath(run_dir)
  spm_name = data_lib.tokenizer.MODEL_FILENAME
  spm_path = os.path.join(run_dir, spm_name)
  if not os.path.isfile(spm_path):
    raise FileNotFoundError(f'tokenizer file missing: {spm_path!r} (written by training '
                            f'next to {CHECKPOINT_SUBDIR}/)')
  expected = meta.get('assets', {}).get(spm_name)
  if expected and file_sha256(spm_path) != expected:
    raise ValueError(f'{spm_path!r} is not the tokenizer checkpoint step {s} was trained '
                     f'with (sha256 differs)')
  return config, params, data_lib.load_tokenizer(spm_path)
