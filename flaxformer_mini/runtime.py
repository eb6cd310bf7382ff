"""Process set-up for CPU runs: transparent huge pages for XLA's buffers.

XLA:CPU takes its buffers from glibc's malloc. Where the kernel's transparent huge
pages are in "madvise" mode (a common default), glibc hands out 4 KiB pages unless
the ``glibc.malloc.hugetlb=1`` tunable asks it to madvise huge ones, and glibc reads
tunables only from the environment at process start. So a launcher that wants them
re-executes itself once with ``GLIBC_TUNABLES`` extended (`reexec_with_huge_pages`).

Measured on the 2-core benchmark machine (interleaved, separate processes): the
default config's train step on its real batches went from 304-361 to 231-252 ms,
and the benchmark step (benchmarks/train_throughput.py) from 1281-1343 to
1173-1203 ms; torch's step in the same processes gained 6-11 %. Numerics do not
change (only where memory comes from). Opt out with ``FLAXFORMER_MINI_HUGE_PAGES=0``.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "FLAXFORMER_MINI_HUGE_PAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # first glibc with the hugetlb malloc tunable


def thp_mode(path: str = THP_ENABLED) -> str | None:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never") or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, ...] | None:
  """(major, minor) of the C library when it is glibc, else None."""
  name, version = platform.libc_ver()
  if name != "glibc":
    return None
  try:
    return tuple(int(p) for p in version.split(".")[:2])
  except ValueError:
    return None


def huge_pages_env(environ: Mapping[str, str], mode: str | None,
                   glibc: tuple[int, ...] | None) -> dict | None:
  """The environment to re-execute with, or None when there is nothing to do.

  Nothing to do when: opted out (``FLAXFORMER_MINI_HUGE_PAGES=0``), the C library
  is not glibc >= 2.35, the kernel mode is not "madvise" ("always" already gives
  huge pages, "never" cannot), or ``GLIBC_TUNABLES`` already sets the tunable.
  Other tunables already in ``GLIBC_TUNABLES`` are kept.
  """
  if environ.get(OPT_OUT, "1") == "0" or mode != "madvise":
    return None
  if glibc is None or glibc < MIN_GLIBC:
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in tunables:
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
  return env


def huge_pages_active(environ: Mapping[str, str] = os.environ,
                      mode: str | None = None) -> bool:
  """True when malloc'd buffers of this process get transparent huge pages: the kernel
  gives them to everyone ("always") or to madvised memory ("madvise") and this process
  started with the hugetlb tunable. ``mode`` defaults to `thp_mode()`."""
  mode = thp_mode() if mode is None else mode
  tunable_on = f"{TUNABLE}=1" in environ.get("GLIBC_TUNABLES", "")
  return mode == "always" or (mode == "madvise" and tunable_on)


def reexec_with_huge_pages() -> None:
  """Re-executes the current command line with huge pages on, if that changes anything.

  Call it first thing in a launcher's ``__main__`` (Linux; elsewhere it returns).
  The process keeps its PID, arguments (``sys.orig_argv``, interpreter options
  included), working directory and open stdout/stderr; ``os.execve`` does not return
  (if it fails, a RuntimeWarning says so and the current process carries on).
  """
  if not sys.platform.startswith("linux"):
    return
  env = huge_pages_env(os.environ, thp_mode(), glibc_version())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, list(sys.orig_argv), env)
  except OSError as e:  # e.g. no usable sys.executable: run on without huge pages
    warnings.warn(f"could not re-execute {sys.executable!r} with huge pages ({e}); "
                  "continuing without them", RuntimeWarning, stacklevel=2)
