"""flaxformer_mini.serve: the batcher alone; the real server process on a tiny trained run
(concurrent requests equal `Translator`, bad requests get 4xx and never fail a burst's good
ones, a disconnected client is skipped, SIGTERM drains and exits 0); the summarization and
classification and QA endpoints served in-process, against `Summarizer`, `Classifier` and
`QuestionAnswerer`, and the QA requests refused with their reasons."""

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest

from flaxformer_mini import checkpoints, serve, translate
from flaxformer_mini.data.tokenized import file_sha256

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ['O certificado diverge.', 'Eu gosto de gatos.', 'A casa é muito grande e bonita.',
           'Obrigado.', 'Nós vamos para a escola amanhã de manhã.', 'Bom dia.',
           'A chave pública não foi encontrada.', 'Abrir o ficheiro.']
MAX_BATCH = 8
SERVER_FLAGS = [f'--max_batch={MAX_BATCH}', '--max_wait_ms=20', '--max_texts=8',
                '--max_chars=300', '--max_lens=4', '--max_searches=6']


def _post(port, body, path='/v1/translate', timeout=120):
  """(status, parsed JSON) of a POST; body: dict or raw bytes."""
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  req = urllib.request.Request(f'http://127.0.0.1:{port}{path}', data=data,
                               headers={'content-type': 'application/json'})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _get(port, path):
  with urllib.request.urlopen(f'http://127.0.0.1:{port}{path}', timeout=30) as r:
    return json.loads(r.read())


def _wait_for(port, field, at_least=1, timeout=60):
  """Polls /healthz until ``field`` (queued, running) reaches ``at_least``."""
  deadline = time.time() + timeout
  while _get(port, '/healthz')[field] < at_least:
    assert time.time() < deadline, f'/healthz {field} stayed below {at_least}'
    time.sleep(0.005)


# ------------------------------------------------------------------------------ batcher


def test_batcher_groups_by_key_and_maps_results_back():
  batches = []
  release = threading.Event()

  def run(key, items):
    release.wait(10)
    batches.append((key, list(items)))
    return [f'{key}:{x}' for x in items]

  batcher = serve.DynamicBatcher(run, max_batch=4, max_wait_ms=0)
  try:
    first = batcher.submit('a', [0])  # occupies the worker until released
    while batcher.queued:
      time.sleep(0.001)
    jobs = [batcher.submit(k, xs) for k, xs in
            [('a', [1, 2]), ('b', [3]), ('a', [4]), ('a', [5, 6]), ('b', [7]), ('a', [8])]]
    gone = batcher.submit('a', [9])
    assert gone.cancel()  # a client that left before its batch started
    solo = batcher.submit('b', [10], alone=True)
    release.set()
    assert first.result(10) == ['a:0']
    assert [f.result(10) for f in jobs] == [['a:1', 'a:2'], ['b:3'], ['a:4'], ['a:5', 'a:6'],
                                            ['b:7'], ['a:8']]
    assert solo.result(10) == ['b:10']
  finally:
    batcher.close(10)
  # Oldest first; same-key requests join up to max_batch items; 'alone' never joins.
  assert batches == [('a', [0]), ('a', [1, 2, 4]), ('b', [3, 7]), ('a', [5, 6, 8]),
                     ('b', [10])]
  assert batcher.abandoned == 1
  with pytest.raises(serve.RequestError, match='shutting down'):
    batcher.submit('a', [1])


def test_batcher_waits_for_the_clients_it_just_answered():
  # b arrives while a runs, and waits longer than max_wait; c is sent once a is answered.
  batches = []
  release = threading.Event()

  def run(key, items):
    batches.append(items)
    if items == ['a']:
      release.wait(10)
    return items

  batcher = serve.DynamicBatcher(run, max_batch=4, max_wait_ms=300)
  try:
    a = batcher.submit(None, ['a'])
    while not batcher.running:
      time.sleep(0.001)
    b = batcher.submit(None, ['b'])
    time.sleep(0.4)
    release.set()
    assert a.result(10) == ['a']
    c = batcher.submit(None, ['c'])
    assert (b.result(10), c.result(10)) == (['b'], ['c'])
  finally:
    batcher.close(10)
  assert batches == [['a'], ['b', 'c']]


@pytest.mark.parametrize('wait_fraction, expected', [
    (0.0, [['a'], ['b'], ['c']]),          # 10 ms: c, sent 200 ms after a's answer, misses b
    (1.0, [['a'], ['b', 'c']]),            # a ran 0.6 s: b waits that long for company
])
def test_batcher_wait_grows_with_the_previous_batch(wait_fraction, expected):
  batches = []

  def run(key, items):
    batches.append(items)
    if items == ['a']:
      time.sleep(0.6)
    return items

  batcher = serve.DynamicBatcher(run, max_batch=4, max_wait_ms=10, wait_fraction=wait_fraction)
  try:
    a = batcher.submit(None, ['a'])
    while not batcher.running:
      time.sleep(0.001)
    b = batcher.submit(None, ['b'])
    assert a.result(10) == ['a']
    time.sleep(0.2)
    c = batcher.submit(None, ['c'])
    assert (b.result(10), c.result(10)) == (['b'], ['c'])
  finally:
    batcher.close(10)
  assert batches == expected
  with pytest.raises(ValueError, match='wait_fraction=2'):
    serve.DynamicBatcher(run, wait_fraction=2)


def test_batcher_close_finishes_queued_requests_and_bounds_the_queue():
  release = threading.Event()
  batcher = serve.DynamicBatcher(lambda key, items: release.wait(10) and [2 * x for x in items],
                                 max_batch=2, max_wait_ms=0, max_queue=5)
  jobs = [batcher.submit(None, [0])]
  while batcher.queued:  # the worker holds the first request
    time.sleep(0.001)
  jobs += [batcher.submit(None, [i, i]) for i in (1, 2)]
  with pytest.raises(serve.RequestError, match='max_queue=5') as e:
    batcher.submit(None, [3, 3])
  assert e.value.status == 503
  timer = threading.Timer(0.2, release.set)  # closing starts while two requests are queued
  timer.start()
  try:
    batcher.close(10)
  finally:
    timer.cancel()
  assert [f.result(0) for f in jobs] == [[0], [2, 2], [4, 4]]


class _CountdownPool:
  """A fake step-level pool: item ``n`` takes ``n`` steps; the log records who ran."""

  def __init__(self, slots: int, log: list, fail_on=None):
    self.slots, self.log, self.fail_on = slots, log, fail_on
    self.running = {}  # tag -> steps left

  free = property(lambda self: self.slots - len(self.running))
  busy = property(lambda self: len(self.running))

  def start(self, items):
    assert len(items) <= self.free
    for tag, n in items:
      if n == self.fail_on:
        raise RuntimeError(f'cannot run {n}')
      self.running[tag] = n

  def advance(self, max_steps):
    self.log.append(sorted(n for n in self.running.values()))
    for _ in range(max_steps):
      self.running = {t: n - 1 for t, n in self.running.items()}
      done = [(t, f'done {t[0].items[t[1]]}') for t, n in self.running.items() if n <= 0]
      if done:
        for t, _ in done:
          del self.running[t]
        return done
    return []

  def reset(self):
    self.running = {}


def test_step_batcher_lets_texts_join_and_leave_between_steps():
  steps, batches = [], []
  pool = _CountdownPool(3, steps)
  release = threading.Event()

  def run(key, items):  # requests without a pool
    release.wait(10)
    batches.append((key, items))
    return [f'ran {x}' for x in items]

  batcher = serve.StepBatcher(run, lambda key: pool if key == 'beam' else None, max_batch=3,
                              max_wait_ms=0, chunk_steps=1)
  try:
    blocker = batcher.submit('greedy', [0])  # holds the worker until released
    while batcher.queued:
      time.sleep(0.001)
    long = batcher.submit('beam', [9, None, 2])  # an empty text needs no slot
    short = [batcher.submit('beam', [n]) for n in (1, 1, 3)]
    gone = batcher.submit('beam', [5])
    assert gone.cancel()
    later = batcher.submit('greedy', [7])  # no pool: waits until the pool is idle
    after = batcher.submit('beam', [1])    # first come, first served: after `later`
    release.set()
    assert blocker.result(10) == ['ran 0']
    assert long.result(10) == ['done 9', '', 'done 2']
    assert [f.result(10) for f in short] == [['done 1'], ['done 1'], ['done 3']]
    assert later.result(10) == ['ran 7'] and after.result(10) == ['done 1']
  finally:
    batcher.close(10)
  assert batches == [('greedy', [0]), ('greedy', [7])]
  # 9 and 2 start with the first 1; the next texts take freed slots between steps; the
  # greedy request waits for the pool to drain (9's last step) and `after` waits for it.
  assert steps[:5] == [[1, 2, 9], [1, 1, 8], [3, 7], [2, 6], [1, 5]]
  assert steps[-2:] == [[1], [1]]
  assert batcher.abandoned == 1 and batcher.items_run == 9
  assert pool.busy == 0


def test_step_batcher_fails_only_the_requests_in_a_failed_step():
  pool = _CountdownPool(2, [], fail_on=66)
  batcher = serve.StepBatcher(lambda key, items: items, lambda key: pool, max_batch=2,
                              max_wait_ms=0)
  try:
    bad = batcher.submit('beam', [66, 1, 1, 1])  # its first two texts start together
    with pytest.raises(RuntimeError, match='cannot run 66'):
      bad.result(10)
    assert batcher.submit('beam', [2, 1]).result(10) == ['done 2', 'done 1']
  finally:
    batcher.close(10)
  def no_pool(key):
    raise MemoryError('no room for a pool')

  batcher = serve.StepBatcher(lambda key, items: items, no_pool, max_batch=2, max_wait_ms=0)
  try:
    with pytest.raises(MemoryError, match='no room'):
      batcher.submit('beam', [1]).result(10)
    assert batcher.submit('beam', [2]).exception(10) is not None  # the worker is still there
  finally:
    batcher.close(10)
  with pytest.raises(ValueError, match='chunk_steps=0'):
    serve.StepBatcher(lambda key, items: items, lambda key: None, chunk_steps=0)


# ------------------------------------------------------------------- the server process


def _start(run_dir, log_path, *flags):
  """The server process on a free port; returns (process, port) once it listens."""
  cmd = [sys.executable, '-m', 'flaxformer_mini.serve', f'--workdir={run_dir}', '--port=0',
         *flags]
  with open(log_path, 'w') as log:  # a file, not a pipe: the server never blocks on its log
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 300
    while time.time() < deadline:
      with open(log_path) as f:
        text = f.read()
      if ' on http://127.0.0.1:' in text:
        return proc, int(text.split(' on http://127.0.0.1:')[1].split('/')[0])
      if proc.poll() is not None:
        raise AssertionError(f'server exited with {proc.returncode}: {text[-3000:]}')
      time.sleep(0.2)
    raise AssertionError(f'server did not come up in 300 s: {text[-3000:]}')
  except BaseException:
    _stop(proc)
    raise


def _stop(proc):
  if proc.poll() is None:
    proc.kill()
  proc.wait(30)


@pytest.fixture(scope='module')
def server(smoke_run_dir, tmp_path_factory):
  proc, port = _start(smoke_run_dir, tmp_path_factory.mktemp('serve') / 'server.log',
                      *SERVER_FLAGS, '--warmup=greedy')
  try:
    yield port
  finally:
    _stop(proc)


@pytest.fixture(scope='module')
def translator(smoke_run_dir):
  return translate.Translator.from_workdir(smoke_run_dir, batch_size=MAX_BATCH)


@pytest.mark.slow
def test_concurrent_single_sentences_equal_translator(server, translator):
  want = translator.translate(SOURCES, translate.SearchConfig('greedy'))
  before = _get(server, '/healthz')
  with concurrent.futures.ThreadPoolExecutor(len(SOURCES)) as pool:
    results = list(pool.map(lambda s: _post(server, {'texts': [s], 'beam_size': 1}), SOURCES))
  assert [status for status, _ in results] == [200] * len(SOURCES)
  assert [body['translations'] for _, body in results] == [[w] for w in want]
  after = _get(server, '/healthz')
  # The 8 requests shared batches, in shapes --warmup=greedy compiled at start-up.
  assert after['batches_run'] - before['batches_run'] < len(SOURCES)
  assert after['compiled'] == before['compiled']


@pytest.mark.slow
def test_concurrent_beam_requests_share_steps_and_equal_translator(server, translator):
  want = translator.translate(SOURCES)  # the default search: beam 4, step-level batching
  before = _get(server, '/healthz')
  with concurrent.futures.ThreadPoolExecutor(len(SOURCES)) as pool:
    results = list(pool.map(lambda s: _post(server, {'texts': [s]}), SOURCES))
  assert [body['translations'] for _, body in results] == [[w] for w in want]
  after = _get(server, '/healthz')
  steps = after['steps_run'] - before['steps_run']
  assert steps and (after['rows_stepped'] - before['rows_stepped']) / steps > 1  # shared steps


@pytest.mark.slow
def test_beam_sampling_and_max_len_equal_translator(server, translator):
  texts = SOURCES[:3] + ['']
  status, body = _post(server, {'texts': texts})  # the default search: beam 4, alpha 0.6
  assert status == 200 and (body['method'], body['beam_size'], body['alpha']) == ('beam', 4, 0.6)
  assert body['translations'] == translator.translate(texts)
  sample = dict(temperature=0.8, top_k=20, top_p=0.9, seed=3)
  status, body = _post(server, {'texts': texts, 'sample': True, **sample})
  assert status == 200 and body['method'] == 'sample'
  assert body['translations'] == translator.translate(
      texts, translate.SearchConfig('sample', **sample))
  status, body = _post(server, {'texts': texts, 'beam_size': 1, 'max_len': 4})
  short = translate.Translator(translator.model_config, translator.params,
                               translator.tokenizer, max_decode_len=4, batch_size=MAX_BATCH)
  assert status == 200 and body['max_len'] == 4
  assert body['translations'] == short.translate(texts, translate.SearchConfig('greedy'))


LONG = ' '.join(['Nós vamos para a escola amanhã.'] * 8)  # > 32 tokens, < 300 characters


@pytest.mark.slow
@pytest.mark.parametrize('body, status, message', [
    (b'', 422, 'body'),
    (b'{"texts": ', 422, 'JSON'),
    ({'texts': 'Bom dia.'}, 422, 'texts: Input should be a valid list'),
    ({'texts': [1, 2]}, 422, 'texts.0'),
    ({'texts': []}, 422, 'texts is empty'),
    ({'texts': ['a'] * 9}, 413, 'max_texts=8'),
    ({'texts': ['a' * 301]}, 413, 'max_chars=300'),
    ({'texts': ['Olá.', LONG]}, 413, 'texts[1] has'),
    ({'texts': ['Olá.'], 'beam': 4}, 422, 'beam: Extra inputs'),
    ({'texts': ['Olá.'], 'beam_size': 0}, 422, 'beam_size'),
    ({'texts': ['Olá.'], 'beam_size': '4'}, 422, 'beam_size'),
    ({'texts': ['Olá.'], 'alpha': float('nan')}, 422, 'alpha'),
    ({'texts': ['Olá.'], 'max_len': 1000}, 422, 'max_len=1000 is not served'),
    ({'texts': ['Olá.'], 'top_p': 0.5}, 422, 'top_p applies only with "sample": true'),
    ({'texts': ['Olá.'], 'sample': True, 'beam_size': 2}, 422, 'beam_size does not apply'),
    ({'texts': ['Olá.'], 'sample': True, 'top_p': 0}, 422, 'top_p'),
    ({'texts': ['Olá.'], 'sample': True, 'top_k': 100000}, 422, 'top_k=100000 exceeds'),
    ({'texts': ['Olá.'], 'sample': True, 'seed': -1}, 422, 'seed'),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, body, status, message):
  got, reply = _post(server, body)
  assert got == status, reply
  assert message in reply['error'], reply
  ok, reply = _post(server, {'texts': ['Bom dia.'], 'beam_size': 1})
  assert ok == 200 and len(reply['translations']) == 1


@pytest.mark.slow
def test_one_bad_request_in_a_burst_does_not_fail_the_others(server, translator):
  want = translator.translate(SOURCES, translate.SearchConfig('greedy'))
  good = [{'texts': [s], 'beam_size': 1} for s in SOURCES]
  bad = [{'texts': [LONG], 'beam_size': 1}, {'texts': ['Olá.', 7], 'beam_size': 1},
         {'texts': ['Olá.'], 'beam_size': 1, 'max_len': 5}]
  burst = good[:3] + bad[:1] + good[3:6] + bad[1:] + good[6:]
  with concurrent.futures.ThreadPoolExecutor(len(burst)) as pool:
    results = list(pool.map(lambda b: _post(server, b), burst))
  is_bad = [b in bad for b in burst]
  assert [r for r, x in zip(results, is_bad) if not x] == [(200, r[1]) for r, x in
                                                           zip(results, is_bad) if not x]
  assert [r[1]['translations'] for r, x in zip(results, is_bad) if not x] == [[w] for w in want]
  assert [r[0] for r, x in zip(results, is_bad) if x] == [413, 422, 422]


@pytest.mark.slow
def test_model_info_and_other_endpoints(server, translator, smoke_run_dir):
  info = _get(server, '/v1/model')
  assert (info['task'], info['endpoint'], info['checkpoint_step']) == (
      'translation', '/v1/translate', 40)
  assert info['model']['vocab_size'] == translator.model_config.vocab_size
  assert info['tokenizer_sha256'] == file_sha256(os.path.join(smoke_run_dir, 'spm.model'))
  assert (info['max_batch'], info['max_lens'], info['limits']['max_texts']) == (8, [4, 8], 8)
  status, reply = _post(server, {'texts': ['Bom dia.']}, path='/v1/summarize')
  assert status == 404 and 'needs a summarization run' in reply['error']
  assert 'POST /v1/translate' in reply['error']
  status, reply = _post(server, {'texts': ['Bom dia.']}, path='/v1/classify')
  assert status == 404 and 'needs a classification run' in reply['error']
  status, reply = _post(server, {'texts': ['Bom dia.']}, path='/v2/translate')
  assert status == 404 and 'no endpoint /v2/translate' in reply['error']


@pytest.mark.slow
def test_disconnected_client_is_skipped_and_the_queue_goes_on(server, translator):
  before = _get(server, '/healthz')['abandoned']
  pool = concurrent.futures.ThreadPoolExecutor(1)
  blocker = pool.submit(_post, server, {'texts': SOURCES, 'beam_size': 3, 'alpha': 1.0})
  try:
    _wait_for(server, 'running')  # the blocker compiles its search: the worker is busy
    payload = json.dumps({'texts': SOURCES[:2], 'beam_size': 1}).encode()
    with socket.create_connection(('127.0.0.1', server)) as s:
      s.sendall(b'POST /v1/translate HTTP/1.1\r\nHost: x\r\n'
                b'Content-Type: application/json\r\nContent-Length: %d\r\n\r\n'
                % len(payload) + payload)
      _wait_for(server, 'queued')  # then hang up before the answer
    assert blocker.result(120)[0] == 200
  finally:
    pool.shutdown()
  status, body = _post(server, {'texts': SOURCES[:2], 'beam_size': 1})
  assert status == 200
  assert body['translations'] == translator.translate(SOURCES[:2],
                                                      translate.SearchConfig('greedy'))
  assert _get(server, '/healthz')['abandoned'] == before + 1


@pytest.mark.slow
def test_search_settings_are_bounded(server):
  # The module's server allows 6 (search, max_len) settings; the tests before use 5.
  replies = [_post(server, {'texts': ['Olá.'], 'beam_size': 2, 'alpha': a})
             for a in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7)]
  statuses = [s for s, _ in replies]
  assert 422 in statuses and statuses == sorted(statuses)  # once refused, always refused
  assert 'max_searches=6' in replies[-1][1]['error'], replies[-1]
  assert _post(server, {'texts': ['Olá.'], 'beam_size': 1})[0] == 200  # known: still served


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_then_exits_0(smoke_run_dir, tmp_path):
  proc, port = _start(smoke_run_dir, tmp_path / 'server.log', *SERVER_FLAGS, '--warmup=none')
  try:
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      futures = [pool.submit(_post, port, {'texts': SOURCES, 'sample': True})
                 for _ in range(6)]  # sampling runs alone: the first compiles, five wait
      _wait_for(port, 'queued', 3)
      proc.send_signal(signal.SIGTERM)
      results = [f.result(timeout=300) for f in futures]
    assert [status for status, _ in results] == [200] * 6
    assert proc.wait(120) == 0
    with pytest.raises(urllib.error.URLError, match='Connection refused'):
      _get(port, '/healthz')
  finally:
    _stop(proc)


def test_load_newest_skips_unreadable_checkpoints(tmp_path):
  for name in ('10', '20', '30', '40.orbax-checkpoint-tmp-1'):  # 40 is still being written
    (tmp_path / 'checkpoints' / name).mkdir(parents=True)
  calls = []

  def load(workdir, step, **kwargs):
    calls.append(step)
    if step == 30:
      raise RuntimeError('no readable checkpoint')
    return kwargs

  assert serve.load_newest(load, str(tmp_path), None, batch_size=4) == ({'batch_size': 4}, 20)
  assert calls == [30, 20]
  assert serve.load_newest(load, str(tmp_path), 10) == ({}, 10)
  with pytest.raises(FileNotFoundError, match='no finished checkpoint'):
    serve.load_newest(load, str(tmp_path / 'nothing'), None)


def _fake_run(path, task, predictor_class, predictor, monkeypatch):
  """A run dir whose loader returns ``predictor``: load_service's routing, no training."""
  (path / 'checkpoints' / '7').mkdir(parents=True)
  (path / 'config.json').write_text(json.dumps({'task': task}))
  monkeypatch.setattr(predictor_class, 'from_workdir',
                      classmethod(lambda cls, workdir, step, **kwargs: predictor))


def test_runs_of_other_tasks_are_refused(tmp_path, capsys):
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump({'task': 'lm'}, f)
  assert serve.main([f'--workdir={tmp_path}']) == 2
  assert "is a 'lm' run; the server serves ['classification', 'distill', " \
         "'distill_classifier', 'qa', 'summarization', 'translation'] runs" \
         in capsys.readouterr().err
  assert serve.main([f'--workdir={tmp_path}/nothing']) == 2
  assert 'run directory not found' in capsys.readouterr().err


# --------------------------------------------------- other tasks, served in-process


@contextlib.contextmanager
def _serving(service, max_batch):
  """Serves ``service`` from this process on a free port; stops it on every outcome.
  Beam searches go through step-level batching, as in the server's default."""
  batcher = serve.make_batcher(service, max_wait_ms=20)
  assert batcher.max_batch == max_batch
  assert isinstance(batcher, serve.StepBatcher) == hasattr(service, 'pools')
  server = serve.make_server(
      serve.create_app(service, batcher, serve.model_info(service, batcher, '.', 0)),
      '127.0.0.1', 0)
  thread = None
  try:
    thread, port = serve.start_server(server)
    yield port
  finally:
    server.should_exit = True
    if thread is not None:
      thread.join(60)
    batcher.close(60)


@pytest.mark.slow
def test_summarize_endpoint_equals_summarizer(smoke_run_dir, tmp_path, monkeypatch):
  from flaxformer_mini.config import TransformerConfig
  from flaxformer_mini.tasks.summarization import Summarizer
  config, params, tokenizer = checkpoints.load_for_inference(smoke_run_dir)
  config.task = 'summarization'
  config.data.max_source_len = 6  # cuts the longer documents, as in training
  config.eval.beam_size, config.eval.max_decode_len = 2, 8
  summarizer = Summarizer(TransformerConfig.from_dict(config.model), params, tokenizer,
                          config=config, batch_size=4)
  _fake_run(tmp_path, 'summarization', Summarizer, summarizer, monkeypatch)
  service, step = serve.load_service(str(tmp_path), max_batch=4)
  assert (service.task, service.path, step) == ('summarization', '/v1/summarize', 7)
  documents = [SOURCES[4] + ' ' + SOURCES[2], SOURCES[1], '', SOURCES[6]]
  with _serving(service, 4) as port:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      results = list(pool.map(lambda d: _post(port, {'texts': [d]}, '/v1/summarize'),
                              documents))
    assert [s for s, _ in results] == [200] * 4
    assert [b['summaries'][0] for _, b in results] == summarizer.summarize(documents)
    assert (results[0][1]['method'], results[0][1]['beam_size']) == ('beam', 2)
    info = _get(port, '/v1/model')
    assert (info['task'], info['max_source_len']) == ('summarization', 6)
    status, reply = _post(port, {'texts': ['Bom dia.']})
    assert status == 404 and 'holds a summarization run' in reply['error']


def _tiny_classifier(tmp_path):
  from flaxformer_mini.data import wordpiece
  from flaxformer_mini.tasks.classification import Classifier, TextClassifier
  from flaxformer_mini.variants import bert
  words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'cat', 'dog', 'sat', 'on',
           'mat', 'a', 'good', 'bad', 'film', '.']
  (tmp_path / 'vocab.txt').write_text('\n'.join(words) + '\n')
  tokenizer = wordpiece.WordPiece.from_file(str(tmp_path / 'vocab.txt'))
  cfg = bert.BertConfig.from_dict({'encoder': dict(
      vocab_size=len(words), d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
      max_len=16), 'num_labels': 3})
  ids = np.zeros((1, 16), np.int32)
  params = TextClassifier(cfg).init(jax.random.key(0), ids, ids + 1)['params']
  return Classifier(cfg, 'cls', params, tokenizer, ['neg', 'neutral', 'pos'], max_len=16,
                    batch_size=4, bucket=8)


@pytest.mark.slow
def test_classify_endpoint_equals_classifier(tmp_path, monkeypatch):
  from flaxformer_mini.tasks.classification import Classifier
  classifier = _tiny_classifier(tmp_path)
  _fake_run(tmp_path / 'run', 'classification', Classifier, classifier, monkeypatch)
  service, step = serve.load_service(str(tmp_path / 'run'), max_batch=4)
  assert (service.task, service.path, step) == ('classification', '/v1/classify', 7)
  texts = ['the cat sat on the mat .', 'a good film', 'a bad film .', 'the dog',
           'the dog sat on a mat and the cat sat on the dog .']
  want = classifier.classify(texts)
  with _serving(service, 4) as port:
    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
      results = list(pool.map(lambda t: _post(port, {'texts': [t]}, '/v1/classify'), texts))
    assert [s for s, _ in results] == [200] * len(texts)
    got = [b['predictions'][0] for _, b in results]
    assert [g['label'] for g in got] == [w.label for w in want]
    np.testing.assert_allclose([list(g['probabilities'].values()) for g in got],
                               [list(w.probabilities.values()) for w in want], atol=1e-5)
    status, reply = _post(port, {'texts': ['a good film', ' ']}, '/v1/classify')
    assert status == 422 and 'texts[1] is empty' in reply['error']
    status, reply = _post(port, {'texts': ['a'], 'beam_size': 1}, '/v1/classify')
    assert status == 422 and 'beam_size' in reply['error']
    info = _get(port, '/v1/model')
    assert (info['task'], info['labels']) == ('classification', ['neg', 'neutral', 'pos'])
    status, reply = _post(port, {'texts': ['Bom dia.']})
    assert status == 404 and 'holds a classification run' in reply['error']
    status, reply = _post(port, {'questions': ['a?'], 'context': 'a'}, '/v1/answer')
    assert status == 404 and '/v1/answer needs a qa run' in reply['error']


QA_WORDS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'cat', 'dog', 'sat', 'on',
            'mat', 'a', 'who', 'where', 'what', 'did', 'red', 'big', '?', '.']
QA_CONTEXTS = ['the big red cat sat on the mat . a dog sat on the cat . the mat sat on a dog .',
               'a dog .', 'the cat sat . the dog sat . what sat on the red mat ? a big cat did .']


def _tiny_answerer(tmp_path):
  """A random 1-layer span model over 24-token windows: contexts take several windows."""
  from flaxformer_mini.data import squad, wordpiece
  from flaxformer_mini.tasks.qa import QuestionAnswerer
  from flaxformer_mini.variants import bert
  (tmp_path / 'qa_vocab.txt').write_text('\n'.join(QA_WORDS) + '\n')
  tokenizer = wordpiece.WordPiece.from_file(str(tmp_path / 'qa_vocab.txt'))
  cfg = bert.BertConfig.from_dict({'encoder': dict(
      vocab_size=len(QA_WORDS), d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
      max_len=24), 'pooler': False})
  ids = np.zeros((1, 8), np.int32)
  params = bert.BertForQuestionAnswering(cfg).init(jax.random.key(0), ids, ids + 1, ids)
  return QuestionAnswerer(cfg, params['params'], tokenizer,
                          squad.WindowConfig(max_seq_len=24, doc_stride=6, max_query_len=6),
                          n_best=5, max_answer_len=4, batch_size=4, bucket=8)


@pytest.fixture
def qa_service(tmp_path, monkeypatch):
  from flaxformer_mini.tasks.qa import QuestionAnswerer
  answerer = _tiny_answerer(tmp_path)
  _fake_run(tmp_path / 'run', 'qa', QuestionAnswerer, answerer, monkeypatch)
  service, step = serve.load_service(str(tmp_path / 'run'), max_batch=4, limits=serve.Limits(
      max_texts=8, max_chars=30, max_context_chars=200))
  assert (service.task, service.path, service.max_batch, step) == ('qa', '/v1/answer', 4, 7)
  return service, answerer


@pytest.mark.slow
def test_answer_endpoint_equals_question_answerer(qa_service, tmp_path):
  service, answerer = qa_service
  assert service.warm_up() == 3  # window lengths 8, 16, 24
  requests = [{'questions': ['who sat on the mat ?', 'what did the dog ?'],
               'context': QA_CONTEXTS[0]},
              {'questions': ['where ?'], 'contexts': [QA_CONTEXTS[1]]},
              {'questions': ['what sat ?', 'who did ?', 'the red cat ?'],
               'contexts': [QA_CONTEXTS[2], QA_CONTEXTS[0], QA_CONTEXTS[2]]}]
  with _serving(service, 4) as port:
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
      results = list(pool.map(lambda b: _post(port, b, '/v1/answer'), requests))
    assert [s for s, _ in results] == [200] * len(requests)
    for body, (_, reply) in zip(requests, results):
      contexts = body.get('contexts') or [body['context']] * len(body['questions'])
      want = answerer.answer(body['questions'], contexts)
      got = reply['answers']
      assert [(g['text'], g['start_char'], g['end_char']) for g in got] == [
          (w.text, w.start_char, w.end_char) for w in want]
      np.testing.assert_allclose([g['score'] for g in got], [w.score for w in want], atol=1e-4)
      assert all(c[g['start_char']:g['end_char']] == g['text'] != '' for g, c in
                 zip(got, contexts))
    info = _get(port, '/v1/model')
    assert (info['task'], info['endpoint'], info['windows']['max_seq_len']) == (
        'qa', '/v1/answer', 24)
    assert info['limits']['max_context_chars'] == 200 and info['n_best'] == 5
    assert info['tokenizer_sha256'] == file_sha256(str(tmp_path / 'qa_vocab.txt'))
    status, reply = _post(port, {'texts': ['a dog']}, '/v1/classify')
    assert status == 404 and 'needs a classification run' in reply['error']
    assert 'answers POST /v1/answer' in reply['error']


@pytest.mark.slow
def test_answer_requests_are_refused_with_their_reason(qa_service):
  service, _ = qa_service
  ok = {'questions': ['who sat ?'], 'context': QA_CONTEXTS[1]}
  cases = [
      ({'questions': ['a ?'], 'contexts': ['a dog', 'the cat']}, 422,
       '1 questions but 2 contexts'),
      ({'questions': ['a ?']}, 422, 'send "contexts" (one per question) or "context"'),
      ({'questions': ['a ?'], 'contexts': ['a dog'], 'context': 'a dog'}, 422, 'not both'),
      ({'questions': [], 'context': 'a dog'}, 422, 'questions is empty'),
      ({'questions': ['a ?', ' '], 'context': 'a dog'}, 422, 'questions[1] is empty'),
      ({'questions': ['a ?'], 'contexts': ['\t']}, 422, 'contexts[0] is empty'),
      ({'questions': ['a ?'], 'context': ''}, 422, 'context is empty'),
      ({'questions': ['a ?'], 'context': '\u200b'}, 422, 'context has no token'),
      ({'questions': ['a ?'] * 9, 'context': 'a dog'}, 413, 'the limit is max_texts=8'),
      ({'questions': ['a' * 31], 'context': 'a dog'}, 413,
       'questions[0] has 31 characters; the limit is max_chars=30'),
      ({'questions': ['a ?', 'b ?'], 'contexts': ['a dog', 'a ' * 101]}, 413,
       'contexts[1] has 202 characters; the limit is max_context_chars=200'),
      ({'questions': 'a ?', 'context': 'a dog'}, 422, 'questions: Input should be a valid list'),
      ({'questions': ['a ?'], 'context': ['a dog']}, 422, 'context: Input should be a valid'),
      ({**ok, 'beam_size': 1}, 422, 'beam_size: Extra inputs'),
  ]
  with _serving(service, 4) as port:
    for body, status, message in cases:
      got, reply = _post(port, body, '/v1/answer')
      assert (got, message in reply['error']) == (status, True), (body, reply)
    got, reply = _post(port, ok, '/v1/answer')
    assert got == 200 and len(reply['answers']) == 1
    assert _get(port, '/healthz')['texts_run'] == 1  # the refused ones never reached a batch


def test_answer_without_a_valid_span_has_a_null_score(qa_service, monkeypatch):
  from flaxformer_mini.tasks.qa import Answer
  service, answerer = qa_service
  monkeypatch.setattr(answerer, 'answer', lambda q, c: [Answer('', float('-inf'), -1, -1)])
  got = service.run(None, [('who ?', 'a dog')])
  assert got == [{'text': '', 'score': None, 'start_char': -1, 'end_char': -1}]
  json.dumps(got, allow_nan=False)  # what the HTTP reply must hold
