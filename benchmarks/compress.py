"""Compression table: teacher, students (plain / distilled) and their int8 forms on real pt->en.

For each system (a trained run directory, as float32 or post-training int8):
  * parameters, weight bytes in memory, bytes of a params-only Orbax checkpoint on disk;
  * dev BLEU (sacrebleu, detokenized, 13a) of greedy and beam 4 (alpha 0.6) on the pt->en dev
    pairs, through `Translator` (the bucketed batches of the translate command);
  * decode speed: one jitted call = encoder + cache + exactly ``new_tokens`` greedy or beam-4
    steps (no early EOS, as benchmarks/decode_speed.py) on real dev sources, batch 8 and 32,
    output tokens/s = batch x new_tokens / median call time, the systems interleaved;
  * HF FlaxMarianMTModel of the teacher's sizes (random weights, the same forced protocol and
    inputs) in the same run, as the peer.

    python benchmarks/compress.py --run teacher=runs/pt_en --run student=runs/student_plain \\
        --run word=runs/student_word --run sequence=runs/student_seq --int8 teacher,student
    python benchmarks/compress.py --run teacher=/tmp/smoke --quick          # smoke run
"""

from __future__ import annotations

import argparse
import functools
import gzip
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common

NEVER_EMITTED_EOS = -1  # outside [0, vocab): no row or beam finishes early
DEV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared',
                   'data', 'translate', 'en-pt.dev.tsv.gz')


def dev_pairs(path: str, limit: int) -> tuple[list[str], list[str]]:
  """(Portuguese sources, English references) of the dev TSV (english, pt, tag)."""
  src, ref = [], []
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    for line in f:
      en, pt, _ = line.rstrip('\n').split('\t')
      src.append(pt)
      ref.append(en)
  return (src[:limit], ref[:limit]) if limit else (src, ref)


def orbax_bytes(params) -> int:
  """Bytes on disk of ``params`` alone saved with orbax's StandardCheckpointer."""
  import orbax.checkpoint as ocp
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, 'params')
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, params)
    ckpt.wait_until_finished()
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def source_batch(translator, sources: list[str], rows: int, src_len: int) -> np.ndarray:
  """[rows, src_len] ids of the first real dev sources, cut or padded to src_len."""
  from flaxformer_mini.data.tokenizer import PAD_ID
  out = np.full((rows, src_len), PAD_ID, np.int32)
  for i, ids in enumerate(translator.tokenizer.encode(sources[:rows])):
    ids = ids[:src_len]
    out[i, :len(ids)] = ids
  return out


def make_decoders(translator, inputs: dict[int, np.ndarray], new_tokens: int, beam: int):
  """{f'{mode}_b{rows}': step} of forced-length decodes of ``translator``'s params (int8
  params are dequantized inside the jitted call, as `Translator` does)."""
  import jax
  import jax.numpy as jnp

  from flaxformer_mini import decoding, quantize
  from flaxformer_mini.data.tokenizer import BOS_ID, PAD_ID
  from flaxformer_mini.models import STATIC_CACHE_KEYS, seq2seq_decoding_fns

  model = translator.model

  @functools.partial(jax.jit, static_argnames=('beam_size',))
  def run(params, src, beam_size):
    params = quantize.dequantize_params(params)
    t2l, cache = seq2seq_decoding_fns(model, params, src, new_tokens)
    kw = dict(batch_size=src.shape[0], max_decode_len=new_tokens, bos_id=BOS_ID,
              eos_id=NEVER_EMITTED_EOS, pad_id=PAD_ID)
    if beam_size == 1:
      return decoding.greedy_search(t2l, cache, **kw)
    seqs, _ = decoding.beam_search(t2l, cache, beam_size=beam_size, num_return=1,
                                   static_cache_keys=STATIC_CACHE_KEYS, **kw)
    return seqs[:, 0]

  steps = {}
  for rows, src in inputs.items():
    x = jnp.asarray(src)
    for mode, k in (('greedy', 1), (f'beam{beam}', beam)):
      steps[f'{mode}_b{rows}'] = functools.partial(
          lambda x, k: jax.block_until_ready(run(translator.params, x, beam_size=k)), x, k)
  return steps


def make_hf(model_config, inputs: dict[int, np.ndarray], new_tokens: int, beam: int):
  """HF FlaxMarianMTModel with ``model_config``'s sizes (random weights), forced length."""
  import jax
  import jax.numpy as jnp
  from transformers import FlaxMarianMTModel, MarianConfig

  from flaxformer_mini.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
  m = model_config
  config = MarianConfig(
      vocab_size=m.vocab_size, decoder_vocab_size=m.vocab_size, d_model=m.d_model,
      encoder_layers=m.num_encoder_layers, decoder_layers=m.num_decoder_layers,
      encoder_attention_heads=m.num_heads, decoder_attention_heads=m.num_heads,
      encoder_ffn_dim=m.d_ff, decoder_ffn_dim=m.d_ff, activation_function='relu',
      max_position_embeddings=max(256, m.max_len), scale_embedding=True,
      share_encoder_decoder_embeddings=True, tie_word_embeddings=True, pad_token_id=PAD_ID,
      eos_token_id=EOS_ID, decoder_start_token_id=BOS_ID, forced_eos_token_id=None)
  model = FlaxMarianMTModel(config, seed=0, dtype=jnp.float32)

  def generate(params, src, num_beams):
    return model.generate(src, attention_mask=src != PAD_ID, params=params,
                          max_new_tokens=new_tokens, min_length=new_tokens + 1,
                          num_beams=num_beams, do_sample=False, early_stopping=False,
                          num_return_sequences=1).sequences
  run = jax.jit(generate, static_argnames=('num_beams',))
  steps = {}
  for rows, src in inputs.items():
    x = jnp.asarray(src)
    for mode, k in (('greedy', 1), (f'beam{beam}', beam)):
      steps[f'{mode}_b{rows}'] = functools.partial(
          lambda x, k: jax.block_until_ready(run(model.params, x, num_beams=k)), x, k)
  return steps


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--run', action='append', default=[], metavar='NAME=WORKDIR',
                 help='a trained translation run; the first one is the teacher (HF peer size)')
  p.add_argument('--int8', default='', help='comma-separated run names also measured as int8')
  p.add_argument('--dev', default=DEV, help='dev TSV (english, pt, tag)')
  p.add_argument('--dev-limit', type=int, default=0, help='first N dev pairs (0 = all)')
  p.add_argument('--max-decode-len', type=int, default=96, help='BLEU decodes')
  p.add_argument('--new-tokens', type=int, default=64)
  p.add_argument('--src-len', type=int, default=64)
  p.add_argument('--beam', type=int, default=4)
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--steps-per-round', type=int, default=3)
  p.add_argument('--no-hf', action='store_true')
  p.add_argument('--quick', action='store_true', help='16 dev pairs, 1 round of 1 (smoke run)')
  p.add_argument('--out', default='')
  args = p.parse_args(argv)
  if not args.run:
    p.error('give at least one --run NAME=WORKDIR (the first is the teacher)')
  if args.quick:
    args.dev_limit, args.rounds, args.steps_per_round = 16, 1, 1
  runs = dict(r.split('=', 1) for r in args.run)
  int8 = [n for n in args.int8.split(',') if n]
  unknown = set(int8) - set(runs)
  if unknown:
    p.error(f'--int8 names {sorted(unknown)} that are not --run names {sorted(runs)}')

  import jax
  import sacrebleu

  from flaxformer_mini import quantize
  from flaxformer_mini.translate import SearchConfig, Translator

  info = common.machine_info()
  config = {'runs': runs, 'int8': int8, 'dev': args.dev, 'dev_limit': args.dev_limit,
            'max_decode_len': args.max_decode_len, 'new_tokens': args.new_tokens,
            'src_len': args.src_len, 'beam': args.beam, 'rounds': args.rounds,
            'steps_per_round': args.steps_per_round, 'dtype': 'float32 compute'}
  common.print_header('compress', info, config)
  sources, refs = dev_pairs(args.dev, args.dev_limit)
  systems, rows = {}, {}
  for name, workdir in runs.items():
    for q in (['none', 'int8'] if name in int8 else ['none']):
      label = name if q == 'none' else f'{name} int8'
      t = Translator.from_workdir(workdir, max_decode_len=args.max_decode_len, batch_size=32,
                                  quantize=q)
      systems[label] = t
      row = {'workdir': os.path.abspath(workdir), 'quantize': q,
             'params': int(sum(np.size(x) for x in jax.tree_util.tree_leaves(
                 quantize.dequantize_params(jax.device_get(t.params))))),
             'weight_bytes': quantize.tree_bytes(jax.device_get(t.params)),
             'orbax_bytes': orbax_bytes(jax.device_get(t.params))}
      for mode, search in (('greedy', SearchConfig('greedy')),
                           (f'beam{args.beam}', SearchConfig('beam', beam_size=args.beam,
                                                             alpha=0.6))):
        t0 = time.perf_counter()
        hyps = t.translate(sources, search)
        row[f'bleu_{mode}'] = sacrebleu.corpus_bleu(hyps, [refs]).score
        row[f'translate_s_{mode}'] = time.perf_counter() - t0
      rows[label] = row
      print(f"  {label}: {row['params']:,} params, {row['weight_bytes'] / 2**20:.2f} MiB, "
            f"BLEU greedy {row['bleu_greedy']:.2f}, beam {row[f'bleu_beam{args.beam}']:.2f}")
      sys.stdout.flush()

  teacher = systems[next(iter(runs))]
  inputs = {r: source_batch(teacher, sources, r, args.src_len) for r in (8, 32)}
  steps = {}
  for label, t in systems.items():
    for key, fn in make_decoders(t, inputs, args.new_tokens, args.beam).items():
      steps[f'{label}|{key}'] = fn
  if not args.no_hf:
    for key, fn in make_hf(teacher.model_config, inputs, args.new_tokens, args.beam).items():
      steps[f'HF Marian (teacher size)|{key}'] = fn
  for name, fn in steps.items():
    t0 = time.perf_counter()
    fn()
    fn()
    print(f'  built {name} ({time.perf_counter() - t0:.1f} s compile + 2 calls)')
    sys.stdout.flush()
  times = common.interleaved(steps, rounds=args.rounds, steps_per_round=args.steps_per_round,
                             log=False)
  speed = {}
  for name, ts in times.items():
    label, key = name.split('|')
    rows_n = int(key.rsplit('_b', 1)[1])
    s = common.summarize(ts)
    speed.setdefault(label, {})[key] = dict(s, tokens_per_s=rows_n * args.new_tokens /
                                            s['median_s'])
  keys = [f'{m}_b{r}' for r in (8, 32) for m in ('greedy', f'beam{args.beam}')]
  print(f'\n| system | params | weights MiB | Orbax MiB | BLEU greedy | BLEU beam {args.beam} | '
        + ' | '.join(f'tok/s {k}' for k in keys) + ' |')
  print('|' + '---|' * (6 + len(keys)))
  for label in list(systems) + ([] if args.no_hf else ['HF Marian (teacher size)']):
    r = rows.get(label, {})
    cells = [label, f"{r['params']:,}" if r else '', f"{r['weight_bytes'] / 2**20:.2f}"
             if r else '', f"{r['orbax_bytes'] / 2**20:.2f}" if r else '',
             f"{r['bleu_greedy']:.2f}" if r else '', f"{r[f'bleu_beam{args.beam}']:.2f}"
             if r else '']
    cells += [f"{speed[label][k]['tokens_per_s']:.0f}" for k in keys]
    print('| ' + ' | '.join(cells) + ' |')
  if not args.no_hf:
    hf = speed['HF Marian (teacher size)']
    for label in systems:
      print(f'{label} / HF: ' + ', '.join(
          f"{k} {speed[label][k]['tokens_per_s'] / hf[k]['tokens_per_s']:.2f}x" for k in keys))
  common.write_json(args.out, {'benchmark': 'compress', 'machine': info, 'config': config,
                               'systems': rows, 'speed': speed})


if __name__ == '__main__':
  main()
