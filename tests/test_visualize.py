"""flaxformer_mini.visualize on the tiny trained pt->en run (the smoke_run_dir fixture):
the five PNGs, the attention arrays behind them (shapes, masks, a NumPy float64
recomputation of layer 0), the positional-encoding formula and the CLI's errors.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import image as mpimg

from flaxformer_mini import visualize
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.data.tokenizer import BOS_ID, PAD_ID
from flaxformer_mini.models import Transformer
from flaxformer_mini.translate import Translator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNGS = ('positional_encoding.png', 'attention_encoder_self.png', 'attention_decoder_self.png',
        'attention_cross.png', 'training_curves.png')
SENTENCE = 'O gato dorme no sofá.'


@pytest.fixture(scope='module')
def translator(smoke_run_dir):
  return Translator.from_workdir(smoke_run_dir, batch_size=1)


@pytest.fixture(scope='module')
def maps(translator):
  return visualize.sentence_attention(translator, SENTENCE)[0]


def _f64(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


# --------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_writes_five_pngs(smoke_run_dir, tmp_path, capsys):
  out = tmp_path / 'plots'
  assert visualize.main([f'--workdir={smoke_run_dir}', f'--out={out}']) == 0
  printed = capsys.readouterr().out.split()
  assert sorted(printed) == sorted(str(out / name) for name in PNGS)
  for name in PNGS:
    path = out / name
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, name
    assert pixels[..., :3].std() > 0.01, f'{name} is blank'


def test_missing_workdir_exits_2(tmp_path, capsys):
  missing = tmp_path / 'no_such_run'
  assert visualize.main([f'--workdir={missing}']) == 2
  err = capsys.readouterr().err
  assert f"--workdir '{missing}' does not exist" in err
  os.makedirs(missing)
  assert visualize.main([f'--workdir={missing}']) == 2
  assert 'no config.json' in capsys.readouterr().err


@pytest.mark.slow
def test_missing_workdir_exit_status_of_the_module(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'flaxformer_mini.visualize',
                         f'--workdir={tmp_path / "nope"}'], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: --workdir')


def test_read_metrics_names_file_and_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  good = json.dumps({'step': 1, 'train/loss': 2.5})
  path.write_text(good + '\n\n' + '{"step": 2, "train/lo\n')
  with pytest.raises(ValueError, match=rf'{path} line 3: not valid JSON'):
    visualize.read_metrics(str(path))
  path.write_text(good + '\n[1, 2]\n')
  with pytest.raises(ValueError, match=rf'{path} line 2: expected a JSON object'):
    visualize.read_metrics(str(path))
  path.write_text(good + '\n\n' + good + '\n')
  assert visualize.read_metrics(str(path)) == [json.loads(good)] * 2


# -------------------------------------------------------------------------- the arrays


def test_positional_encoding_is_the_papers_formula():
  for positions, d_model in ((50, 16), (9, 7)):
    table, similarity = visualize.positional_encoding(positions, d_model)
    pos = np.arange(positions, dtype=np.float64)[:, None]
    want = np.zeros((positions, d_model))
    for j in range(d_model):  # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(..)
      angle = pos[:, 0] / 10000.0 ** ((j - j % 2) / d_model)
      want[:, j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
    # float32 sin/cos of angles up to 49 rad: ~1e-5 absolute.
    np.testing.assert_allclose(table, want, atol=2e-5, rtol=0)
    np.testing.assert_allclose(similarity, want @ want.T, atol=2e-4, rtol=0)


@pytest.mark.slow
def test_attention_shapes_match_the_tokens(maps, translator):
  cfg = translator.model_config
  (src,) = translator.encode([SENTENCE])
  src_pieces = visualize.pieces(translator.tokenizer, src)
  enc, dec, cross = (maps[k] for k in visualize.MAP_KINDS)
  assert enc.query_labels == enc.key_labels == cross.key_labels == src_pieces
  assert dec.key_labels[0] == '<s>' and dec.key_labels[1:] == dec.query_labels[:-1]
  assert dec.query_labels == cross.query_labels
  n_src, n_tgt = len(src), len(dec.query_labels)
  assert enc.weights.shape == (cfg.num_encoder_layers, cfg.num_heads, n_src, n_src)
  assert dec.weights.shape == (cfg.num_decoder_layers, cfg.num_heads, n_tgt, n_tgt)
  assert cross.weights.shape == (cfg.num_decoder_layers, cfg.num_heads, n_tgt, n_src)
  for m in maps.values():
    np.testing.assert_allclose(m.weights.sum(-1), 1.0, atol=1e-5)
    assert m.weights.min() >= 0
  assert np.all(np.triu(dec.weights, k=1) == 0)  # causal: nothing above the diagonal


@pytest.mark.slow
def test_padding_keys_get_no_attention(translator):
  (src,) = translator.encode([SENTENCE])
  n = len(src)
  padded = np.concatenate([src, [PAD_ID] * 3]).astype(np.int32)
  tgt = np.array([BOS_ID, 10, 11, 12], np.int32)
  got = visualize.attention_maps(translator.model, translator.params, padded, tgt)
  enc, cross = got['encoder_self'][:, :, :n], got['cross']  # the real query rows
  for w in (enc, cross):
    assert np.all(w[..., n:] == 0)
    np.testing.assert_allclose(w[..., :n].sum(-1), 1.0, atol=1e-5)
  unpadded = visualize.attention_maps(translator.model, translator.params, src, tgt)
  np.testing.assert_allclose(enc[..., :n], unpadded['encoder_self'], atol=1e-5)


def _layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


@pytest.mark.slow
def test_encoder_layer0_equals_numpy_float64(maps, translator):
  cfg = translator.model_config
  assert cfg.position_kind == 'sinusoidal' and cfg.norm_kind == 'layernorm'
  assert not cfg.fused_qkv and cfg.attention_scale is None
  p = _f64(translator.params)
  (ids,) = translator.encode([SENTENCE])
  n, d, heads = len(ids), cfg.d_model, cfg.num_heads
  # The input: embedding * sqrt(d_model) + the paper's sinusoid (positions 0..n-1).
  x = p['embedding']['embedding'][ids] * (np.sqrt(d) if cfg.scale_embeddings else 1.0)
  j = np.arange(d)
  angle = np.arange(n)[:, None] / 10000.0 ** ((j - j % 2) / d)[None]
  x = x + np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
  layer = p['encoder']['layer_0']
  # Pre-LN attends over norm(x); post-LN attends over x and normalises after the residual.
  if cfg.norm_placement == 'pre':
    norm = layer['norm_attention']
    x = _layer_norm(x, norm['scale'], norm['bias'], cfg.norm_eps)
  attn = layer['self_attention']
  q = np.einsum('ld,dhk->hlk', x, attn['query']['kernel']) + attn['query']['bias'][:, None]
  k = np.einsum('ld,dhk->hlk', x, attn['key']['kernel']) + attn['key']['bias'][:, None]
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(d // heads)
  want = np.exp(logits - logits.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  # float32 model vs float64 reference: a few ulps of the O(1) weights.
  np.testing.assert_allclose(maps['encoder_self'].weights[0], want, atol=1e-5, rtol=0)


def _tiny_config(**kw):
  return TransformerConfig(vocab_size=40, d_model=16, num_heads=2, d_ff=32,
                           num_encoder_layers=2, num_decoder_layers=2, max_len=16, **kw)


def test_scanned_layers_give_the_same_maps():
  src = np.array([5, 6, 7, 8, 9], np.int32)
  tgt = np.array([BOS_ID, 11, 12], np.int32)
  flat = Transformer(_tiny_config())
  params = jax.jit(flat.init)(jax.random.PRNGKey(0), src[None], tgt[None])['params']
  scanned = Transformer(_tiny_config(scan_layers=True))

  def stack(side):  # layer_0, layer_1 -> one 'layers' subtree with a leading [2] axis
    layers = [params[side][f'layer_{i}'] for i in range(2)]
    rest = {k: v for k, v in params[side].items() if not k.startswith('layer_')}
    return {**rest, 'layers': jax.tree_util.tree_map(lambda *x: jnp.stack(x), *layers)}

  scanned_params = {**params, 'encoder': stack('encoder'), 'decoder': stack('decoder')}
  a = visualize.attention_maps(flat, params, src, tgt)
  b = visualize.attention_maps(scanned, scanned_params, src, tgt)
  for kind in visualize.MAP_KINDS:
    assert a[kind].shape[:2] == (2, 2), kind
    np.testing.assert_allclose(b[kind], a[kind], atol=1e-6, err_msg=kind)
  assert not np.allclose(a['encoder_self'][0], a['encoder_self'][1])  # two real layers


def test_attention_maps_refuses_bad_ids():
  model = Transformer(_tiny_config())
  with pytest.raises(ValueError, match=r'src_ids of shape \[length\]'):
    visualize.attention_maps(model, {}, np.zeros((2, 3), np.int32), np.array([BOS_ID]))
