"""Tests for flaxformer_mini.models (and the layers they compose).

* Parity: the post-LN (and pre-LN) encoder-decoder against PyTorch's
  `torch.nn.Transformer` with the same weights, masks and tied embeddings.
* Invariances: causality; source padding (segmentation and pad-id paths);
  packed rows == each example alone.
* Equivalence: cached incremental decoding == the full forward pass for every
  position kind, GQA, fused q/k/v, pre/post LN, RMSNorm, gated FFN; jit / vmap /
  pmap == the plain call.
* Golden parameter tree (tests/golden/transformer_params.json).
* Errors that name the bad value.

Token ids: 0 = pad, 3 = BOS, everything else ordinary. Models are tiny
(d_model 16, 2 + 2 layers) and every compiled function is built once per module.
"""

import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_mini import models
from flaxformer_mini.config import TransformerConfig

PAD, BOS, VOCAB = 0, 3, 23
BASE = TransformerConfig(vocab_size=VOCAB, d_model=16, num_heads=4, d_ff=32,
                         num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
                         max_len=16)
GOLDEN = pathlib.Path(__file__).parent / "golden" / "transformer_params.json"


def random_params(model, *args, seed=0, **kwargs):
  """Random, non-trivial params from the init *shapes* only (no init compile).

  Weights N(0, 0.2^2) keep activations O(1) at d_model 16; norm scales 1 + N(0, 0.1^2)
  and biases N(0, 0.1^2), so a mis-mapped bias or scale cannot hide behind zeros/ones.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs)["params"]
  r = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    z = r.standard_normal(leaf.shape)
    if name.endswith("['scale']"):
      z = 1.0 + 0.1 * z
    elif name.endswith("['bias']"):
      z = 0.1 * z
    else:
      z = 0.2 * z
    return jnp.asarray(z, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def tokens(r, shape, lengths=None, vocab=VOCAB):
  """Random ordinary ids in [4, vocab) of ``shape``; row i padded after lengths[i]."""
  ids = r.integers(4, vocab, size=shape).astype(np.int32)
  if lengths is not None:
    ids[np.arange(shape[1])[None, :] >= np.asarray(lengths)[:, None]] = PAD
  return ids


# ---------------------------------------------------------------------------
# Parity with torch.nn.Transformer.
# ---------------------------------------------------------------------------


def np_sinusoidal(length, d):
  pos = np.arange(length)[:, None]
  i = np.arange(d)[None, :]
  angle = pos / 10000.0 ** ((i - i % 2) / d)
  return np.where(i % 2 == 0, np.sin(angle), np.cos(angle))


def _copy_to_torch(torch, tmodel, params, d):
  """Copies our param tree into a torch.nn.Transformer (weights are [out, in] there)."""
  t = lambda a: torch.tensor(np.ascontiguousarray(np.asarray(a, np.float32)))

  def mha(m, p):
    proj = lambda n: np.asarray(p[n]["kernel"]).reshape(d, -1).T       # [d, h, hd] -> [h*hd, d]
    m.in_proj_weight.copy_(t(np.concatenate([proj("query"), proj("key"), proj("value")], 0)))
    m.in_proj_bias.copy_(t(np.concatenate([np.asarray(p[n]["bias"]).reshape(-1)
                                           for n in ("query", "key", "value")])))
    m.out_proj.weight.copy_(t(np.asarray(p["out"]["kernel"]).reshape(-1, d).T))  # [h, hd, d]
    m.out_proj.bias.copy_(t(p["out"]["bias"]))

  def norm(m, p):
    m.weight.copy_(t(p["scale"]))
    m.bias.copy_(t(p["bias"]))

  def ffn(layer, p):
    layer.linear1.weight.copy_(t(np.asarray(p["wi"]["kernel"]).T))
    layer.linear1.bias.copy_(t(p["wi"]["bias"]))
    layer.linear2.weight.copy_(t(np.asarray(p["wo"]["kernel"]).T))
    layer.linear2.bias.copy_(t(p["wo"]["bias"]))

  for i, layer in enumerate(tmodel.encoder.layers):
    p = params["encoder"][f"layer_{i}"]
    mha(layer.self_attn, p["self_attention"])
    norm(layer.norm1, p["norm_attention"])
    norm(layer.norm2, p["norm_ffn"])
    ffn(layer, p["ffn"])
  for i, layer in enumerate(tmodel.decoder.layers):
    p = params["decoder"][f"layer_{i}"]
    mha(layer.self_attn, p["self_attention"])
    mha(layer.multihead_attn, p["cross_attention"])
    norm(layer.norm1, p["norm_self_attention"])
    norm(layer.norm2, p["norm_cross_attention"])
    norm(layer.norm3, p["norm_ffn"])
    ffn(layer, p["ffn"])
  norm(tmodel.encoder.norm, params["encoder"]["final_norm"])
  norm(tmodel.decoder.norm, params["decoder"]["final_norm"])


@pytest.mark.filterwarnings("ignore:.*nested")   # torch's own notes on its fast path
@pytest.mark.parametrize("norm_placement", ["post", "pre"])
def test_matches_torch_nn_transformer(norm_placement):
  torch = pytest.importorskip("torch")
  cfg = BASE.replace(norm_placement=norm_placement, final_norm=True)
  model = models.Transformer(cfg)
  r = np.random.default_rng(10)
  src_len, tgt_len = [7, 4], [6, 5]
  src = tokens(r, (2, 7), src_len)
  tgt = tokens(r, (2, 6), tgt_len)
  tgt[:, 0] = BOS
  params = random_params(model, src, tgt, seed=11)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, src, tgt))

  d = cfg.d_model
  tmodel = torch.nn.Transformer(
      d_model=d, nhead=cfg.num_heads, num_encoder_layers=2, num_decoder_layers=2,
      dim_feedforward=cfg.d_ff, dropout=0.0, activation="relu", batch_first=True,
      norm_first=norm_placement == "pre", layer_norm_eps=cfg.norm_eps)
  emb = np.asarray(params["embedding"]["embedding"], np.float64)
  with torch.no_grad():
    _copy_to_torch(torch, tmodel, params, d)
    tmodel.eval()
    embed = lambda ids: torch.tensor(
        (emb[ids] * math.sqrt(d) + np_sinusoidal(ids.shape[1], d)).astype(np.float32))
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)  # True = blocked
    out = tmodel(embed(src), embed(tgt), tgt_mask=causal,
                 src_key_padding_mask=torch.tensor(src == PAD),
                 tgt_key_padding_mask=torch.tensor(tgt == PAD),
                 memory_key_padding_mask=torch.tensor(src == PAD))
    theirs = out.numpy().astype(np.float64) @ emb.T
  real = tgt != PAD   # torch's padded query rows attend elsewhere; compare real positions
  # Two float32 implementations of 4 layers on O(1) logits: max abs diff 1e-4.
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
  assert np.abs(ours[real]).max() > 0.1     # the comparison is not between near-zeros


# ---------------------------------------------------------------------------
# Invariances.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base():
  """The post-LN base model, its params and one jitted apply shared by the tests below."""
  model = models.Transformer(BASE)
  r = np.random.default_rng(20)
  src = tokens(r, (2, 7), [7, 5])
  tgt = tokens(r, (2, 6))
  tgt[:, 0] = BOS
  params = random_params(model, src, tgt, seed=21)
  apply = jax.jit(lambda p, s, t, **kw: model.apply({"params": p}, s, t, **kw))
  return model, params, apply, src, tgt


def test_causality_future_decoder_tokens_do_not_change_earlier_logits(base):
  _, params, apply, src, tgt = base
  changed = tgt.copy()
  changed[:, 3:] = (tgt[:, 3:] - 4 + 5) % (VOCAB - 4) + 4     # other ordinary ids
  a = np.asarray(apply(params, src, tgt))
  b = np.asarray(apply(params, src, changed))
  # Same program on identical prefixes: positions 0..2 agree to 1e-6.
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6, rtol=0)
  assert np.abs(a[:, 3:] - b[:, 3:]).max() > 1e-3           # later positions do see them


def test_padded_source_positions_are_ignored_with_segmentation(base):
  _, params, apply, src, tgt = base
  seg = (src != PAD).astype(np.int32)            # row 1 has 2 padded source positions
  assert not seg.all()
  noise = src.copy()
  noise[src == PAD] = 9                          # real-looking ids at the padded slots
  a = np.asarray(apply(params, src, tgt, inputs_segmentation=seg))
  b = np.asarray(apply(params, noise, tgt, inputs_segmentation=seg))
  np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  # Without the segmentation those ids are real tokens and do change row 1.
  c = np.asarray(apply(params, noise, tgt))
  assert np.abs(c[1] - a[1]).max() > 1e-3


def test_source_padding_length_does_not_change_logits(base):
  _, params, apply, src, tgt = base
  src12 = np.zeros((2, 12), np.int32)
  src12[:, :7] = src
  a = np.asarray(apply(params, src, tgt))
  b = np.asarray(apply(params, src12, tgt))
  # Extra masked keys change only the float32 summation order: 1e-5 absolute.
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


PACK_CONFIGS = {
    "sinusoidal": BASE,
    "relative": BASE.replace(position_kind="relative", norm_placement="pre"),
    "rotary": BASE.replace(position_kind="rotary", num_kv_heads=2),
}


@pytest.mark.parametrize("kind", list(PACK_CONFIGS))
def test_packed_equals_unpacked(kind):
  model = models.Transformer(PACK_CONFIGS[kind])
  r = np.random.default_rng(30)
  src_a, src_b = tokens(r, (3,)), tokens(r, (4,))
  tgt_a, tgt_b = tokens(r, (3,)), tokens(r, (2,))
  tgt_a[0] = tgt_b[0] = BOS

  def row(parts, length):
    ids, seg, pos = (np.zeros(length, np.int32) for _ in range(3))
    start = 0
    for s, part in enumerate(parts, 1):
      ids[start:start + len(part)] = part
      seg[start:start + len(part)] = s
      pos[start:start + len(part)] = np.arange(len(part))
      start += len(part)
    return ids[None], seg[None], pos[None]

  # Row 0: both examples packed. Rows 1, 2: each example alone (segment 1,
  # positions from 0) in a row of the same length, so one compiled call does all.
  src, src_seg, src_pos = (np.concatenate(a) for a in zip(
      row([src_a, src_b], 8), row([src_a], 8), row([src_b], 8)))
  tgt, tgt_seg, tgt_pos = (np.concatenate(a) for a in zip(
      row([tgt_a, tgt_b], 6), row([tgt_a], 6), row([tgt_b], 6)))
  params = random_params(model, src, tgt, seed=31)
  logits = np.asarray(jax.jit(model.apply)(
      {"params": params}, src, tgt, inputs_segmentation=src_seg, targets_segmentation=tgt_seg,
      inputs_positions=src_pos, targets_positions=tgt_pos))
  # Same math with other masked entries: 1e-5 absolute.
  np.testing.assert_allclose(logits[0, :3], logits[1, :3], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits[0, 3:5], logits[2, :2], atol=1e-5, rtol=0)
  # Sanity: the two examples' first logits differ (different sources), so a
  # leak across segments or a wrong position would show.
  assert np.abs(logits[1, 0] - logits[2, 0]).max() > 1e-3


# ---------------------------------------------------------------------------
# Cached incremental decoding == full forward pass.
# ---------------------------------------------------------------------------

SEQ2SEQ_CONFIGS = {
    "sinusoidal-post-layernorm": BASE,
    "learned-pre-rmsnorm-gqa-fused-swiglu": BASE.replace(
        position_kind="learned", norm_placement="pre", norm_kind="rmsnorm", num_kv_heads=2,
        fused_qkv=True, ffn_gated=True, ffn_activation="silu"),
    "relative-post-untied": BASE.replace(
        position_kind="relative", share_embeddings=False, tie_output=False,
        output_vocab_size=19),
    "rotary-pre-gqa-geglu": BASE.replace(
        position_kind="rotary", norm_placement="pre", num_kv_heads=1, ffn_gated=True,
        ffn_activation="gelu"),
}


def _teacher_forced(tokens_to_logits, cache, decoder_inputs):
  """Feeds decoder_inputs [batch, len] one step at a time -> logits [batch, len, vocab]."""
  def body(c, ids_t):
    logits, c = tokens_to_logits(ids_t[:, None], c)
    return c, logits
  _, logits = jax.lax.scan(body, cache, decoder_inputs.T)
  return logits.transpose(1, 0, 2)


@pytest.mark.parametrize("name", list(SEQ2SEQ_CONFIGS))
def test_seq2seq_cached_decoding_equals_full_forward(name):
  cfg = SEQ2SEQ_CONFIGS[name].replace(num_encoder_layers=1)   # the cache lives in the decoder
  model = models.Transformer(cfg)
  r = np.random.default_rng(40)
  src = tokens(r, (2, 7), [7, 4])
  tgt = tokens(r, (2, 6), vocab=cfg.out_vocab_size)   # decoder ids index the output vocab
  tgt[:, 0] = BOS
  params = random_params(model, src, tgt, seed=41)
  full = np.asarray(jax.jit(model.apply)({"params": params}, src, tgt))

  @jax.jit
  def cached(p, s, t):
    tokens_to_logits, cache = models.seq2seq_decoding_fns(model, p, s, max_decode_len=t.shape[1])
    return _teacher_forced(tokens_to_logits, cache, t)

  got = np.asarray(cached(params, src, tgt))
  assert got.shape == full.shape == (2, 6, cfg.out_vocab_size)
  # Same math over zero-padded, masked caches: 1e-5 absolute on O(1) logits.
  np.testing.assert_allclose(got, full, atol=1e-5, rtol=0)


def test_beam_search_with_static_encoder_cache_equals_reordering_everything():
  """Skipping the per-step beam reorder of encoder K/V (models.STATIC_CACHE_KEYS) changes
  nothing."""
  from flaxformer_mini import decoding
  cfg = SEQ2SEQ_CONFIGS["sinusoidal-post-layernorm"].replace(num_encoder_layers=1)
  model = models.Transformer(cfg)
  r = np.random.default_rng(7)
  src = tokens(r, (3, 7), [7, 4, 2])
  params = random_params(model, src, tokens(r, (3, 5)), seed=8)

  @jax.jit
  def run(p, s):
    out = []
    for keys in ((), models.STATIC_CACHE_KEYS):
      t2l, cache = models.seq2seq_decoding_fns(model, p, s, max_decode_len=6)
      out.append(decoding.beam_search(t2l, cache, batch_size=3, beam_size=3, max_decode_len=6,
                                      bos_id=BOS, eos_id=1, num_return=3,
                                      static_cache_keys=keys))
    return out

  (seq_a, score_a), (seq_b, score_b) = run(params, src)
  np.testing.assert_array_equal(np.asarray(seq_a), np.asarray(seq_b))
  np.testing.assert_allclose(np.asarray(score_a), np.asarray(score_b), atol=1e-6)


LM_CONFIGS = {
    "rotary-pre-rmsnorm-gqa-fused-swiglu": BASE.replace(
        position_kind="rotary", norm_placement="pre", norm_kind="rmsnorm", num_kv_heads=2,
        fused_qkv=True, ffn_gated=True, ffn_activation="silu"),
    "relative-post": BASE.replace(position_kind="relative"),
    "learned-post-gelu": BASE.replace(position_kind="learned", ffn_activation="gelu_tanh"),
}


@pytest.mark.parametrize("name", list(LM_CONFIGS))
def test_lm_cached_decoding_equals_full_forward(name):
  model = models.DecoderOnlyLM(LM_CONFIGS[name])
  r = np.random.default_rng(50)
  ids = tokens(r, (2, 7))
  params = random_params(model, ids, seed=51)
  full = np.asarray(jax.jit(model.apply)({"params": params}, ids))

  @jax.jit
  def cached(p, x):
    tokens_to_logits, cache = models.lm_decoding_fns(model, p, x.shape[0],
                                                     max_decode_len=x.shape[1])
    return _teacher_forced(tokens_to_logits, cache, x)

  # Same math over zero-padded, masked caches: 1e-5 absolute.
  np.testing.assert_allclose(np.asarray(cached(params, ids)), full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# Transformations: jit, vmap, pmap == the plain call.
# ---------------------------------------------------------------------------


def test_jit_vmap_pmap_match_plain_call():
  # One layer each: the plain (eager, op-by-op) call is the expensive part here.
  model = models.Transformer(BASE.replace(num_encoder_layers=1, num_decoder_layers=1))
  r = np.random.default_rng(60)
  src, tgt = tokens(r, (2, 5), [5, 3]), tokens(r, (2, 4), [4, 2])
  variables = {"params": random_params(model, src, tgt, seed=61)}
  plain = np.asarray(model.apply(variables, src, tgt))
  # Different XLA programs may fuse differently: 1e-5 absolute.
  tol = dict(atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(variables, src, tgt)), plain, **tol)

  # vmap over a leading axis of examples: [2 rows] -> [2, 1, length].
  per_example = jax.jit(jax.vmap(lambda s, t: model.apply(variables, s, t)))
  np.testing.assert_allclose(np.asarray(per_example(src[:, None], tgt[:, None]))[:, 0], plain,
                             **tol)

  # pmap over the local devices (1 unless XLA_FLAGS forced more before jax started).
  n = jax.local_device_count()
  stacked = lambda a: np.stack([a] * n)
  out = jax.pmap(lambda s, t: model.apply(variables, s, t))(stacked(src), stacked(tgt))
  for i in range(n):
    np.testing.assert_allclose(np.asarray(out[i]), plain, **tol)


# ---------------------------------------------------------------------------
# Golden parameter shapes.
# ---------------------------------------------------------------------------

GOLDEN_CONFIG = dict(vocab_size=VOCAB, d_model=16, num_heads=4, d_ff=32, num_encoder_layers=2,
                     num_decoder_layers=2, max_len=16, final_norm=True)


def live_param_shapes():
  model = models.Transformer(TransformerConfig(**GOLDEN_CONFIG))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 5), jnp.int32),
                          jnp.ones((1, 4), jnp.int32))["params"]
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {"/".join(k.key for k in path): list(leaf.shape) for path, leaf in flat}


def test_param_tree_matches_golden():
  """Renaming or reshaping a weight breaks checkpoints: it must be a deliberate change.

  To accept a deliberate change: FLAXFORMER_UPDATE_GOLDEN=1 pytest tests/test_models.py
  """
  live = live_param_shapes()
  if os.environ.get("FLAXFORMER_UPDATE_GOLDEN") == "1":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"config": GOLDEN_CONFIG, "params": live}, indent=1,
                                 sort_keys=True) + "\n")
  golden = json.loads(GOLDEN.read_text())
  assert golden["config"] == GOLDEN_CONFIG
  golden = golden["params"]
  missing = sorted(set(golden) - set(live))
  extra = sorted(set(live) - set(golden))
  reshaped = {k: (golden[k], live[k]) for k in set(golden) & set(live) if golden[k] != live[k]}
  assert not (missing or extra or reshaped), (
      f"param tree changed: missing {missing}, new {extra}, reshaped (golden, live) {reshaped}")


# ---------------------------------------------------------------------------
# Errors that name the bad value.
# ---------------------------------------------------------------------------


def test_error_d_model_not_divisible_by_heads():
  with pytest.raises(ValueError, match=r"d_model=30 is not divisible by num_heads=4"):
    BASE.replace(d_model=30)
  from flaxformer_mini.attention import MultiHeadAttention
  with pytest.raises(ValueError, match=r"d_model=30 is not divisible by num_heads=4"):
    jax.eval_shape(MultiHeadAttention(num_heads=4).init, jax.random.key(0), jnp.ones((1, 3, 30)))


def test_error_sequence_longer_than_max_len():
  model = models.Transformer(BASE)
  ok = jnp.ones((1, 4), jnp.int32)
  long = jnp.ones((1, BASE.max_len + 1), jnp.int32)
  with pytest.raises(ValueError, match=r"inputs length 17 exceeds max_len=16"):
    jax.eval_shape(model.init, jax.random.key(0), long, ok)
  with pytest.raises(ValueError, match=r"decoder_inputs length 17 exceeds max_len=16"):
    jax.eval_shape(model.init, jax.random.key(0), ok, long)
  with pytest.raises(ValueError, match=r"max_decode_len=17 exceeds the model's max_len=16"):
    models.lm_decoding_fns(models.DecoderOnlyLM(BASE), {}, 1, max_decode_len=17)


def test_error_float_token_ids_name_the_dtype():
  model = models.Transformer(BASE)
  with pytest.raises(TypeError, match=r"integer token ids.*float32"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.float32),
                   jnp.ones((1, 4), jnp.int32))
  with pytest.raises(TypeError, match=r"integer token ids.*float32"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                   jnp.ones((1, 4), jnp.float32))


def test_error_out_of_range_token_id_names_it(base):
  # Eager calls check id values (a bad id would otherwise embed as NaN); under jit the
  # values are unknown and the call goes through.
  model, params = base[0], base[1]
  src = jnp.ones((2, 5), jnp.int32)
  with pytest.raises(ValueError, match=rf"inputs\[1, 3\] = {BASE.vocab_size} is not a token "
                                       rf"id.*\[0, vocab_size={BASE.vocab_size}\)"):
    model.apply({"params": params}, src.at[1, 3].set(BASE.vocab_size), src)
  with pytest.raises(ValueError, match=r"decoder_inputs\[0, 0\] = -1 is not a token id"):
    model.apply({"params": params}, src, src.at[0, 0].set(-1))
  out = model.apply({"params": params}, src, src)  # valid ids pass the check
  assert out.shape == (2, 5, BASE.vocab_size) and np.isfinite(np.asarray(out)).all()


def test_error_unknown_config_key():
  with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['d_modle'\]"):
    TransformerConfig.from_dict({"d_modle": 16})
  # The valid path builds the same config (and converts dtype strings).
  cfg = TransformerConfig.from_dict({"d_model": 16, "num_heads": 4, "dtype": "bfloat16"})
  assert cfg.d_model == 16 and cfg.dtype == jnp.bfloat16


def test_config_to_dict_is_json_and_round_trips():
  cfg = TransformerConfig(d_model=16, num_heads=4, num_kv_heads=2, dtype=jnp.bfloat16)
  d = json.loads(json.dumps(cfg.to_dict()))
  assert d["dtype"] == "bfloat16" and d["param_dtype"] == "float32" and d["num_kv_heads"] == 2
  assert TransformerConfig.from_dict(d) == cfg


def test_error_invalid_norm_placement():
  with pytest.raises(ValueError, match=r"norm_placement='middle' is not one of \('post', 'pre'\)"):
    BASE.replace(norm_placement="middle")
