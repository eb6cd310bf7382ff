"""Logical axes and mesh shapes (this process, one device), and the 4-device mesh checks.

The numerics on real meshes live in tests/mesh_checks.py: they need 4 simulated CPU
devices, which XLA_FLAGS must set before jax starts, so one test here runs that file
in a fresh pytest process.
"""

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_mini import models, sharding
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.variants import bert, llama, t5, vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = jnp.ones((1, 5), jnp.int32)


def _shapes(model, *args):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))['params']


FAMILIES = {
    'transformer_untied_learned': lambda: _shapes(models.Transformer(TransformerConfig(
        vocab_size=12, d_model=8, num_heads=2, d_ff=16, num_encoder_layers=1,
        num_decoder_layers=1, share_embeddings=False, tie_output=False,
        position_kind='learned', max_len=8)), IDS, IDS),
    'transformer_fused_qkv': lambda: _shapes(models.Transformer(TransformerConfig(
        vocab_size=12, d_model=8, num_heads=2, d_ff=16, num_encoder_layers=1,
        num_decoder_layers=1, fused_qkv=True)), IDS, IDS),
    't5': lambda: _shapes(models.Transformer(t5.t5_config(
        '1.1', vocab_size=12, d_model=8, num_heads=2, head_dim=4, d_ff=16,
        num_encoder_layers=1)), IDS, IDS),
    'llama_gqa': lambda: _shapes(models.DecoderOnlyLM(llama.llama_config(
        vocab_size=12, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=16)), IDS),
    'bert_mlm': lambda: _shapes(bert.BertForMaskedLM(bert.BertConfig(bert.bert_encoder_config(
        vocab_size=12, d_model=8, num_heads=2, d_ff=16, num_encoder_layers=1))), IDS),
    'bert_classifier': lambda: _shapes(bert.BertForSequenceClassification(bert.BertConfig(
        bert.bert_encoder_config(vocab_size=12, d_model=8, num_heads=2, d_ff=16,
                                 num_encoder_layers=1), num_labels=3)), IDS),
    'vit': lambda: _shapes(vit.ViT(vit.ViTConfig(vit.vit_encoder_config(
        d_model=8, num_heads=2, d_ff=16, num_encoder_layers=1))), jnp.ones((1, 8, 8, 1))),
}


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_every_parameter_of_every_family_has_logical_axes(family):
  params = FAMILIES[family]()
  axes = sharding.param_axes(params)
  flat = {sharding.path_str(p): a for p, a in
          jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]}
  rules = sharding.parse_rules(sharding.DEFAULT_RULES)
  for path, names in flat.items():
    assert all(n is None or n in rules for n in names), (path, names)
  # The big matrices are split over embed and heads/mlp/vocab, never replicated whole.
  for path, names in flat.items():
    if path.endswith(('query/kernel', 'qkv/kernel')):
      assert names == ('embed', 'heads', 'kv'), path
    if path.endswith(('wi/kernel', 'wi_0/kernel')):
      assert names == ('embed', 'mlp'), path
    if path.endswith('word_embeddings/embedding') or path == 'embedding/embedding':
      assert names == ('vocab', 'embed'), path


def test_scanned_layers_get_a_leading_layers_axis_and_unknown_names_fail():
  assert sharding.logical_axes('decoder/layers/ffn/wi/kernel', 3) == ('layers', 'embed', 'mlp')
  with pytest.raises(ValueError, match=r"parameter 'decoder/ffn/wi/kernel' has 3 dimensions"):
    sharding.logical_axes('decoder/ffn/wi/kernel', 3)
  with pytest.raises(ValueError, match=r"'my_block/gate' has no logical axis names.*PARAM_AXES"):
    sharding.logical_axes('my_block/gate', 2)


def _mesh(**sizes):  # spec_for only reads mesh.shape
  return types.SimpleNamespace(shape={'data': 1, 'fsdp': 1, 'tensor': 1, **sizes})


def test_spec_for_splits_and_names_what_does_not_divide():
  rules = sharding.parse_rules(sharding.DEFAULT_RULES)
  spec = sharding.spec_for(('embed', 'heads', 'kv'), (8, 4, 2), _mesh(fsdp=2, tensor=2), rules, 'q')
  assert tuple(spec) == ('fsdp', 'tensor', None)
  spec = sharding.spec_for(('embed', 'mlp'), (8, 16), _mesh(data=4), rules, 'w')
  assert tuple(spec) == (None, None)  # pure data parallelism: replicated
  with pytest.raises(ValueError, match=(
      r"parameter 'decoder/layer_0/self_attention/key/kernel': dimension 1 \(logical axis "
      r"'heads'\) has size 1, which does not divide over mesh axis tensor \(tensor=2 = 2 "
      r"parts\); change config.mesh or config.mesh.rules.heads")):
    sharding.spec_for(('embed', 'heads', 'kv'), (8, 1, 4), _mesh(tensor=2), rules,
                      "parameter 'decoder/layer_0/self_attention/key/kernel'")
  clash = dict(rules, mlp=('fsdp',))
  with pytest.raises(ValueError, match=r"mesh axis \['fsdp'\] is used twice"):
    sharding.spec_for(('embed', 'mlp'), (8, 16), _mesh(fsdp=2), clash, 'w')
  with pytest.raises(ValueError, match=r"config.mesh.rules.embed='model'"):
    sharding.parse_rules({'embed': 'model'})


@pytest.mark.parametrize('sizes,devices,want', [
    ({'data': -1}, 8, (8, 1, 1)),
    ({'data': -1, 'fsdp': 2, 'tensor': 2}, 8, (2, 2, 2)),
    ({'data': 1, 'fsdp': -1, 'tensor': 1}, 4, (1, 4, 1)),
    ({'data': 2, 'fsdp': 2, 'tensor': 1}, 4, (2, 2, 1)),
])
def test_mesh_shape_fills_the_rest(sizes, devices, want):
  assert sharding.mesh_shape(sizes, devices) == want


@pytest.mark.parametrize('sizes,devices,message', [
    ({'data': 2, 'fsdp': 2}, 8, r'needs 4 devices, this run has 8'),
    ({'data': -1, 'fsdp': 3}, 8, r'8 devices are not a multiple of 3'),
    ({'data': -1, 'fsdp': -1}, 8, r'at most one axis may be -1'),
    ({'tensor': 0}, 8, r'config.mesh.tensor=0 must be an integer >= 1 or -1'),
])
def test_mesh_shape_errors_name_config_mesh(sizes, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(sizes, devices)


@pytest.mark.slow
def test_mesh_checks_on_four_simulated_devices():
  """tests/mesh_checks.py in a fresh process with 4 CPU devices (see its docstring)."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider',
       os.path.join(REPO, 'tests', 'mesh_checks.py')],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert ' passed' in proc.stdout and 'skipped' not in proc.stdout, proc.stdout[-2000:]


class _Counter:
  """A resumable iterator of [2, 1] batches holding its shard id and position."""

  def __init__(self, shard):
    self.shard, self.pos = shard, 0

  def __next__(self):
    self.pos += 1
    return {'x': np.full((2, 1), 10 * self.shard + self.pos)}

  def get_state(self):
    return {'pos': self.pos}

  def set_state(self, state):
    self.pos = state['pos']


def test_concat_rows_joins_shards_in_order_and_resumes_only_the_same_shards():
  from flaxformer_mini.data import ConcatRows
  it = ConcatRows([_Counter(2), _Counter(3)], [2, 3])
  np.testing.assert_array_equal(next(it)['x'][:, 0], [21, 21, 31, 31])
  state = it.get_state()
  assert state == {'shards': [2, 3], 'states': [{'pos': 1}, {'pos': 1}]}
  again = ConcatRows([_Counter(2), _Counter(3)], [2, 3])
  again.set_state(state)
  np.testing.assert_array_equal(next(again)['x'][:, 0], [22, 22, 32, 32])
  with pytest.raises(ValueError, match=r'input shards \[2, 3\], this process reads \[0, 1\]'):
    ConcatRows([_Counter(0), _Counter(1)], [0, 1]).set_state(state)


def test_input_shards_must_divide_the_batch():
  from configs import smoke
  from flaxformer_mini import training
  config = smoke.get_config()
  config.data.input_shards = 3
  with pytest.raises(ValueError, match=r'config.data.input_shards=3 must divide '
                                       r'config.batch_size=16'):
    training.validate_config(config)
