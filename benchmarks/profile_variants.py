"""A/B timings of candidate speed-ups for our train step and decode loop (no library edits).

Every variant is built in this script from the public API and timed interleaved
with the baseline, so a loaded machine slows all of them alike. Wall time and
process CPU time per call are both reported (CPU time is less sensitive to being
descheduled on a shared machine). XLA flags apply process-wide: compare them by
running the script twice, e.g.

    python benchmarks/profile_variants.py train
    python benchmarks/profile_variants.py decode
    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python benchmarks/profile_variants.py decode
    python benchmarks/profile_variants.py train --variants base,int_labels --quick

Train variants (all use flaxformer_mini.training's step and optimizer):
  base        the library as is: cross_entropy_sums (logsumexp - target logit) and the
              default counter-hash dropout masks
  int_labels  loss with optax.softmax_cross_entropy_with_integer_labels
  threefry_dropout  TransformerConfig(dropout_impl='threefry'): flax's jax.random.bernoulli masks
  fused_qkv   TransformerConfig(fused_qkv=True) (one qkv / kv kernel per attention)
  no_dropout  deterministic=True: the cost of dropout (RNG + masks), an upper bound
  rbg_prng    dropout keys from jax.random.key(.., impl='unsafe_rbg') instead of threefry
              (with hash masks the key only seeds them, so expect no difference)
Decode variants:
  greedy, beam4      the library as is (what decode_speed.py times)
  steps_only         64 tokens_to_logits calls in a fori_loop, no search logic
  encode_only        encoder + cache initialisation alone
  beam4_cross_out    beam 4 with cross-attention K/V (beam-invariant) kept out of the
                     cache that beam_search reorders each step
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
from decode_speed import DECODE, NEVER_EMITTED_EOS, make_inputs
from train_throughput import ADAM, BATCH, BOS_ID, MODEL, PAD_ID, make_batch


def _timed(step):
  def run():
    c0 = time.process_time()
    step()
    return time.process_time() - c0
  return run


def train_variants(names):
  import jax
  import jax.numpy as jnp
  import ml_collections
  import optax

  from flaxformer_mini import Transformer, TransformerConfig, training

  batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
  opt = ml_collections.ConfigDict(dict(
      schedule="constant", learning_rate=ADAM["learning_rate"], lr_factor=1.0, warmup_steps=1,
      b1=ADAM["b1"], b2=ADAM["b2"], eps=ADAM["eps"], clip_norm=0.0, weight_decay=0.0,
      accum_steps=1))
  tx, _ = training.make_optimizer(ml_collections.ConfigDict(dict(
      optimizer=opt, num_train_steps=10 ** 6)), MODEL["d_model"])

  def build(name):
    cfg = TransformerConfig(**MODEL, fused_qkv=(name == "fused_qkv"),
                            dropout_impl="threefry" if name == "threefry_dropout" else "hash")
    model = Transformer(cfg)
    deterministic = name == "no_dropout"

    def loss_fn(params, b, rng, det):
      logits = model.apply({"params": params}, b["inputs"], b["decoder_inputs"],
                           deterministic=det or deterministic, rngs={"dropout": rng})
      w = b["targets"] != PAD_ID
      if name != "int_labels":
        sums = training.cross_entropy_sums(logits, b["targets"], w, 0.0)
        return sums["loss"], sums
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])
      wf = w.astype(jnp.float32)
      return jnp.sum(ce * wf), {"loss": jnp.sum(ce * wf), "weight": jnp.sum(wf)}

    params = jax.jit(model.init)(jax.random.key(0), batch["inputs"][:1],
                                 batch["decoder_inputs"][:1])["params"]
    fns = training.make_step_fns(loss_fn, tx, "jit")
    # A typed key carries its PRNG implementation: the dropout masks of this
    # variant come from unsafe_rbg, the others' from the default threefry.
    rng = jax.random.key(1, impl="unsafe_rbg" if name == "rbg_prng" else None)
    holder = {"state": training.TrainState.create(params, tx, rng)}

    def step():
      holder["state"], m = fns.train(holder["state"], batch)
      jax.block_until_ready((holder["state"], m))
    return step

  return {n: build(n) for n in names}


def decode_variants(names):
  import jax
  import jax.numpy as jnp
  from jax import lax

  from flaxformer_mini import Transformer, TransformerConfig, decoding, seq2seq_decoding_fns

  model = Transformer(TransformerConfig(**MODEL))
  src = jnp.asarray(make_inputs())
  params = jax.jit(model.init)(jax.random.key(0), src[:1], src[:1])["params"]
  b, n, k = DECODE["batch_size"], DECODE["new_tokens"], DECODE["beam_size"]
  kw = dict(batch_size=b, max_decode_len=n, bos_id=BOS_ID, eos_id=NEVER_EMITTED_EOS, pad_id=PAD_ID)

  def greedy(params, src):
    t2l, cache = seq2seq_decoding_fns(model, params, src, n)
    return decoding.greedy_search(t2l, cache, **kw)

  def beam4(params, src):
    t2l, cache = seq2seq_decoding_fns(model, params, src, n)
    return decoding.beam_search(t2l, cache, beam_size=k, **kw)[0]

  def steps_only(params, src):
    t2l, cache = seq2seq_decoding_fns(model, params, src, n)
    def body(i, carry):
      ids, cache = carry
      logits, cache = t2l(ids[:, None], cache)
      return jnp.argmax(logits, -1).astype(jnp.int32), cache
    return lax.fori_loop(0, n, body, (jnp.full((b,), BOS_ID, jnp.int32), cache))[0]

  def encode_only(params, src):
    return seq2seq_decoding_fns(model, params, src, n)[1]

  def beam4_cross_out(params, src):
    t2l, cache = seq2seq_decoding_fns(model, params, src, n)
    is_cross = lambda path: any(getattr(p, "key", None) in ("cross_key", "cross_value",
                                                            "encoder_valid") for p in path)
    flat, treedef = jax.tree_util.tree_flatten_with_path(cache)
    fixed = {i: jnp.repeat(x, k, axis=0) for i, (path, x) in enumerate(flat) if is_cross(path)}
    moving = [x for i, (_, x) in enumerate(flat) if i not in fixed]

    def t2l_moving(ids, moving):
      it = iter(moving)
      leaves = [fixed[i] if i in fixed else next(it) for i in range(len(flat))]
      logits, new = t2l(ids, jax.tree_util.tree_unflatten(treedef, leaves))
      new_flat = jax.tree_util.tree_leaves(new)
      return logits, [x for i, x in enumerate(new_flat) if i not in fixed]

    return decoding.beam_search(t2l_moving, moving, beam_size=k, **kw)[0]

  fns = dict(greedy=greedy, beam4=beam4, steps_only=steps_only, encode_only=encode_only,
             beam4_cross_out=beam4_cross_out)
  out = {}
  for name in names:
    f = jax.jit(fns[name])
    out[name] = (lambda f=f: jax.block_until_ready(f(params, src)))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("what", choices=("train", "decode"))
  p.add_argument("--variants", default="", help="comma-separated subset (default: all)")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--steps-per-round", type=int, default=3)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  if args.quick:
    args.rounds, args.steps_per_round = 1, 2
  all_names = {"train": ["base", "int_labels", "threefry_dropout", "fused_qkv", "no_dropout",
                         "rbg_prng"],
               "decode": ["greedy", "beam4", "steps_only", "encode_only", "beam4_cross_out"]}
  names = [v for v in args.variants.split(",") if v] or all_names[args.what]
  bad = set(names) - set(all_names[args.what])
  if bad:
    p.error(f"unknown {args.what} variants {sorted(bad)}; expected {all_names[args.what]}")
  info = common.machine_info()
  common.print_header(f"profile_variants {args.what}", info,
                      {"variants": names, "model": MODEL, "batch": BATCH, "decode": DECODE})
  steps = (train_variants if args.what == "train" else decode_variants)(names)
  for name, step in steps.items():
    t0 = time.perf_counter()
    step()
    step()
    print(f"  built {name} ({time.perf_counter() - t0:.1f} s incl. compile)")
    sys.stdout.flush()
  cpu = {name: [] for name in steps}
  def recorded(name, timed_step):
    return lambda: cpu[name].append(timed_step())
  timed = {name: recorded(name, _timed(step)) for name, step in steps.items()}
  wall = common.interleaved(timed, rounds=args.rounds, steps_per_round=args.steps_per_round)
  base = names[0]
  results = {}
  print(f"\n{'variant':>16} {'wall median':>12} {'IQR':>8} {'cpu median':>11} {'vs ' + base:>10}")
  for name in steps:
    w, c = common.summarize(wall[name]), common.summarize(cpu[name])
    results[name] = {"wall": w, "cpu": c}
  for name in steps:
    w, c = results[name]["wall"], results[name]["cpu"]
    rel = results[base]["wall"]["median_s"] / w["median_s"]
    print(f"{name:>16} {w['median_s'] * 1e3:10.1f}ms {w['iqr_s'] * 1e3:6.1f}ms "
          f"{c['median_s'] * 1e3:9.1f}ms {rel:9.2f}x")
  common.write_json(args.out, {"benchmark": f"profile_variants_{args.what}", "machine": info,
                               "results": results})


if __name__ == "__main__":
  main()
