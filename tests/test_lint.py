"""The repository's Python files pass `ruff check` with pyproject.toml's [tool.ruff] settings.

Only files tracked by git are checked, so work in progress that is not yet added does not
fail the suite. Skipped when ruff (the `test` extra) or a git checkout is missing.
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(importlib.util.find_spec('ruff') is None,
                                reason="ruff is not installed (pip install -e '.[test]')")


def _ruff(*args, cwd=REPO):
  return subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=120)


def _tracked_python_files():
  if shutil.which('git') is None:
    pytest.skip('git is not installed: cannot list the tracked files')
  out = subprocess.run(['git', 'ls-files', '-z', '--', '*.py'], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
  if out.returncode != 0:
    pytest.skip(f'{REPO} is not a git checkout: {out.stderr.strip()}')
  # A tracked file deleted in the working tree is not there to lint.
  return [f for f in out.stdout.split('\0') if f and os.path.isfile(os.path.join(REPO, f))]


def test_tracked_python_files_pass_ruff():
  files = _tracked_python_files()
  assert 'train.py' in files and 'flaxformer_mini/training.py' in files
  out = _ruff('--force-exclude', '--', *files)
  assert out.returncode == 0, f'ruff check found problems:\n{out.stdout}{out.stderr}'


def test_ruff_uses_the_project_settings(tmp_path):
  """The settings are read and enforced: an unused import and a 101-character line fail."""
  bad = tmp_path / 'bad.py'
  bad.write_text('import os\nimport sys\n\nx = "' + 'a' * 100 + '"\n')
  out = _ruff('--config', os.path.join(REPO, 'pyproject.toml'), str(bad))
  assert out.returncode == 1, out.stdout + out.stderr
  assert 'E501' in out.stdout and 'F401' in out.stdout
