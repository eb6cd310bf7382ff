"""T5 v1.0 / v1.1 against Hugging Face ``T5ForConditionalGeneration`` with seeded random weights.

No T5 weights are reachable offline, so the reference is HF's implementation with
small random weights (``torch.manual_seed``); norms and the relative bias are
randomized too so that every imported tensor matters.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_mini import decoding
from flaxformer_mini.models import Transformer, seq2seq_decoding_fns
from flaxformer_mini.variants import t5

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "transformers")),
    reason="the HF T5 reference needs torch and transformers")

VOCAB, MAX_DECODE = 64, 8


def _hf_t5(version: str):
  import torch
  import transformers
  torch.manual_seed({"1.0": 0, "1.1": 1}[version])
  hf_config = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
      num_decoder_layers=2, relative_attention_num_buckets=32,
      relative_attention_max_distance=128, dropout_rate=0.0,
      feed_forward_proj="relu" if version == "1.0" else "gated-gelu",
      tie_word_embeddings=version == "1.0", pad_token_id=0, eos_token_id=1,
      decoder_start_token_id=0)
  model = transformers.T5ForConditionalGeneration(hf_config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p))
  return model


@pytest.fixture(scope="module", params=["1.0", "1.1"])
def t5_pair(request):
  hf = _hf_t5(request.param)
  cfg, params = t5.load_hf_t5(hf.state_dict(), hf.config)
  return request.param, hf, cfg, jax.tree_util.tree_map(jnp.asarray, params)


def _batch():
  rng = np.random.default_rng(0)
  input_ids = rng.integers(2, VOCAB, size=(3, 9))
  attention_mask = np.ones_like(input_ids)
  attention_mask[1, 6:] = 0             # padded rows
  attention_mask[2, 3:] = 0
  input_ids = np.where(attention_mask == 1, input_ids, 0)
  decoder_input_ids = np.concatenate(   # decoder_start_token_id = pad = 0 first
      [np.zeros((3, 1), np.int64), rng.integers(1, VOCAB, size=(3, 6))], axis=1)
  return input_ids, attention_mask, decoder_input_ids


def test_config_follows_version(t5_pair):
  version, _, cfg, _ = t5_pair
  assert cfg == t5.t5_config(version, vocab_size=VOCAB, d_model=32, num_heads=4, head_dim=8,
                             d_ff=48, num_encoder_layers=2, dropout_rate=0.0)
  assert cfg.num_heads * cfg.head_size == 32 and cfg.attention_scale == 1.0


def test_t5_small_config_is_t5_config():
  from configs import t5_small
  from flaxformer_mini import TransformerConfig
  assert TransformerConfig.from_dict(t5_small.get_config().model) == t5.t5_config(
      "1.1", vocab_size=8000, d_model=256, num_heads=4, head_dim=64, d_ff=640,
      num_encoder_layers=3, max_len=128)


@pytest.mark.slow
def test_logits_match_hf(t5_pair):
  import torch
  _, hf, cfg, params = t5_pair
  input_ids, attention_mask, decoder_input_ids = _batch()
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
             decoder_input_ids=torch.tensor(decoder_input_ids)).logits.numpy()
  ours = Transformer(cfg).apply(
      {"params": params}, jnp.asarray(input_ids, jnp.int32),
      jnp.asarray(decoder_input_ids, jnp.int32),
      inputs_segmentation=jnp.asarray(attention_mask, jnp.int32),
      targets_segmentation=jnp.ones(decoder_input_ids.shape, jnp.int32))
  diff = np.abs(np.asarray(ours) - ref).max()
  print(f"T5 max |logits - HF| = {diff:.2e}")
  assert diff <= 1e-4


@pytest.mark.slow
def test_cached_decoding_equals_full_pass_and_hf_generate(t5_pair):
  import torch
  _, hf, cfg, params = t5_pair
  model = Transformer(cfg)
  input_ids, attention_mask, _ = _batch()
  inputs = jnp.asarray(input_ids, jnp.int32)
  batch = inputs.shape[0]

  # Greedy search with the KV cache == HF generate (greedy).
  @jax.jit
  def generate(params, inputs):
    fn, cache = seq2seq_decoding_fns(model, params, inputs, MAX_DECODE)
    return decoding.greedy_search(fn, cache, batch_size=batch, max_decode_len=MAX_DECODE,
                                  bos_id=0, eos_id=1, pad_id=0)

  out = np.asarray(generate(params, inputs))
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(input_ids),
                      attention_mask=torch.tensor(attention_mask), do_sample=False,
                      num_beams=1, max_new_tokens=MAX_DECODE, min_length=0).numpy()[:, 1:]
  ref = np.pad(ref, ((0, 0), (0, MAX_DECODE - ref.shape[1])))   # HF pads finished rows with 0
  np.testing.assert_array_equal(out, ref)

  # Step-by-step cached logits == one teacher-forced full pass on the same tokens.
  fn, cache = seq2seq_decoding_fns(model, params, inputs, MAX_DECODE)
  step = jax.jit(fn)
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), out[:, :-1]], axis=1)
  full = model.apply({"params": params}, inputs, jnp.asarray(dec_in),
                     inputs_segmentation=jnp.asarray(attention_mask, jnp.int32),
                     targets_segmentation=jnp.ones(dec_in.shape, jnp.int32))
  for t in range(MAX_DECODE):
    logits, cache = step(jnp.asarray(dec_in[:, t:t + 1]), cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, t]), atol=1e-5, rtol=0)


def test_importer_errors_name_the_tensors(t5_pair):
  _, hf, _, _ = t5_pair
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  broken = dict(sd)
  del broken["decoder.block.1.layer.1.EncDecAttention.k.weight"]
  broken["encoder.block.0.layer.0.SelfAttention.q.bias"] = np.zeros(32, np.float32)
  with pytest.raises(ValueError, match=r"missing tensors \(1\): decoder\.block\.1\.layer\.1\."
                     r"EncDecAttention\.k\.weight.*unexpected tensors \(1\): "
                     r"encoder\.block\.0\.layer\.0\.SelfAttention\.q\.bias"):
    t5.load_hf_t5(broken, hf.config)
  broken = dict(sd)
  broken["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = np.zeros(
      (16, 4), np.float32)
  with pytest.raises(ValueError, match=r"relative_attention_bias\.weight \(16, 4\) -> "
                     r"encoder/relative_bias/rel_embedding: expected \(32, 4\)"):
    t5.load_hf_t5(broken, hf.config)
  with pytest.raises(ValueError, match="feed_forward_proj='gated-swish'"):
    t5.load_hf_t5(sd, dict(hf.config.to_dict(), feed_forward_proj="gated-swish"))
