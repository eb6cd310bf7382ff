"""Device meshes, logical axis names for every parameter, and the shardings they give.

A run's devices form a `jax.sharding.Mesh` with three named axes (`MESH_AXES`):

    data    batch rows split, parameters replicated (plain data parallelism);
    fsdp    batch rows split AND parameters/optimizer state split along ``embed``
            (ZeRO-3 / fully sharded data parallelism: weights are all-gathered per use);
    tensor  parameters split along ``heads`` / ``mlp`` / ``vocab`` (Megatron-style).

Every parameter has logical axis names, one per dimension, given by `PARAM_AXES`: a
table of (path pattern, axes) next to the modules' parameter names, so params stay
plain arrays (checkpoints, Hugging Face imports and ``jax.tree`` code need no unboxing).
A leaf under a scanned ``layers`` module has a leading ``layers`` axis. The rules
(``config.mesh.rules``, MaxText style) map each logical name to mesh axes:

    batch -> data,fsdp   embed -> fsdp   heads, mlp, vocab -> tensor   the rest -> replicated

Everything here is a plain function of shapes and names; `state_shardings` turns an
abstract `TrainState` (``jax.eval_shape``) into the shardings ``jax.jit`` creates it
with, so a state is never materialised whole on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH = 'batch'

# (regex on the '/'-joined parameter path, logical axes); the first match wins.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # attention: kernels [embed, heads, head_dim] in, [heads, head_dim, embed] out
    (r'(^|/)(query|key|value|qkv|kv)/kernel$', ('embed', 'heads', 'kv')),
    (r'(^|/)(query|key|value|qkv|kv)/bias$', ('heads', 'kv')),
    (r'(^|/)out/kernel$', ('heads', 'kv', 'embed')),
    # position-wise feed-forward
    (r'(^|/)wi(_0|_1)?/kernel$', ('embed', 'mlp')),
    (r'(^|/)wi(_0|_1)?/bias$', ('mlp',)),
    (r'(^|/)wo/kernel$', ('mlp', 'embed')),
    # embeddings and output
    (r'(^|/)logits/kernel$', ('embed', 'vocab')),
    (r'(^|/)(logits|mlm)/bias$', ('vocab',)),
    (r'(^|/)position_embeddings?/embedding$', ('position', 'embed')),
    (r'(^|/)token_type_embeddings/embedding$', ('token_type', 'embed')),
    (r'(^|/)relative_bias/rel_embedding$', ('buckets', 'heads')),
    (r'(^|/)(embedding|encoder_embedding|decoder_embedding|word_embeddings)/embedding$',
     ('vocab', 'embed')),
    # BERT pooler / MLM transform ([embed, embed]), classification heads, ViT
    (r'(^|/)(pooler|transform)/kernel$', ('embed', 'mlp')),
    (r'(^|/)(classifier|head)/kernel$', ('embed', 'classes')),
    (r'(^|/)(classifier|head)/bias$', ('classes',)),
    (r'(^|/)patch_embedding/projection/kernel$', ('patch', 'embed')),
    (r'(^|/)cls_token$', (None, None, 'embed')),
    # norm scales/biases and [embed] output biases: small, replicated
    (r'(^|/)(scale|bias)$', ('norm',)),
)

# Logical axis -> mesh axes ('a,b' for several, '' = replicated); configs/common.py copies it.
DEFAULT_RULES: dict[str, str] = {
    'batch': 'data,fsdp', 'embed': 'fsdp', 'heads': 'tensor', 'mlp': 'tensor',
    'vocab': 'tensor', 'kv': '', 'norm': '', 'position': '', 'token_type': '', 'buckets': '',
    'classes': '', 'patch': '', 'layers': '', 'length': '',
}

# Activations between layers: rows split like the batch, features whole (after the
# tensor-parallel all-reduce); logits split over the vocabulary like the output weights.
ACTIVATION = ('batch', 'length', None)
LOGITS = ('batch', 'length', 'vocab')

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar('flaxformer_mini_mesh', default=None)


def path_str(path) -> str:
  """A jax tree path as 'encoder/layer_0/ffn/wi/kernel'."""
  out = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return '/'.join(out)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  """The logical axis names of parameter ``path`` with ``ndim`` dimensions.

  Raises:
    ValueError naming the parameter when no `PARAM_AXES` entry matches its name and rank.
  """
  scanned = 'layers' in path.split('/')
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, path):
      axes = (('layers',) if scanned else ()) + tuple(axes)
      if len(axes) != ndim:
        raise ValueError(f'parameter {path!r} has {ndim} dimensions but its logical axes '
                         f'{axes} (sharding.PARAM_AXES {pattern!r}) name {len(axes)}')
      return axes
  raise ValueError(f'parameter {path!r} has no logical axis names: add a (pattern, axes) '
                   'entry for it to flaxformer_mini.sharding.PARAM_AXES')


def param_axes(params: PyTree) -> PyTree:
  """Tree of logical-axes tuples, one per leaf of ``params`` (arrays or shape structs)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: logical_axes(path_str(p), len(np.shape(x))), params)


def _split_axes(name: str | None, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]
                ) -> tuple[str, ...]:
  """The mesh axes (of size > 1) that logical axis ``name`` is split over."""
  return tuple(a for a in rules.get(name, ()) if mesh.shape[a] > 1) if name else ()


def parse_rules(rules: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
  """{'batch': 'data,fsdp'} -> {'batch': ('data', 'fsdp')}; checks the mesh axis names."""
  out = {}
  for name, value in dict(rules).items():
    if value is None:
      value = ''
    axes = tuple(a.strip() for a in str(value).split(',') if a.strip())
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise ValueError(f'config.mesh.rules.{name}={value!r}: {unknown} not among the mesh '
                       f'axes {MESH_AXES}')
    out[name] = axes
  return out


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Mapping[str, tuple[str, ...]], what: str) -> P:
  """PartitionSpec of one array with logical ``axes``; every split must divide evenly.

  Raises:
    ValueError naming ``what`` (the parameter), the logical axis, the mesh axes and sizes.
  """
  entries, used = [], set()
  for dim, (name, size) in enumerate(zip(axes, shape)):
    if name is None:
      entries.append(None)
      continue
    if name not in rules:
      raise ValueError(f'{what}: logical axis {name!r} has no rule in config.mesh.rules '
                       f'(known: {sorted(rules)})')
    mesh_axes = _split_axes(name, mesh, rules)
    if not mesh_axes:
      entries.append(None)
      continue
    clash = used.intersection(mesh_axes)
    if clash:
      raise ValueError(f'{what}: mesh axis {sorted(clash)} is used twice (logical axis '
                       f'{name!r}, dimension {dim}); fix config.mesh.rules')
    parts = math.prod(mesh.shape[a] for a in mesh_axes)
    if size % parts:
      sizes = ' x '.join(f'{a}={mesh.shape[a]}' for a in mesh_axes)
      raise ValueError(f'{what}: dimension {dim} (logical axis {name!r}) has size {size}, '
                       f'which does not divide over mesh axis {",".join(mesh_axes)} '
                       f'({sizes} = {parts} parts); change config.mesh or '
                       f'config.mesh.rules.{name}')
    used.update(mesh_axes)
    entries.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*entries)


def params_shardings(params: PyTree, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]
                     ) -> PyTree:
  """NamedSharding per parameter leaf (arrays or ``jax.ShapeDtypeStruct``)."""
  def one(path, x):
    name = path_str(path)
    axes = logical_axes(name, len(x.shape))
    return NamedSharding(mesh, spec_for(axes, x.shape, mesh, rules, f'parameter {name!r}'))
  return jax.tree_util.tree_map_with_path(one, params)


def state_shardings(state: PyTree, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]
                    ) -> PyTree:
  """Shardings for a `training.TrainState` (abstract or concrete).

  On a 1-device mesh everything is replicated (no `PARAM_AXES` lookup). Otherwise
  params follow their logical axes; an optimizer-state leaf whose path ends with a
  parameter's path and has its shape (Adam's ``mu``/``nu``, the MultiSteps
  accumulator) is sharded like that parameter; everything else (step, rng, counts) is
  replicated.
  """
  replicated = NamedSharding(mesh, P())
  if mesh.size == 1:  # one device: nothing to split, and any param names will do
    return jax.tree_util.tree_map(lambda _: replicated, state)
  by_path = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    name = path_str(path)
    axes = logical_axes(name, len(x.shape))
    by_path[tuple(name.split('/'))] = (
        tuple(x.shape), NamedSharding(mesh, spec_for(axes, x.shape, mesh, rules,
                                                     f'parameter {name!r}')))

  def opt_leaf(path, x):
    parts = tuple(path_str(path).split('/'))
    for start in range(len(parts)):
      hit = by_path.get(parts[start:])
      if hit is not None and hit[0] == tuple(np.shape(x)):
        return hit[1]
    return replicated

  return state.replace(
      step=replicated, rng=replicated,
      loss_scale=jax.tree_util.tree_map(lambda _: replicated, state.loss_scale),
      params=jax.tree_util.tree_map_with_path(
          lambda p, x: by_path[tuple(path_str(p).split('/'))][1], state.params),
      opt_state=jax.tree_util.tree_map_with_path(opt_leaf, state.opt_state))


# ----------------------------------------------------------------------------- activations


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, tuple[str, ...]]):
  """While tracing inside this context, `constrain` pins activations to ``mesh``."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """``x`` with a sharding constraint from logical ``axes`` (one per dimension).

  A no-op outside `activation_sharding` (plain ``jit``, ``pmap``, decoding) and on a
  1-device mesh. Without it XLA may choose, e.g. under fsdp, to gather the batch and
  split the features of the [batch, length, vocab] logits instead, which multiplies
  the step's temporaries. A dimension that does not divide its mesh axes is left whole.
  """
  active = _ACTIVE.get()
  if active is None or len(axes) != x.ndim:
    return x
  mesh, rules = active
  if mesh.size == 1:
    return x
  entries = []
  for name, size in zip(axes, x.shape):
    mesh_axes = _split_axes(name, mesh, rules)
    if not mesh_axes or size % math.prod(mesh.shape[a] for a in mesh_axes):
      entries.append(None)
    else:
      entries.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*entries)))


# ----------------------------------------------------------------------------- meshes


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of `MESH_AXES` from ``{'data': -1, 'fsdp': 2, 'tensor': 1}`` (-1 = the rest).

  Raises:
    ValueError naming ``config.mesh`` when the sizes do not multiply to ``num_devices``.
  """
  shape = []
  for axis in MESH_AXES:
    value = sizes.get(axis, 1)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or (
        value < 1 and value != -1):
      raise ValueError(f'config.mesh.{axis}={value!r} must be an integer >= 1 or -1 (the rest)')
    shape.append(int(value))
  rest = [i for i, s in enumerate(shape) if s == -1]
  if len(rest) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}')
  known = math.prod(s for s in shape if s != -1)
  if rest:
    if num_devices % known:
      raise ValueError(f'config.mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices are '
                       f'not a multiple of {known}')
    shape[rest[0]] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} '
                     f'devices, this run has {num_devices}')
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh over ``devices`` (default: all devices of all processes) with `MESH_AXES`.

  Axis types are Auto: XLA propagates shardings and Linen code needs no explicit types.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  types = (AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


def batch_sharding(mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> NamedSharding:
  """Rows of every batch array split over the ``batch`` rule's mesh axes."""
  axes = _split_axes(BATCH, mesh, rules)
  return NamedSharding(mesh, P(axes if axes else None))


def batch_parts(mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> int:
  """Into how many row blocks a batch is split."""
  return math.prod(mesh.shape[a] for a in rules.get(BATCH, ()))


def per_device_bytes(tree: PyTree) -> int:
  """Bytes the largest device holds of the (sharded) arrays or shape structs in ``tree``."""
  totals: dict[Any, int] = {}
  for x in jax.tree_util.tree_leaves(tree):
    sharding = getattr(x, 'sharding', None)
    if sharding is None:
      continue
    shard = sharding.shard_shape(x.shape)
    nbytes = math.prod(shard) * np.dtype(x.dtype).itemsize
    for d in sharding.device_set:
      totals[d] = totals.get(d, 0) + nbytes
  return max(totals.values()) if totals else 0
