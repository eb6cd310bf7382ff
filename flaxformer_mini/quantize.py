"""Post-training weight-only int8: per-channel symmetric quantization of the weight matrices.

    python -m flaxformer_mini.quantize --workdir=runs/pt_en --out=runs/pt_en_int8
    python -m flaxformer_mini.translate --workdir=runs/pt_en_int8 "Bom dia."
    python -m flaxformer_mini.translate --workdir=runs/pt_en --quantize=int8 "Bom dia."

Every weight matrix (Dense / DenseGeneral ``kernel``, embedding tables, the tied output
projection with them) of at least ``min_elements`` entries becomes ``{'qvalue': int8,
'scale': float32}`` with ``w ≈ qvalue * scale``: one scale per output channel, i.e. the
max |w| over the axes the matmul contracts, divided by 127 (symmetric, round to nearest,
no zero point). Biases, norm scales and small tables stay float32. The decoder dequantizes
inside its jitted search (`dequantize_params` is the first op of
`flaxformer_mini.translate`'s search), so the weights live in memory and on disk as int8;
XLA:CPU has no faster int8 matmul for these shapes (benchmarks/README.md).

Which axes are contracted, by parameter name (a scanned stack's leading [layers] axis is
kept, so every layer gets its own scales):
  ``embedding`` [vocab, d]            -> over d: a scale per row serves both the lookup and
                                         the tied logits x · Eᵀ (per output token);
  attention ``out/kernel`` [h, hd, d] -> over (h, hd);
  any other ``kernel`` [in, ...]      -> over in (Dense [in, out], q/k/v [d, h, hd]).

Qwix's post-training quantization was tried first: it quantizes the shared embedding
for its tied-logits matmul, and then `nn.Embed`'s ``jnp.take`` fails on the quantized
array, so the few lines here do it instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
QVALUE, SCALE = 'qvalue', 'scale'
QUANTIZED_NAMES = ('kernel', 'embedding')
SCANNED_AXIS_NAME = 'layers'   # models.SCANNED_LAYERS: leaves lead with [num_layers]
METHODS = ('none', 'int8')

log = logging.getLogger(__name__)


def contracted_axes(names: Sequence[str], ndim: int) -> tuple[int, ...]:
  """The axes of a weight that its matmul sums over (see the module docstring).

  Args:
    names: the parameter's path, e.g. ('decoder', 'layer_0', 'self_attention', 'out',
      'kernel').
    ndim: its rank.
  """
  lead = 1 if SCANNED_AXIS_NAME in names[:-1] else 0
  if names[-1] == 'embedding':
    return (ndim - 1,)
  if len(names) >= 2 and names[-2] == 'out':
    return tuple(range(lead, ndim - 1))
  return (lead,)


def quantize_tensor(w, axes: Sequence[int]) -> dict[str, np.ndarray]:
  """Symmetric int8 of ``w`` with one scale per index of the axes not in ``axes``.

  Args:
    w: float array, any shape.
    axes: the axes reduced for each scale (the contracted axes).
  Returns:
    {'qvalue': int8 array of w's shape, 'scale': float32 array of w's rank with size 1 on
    ``axes``}; ``qvalue * scale`` is within ``scale / 2`` of ``w`` everywhere.
  """
  w = np.asarray(w, np.float32)
  amax = np.max(np.abs(w), axis=tuple(axes), keepdims=True)
  scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
  q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
  return {QVALUE: q, SCALE: scale}


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def quantize_params(params: PyTree, *, min_elements: int = 1024) -> PyTree:
  """int8 copy of a param tree: eligible leaves become {'qvalue', 'scale'} dicts.

  Args:
    params: nested dict of float arrays (any model of this library).
    min_elements: smaller matrices stay float (their scales would cost more than they save).
  Returns:
    the same nesting with each ``kernel`` / ``embedding`` leaf of rank >= 2 and at least
    ``min_elements`` entries replaced by `quantize_tensor`'s dict (host numpy arrays).
  """
  if is_quantized(params):
    raise ValueError('params are already quantized')

  def one(path, x):
    names = _names(path)
    if names[-1] in QUANTIZED_NAMES and np.ndim(x) >= 2 and np.size(x) >= min_elements:
      return quantize_tensor(x, contracted_axes(names, np.ndim(x)))
    return np.asarray(x)
  return jax.tree_util.tree_map_with_path(one, params)


def _is_qdict(node) -> bool:
  return isinstance(node, Mapping) and set(node) == {QVALUE, SCALE}


def is_quantized(params: PyTree) -> bool:
  """True when any leaf of ``params`` is a {'qvalue', 'scale'} dict."""
  if _is_qdict(params):
    return True
  return isinstance(params, Mapping) and any(is_quantized(v) for v in params.values())


def dequantize_params(params: PyTree, dtype=jnp.float32) -> PyTree:
  """Float params from a (possibly) quantized tree; jittable, a no-op on float trees.

  Quantized leaves become ``qvalue.astype(dtype) * scale``; other leaves are returned
  unchanged.
  """
  if _is_qdict(params):
    return params[QVALUE].astype(dtype) * params[SCALE].astype(dtype)
  if isinstance(params, Mapping):
    return {k: dequantize_params(v, dtype) for k, v in params.items()}
  return params


def tree_bytes(tree: PyTree) -> int:
  """Bytes of the arrays of a tree (int8 leaves count one byte per entry)."""
  return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree)))


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
             for f in files)


def quantize_run(workdir: str, out: str, *, step: int | None = None,
                 min_elements: int = 1024) -> dict[str, int]:
  """Writes ``out``: a run directory holding an int8 Orbax checkpoint of ``workdir``.

  The config and the task assets (e.g. the tokenizer) are copied, the checkpoint keeps
  the source step number and records ``meta['quantization'] = 'int8'``; every loader of
  run directories (`Translator.from_workdir`, `checkpoints.load_run`) reads it.
  Returns {'float_bytes', 'int8_bytes', 'checkpoint_bytes', 'source_checkpoint_bytes'}.
  """
  from flaxformer_mini import checkpoints
  checkpoints.check_new_run_dir(out)
  config, params, assets, meta = checkpoints.load_run(workdir, step, with_meta=True)
  if is_quantized(params):
    raise ValueError(f'{workdir!r} already holds int8 params')
  source_step = int(meta['step'])
  qparams = quantize_params(params, min_elements=min_elements)
  checkpoints.write_params_run(out, source_step, qparams, config, assets,
                               {'quantization': 'int8', 'source': os.path.abspath(workdir)})
  src_dir = os.path.join(os.path.abspath(workdir), checkpoints.CHECKPOINT_SUBDIR,
                         str(source_step))
  return {'float_bytes': tree_bytes(params), 'int8_bytes': tree_bytes(qparams),
          'checkpoint_bytes': _dir_bytes(os.path.join(out, checkpoints.CHECKPOINT_SUBDIR)),
          'source_checkpoint_bytes': _dir_bytes(src_dir)}


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m flaxformer_mini.quantize',
                              description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='the trained run directory')
  p.add_argument('--out', required=True, help='the new run directory for the int8 weights')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default newest)')
  p.add_argument('--min_elements', type=int, default=1024,
                 help='matrices smaller than this stay float32')
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
  try:
    sizes = quantize_run(args.workdir, args.out, step=args.step,
                         min_elements=args.min_elements)
  except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {args.out}: params {sizes["float_bytes"] / 2**20:.2f} MiB float32 -> '
        f'{sizes["int8_bytes"] / 2**20:.2f} MiB int8 '
        f'({sizes["float_bytes"] / sizes["int8_bytes"]:.2f}x); checkpoint on disk '
        f'{sizes["source_checkpoint_bytes"] / 2**20:.2f} MiB (params + optimizer state) -> '
        f'{sizes["checkpoint_bytes"] / 2**20:.2f} MiB')
  return 0


if __name__ == '__main__':
  sys.exit(main())
