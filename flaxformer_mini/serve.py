"""An HTTP JSON server for a trained run directory, with dynamic batching.

    python -m flaxformer_mini.serve --workdir=runs/pt_en --port=8000
    curl -s localhost:8000/v1/translate -H 'content-type: application/json' \\
        -d '{"texts": ["Bom dia."], "beam_size": 4, "alpha": 0.6}'
    # -> {"translations": ["Good morning."], "method": "beam", "beam_size": 4, ...}

The server answers the endpoint of the run's task (``config.task``) and 404, naming that
task, on the others:

    translation     POST /v1/translate   {"texts": [...], "beam_size", "alpha", "max_len",
                                          "sample", "temperature", "top_k", "top_p", "seed"}
    summarization   POST /v1/summarize   the same options; documents are cut to the run's
                                          data.max_source_len tokens, as in training
    classification  POST /v1/classify    {"texts": [...]} -> a label and probabilities each
    qa              POST /v1/answer      {"questions": [...], "contexts": [...]}, or one
                                          "context" for every question -> {"answers": [{"text",
                                          "score", "start_char", "end_char"}]}, a span each

An option left out takes the run's default (translation: beam 4, alpha 0.6; summarization:
its config.eval search); ``beam_size: 1`` is greedy. ``GET /healthz`` and ``GET /v1/model``
(task, checkpoint step, model config, tokenizer sha256, limits) serve every task. A new task
adds a service class, a loader in `SERVICES` and its path in `ENDPOINTS`. Needs the ``serve``
extra: ``pip install -e '.[serve]'``.

Step-level batching (`StepBatcher`, ``--batching=step``, the default) for beam search: each
request is validated and tokenized on arrival (a bad one gets a 4xx of its own and never
joins a batch), then queued. One worker thread runs a pool of ``--max_batch`` sentence slots
(`translate.BeamSlots`): between decoding steps, finished sentences leave and queued ones
take their slots, so no sentence waits for the longest one of a batch, nor for a batch to
form. Each sentence gets the tokens `Translator.translate` gives it. Start-up compiles the
pool's shapes for the default search (``--warmup``).

Request-level batching (`DynamicBatcher`; greedy, sampling, and every search with
``--batching=request``): the worker takes the oldest request and every queued request
with the same options, up to ``--max_batch`` texts or until the wait has passed since the
oldest arrived or the previous batch ended (whichever is later: the clients just answered
can join), and runs them together. The wait is
``--max_wait_ms`` or ``--wait_fraction`` of the previous batch's run time, whichever is longer:
where a batch takes seconds (a CPU) the answered clients get time to send again and fill the
next batch, for a bounded share of latency;
translation and summarization go through `Translator.translate_encoded`, i.e. the power-of-two
buckets of offline translation, which start-up compiles (``--warmup``), so a burst of
single-sentence requests compiles nothing new. Sampling requests run alone, so a seed gives
what `Translator.translate` gives in one process. A client that disconnects abandons its
request (skipped if not yet started). What can be compiled is bounded: ``max_len`` must be
one of ``--max_lens`` and at most ``--max_searches`` distinct search settings are served.
SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in flight and the
queued ones, then exits 0.
"""

import argparse
import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

try:
  import fastapi
  import pydantic
  import uvicorn
  from fastapi.exceptions import RequestValidationError
  from starlette.exceptions import HTTPException
except ImportError as e:  # the optional 'serve' extra
  raise ImportError(f"flaxformer_mini.serve needs FastAPI and uvicorn ({e}): "
                    "python3 -m pip install -e '.[serve]'") from None

from flaxformer_mini import translate

log = logging.getLogger(__name__)

DRAIN_S = 60          # how long SIGTERM waits for in-flight requests
MAX_POOLS = 4         # step-level pools kept (each holds max_batch sentences' decoder caches)
MAX_BEAM = 16
MAX_SEED = 2 ** 31 - 1
WARMUP_TEXT = 'Bom dia.'  # any text: warm-up repeats its tokens to each bucket's length


class RequestError(ValueError):
  """A request the server refuses (HTTP 4xx); ``status`` is the code."""

  def __init__(self, message: str, status: int = 422):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask for, and how much may wait."""
  max_texts: int = 64            # texts per request
  max_chars: int = 10000         # characters per text
  max_queue: int = 4096          # texts waiting; beyond it requests get 503
  max_context_chars: int = 100000  # characters per QA context (the FAQ pages reach 77,216)

  def __post_init__(self):
    for name in ('max_texts', 'max_chars', 'max_queue', 'max_context_chars'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name}={getattr(self, name)} must be >= 1')


# ------------------------------------------------------------------------------ batching


@dataclasses.dataclass(eq=False)  # a job is itself: compared by identity
class _Job:
  key: Hashable          # what `run` gets
  group: Hashable        # jobs of one group run together
  items: list
  future: concurrent.futures.Future
  arrived: float


class DynamicBatcher:
  """Runs queued requests together on one worker thread.

  Args:
    run: ``run(key, items) -> results``, one result per item, for items of requests that
      share ``key`` (their search options); called on the worker thread only.
    max_batch: most items run together (a larger single request runs alone, whole).
    max_wait_ms: how long the oldest queued request waits for company once the worker is
      free (counted from the later of its arrival and the end of the previous batch, so the
      clients just answered can send their next request in time to join).
    wait_fraction: the wait is at least this fraction of the previous batch's run time.
    max_queue: most items waiting; `submit` refuses more with a 503.
  """

  def __init__(self, run: Callable[[Hashable, list], list], *, max_batch: int = 32,
               max_wait_ms: float = 10.0, wait_fraction: float = 0.0,
               max_queue: int = Limits.max_queue):
    if max_batch < 1:
      raise ValueError(f'max_batch={max_batch} must be >= 1')
    if max_wait_ms < 0:
      raise ValueError(f'max_wait_ms={max_wait_ms} must be >= 0')
    if not 0 <= wait_fraction <= 1:
      raise ValueError(f'wait_fraction={wait_fraction} must be in [0, 1]')
    self.run, self.max_batch, self.max_queue = run, int(max_batch), int(max_queue)
    self.max_wait, self.wait_fraction = max_wait_ms / 1000.0, float(wait_fraction)
    self._last_run = 0.0  # seconds the previous batch ran
    self._jobs: list[_Job] = []
    self._cv = threading.Condition()
    self._closed = False
    self.batches_run = self.items_run = self.abandoned = 0
    self.running = 0  # items of the batch being run
    self._free_since = 0.0  # when the last batch ended (time.monotonic)
    self._thread = threading.Thread(target=self._loop, name='batcher', daemon=True)
    self._thread.start()

  @property
  def queued(self) -> int:
    """Requests waiting for the worker."""
    return len(self._jobs)

  def submit(self, key: Hashable, items: list, *, alone: bool = False
             ) -> concurrent.futures.Future:
    """Queues one request's validated items; the future's result is their results.

    ``alone``: never batched with another request (sampling: a seed reproduces).
    """
    future: concurrent.futures.Future = concurrent.futures.Future()
    with self._cv:
      if self._closed:
        raise RequestError('the server is shutting down', 503)
      waiting = sum(len(j.items) for j in self._jobs)
      if waiting + len(items) > self.max_queue:
        raise RequestError(f'{waiting} texts are queued (max_queue={self.max_queue}); '
                           'retry later', 503)
      self._jobs.append(_Job(key, object() if alone else key, list(items), future,
                             time.monotonic()))
      self._cv.notify_all()
    return future

  def close(self, timeout: float | None = None) -> None:
    """Stops taking requests; the worker finishes every queued one, then exits."""
    with self._cv:
      self._closed = True
      self._cv.notify_all()
    self._thread.join(timeout)

  def _next_batch(self) -> list[_Job] | None:
    with self._cv:
      while not self._jobs and not self._closed:
        self._cv.wait()
      if not self._jobs:
        return None
      first = self._jobs[0]
      wait = max(self.max_wait, self.wait_fraction * self._last_run)
      deadline = max(first.arrived, self._free_since) + wait
      while True:
        same = [j for j in self._jobs if j.group == first.group]
        remaining = deadline - time.monotonic()
        if (sum(len(j.items) for j in same) >= self.max_batch or remaining <= 0
            or self._closed):
          break
        self._cv.wait(remaining)
      taken, n = [], 0
      for job in same:
        if taken and n + len(job.items) > self.max_batch:
          break
        taken.append(job)
        n += len(job.items)
      for job in taken:
        self._jobs.remove(job)
      return taken

  def _loop(self) -> None:
    while (jobs := self._next_batch()) is not None:
      self._run_jobs(jobs)

  def _run_jobs(self, jobs: list[_Job]) -> None:
    """Runs ``jobs`` (one group) as one batch and answers each; skips abandoned ones."""
    started = [j for j in jobs if j.future.set_running_or_notify_cancel()]
    self.abandoned += len(jobs) - len(started)
    if started:
      items = [x for j in started for x in j.items]
      self.running = len(items)
      t0 = time.monotonic()
      try:
        results = self.run(started[0].key, items)
      except Exception as e:  # every item was validated: this is a server bug, logged
        log.exception('a batch of %d requests failed', len(started))
        for job in started:
          job.future.set_exception(e)
        return
      finally:
        self.running = 0
      self.batches_run += 1
      self.items_run += len(items)
      self._last_run = time.monotonic() - t0
      start = 0
      for job in started:
        job.future.set_result(results[start:start + len(job.items)])
        start += len(job.items)
    self._free_since = time.monotonic()


@dataclasses.dataclass
class _Progress:
  """A request partly or wholly taken into a `StepBatcher` pool."""
  results: list   # one per item, None until answered
  taken: int = 0  # items taken from the request so far (in order)
  answered: int = 0


class StepBatcher(DynamicBatcher):
  """Step-level (continuous) batching: texts join and leave a running search between steps.

  Requests whose key has a pool (``pools(key)``, e.g. a `translate.BeamSlots` for beam
  search) are fed into it text by text, oldest first, as soon as a slot is free; each text
  is answered when its own search ends, so nobody waits for the longest text of a batch or
  for a batch to fill. Other requests (sampling, greedy) run the `DynamicBatcher` way, once
  the pool is idle: the queue stays first come, first served.

  Args:
    run: as in `DynamicBatcher`, for requests without a pool.
    pools: ``pools(key)`` -> a pool for requests of that key, or None. A pool has
      ``free`` and ``busy`` (slot counts), ``start([(tag, item), ...])`` (at most
      ``free`` items), ``advance(max_steps) -> [(tag, result), ...]`` and ``reset()``.
    chunk_steps: steps per `advance` while a slot is free (how soon a new text joins).
    ``max_batch``, ``max_wait_ms``, ``wait_fraction``, ``max_queue``: as in
      `DynamicBatcher` (the waits apply to the requests without a pool).
  """

  def __init__(self, run: Callable[[Hashable, list], list],
               pools: Callable[[Hashable], Any], *, chunk_steps: int = 4, **kwargs):
    if chunk_steps < 1:
      raise ValueError(f'chunk_steps={chunk_steps} must be >= 1')
    self.pools, self.chunk_steps = pools, int(chunk_steps)
    self.steps_run = self.rows_stepped = 0  # pool advances, busy slots summed over them
    super().__init__(run, **kwargs)

  def _pool_of(self, job: _Job):
    return self.pools(job.key) if job.group == job.key else None  # 'alone': never pooled

  def _admit(self, pool, progress: dict) -> tuple[Any, list, list[_Job] | None]:
    """Under the lock: (the pool, (tag, item) pairs to start in it, or jobs to run as a
    batch instead). Takes queued jobs oldest first while they fit the pool."""
    admitted, free = [], 0 if pool is None else pool.free
    while self._jobs:
      job = self._jobs[0]
      try:
        target = self._pool_of(job)
      except Exception as e:  # e.g. no memory for a new pool: this request fails, not the worker
        log.exception('no pool for a request of %d texts', len(job.items))
        self._jobs.pop(0)
        if job.future.set_running_or_notify_cancel():
          job.future.set_exception(e)
        continue
      busy = pool is not None and (pool.busy or admitted)
      if target is None or (busy and target is not pool):
        if busy:
          return pool, admitted, None  # it waits until the pool drains
        return pool, [], self._next_batch()
      if target is not pool:
        pool, free = target, target.free
      if job.future not in progress:
        if not job.future.set_running_or_notify_cancel():
          self._jobs.pop(0)
          self.abandoned += 1
          continue
        progress[job.future] = _Progress([None] * len(job.items))
      state = progress[job.future]
      while state.taken < len(job.items):
        item = job.items[state.taken]
        if item is None:  # an empty text: nothing to decode
          state.results[state.taken] = ''
          state.answered += 1
        elif free:
          admitted.append(((job, state.taken), item))
          free -= 1
        else:
          break
        state.taken += 1
      if state.taken < len(job.items):
        break
      self._jobs.pop(0)
      if state.answered == len(job.items):  # only empty texts, or the last ones already done
        self._answer(job, progress)
    return pool, admitted, None

  def _answer(self, job: _Job, progress: dict) -> None:
    results = progress.pop(job.future).results
    self.items_run += len(results)
    job.future.set_result(results)

  def _loop(self) -> None:
    pool, progress = None, {}
    while True:
      with self._cv:
        while not self._jobs and not (pool and pool.busy) and not self._closed:
          self._cv.wait()
        if not self._jobs and not (pool and pool.busy):
          return
        pool, admitted, batch = self._admit(pool, progress)
      if batch is not None:
        self._run_jobs(batch)
        continue
      if pool is None or not (admitted or pool.busy):  # e.g. the only request failed
        continue
      try:
        pool.start(admitted)
        self.steps_run += 1
        self.rows_stepped += pool.busy
        self.running = pool.busy
        done = pool.advance(self.chunk_steps if pool.free else 1 << 30)
      except Exception as e:  # every item was validated: a server bug, logged
        log.exception('a step of %d running texts failed', pool.busy)
        with self._cv:  # a request partly started fails whole, its rest leaves the queue
          self._jobs = [j for j in self._jobs if j.future not in progress]
        for future in progress:
          future.set_exception(e)
        progress.clear()
        pool.reset()
        continue
      finally:
        self.running = pool.busy
      self.batches_run += 1
      for (job, i), result in done:
        state = progress[job.future]
        state.results[i] = result
        state.answered += 1
        if state.answered == len(job.items):  # all answered, so all were taken from the queue
          self._answer(job, progress)


# ------------------------------------------------------------------------------ services


class DecodeRequest(pydantic.BaseModel):
  """POST /v1/translate and /v1/summarize; an option left out takes the run's default."""
  model_config = pydantic.ConfigDict(extra='forbid', strict=True)
  texts: list[str]
  beam_size: int | None = pydantic.Field(None, ge=1, le=MAX_BEAM)
  alpha: float | None = pydantic.Field(None, ge=0, le=10, allow_inf_nan=False)
  max_len: int | None = None
  sample: bool = False
  temperature: float | None = pydantic.Field(None, ge=0, le=100, allow_inf_nan=False)
  top_k: int | None = pydantic.Field(None, ge=0)
  top_p: float | None = pydantic.Field(None, gt=0, le=1, allow_inf_nan=False)
  seed: int | None = pydantic.Field(None, ge=0, le=MAX_SEED)


class ClassifyRequest(pydantic.BaseModel):
  """POST /v1/classify."""
  model_config = pydantic.ConfigDict(extra='forbid', strict=True)
  texts: list[str]


class AnswerRequest(pydantic.BaseModel):
  """POST /v1/answer: a context per question, or one ``context`` for all of them."""
  model_config = pydantic.ConfigDict(extra='forbid', strict=True)
  questions: list[str]
  contexts: list[str] | None = None
  context: str | None = None


@dataclasses.dataclass
class Prepared:
  """A validated request: its batching key, its items and what the reply echoes."""
  key: Hashable
  items: list
  alone: bool = False
  echo: dict = dataclasses.field(default_factory=dict)


def check_texts(texts: list, limits: Limits) -> None:
  """Count and size limits of one request (types are pydantic's)."""
  if not texts:
    raise RequestError('texts is empty; send at least one text')
  if len(texts) > limits.max_texts:
    raise RequestError(f'{len(texts)} texts in one request; the limit is max_texts='
                       f'{limits.max_texts}', 413)
  for i, text in enumerate(texts):
    if len(text) > limits.max_chars:
      raise RequestError(f'texts[{i}] has {len(text)} characters; the limit is max_chars='
                         f'{limits.max_chars}', 413)


def _trimmed_lengths(bucket: int, max_len: int) -> list[int]:
  """Every row length a batch trimmed to a multiple of ``bucket`` (at most ``max_len``) has."""
  return list(range(bucket, max_len, bucket)) + [max_len] if bucket > 0 else [max_len]


class Seq2SeqService:
  """Translation or summarization: texts -> texts through `Translator.translate_encoded`.

  Args:
    task / path / result_key: the run's task, its endpoint and the reply's list field.
    translator: the model; its ``max_decode_len`` is the default ``max_len``.
    default_search: the search of a request that names none.
    max_source_len: None refuses a text of more tokens than the model's ``max_len``
      (translation); a number cuts texts to that many tokens (summarization, as trained).
    max_batch: the translators' ``batch_size``.
    max_lens: the ``max_len`` values served (besides the default).
    max_searches: most distinct (search, max_len) settings, each compiled once.
    step_batching: beam searches run in `translate.BeamSlots` pools of ``max_batch``
      slots (`StepBatcher`); the ``MAX_POOLS`` most recently used settings keep theirs.
  """

  request_model = DecodeRequest

  def __init__(self, task: str, path: str, result_key: str,
               translator: translate.Translator, default_search: translate.SearchConfig, *,
               max_source_len: int | None = None, max_batch: int = 32,
               max_lens: Sequence[int] = (), max_searches: int = 16,
               limits: Limits = Limits(), step_batching: bool = True):
    self.task, self.path, self.result_key = task, path, result_key
    self.step_batching = bool(step_batching)
    self._pools: dict = {}  # (search, max_len) -> _TextPool, least recently used first
    self.default_search, self.limits = default_search, limits
    self.max_source_len, self.max_searches = max_source_len, int(max_searches)
    self.max_batch = int(max_batch)
    if self.max_searches < 1:
      raise ValueError(f'max_searches={max_searches} must be >= 1')
    self.model_config, self.tokenizer = translator.model_config, translator.tokenizer
    self.default_len = translator.max_decode_len
    translator.batch_size = self.max_batch
    self.translators = {self.default_len: translator}
    for n in sorted(set(max_lens) - {self.default_len}):
      if not 1 <= n <= self.model_config.max_len:
        raise ValueError(f'--max_lens value {n} must be in [1, {self.model_config.max_len}] '
                         '(the model max_len)')
      self.translators[n] = translate.Translator(
          self.model_config, translator.params, self.tokenizer, max_decode_len=n,
          batch_size=self.max_batch)
    self._settings: set = set()   # (search, max_len) pairs served so far

  def search_for(self, req: DecodeRequest) -> translate.SearchConfig:
    """The request's search; RequestError names an option that does not fit."""
    if req.sample:
      wrong = [n for n in ('beam_size', 'alpha') if getattr(req, n) is not None]
      if wrong:
        raise RequestError(f'{wrong[0]} does not apply with "sample": true (temperature, '
                           'top_k, top_p and seed do)')
      if req.top_k is not None and req.top_k > self.model_config.vocab_size:
        raise RequestError(f'top_k={req.top_k} exceeds the vocabulary size '
                           f'{self.model_config.vocab_size}')
      d = translate.SearchConfig('sample')
      pick = lambda name: getattr(d, name) if getattr(req, name) is None else getattr(req, name)
      return translate.SearchConfig('sample', temperature=pick('temperature'),
                                    top_k=pick('top_k'), top_p=pick('top_p'), seed=pick('seed'))
    wrong = [n for n in ('temperature', 'top_k', 'top_p', 'seed') if getattr(req, n) is not None]
    if wrong:
      raise RequestError(f'{wrong[0]} applies only with "sample": true')
    d = self.default_search
    beam = req.beam_size if req.beam_size is not None else (
        d.beam_size if d.method == 'beam' else 1)
    if beam == 1:
      if req.alpha is not None:
        raise RequestError('alpha applies only with beam_size > 1 (beam_size 1 is greedy)')
      return translate.SearchConfig('greedy')
    alpha = req.alpha if req.alpha is not None else (
        d.alpha if d.method == 'beam' else translate.SearchConfig().alpha)
    return translate.SearchConfig('beam', beam_size=beam, alpha=alpha)

  def encode(self, texts: Sequence[str]) -> list[np.ndarray | None]:
    """Token ids per text (None for empty ones), cut or refused by length."""
    check_texts(texts, self.limits)
    limit = self.model_config.max_len
    nonempty = [i for i, s in enumerate(texts) if s.strip()]
    encoded: list[np.ndarray | None] = [None] * len(texts)
    for i, ids in zip(nonempty, self.tokenizer.encode([texts[i] for i in nonempty])):
      if self.max_source_len is not None:
        ids = ids[:self.max_source_len]
      elif len(ids) > limit:
        raise RequestError(f'texts[{i}] has {len(ids)} tokens; the model takes at most '
                           f'{limit} (model max_len)', 413)
      encoded[i] = ids
    return encoded

  def prepare(self, req: DecodeRequest) -> Prepared:
    search = self.search_for(req)
    n = self.default_len if req.max_len is None else req.max_len
    if n not in self.translators:
      raise RequestError(f'max_len={n} is not served; this server decodes max_len in '
                         f'{sorted(self.translators)} (set by its --max_lens)')
    encoded = self.encode(req.texts)
    setting = (dataclasses.replace(search, seed=0), n)  # the seed is not compiled in
    if setting not in self._settings:
      if len(self._settings) >= self.max_searches:
        raise RequestError(f'this server already serves max_searches={self.max_searches} '
                           'distinct search settings; use one of theirs: '
                           f'{self.describe_settings()}')
      self._settings.add(setting)
    echo = {'method': search.method, 'max_len': n}
    if search.method == 'beam':
      echo.update(beam_size=search.beam_size, alpha=search.alpha)
    elif search.method == 'sample':
      echo.update(temperature=search.temperature, top_k=search.top_k, top_p=search.top_p,
                  seed=search.seed)
    return Prepared((search, n), encoded, alone=search.method == 'sample', echo=echo)

  def describe_settings(self) -> str:
    parts = []
    for search, n in sorted(self._settings, key=repr)[:8]:
      opts = {'greedy': 'beam_size=1', 'beam': f'beam_size={search.beam_size} '
              f'alpha={search.alpha}', 'sample': f'sample temperature={search.temperature} '
              f'top_k={search.top_k} top_p={search.top_p}'}[search.method]
      parts.append(f'{opts} max_len={n}')
    return '; '.join(parts)

  def run(self, key, items: list) -> list[str]:
    search, n = key
    return self.translators[n].translate_encoded(items, search)

  def pools(self, key):
    """The step-level pool for ``key`` (a beam search), or None: `StepBatcher`'s ``pools``."""
    search, n = key
    if not self.step_batching or search.method != 'beam':
      return None
    pool = self._pools.pop(key, None)
    if pool is None:
      idle = [k for k, p in self._pools.items() if not p.busy]
      if len(self._pools) >= MAX_POOLS and idle:
        del self._pools[idle[0]]  # its device memory goes with it
      pool = _TextPool(translate.BeamSlots(self.translators[n], search, self.max_batch),
                       self.tokenizer)
    self._pools[key] = pool  # now the most recently used
    return pool

  def warm_up(self, searches: Sequence[translate.SearchConfig]) -> int:
    """Runs every (rows, length) bucket of ``searches`` at the default max_len, through
    `run` itself: requests then take jax's fast dispatch path from the first one."""
    longest = self.model_config.max_len if self.max_source_len is None else min(
        self.model_config.max_len, 1 << (self.max_source_len - 1).bit_length())
    ids = self.tokenizer.encode([WARMUP_TEXT])[0]
    count = 0
    for search in searches:
      self._settings.add((search, self.default_len))
      pool = self.pools((search, self.default_len))
      if pool is not None:
        count += pool.slots.warm_up()
        continue
      for length in translate.bucket_sizes(longest, translate.MIN_LENGTH_BUCKET):
        for rows in translate.bucket_sizes(self.max_batch, 1):
          self.run((search, self.default_len), [np.resize(ids, length)] * rows)
          count += 1
    return count

  def compiled(self) -> int:
    """Search variants compiled in this process (a warmed-up burst adds none)."""
    return translate.compiled_shapes()

  def info(self) -> dict:
    from flaxformer_mini.data.tokenized import file_sha256
    return {'model': _jsonable(dataclasses.asdict(self.model_config)),
            'tokenizer_sha256': file_sha256(self.tokenizer.model_path),
            'default_search': dataclasses.asdict(self.default_search),
            'max_len': self.default_len, 'max_lens': sorted(self.translators),
            'max_source_len': self.max_source_len, 'max_searches': self.max_searches}


class _TextPool:
  """A `translate.BeamSlots` pool whose `advance` answers texts (`StepBatcher`'s pool)."""

  def __init__(self, slots: translate.BeamSlots, tokenizer):
    self.slots, self.tokenizer = slots, tokenizer

  @property
  def free(self) -> int:
    return self.slots.free

  @property
  def busy(self) -> int:
    return self.slots.busy

  def start(self, items: list) -> None:
    self.slots.start(items)

  def advance(self, max_steps: int) -> list:
    return [(tag, self.tokenizer.decode(tokens[None])[0])
            for tag, tokens in self.slots.advance(max_steps)]

  def reset(self) -> None:
    self.slots.reset()


class ClassificationService:
  """Text classification through `tasks.classification.Classifier.classify`.

  Its batches are always padded to ``batch_size`` rows and trimmed to a multiple of the
  run's ``length_bucket``, so a burst of single texts shares one shape per length.
  """

  task, path, result_key = 'classification', '/v1/classify', 'predictions'
  request_model = ClassifyRequest

  def __init__(self, classifier, *, limits: Limits = Limits()):
    self.classifier, self.limits = classifier, limits
    self.max_batch = classifier.batch_size

  def prepare(self, req: ClassifyRequest) -> Prepared:
    check_texts(req.texts, self.limits)
    for i, text in enumerate(req.texts):
      if not text.strip():
        raise RequestError(f'texts[{i}] is empty; a classifier needs text')
    return Prepared(None, list(req.texts))

  def run(self, key, items: list) -> list[dict]:
    return [dataclasses.asdict(p) for p in self.classifier.classify(items)]

  def compiled(self) -> None:
    return None  # Classifier keeps its jit private

  def warm_up(self, searches=()) -> int:
    """Runs every length bucket once (the row count is fixed)."""
    c = self.classifier
    lengths = _trimmed_lengths(c.bucket, c.max_len)
    for n in lengths:
      mask = np.zeros((1, c.max_len), np.int32)
      mask[:, :n] = 1
      c.probabilities_of_ids(np.zeros((1, c.max_len), np.int32), mask)
    return len(lengths)

  def info(self) -> dict:
    from flaxformer_mini.data.tokenized import file_sha256
    c = self.classifier
    return {'model': _jsonable(dataclasses.asdict(c.cfg)), 'labels': c.labels,
            'max_len': c.max_len,
            'tokenizer_sha256': file_sha256(c.tokenizer.path) if c.tokenizer.path else None}


class QAService:
  """Extractive QA through `tasks.qa.QuestionAnswerer.answer`: a span of its context for
  each question.

  A batch holds the (question, context) pairs of the requests run together; their windows
  go through the answerer in rows of its ``batch_size``, always padded to that many rows and
  trimmed to a multiple of the run's ``length_bucket``, so any mix shares one shape per
  length. A question without a valid span gets ``{"text": "", "score": null, "start_char":
  -1, "end_char": -1}`` (the answerer's score is -inf, which JSON cannot hold).
  """

  task, path, result_key = 'qa', '/v1/answer', 'answers'
  request_model = AnswerRequest

  def __init__(self, answerer, *, limits: Limits = Limits()):
    self.answerer, self.limits = answerer, limits
    self.max_batch = answerer.batch_size

  def prepare(self, req: AnswerRequest) -> Prepared:
    shared = req.context is not None
    if shared == (req.contexts is not None):
      raise RequestError('send "contexts" (one per question) or "context" (one for every '
                         'question)' + (', not both' if shared else ''))
    questions, limits = req.questions, self.limits
    if not questions:
      raise RequestError('questions is empty; send at least one question')
    if len(questions) > limits.max_texts:
      raise RequestError(f'{len(questions)} questions in one request; the limit is max_texts='
                         f'{limits.max_texts}', 413)
    contexts = [req.context] * len(questions) if shared else req.contexts
    if len(contexts) != len(questions):
      raise RequestError(f'{len(questions)} questions but {len(contexts)} contexts; send one '
                         'context per question, or one "context" for all of them')
    named = [('context', req.context)] if shared else [
        (f'contexts[{i}]', c) for i, c in enumerate(contexts)]
    checks = [(f'questions[{i}]', q, 'max_chars') for i, q in enumerate(questions)]
    checks += [(name, c, 'max_context_chars') for name, c in named]
    for name, text, limit in checks:
      if not text.strip():
        raise RequestError(f'{name} is empty')
      if len(text) > getattr(limits, limit):
        raise RequestError(f'{name} has {len(text)} characters; the limit is {limit}='
                           f'{getattr(limits, limit)}', 413)
    # A context without tokens would fail the whole batch in the answerer: refuse it here.
    encoded = self.answerer.tokenizer.hf.encode_batch([c for _, c in named],
                                                      add_special_tokens=False)
    for (name, _), enc in zip(named, encoded):
      if not enc.ids:
        raise RequestError(f'{name} has no token: the tokenizer drops all its characters')
    return Prepared(None, list(zip(questions, contexts)))

  def run(self, key, items: list) -> list[dict]:
    questions, contexts = zip(*items)
    return [{'text': a.text, 'score': a.score if np.isfinite(a.score) else None,
             'start_char': a.start_char, 'end_char': a.end_char}
            for a in self.answerer.answer(questions, contexts)]

  def compiled(self) -> None:
    return None  # QuestionAnswerer keeps its jit private

  def warm_up(self, searches=()) -> int:
    """Runs every window length bucket once (the row count is fixed)."""
    a = self.answerer
    l = a.windows.max_seq_len
    lengths = _trimmed_lengths(a.bucket, l)
    for n in lengths:
      mask = np.zeros((1, l), np.int32)
      mask[:, :n] = 1
      a.logits({'input_ids': mask, 'token_type_ids': np.zeros_like(mask),
                'attention_mask': mask})
    return len(lengths)

  def info(self) -> dict:
    from flaxformer_mini.data.tokenized import file_sha256
    a = self.answerer
    return {'model': _jsonable(dataclasses.asdict(a.cfg)),
            'windows': dataclasses.asdict(a.windows), 'n_best': a.n_best,
            'max_answer_len': a.max_answer_len, 'batch_size': a.batch_size,
            'tokenizer_sha256': file_sha256(a.tokenizer.path) if a.tokenizer.path else None}


def _plain(value: Any) -> str:
  try:
    return np.dtype(value).name  # the configs' dtype fields
  except TypeError:
    return str(value)


def _jsonable(d: Any) -> Any:
  return json.loads(json.dumps(d, default=_plain))


# ------------------------------------------------------------------------------- loading


def load_newest(load: Callable, workdir: str, step: int | None, **kwargs) -> tuple[Any, int]:
  """(``load(workdir, step, **kwargs)``, the step loaded): ``step`` or the newest readable."""
  if step is not None:
    return load(workdir, step, **kwargs), step
  from flaxformer_mini import checkpoints
  ckpt = os.path.join(workdir, checkpoints.CHECKPOINT_SUBDIR)
  steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []
  if not steps:
    raise FileNotFoundError(f'no finished checkpoint in {os.path.abspath(ckpt)!r}')
  for s in reversed(steps):
    try:
      return load(workdir, s, **kwargs), s
    except RuntimeError as e:  # unreadable: the loader logged why; try the one before
      error = e
  raise error


def translation_service(translator: translate.Translator, **options) -> Seq2SeqService:
  """POST /v1/translate over ``translator``; beam 4, alpha 0.6 unless a request says."""
  return Seq2SeqService('translation', '/v1/translate', 'translations', translator,
                        translate.SearchConfig(), **options)


def summarization_service(summarizer, **options) -> Seq2SeqService:
  """POST /v1/summarize over a `tasks.summarization.Summarizer`: its translator, search
  and ``max_source_len`` cut."""
  return Seq2SeqService('summarization', '/v1/summarize', 'summaries', summarizer.translator,
                        summarizer.search, max_source_len=summarizer.max_source_len, **options)


def _translation(workdir, step, *, max_batch, limits, **options):
  translator, step = load_newest(translate.Translator.from_workdir, workdir, step,
                                 batch_size=max_batch)
  return translation_service(translator, max_batch=max_batch, limits=limits, **options), step


def _summarization(workdir, step, *, max_batch, limits, **options):
  from flaxformer_mini.tasks.summarization import Summarizer
  summarizer, step = load_newest(Summarizer.from_workdir, workdir, step, batch_size=max_batch)
  return summarization_service(summarizer, max_batch=max_batch, limits=limits,
                               **options), step


def _classification(workdir, step, *, max_batch, limits, step_batching, **options):
  from flaxformer_mini.tasks.classification import Classifier
  classifier, step = load_newest(Classifier.from_workdir, workdir, step, batch_size=max_batch)
  return ClassificationService(classifier, limits=limits), step


def _qa(workdir, step, *, max_batch, limits, step_batching, **options):
  from flaxformer_mini.tasks.qa import QuestionAnswerer
  answerer, step = load_newest(QuestionAnswerer.from_workdir, workdir, step,
                               batch_size=max_batch)
  return QAService(answerer, limits=limits), step


# config.task -> loader(workdir, step, **options) -> (service, step loaded).
SERVICES = {'translation': _translation, 'summarization': _summarization,
            'classification': _classification, 'qa': _qa,
            'distill': _translation,  # a distilled student is a translation model
            'distill_classifier': _classification}
# Every task endpoint; a server answers its own and 404s the others.
ENDPOINTS = {'/v1/translate': 'translation', '/v1/summarize': 'summarization',
             '/v1/classify': 'classification', '/v1/answer': 'qa'}


def load_service(workdir: str, step: int | None = None, *, max_batch: int = 32,
                 max_lens: Sequence[int] = (), max_searches: int = 16,
                 limits: Limits = Limits(), step_batching: bool = True):
  """(service, checkpoint step) for the run's task; ValueError names an unserved task.
  ``step_batching`` applies to translation and summarization (`Seq2SeqService`)."""
  from flaxformer_mini import checkpoints
  task = checkpoints.run_task(workdir, step)
  if task not in SERVICES:
    raise ValueError(f'{os.path.abspath(workdir)!r} is a {task!r} run; the server serves '
                     f'{sorted(SERVICES)} runs')
  return SERVICES[task](workdir, step, max_batch=max_batch, max_lens=max_lens,
                        max_searches=max_searches, limits=limits, step_batching=step_batching)


def make_batcher(service, *, max_wait_ms: float = 10.0, wait_fraction: float = 0.0,
                 max_queue: int = Limits.max_queue, step_batching: bool = True,
                 chunk_steps: int = 4) -> DynamicBatcher:
  """A `StepBatcher` over the service's pools where it has them (and ``step_batching``),
  else a `DynamicBatcher`."""
  common = dict(max_batch=getattr(service, 'max_batch', 32), max_wait_ms=max_wait_ms,
                wait_fraction=wait_fraction, max_queue=max_queue)
  if step_batching and getattr(service, 'step_batching', False):
    return StepBatcher(service.run, service.pools, chunk_steps=chunk_steps, **common)
  return DynamicBatcher(service.run, **common)


# ---------------------------------------------------------------------------------- HTTP


async def _client_gone(request: fastapi.Request) -> None:
  """Returns when the client disconnects (the body was read, so only that can arrive)."""
  while (await request.receive())['type'] != 'http.disconnect':
    await asyncio.sleep(0.05)  # never spin should a server hand out empty body messages


def create_app(service, batcher: DynamicBatcher, info: dict) -> fastapi.FastAPI:
  """The FastAPI app: ``service``'s endpoint over ``batcher``, 404s naming the task for
  the other task endpoints, /healthz, and ``info`` as GET /v1/model."""
  app = fastapi.FastAPI(title=f'flaxformer_mini {service.task} server')
  error = lambda status, message: fastapi.responses.JSONResponse({'error': message},
                                                                 status_code=status)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, exc: RequestValidationError):
    problems = []
    for err in exc.errors():
      where = '.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'
      problems.append(f'{where}: {err.get("msg")}')
    return error(422, '; '.join(problems) or 'invalid request')

  @app.exception_handler(RequestError)
  async def _refused(request, exc: RequestError):
    return error(exc.status, str(exc))

  @app.exception_handler(HTTPException)
  async def _http(request, exc: HTTPException):
    if exc.status_code == 404:
      return error(404, f'no endpoint {request.url.path}; this {service.task} server answers '
                        f'POST {service.path}, GET /v1/model and GET /healthz')
    return error(exc.status_code, str(exc.detail))

  @app.get('/healthz')
  async def healthz():
    return {'status': 'ok', 'task': service.task, 'queued': batcher.queued,
            'running': batcher.running, 'compiled': service.compiled(),
            'batches_run': batcher.batches_run, 'texts_run': batcher.items_run,
            'abandoned': batcher.abandoned,
            # step-level batching: pool advances, and busy slots summed over them
            'steps_run': getattr(batcher, 'steps_run', 0),
            'rows_stepped': getattr(batcher, 'rows_stepped', 0)}

  @app.get('/v1/model')
  async def model():
    return info

  async def serve(req: service.request_model, request: fastapi.Request):
    prepared = service.prepare(req)
    t0 = time.perf_counter()
    future = batcher.submit(prepared.key, prepared.items, alone=prepared.alone)
    waiter = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
      await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
      gone.cancel()
      if not waiter.done():  # the client left, or the drain timed out: skipped if not started
        waiter.cancel()
    if waiter.cancelled():
      return fastapi.Response(status_code=499)
    try:
      results = waiter.result()
    except Exception as e:  # the batcher logged it
      return error(500, f'the batch holding this request failed: {type(e).__name__}: {e}')
    return {service.result_key: results, **prepared.echo,
            'seconds': round(time.perf_counter() - t0, 4)}

  def not_here(path: str, task: str):
    async def refuse():
      return error(404, f'{path} needs a {task} run; this server holds a {service.task} '
                        f'run and answers POST {service.path}')
    return refuse

  app.add_api_route(service.path, serve, methods=['POST'])
  for path, task in ENDPOINTS.items():
    if path != service.path:
      app.add_api_route(path, not_here(path, task), methods=['POST'])
  return app


def model_info(service, batcher: DynamicBatcher, workdir: str, step: int) -> dict:
  """What GET /v1/model answers: task, run, step, batching, limits, model and tokenizer."""
  return {'task': service.task, 'workdir': os.path.abspath(workdir), 'checkpoint_step': step,
          'endpoint': service.path, 'max_batch': batcher.max_batch,
          'batching': 'step' if isinstance(batcher, StepBatcher) else 'request',
          'max_wait_ms': batcher.max_wait * 1000, 'wait_fraction': batcher.wait_fraction,
          'limits': dataclasses.asdict(service.limits),
          **service.info()}


def make_server(app, host: str, port: int) -> uvicorn.Server:
  """A uvicorn server for ``app`` that drains for up to DRAIN_S on exit."""
  return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level='warning',
                                       timeout_graceful_shutdown=DRAIN_S))


def start_server(server: uvicorn.Server, *, timeout: float = 30.0
                 ) -> tuple[threading.Thread, int]:
  """Runs ``server`` on a thread; returns (thread, bound port) once it listens. Stop it
  with ``server.should_exit = True`` and ``thread.join()``."""
  host, port = server.config.host, server.config.port
  thread = threading.Thread(target=server.run, name='uvicorn')
  thread.start()
  deadline = time.monotonic() + timeout
  while not server.started:
    if not thread.is_alive() or time.monotonic() > deadline:
      server.should_exit = True
      thread.join(DRAIN_S)
      raise OSError(f'could not serve on {host}:{port} (see the log above)')
    time.sleep(0.02)
  return thread, server.servers[0].sockets[0].getsockname()[1]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m flaxformer_mini.serve',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='training run directory')
  parser.add_argument('--step', type=int, default=None, help='checkpoint (default newest)')
  parser.add_argument('--host', default='127.0.0.1')
  parser.add_argument('--port', type=int, default=8000, help='0 = any free port')
  parser.add_argument('--max_batch', type=int, default=32, help='texts decoded together')
  parser.add_argument('--max_wait_ms', type=float, default=10.0,
                      help='how long the oldest queued request waits for company')
  parser.add_argument('--wait_fraction', type=float, default=0.05,
                      help='the wait is at least this fraction of the previous batch\'s run time')
  parser.add_argument('--batching', choices=('step', 'request'), default='step',
                      help='step: beam-search texts join and leave the running batch between '
                           'decoding steps; request: whole requests are batched')
  parser.add_argument('--chunk_steps', type=int, default=4,
                      help='step batching: decoding steps between checks for new texts '
                           'while a slot is free')
  parser.add_argument('--max_texts', type=int, default=Limits.max_texts)
  parser.add_argument('--max_chars', type=int, default=Limits.max_chars)
  parser.add_argument('--max_queue', type=int, default=Limits.max_queue)
  parser.add_argument('--max_context_chars', type=int, default=Limits.max_context_chars,
                      help='characters per context of /v1/answer (qa runs)')
  parser.add_argument('--max_lens', default='',
                      help='comma-separated max_len values served besides the run default '
                           '(compiled on first use; --warmup covers the default)')
  parser.add_argument('--max_searches', type=int, default=16,
                      help='most distinct (search, max_len) settings compiled')
  parser.add_argument('--warmup', default='default',
                      help="searches compiled at start-up: 'default', 'greedy', "
                           "'default,greedy' or 'none'")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  log.setLevel(logging.INFO)  # also when an import configured the root logger first
  warm = {'default': None, 'greedy': translate.SearchConfig('greedy')}
  wanted = [w for w in args.warmup.split(',') if w and w != 'none']
  try:
    unknown = sorted(set(wanted) - set(warm))
    if unknown:
      raise ValueError(f'--warmup {unknown} not in {sorted(warm)} or none')
    try:
      max_lens = [int(n) for n in args.max_lens.split(',') if n.strip()]
    except ValueError:
      raise ValueError(f'--max_lens={args.max_lens!r} must be comma-separated integers'
                       ) from None
    limits = Limits(args.max_texts, args.max_chars, args.max_queue, args.max_context_chars)
    step_batching = args.batching == 'step'
    service, step = load_service(args.workdir, args.step, max_batch=args.max_batch,
                                 max_lens=max_lens, max_searches=args.max_searches,
                                 limits=limits, step_batching=step_batching)
    batcher = make_batcher(service, max_wait_ms=args.max_wait_ms,
                           wait_fraction=args.wait_fraction, max_queue=args.max_queue,
                           step_batching=step_batching, chunk_steps=args.chunk_steps)
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  t0 = time.perf_counter()
  searches = [getattr(service, 'default_search', None) if warm[w] is None else warm[w]
              for w in wanted]
  shapes = service.warm_up(list(dict.fromkeys(searches)))
  log.info('warmed up %d bucket shapes in %.1f s', shapes, time.perf_counter() - t0)
  info = model_info(service, batcher, args.workdir, step)
  server = make_server(create_app(service, batcher, info), args.host, args.port)
  # Serving from a thread keeps uvicorn off the signals (it would re-raise SIGTERM after
  # draining, exit status -15); flagging should_exit here drains the same way, then exit 0.
  stop = lambda *_: setattr(server, 'should_exit', True)
  signal.signal(signal.SIGTERM, stop)
  signal.signal(signal.SIGINT, stop)
  try:
    thread, port = start_server(server)
  except OSError as e:
    batcher.close(0)
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'serving {service.task} ({args.workdir}, step {step}) on '
        f'http://{args.host}:{port}{service.path}', flush=True)
  while thread.is_alive():
    thread.join(0.2)
  batcher.close(DRAIN_S)
  log.info('drained; %d batches, %d texts served', batcher.batches_run, batcher.items_run)
  return 0


if __name__ == '__main__':
  sys.exit(main())
