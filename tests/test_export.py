"""flaxformer_mini.export: the exported searches equal `Translator`, token for token, and the
export runs in a fresh process where flaxformer_mini cannot be imported."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_mini import export, exported_runner, translate
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.data import tokenizer as tok_lib
from flaxformer_mini.models import Transformer

SENTENCES = ['Bom dia.', '', 'O certificado diverge da chave.', 'Obrigado.',
             'Nós vamos para a escola amanhã de manhã com os meus amigos.']
# Runs the loader with every flaxformer_mini import refused, as on a machine without it.
BLOCKED_RUN = '''
import runpy, sys
class Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == 'flaxformer_mini':
      raise ImportError('flaxformer_mini is not available here')
sys.meta_path.insert(0, Refuse())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


@pytest.fixture(scope='module')
def tiny_translator(tmp_path_factory):
  """A random-weight Transformer with a real (tiny) SentencePiece model."""
  d = str(tmp_path_factory.mktemp('spm'))
  text = [s for s in SENTENCES if s] * 20 + ['Good morning.', 'Thank you.', 'The key differs.']
  tok_lib.train_tokenizer(text, d, vocab_size=48)
  tokenizer = tok_lib.load_tokenizer(d)
  cfg = TransformerConfig(vocab_size=48, d_model=32, num_heads=4, d_ff=64,
                          num_encoder_layers=2, num_decoder_layers=2, max_len=16)
  ids = jnp.ones((1, 4), jnp.int32)
  params = Transformer(cfg).init(jax.random.PRNGKey(1), ids, ids)['params']
  return translate.Translator(cfg, params, tokenizer, max_decode_len=10, batch_size=4)


@pytest.fixture(scope='module')
def export_dir(tiny_translator, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('exp') / 'model.export')
  beam = translate.SearchConfig('beam', beam_size=3, alpha=0.6)
  return export.write_export(tiny_translator, out, beam=beam)


def test_export_directory_contents(export_dir, tiny_translator):
  names = sorted(os.listdir(export_dir))
  assert names == ['beam.jaxexport', 'export.json', 'greedy.jaxexport', 'params.npz',
                   'run_export.py', 'spm.model']
  with open(os.path.join(export_dir, 'export.json')) as f:
    meta = json.load(f)
  assert meta['format'] == exported_runner.FORMAT
  assert (meta['beam_size'], meta['max_len'], meta['max_decode_len']) == (3, 16, 10)
  n = sum(x.size for x in jax.tree_util.tree_leaves(tiny_translator.params))
  assert meta['num_params'] == n
  assert not os.path.exists(export_dir + '.tmp')


@pytest.mark.parametrize('method', ['greedy', 'beam'])
def test_exported_search_equals_translator_ids(export_dir, tiny_translator, method, rng):
  runner = exported_runner.ExportedTranslator(export_dir)
  search = (translate.SearchConfig('greedy') if method == 'greedy'
            else translate.SearchConfig('beam', beam_size=3, alpha=0.6))
  for shape in [(1, 4), (3, 7), (5, 16)]:  # one export, any batch and source length
    inputs = rng.integers(4, 48, shape).astype(np.int32)
    inputs[-1, shape[1] // 2:] = tok_lib.PAD_ID
    want, _ = tiny_translator.search_ids(inputs, search)
    np.testing.assert_array_equal(runner.search_ids(inputs, method), np.asarray(want))


def test_exported_translate_equals_translator(export_dir, tiny_translator):
  runner = exported_runner.ExportedTranslator(export_dir)
  beam = translate.SearchConfig('beam', beam_size=3, alpha=0.6)
  assert runner.translate(SENTENCES, 'beam') == tiny_translator.translate(SENTENCES, beam)
  assert (runner.translate(SENTENCES, 'greedy')
          == tiny_translator.translate(SENTENCES, translate.SearchConfig('greedy')))


def test_int8_export_ships_int8_weights_and_equals_the_int8_translator(tiny_translator,
                                                                      tmp_path, rng):
  from flaxformer_mini import quantize
  t8 = translate.Translator(tiny_translator.model_config, tiny_translator.params,
                            tiny_translator.tokenizer, max_decode_len=10, batch_size=4,
                            quantize='int8')
  out = export.write_export(t8, str(tmp_path / 'int8.export'),
                            beam=translate.SearchConfig('beam', beam_size=3, alpha=0.6))
  with np.load(os.path.join(out, 'params.npz')) as flat:
    assert any(k.endswith('/qvalue') and flat[k].dtype == np.int8 for k in flat.files)
  with open(os.path.join(out, 'export.json')) as f:
    meta = json.load(f)
  assert meta['quantized'] and meta['num_params'] == sum(
      x.size for x in jax.tree_util.tree_leaves(tiny_translator.params))
  runner = exported_runner.ExportedTranslator(out)
  inputs = rng.integers(4, 48, (3, 7)).astype(np.int32)
  for method, search in (('greedy', translate.SearchConfig('greedy')),
                         ('beam', translate.SearchConfig('beam', beam_size=3, alpha=0.6))):
    want, _ = t8.search_ids(inputs, search)
    np.testing.assert_array_equal(runner.search_ids(inputs, method), np.asarray(want))
  assert quantize.is_quantized(t8.params)


@pytest.mark.slow
def test_export_runs_without_flaxformer_mini(export_dir, tiny_translator):
  script = os.path.join(export_dir, 'run_export.py')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  proc = subprocess.run([sys.executable, '-c', BLOCKED_RUN, script, '--greedy', *SENTENCES],
                        capture_output=True, text=True, timeout=300, env=env, cwd=export_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  want = tiny_translator.translate(SENTENCES, translate.SearchConfig('greedy'))
  assert proc.stdout.split('\n')[:len(SENTENCES)] == want


def test_runner_refuses_bad_input(export_dir, tmp_path):
  runner = exported_runner.ExportedTranslator(export_dir)
  with pytest.raises(ValueError, match=r'token ids must be in \[0, 48\)'):
    runner.search_ids(np.array([[5, 48]]), 'greedy')
  with pytest.raises(ValueError, match=r'expected inputs \[batch, 1..16\]'):
    runner.search_ids(np.ones((1, 17), np.int32), 'greedy')
  with pytest.raises(ValueError, match="method='sample'"):
    runner.search_ids(np.ones((1, 4), np.int32), 'sample')
  with pytest.raises(FileNotFoundError, match=r'no export\.json'):
    exported_runner.ExportedTranslator(str(tmp_path))


def test_export_cli_errors_name_the_run(tmp_path, capsys):
  assert export.main([f'--workdir={tmp_path / "nope"}', f'--out={tmp_path / "x"}']) == 2
  assert 'run directory not found' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'x')
