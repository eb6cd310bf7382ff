"""Multi-process training on JAX's own runtime: 2 processes x 2 simulated CPU devices.

Each run is train.py on the smoke config over an fsdp=2 x tensor=2 mesh, started as
subprocesses that meet through ``jax.distributed`` on a free localhost port (CPU
collectives: gloo), with the batch in 2 input shards (one read by each of 2 processes,
both by a single process). Compared with one process holding all 4 devices: the same loss
curve; a run whose processes are both SIGKILLed mid-run and restarted ends with the
same params as an uninterrupted one; its checkpoint loads on one device and decodes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from flaxformer_mini import checkpoints, translate  # noqa: E402

STEPS, EVERY = 24, 4
OVERRIDES = {'num_train_steps': STEPS, 'checkpoint_every': EVERY, 'eval_every': 12,
             'eval.final_bleu': False, 'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.tensor': 2,
             'data.input_shards': 2}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(workdir, processes, devices, tfds_dir):
  """Starts one train.py per process; returns the Popen list."""
  port = _free_port()
  overrides = {**OVERRIDES, 'data.tfds_dir': tfds_dir}
  procs = []
  for i in range(processes):
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), f'--config={REPO}/configs/smoke.py',
           f'--workdir={workdir}', *[f'--config.{k}={v}' for k, v in overrides.items()]]
    if processes > 1:
      cmd += [f'--coordinator_address=localhost:{port}', f'--num_processes={processes}',
              f'--process_id={i}']
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


def _finish(procs, timeout=600):
  outs = []
  for p in procs:
    outs.append(p.communicate(timeout=timeout)[0])
  return [p.returncode for p in procs], outs


def _kill_all(procs):
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  from flaxformer_mini import data
  root = tmp_path_factory.mktemp('multiprocess')
  tfds_dir = str(root / 'tfds')
  data.prepare_tsv_builder(data.embedded_paths(), other_lang='pt', data_dir=tfds_dir)
  dirs = {name: str(root / name) for name in ('one', 'two', 'killed')}
  started = []
  try:
    one = _launch(dirs['one'], 1, 4, tfds_dir)
    two = _launch(dirs['two'], 2, 2, tfds_dir)
    started += one + two
    killed = _launch(dirs['killed'], 2, 2, tfds_dir)
    started += killed
    first = os.path.join(dirs['killed'], 'checkpoints', str(2 * EVERY))
    deadline = time.time() + 600
    while (not os.path.isdir(first) and all(p.poll() is None for p in killed)
           and time.time() < deadline):
      time.sleep(0.005)
    _kill_all(killed)
    out = {'killed_codes': [p.returncode for p in killed],
           'steps_after_kill': sorted(int(s) for s in os.listdir(
               os.path.join(dirs['killed'], 'checkpoints')) if s.isdigit())}
    out['one'] = _finish(one)
    out['two'] = _finish(two)
    resumed = _launch(dirs['killed'], 2, 2, tfds_dir)
    started += resumed
    out['resumed'] = _finish(resumed)
  finally:
    _kill_all(started)
  return dirs, out


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]


def _losses(workdir):
  return [(m['step'], m['train/loss']) for m in _metrics(workdir) if 'train/loss' in m]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_all_devices(runs):
  dirs, out = runs
  for name in ('one', 'two'):
    codes, logs = out[name]
    assert codes == [0] * len(codes), logs[0][-3000:] + logs[-1][-3000:]
  assert '(mesh data=1 fsdp=2 tensor=2, 2 processes)' in out['two'][1][0]
  one, two = _losses(dirs['one']), _losses(dirs['two'])
  assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=2e-5)


@pytest.mark.slow
def test_only_process_0_writes_logs_but_every_process_its_data_state(runs):
  dirs, out = runs
  _, logs = out['two']
  assert 'final dev:' in logs[0] and 'final dev:' not in logs[1]
  assert 'task=translation' not in logs[1]
  steps = [m['step'] for m in _metrics(dirs['two']) if 'train/loss' in m]
  assert steps == sorted(set(steps))  # one line per step, not one per process
  data_dir = os.path.join(dirs['two'], 'checkpoints', str(STEPS), 'data')
  assert {n for n in os.listdir(data_dir) if n.endswith('.json')} == {
      'process_0-of-2.json', 'process_1-of-2.json'}
  for i in (0, 1):  # each process read only its own input shard
    with open(os.path.join(data_dir, f'process_{i}-of-2.json')) as f:
      assert json.load(f)['shards'] == [i]


@pytest.mark.slow
def test_both_processes_killed_and_restarted_end_like_an_uninterrupted_run(runs):
  dirs, out = runs
  assert out['killed_codes'] == [-signal.SIGKILL] * 2, out['killed_codes']
  assert out['steps_after_kill'] and out['steps_after_kill'][-1] < STEPS
  codes, logs = out['resumed']
  assert codes == [0, 0], logs[0][-3000:]
  assert f'resumed from {dirs["killed"]}/checkpoints/{out["steps_after_kill"][-1]}' in logs[0]
  _, want, _ = checkpoints.load_for_inference(dirs['two'])
  _, got, _ = checkpoints.load_for_inference(dirs['killed'])
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_multi_process_checkpoint_loads_on_one_device_and_decodes(runs, capsys):
  dirs, _ = runs
  _, params, _ = checkpoints.load_for_inference(dirs['killed'])
  leaf = jax.tree_util.tree_leaves(params)[0]
  assert len(leaf.sharding.device_set) == 1
  assert translate.main(['--workdir', dirs['killed'], '--greedy', '--max_decode_len=8',
                      'O gato dorme.', 'Bom dia.']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2
