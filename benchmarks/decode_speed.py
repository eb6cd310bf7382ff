"""Decode speed of flaxformer_mini vs Hugging Face `FlaxMarianMTModel.generate`.

Same model sizes as `train_throughput.MODEL` (random weights), batch 8, source
length 64, exactly 64 new tokens per row, greedy and beam 4. One timed call is the
whole decode under one ``jax.jit``: encoder, cache initialisation and the
64-step loop. Output tokens/s = batch * 64 / median call time.

Forcing 64 tokens (no early EOS):
  ours: ``eos_id=-1``, an id outside [0, vocab), so no chosen token ever equals it
    and no row or beam finishes before ``max_decode_len``;
  HF:   ``min_length = max_length = 1 + 64`` (the decoder start token counts), so
    the min-length processor sets the EOS logit to -inf at every step;
    ``early_stopping=False``. Both are checked on the outputs.

    python benchmarks/decode_speed.py                  # full run
    python benchmarks/decode_speed.py --quick          # smoke run (< 1 min)
    python benchmarks/decode_speed.py --systems ours --out /tmp/decode.json
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
from train_throughput import BOS_ID, EOS_ID, MODEL, PAD_ID, marian_config

DECODE = dict(batch_size=8, src_len=64, new_tokens=64, beam_size=4)
NEVER_EMITTED_EOS = -1  # outside [0, vocab): our searches can never finish early


def make_inputs(seed: int = 0) -> np.ndarray:
  """[batch, src_len] random source ids in [3, vocab), no padding."""
  rng = np.random.RandomState(seed)
  return rng.randint(3, MODEL["vocab_size"],
                     size=(DECODE["batch_size"], DECODE["src_len"])).astype(np.int32)


def make_ours(inputs: np.ndarray):
  """Returns {name: step} for our greedy and beam-4 decodes (whole decode jitted)."""
  import jax
  import jax.numpy as jnp

  from flaxformer_mini import Transformer, TransformerConfig, decoding, seq2seq_decoding_fns
  from flaxformer_mini.models import STATIC_CACHE_KEYS

  model = Transformer(TransformerConfig(**MODEL))
  src = jnp.asarray(inputs)
  params = jax.jit(model.init)(jax.random.key(0), src[:1], src[:1])["params"]
  b, n, k = DECODE["batch_size"], DECODE["new_tokens"], DECODE["beam_size"]
  common_kw = dict(batch_size=b, max_decode_len=n, bos_id=BOS_ID, eos_id=NEVER_EMITTED_EOS,
                   pad_id=PAD_ID)

  @jax.jit
  def greedy(params, src):
    t2l, cache = seq2seq_decoding_fns(model, params, src, n)
    return decoding.greedy_search(t2l, cache, **common_kw)

  @jax.jit
  def beam(params, src):
    t2l, cache = seq2seq_decoding_fns(model, params, src, n)
    seqs, _ = decoding.beam_search(t2l, cache, beam_size=k, num_return=1,
                                   static_cache_keys=STATIC_CACHE_KEYS, **common_kw)
    return seqs[:, 0]

  def check(seqs):
    seqs = np.asarray(seqs)
    if seqs.shape != (b, n):
      raise AssertionError(f"ours: expected [{b}, {n}] tokens, got {seqs.shape}")
    return seqs

  return {"ours_greedy": (lambda: check(jax.block_until_ready(greedy(params, src)))),
          "ours_beam4": (lambda: check(jax.block_until_ready(beam(params, src))))}


def make_hf(inputs: np.ndarray):
  """Returns {name: step} for HF FlaxMarianMTModel.generate, greedy and beam 4, jitted."""
  import jax
  import jax.numpy as jnp
  from transformers import FlaxMarianMTModel

  model = FlaxMarianMTModel(marian_config(), seed=0, dtype=jnp.float32)
  src = jnp.asarray(inputs)
  mask = src != PAD_ID
  b, n, k = DECODE["batch_size"], DECODE["new_tokens"], DECODE["beam_size"]

  def generate(params, src, mask, num_beams):
    return model.generate(src, attention_mask=mask, params=params, max_new_tokens=n,
                          min_length=n + 1, num_beams=num_beams, do_sample=False,
                          early_stopping=False, num_return_sequences=1).sequences

  greedy = jax.jit(functools.partial(generate, num_beams=1))
  beam = jax.jit(functools.partial(generate, num_beams=k))

  def check(seqs):
    seqs = np.asarray(seqs)
    if seqs.shape != (b, n + 1):
      raise AssertionError(f"hf: expected [{b}, {n + 1}] (start token + {n}), got {seqs.shape}")
    if (seqs[:, 1:] == EOS_ID).any():
      raise AssertionError("hf: an EOS was generated although min_length forbids it")
    return seqs

  params = model.params
  return {"hf_greedy": (lambda: check(jax.block_until_ready(greedy(params, src, mask)))),
          "hf_beam4": (lambda: check(jax.block_until_ready(beam(params, src, mask))))}


def make_floor(inputs: np.ndarray):
  """A floor for a float32 decode step under XLA on this machine: the step's weight
  matmuls and nothing else, in the same kind of jitted 64-step loop.

  Per step and decoder layer: self-attention q, k, v, o and cross-attention q, o
  (d x d each), FFN wi (d x f) and wo (f x d); then the tied output projection
  x @ E^T (E [vocab, d]) and an argmax whose embedding feeds the next step. Weights
  are random, stored [in, out] like ours. No attention over a cache, no norms, no
  softmax, no search bookkeeping: a real decoder does all of this plus those.
  "floor_greedy" runs 8 rows, "floor_beam4" 8 x 4 rows; tokens/s counts 8 x 64
  output tokens per call like the real decodes.
  """
  import jax
  import jax.numpy as jnp

  d, f, v = MODEL["d_model"], MODEL["d_ff"], MODEL["vocab_size"]
  n, b = DECODE["new_tokens"], DECODE["batch_size"]
  rng = np.random.default_rng(0)
  w = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02)
  params = {"layers": [{k: w(d, d) for k in ("q", "k", "v", "o", "cq", "co")}
                       | {"wi": w(d, f), "wo": w(f, d)}
                       for _ in range(MODEL["num_decoder_layers"])],
            "embedding": w(v, d)}

  def step(x, p):
    for l in p["layers"]:
      x = x + (x @ l["q"]) * (x @ l["k"]) @ l["o"] + x @ l["v"]
      x = x + (x @ l["cq"]) @ l["co"]
      x = x + jax.nn.relu(x @ l["wi"]) @ l["wo"]
    logits = x @ p["embedding"].T
    return p["embedding"][jnp.argmax(logits, axis=-1)] + 0.5 * x

  run = jax.jit(lambda p, x0: jax.lax.fori_loop(0, n, lambda i, x: step(x, p), x0))
  x_greedy, x_beam = w(b, d), w(b * DECODE["beam_size"], d)  # one compile per row count
  return {"floor_greedy": lambda: jax.block_until_ready(run(params, x_greedy)),
          "floor_beam4": lambda: jax.block_until_ready(run(params, x_beam))}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="1 warmup + 1x2 timed calls (smoke run)")
  p.add_argument("--systems", default="ours,hf,floor",
                 help="comma-separated subset of ours,hf,floor "
                      "(floor: matmuls only, see make_floor)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps-per-round", type=int, default=4)
  p.add_argument("--out", default="", help="write the JSON result here")
  p.add_argument("--no-huge-pages", action="store_true",
                 help="do not re-execute with glibc.malloc.hugetlb=1 (see common.huge_pages)")
  args = p.parse_args(argv)
  common.huge_pages(not args.no_huge_pages)
  if args.quick:
    args.warmup, args.rounds, args.steps_per_round = 1, 1, 2
  systems = [s.strip() for s in args.systems.split(",") if s.strip()]
  unknown = set(systems) - {"ours", "hf", "floor"}
  if unknown:
    p.error(f"--systems: unknown {sorted(unknown)}; expected a subset of ours,hf,floor")

  info = common.machine_info()
  config = {"model": MODEL, "decode": DECODE, "dtype": "float32",
            "forcing": {"ours": f"eos_id={NEVER_EMITTED_EOS} (never emitted)",
                        "hf": f"min_length=max_length={DECODE['new_tokens'] + 1}, "
                              "early_stopping=False"},
            "warmup": args.warmup, "rounds": args.rounds,
            "steps_per_round": args.steps_per_round}
  common.print_header("decode_speed", info, config)

  inputs = make_inputs()
  builders = {"ours": make_ours, "hf": make_hf, "floor": make_floor}
  steps, compile_s = {}, {}
  for system in systems:
    for name, step in builders[system](inputs).items():
      t0 = time.perf_counter()
      step()  # compile
      compile_s[name] = time.perf_counter() - t0
      for _ in range(args.warmup):
        step()
      steps[name] = step
      print(f"  built {name} (compile + first call {compile_s[name]:.1f} s)")
      sys.stdout.flush()

  times = common.interleaved(steps, rounds=args.rounds, steps_per_round=args.steps_per_round)
  tokens = DECODE["batch_size"] * DECODE["new_tokens"]
  results = {}
  print(f"\n{'system':>12} {'call median':>12} {'IQR':>9} {'out tok/s':>10} "
        f"{'tok/s IQR range':>17}")
  for name in steps:
    s = common.summarize(times[name])
    r = dict(s, compile_and_first_call_s=compile_s[name], tokens_per_s=tokens / s["median_s"],
             tokens_per_s_q1_q3=[tokens / s["q3_s"], tokens / s["q1_s"]], times_s=times[name])
    results[name] = r
    print(f"{name:>12} {s['median_s'] * 1e3:10.1f}ms {s['iqr_s'] * 1e3:7.1f}ms "
          f"{r['tokens_per_s']:10.0f} {r['tokens_per_s_q1_q3'][0]:8.0f}-"
          f"{r['tokens_per_s_q1_q3'][1]:<8.0f}")
  summary = {}
  for mode in ("greedy", "beam4"):
    if f"ours_{mode}" in results and f"hf_{mode}" in results:
      ratio = results[f"ours_{mode}"]["tokens_per_s"] / results[f"hf_{mode}"]["tokens_per_s"]
      summary[f"ours_over_hf_{mode}"] = ratio
      print(f"ours / hf {mode}: {ratio:.2f}x (target >= 3x)")
    if f"floor_{mode}" in results and f"hf_{mode}" in results:
      ratio = results[f"floor_{mode}"]["tokens_per_s"] / results[f"hf_{mode}"]["tokens_per_s"]
      summary[f"floor_over_hf_{mode}"] = ratio
      print(f"matmul-only floor / hf {mode}: {ratio:.2f}x (the step's weight matmuls alone, "
            "as XLA runs them on this machine)")
  common.write_json(args.out, {"benchmark": "decode_speed", "machine": info, "config": config,
                               "results": results, "summary": summary})


if __name__ == "__main__":
  main()
