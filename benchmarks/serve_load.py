"""Load test of `python -m flaxformer_mini.serve`: concurrent clients against a real server
process, beside the in-process batched ceiling.

    python benchmarks/serve_load.py --workdir=runs/pt_en                   # 32 clients, 300 s
    python benchmarks/serve_load.py --workdir=/tmp/smoke_serve -T 20        # smoke run
    python benchmarks/serve_load.py --workdir=runs/pt_en --url=http://127.0.0.1:8000

The script starts the server on a free port (or uses ``--url``), then runs ``--clients``
clients for ``-T`` seconds after ``--ramp`` seconds unmeasured. Each client sends one
sentence per request (POST /v1/translate with ``--beam_size`` / ``--alpha``), waits for the
answer and sends the next; sentences cycle through ``--sentences`` (one per line) or column 2
(Portuguese) of the pt->en dev TSV, keeping those the model takes (at most its max_len
tokens). Reported over the measured window: requests/s and sentences/s (answers completed in
it / T), latency p50/p95/p99 (requests sent in it), errors (answers other than 200, by
status), dropped requests (no answer: connection error or ``--timeout``) and mismatches
(answers that differ from the in-process translation of the same sentence).

The ceiling, after the server has stopped: `Translator.translate` over the same sentences in
one process, batch size ``--max_batch``, same search; the median sentences/s of
``--ceiling_rounds`` passes after one warm-up pass. It sorts all sentences by length before
batching, which the server cannot do across requests, so it bounds what serving can reach.
The target is served / ceiling >= 0.70 with 32 clients, zero errors and zero dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # also puts the repo root on sys.path

DEV_TSV = os.path.join(common.REPO_ROOT, '..', 'shared', 'data', 'translate',
                       'en-pt.dev.tsv.gz')


def read_sentences(path: str) -> list[str]:
  """One sentence per line, or column 2 of a (gzipped) TSV; empty lines skipped."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt', encoding='utf-8') as f:
    lines = [l.rstrip('\n') for l in f]
  if path.endswith(('.tsv', '.tsv.gz')):
    lines = [l.split('\t')[1] for l in lines if l.count('\t') >= 1]
  return [l for l in lines if l.strip()]


def get_json(url: str) -> dict:
  import urllib.request
  with urllib.request.urlopen(url, timeout=30) as r:
    return json.loads(r.read())


def start_server(args, log_path: str) -> tuple[subprocess.Popen, str]:
  """The server process on a free port; (process, base url) once it listens."""
  warmup = 'greedy' if args.beam_size == 1 else 'default'
  cmd = [sys.executable, '-m', 'flaxformer_mini.serve', f'--workdir={args.workdir}',
         '--port=0', f'--max_batch={args.max_batch}', f'--max_wait_ms={args.max_wait_ms}',
         f'--wait_fraction={args.wait_fraction}', f'--batching={args.batching}',
         f'--chunk_steps={args.chunk_steps}', f'--warmup={warmup}']
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(cmd, cwd=common.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + args.start_timeout
  while time.time() < deadline:
    with open(log_path) as f:
      text = f.read()
    if ' on http://' in text:
      return proc, 'http://' + text.split(' on http://')[1].split('/v1/')[0]
    if proc.poll() is not None:
      raise RuntimeError(f'the server exited with {proc.returncode}:\n{text[-3000:]}')
    time.sleep(0.5)
  stop_server(proc)
  raise RuntimeError(f'the server did not listen within {args.start_timeout} s; see {log_path}')


def stop_server(proc: subprocess.Popen) -> int:
  """SIGTERM (the server drains), then SIGKILL if it is still there after 120 s."""
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
    try:
      return proc.wait(120)
    except subprocess.TimeoutExpired:
      proc.kill()
  return proc.wait()


async def load(url: str, sentences: list[str], body: dict, args) -> list[dict]:
  """Runs the clients; one record per request: sent/done times, status, answer."""
  import aiohttp
  records: list[dict] = []
  start = time.perf_counter()
  stop_at = start + args.ramp + args.seconds
  counter = iter(range(10 ** 12))

  async def client(session):
    while time.perf_counter() < stop_at:
      i = next(counter) % len(sentences)
      rec = {'i': i, 'sent': time.perf_counter() - start}
      try:
        async with session.post(f'{url}/v1/translate',
                                json={'texts': [sentences[i]], **body}) as r:
          reply = await r.json(content_type=None)
          rec['status'] = r.status
          if r.status == 200:
            rec['answer'] = reply['translations'][0]
          else:
            rec['error'] = reply.get('error', '')[:200]
      except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        rec['status'], rec['error'] = 'dropped', f'{type(e).__name__}: {e}'[:200]
      rec['done'] = time.perf_counter() - start
      records.append(rec)

  timeout = aiohttp.ClientTimeout(total=args.timeout)
  async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.clients),
                                   timeout=timeout) as session:
    await asyncio.gather(*(client(session) for _ in range(args.clients)))
  return records


def served_stats(records: list[dict], args) -> dict:
  lo, hi = args.ramp, args.ramp + args.seconds
  ok_done = [r for r in records if r['status'] == 200 and lo <= r['done'] < hi]
  measured = [r for r in records if lo <= r['sent'] < hi]
  latencies = [r['done'] - r['sent'] for r in measured if r['status'] == 200]
  errors = collections.Counter(str(r['status']) for r in records
                               if r['status'] not in (200, 'dropped'))
  pct = (lambda q: float(np.percentile(latencies, q))) if latencies else (lambda q: None)
  return {'requests_per_s': len(ok_done) / args.seconds,
          'sentences_per_s': len(ok_done) / args.seconds,  # one sentence per request
          'latency_p50_s': pct(50), 'latency_p95_s': pct(95), 'latency_p99_s': pct(99),
          'latency': common.summarize(latencies) if latencies else None,
          'requests': len(records), 'measured_requests': len(measured),
          'errors': sum(errors.values()), 'errors_by_status': dict(errors),
          'dropped': sum(r['status'] == 'dropped' for r in records),
          'first_errors': [r['error'] for r in records if 'error' in r][:5]}


def ceiling(args, sentences: list[str], max_len: int) -> tuple[dict, list[str]]:
  """Translator.translate over ``sentences``: sentences/s per pass after a warm-up pass."""
  import jax

  from flaxformer_mini import translate
  translator = translate.Translator.from_workdir(args.workdir, max_decode_len=max_len,
                                                 batch_size=args.max_batch)
  search = (translate.SearchConfig('greedy') if args.beam_size == 1 else
            translate.SearchConfig('beam', beam_size=args.beam_size, alpha=args.alpha))
  out = translator.translate(sentences, search)  # compiles
  times = [common.time_call(lambda: translator.translate(sentences, search))
           for _ in range(args.ceiling_rounds)]
  stats = common.summarize(times)
  return {'sentences_per_s': len(sentences) / stats['median_s'], 'pass': stats,
          'sentences': len(sentences), 'device': str(jax.devices()[0])}, out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='the run the server (and the ceiling) load')
  p.add_argument('--url', default='', help='use this running server instead of starting one')
  p.add_argument('--clients', type=int, default=32)
  p.add_argument('-T', '--seconds', type=float, default=300.0, help='measured seconds')
  p.add_argument('--ramp', type=float, default=5.0, help='unmeasured seconds first')
  p.add_argument('--sentences', default=DEV_TSV,
                 help='one sentence per line, or a TSV whose column 2 is the source')
  p.add_argument('--beam_size', type=int, default=4, help='1 = greedy')
  p.add_argument('--alpha', type=float, default=0.6)
  p.add_argument('--max_batch', type=int, default=32, help='server --max_batch, ceiling batch')
  p.add_argument('--max_wait_ms', type=float, default=10.0, help='server --max_wait_ms')
  p.add_argument('--wait_fraction', type=float, default=0.05, help='server --wait_fraction')
  p.add_argument('--batching', choices=('step', 'request'), default='step',
                 help='server --batching')
  p.add_argument('--chunk_steps', type=int, default=4, help='server --chunk_steps')
  p.add_argument('--timeout', type=float, default=120.0, help='seconds before a request drops')
  p.add_argument('--start_timeout', type=float, default=1200.0, help='server start-up limit')
  p.add_argument('--ceiling_rounds', type=int, default=3)
  p.add_argument('--out', default='', help='write the JSON result here')
  p.add_argument('--no-huge-pages', action='store_true',
                 help='do not re-execute with glibc.malloc.hugetlb=1 (see common.huge_pages)')
  args = p.parse_args(argv)
  common.huge_pages(not args.no_huge_pages)  # the server process inherits the setting

  from flaxformer_mini.data.tokenizer import load_tokenizer
  info = common.machine_info()
  proc, log_path = None, ''
  try:
    if args.url:
      url = args.url.rstrip('/')
    else:
      fd, log_path = tempfile.mkstemp(prefix='serve_load_', suffix='.log')
      os.close(fd)
      print(f'starting the server (log: {log_path}) ...', flush=True)
      t0 = time.perf_counter()
      proc, url = start_server(args, log_path)
      print(f'server up in {time.perf_counter() - t0:.1f} s at {url}', flush=True)
    model = get_json(f'{url}/v1/model')
    if model['task'] != 'translation':
      raise SystemExit(f'error: the server holds a {model["task"]} run; the load test '
                       'translates')
    tokenizer = load_tokenizer(os.path.join(args.workdir, 'spm.model'))
    read = read_sentences(args.sentences)
    sentences = [s for s, ids in zip(read, tokenizer.encode(read))
                 if len(ids) <= model['model']['max_len']]
    if not sentences:
      raise SystemExit(f'error: no sentence of {args.sentences} fits max_len='
                       f'{model["model"]["max_len"]} tokens')
    body = {'beam_size': args.beam_size} if args.beam_size == 1 else {
        'beam_size': args.beam_size, 'alpha': args.alpha}
    config = {'workdir': os.path.abspath(args.workdir), 'checkpoint_step':
              model['checkpoint_step'], 'model': {k: model['model'][k] for k in (
                  'vocab_size', 'd_model', 'num_heads', 'd_ff', 'num_encoder_layers',
                  'num_decoder_layers', 'max_len')},
              'server': url if args.url else 'started here', 'clients': args.clients,
              'seconds': args.seconds, 'ramp_s': args.ramp, 'request': body,
              'max_len': model['max_len'], 'max_batch': model['max_batch'],
              'max_wait_ms': model['max_wait_ms'],
              'wait_fraction': model.get('wait_fraction'),
              'batching': model.get('batching', 'request'), 'chunk_steps': args.chunk_steps,
              'sentences_file': args.sentences,
              'sentences': len(sentences), 'sentences_skipped_too_long':
              len(read) - len(sentences), 'timeout_s': args.timeout}
    common.print_header('serve_load', info, config)
    if model['max_batch'] != args.max_batch:
      print(f'note: the server batches {model["max_batch"]} sentences; the ceiling uses '
            f'--max_batch={args.max_batch}')
    print(f'loading for {args.ramp:.0f} + {args.seconds:.0f} s ...', flush=True)
    before = get_json(f'{url}/healthz')
    records = asyncio.run(load(url, sentences, body, args))
    after = get_json(f'{url}/healthz')
  finally:
    if proc is not None:
      code = stop_server(proc)
      print(f'server stopped, exit status {code}', flush=True)
  served = served_stats(records, args)
  batches = after['batches_run'] - before['batches_run']
  served['mean_batch'] = (after['texts_run'] - before['texts_run']) / max(1, batches)
  steps = after.get('steps_run', 0) - before.get('steps_run', 0)
  if steps:  # step-level batching: sentences in the pool per decoding call
    served['mean_busy_rows'] = (after['rows_stepped'] - before['rows_stepped']) / steps

  used = sorted({r['i'] for r in records})
  print(f'ceiling: Translator.translate over the {len(used)} sentences sent ...', flush=True)
  roof, offline = ceiling(args, [sentences[i] for i in used], model['max_len'])
  answer_of = dict(zip(used, offline))
  served['mismatches'] = sum(r.get('answer', answer_of[r['i']]) != answer_of[r['i']]
                             for r in records)
  ratio = served['sentences_per_s'] / roof['sentences_per_s']
  ms = lambda v: 'n/a' if v is None else f'{v * 1e3:.0f} ms'
  print(f"served:   {served['requests_per_s']:.1f} requests/s = {served['sentences_per_s']:.1f} "
        f"sentences/s; latency p50 {ms(served['latency_p50_s'])}, p95 "
        f"{ms(served['latency_p95_s'])}, p99 {ms(served['latency_p99_s'])} "
        f"({served['measured_requests']} requests measured, {served['requests']} sent; "
        + (f"{served['mean_busy_rows']:.1f} of {model['max_batch']} slots busy per step)"
           if 'mean_busy_rows' in served else
           f"{served['mean_batch']:.1f} sentences per batch)"))
  print(f"failures: {served['errors']} errors {served['errors_by_status']}, "
        f"{served['dropped']} dropped, {served['mismatches']} answers differing from "
        'Translator')
  for e in served['first_errors']:
    print(f'  e.g. {e}')
  print(f"ceiling:  {roof['sentences_per_s']:.1f} sentences/s (median of "
        f"{roof['pass']['n']} passes of {roof['sentences']} sentences, "
        f"{roof['pass']['median_s']:.2f} s each, IQR {roof['pass']['iqr_s']:.2f} s; "
        f"{roof['device']})")
  print(f'served / ceiling: {ratio:.2f} (target >= 0.70)')
  common.write_json(args.out, {'benchmark': 'serve_load', 'machine': info, 'config': config,
                               'served': served, 'ceiling': roof, 'ratio': ratio,
                               'server_log': log_path, 'records': records})
  return 0 if served['errors'] == 0 and served['dropped'] == 0 else 1


if __name__ == '__main__':
  sys.exit(main())
