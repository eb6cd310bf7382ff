"""The ``translation`` task: a seq2seq `Transformer` on a TSV parallel corpus, dev BLEU.

Data: the embedded pt-en sample or ``../shared/data/translate`` (``config.data.source``),
built into a TFDS array_record dataset, a joint SentencePiece model, tokenized once and
cached, then packed by the grain pipeline (`flaxformer_mini.data`). Evaluation decodes the
dev sources with `flaxformer_mini.translate.Translator` (the same batched, bucketed
search the CLI uses) and scores them with sacrebleu.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp

from flaxformer_mini import data as data_lib
from flaxformer_mini import training
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.models import Transformer
from flaxformer_mini.tasks.base import PyTree
from flaxformer_mini.translate import SearchConfig, Translator

# ----------------------------------------------------------------------------- translation


def _data_paths(d) -> dict[str, str]:
  if d.source == 'embedded':
    return data_lib.embedded_paths(d.pair)
  if d.source == 'shared':
    root = os.path.abspath(d.shared_root)
    try:
      return data_lib.shared_paths(root, d.pair)
    except FileNotFoundError as e:
      raise FileNotFoundError(
          f'{e}. config.data.shared_root={d.shared_root!r} (resolved {root!r}) must contain '
          f'data/translate/{d.pair}.{{train,dev}}.tsv.gz; pass '
          '--config.data.shared_root=/path/to/shared or use --config.data.source=embedded'
      ) from None
  raise ValueError(f"config.data.source={d.source!r} is not one of ('embedded', 'shared')")


def batch_logits(model: Transformer, params: PyTree, batch, *, deterministic: bool = True,
                 rng: jax.Array | None = None) -> jax.Array:
  """[rows, tgt_len, vocab] float32 logits of a pipeline batch (packed or padded: the
  segment ids and positions of `flaxformer_mini.data.pipeline` go to the model)."""
  return model.apply(
      {'params': params}, batch['inputs'], batch['decoder_inputs'],
      inputs_segmentation=batch['inputs_segmentation'],
      targets_segmentation=batch['targets_segmentation'],
      inputs_positions=batch['inputs_position'], targets_positions=batch['targets_position'],
      deterministic=deterministic, rngs=None if rng is None else {'dropout': rng})


class Seq2SeqTask:
  """A `Transformer` on text pairs ``src_key`` -> ``tgt_key``: what translation and
  summarization share (tokenizer, model, loss, pipeline, `Translator` search).

  A subclass's ``__init__`` sets ``config``, ``src_key``, ``tgt_key``, ``train_source``
  and ``eval_source`` (random-access sources of dicts holding both keys), then calls
  ``_setup_model(workdir)``, which (idempotent, so a resumed run finds everything in place)
  trains the joint SentencePiece model ``<workdir>/spm.model`` on both sides of the train
  split unless it exists, and builds the model from ``config.model`` (its vocab_size must
  match the tokenizer). Train and eval splits are tokenized once, on first use, and cached
  in ``<workdir>/tokenized/`` keyed by the tokenizer's sha256 (`data.tokenize_source`), so
  the input pipeline only slices arrays and a restarted run reads the cache.
  """

  def _setup_model(self, workdir: str) -> None:
    config, d = self.config, self.config.data
    spm_path = os.path.join(workdir, data_lib.tokenizer.MODEL_FILENAME)
    if not os.path.isfile(spm_path):
      n = len(self.train_source) if not d.spm_max_sentences else min(
          d.spm_max_sentences, len(self.train_source))
      logging.info('training SentencePiece (%d pairs, vocab %d) -> %s', n, d.vocab_size,
                   spm_path)
      sentences = (data_lib.as_text(ex[k])
                   for chunk in data_lib.read_chunks(self.train_source, n)
                   for ex in chunk for k in (self.src_key, self.tgt_key))
      data_lib.train_tokenizer(sentences, workdir, vocab_size=d.vocab_size,
                               model_type=d.spm_model_type)
    self.tokenizer = data_lib.load_tokenizer(spm_path)
    self.assets = {data_lib.tokenizer.MODEL_FILENAME: spm_path}
    self._tokenized_dir = os.path.join(workdir, 'tokenized')

    self.model_config = TransformerConfig.from_dict(config.model)
    data_lib.check_vocab(self.tokenizer, self.model_config.vocab_size)
    longest = max(d.max_source_len, d.max_target_len, config.eval.max_decode_len)
    if longest > self.model_config.max_len:
      raise ValueError(f'data/eval lengths up to {longest} exceed model.max_len='
                       f'{self.model_config.max_len}')
    self.model = Transformer(self.model_config)

  # -- model and loss ------------------------------------------------------------------

  @property
  def d_model(self) -> int:
    """The model's width, which the 'rsqrt' learning-rate schedule scales by."""
    return self.model_config.d_model

  def init_params(self, rng: jax.Array) -> PyTree:
    d = self.config.data
    src = jnp.ones((1, d.max_source_len), jnp.int32)
    tgt = jnp.ones((1, d.max_target_len), jnp.int32)
    return jax.jit(self.model.init)(rng, src, tgt)['params']

  def loss_and_metrics(self, params, batch, rng, deterministic):
    """batch: the pipeline's packed/padded dict (see flaxformer_mini.data.pipeline)."""
    logits = batch_logits(self.model, params, batch, deterministic=deterministic, rng=rng)
    sums = training.cross_entropy_sums(logits, batch['targets'],
                                       batch['targets_segmentation'] > 0,
                                       self.config.loss.label_smoothing)
    return sums['loss'], sums

  # -- data ----------------------------------------------------------------------------

  def _pipeline_config(self, batch_size: int, seed: int) -> data_lib.PipelineConfig:
    d = self.config.data
    return data_lib.PipelineConfig(batch_size=batch_size, max_source_len=d.max_source_len,
                                   max_target_len=d.max_target_len, overlong=d.overlong,
                                   seed=seed)

  def _tokenize(self, source) -> data_lib.TokenizedSource:
    return data_lib.tokenize_source(source, self.tokenizer, src_key=self.src_key,
                                    tgt_key=self.tgt_key, cache_dir=self._tokenized_dir)

  @functools.cached_property
  def train_tokens(self) -> data_lib.TokenizedSource:
    """The train split, tokenized once (``<workdir>/tokenized/`` cache)."""
    return self._tokenize(self.train_source)

  @functools.cached_property
  def eval_tokens(self) -> data_lib.TokenizedSource:
    """The eval split, tokenized once (``<workdir>/tokenized/`` cache)."""
    return self._tokenize(self.eval_source)

  def train_iterator(self, shard_index: int = 0, shard_count: int = 1):
    """Train batches; with ``shard_count > 1`` the ``batch_size / shard_count`` rows of
    input shard ``shard_index`` (every shard_count-th example, shuffled on its own)."""
    cfg = dataclasses.replace(
        self._pipeline_config(self.config.batch_size // shard_count, self.config.seed),
        shard_index=shard_index, shard_count=shard_count)
    ds = data_lib.make_dataset(self.train_tokens, self.tokenizer, cfg, src_key=self.src_key,
                               tgt_key=self.tgt_key, train=True, pack=self.config.data.pack)
    return iter(ds)

  def eval_batches(self):
    cfg = self._pipeline_config(self.config.data.eval_batch_size, 0)
    return data_lib.make_dataset(self.eval_tokens, self.tokenizer, cfg, src_key=self.src_key,
                                 tgt_key=self.tgt_key, train=False, pack=False)

  # -- BLEU ----------------------------------------------------------------------------

  def translator(self, params: PyTree) -> Translator:
    """A `Translator` of ``params`` with the run's tokenizer and ``config.eval`` sizes."""
    e = self.config.eval
    return Translator(self.model_config, params, self.tokenizer,
                      max_decode_len=e.max_decode_len, batch_size=e.decode_batch_size)

  def search_config(self) -> SearchConfig:
    """``config.eval``'s search: beam ``beam_size`` with ``alpha``, greedy when 1."""
    e = self.config.eval
    if e.beam_size > 1:
      return SearchConfig('beam', beam_size=e.beam_size, alpha=e.alpha)
    return SearchConfig('greedy')


class TranslationTask(Seq2SeqTask):
  """Seq2seq translation (``config.data.src_lang`` -> ``tgt_lang``) with `Transformer`.

  Setup: the TFDS array_record dataset from the TSV files, in ``data.tfds_dir`` or
  ``<workdir>/tfds``, then `Seq2SeqTask._setup_model` (tokenizer and model).
  """

  name = 'translation'

  def __init__(self, config, workdir: str):
    self.config = config
    d = config.data
    if 'en' not in (d.src_lang, d.tgt_lang) or d.src_lang == d.tgt_lang:
      raise ValueError(f'data.src_lang={d.src_lang!r}, data.tgt_lang={d.tgt_lang!r}: one of '
                       f'them must be "en" and the other the non-English side of {d.pair!r}')
    self.src_key, self.tgt_key = d.src_lang, d.tgt_lang
    other = d.tgt_lang if d.src_lang == 'en' else d.src_lang
    os.makedirs(workdir, exist_ok=True)
    tfds_dir = d.tfds_dir or os.path.join(workdir, 'tfds')
    self.builder = data_lib.prepare_tsv_builder(_data_paths(d), other_lang=other,
                                                data_dir=tfds_dir)
    self.train_source = data_lib.translation_source(self.builder, d.train_split)
    self.eval_source = data_lib.translation_source(self.builder, d.eval_split)
    self._setup_model(workdir)

  def evaluate(self, params) -> tuple[dict[str, float], list[str]]:
    """Dev BLEU (sacrebleu corpus BLEU on detokenized text) and sample translations."""
    import sacrebleu
    e = self.config.eval
    n = len(self.eval_source) if not e.bleu_examples else min(e.bleu_examples,
                                                               len(self.eval_source))
    examples = data_lib.read_examples(self.eval_source, 0, n)
    sources = [data_lib.as_text(x[self.src_key]) for x in examples]
    refs = [data_lib.as_text(x[self.tgt_key]) for x in examples]
    hyps = self.translator(params).translate(sources, self.search_config())
    bleu = sacrebleu.corpus_bleu(hyps, [refs])
    samples = [f'  src: {s}\n  ref: {r}\n  hyp: {h}'
               for s, r, h in list(zip(sources, refs, hyps))[:e.num_samples]]
    return {'bleu': bleu.score, 'bleu_examples': float(n)}, samples

