"""Shared pytest fixtures for the flaxformer_mini tests (kept tiny on purpose)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

# Tests run in float32 (the JAX default); float64 lives only in the NumPy references.
jax.config.update("jax_enable_x64", False)


@pytest.fixture
def rng():
  """A fresh, seeded NumPy generator per test: random inputs are reproducible."""
  return np.random.default_rng(0)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_MAX_DECODE_LEN = 8
SMOKE_OVERRIDES = [  # smoke.py made as cheap as possible while still saving 2 checkpoints
    '--config.num_train_steps=40', '--config.checkpoint_every=20', '--config.eval_every=0',
    '--config.log_every=20', '--config.optimizer.lr_factor=5',
    '--config.data.train_split=train[:1000]', '--config.data.spm_max_sentences=500',
    '--config.data.eval_split=validation[:16]', '--config.data.eval_batch_size=16',
    '--config.eval.bleu_examples=1', f'--config.eval.max_decode_len={SMOKE_MAX_DECODE_LEN}',
]


@pytest.fixture(scope='session')
def smoke_run_dir(tmp_path_factory):
  """A tiny trained pt->en run (train.py on configs/smoke.py), shared by the translate CLI,
  export and server tests."""
  workdir = str(tmp_path_factory.mktemp('smoke') / 'run')
  cmd = [sys.executable, 'train.py', '--config=configs/smoke.py', f'--workdir={workdir}',
         *SMOKE_OVERRIDES]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return workdir
