"""flaxformer_mini.quantize: per-channel int8 against a float64 NumPy reference, the axes
chosen per parameter kind, a Translator decoding from int8 weights, and int8 run
directories written and read back through Orbax."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_mini import quantize, translate
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.models import Transformer

CFG = TransformerConfig(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_encoder_layers=1,
                        num_decoder_layers=1, max_len=16)


def _reference(w, axes):
  """float64 per-channel symmetric int8: (q, scale) by the textbook formula."""
  w = np.asarray(w, np.float64)
  amax = np.abs(w).max(axis=tuple(axes), keepdims=True)
  scale = np.where(amax > 0, amax / 127, 1.0)
  return np.clip(np.round(w / scale), -127, 127), scale


@pytest.mark.parametrize('shape, axes', [((48, 40), (0,)), ((32, 4, 8), (0,)),
                                         ((4, 8, 32), (0, 1)), ((64, 32), (1,)),
                                         ((3, 32, 4, 8), (1,))])
def test_quantize_tensor_matches_numpy_and_error_is_half_a_step(rng, shape, axes):
  w = rng.normal(size=shape).astype(np.float32) * rng.uniform(0.01, 3, size=shape[-1])
  w[(0,) * len(shape)] = 0.0
  got = quantize.quantize_tensor(w, axes)
  q_ref, s_ref = _reference(w, axes)
  assert got['qvalue'].dtype == np.int8 and got['scale'].dtype == np.float32
  np.testing.assert_allclose(got['scale'], s_ref, rtol=1e-6)
  # float32 vs float64 division may round a tie the other way: at most one step, rarely.
  assert np.abs(got['qvalue'] - q_ref).max() <= 1 and np.mean(got['qvalue'] != q_ref) < 1e-3
  deq = got['qvalue'].astype(np.float64) * got['scale']
  assert np.all(np.abs(deq - w) <= got['scale'] * 0.5 + 1e-6)
  assert got['scale'].shape == tuple(1 if i in axes else n for i, n in enumerate(shape))


def test_all_zero_channel_keeps_zeros():
  got = quantize.quantize_tensor(np.zeros((4, 3), np.float32), (0,))
  assert np.all(got['qvalue'] == 0) and np.all(got['scale'] == 1)


@pytest.mark.parametrize('names, ndim, axes', [
    (('encoder', 'layer_0', 'self_attention', 'query', 'kernel'), 3, (0,)),
    (('decoder', 'layer_1', 'cross_attention', 'out', 'kernel'), 3, (0, 1)),
    (('decoder', 'layer_0', 'ffn', 'wi', 'kernel'), 2, (0,)),
    (('embedding', 'embedding'), 2, (1,)),
    (('encoder', 'layers', 'self_attention', 'out', 'kernel'), 4, (1, 2)),
    (('encoder', 'layers', 'ffn', 'wo', 'kernel'), 3, (1,)),
])
def test_contracted_axes_per_parameter_kind(names, ndim, axes):
  assert quantize.contracted_axes(names, ndim) == axes


@pytest.fixture(scope='module')
def tiny():
  model = Transformer(CFG)
  ids = jnp.ones((1, 4), jnp.int32)
  params = model.init(jax.random.PRNGKey(3), ids, ids)['params']
  return model, params


def test_quantize_params_converts_matrices_only_and_is_3_5x_smaller(tiny):
  _, params = tiny
  qparams = quantize.quantize_params(params, min_elements=0)
  leaves = jax.tree_util.tree_leaves_with_path(qparams)
  for path, x in leaves:
    names = [str(getattr(k, 'key', k)) for k in path]
    if names[-1] == 'qvalue':
      assert names[-2] in ('kernel', 'embedding') and x.dtype == np.int8
    elif names[-1] != 'scale':
      assert x.dtype == np.float32 and names[-1] in ('bias', 'scale')
  assert quantize.is_quantized(qparams) and not quantize.is_quantized(params)
  # This tiny model is mostly biases and norms by count of tensors, not by bytes.
  assert quantize.tree_bytes(params) / quantize.tree_bytes(qparams) > 3.0
  with pytest.raises(ValueError, match='already quantized'):
    quantize.quantize_params(qparams)
  # Below min_elements a matrix stays float.
  kept = quantize.quantize_params(params, min_elements=10**9)
  assert not quantize.is_quantized(kept)


def test_dequantized_params_give_close_logits(tiny):
  model, params = tiny
  qparams = quantize.quantize_params(params, min_elements=0)
  deq = jax.jit(quantize.dequantize_params)(qparams)
  for a, b in zip(jax.tree_util.tree_leaves(deq), jax.tree_util.tree_leaves(params)):
    assert a.shape == b.shape and a.dtype == b.dtype
  rng = np.random.default_rng(1)
  src = jnp.asarray(rng.integers(4, 64, (2, 9)), jnp.int32)
  tgt = jnp.asarray(rng.integers(4, 64, (2, 7)), jnp.int32)
  ref = model.apply({'params': params}, src, tgt)
  got = model.apply({'params': deq}, src, tgt)
  # 8-bit weights: the worst logit moves by under 5 % of the logits' standard deviation.
  assert float(jnp.abs(got - ref).max()) < 0.05 * float(ref.std())


class _Tok:
  """The smallest tokenizer Translator accepts: ids as space-separated numbers."""
  vocab_size = CFG.vocab_size

  def encode(self, texts):
    return [np.asarray([int(t) for t in s.split()], np.int32) for s in texts]

  def decode(self, ids):
    return [' '.join(str(int(t)) for t in row if t > 2) for row in np.asarray(ids)]


def test_translator_decodes_from_int8_as_from_its_dequantized_floats(tiny, monkeypatch):
  _, params = tiny
  monkeypatch.setattr(translate, 'check_vocab', lambda tok, n: None)
  int8 = translate.Translator(CFG, params, _Tok(), max_decode_len=8, batch_size=4,
                              quantize='int8')
  assert quantize.is_quantized(int8.params)
  floats = translate.Translator(CFG, quantize.dequantize_params(int8.params), _Tok(),
                                max_decode_len=8, batch_size=4)
  sources = ['5 6 7 8', '9 10 11', '12 13 14 15 16 17']
  for search in (translate.SearchConfig('greedy'), translate.SearchConfig('beam')):
    assert int8.translate(sources, search) == floats.translate(sources, search)
  with pytest.raises(ValueError, match="quantize='int4'"):
    translate.Translator(CFG, params, _Tok(), quantize='int4')


@pytest.mark.slow
def test_int8_run_directory_round_trips_through_orbax(smoke_run_dir, tmp_path, capsys):
  out = str(tmp_path / 'int8')
  assert quantize.main([f'--workdir={smoke_run_dir}', f'--out={out}']) == 0
  assert 'int8' in capsys.readouterr().out
  from flaxformer_mini import checkpoints
  _, params, assets, meta = checkpoints.load_run(out, with_meta=True)
  assert meta['quantization'] == 'int8' and set(assets) == {'spm.model'}
  assert checkpoints.run_task(out) == 'translation'  # predict and serve read int8 runs too
  qvalues = [x for p, x in jax.tree_util.tree_leaves_with_path(params)
             if str(getattr(p[-1], 'key', p[-1])) == 'qvalue']
  assert qvalues and all(x.dtype == jnp.int8 for x in qvalues)
  sources = ['O certificado diverge.', 'Eu gosto de gatos.', 'Obrigado.']
  search = translate.SearchConfig('greedy')
  from_disk = translate.Translator.from_workdir(out).translate(sources, search)
  on_load = translate.Translator.from_workdir(smoke_run_dir, quantize='int8').translate(
      sources, search)
  assert from_disk == on_load
  ckpt = os.path.join(out, checkpoints.CHECKPOINT_SUBDIR)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt) for f in fs)
  assert size < quantize.tree_bytes(jax.tree_util.tree_map(
      np.asarray, quantize.dequantize_params(params)))
  assert quantize.main([f'--workdir={smoke_run_dir}', f'--out={out}']) == 1
  assert 'already holds checkpoints' in capsys.readouterr().err
