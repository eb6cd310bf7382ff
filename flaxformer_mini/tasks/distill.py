"""The ``distill`` task: a small translation student learns from a trained teacher run
(and ``distill_classifier``, `ClassifierDistillationTask`, its encoder-only counterpart).

Both kinds of Kim & Rush (2016), "Sequence-Level Knowledge Distillation":

* word-level (``config.distill.kind='word'``): at every target position the student
  matches the teacher's temperature-softened distribution,
  ``loss = (1 - alpha) * CE(labels) + alpha * T^2 * KL(p_teacher^T || p_student^T)``
  (`kl_divergence_sums`; Hinton et al.'s T^2 keeps the gradient scale independent of T).
  The teacher's logits come from its frozen params inside the jitted train step;
* sequence-level (``'sequence'``): the teacher's beam search over every training source
  becomes the student's target (`distilled_corpus`), and the student trains on it with
  the plain label loss;
* ``'both'``: word-level loss on the sequence-level corpus; ``'none'``: the student on
  the original data with the teacher's vocabulary (the baseline of equal size and steps).

The student uses the teacher's SentencePiece model (copied into its run directory), so
both read the same token ids. The distilled corpus is written once, in parts that a
restart reuses, as a TSV in ``config.distill.cache_dir`` (default
``<teacher run>/distilled/``) named by a key of the teacher checkpoint, its search and
the training split; it is then built into a TFDS array_record dataset like any corpus.

Teacher params are closed over by the step, so the compiled step carries them as
constants: right for teachers that fit one device, which is what distillation on one
machine needs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
from jax import lax

from flaxformer_mini import data as data_lib
from flaxformer_mini import training
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.data.tokenized import file_sha256
from flaxformer_mini.models import Transformer
from flaxformer_mini.tasks.classification import ClassificationTask, Classifier, TextClassifier
from flaxformer_mini.tasks.translation import TranslationTask, _data_paths, batch_logits
from flaxformer_mini.translate import SearchConfig, Translator

log = logging.getLogger(__name__)

KINDS = ('word', 'sequence', 'both', 'none')
PART_SIZE = 4096   # sources decoded per corpus part (a restart redoes at most one part)


def kl_divergence_sums(student_logits: jax.Array, teacher_logits: jax.Array,
                       weights: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Sum over weighted positions of ``KL(softmax(t / T) || softmax(s / T))``, in nats.

  Args:
    student_logits, teacher_logits: [..., vocab] float (any float dtype; computed in f32).
    weights: [...] float/bool, 0 on padding.
    temperature: T > 0, the softening of both distributions.
  Returns:
    scalar float32 (not multiplied by T^2).
  """
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f'student logits {student_logits.shape} and teacher logits '
                     f'{teacher_logits.shape} differ in shape (same vocabulary needed)')
  t = lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return jnp.sum(kl * weights.astype(jnp.float32))


def check_distill_config(k, teacher_kind: str) -> None:
  """The ``config.distill`` fields both distillation tasks read: teacher, alpha, temperature."""
  if not k.teacher_workdir:
    raise ValueError(f'config.distill.teacher_workdir is empty: name the trained {teacher_kind} '
                     'run directory (train.py --workdir of the teacher)')
  if not 0.0 <= k.alpha <= 1.0 or not k.temperature > 0:
    raise ValueError(f'config.distill.alpha={k.alpha} must be in [0, 1] and '
                     f'config.distill.temperature={k.temperature} > 0')


def mix_with_teacher(sums: dict, student_logits: jax.Array, teacher_logits: jax.Array,
                     weights: jax.Array, k) -> tuple[jax.Array, dict]:
  """(loss, metrics) of ``(1 - alpha) * sums['loss'] + alpha * T^2 * KL`` (Hinton et al.)."""
  kd = kl_divergence_sums(student_logits, teacher_logits, weights,
                          k.temperature) * k.temperature ** 2
  loss = (1.0 - k.alpha) * sums['loss'] + k.alpha * kd
  return loss, dict(sums, loss=loss, label_loss=sums['loss'], kd=kd)


def _teacher_key(teacher_dir: str, meta: dict, search: SearchConfig, split: str,
                 max_decode_len: int, train_paths: dict) -> str:
  facts = {'teacher': os.path.abspath(teacher_dir), 'step': meta.get('step'),
           'saved': meta.get('time'), 'search': [search.method, search.beam_size, search.alpha],
           'split': split, 'max_decode_len': max_decode_len,
           'train': {k: [os.path.abspath(v), os.path.getsize(v)] for k, v in train_paths.items()}}
  return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def distilled_corpus(translator: Translator, sources: list[str], search: SearchConfig,
                     path: str, *, tgt_is_english: bool) -> tuple[int, int]:
  """Writes ``path``: the teacher's translation of every source, as a corpus TSV.

  Args:
    translator: the teacher.
    sources: the training sources, in order.
    search: the teacher's search (Kim & Rush: beam).
    path: the ``.tsv.gz`` to write, in the project's corpus format (english, other, tag).
      Parts ``<path>.part-NNNNN`` are written atomically first and reused by a restart.
    tgt_is_english: the teacher's outputs go in the english column (else the other).
  Returns:
    (pairs written, sources dropped because the teacher's output was empty).
  """
  if os.path.isfile(path):
    with gzip.open(path, 'rt', encoding='utf-8') as f:
      return sum(1 for _ in f), -1
  parts = []
  for start in range(0, len(sources), PART_SIZE):
    part = f'{path}.part-{start // PART_SIZE:05d}'
    parts.append(part)
    if os.path.isfile(part):
      continue
    chunk = sources[start:start + PART_SIZE]
    outs = translator.translate(chunk, search)
    tmp = part + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      for src, out in zip(chunk, outs):
        f.write(json.dumps([src, out]) + '\n')
    os.replace(tmp, part)
    log.info('distilled corpus: %d / %d sources decoded', min(start + PART_SIZE,
                                                              len(sources)), len(sources))
  written = dropped = 0
  tmp = path + '.tmp'
  with gzip.open(tmp, 'wt', encoding='utf-8') as f:
    for part in parts:
      with open(part, encoding='utf-8') as p:
        for line in p:
          src, out = json.loads(line)
          src, out = ' '.join(src.split('\t')), ' '.join(out.split('\t'))
          if not out.strip() or not src.strip():
            dropped += 1
            continue
          en, other = (out, src) if tgt_is_english else (src, out)
          f.write(f'{en}\t{other}\tdistilled\n')
          written += 1
  if not written:
    os.remove(tmp)
    raise ValueError(f'the teacher translated none of the {len(sources)} training sources to a '
                     'non-empty output: is the teacher run trained?')
  os.replace(tmp, path)
  for part in parts:
    os.remove(part)
  return written, dropped


class DistillationTask(TranslationTask):
  """A translation student trained from the teacher run ``config.distill.teacher_workdir``.

  Reads ``config.distill``: teacher_workdir, teacher_step (0 = newest), kind (`KINDS`),
  alpha (weight of the word-level term), temperature, beam_size / alpha_beam (the
  teacher's search for the sequence-level corpus; beam_size 1 = greedy), cache_dir.
  Everything else is the translation task's (the student's model is ``config.model``).
  """

  name = 'distill'

  def __init__(self, config, workdir: str):
    from flaxformer_mini import checkpoints
    k = config.distill
    if k.kind not in KINDS:
      raise ValueError(f'config.distill.kind={k.kind!r} is not one of {KINDS}')
    check_distill_config(k, 'translation')
    t_config, t_params, assets, self.teacher_meta = checkpoints.load_run(
        k.teacher_workdir, k.teacher_step or None, with_meta=True)
    spm_name = data_lib.tokenizer.MODEL_FILENAME
    if spm_name not in assets:
      raise FileNotFoundError(f'{k.teacher_workdir!r} has no {spm_name}: not a translation run')
    t_tokenizer = data_lib.load_tokenizer(assets[spm_name])
    self.teacher_config = TransformerConfig.from_dict(t_config.model)
    for key in ('src_lang', 'tgt_lang', 'pair'):
      if t_config.data.get(key) != config.data.get(key):
        raise ValueError(f'the teacher translates config.data.{key}='
                         f'{t_config.data.get(key)!r}, the student config has '
                         f'{config.data.get(key)!r}')
    # The student reads the teacher's token ids: same SentencePiece model.
    os.makedirs(workdir, exist_ok=True)
    mine = os.path.join(workdir, spm_name)
    if not os.path.isfile(mine):
      shutil.copyfile(t_tokenizer.model_path, mine)
    elif file_sha256(mine) != file_sha256(t_tokenizer.model_path):
      raise ValueError(f'{mine} is not the teacher\'s tokenizer {t_tokenizer.model_path}; '
                       'use a fresh --workdir for this teacher')
    if config.model.vocab_size != self.teacher_config.vocab_size:
      raise ValueError(f'config.model.vocab_size={config.model.vocab_size} must equal the '
                       f'teacher\'s {self.teacher_config.vocab_size} (shared vocabulary)')
    self._teacher = Transformer(self.teacher_config)
    self._teacher_params = jax.device_put(t_params)
    self._teacher_tokenizer = t_tokenizer
    super().__init__(config, workdir)
    if k.kind in ('sequence', 'both'):
      self._use_distilled_corpus(config, workdir)

  def _use_distilled_corpus(self, config, workdir: str) -> None:
    k, d = config.distill, config.data
    search = (SearchConfig('beam', beam_size=k.beam_size, alpha=k.beam_alpha)
              if k.beam_size > 1 else SearchConfig('greedy'))
    paths = _data_paths(d)
    cache_dir = k.cache_dir or os.path.join(os.path.abspath(k.teacher_workdir), 'distilled')
    os.makedirs(cache_dir, exist_ok=True)
    key = _teacher_key(k.teacher_workdir, self.teacher_meta, search, d.train_split,
                       d.max_target_len, paths)
    path = os.path.join(cache_dir, f'{d.pair}.{d.src_lang}-{d.tgt_lang}.{key}.tsv.gz')
    if not os.path.isfile(path):
      if jax.process_count() > 1:
        raise RuntimeError(f'the distilled corpus {path} is not built yet: build it once with '
                           'one process (the same command without --num_processes)')
      sources = [data_lib.as_text(x[self.src_key]) for chunk in
                 data_lib.read_chunks(self.train_source, len(self.train_source))
                 for x in chunk]
      log.info('decoding %d training sources with the teacher (%s) into %s', len(sources),
               search.method, path)
      teacher = Translator(self.teacher_config, self._teacher_params,
                           self._teacher_tokenizer, max_decode_len=d.max_target_len,
                           batch_size=config.eval.decode_batch_size)
      written, dropped = distilled_corpus(teacher, sources, search, path,
                                          tgt_is_english=d.tgt_lang == 'en')
      log.info('distilled corpus: %d pairs, %d dropped (empty teacher output)', written,
               dropped)
    other = d.tgt_lang if d.src_lang == 'en' else d.src_lang
    builder = data_lib.prepare_tsv_builder(
        {'train': path, 'validation': paths['validation']}, other_lang=other,
        data_dir=d.tfds_dir or os.path.join(workdir, 'tfds'))
    self.distilled_corpus_path = path
    self.train_source = data_lib.translation_source(builder, 'train')

  def teacher_logits(self, batch) -> jax.Array:
    """The frozen teacher's logits [rows, tgt_len, vocab] for a pipeline batch."""
    return lax.stop_gradient(batch_logits(self._teacher, self._teacher_params, batch))

  def loss_and_metrics(self, params, batch, rng, deterministic):
    k = self.config.distill
    logits = batch_logits(self.model, params, batch, deterministic=deterministic, rng=rng)
    weights = batch['targets_segmentation'] > 0
    sums = training.cross_entropy_sums(logits, batch['targets'], weights,
                                       self.config.loss.label_smoothing)
    if k.kind not in ('word', 'both') or k.alpha == 0.0:
      return sums['loss'], sums
    return mix_with_teacher(sums, logits, self.teacher_logits(batch), weights, k)



class ClassifierDistillationTask(ClassificationTask):
  """A text classifier (the student, ``config.model``) trained from a fine-tuned
  classification run, ``config.distill.teacher_workdir`` (Hinton et al. 2015): the loss is
  ``(1 - alpha) * CE(labels) + alpha * T^2 * KL(p_teacher^T || p_student^T)`` over the classes,
  the teacher's logits computed from its frozen params inside the jitted step. Student and
  teacher read the same token ids (the same ``config.data.tokenizer``) and share the labels.
  Everything else is the classification task's; the run is served and predicted as one.
  """

  name = 'distill_classifier'

  def __init__(self, config, workdir: str):
    k = config.distill
    check_distill_config(k, 'classification')
    teacher = Classifier.from_workdir(k.teacher_workdir, k.teacher_step or None)
    super().__init__(config, workdir)
    if teacher.labels != self.labels:
      raise ValueError(f'the teacher {k.teacher_workdir!r} has labels {teacher.labels}, the '
                       f'student\'s train data {self.labels}: distill on the same label set')
    if file_sha256(teacher.tokenizer.path) != file_sha256(self.tokenizer.path):
      raise ValueError(f'the teacher {k.teacher_workdir!r} reads {teacher.tokenizer.path}, the '
                       f'student {self.tokenizer.path}: set config.data.tokenizer to the '
                       'teacher\'s tokenizer (the two must read the same token ids)')
    if config.data.max_len > teacher.cfg.encoder.max_len:
      raise ValueError(f'config.data.max_len={config.data.max_len} exceeds the teacher\'s '
                       f'position table ({teacher.cfg.encoder.max_len})')
    self._teacher = TextClassifier(teacher.cfg, teacher.pooling)
    self._teacher_params = teacher.params

  def teacher_logits(self, batch) -> jax.Array:
    """The frozen teacher's class logits [rows, num_labels]."""
    return lax.stop_gradient(self._teacher.apply(
        {'params': self._teacher_params}, batch['input_ids'], batch['attention_mask'],
        deterministic=True))

  def loss_and_metrics(self, params, batch, rng, deterministic):
    k = self.config.distill
    logits, sums = self.logits_and_sums(params, batch, rng, deterministic)
    if k.alpha == 0.0:
      return sums['loss'], sums
    return mix_with_teacher(sums, logits, self.teacher_logits(batch), batch['weight'], k)
