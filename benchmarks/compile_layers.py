"""Compile time of a train-step-like gradient vs depth, with and without ``scan_layers``.

A Python loop of layers hands XLA one copy of the layer per layer, so compile time grows
with depth; ``nn.scan`` hands it one layer body, so a deep model compiles in about the
time of a shallow one. For each (num_layers, scan_layers) this times
``jax.jit(jax.grad(loss)).lower(...).compile()`` of a `DecoderOnlyLM` (dropout on, as in
training) ``--repeats`` times, each with a freshly built function so nothing is cached,
and reports the median.

  PYTHONPATH=. python3 benchmarks/compile_layers.py [--layers 1 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import common
import flax
import jax
import jax.numpy as jnp

from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.models import DecoderOnlyLM


def model_config(num_layers: int, scan: bool, remat: str) -> TransformerConfig:
  return TransformerConfig(vocab_size=1000, d_model=64, num_heads=4, d_ff=256,
                           num_encoder_layers=0, num_decoder_layers=num_layers, max_len=128,
                           norm_placement="pre", dropout_rate=0.1, scan_layers=scan,
                           remat=remat)


def compile_seconds(cfg: TransformerConfig, batch: int, length: int) -> tuple[float, float]:
  """(lower, compile) seconds for jit(grad(loss)) of a fresh model and function."""
  model = DecoderOnlyLM(cfg)
  ids = jnp.zeros((batch, length), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), ids)["params"])

  def loss(params, ids, rng):  # next-token cross-entropy, dropout on
    logits = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": rng})
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

  start = time.perf_counter()
  lowered = jax.jit(jax.grad(loss)).lower(params, ids, jax.random.key(1))
  lowered_at = time.perf_counter()
  lowered.compile()
  return lowered_at - start, time.perf_counter() - lowered_at


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[1, 24])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  args = parser.parse_args()

  print(f"machine: {common.cpu_model()} ({platform.processor() or platform.machine()}), "
        f"os.cpu_count()={os.cpu_count()}, "
        f"jax {jax.__version__} ({jax.default_backend()}), flax {flax.__version__}")
  print(f"DecoderOnlyLM d_model=64 heads=4 d_ff=256 vocab=1000 pre-LN dropout 0.1, "
        f"remat={args.remat}; batch {args.batch} x {args.length}; "
        f"median of {args.repeats} lower+compile of jax.jit(jax.grad(loss))")
  print(f"{'layers':>6} {'scan':>5} {'lower s':>8} {'compile s':>9} {'total s':>8}")
  for num_layers in args.layers:
    for scan in (False, True):
      cfg = model_config(num_layers, scan, args.remat)
      runs = [compile_seconds(cfg, args.batch, args.length) for _ in range(args.repeats)]
      lower = statistics.median(r[0] for r in runs)
      comp = statistics.median(r[1] for r in runs)
      total = statistics.median(r[0] + r[1] for r in runs)
      print(f"{num_layers:>6} {scan!s:>5} {lower:>8.2f} {comp:>9.2f} {total:>8.2f}",
            flush=True)


if __name__ == "__main__":
  main()
