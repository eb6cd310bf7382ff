"""Training throughput of flaxformer_mini vs Hugging Face Flax Marian vs torch.nn.Transformer.

One fixed model and batch (`MODEL`, `BATCH`), the same random token batch for all
three systems, Adam, dropout on. Each system's step is one synchronised call
(forward, backward, Adam update); systems are timed round by round, interleaved.

Reported per system: step time (median, IQR), target tokens/s = batch * tgt_len /
median step, and model-FLOPs utilisation (MFU) = `training_flops_per_step` / median
step / measured float32 matmul peak. Finally ours / faster peer.

    python benchmarks/train_throughput.py                 # full run (~5 min quiet)
    python benchmarks/train_throughput.py --quick         # smoke run (< 1 min)
    python benchmarks/train_throughput.py --systems ours --out /tmp/train.json
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

# The fixed benchmark configuration (do not change without renaming the benchmark).
MODEL = dict(vocab_size=8192, d_model=256, num_heads=4, d_ff=1024,
             num_encoder_layers=3, num_decoder_layers=3, dropout_rate=0.1)
BATCH = dict(batch_size=32, src_len=64, tgt_len=64)
ADAM = dict(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8)  # optax / torch defaults
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


# ----------------------------------------------------------------------------- FLOPs


def training_flops_per_step(*, batch_size, src_len, tgt_len, vocab_size, d_model, d_ff,
                            num_encoder_layers, num_decoder_layers, **_) -> dict:
  """Analytic training FLOPs of one step (forward + backward), multiply-add = 2 FLOPs.

  Matmul-parameter FLOPs (the "6 N" rule: forward 2 per parameter per token,
  backward 4):
    encoder, per source token:  L_enc * (4 d^2 [q,k,v,o] + 2 d d_ff [ffn])
    cross-attn k,v, per source token:  L_dec * 2 d^2
    decoder, per target token:  L_dec * (4 d^2 [self q,k,v,o] + 2 d^2 [cross q,o] + 2 d d_ff)
    output projection (tied), per target token:  d V
    train_matmul = 6 * B * (S * (enc + cross_kv) + T * (dec + d V))
  Attention score and value FLOPs (q.k^T and w.v, both 2 * len_q * len_k * d
  forward, full square matrices even where causal-masked, as in PaLM's MFU):
    attn_fwd = 4 * B * d * (L_enc * S^2 + L_dec * T^2 + L_dec * T * S)
    train_attn = 3 * attn_fwd
  Not counted: embedding lookups, norms, softmax, dropout, loss, the optimizer.
  """
  b, s, t, d, f, v = batch_size, src_len, tgt_len, d_model, d_ff, vocab_size
  le, ld = num_encoder_layers, num_decoder_layers
  enc = le * (4 * d * d + 2 * d * f)
  cross_kv = ld * 2 * d * d
  dec = ld * (4 * d * d + 2 * d * d + 2 * d * f)
  out = d * v
  matmul = 6 * b * (s * (enc + cross_kv) + t * (dec + out))
  attn = 3 * 4 * b * d * (le * s * s + ld * t * t + ld * t * s)
  return {"matmul_params_per_token_pair": enc + cross_kv + dec + out,
          "train_matmul_flops": matmul, "train_attention_flops": attn,
          "train_flops": matmul + attn}


# ----------------------------------------------------------------------------- data


def make_batch(seed: int = 0) -> dict:
  """Random token batch with right padding (lengths in [3/4 len, len]).

  targets end in EOS, decoder_inputs = [BOS] + targets[:-1]; loss weights are
  ``targets != PAD_ID``. Ids are drawn from [3, vocab).
  """
  rng = np.random.RandomState(seed)
  b, s, t, v = BATCH["batch_size"], BATCH["src_len"], BATCH["tgt_len"], MODEL["vocab_size"]

  def padded(length, n):
    ids = rng.randint(3, v, size=(b, length)).astype(np.int32)
    lens = rng.randint(3 * length // 4, length + 1, size=(b,))
    for i, n_i in enumerate(lens):
      ids[i, n_i - 1] = EOS_ID
      ids[i, n_i:] = PAD_ID
    return ids

  inputs = padded(s, b)
  targets = padded(t, b)
  decoder_inputs = np.concatenate([np.full((b, 1), BOS_ID, np.int32), targets[:, :-1]], 1)
  return {"inputs": inputs, "targets": targets, "decoder_inputs": decoder_inputs}


# ----------------------------------------------------------------------------- ours


def _block(tree):
  import jax
  return jax.block_until_ready(tree)


def make_ours(batch: dict, impl: str = "auto", batch_chunks: int = 4, dtype: str = "float32"):
  """flaxformer_mini `Transformer`; returns (step_fn, description).

  dtype: the compute dtype ('bfloat16' = mixed precision: float32 params and optimizer
  state, bfloat16 matmuls and activations, float32 softmax / norm statistics / loss).

  impl='library': `flaxformer_mini.training` (make_optimizer + make_step_fns: jitted
  train_step with the state donated) and its `cross_entropy_sums` loss.
  impl='fallback': plain optax.adam + jax.jit value_and_grad step built here.
  impl='auto': library if `flaxformer_mini.training` imports, else fallback.
  batch_chunks: the library step's `batch_chunks`, default 4 (chunks of 8 rows, as in
  configs/default.py): the same gradient, a faster step on CPU (see training.chunked_loss).
  """
  import jax
  import jax.numpy as jnp

  from flaxformer_mini import Transformer, TransformerConfig

  cfg = TransformerConfig(**MODEL, dtype=getattr(jnp, dtype))
  model = Transformer(cfg)
  jbatch = {k: jnp.asarray(x) for k, x in batch.items()}
  params = jax.jit(model.init)(jax.random.key(0), jbatch["inputs"][:1],
                               jbatch["decoder_inputs"][:1])["params"]

  training = None
  if impl in ("auto", "library"):
    try:
      from flaxformer_mini import training
      training.make_step_fns  # noqa: B018 - fail here if the API is not there yet
    except (ImportError, AttributeError) as e:
      if impl == "library":
        raise
      print(f"  [ours] flaxformer_mini.training unavailable ({e}); using the fallback step")
      training = None

  if training is not None:
    import ml_collections
    opt = ml_collections.ConfigDict(dict(
        schedule="constant", learning_rate=ADAM["learning_rate"], lr_factor=1.0,
        warmup_steps=1, b1=ADAM["b1"], b2=ADAM["b2"], eps=ADAM["eps"], clip_norm=0.0,
        weight_decay=0.0, accum_steps=1))
    config = ml_collections.ConfigDict(dict(optimizer=opt, num_train_steps=10 ** 6))
    tx, _ = training.make_optimizer(config, cfg.d_model)

    def loss_fn(params, batch, rng, deterministic):
      logits = model.apply({"params": params}, batch["inputs"], batch["decoder_inputs"],
                           deterministic=deterministic, rngs={"dropout": rng})
      sums = training.cross_entropy_sums(logits, batch["targets"],
                                         batch["targets"] != PAD_ID, 0.0)
      return sums["loss"], sums

    fns = training.make_step_fns(loss_fn, tx, "jit", batch_chunks=batch_chunks)
    holder = {"state": fns.put_state(training.TrainState.create(params, tx,
                                                                jax.random.key(1)))}

    def step():
      holder["state"], metrics = fns.train(holder["state"], jbatch)
      _block((holder["state"], metrics))

    return step, ("library: training.make_optimizer (constant lr, no clipping) + "
                  f"make_step_fns('jit', batch_chunks={batch_chunks}) + cross_entropy_sums, "
                  f"compute {dtype}")

  def logits_fn(p, batch, step_rng):
    return model.apply({"params": p}, batch["inputs"], batch["decoder_inputs"],
                       deterministic=False, rngs={"dropout": step_rng})

  step = _adam_step_runner(logits_fn, params, jbatch, seed=1)
  return step, "fallback: optax.adam + jax.jit(value_and_grad) step, params/opt_state donated"


def _adam_step_runner(logits_fn, params, jbatch, seed):
  """A timed-step closure: jitted value_and_grad of padding-masked integer-label CE +
  optax.adam, params/opt_state donated (as HF's run_translation_flax).

  logits_fn(params, batch, dropout_rng) -> [batch, tgt_len, vocab] logits.
  """
  import jax
  import jax.numpy as jnp
  import optax

  tx = optax.adam(ADAM["learning_rate"], b1=ADAM["b1"], b2=ADAM["b2"], eps=ADAM["eps"])

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch, dropout_rng):
    def loss_fn(p):
      logits = logits_fn(p, batch, dropout_rng)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
      w = (batch["targets"] != PAD_ID).astype(jnp.float32)
      return jnp.sum(ce * w) / jnp.sum(w)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  holder = {"params": params, "opt_state": tx.init(params), "i": 0}
  base_rng = jax.random.key(seed)

  def step():
    holder["i"] += 1
    holder["params"], holder["opt_state"], loss = train_step(
        holder["params"], holder["opt_state"], jbatch, jax.random.fold_in(base_rng, holder["i"]))
    _block(loss)

  return step


# ----------------------------------------------------------------------------- floor


def make_floor(batch: dict, batch_chunks: int = 4):
  """A floor for a float32 train step of `MODEL` under XLA on this machine: the step's
  matmuls and the least else that keeps them alive, chunked like ours.

  Forward per chunk of ``batch_size / batch_chunks`` rows: embedding gather, per encoder
  layer the q, k, v projections ([d, heads, head_dim] kernels), the attention score and
  value dots (q.k^T, s.v, no softmax, mask or scale), the output projection, FFN wi ->
  relu -> wo, residual adds; per decoder layer the same plus cross-attention (q from the
  decoder, k, v from the encoder); then the tied logits x @ E^T and a loss 1e-6 * sum
  (logits^2) (its gradient is one elementwise pass). Backward by jax.grad; optax.adam;
  params and optimizer state donated. No biases, norms, softmax, masks, dropout or
  cross-entropy: a real step does all of these besides. Same parameter shapes and the
  same FLOPs as `training_flops_per_step` counts.
  """
  import jax
  import jax.numpy as jnp
  import optax

  d, f, v = MODEL["d_model"], MODEL["d_ff"], MODEL["vocab_size"]
  heads = MODEL["num_heads"]
  rng = np.random.default_rng(0)
  w = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02)
  attn = lambda: {k: w(d, heads, d // heads) for k in ("q", "k", "v")} | {
      "o": w(heads, d // heads, d)}
  params = {"enc": [{"self": attn(), "wi": w(d, f), "wo": w(f, d)}
                    for _ in range(MODEL["num_encoder_layers"])],
            "dec": [{"self": attn(), "cross": attn(), "wi": w(d, f), "wo": w(f, d)}
                    for _ in range(MODEL["num_decoder_layers"])],
            "embedding": w(v, d)}

  def attention(p, x, kv):
    q = jnp.einsum("bld,dhk->blhk", x, p["q"])
    k = jnp.einsum("bld,dhk->blhk", kv, p["k"])
    val = jnp.einsum("bld,dhk->blhk", kv, p["v"])
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k)
    return jnp.einsum("bqhk,hkd->bqd", jnp.einsum("bhqs,bshk->bqhk", scores, val), p["o"])

  def chunk_loss(p, inputs, decoder_inputs):
    x = p["embedding"][inputs]
    for layer in p["enc"]:
      x = x + attention(layer["self"], x, x)
      x = x + jax.nn.relu(x @ layer["wi"]) @ layer["wo"]
    y = p["embedding"][decoder_inputs]
    for layer in p["dec"]:
      y = y + attention(layer["self"], y, y)
      y = y + attention(layer["cross"], y, x)
      y = y + jax.nn.relu(y @ layer["wi"]) @ layer["wo"]
    logits = jnp.einsum("bld,vd->blv", y, p["embedding"])
    return 1e-6 * jnp.sum(logits * logits)

  def loss(p, inputs, decoder_inputs):
    rows = inputs.shape[0] // batch_chunks
    return sum(chunk_loss(p, inputs[i * rows:(i + 1) * rows],
                          decoder_inputs[i * rows:(i + 1) * rows])
               for i in range(batch_chunks))

  tx = optax.adam(ADAM["learning_rate"], b1=ADAM["b1"], b2=ADAM["b2"], eps=ADAM["eps"])

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(p, opt_state, inputs, decoder_inputs):
    grads = jax.grad(loss)(p, inputs, decoder_inputs)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  holder = {"params": params, "opt_state": tx.init(params)}
  inputs, decoder_inputs = jnp.asarray(batch["inputs"]), jnp.asarray(batch["decoder_inputs"])

  def step():
    holder["params"], holder["opt_state"] = train_step(holder["params"], holder["opt_state"],
                                                       inputs, decoder_inputs)
    _block(holder["params"])

  return step, (f"matmuls only (see make_floor), {batch_chunks} chunks, optax.adam, "
                "params/opt_state donated")


# ----------------------------------------------------------------------------- HF Flax Marian


def marian_config():
  """A `MarianConfig` with `MODEL`'s sizes (post-LN, ReLU, tied/shared embeddings)."""
  from transformers import MarianConfig
  m = MODEL
  return MarianConfig(
      vocab_size=m["vocab_size"], decoder_vocab_size=m["vocab_size"], d_model=m["d_model"],
      encoder_layers=m["num_encoder_layers"], decoder_layers=m["num_decoder_layers"],
      encoder_attention_heads=m["num_heads"], decoder_attention_heads=m["num_heads"],
      encoder_ffn_dim=m["d_ff"], decoder_ffn_dim=m["d_ff"], activation_function="relu",
      dropout=m["dropout_rate"], attention_dropout=0.0, activation_dropout=m["dropout_rate"],
      max_position_embeddings=256, scale_embedding=True, share_encoder_decoder_embeddings=True,
      tie_word_embeddings=True, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
      decoder_start_token_id=BOS_ID, forced_eos_token_id=None)


def make_hf(batch: dict):
  """HF `FlaxMarianMTModel`, random init; jitted value_and_grad + optax.adam, dropout on."""
  import jax.numpy as jnp
  from transformers import FlaxMarianMTModel

  model = FlaxMarianMTModel(marian_config(), seed=0, dtype=jnp.float32)
  jbatch = {k: jnp.asarray(x) for k, x in batch.items()}

  def logits_fn(p, batch, dropout_rng):
    return model(input_ids=batch["inputs"], attention_mask=batch["inputs"] != PAD_ID,
                 decoder_input_ids=batch["decoder_inputs"],
                 decoder_attention_mask=batch["decoder_inputs"] != PAD_ID,
                 params=p, dropout_rng=dropout_rng, train=True).logits

  step = _adam_step_runner(logits_fn, model.params, jbatch, seed=2)
  return step, "FlaxMarianMTModel + jax.jit(value_and_grad) + optax.adam, params/opt_state donated"


# ----------------------------------------------------------------------------- PyTorch


def make_torch(batch: dict, threads: int):
  """torch.nn.Transformer (post-LN, ReLU) + tied embedding/output projection, Adam."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  m = MODEL

  class Seq2Seq(nn.Module):
    def __init__(self):
      super().__init__()
      d = m["d_model"]
      self.embed = nn.Embedding(m["vocab_size"], d, padding_idx=PAD_ID)
      nn.init.normal_(self.embed.weight, std=d ** -0.5)
      pos = np.arange(256)[:, None] / np.power(10000.0, np.arange(0, d, 2)[None, :] / d)
      table = np.concatenate([np.sin(pos), np.cos(pos)], 1).astype(np.float32)
      self.register_buffer("positions", torch.from_numpy(table))
      self.drop = nn.Dropout(m["dropout_rate"])
      self.transformer = nn.Transformer(
          d_model=d, nhead=m["num_heads"], num_encoder_layers=m["num_encoder_layers"],
          num_decoder_layers=m["num_decoder_layers"], dim_feedforward=m["d_ff"],
          dropout=m["dropout_rate"], batch_first=True)

    def _embed(self, ids):
      x = self.embed(ids) * math.sqrt(self.embed.embedding_dim)
      return self.drop(x + self.positions[: ids.shape[1]])

    def forward(self, src, tgt_in):
      t = tgt_in.shape[1]
      causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
      src_pad = src == PAD_ID
      h = self.transformer(self._embed(src), self._embed(tgt_in), tgt_mask=causal,
                           src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_in == PAD_ID,
                           memory_key_padding_mask=src_pad, tgt_is_causal=True)
      return F.linear(h, self.embed.weight)

  model = Seq2Seq().train()
  opt = torch.optim.Adam(model.parameters(), lr=ADAM["learning_rate"],
                         betas=(ADAM["b1"], ADAM["b2"]), eps=ADAM["eps"])
  tb = {k: torch.from_numpy(x).long() for k, x in batch.items()}

  def step():
    opt.zero_grad(set_to_none=True)
    logits = model(tb["inputs"], tb["decoder_inputs"])
    loss = F.cross_entropy(logits.reshape(-1, m["vocab_size"]), tb["targets"].reshape(-1),
                           ignore_index=PAD_ID)
    loss.backward()
    opt.step()

  return step, (f"torch.nn.Transformer + nn.Embedding (tied output), torch.optim.Adam, "
                f"set_num_threads({threads})")


# ----------------------------------------------------------------------------- main


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="1 warmup + 1x3 timed steps (smoke run)")
  p.add_argument("--systems", default="ours,hf,torch,floor",
                 help="comma-separated subset of ours,ours_bf16,hf,torch,floor (ours_bf16: "
                      "bfloat16 compute; floor: matmuls only, see make_floor)")
  p.add_argument("--ours", default="auto", choices=("auto", "library", "fallback"),
                 help="our train step: the library's training.py or the plain fallback")
  p.add_argument("--batch-chunks", type=int, default=4,
                 help="our library step's batch_chunks (1 = the whole batch in one piece)")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps-per-round", type=int, default=6)
  p.add_argument("--torch-threads", type=int, default=2)
  p.add_argument("--out", default="", help="write the JSON result here")
  p.add_argument("--no-huge-pages", action="store_true",
                 help="do not re-execute with glibc.malloc.hugetlb=1 (see common.huge_pages)")
  args = p.parse_args(argv)
  common.huge_pages(not args.no_huge_pages)
  if args.quick:
    args.warmup, args.rounds, args.steps_per_round = 1, 1, 3
  systems = [s.strip() for s in args.systems.split(",") if s.strip()]
  unknown = set(systems) - {"ours", "ours_bf16", "hf", "torch", "floor"}
  if unknown:
    p.error(f"--systems: unknown {sorted(unknown)}; expected a subset of "
            "ours,ours_bf16,hf,torch,floor")

  info = common.machine_info()
  flops = training_flops_per_step(**MODEL, **BATCH)
  config = {"model": MODEL, "batch": BATCH, "adam": ADAM, "dtype": "float32",
            "warmup": args.warmup, "rounds": args.rounds,
            "steps_per_round": args.steps_per_round, "torch_threads": args.torch_threads}
  common.print_header("train_throughput", info, config)
  print(f"flops:    {flops['train_flops'] / 1e9:.2f} GFLOP/step "
        f"(matmul {flops['train_matmul_flops'] / 1e9:.2f} + attention "
        f"{flops['train_attention_flops'] / 1e9:.2f})")

  peak = {"jax": common.jax_matmul_peak(repeats=5 if args.quick else 20)}
  if "torch" in systems:
    import torch
    torch.set_num_threads(args.torch_threads)
    peak["torch"] = common.torch_matmul_peak(repeats=5 if args.quick else 20)
  peak_flops = max(v["flops_per_s"] for v in peak.values())
  print("peak:     " + ", ".join(f"{k} {v['flops_per_s'] / 1e9:.1f} GFLOP/s"
                                  for k, v in peak.items())
        + f" (float32 1024^3 matmul, best call); MFU uses {peak_flops / 1e9:.1f}")

  batch = make_batch()
  builders = {"ours": lambda: make_ours(batch, args.ours, args.batch_chunks),
              "ours_bf16": lambda: make_ours(batch, "library", args.batch_chunks, "bfloat16"),
              "hf": lambda: make_hf(batch),
              "torch": lambda: make_torch(batch, args.torch_threads),
              "floor": lambda: make_floor(batch, args.batch_chunks)}
  steps, descriptions, compile_s = {}, {}, {}
  for name in systems:
    t0 = time.perf_counter()
    steps[name], descriptions[name] = builders[name]()
    steps[name]()  # compile (JAX) / first allocation (torch)
    compile_s[name] = time.perf_counter() - t0
    for _ in range(args.warmup):
      steps[name]()
    print(f"  built {name}: {descriptions[name]} (build + first step {compile_s[name]:.1f} s)")
    sys.stdout.flush()

  times = common.interleaved(steps, rounds=args.rounds, steps_per_round=args.steps_per_round)
  tokens = BATCH["batch_size"] * BATCH["tgt_len"]
  results = {}
  print(f"\n{'system':>8} {'step median':>12} {'IQR':>9} {'tgt tok/s':>10} "
        f"{'tok/s IQR range':>17} {'MFU':>6}")
  for name in systems:
    s = common.summarize(times[name])
    r = dict(s, description=descriptions[name], build_and_first_step_s=compile_s[name],
             tokens_per_s=tokens / s["median_s"],
             tokens_per_s_q1_q3=[tokens / s["q3_s"], tokens / s["q1_s"]],
             mfu=flops["train_flops"] / s["median_s"] / peak_flops, times_s=times[name])
    results[name] = r
    print(f"{name:>8} {s['median_s'] * 1e3:10.1f}ms {s['iqr_s'] * 1e3:7.1f}ms "
          f"{r['tokens_per_s']:10.0f} {r['tokens_per_s_q1_q3'][0]:8.0f}-"
          f"{r['tokens_per_s_q1_q3'][1]:<8.0f} {r['mfu'] * 100:5.1f}%")
  summary = {}
  peers = [n for n in ("hf", "torch") if n in results]
  if "ours" in results and peers:
    best = max(peers, key=lambda n: results[n]["tokens_per_s"])
    summary = {"faster_peer": best,
               "ours_over_faster_peer": results["ours"]["tokens_per_s"]
               / results[best]["tokens_per_s"]}
    print(f"\nours / faster peer ({best}): {summary['ours_over_faster_peer']:.2f}x "
          f"(target >= 1.3x)")
    if "floor" in results:
      summary["floor_over_faster_peer"] = (results["floor"]["tokens_per_s"]
                                           / results[best]["tokens_per_s"])
      summary["ours_over_floor"] = (results["ours"]["tokens_per_s"]
                                    / results["floor"]["tokens_per_s"])
      print(f"floor / faster peer ({best}): {summary['floor_over_faster_peer']:.2f}x; "
            f"ours / floor: {summary['ours_over_floor']:.2f}x")
  common.write_json(args.out, {"benchmark": "train_throughput", "machine": info,
                               "config": config, "flops": flops, "peak": peak,
                               "peak_flops_used": peak_flops, "results": results,
                               "summary": summary})


if __name__ == "__main__":
  main()
