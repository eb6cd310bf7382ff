"""Trains a task from a config file: parse config -> build task -> restore-or-init -> loop.

    python train.py                                   # configs/default.py, runs/default
    python train.py --config=configs/translate_pt_en.py --workdir=runs/pt_en
    python train.py --config=configs/smoke.py --config.batch_size=8 --workdir=/tmp/smoke

Several processes (hosts) form one device mesh through jax.distributed:
    python train.py --config=... --coordinator_address=host0:1234 --num_processes=N --process_id=i
(README.md "Scaling across devices and processes").

Rerunning the same command resumes from the newest readable checkpoint in --workdir
(params, optimizer, step, RNG and the data-iterator position). SIGTERM or Ctrl-C stops
after the current step and saves a checkpoint; a second Ctrl-C aborts at once. What
happens when things go wrong (changed settings, unreadable checkpoints, NaN, disk
full) is listed in README.md and flaxformer_mini/checkpoints.py.

On Linux with glibc, train.py first re-executes itself once with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 so that XLA's CPU buffers sit on transparent
huge pages (flaxformer_mini/runtime.py; FLAXFORMER_MINI_HUGE_PAGES=0 turns it off).

Outputs in --workdir: checkpoints/, spm.model, config.json, metrics.jsonl (one JSON
object per logged step: train/*, dev/*, learning_rate, tokens_per_s) and tb/
(TensorBoard event files).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(_HERE, 'configs', 'default.py'),
    'Experiment config file (configs/*.py); override fields with --config.<field>=value.')
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Run directory (default: runs/<config file name>).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS'),
    'host:port of process 0 in a multi-process run (default $JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', int(os.environ.get('JAX_NUM_PROCESSES', '1')),
    'processes in the run (default $JAX_NUM_PROCESSES or 1); > 1 joins jax.distributed.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', int(os.environ.get('JAX_PROCESS_ID', '0')),
    'this process, 0 .. num_processes - 1 (default $JAX_PROCESS_ID or 0).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'call jax.distributed.initialize() with its cluster auto-detection '
    '(SLURM, Open MPI, Kubernetes, Cloud TPU) instead of the three flags above.')

log = logging.getLogger('train')


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient under ``config.nonfinite='stop'``."""


class MetricWriter:
  """Scalars to TensorBoard (tensorboardX) and ``metrics.jsonl``, one line per call."""

  def __init__(self, workdir: str, resume_step: int):
    from tensorboardX import SummaryWriter
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(self.path):  # drop lines of steps that will be redone after a resume
      with open(self.path) as f:
        kept = [l for l in f if l.strip() and json.loads(l).get('step', 0) <= resume_step]
      with open(self.path, 'w') as f:
        f.writelines(kept)
    self.tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, scalars: dict) -> None:
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **scalars}) + '\n')

  def close(self) -> None:
    self.tb.close()


class NullWriter:
  """What processes other than 0 write: nothing."""

  def write(self, step: int, scalars: dict) -> None:
    del step, scalars

  def close(self) -> None:
    pass


class StopSignal:
  """First SIGTERM/SIGINT: stop after the current step (and checkpoint). Second: abort."""

  def __init__(self):
    self.signum = None
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    print(f'\nreceived {signal.Signals(signum).name}: stopping after this step and saving a '
          'checkpoint (again to abort)', file=sys.stderr, flush=True)


def join_processes() -> None:
  """Joins a multi-process run (JAX's own runtime) before anything touches the devices."""
  import jax
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  elif _NUM_PROCESSES.value > 1:
    if not _COORDINATOR.value:
      sys.exit('train.py: error: --num_processes > 1 needs --coordinator_address=host:port '
               '(or $JAX_COORDINATOR_ADDRESS)')
    if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
      sys.exit(f'train.py: error: --process_id={_PROCESS_ID.value} must be in '
               f'[0, {_NUM_PROCESSES.value})')
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def _sync(name: str) -> None:
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def train_iterator(task, config, fns):
  """This process's train batches: its input shards' rows, or the whole global batch.

  With ``config.data.input_shards = K > 1`` the global batch is K row blocks, block g
  from input shard g; a process reads the shards of the rows its devices hold, so the
  global batch is the same for any process count that divides K.
  """
  shards = config.data.get('input_shards', 1)
  if shards == 1:
    return task.train_iterator()
  import inspect
  if 'shard_count' not in inspect.signature(task.train_iterator).parameters:
    raise ValueError(f'config.data.input_shards={shards}: task {task.name!r} reads no input '
                     'shards (its train_iterator takes no shard_index/shard_count); use 1')
  rows = config.batch_size // shards
  lo, hi = fns.local_rows(config.batch_size)
  if lo % rows or hi % rows:
    raise ValueError(f'config.data.input_shards={shards}: this process holds rows [{lo}, '
                     f'{hi}) of the {config.batch_size}-row batch, not whole {rows}-row '
                     'shards; use a multiple of the process count')
  from flaxformer_mini import data as data_lib
  mine = range(lo // rows, hi // rows)
  return data_lib.ConcatRows([task.train_iterator(g, shards) for g in mine], mine)


def dev_metrics(task, fns, dstate) -> dict:
  import jax

  from flaxformer_mini import training
  sums = None
  params = fns.get_params(dstate)
  for batch in task.eval_batches():
    m = fns.evaluate(params, fns.put_batch(batch))
    sums = m if sums is None else jax.tree_util.tree_map(lambda a, b: a + b, sums, m)
  return training.summarize(sums, 'dev/') if sums is not None else {}


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) training; returns the final dev metrics."""
  import jax
  import jax.numpy as jnp
  from tqdm import tqdm

  from flaxformer_mini import checkpoints, runtime, sharding, tasks, training

  if not workdir or not str(workdir).strip():
    raise ValueError('--workdir is empty (an unset shell variable?); name a run directory')
  training.validate_config(config)
  workdir = os.path.abspath(workdir)
  main_process = jax.process_index() == 0
  say = print if main_process else (lambda *a, **k: None)
  os.makedirs(workdir, exist_ok=True)
  t_setup = time.time()
  # Process 0 builds the task first (tokenizer, TFDS files, token caches); the others
  # then find everything written and only read it.
  if not main_process:
    _sync('task files written')
  task = tasks.get_task(config, workdir)
  # The task knows its model's width (a pretrained encoder's may differ from config.model).
  tx, schedule = training.make_optimizer(config, getattr(task, 'd_model', None))
  mesh = config.get('mesh', {})
  fns = training.make_step_fns(
      task.loss_and_metrics, tx, config.parallel, config.batch_chunks,
      mesh_sizes={k: mesh[k] for k in ('data', 'fsdp', 'tensor') if k in mesh},
      rules=dict(mesh['rules']) if 'rules' in mesh else None)
  train_iter = train_iterator(task, config, fns)
  if main_process:
    task.eval_batches()
    _sync('task files written')
  parts = fns.batch_parts
  if config.batch_size % parts or config.data.eval_batch_size % parts:
    raise ValueError(f'config.batch_size={config.batch_size} and config.data.eval_batch_size='
                     f'{config.data.eval_batch_size} must be multiples of the {parts} row '
                     f'blocks of the batch ({config.parallel} over {fns.num_devices} devices)')
  if config.batch_size % (parts * config.batch_chunks):
    raise ValueError(f'config.batch_size={config.batch_size} must be a multiple of '
                     f'batch_chunks={config.batch_chunks} x {parts} row blocks')
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  loss_scale = training.make_loss_scale(config)
  init_state = lambda: training.TrainState.create(task.init_params(init_rng), tx, train_rng,
                                                  loss_scale)
  ckpt = checkpoints.Checkpointer(workdir, keep=config.keep, keep_best=config.keep_best,
                                  async_save=config.async_checkpointing)
  restored = ckpt.restore_latest(
      fns.abstract_state(init_state), expect_model=checkpoints.config_to_dict(config.model),
      config=checkpoints.config_to_dict(config), params_only=config.restore_params_only,
      tx=tx, start_over=config.start_over_if_unreadable)
  start = 0
  if restored is not None:
    start, state, data_state, _ = restored
    train_iter.set_state(data_state)
    say(f'resumed from {ckpt.directory}/{start}', flush=True)
    dstate = fns.put_state(state)
    del state
  else:
    dstate = fns.create_state(init_state)
  if main_process:  # only once the run is accepted
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(dstate.params))
  say(f'task={task.name} params={n_params:,} devices={fns.num_devices} ({config.parallel}'
      f'{" " + fns.layout if fns.layout else ""}, {jax.process_count()} process'
      f'{"es" if jax.process_count() > 1 else ""}) per-device: params '
      f'{sharding.per_device_bytes(dstate.params) / 2**20:.1f} MiB + optimizer '
      f'{sharding.per_device_bytes(dstate.opt_state) / 2**20:.1f} MiB '
      f'huge_pages={"on" if runtime.huge_pages_active() else "off"} '
      f'setup={time.time() - t_setup:.1f}s workdir={workdir}', flush=True)
  writer = MetricWriter(workdir, start) if main_process else NullWriter()
  accum = config.optimizer.accum_steps
  total = config.num_train_steps
  stop = StopSignal()

  def save(step, metrics=None):
    ckpt.save(step, fns.get_state(dstate), data_state=train_iter.get_state(), config=config,
              assets=task.assets, task=task.name, metrics=metrics)

  skipped = 0
  pending = None  # (update step, metrics) of the previous micro-batch, read one step late

  def check_finite(pending):
    nonlocal skipped
    if pending is None or not float(pending[1]['nonfinite']):
      return
    skipped += 1
    message = (f'step {pending[0]}: non-finite loss or gradient norm; that update was not '
               f'applied')
    if config.nonfinite == 'stop':
      ckpt.close()  # let an in-flight save of a good state commit
      raise TrainingDiverged(
          f'{message}. Training stopped; the last good checkpoint is {ckpt.latest_path()} '
          '(the state was never saved with NaN/inf). Lower the learning rate, or rerun with '
          "--config.nonfinite=skip to skip such updates")
    note(f'{message} (skipped; {skipped} so far)')

  step, sums, window_t, n_micro, last_dev = start, None, time.time(), 0, {}
  bar = tqdm(total=total, initial=start, desc='train', dynamic_ncols=True, file=sys.stderr,
             disable=not main_process)
  note = bar.write if main_process else (lambda text: None)
  try:
    while step < total and stop.signum is None:
      for _ in range(accum):
        dstate, m = fns.train(dstate, fns.put_batch(next(train_iter), config.batch_size))
        check_finite(pending)  # the previous step is done by now: no pipeline stall
        pending = (step + 1, m)
        sums = m if sums is None else jax.tree_util.tree_map(jnp.add, sums, m)
        n_micro += 1
      step += 1
      bar.update(1)
      last = step == total
      scalars = {}
      if step % config.log_every == 0 or last:
        scalars = training.summarize(sums, 'train/')
        dt = time.time() - window_t  # after summarize's device_get: the window's steps are done
        scalars['train/grad_norm'] = float(sums['grad_norm']) / n_micro  # mean, not per-token
        scalars['learning_rate'] = float(schedule(step - 1))
        if dstate.loss_scale is not None:  # float16: the dynamic loss scale now
          scalars['train/loss_scale'] = float(
              jnp.ravel(jax.device_get(dstate.loss_scale.scale))[0])
        scalars['tokens_per_s'] = scalars['train/tokens'] / max(dt, 1e-9)
        bar.set_postfix(loss=f"{scalars['train/loss']:.3f}",
                        tok_s=f"{scalars['tokens_per_s']:.0f}", refresh=False)
        sums, window_t, n_micro = None, time.time(), 0
      dev = {}
      if (config.eval_every and step % config.eval_every == 0) or last:
        dev = dev_metrics(task, fns, dstate)
        bleu_every = config.eval.bleu_every
        if bleu_every and step % bleu_every == 0 and not last:
          bleu, _ = task.evaluate(fns.host_params(dstate))
          dev.update({f'dev/{k}': v for k, v in bleu.items()})
        note(f'step {step}: ' + ' '.join(f'{k}={v:.4g}' for k, v in dev.items()))
        last_dev = dev
      if scalars or dev:
        writer.write(step, {**scalars, **dev})
      # keep_best ranks by dev metrics, so every evaluated step is also saved
      if step % config.checkpoint_every == 0 or last or (dev and config.keep_best):
        check_finite(pending)
        pending = None
        save(step, dev or None)
    check_finite(pending)
    if stop.signum is not None and step < total:
      save(step)
      ckpt.close()
      say(f'stopped at step {step} by {signal.Signals(stop.signum).name}; checkpoint saved '
            f'in {ckpt.directory}; rerun the same command to resume', flush=True)
      sys.exit(128 + stop.signum)
  except KeyboardInterrupt:
    print(f'\naborted at step {step}; trying to save a checkpoint', file=sys.stderr)
    try:
      save(step)
      ckpt.close()
    except Exception as e:  # pylint: disable=broad-except
      print(f'could not save ({type(e).__name__}: {e}); the last good checkpoint is '
            f'{ckpt.steps()[-1:] or "none"}', file=sys.stderr)
    raise
  finally:
    stop.restore()
    bar.close()
    writer.close()
  ckpt.close()

  final = dict(last_dev) if last_dev else dev_metrics(task, fns, dstate)
  if config.eval.get('final_bleu', True) and hasattr(task, 'evaluate'):
    t = time.time()
    extra, samples = task.evaluate(fns.host_params(dstate))
    final.update({f'dev/{k}': v for k, v in extra.items()})
    writer_final = {f'final/{k.split("/", 1)[1]}': v for k, v in final.items()}
    if main_process:
      with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps({'step': step, **writer_final}) + '\n')
    say(f'evaluation took {time.time() - t:.1f}s; examples:\n' + '\n\n'.join(samples))
  say('final dev: ' + ' '.join(f'{k}={v:.4g}' for k, v in final.items()), flush=True)
  return final


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]} (config overrides need '
                         '--config.<field>=value)')
  logging.basicConfig(level=logging.WARNING)
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/grain INFO chatter off
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  config = _CONFIG.value
  workdir = _WORKDIR.value
  if workdir is None:
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(
        flags.FLAGS['config'])))[0]
    workdir = os.path.join('runs', name)
  from flaxformer_mini import checkpoints
  from flaxformer_mini.data import records
  join_processes()
  try:
    train_and_evaluate(config, workdir)
  except (checkpoints.ResumeError, checkpoints.NoReadableCheckpointError,
          checkpoints.CheckpointWriteError, TrainingDiverged, records.BadRowError,
          FileNotFoundError) as e:
    sys.exit(f'train.py: error: {e}')
  except ValueError as e:
    if str(e).startswith(('config.', '--workdir', 'batch_chunks', 'parameter ')):
      sys.exit(f'train.py: error: {e}')
    raise


def _check_config_file(argv) -> None:
  """Exits with one line if --config names a missing file or one without get_config()."""
  path = None
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      path = a.split('=', 1)[1]
    elif a == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
  if path is None:
    return
  path = path.split(':', 1)[0]  # config_flags allows file.py:argument
  if not os.path.isfile(path):
    sys.exit(f'train.py: error: config file not found: {path!r}')
  with open(path, encoding='utf-8', errors='replace') as f:
    if not re.search(r'^def get_config\(', f.read(), re.M):
      sys.exit(f'train.py: error: config file {path!r} defines no get_config() '
               '(see configs/common.py)')


def parse_flags(argv):
  """absl flag parsing, with a one-line error for a mistyped --config.<field>.

  config_flags raises a raw AttributeError/KeyError ("'warmup_step' Did you mean
  'warmup_steps'?") from inside the parser; turn it into a message and exit code 2.
  """
  _check_config_file(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'train.py: error: {e}\nPass --helpfull to see the flags.')
  except (AttributeError, KeyError) as e:
    detail = re.sub(r'\\n|\n|[\\\'"]', ' ', str(e.args[0] if e.args else e)).split()
    key = detail[0] if detail else '?'
    named = [a.split('=')[0] for a in argv if a.startswith('--config.')
             and a.split('=')[0].rsplit('.', 1)[-1] == key]
    sys.exit(f'train.py: error: unknown config field {key!r} in {", ".join(named) or "--config.*"}'
             f' ({" ".join(detail[1:]) or "no such field"}); all fields are listed in '
             'configs/common.py.')


if __name__ == '__main__':
  from flaxformer_mini import runtime
  runtime.reexec_with_huge_pages()  # XLA:CPU buffers on huge pages (see runtime.py)
  app.run(main, flags_parser=parse_flags)
