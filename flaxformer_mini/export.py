"""Exports a trained translator as serialized StableHLO that runs without flaxformer_mini.

    python -m flaxformer_mini.export --workdir=runs/pt_en --out=model.export
    python model.export/run_export.py "Bom dia."            # needs only jax + sentencepiece

The encoder and the cached greedy and beam-search loops of `flaxformer_mini.translate`
are traced once with `jax.export` for a symbolic ``[batch, src_len]`` input
(1 <= src_len <= model max_len), so one artifact serves every batch and sentence
length. The weights are an argument of the exported function, not constants baked into
the HLO: they are saved once in ``params.npz`` and shared by both searches (``--quantize
int8`` saves per-channel int8 weights, dequantized inside the exported searches). The output
directory holds::

    greedy.jaxexport, beam.jaxexport   jax.export.Exported.serialize() of each search
    params.npz                         weights, '/'-joined parameter paths as keys
    spm.model                          the run's SentencePiece tokenizer
    export.json                        format, sizes, special ids, search options, source
    run_export.py                      the loader (flaxformer_mini/exported_runner.py)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_mini import exported_runner, quantize, sharding, translate
from flaxformer_mini.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

PyTree = Any


def export_search(translator: translate.Translator, search: translate.SearchConfig,
                  platforms: Sequence[str] = ('cpu',)) -> jax.export.Exported:
  """Traces ``translator``'s search for inputs ``[b, l]`` int32 with symbolic b, l.

  The exported function takes ``(params, inputs)`` and returns the sequences
  ``[b, max_decode_len]`` int32 (no BOS; EOS then PAD) of `Translator.search_ids`.
  """
  if search.method not in exported_runner.METHODS:
    raise ValueError(f'search.method={search.method!r}: only {exported_runner.METHODS} export')
  fn = jax.jit(functools.partial(
      _sequences, model_config=translator.model_config,
      max_decode_len=translator.max_decode_len, search=search))
  b, l = jax.export.symbolic_shape(
      'b, l', constraints=[f'l <= {translator.model_config.max_len}'])
  params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  translator.params)
  return jax.export.export(fn, platforms=tuple(platforms))(
      params, jax.ShapeDtypeStruct((b, l), jnp.int32))


def _sequences(params, inputs, *, model_config, max_decode_len, search):
  seqs, _ = translate._search(params, inputs, jax.random.PRNGKey(0),  # pylint: disable=protected-access
                              model_config=model_config, max_decode_len=max_decode_len,
                              search=search)
  return seqs


def write_export(translator: translate.Translator, out_dir: str, *,
                 beam: translate.SearchConfig = translate.SearchConfig('beam'),
                 platforms: Sequence[str] = ('cpu',), source: dict | None = None) -> str:
  """Writes the export directory (module docstring) and returns its path.

  The directory is written under a temporary name and renamed at the end, so a failed
  export never leaves a half-written ``out_dir`` (an existing one is replaced).
  """
  out_dir = os.path.abspath(out_dir)
  tmp = out_dir + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  searches = {'greedy': translate.SearchConfig('greedy'), 'beam': beam}
  for method, search in searches.items():
    with open(os.path.join(tmp, f'{method}.jaxexport'), 'wb') as f:
      f.write(export_search(translator, search, platforms).serialize())
  flat = {sharding.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(translator.params)[0]}
  np.savez(os.path.join(tmp, 'params.npz'), **flat)
  shutil.copyfile(translator.tokenizer.model_path, os.path.join(tmp, 'spm.model'))
  shutil.copyfile(exported_runner.__file__, os.path.join(tmp, 'run_export.py'))
  meta = {
      'format': exported_runner.FORMAT, 'methods': list(searches),
      'platforms': list(platforms), 'tokenizer': 'spm.model',
      'vocab_size': translator.model_config.vocab_size,
      'max_len': translator.model_config.max_len,
      'max_decode_len': translator.max_decode_len, 'batch_size': translator.batch_size,
      'beam_size': beam.beam_size, 'alpha': beam.alpha,
      'pad_id': PAD_ID, 'eos_id': EOS_ID, 'bos_id': BOS_ID,
      'num_params': int(sum(x.size for x in jax.tree_util.tree_leaves(
          jax.eval_shape(quantize.dequantize_params, translator.params)))),
      'quantized': quantize.is_quantized(translator.params),
      'source': source or {},
  }
  with open(os.path.join(tmp, 'export.json'), 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=2)
  if os.path.isdir(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  return out_dir


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m flaxformer_mini.export',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='training run directory')
  parser.add_argument('--out', required=True, help='export directory to write')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default newest)')
  parser.add_argument('--beam', type=int, default=4, help='beam size of the beam export')
  parser.add_argument('--alpha', type=float, default=0.6, help='beam length-penalty alpha')
  parser.add_argument('--max_decode_len', type=int, default=None)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--quantize', choices=translate._QUANTIZE, default='none',  # pylint: disable=protected-access
                      help='int8: ship per-channel int8 weights, dequantized inside the export')
  parser.add_argument('--platforms', default='cpu',
                      help="comma-separated jax.export platforms, e.g. 'cpu,cuda'")
  args = parser.parse_args(argv)
  try:
    beam = translate.SearchConfig('beam', beam_size=args.beam, alpha=args.alpha)
    translator = translate.Translator.from_workdir(
        args.workdir, args.step, max_decode_len=args.max_decode_len, batch_size=args.batch_size,
        quantize=args.quantize)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  source = {'workdir': os.path.abspath(args.workdir), 'step': args.step}
  out = write_export(translator, args.out, beam=beam,
                     platforms=[p for p in args.platforms.split(',') if p], source=source)
  print(out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
