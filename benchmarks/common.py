"""Shared benchmark plumbing: machine report, timing statistics, matmul peak, JSON output.

Nothing here knows about models. Every benchmark script

  * prints `machine_info()` and its exact config,
  * times each system with `time_steps` (one call = one step, synchronised),
    interleaving systems round by round so that load drifting on a shared
    machine hits all of them alike,
  * reports `summarize(times)` (median, IQR, min, max, n) and writes a JSON file
    with ``--out``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, REPO_ROOT)


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
  """The SIMD flags that matter for float32 matmul speed."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          flags = set(line.split(":", 1)[1].split())
          return sorted(flags & {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"})
  except OSError:
    pass
  return []


def _version(module: str) -> str | None:
  try:
    mod = __import__(module)
    return getattr(mod, "__version__", "?")
  except Exception:
    return None


def huge_pages(enabled: bool) -> None:
  """Re-executes the benchmark with XLA's (and torch's) buffers on huge pages, as
  train.py runs (flaxformer_mini.runtime); all systems share the process, so all get
  them. ``enabled=False`` pins them off (FLAXFORMER_MINI_HUGE_PAGES=0 for the record)."""
  from flaxformer_mini import runtime
  if enabled:
    runtime.reexec_with_huge_pages()
  else:
    os.environ[runtime.OPT_OUT] = "0"


def machine_info() -> dict[str, Any]:
  """CPU model, visible cores, load average, library versions and relevant env vars."""
  from flaxformer_mini import runtime
  info = {
      "cpu_model": cpu_model(),
      "cpu_flags": cpu_flags(),
      "logical_cores": os.cpu_count(),
      "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
      "python": platform.python_version(),
      "platform": platform.platform(),
      "versions": {m: _version(m) for m in
                   ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers")},
      "env": {k: os.environ[k] for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                         "JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL",
                                         "GLIBC_TUNABLES", "FLAXFORMER_MINI_HUGE_PAGES")
              if k in os.environ},
      "transparent_huge_pages": runtime.thp_mode(),
      "huge_pages_active": runtime.huge_pages_active(),
  }
  return info


def print_header(title: str, info: dict[str, Any], config: dict[str, Any]) -> None:
  print(f"=== {title} ===")
  print(f"cpu:      {info['cpu_model']}  ({info['usable_cores']} usable / "
        f"{info['logical_cores']} logical cores; flags {','.join(info['cpu_flags'])})")
  print(f"load:     {info['loadavg_at_start']}  (1/5/15-min load average at start)")
  print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v))
  if info["env"]:
    print(f"env:      {info['env']}")
  print(f"memory:   huge pages for malloc'd buffers "
        f"{'on' if info['huge_pages_active'] else 'off'} (kernel THP mode "
        f"{info['transparent_huge_pages']})")
  print("config:   " + json.dumps(config, sort_keys=True))
  sys.stdout.flush()


# ----------------------------------------------------------------------------- timing


def summarize(times: list[float]) -> dict[str, float]:
  """Median, interquartile range (q1, q3, q3 - q1), min, max and count of ``times`` (s)."""
  if not times:
    raise ValueError("no timings to summarize")
  xs = sorted(times)
  if len(xs) >= 2:
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
  else:
    q1 = q3 = xs[0]
  return {"median_s": statistics.median(xs), "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1,
          "min_s": xs[0], "max_s": xs[-1], "n": len(xs)}


def time_call(fn: Callable[[], Any]) -> float:
  """Seconds for one ``fn()``; fn must block until its result is ready."""
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def interleaved(systems: dict[str, Callable[[], Any]], *, rounds: int,
                steps_per_round: int, log: bool = True) -> dict[str, list[float]]:
  """Times every system ``rounds x steps_per_round`` times, round-robin by round.

  Each value of ``systems`` runs one synchronised step. Interleaving rounds
  (A A A, B B B, C C C, A A A, ...) spreads a shared machine's load swings over
  all systems instead of penalising whichever happens to run during a busy spell.
  """
  times: dict[str, list[float]] = {name: [] for name in systems}
  for r in range(rounds):
    for name, step in systems.items():
      round_times = [time_call(step) for _ in range(steps_per_round)]
      times[name].extend(round_times)
      if log:
        print(f"  round {r + 1}/{rounds} {name:>14}: "
              + " ".join(f"{t * 1e3:.0f}" for t in round_times) + " ms")
        sys.stdout.flush()
  return times


# ----------------------------------------------------------------------------- peak


def jax_matmul_peak(n: int = 1024, repeats: int = 20, chain: int = 4) -> dict[str, float]:
  """Best float32 matmul rate of JAX on this machine, FLOP/s.

  One jitted call runs ``chain`` dependent n x n x n matmuls (``2 n^3`` FLOPs each,
  dependent so none can be skipped) to amortise dispatch; the best of ``repeats``
  calls is the peak.
  """
  import jax
  import jax.numpy as jnp

  @jax.jit
  def f(a, b):
    for _ in range(chain):
      a = jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST) * 1e-3
    return a

  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  f(a, b).block_until_ready()
  best = min(time_call(lambda: f(a, b).block_until_ready()) for _ in range(repeats))
  return {"flops_per_s": chain * 2 * n ** 3 / best, "n": n, "chain": chain,
          "best_call_s": best, "repeats": repeats}


def torch_matmul_peak(n: int = 1024, repeats: int = 20, chain: int = 4) -> dict[str, float]:
  """Best float32 matmul rate of PyTorch (same scheme as `jax_matmul_peak`)."""
  import torch
  a = torch.randn(n, n)
  b = torch.randn(n, n) * 1e-3
  bufs = (torch.empty(n, n), torch.empty(n, n))  # ping-pong: never write into an input

  def f():
    x = a
    for i in range(chain):
      x = torch.mm(x, b, out=bufs[i % 2])
    return x

  f()
  best = min(time_call(f) for _ in range(repeats))
  return {"flops_per_s": chain * 2 * n ** 3 / best, "n": n, "chain": chain,
          "best_call_s": best, "repeats": repeats}


# ----------------------------------------------------------------------------- output


def write_json(path: str | None, result: dict[str, Any]) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True, default=str)
  print(f"wrote {path}")
