"""flaxformer_mini.runtime: when train.py re-executes itself for huge pages, and that it works."""

import os
import subprocess
import sys

import pytest

from flaxformer_mini import runtime

NEW = (2, 36)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("environ, mode, glibc, expected", [
    ({}, "madvise", NEW, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}, "madvise", NEW,
     "glibc.malloc.mmap_max=0:glibc.malloc.hugetlb=1"),  # other tunables kept
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", NEW, None),  # the user's choice
    ({"FLAXFORMER_MINI_HUGE_PAGES": "0"}, "madvise", NEW, None),  # opted out
    ({}, "always", NEW, None),  # already huge pages
    ({}, "never", NEW, None),  # impossible
    ({}, None, NEW, None),  # no THP file
    ({}, "madvise", (2, 31), None),  # glibc without the tunable
    ({}, "madvise", None, None),  # musl / not glibc
])
def test_huge_pages_env_decisions(environ, mode, glibc, expected):
  env = runtime.huge_pages_env(dict(environ, PATH="/bin"), mode, glibc)
  if expected is None:
    assert env is None
  else:
    assert env["GLIBC_TUNABLES"] == expected
    assert env["PATH"] == "/bin"  # the rest of the environment is passed on


def test_huge_pages_active():
  on = {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.hugetlb=1"}
  assert runtime.huge_pages_active(on, "madvise")
  assert not runtime.huge_pages_active({}, "madvise")
  assert runtime.huge_pages_active({}, "always")
  assert not runtime.huge_pages_active(on, "never")


def test_failed_reexec_warns_and_carries_on(monkeypatch):
  monkeypatch.setattr(runtime.sys, "platform", "linux")
  monkeypatch.setattr(runtime, "thp_mode", lambda: "madvise")
  monkeypatch.setattr(runtime, "glibc_version", lambda: NEW)
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv("FLAXFORMER_MINI_HUGE_PAGES", raising=False)

  def execve(*args):
    raise FileNotFoundError(2, "No such file or directory")

  monkeypatch.setattr(runtime.os, "execve", execve)
  with pytest.warns(RuntimeWarning, match="could not re-execute"):
    runtime.reexec_with_huge_pages()


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert runtime.thp_mode(str(path)) == "madvise"
  path.write_text("garbage\n")
  assert runtime.thp_mode(str(path)) is None
  assert runtime.thp_mode(str(tmp_path / "missing")) is None


CHILD = r"""
import os, sys
from flaxformer_mini import runtime
print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:], flush=True)
runtime.reexec_with_huge_pages()
import jax.numpy as jnp
before = open('/proc/self/smaps_rollup').read()
x = (jnp.zeros((32 * 2 ** 20,), jnp.float32) + 1.0).block_until_ready()  # a 128 MiB XLA buffer
kb = lambda text: int(text.split('AnonHugePages:')[1].split()[0])
print('huge_kib', kb(open('/proc/self/smaps_rollup').read()) - kb(before), flush=True)
"""


@pytest.mark.skipif(runtime.huge_pages_env({}, runtime.thp_mode(), runtime.glibc_version())
                    is None or not os.path.exists("/proc/self/smaps_rollup"),
                    reason="needs Linux, glibc >= 2.35 and transparent huge pages in madvise mode")
@pytest.mark.slow
def test_reexec_puts_xla_buffers_on_huge_pages(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(CHILD)

  def run(**env):
    out = subprocess.run([sys.executable, str(script), "--flag", "x y"], capture_output=True,
                         text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **env))
    assert out.returncode == 0, out.stderr[-2000:]
    return [line.split(" ", 1) for line in out.stdout.splitlines()]

  lines = run()
  starts = [rest for word, rest in lines if word == "start"]
  assert len(starts) == 2, lines  # the original start and exactly one re-execution
  pid0, pid1 = starts[0].split()[0], starts[1].split()[0]
  assert pid0 == pid1  # execve keeps the process (a supervisor's kill still reaches it)
  assert "glibc.malloc.hugetlb=1" in starts[1] and "['--flag', 'x y']" in starts[1]
  huge_on = int(dict(lines)["huge_kib"])
  assert huge_on >= 64 * 1024, lines  # most of the 128 MiB buffer is on 2 MiB pages

  off = run(FLAXFORMER_MINI_HUGE_PAGES="0")
  assert len([1 for word, _ in off if word == "start"]) == 1  # opted out: no re-execution
  assert int(dict(off)["huge_kib"]) < huge_on // 2
