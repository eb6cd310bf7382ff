"""cfg.remat and cfg.scan_layers: the memory / compile-time knobs change no numbers.

remat must give the loss and gradients of the plain model (same dropout rng);
a scanned stack fed `stack_layers` of unscanned params must give the same logits
and the same decoded tokens (greedy and beam, seq2seq and decoder-only).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_mini import decoding, models
from flaxformer_mini.config import TransformerConfig

BOS, EOS, PAD = 1, 2, 0
VOCAB, MAX_DECODE = 40, 7

SEQ2SEQ = TransformerConfig(vocab_size=VOCAB, d_model=16, num_heads=2, d_ff=32,
                            num_encoder_layers=3, num_decoder_layers=2, max_len=16,
                            dropout_rate=0.2, attention_dropout_rate=0.1)
# Pre-LN, rotary, GQA, SwiGLU: the Llama-style decoder-only path.
LM = TransformerConfig(vocab_size=VOCAB, d_model=16, num_heads=4, num_kv_heads=2, d_ff=32,
                       num_encoder_layers=0, num_decoder_layers=3, max_len=16,
                       norm_placement="pre", norm_kind="rmsnorm", position_kind="rotary",
                       ffn_activation="silu", ffn_gated=True, use_bias=False,
                       scale_embeddings=False, embedding_init_std=0.5,
                       dropout_rate=0.2, attention_dropout_rate=0.1)


def _ids(seed, shape, low=3):
  return jnp.asarray(np.random.default_rng(seed).integers(low, VOCAB, shape), jnp.int32)


SRC = _ids(0, (3, 6)).at[0, 4:].set(PAD)  # one padded source row
TGT = _ids(1, (3, 5))
LM_IDS = _ids(2, (3, 8))


def _seq2seq_loss(cfg):
  model = models.Transformer(cfg)

  def loss(params, deterministic=False):
    logits = model.apply({"params": params}, SRC, TGT, deterministic=deterministic,
                         rngs={"dropout": jax.random.key(7)})
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * logits[..., 5])
  return model, loss


def _lm_loss(cfg):
  model = models.DecoderOnlyLM(cfg)

  def loss(params, deterministic=False):
    logits = model.apply({"params": params}, LM_IDS, deterministic=deterministic,
                         rngs={"dropout": jax.random.key(7)})
    return jnp.mean(jax.nn.log_softmax(logits)[..., 4] * logits[..., 6])
  return model, loss


def _init(model, cfg):
  if isinstance(model, models.Transformer):
    return model.init(jax.random.key(0), SRC, TGT)["params"]
  return model.init(jax.random.key(0), LM_IDS)["params"]


def _assert_trees_close(a, b, atol, rtol=0.0):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol,
                               err_msg=jax.tree_util.keystr(path))


# (a) remat changes memory, not numbers: loss and grads equal with dropout on.
@pytest.mark.parametrize("make_loss,base", [(_seq2seq_loss, SEQ2SEQ), (_lm_loss, LM)],
                         ids=["seq2seq", "lm"])
@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_loss_and_grads(make_loss, base, scan, remat):
  ref_model, ref_loss = make_loss(base.replace(scan_layers=scan))
  params = _init(ref_model, base.replace(scan_layers=scan))
  _, remat_loss = make_loss(base.replace(scan_layers=scan, remat=remat))
  ref_value, ref_grads = jax.jit(jax.value_and_grad(ref_loss))(params)
  value, grads = jax.jit(jax.value_and_grad(remat_loss))(params)
  assert np.isfinite(float(ref_value)) and float(ref_value) != 0.0
  # Dropout really is on, so a remat that drew other keep-masks would show.
  assert abs(float(ref_loss(params, True)) - float(ref_value)) > 1e-3
  # float32: recomputation may reassociate sums, so allow ~1 ulp-scale noise: 1e-6
  # relative for the loss, and per leaf 2e-6 x max(1, max |reference grad|).
  np.testing.assert_allclose(float(value), float(ref_value), atol=1e-6, rtol=1e-6)
  for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree_util.tree_leaves(ref_grads)):
    scale = max(1.0, float(jnp.max(jnp.abs(ref))))
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), atol=2e-6 * scale, rtol=0,
                               err_msg=jax.tree_util.keystr(path))
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(ref_grads)


def test_remat_wraps_the_layers_in_checkpoint():
  """The jaxpr of a remat model's gradient holds checkpoint (remat) equations."""
  def count(cfg):
    model, loss = _lm_loss(cfg)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(_init(model, cfg))
    return str(jaxpr).count("checkpoint") + str(jaxpr).count("remat")
  assert count(LM) == 0
  assert count(LM.replace(remat="full")) >= LM.num_decoder_layers
  assert count(LM.replace(remat="dots", scan_layers=True)) >= 1


# (b) a scanned stack with stacked params computes the same function.
@pytest.mark.parametrize("base", [SEQ2SEQ, LM], ids=["seq2seq", "lm"])
def test_scan_matches_loop_with_stacked_params(base):
  loop_model = type_of(base)(base)
  scan_cfg = base.replace(scan_layers=True)
  scan_model = type_of(base)(scan_cfg)
  params = _init(loop_model, base)
  args = (SRC, TGT) if base is SEQ2SEQ else (LM_IDS,)
  want = loop_model.apply({"params": params}, *args)
  got = scan_model.apply({"params": models.stack_layers(params, base)}, *args)
  assert got.shape == want.shape
  # float32; the scan only reorders/fuses ops differently: agreement to ~1e-6.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)

  # A scanned init has every layer leaf under `layers`, with a leading [num_layers] axis.
  scan_params = _init(scan_model, scan_cfg)
  stacks = {"encoder": base.num_encoder_layers, "decoder": base.num_decoder_layers}
  n_layer_leaves = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(scan_params):
    names = [p.key for p in path]
    assert not any(n.startswith("layer_") for n in names), names
    if "layers" in names:
      n_layer_leaves += 1
      assert names[names.index("layers") - 1] in stacks
      assert leaf.shape[0] == stacks[names[0]], (names, leaf.shape)
  assert n_layer_leaves > 0
  want_shapes = jax.tree_util.tree_map(lambda x: x.shape,
                                       models.stack_layers(params, base))
  assert jax.tree_util.tree_map(lambda x: x.shape, scan_params) == want_shapes
  flat = {"/".join(p.key for p in path): x.shape
          for path, x in jax.tree_util.tree_leaves_with_path(scan_params)}
  name = "decoder/layers/self_attention/query/kernel"
  assert flat[name] == (base.num_decoder_layers, base.d_model, base.num_heads,
                        base.head_size), flat[name]
  # Each layer gets its own init (split params rng), not one copy.
  kernel = scan_params["decoder"]["layers"]["self_attention"]["query"]["kernel"]
  assert not np.allclose(kernel[0], kernel[1])


def type_of(cfg):
  return models.Transformer if cfg.num_encoder_layers else models.DecoderOnlyLM


# (c) decoding: identical tokens, scanned vs unscanned.
@functools.partial(jax.jit, static_argnames=("model", "beam"))
def _seq2seq_decode(model, params, src, beam):
  t2l, cache = models.seq2seq_decoding_fns(model, params, src, MAX_DECODE)
  kw = dict(batch_size=src.shape[0], max_decode_len=MAX_DECODE, bos_id=BOS, eos_id=EOS,
            pad_id=PAD)
  if beam:
    return decoding.beam_search(t2l, cache, beam_size=beam, num_return=beam, alpha=0.6,
                                static_cache_keys=models.STATIC_CACHE_KEYS, **kw)
  return decoding.greedy_search(t2l, cache, **kw), None


@functools.partial(jax.jit, static_argnames=("model", "beam"))
def _lm_decode(model, params, prompt, beam):
  t2l, cache = models.lm_decoding_fns(model, params, prompt.shape[0], MAX_DECODE)
  kw = dict(batch_size=prompt.shape[0], max_decode_len=MAX_DECODE, bos_id=BOS, eos_id=EOS,
            pad_id=PAD, prompt=prompt)
  if beam:
    return decoding.beam_search(t2l, cache, beam_size=beam, num_return=beam, alpha=0.6, **kw)
  return decoding.greedy_search(t2l, cache, **kw), None


@pytest.mark.parametrize("beam", [0, 3], ids=["greedy", "beam3"])
@pytest.mark.parametrize("base", [SEQ2SEQ, LM], ids=["seq2seq", "lm"])
def test_decode_same_tokens_scanned_and_unscanned(base, beam):
  base = base.replace(dropout_rate=0.0, attention_dropout_rate=0.0)
  if base.num_encoder_layers:
    # Random post-LN tied models repeat one token; pre-LN, untied, with T5 relative
    # bias (computed outside the stack, broadcast into the scan) gives varied output.
    base = base.replace(norm_placement="pre", tie_output=False, position_kind="relative",
                        relative_num_buckets=8, relative_max_distance=16)
  loop_model = type_of(base)(base)
  scan_model = type_of(base)(base.replace(scan_layers=True))
  params = _init(loop_model, base)
  stacked = models.stack_layers(params, base)
  if isinstance(loop_model, models.Transformer):
    run = lambda m, p: _seq2seq_decode(m, p, SRC, beam)
  else:
    prompt = jnp.array([[5, 9, 0], [7, 0, 0], [11, 12, 13]], jnp.int32)
    run = lambda m, p: _lm_decode(m, p, prompt, beam)
  want_seqs, want_scores = run(loop_model, params)
  got_seqs, got_scores = run(scan_model, stacked)
  want_seqs = np.asarray(want_seqs)
  assert want_seqs.shape[0] == 3 and want_seqs.shape[-1] == MAX_DECODE
  assert len(np.unique(want_seqs)) > 2  # not a degenerate all-EOS/all-pad output
  np.testing.assert_array_equal(np.asarray(got_seqs), want_seqs)
  if beam:
    np.testing.assert_allclose(np.asarray(got_scores), np.asarray(want_scores), atol=1e-5)


def test_scanned_cache_is_batch_major():
  """decoding.py reads every cache leaf with ndim >= 1 as [batch, ...]; a scanned cache keeps
  that."""
  cfg = SEQ2SEQ.replace(scan_layers=True, dropout_rate=0.0, attention_dropout_rate=0.0)
  model = models.Transformer(cfg)
  params = _init(model, cfg)
  _, cache = models.seq2seq_decoding_fns(model, params, SRC, MAX_DECODE)
  layers = cache["decoder"]["layers"]
  n, kv, hd = cfg.num_decoder_layers, cfg.kv_heads, cfg.head_size
  assert layers["self_attention"]["cached_key"].shape == (3, n, kv, MAX_DECODE, hd)
  assert layers["self_attention"]["cached_value"].shape == (3, n, kv, MAX_DECODE, hd)
  assert layers["self_attention"]["cache_index"].shape == ()
  assert layers["cross_attention"]["cross_key"].shape == (3, n, kv, SRC.shape[1], hd)
  for leaf in jax.tree_util.tree_leaves(cache):
    assert leaf.ndim == 0 or leaf.shape[0] == 3


# (d) the layout conversion round-trips.
@pytest.mark.parametrize("base", [SEQ2SEQ, LM], ids=["seq2seq", "lm"])
def test_unstack_inverts_stack(base):
  params = _init(type_of(base)(base), base)
  stacked = models.stack_layers(params, base)
  assert "layer_0" not in stacked["decoder"] and "layers" in stacked["decoder"]
  back = models.unstack_layers(stacked, base)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # and the other way round, from a scanned init
  scan_params = _init(type_of(base)(base.replace(scan_layers=True)), base)
  again = models.stack_layers(models.unstack_layers(scan_params, base), base)
  _assert_trees_close(again, scan_params, atol=0.0)


def test_stack_layers_refuses_wrong_layouts():
  params = _init(models.DecoderOnlyLM(LM), LM)
  with pytest.raises(ValueError, match="num_decoder_layers=4"):
    models.stack_layers(params, LM.replace(num_decoder_layers=4))
  with pytest.raises(ValueError, match="more layers"):
    models.stack_layers(params, LM.replace(num_decoder_layers=2))
  with pytest.raises(ValueError, match="no scanned"):
    models.unstack_layers(params, LM)
  with pytest.raises(ValueError, match="num_decoder_layers=2"):
    models.unstack_layers(models.stack_layers(params, LM), LM.replace(num_decoder_layers=2))


# (e) config validation.
def test_invalid_remat_raises():
  with pytest.raises(ValueError, match="remat"):
    TransformerConfig(remat="everything")
  with pytest.raises(ValueError, match="remat"):
    TransformerConfig.from_dict({"remat": True})
  with pytest.raises(ValueError, match="scan_layers"):
    TransformerConfig(scan_layers="yes")
  cfg = TransformerConfig.from_dict({"remat": "dots", "scan_layers": True})
  assert cfg.remat == "dots" and cfg.scan_layers
  assert TransformerConfig().remat == "none" and not TransformerConfig().scan_layers
