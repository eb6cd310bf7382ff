"""Model-agnostic training pieces: TrainState, optimizer, losses, train_step / eval_step.

Nothing here knows about translation. A task (`flaxformer_mini.tasks`) supplies

    loss_and_metrics(params, batch, rng, deterministic) -> (loss_sum, metrics)

where ``loss_sum`` is the SUM of the per-token (or per-example) training loss over the
batch and ``metrics`` is a dict of sums that includes ``'weight'``: the number of
tokens/examples ``loss_sum`` was summed over. Steps differentiate the sum and divide by
the (all-device) weight, so one device and N devices take exactly the same update
(a per-device mean followed by ``pmean`` would weight devices with few tokens too
much). Metrics leave the steps as sums; divide by ``weight`` when reporting
(`summarize`).

Optimizer (`make_optimizer`): Adam(b1=0.9, b2=0.98, eps=1e-9) with the schedule of
"Attention Is All You Need", ``factor * d_model^-0.5 * min(step^-0.5, step *
warmup^-1.5)`` (or linear warmup + cosine decay), clipping by global norm, optional
decoupled weight decay (AdamW) on weight matrices only, optional layer-wise
learning-rate decay for fine-tuning (`layer_depths`), and gradient accumulation
with `optax.MultiSteps`.

Parallelism (`make_step_fns`): ``parallel='mesh'`` jits one `train_step` over a named
device mesh (`flaxformer_mini.sharding`): the state is created and kept sharded by its
parameters' logical axes, batches are global ``jax.Array``s split by rows, and XLA
inserts the collectives; the same code runs on one device or many processes.
``parallel='jit'`` is the mesh of the first device alone. ``parallel='pmap'``
replicates the state over all local devices, splits each batch ``[batch, ...] ->
[devices, batch/devices, ...]`` and reduces over the axis ``'batch'``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax

PyTree = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[PyTree, Batch, jax.Array, bool], tuple[jax.Array, Metrics]]
AXIS = 'batch'
PARALLEL = ('mesh', 'jit', 'pmap')
# Config fields that moved: old key -> new key (validate_config refuses the old one).
MOVED_FIELDS = {'optimizer.label_smoothing': 'loss.label_smoothing'}


# ----------------------------------------------------------------------------- state


@struct.dataclass
class LossScale:
  """Dynamic loss scaling for float16 training (Micikevicius et al. 2018, "Mixed Precision
  Training").

  The loss is multiplied by ``scale`` before differentiation so small float16 gradients
  do not flush to zero, and the gradients are divided by it afterwards. A step whose
  gradients overflow (inf/NaN) is skipped and halves the scale; ``period`` finite steps
  in a row double it. Kept in `TrainState`, so it is checkpointed and resumed.
  """
  scale: jax.Array        # float32 scalar
  good_steps: jax.Array   # int32 scalar: finite steps since the last change
  period: int = struct.field(pytree_node=False, default=2000)
  factor: float = struct.field(pytree_node=False, default=2.0)

  @classmethod
  def create(cls, initial: float = 2.0 ** 15, period: int = 2000, factor: float = 2.0
             ) -> LossScale:
    if not (initial >= 1 and period >= 1 and factor > 1):
      raise ValueError(f'loss scale initial={initial} (>= 1), period={period} (>= 1) and '
                       f'factor={factor} (> 1) are out of range')
    return cls(scale=jnp.asarray(initial, jnp.float32), good_steps=jnp.zeros((), jnp.int32),
               period=int(period), factor=float(factor))

  def adjust(self, finite: jax.Array) -> LossScale:
    """The next scale after a step whose gradients were ``finite`` (bool scalar)."""
    grow = finite & (self.good_steps + 1 >= self.period)
    scale = jnp.where(finite, jnp.where(grow, self.scale * self.factor, self.scale),
                      jnp.maximum(self.scale / self.factor, 1.0))
    good = jnp.where(finite & ~grow, self.good_steps + 1, 0)
    return self.replace(scale=scale, good_steps=good.astype(jnp.int32))


@struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (and into checkpoints).

  step:       int32 scalar, number of `train_step` calls (micro-batches) so far.
  params:     model parameters.
  opt_state:  optax state (includes the MultiSteps accumulator).
  rng:        uint32[2] base key; step keys are ``fold_in(rng, step)``.
  loss_scale: `LossScale` for float16 compute, else None (no leaf: the state of a
              float32/bfloat16 run has exactly the fields above).
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  loss_scale: LossScale | None = None

  @classmethod
  def create(cls, params: PyTree, tx: optax.GradientTransformation, rng: jax.Array,
             loss_scale: LossScale | None = None) -> TrainState:
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=rng, loss_scale=loss_scale)


def make_loss_scale(config) -> LossScale | None:
  """``config.loss_scale``: 'auto' (dynamic when ``config.model.dtype`` is float16) |
  'dynamic' | 'none'; ``config.loss_scale_period`` finite steps between doublings."""
  kind = config.get('loss_scale', 'auto')
  if kind not in ('auto', 'dynamic', 'none'):
    raise ValueError(f"config.loss_scale={kind!r} is not one of ('auto', 'dynamic', 'none')")
  dtype = str(config.get('model', {}).get('dtype', 'float32'))
  if kind == 'dynamic' or (kind == 'auto' and dtype == 'float16'):
    return LossScale.create(period=config.get('loss_scale_period', 2000))
  return None


# ----------------------------------------------------------------------------- schedules


def rsqrt_schedule(d_model: int, warmup_steps: int, factor: float = 1.0) -> optax.Schedule:
  """``factor * d_model^-0.5 * min(s^-0.5, s * warmup^-1.5)`` with ``s = step + 1``.

  The paper counts steps from 1; optax passes the number of updates applied so far
  (0 for the first update), hence ``step + 1``.
  """
  if warmup_steps < 1:
    raise ValueError(f'warmup_steps={warmup_steps} must be >= 1 for the rsqrt schedule')

  def schedule(count):
    s = jnp.asarray(count, jnp.float32) + 1.0
    return factor * d_model ** -0.5 * jnp.minimum(s ** -0.5, s * warmup_steps ** -1.5)
  return schedule


def make_schedule(opt: Mapping[str, Any], d_model: int | None,
                  num_train_steps: int) -> optax.Schedule:
  """The learning-rate schedule named by ``opt.schedule`` ('rsqrt' | 'cosine' | 'constant').

  rsqrt:    the paper's warmup + inverse square root, scaled by ``opt.lr_factor`` and
            ``d_model^-0.5`` (the model's width; None is an error).
  cosine:   linear warmup to ``opt.learning_rate`` then cosine decay to 0 at
            ``num_train_steps`` (optax.warmup_cosine_decay_schedule).
  constant: ``opt.learning_rate``.
  """
  kind = opt['schedule']
  if kind == 'rsqrt':
    if d_model is None or isinstance(d_model, bool) or int(d_model) < 1:
      raise ValueError(f"config.optimizer.schedule='rsqrt' scales the learning rate by "
                       f"d_model^-0.5, but the model width is d_model={d_model!r} (expected an "
                       "integer >= 1 from the task's model); use schedule 'cosine' or "
                       "'constant' with optimizer.learning_rate")
    return rsqrt_schedule(int(d_model), opt['warmup_steps'], opt['lr_factor'])
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt['learning_rate'],
        warmup_steps=opt['warmup_steps'], decay_steps=max(num_train_steps, opt['warmup_steps'] + 1))
  if kind == 'constant':
    return optax.constant_schedule(opt['learning_rate'])
  raise ValueError(f"optimizer.schedule={kind!r} is not one of ('rsqrt', 'cosine', 'constant')")


# ----------------------------------------------------------------------------- optimizer


def decay_mask(params: PyTree) -> PyTree:
  """True for weight matrices/kernels; False for biases and norm scales (by leaf name:
  attention biases are 2-D ``[heads, head_dim]``), 1-D leaves, and embedding tables
  (``embed`` anywhere in the parameter path)."""
  def keep(path, x):
    names = [str(getattr(k, 'key', k)) for k in path]
    return (x.ndim >= 2 and names[-1] not in ('bias', 'scale')
            and not any('embed' in n for n in names))
  return jax.tree_util.tree_map_with_path(keep, params)


_LAYER = re.compile(r'layer_(\d+)')


def layer_depths(params: PyTree) -> PyTree:
  """How many steps of layer-wise learning-rate decay each leaf is below the top.

  With L = 1 + the largest ``i`` of a ``layer_<i>`` part in any parameter path: a leaf
  under ``layer_<i>`` (its last such part) gets ``L - i``; a leaf below every layer (a
  path part containing ``embed``, or ViT's ``cls_token``) gets ``L + 1``; every other
  leaf (pooler, classifier head, final norm) gets 0. ``decay ** depth`` is then the
  factor of ELECTRA / BEiT fine-tuning: the top layer ``decay``, the embeddings
  ``decay^(L+1)``, the head 1.

  Returns:
    a tree like ``params`` of Python ints.
  Raises:
    ValueError when no path has a ``layer_<i>`` part (e.g. ``scan_layers`` stacks them).
  """
  names = lambda path: [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  layers = []
  for path, _ in flat:
    found = [int(m.group(1)) for n in names(path) if (m := _LAYER.fullmatch(n))]
    layers.append(found[-1] if found else None)
  indices = [i for i in layers if i is not None]
  if not indices:
    top = sorted({names(path)[0] for path, _ in flat if names(path)})
    raise ValueError(f'no parameter path has a layer_<i> part (top-level names: {top}); '
                     'layer-wise decay needs unstacked layers (config.model.scan_layers='
                     'False)')
  num_layers = max(indices) + 1

  def depth(path, layer):
    if layer is not None:
      return num_layers - layer
    if any('embed' in n or n == 'cls_token' for n in names(path)):
      return num_layers + 1
    return 0
  return jax.tree_util.tree_unflatten(
      treedef, [depth(path, layer) for (path, _), layer in zip(flat, layers)])


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each leaf's update by ``decay ** layer_depths(params)``; stateless.

  ``init`` already checks the tree, so a model without ``layer_<i>`` names fails before
  training with a message naming ``config.optimizer.layer_decay``.
  """
  def factors(tree):
    try:
      return jax.tree_util.tree_map(lambda d: decay ** d, layer_depths(tree))
    except ValueError as e:
      raise ValueError(f'config.optimizer.layer_decay={decay}: {e}') from None

  def init_fn(params):
    factors(params)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map(lambda u, f: u if f == 1.0 else u * f, updates,
                                    factors(updates))
    return scaled, state
  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config, d_model: int | None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer from ``config.optimizer`` (see configs/common.py).

  ``d_model`` is the width of the model being trained (a task's ``d_model``), which the
  'rsqrt' schedule scales by; None for a model without one (then 'rsqrt' is an error).

  Chain: clip_by_global_norm(clip_norm) -> Adam(b1, b2, eps) [-> decoupled weight decay
  on `decay_mask` params] -> -schedule [-> x layer_decay^depth (`scale_by_layer_decay`)
  when ``layer_decay`` != 1], wrapped in ``optax.MultiSteps(every_k_schedule=
  accum_steps)`` when accum_steps > 1 (the schedule then counts real updates).

  Returns:
    (tx, schedule).
  """
  opt = config.optimizer
  schedule = make_schedule(opt, d_model, config.num_train_steps)
  parts = []
  if opt.clip_norm and opt.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.clip_norm))
  parts.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
  if opt.weight_decay and opt.weight_decay > 0:
    parts.append(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask))
  parts.append(optax.scale_by_learning_rate(schedule))
  layer_decay = opt.get('layer_decay', 1.0)
  if layer_decay != 1.0:  # last, so it also scales the weight decay (as ELECTRA's AdamW)
    parts.append(scale_by_layer_decay(layer_decay))
  tx = optax.chain(*parts)
  if opt.accum_steps < 1:
    raise ValueError(f'optimizer.accum_steps={opt.accum_steps} must be >= 1')
  if opt.accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=opt.accum_steps)
  return tx, schedule


# ----------------------------------------------------------------------------- losses


def smoothed_entropy(vocab_size: int, label_smoothing: float) -> float:
  """Entropy of the smoothed one-hot target ``(1 - a) * onehot + a / V`` (nats).

  This is the minimum of the smoothed cross-entropy. `cross_entropy_sums`
  subtracts it, so the reported ``loss`` is 0 for a perfect fit and comparable
  across label_smoothing values (Flax WMT does the same with its own convention).
  """
  a, v = float(label_smoothing), int(vocab_size)
  if a == 0.0:
    return 0.0
  hi, lo = 1.0 - a + a / v, a / v
  return -(hi * np.log(hi) + (v - 1) * lo * np.log(lo))


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                       label_smoothing: float = 0.0) -> Metrics:
  """Label-smoothed cross-entropy, summed over weighted positions.

  Args:
    logits: [..., vocab] float.
    targets: [...] int ids.
    weights: [...] float/bool (0 on padding).
    label_smoothing: a in ``optax.smooth_labels(onehot, a) = (1-a)*onehot + a/V``.

  Returns:
    dict of scalar sums: ``loss`` (smoothed CE minus `smoothed_entropy`, the
    quantity trained), ``nll`` (plain CE, -log p(target)), ``correct`` (the
    target's logit is the largest; a tie counts as correct) and ``weight`` (sum
    of weights).
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f'expected logits [..., vocab] matching targets {targets.shape}, '
                     f'got {logits.shape}')
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  weights = weights.astype(jnp.float32)
  # No [..., vocab] one-hot and no materialised log-softmax: with soft = (1-a)*onehot + a/V,
  # CE(soft) = (1-a) * nll + a * (lse - mean_v(logits)) and nll = lse - logit[target].
  # (Writing log_softmax out and an argmax pass cost ~20 % of a CPU train step.)
  top = lax.stop_gradient(jnp.max(logits, axis=-1))
  lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = lse - target_logit
  a = float(label_smoothing)
  smoothed = (1.0 - a) * nll + a * (lse - jnp.mean(logits, axis=-1)) if a else nll
  loss = smoothed - smoothed_entropy(vocab, label_smoothing)
  correct = (lax.stop_gradient(target_logit) >= top).astype(jnp.float32)
  return {'loss': jnp.sum(loss * weights), 'nll': jnp.sum(nll * weights),
          'correct': jnp.sum(correct * weights), 'weight': jnp.sum(weights)}


def summarize(sums: Mapping[str, Any], prefix: str = '') -> dict[str, float]:
  """Metric sums -> means per weight: {prefix+'loss', 'nll', 'accuracy', 'ppl', 'tokens'}."""
  sums = {k: float(v) for k, v in jax.device_get(dict(sums)).items()}
  w = max(sums.get('weight', 0.0), 1e-9)
  out = {}
  for k, v in sums.items():
    if k == 'nonfinite':
      out[prefix + 'skipped_steps'] = v
    elif k == 'overflow':
      out[prefix + 'overflow_steps'] = v
    elif k == 'weight':
      out[prefix + 'tokens'] = v
    elif k == 'correct':
      out[prefix + 'accuracy'] = v / w
    else:
      out[prefix + k] = v / w
  if 'nll' in sums:
    out[prefix + 'ppl'] = float(np.exp(min(out[prefix + 'nll'], 50.0)))
  return out


# ----------------------------------------------------------------------------- config


def validate_config(config) -> None:
  """Checks the run fields of a train config (configs/common.py) before anything is built.

  Raises:
    ValueError naming the first bad field, its value and what it must be.
  """
  def check(key, ok, what):
    node = config
    for part in key.split('.'):
      if part not in node:
        return
      node = node[part]
    if isinstance(node, bool) and 'bool' not in what:
      raise ValueError(f'config.{key}={node!r} must be {what}')
    try:
      good = ok(node)
    except TypeError:
      good = False
    if not good:
      raise ValueError(f'config.{key}={node!r} must be {what}')

  is_int = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool)
  is_num = lambda x: isinstance(x, (int, float, np.number)) and not isinstance(x, bool)
  finite = lambda x: is_num(x) and np.isfinite(x)
  for key in ('batch_size', 'num_train_steps', 'log_every', 'checkpoint_every', 'keep',
              'batch_chunks', 'data.eval_batch_size', 'data.input_shards',
              'optimizer.accum_steps'):
    check(key, lambda x: is_int(x) and x >= 1, 'an integer >= 1')
  for key in ('eval_every', 'keep_best', 'seed', 'optimizer.warmup_steps', 'eval.bleu_every',
              'eval.bleu_examples', 'eval.num_samples'):
    check(key, lambda x: is_int(x) and x >= 0, 'an integer >= 0')
  for key in ('optimizer.learning_rate', 'optimizer.lr_factor', 'optimizer.eps'):
    check(key, lambda x: finite(x) and x > 0, 'a finite number > 0')
  for key in ('optimizer.clip_norm', 'optimizer.weight_decay'):
    check(key, lambda x: finite(x) and x >= 0, 'a finite number >= 0 (0 = off)')
  for old, new in MOVED_FIELDS.items():
    section, name = old.split('.')
    if section in config and name in config[section]:
      raise ValueError(f'config.{old} has moved to config.{new}: set that instead '
                       '(configs/common.py lists every field)')
  for key in ('optimizer.b1', 'optimizer.b2', 'loss.label_smoothing'):
    check(key, lambda x: finite(x) and 0 <= x < 1, 'a number in [0, 1)')
  check('optimizer.layer_decay', lambda x: finite(x) and 0 < x <= 1, 'a number in (0, 1] '
        '(1 = off)')
  check('eval.beam_size', lambda x: is_int(x) and x >= 1, 'an integer >= 1')
  check('eval.alpha', lambda x: finite(x) and x >= 0, 'a finite number >= 0')
  check('eval.max_decode_len', lambda x: is_int(x) and x >= 1, 'an integer >= 1')
  check('eval.decode_batch_size', lambda x: is_int(x) and x >= 1, 'an integer >= 1')
  check('parallel', lambda x: x in PARALLEL, f'one of {PARALLEL}')
  check('nonfinite', lambda x: x in ('stop', 'skip'), "one of 'stop', 'skip'")
  check('loss_scale', lambda x: x in ('auto', 'dynamic', 'none'),
        "one of 'auto', 'dynamic', 'none'")
  check('loss_scale_period', lambda x: is_int(x) and x >= 1, 'an integer >= 1')
  check('optimizer.schedule', lambda x: x in ('rsqrt', 'cosine', 'constant'),
        "one of 'rsqrt', 'cosine', 'constant'")
  if 'optimizer' in config and config.optimizer.get('schedule') == 'rsqrt':
    check('optimizer.warmup_steps', lambda x: x >= 1, 'an integer >= 1 for the rsqrt schedule')
  if 'data' in config and config.batch_size % config.data.get('input_shards', 1):
    raise ValueError(f'config.data.input_shards={config.data.input_shards} must divide '
                     f'config.batch_size={config.batch_size}')
  if 'batch_chunks' in config and config.batch_size % config.batch_chunks:
    raise ValueError(f'batch_chunks={config.batch_chunks} must be >= 1 and divide '
                     f'batch_size={config.batch_size}')


# ----------------------------------------------------------------------------- steps


def chunked_loss(loss_fn: LossFn, params: PyTree, batch: Batch, rng: jax.Array,
                 chunks: int, deterministic: bool = False) -> tuple[jax.Array, Metrics]:
  """``loss_fn`` over ``chunks`` strided row subsets of ``batch``, sums added up.

  The loss and metrics are sums, so the total (and its gradient) is the one of the
  whole batch; only dropout differs: chunk ``i`` draws with ``fold_in(rng, i)``.
  ``chunks=1`` is exactly ``loss_fn(params, batch, rng, deterministic)``.

  Why: on CPU each chunk's vocabulary-sized tensors ([rows/chunks, length, vocab]
  logits and their gradient) fit in the last-level cache, and XLA can overlap
  the chunks' independent ops. On a 2-core machine, chunks of 8 rows made the
  benchmark step 6-12 % faster and the pt->en step 16 % faster. The cost: the
  graph holds ``chunks`` copies of the model, so it compiles several times longer
  (pt->en: 103 s instead of 16 s with 8 chunks). On accelerators keep 1.

  Args:
    batch: dict of [rows, ...] arrays; ``rows`` must be a multiple of ``chunks``.
  """
  if chunks == 1:
    return loss_fn(params, batch, rng, deterministic)
  rows = {x.shape[0] for x in jax.tree_util.tree_leaves(batch)}
  if len(rows) != 1 or next(iter(rows)) % chunks:
    raise ValueError(f'batch_chunks={chunks} must divide the rows of every batch array '
                     f'(per device), got leading dims {sorted(rows)}')
  size = next(iter(rows)) // chunks
  total = None
  for i in range(chunks):
    # Chunk i takes rows i, i + chunks, ...: on a row-sharded batch each device keeps
    # its own rows (contiguous slices would move rows between devices).
    part = jax.tree_util.tree_map(
        lambda x, i=i: x.reshape((size, chunks) + x.shape[1:])[:, i], batch)
    out = loss_fn(params, part, jax.random.fold_in(rng, i), deterministic)
    total = out if total is None else jax.tree_util.tree_map(jnp.add, total, out)
  return total


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn,
               tx: optax.GradientTransformation, axis_name: str | None = None,
               batch_chunks: int = 1) -> tuple[TrainState, Metrics]:
  """One micro-batch: gradient of the loss sum / token count, one ``tx.update``.

  Args:
    state: `TrainState` (replicated under pmap).
    batch: dict of [batch, ...] arrays (this device's shard under pmap).
    loss_fn: ``(params, batch, rng, deterministic) -> (loss_sum, metric sums)``.
    tx: the optimizer of `make_optimizer`.
    axis_name: the pmap axis (``'batch'``) or None under jit.
    batch_chunks: evaluate the loss on this many row chunks in one graph
      (`chunked_loss`): same gradient, CPU cache-friendlier.

  Returns:
    (new state, metric sums over the global batch plus ``grad_norm``, the global
    norm of the normalised gradient before clipping, and ``nonfinite``: 1.0 if the
    loss, the gradient or the update was NaN/inf, in which case params and optimizer state are left
    as they were and the other metrics are 0). With ``state.loss_scale`` (float16) the loss
    is scaled before differentiation and the gradients unscaled after; a non-finite step
    is then an ``overflow`` (skipped, scale halved) unless the scale is already 1.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
  scaler = state.loss_scale

  def objective(params):
    loss, metrics = chunked_loss(loss_fn, params, batch, rng, batch_chunks)
    scaled = loss * scaler.scale if scaler is not None else loss
    return scaled, (loss, metrics)

  (_, (loss_sum, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  if scaler is not None:
    grads = jax.tree_util.tree_map(lambda g: g / scaler.scale.astype(g.dtype), grads)
  if axis_name is not None:
    grads, metrics, loss_sum = lax.psum((grads, metrics, loss_sum), axis_name)
  weight = metrics['weight']
  grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(weight, 1.0), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # A non-finite loss or gradient never reaches the state: the update is dropped (the
  # step counter still advances) and counted; the host decides to stop or go on.
  finite = (jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
            & jnp.isfinite(optax.tree.norm(updates)))
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  params, opt_state = keep((params, opt_state), (state.params, state.opt_state))
  metrics = jax.tree_util.tree_map(lambda m: jnp.where(finite, m, jnp.zeros_like(m)),
                                   dict(metrics, grad_norm=grad_norm))
  bad = 1.0 - finite.astype(jnp.float32)
  if scaler is None:
    metrics['nonfinite'] = bad
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
  # Under loss scaling a non-finite step is an overflow: skipped, the scale halves. Only
  # once the scale is down to 1 is it a real divergence for the host to stop on.
  metrics['overflow'] = bad * (scaler.scale > 1.0)
  metrics['nonfinite'] = bad * (scaler.scale <= 1.0)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       loss_scale=scaler.adjust(finite)), metrics


def eval_step(params: PyTree, batch: Batch, *, loss_fn: LossFn,
              axis_name: str | None = None) -> Metrics:
  """Metric sums of one eval batch (deterministic), summed over devices under pmap."""
  _, metrics = loss_fn(params, batch, jax.random.PRNGKey(0), True)
  if axis_name is not None:
    metrics = lax.psum(metrics, axis_name)
  return metrics


@dataclasses.dataclass(frozen=True)
class StepFns:
  """Compiled steps plus the host-side glue that differs between mesh and pmap.

  train(state, batch) -> (state, metric sums); evaluate(params, batch) -> metric sums;
  create_state(init_fn) runs ``init_fn() -> TrainState`` straight into the devices'
  layout (sharded under a mesh: never whole on one device); put_state(state) places a
  restored state; get_state(state) gives what a checkpoint saves (sharded jax.Arrays
  under a mesh, one host copy under pmap); put_batch turns a host batch (the same
  global batch on every process) into the devices' layout; abstract_state(init_fn)
  is the ``jax.ShapeDtypeStruct`` tree, with shardings, a checkpoint restores into;
  lower_train(state, batch) lowers the mesh train step (for HLO inspection).
  local_rows(rows) -> (lo, hi): the block of global batch rows this process's devices
  hold; put_batch(batch, global_rows) then also accepts just those rows.
  Metric sums returned are global (already reduced over devices) scalars.
  """
  train: Callable
  evaluate: Callable
  put_state: Callable
  get_state: Callable
  put_batch: Callable
  get_params: Callable
  num_devices: int
  create_state: Callable = None
  abstract_state: Callable = None
  host_params: Callable = None
  lower_train: Callable = None
  local_rows: Callable = None
  batch_parts: int = 1
  mesh: Any = None
  layout: str = ''


def make_step_fns(loss_fn: LossFn, tx: optax.GradientTransformation, parallel: str = 'jit',
                  batch_chunks: int = 1, *, mesh_sizes: Mapping[str, int] | None = None,
                  rules: Mapping[str, str] | None = None) -> StepFns:
  """Compiles `train_step`/`eval_step` for ``parallel`` = 'mesh', 'jit' or 'pmap'.

  Args:
    loss_fn, tx: as in `train_step`.
    parallel: 'mesh' (``mesh_sizes`` over all devices of all processes), 'jit' (the
      first local device as a 1-device mesh) or 'pmap' (all local devices, replicated).
    batch_chunks: goes to `train_step` (see `chunked_loss`).
    mesh_sizes: ``{'data': -1, 'fsdp': 1, 'tensor': 1}`` (``config.mesh``; -1 = the rest).
    rules: logical axis -> mesh axes (``config.mesh.rules``; default
      `sharding.DEFAULT_RULES`).
  """
  if not isinstance(batch_chunks, int) or batch_chunks < 1:
    raise ValueError(f'batch_chunks={batch_chunks!r} must be an integer >= 1')
  if parallel in ('mesh', 'jit'):
    return _mesh_step_fns(loss_fn, tx, parallel, batch_chunks, mesh_sizes, rules)
  if parallel == 'pmap':
    n = jax.local_device_count()
    ptrain = jax.pmap(functools.partial(train_step, loss_fn=loss_fn, tx=tx, axis_name=AXIS,
                                        batch_chunks=batch_chunks),
                      axis_name=AXIS, donate_argnums=0)
    peval = jax.pmap(functools.partial(eval_step, loss_fn=loss_fn, axis_name=AXIS),
                     axis_name=AXIS)

    def put_batch(batch, global_rows=None):
      del global_rows  # one process: the batch is global
      from flaxformer_mini.data import split_for_devices
      return split_for_devices(batch, n)

    def train(state, batch):
      state, metrics = ptrain(state, batch)
      return state, jax.tree_util.tree_map(lambda m: m[0], metrics)

    def evaluate(params, batch):
      return jax.tree_util.tree_map(lambda m: m[0], peval(params, batch))

    return StepFns(train=train, evaluate=evaluate, put_state=flax.jax_utils.replicate,
                   get_state=lambda s: jax.device_get(flax.jax_utils.unreplicate(s)),
                   put_batch=put_batch, get_params=lambda s: s.params,
                   num_devices=n, create_state=lambda f: flax.jax_utils.replicate(f()),
                   abstract_state=_on_first_device,
                   host_params=lambda s: jax.device_get(flax.jax_utils.unreplicate(s.params)),
                   batch_parts=n, layout=f'{n} replicas', local_rows=lambda rows: (0, rows))
  raise ValueError(f"parallel={parallel!r} is not one of {PARALLEL}")


def _on_first_device(init_fn) -> PyTree:
  """``init_fn``'s state as shape structs on the first local device (a restore target)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                                jax.eval_shape(init_fn))


def _mesh_step_fns(loss_fn, tx, parallel, batch_chunks, mesh_sizes, rules) -> StepFns:
  from flaxformer_mini import sharding
  rules = sharding.parse_rules(sharding.DEFAULT_RULES if rules is None else rules)
  if parallel == 'jit':
    mesh = sharding.make_mesh({}, devices=jax.local_devices()[:1])
  else:
    mesh = sharding.make_mesh(dict(mesh_sizes or {'data': -1}))
  batch_sh = sharding.batch_sharding(mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  cache: dict[str, Any] = {}

  def in_mesh(fn):
    """``fn`` traced with `sharding.constrain` active (the models' activation constraints)."""
    @functools.wraps(fn)
    def wrapped(*args):
      with sharding.activation_sharding(mesh, rules):
        return fn(*args)
    return wrapped

  def shardings_of(state_like):
    """State shardings, fixed by the first state (abstract or concrete) seen."""
    if 'state' not in cache:
      cache['state'] = sharding.state_shardings(state_like, mesh, rules)
      cache['train'] = jax.jit(
          in_mesh(functools.partial(train_step, loss_fn=loss_fn, tx=tx,
                                    batch_chunks=batch_chunks)),
          in_shardings=(cache['state'], batch_sh), out_shardings=(cache['state'], replicated),
          donate_argnums=0)
      cache['eval'] = jax.jit(in_mesh(functools.partial(eval_step, loss_fn=loss_fn)),
                              in_shardings=(cache['state'].params, batch_sh),
                              out_shardings=replicated)
    return cache['state']

  def create_state(init_fn):
    state_sh = cache['state'] if 'state' in cache else shardings_of(jax.eval_shape(init_fn))
    return jax.jit(init_fn, out_shardings=state_sh)()

  def abstract_state(init_fn):
    shapes = jax.eval_shape(init_fn)
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes, shardings_of(shapes))

  def put_state(state):
    return jax.device_put(state, shardings_of(state))

  def put_batch(batch, global_rows=None):
    if jax.process_count() == 1:
      return jax.device_put(dict(batch), batch_sh)
    # Fewer rows than the global batch: this process's rows only.
    if global_rows is not None and len(next(iter(batch.values()))) != global_rows:
      return {k: jax.make_array_from_process_local_data(
          batch_sh, np.asarray(v), (global_rows,) + np.shape(v)[1:]) for k, v in batch.items()}
    # The same global batch on every process: each device takes its rows.
    return {k: jax.make_array_from_callback(np.shape(v), batch_sh,
                                            lambda idx, v=v: np.asarray(v)[idx])
            for k, v in batch.items()}

  def local_rows(rows):
    spans = sorted({(s.start or 0, rows if s.stop is None else s.stop) for s in
                    (i[0] for i in batch_sh.addressable_devices_indices_map((rows,)).values())})
    lo, hi = spans[0][0], max(b for _, b in spans)
    covered = lo
    for a, b in spans:
      if a > covered:
        raise ValueError(f'this process holds rows {spans} of the batch, not one block')
      covered = max(covered, b)
    return lo, hi

  def train(state, batch):
    shardings_of(state)
    return cache['train'](state, batch)

  def evaluate(params, batch):
    if 'eval' not in cache:
      raise RuntimeError('evaluate needs the state layout: call create_state, put_state or '
                         'train first')
    return cache['eval'](params, batch)

  def lower_train(state, batch):
    shardings_of(state)
    return cache['train'].lower(state, batch)

  def host_params(state):
    if jax.process_count() == 1:
      return state.params
    # Host-side evaluation (BLEU decoding) reads results on every process: replicate.
    return jax.device_put(state.params, replicated)

  return StepFns(train=train, evaluate=evaluate, put_state=put_state,
                 get_state=lambda s: s, put_batch=put_batch, get_params=lambda s: s.params,
                 num_devices=mesh.size, create_state=create_state,
                 abstract_state=abstract_state, host_params=host_params,
                 local_rows=local_rows,
                 lower_train=lower_train,
                 batch_parts=sharding.batch_parts(mesh, rules), mesh=mesh,
                 layout=' '.join(f'{k}={v}' for k, v in mesh.shape.items()))
