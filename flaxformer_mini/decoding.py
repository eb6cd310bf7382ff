"""Autoregressive decoding as pure functions over a ``tokens_to_logits`` callback.

Decoding knows nothing about the model (t5x style). The model is a callback

    tokens_to_logits(ids, cache) -> (logits, new_cache)

  ids:    [batch, 1] int32, the token at the current step (``bos_id`` at step 0);
  logits: [batch, vocab] float32, the distribution of the *next* token;
  cache:  any pytree. Every leaf with ndim >= 1 has a leading batch axis; leaves
          with ndim == 0 (e.g. a shared step index) are shared by the whole batch.

Every search is a fixed-shape ``lax.while_loop`` that calls the callback once per
step (one token per step) and stops as soon as every row is finished, so all of
them run under ``jax.jit`` with the callback and the integer/float options static.

Output convention (all searches): ``[..., max_decode_len]`` int32 sequences
WITHOUT the leading BOS, EOS included, ``pad_id`` after EOS.

Never generated: ``pad_id`` (it means "no token" in the output; a cached decoder
would attend to a generated pad that a full forward pass masks, so scores would
not match teacher forcing) and, unless ``allow_bos=True``, ``bos_id``. Their
logits are set to -inf before a token is chosen; ``eos_id`` is never banned,
even when it equals one of them. Forced prompt tokens are not affected.

Token ids given by the caller (``prompt``, ``score_sequences``' ``sequences``)
are checked on the host against the vocab size of the callback's logits when
they are concrete (an eager call); a caller that jits a search over its own ids
should check them first with :func:`check_token_ids` (out-of-range ids read NaN
embeddings or garbage silently under ``jit``).

Prompts (decoder-only models): ``prompt: [batch, prompt_len]`` right-padded with
``pad_id``. Row ``b``'s prompt length is the number of tokens before its first
``pad_id``. While step ``t < prompt_length[b]`` the token at position ``t`` is
forced to ``prompt[b, t]`` instead of being chosen, so the prompt appears at the
start of the output and the continuation follows it. A prompt should not
contain ``eos_id`` (a forced EOS finishes the row like a chosen one).

Beam scores (the length-penalized score, GNMT):

    score = sum of log p(token) over the generated tokens / length_penalty(n)
    length_penalty(n) = ((5 + n) / 6) ** alpha

where ``n`` counts the generated tokens including EOS and excluding forced
prompt tokens (whose log-probs are not counted either). A hypothesis that
reaches ``max_decode_len`` without EOS is a candidate too, with
``n = max_decode_len - prompt_length`` (as in Hugging Face's finalize step; it
also covers flax WMT's "no finished hypothesis -> return live beams" fallback).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
PyTree = Any
TokensToLogits = Callable[[Array, PyTree], tuple[Array, PyTree]]

NEG_INF = float("-inf")

# ---------------------------------------------------------------------------
# Shared helpers.
# ---------------------------------------------------------------------------


def length_penalty(length, alpha: float):
  """GNMT length penalty ``((5 + length) / 6) ** alpha``; any array shape, float."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _check_positive_int(name: str, value) -> None:
  if jax.export.is_symbolic_dim(value):
    return  # a symbolic dimension of jax.export (>= 1 by construction)
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}")


def _check_finite(name: str, value) -> None:
  if not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {name}={value!r}")


def check_token_ids(ids, vocab_size: int, what: str = "ids") -> None:
  """Raises ValueError naming the first id of ``ids`` outside ``[0, vocab_size)``.

  Args:
    ids: [batch, length] integer ids, a concrete (NumPy or device) array.
    vocab_size: the model's vocab size.
    what: name for the message: ``inputs[1, 3] = 517 is not a token id ...``.
  """
  values = np.asarray(ids)
  bad = (values < 0) | (values >= vocab_size)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"{what}[{', '.join(map(str, where))}] = {int(values[where])} is not a "
                     f"token id of this model: ids must be in [0, vocab_size={vocab_size})")


def host_ids(ids) -> np.ndarray | None:
  """ids as a NumPy array, or None when they are traced (inside someone's ``jit``)."""
  try:
    return np.asarray(ids)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _banned_ids(pad_id: int, bos_id: int, eos_id: int, allow_bos: bool) -> tuple[int, ...]:
  """Ids the searches never choose: pad, BOS unless ``allow_bos``, never EOS."""
  banned = {pad_id} if allow_bos else {pad_id, bos_id}
  return tuple(sorted(banned - {eos_id}))


def _ban(scores: Array, banned: tuple[int, ...]) -> Array:
  """scores [..., vocab] (logits or log-probs) with the ``banned`` ids set to -inf."""
  ids = [i for i in banned if 0 <= i < scores.shape[-1]]
  if not ids:
    return scores
  return scores.at[..., np.asarray(ids)].set(NEG_INF)


def _check_cache(init_cache: PyTree, batch_size: int) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(init_cache)[0]:
    shape = jnp.shape(leaf)
    if len(shape) >= 1 and shape[0] != batch_size:
      raise ValueError(
          f"cache leaf {jax.tree_util.keystr(path)} must have a leading batch axis of "
          f"size batch_size={batch_size} (or be a scalar shared by the batch), "
          f"got shape {shape}")


def _check_logits(logits: Array, rows: int) -> None:
  if logits.ndim != 2 or logits.shape[0] != rows:
    raise ValueError(f"tokens_to_logits must return logits [{rows}, vocab], "
                     f"got shape {logits.shape}")


def _prepare_prompt(prompt, batch_size: int, max_decode_len: int, pad_id: int):
  """Returns (prompt [batch, prompt_len] int32 or None, prompt_length [batch] int32)."""
  if prompt is None or jnp.shape(prompt)[-1] == 0:
    return None, jnp.zeros((batch_size,), jnp.int32)
  prompt = jnp.asarray(prompt)
  if not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise TypeError(f"expected integer prompt ids, got dtype {prompt.dtype}")
  prompt = prompt.astype(jnp.int32)
  if prompt.ndim != 2 or prompt.shape[0] != batch_size:
    raise ValueError(f"expected prompt [batch_size={batch_size}, prompt_len], "
                     f"got shape {prompt.shape}")
  if prompt.shape[1] > max_decode_len:
    raise ValueError(f"prompt_len={prompt.shape[1]} is longer than "
                     f"max_decode_len={max_decode_len}")
  # Length = number of tokens before the first pad (right padding).
  prompt_length = jnp.sum(jnp.cumprod(prompt != pad_id, axis=1), axis=1)
  return prompt, prompt_length.astype(jnp.int32)


def _forced_token(prompt: Array, t: Array) -> Array:
  """prompt[:, t] (clipped to the last column): [batch] int32."""
  col = jnp.minimum(t, prompt.shape[1] - 1)
  return lax.dynamic_index_in_dim(prompt, col, axis=1, keepdims=False)


# ---------------------------------------------------------------------------
# Greedy search and sampling: one token per row per step.
# ---------------------------------------------------------------------------


def _token_by_token(tokens_to_logits, init_cache, choose, *, batch_size,
                    max_decode_len, bos_id, eos_id, pad_id, prompt, allow_bos):
  """Shared loop of greedy/sample; ``choose(logits [batch, vocab], t) -> [batch]``.

  ``choose`` sees the logits with the banned ids (module docstring) at -inf.
  """
  _check_positive_int("batch_size", batch_size)
  _check_positive_int("max_decode_len", max_decode_len)
  _check_cache(init_cache, batch_size)
  prompt, prompt_length = _prepare_prompt(prompt, batch_size, max_decode_len, pad_id)
  prompt_host = None if prompt is None else host_ids(prompt)
  banned = _banned_ids(pad_id, bos_id, eos_id, allow_bos)

  def cond(state):
    t, _, _, _, done = state
    return (t < max_decode_len) & ~jnp.all(done)

  def body(state):
    t, ids, cache, seqs, done = state
    logits, cache = tokens_to_logits(ids[:, None], cache)
    _check_logits(logits, batch_size)
    if prompt_host is not None:
      check_token_ids(prompt_host, logits.shape[-1], "prompt")
    token = choose(_ban(logits.astype(jnp.float32), banned), t).astype(jnp.int32)
    if prompt is not None:
      token = jnp.where(t < prompt_length, _forced_token(prompt, t), token)
    token = jnp.where(done, pad_id, token)
    seqs = seqs.at[:, t].set(token)
    return t + 1, token, cache, seqs, done | (token == eos_id)

  state = (jnp.array(0, jnp.int32),
           jnp.full((batch_size,), bos_id, jnp.int32),
           init_cache,
           jnp.full((batch_size, max_decode_len), pad_id, jnp.int32),
           jnp.zeros((batch_size,), bool))
  return lax.while_loop(cond, body, state)[3]


def greedy_search(tokens_to_logits: TokensToLogits, init_cache: PyTree, *,
                  batch_size: int, max_decode_len: int, bos_id: int, eos_id: int,
                  pad_id: int = 0, prompt: Array | None = None,
                  allow_bos: bool = False) -> Array:
  """Picks the most probable token at every step (never ``pad_id``, nor ``bos_id``
  unless ``allow_bos``; see the module docstring).

  Args:
    tokens_to_logits: ``(ids [batch, 1], cache) -> (logits [batch, vocab], cache)``.
    init_cache: pytree; leaves with ndim >= 1 are ``[batch, ...]``.
    batch_size, max_decode_len: static ints >= 1.
    bos_id, eos_id, pad_id: token ids (BOS is the first input, never output).
    prompt: optional ``[batch, prompt_len]`` forced prefix, right-padded with
      ``pad_id``; ``prompt_len <= max_decode_len`` (see the module docstring).
      Ids must be in ``[0, vocab)``; checked when concrete (module docstring).
    allow_bos: let ``bos_id`` be generated (e.g. a model trained to emit it as a
      separator); ``pad_id`` never is.

  Returns:
    ``[batch, max_decode_len]`` int32, without BOS, ``pad_id`` after EOS.
  """
  choose = lambda logits, t: jnp.argmax(logits, axis=-1)
  return _token_by_token(tokens_to_logits, init_cache, choose, batch_size=batch_size,
                         max_decode_len=max_decode_len, bos_id=bos_id, eos_id=eos_id,
                         pad_id=pad_id, prompt=prompt, allow_bos=allow_bos)


def top_k_filter(logits: Array, k: int) -> Array:
  """Sets all but the ``k`` largest logits of each row to -inf. logits: [..., vocab]."""
  k = min(k, logits.shape[-1])
  kth_largest = lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth_largest, NEG_INF, logits)


def top_p_filter(logits: Array, p: float) -> Array:
  """Nucleus filter: keeps the smallest set of most probable tokens whose total
  probability is >= ``p`` (token of rank r is kept iff the mass of the tokens
  ranked above it is < p; the top token is always kept). logits: [..., vocab]."""
  sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_above < p
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, NEG_INF, logits)


def sample(tokens_to_logits: TokensToLogits, init_cache: PyTree, rng: Array, *,
           batch_size: int, max_decode_len: int, bos_id: int, eos_id: int,
           pad_id: int = 0, prompt: Array | None = None, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, allow_bos: bool = False) -> Array:
  """Ancestral sampling with temperature, then top-k, then top-p filtering.

  The banned ids (module docstring) are removed first, so the filters and the
  draw see the distribution renormalised over the ids that may be generated.
  Step ``t`` draws from ``categorical(filtered(logits / temperature))`` with key
  ``jax.random.fold_in(rng, t)``; top-p is applied to the distribution left
  after top-k. ``temperature == 0`` is greedy search (filters are then moot).

  Args:
    tokens_to_logits, init_cache, batch_size, max_decode_len, bos_id, eos_id,
      pad_id, prompt, allow_bos: as in :func:`greedy_search`.
    rng: a PRNG key.
    temperature: static finite float >= 0.
    top_k: static int >= 0; 0 means off.
    top_p: static float in (0, 1]; 1.0 means off.

  Returns:
    ``[batch, max_decode_len]`` int32, without BOS, ``pad_id`` after EOS.
  """
  _check_finite("temperature", temperature)
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got temperature={temperature!r}")
  if not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0 (0 = off), got top_k={top_k!r}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got top_p={top_p!r}")

  def choose(logits, t):
    if temperature == 0:
      return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k > 0:
      logits = top_k_filter(logits, top_k)
    if top_p < 1:
      logits = top_p_filter(logits, top_p)
    return jax.random.categorical(jax.random.fold_in(rng, t), logits, axis=-1)

  return _token_by_token(tokens_to_logits, init_cache, choose, batch_size=batch_size,
                         max_decode_len=max_decode_len, bos_id=bos_id, eos_id=eos_id,
                         pad_id=pad_id, prompt=prompt, allow_bos=allow_bos)


# ---------------------------------------------------------------------------
# Beam search.
# ---------------------------------------------------------------------------


def _gather_beams(x: Array, idx: Array) -> Array:
  """x: [batch, n, ...], idx: [batch, m] -> [batch, m, ...]."""
  return jax.vmap(lambda xb, ib: xb[ib])(x, idx)


def _is_per_beam(path, x, static_keys) -> bool:
  """Whether a cache leaf has one row per beam: ndim >= 1 and not under a ``static_keys`` key."""
  return jnp.ndim(x) > 0 and not any(getattr(p, "key", None) in static_keys for p in path)


def _gather_flat_cache(cache: PyTree, idx: Array, static_keys=()) -> PyTree:
  """Reorders cache leaves [batch*beam, ...] by beam indices idx: [batch, beam].

  Leaves under a dict key in ``static_keys`` are the same for every beam of a
  row (e.g. encoder keys/values) and are left in place.
  """
  batch, beam = idx.shape

  def gather(path, x):
    if not _is_per_beam(path, x, static_keys):
      return x
    x = x.reshape((batch, beam) + x.shape[1:])
    return _gather_beams(x, idx).reshape((batch * beam,) + x.shape[2:])

  return jax.tree_util.tree_map_with_path(gather, cache)


def _beam_done(shortest: Array, longest: Array, live_logprobs: Array,
                    fin_scores: Array, fin_flags: Array, alpha: float) -> Array:
  """[batch] bool: a row's search is over (see `beam_search`).

  ``shortest`` / ``longest`` [batch]: the fewest / most generated tokens a live beam can
  still end with. A row is done when its finished pool is full and its worst finished
  score beats the best score a live beam could still reach (its log-prob over the largest
  length penalty still possible; the penalty is monotonic in length, so that is at one of
  the two ends), or when no live beam is left.
  """
  best_penalty = jnp.maximum(length_penalty(shortest, alpha), length_penalty(longest, alpha))
  best_live = jnp.minimum(jnp.max(live_logprobs, axis=1), 0.0)
  worst_finished = jnp.min(fin_scores, axis=1)
  return ((jnp.all(fin_flags, axis=1) & (worst_finished > best_live / best_penalty))
          | (best_live == NEG_INF))


def _beam_update(logprobs: Array, t: Array, generated: Array, live_seqs: Array,
                 live_logprobs: Array, fin_seqs: Array, fin_scores: Array, fin_flags: Array,
                 *, eos_id: int, alpha: float):
  """One beam-search step from the log-probs of every live beam's next token.

  Args:
    logprobs: [batch, beam, vocab] float32 (banned and forced tokens already applied).
    t: [batch] int32, each row's step (its token goes to position ``t``).
    generated: [batch] int32, tokens counted by the length penalty after this step.
    live_seqs, fin_seqs: [batch, beam, max_len]; live_logprobs, fin_scores,
      fin_flags: [batch, beam] (`beam_search`'s state).
  Returns:
    (parent [batch, beam] live beam each new live beam extends, ids [batch, beam] its
    last token, live_seqs, live_logprobs, fin_seqs, fin_scores, fin_flags).
  """
  b, k, vocab = logprobs.shape
  max_len = live_seqs.shape[-1]
  # Top 2*beam extensions of all live beams: [batch, 2*beam].
  extended = (live_logprobs[:, :, None] + logprobs).reshape(b, k * vocab)
  cand_logprobs, cand_index = lax.top_k(extended, min(2 * k, k * vocab))
  cand_parent, cand_token = cand_index // vocab, cand_index % vocab
  cand_seqs = jnp.where(jnp.arange(max_len) == t[:, None, None], cand_token[:, :, None],
                        _gather_beams(live_seqs, cand_parent))
  cand_eos = cand_token == eos_id

  # Finished pool: keep the best `beam` of old finished + newly finished.
  finishing = (cand_eos | (t == max_len - 1)[:, None]) & (cand_logprobs > NEG_INF)
  cand_scores = jnp.where(
      finishing, cand_logprobs / length_penalty(generated, alpha)[:, None], NEG_INF)
  fin_scores, keep = lax.top_k(jnp.concatenate([fin_scores, cand_scores], 1), k)
  fin_seqs = _gather_beams(jnp.concatenate([fin_seqs, cand_seqs], 1), keep)
  fin_flags = _gather_beams(jnp.concatenate([fin_flags, finishing], 1), keep)

  # Live beams: the best `beam` extensions that did not end in EOS.
  live_logprobs, keep = lax.top_k(jnp.where(cand_eos, NEG_INF, cand_logprobs), k)
  return (_gather_beams(cand_parent, keep), _gather_beams(cand_token, keep),
          _gather_beams(cand_seqs, keep), live_logprobs, fin_seqs, fin_scores, fin_flags)


def beam_search(tokens_to_logits: TokensToLogits, init_cache: PyTree, *,
                batch_size: int, beam_size: int, max_decode_len: int, bos_id: int,
                eos_id: int, pad_id: int = 0, alpha: float = 0.6, num_return: int = 1,
                prompt: Array | None = None,
                static_cache_keys: tuple[str, ...] = (),
                allow_bos: bool = False) -> tuple[Array, Array]:
  """Beam search with finished-hypothesis bookkeeping and a GNMT length penalty.

  The callback sees beams flattened into the batch: ``ids [batch*beam, 1]``,
  ``logits [batch*beam, vocab]``; cache leaves with ndim >= 1 are repeated to
  ``[batch*beam, ...]`` (row ``b * beam_size + k``) and reordered along the beam
  after each step, except ``static_cache_keys`` leaves (below); scalar leaves are
  passed through untouched.

  Each step scores the ``beam * vocab`` extensions of the live beams and keeps
  the top ``2 * beam`` (at most ``beam`` of them end in EOS, so ``beam`` live
  ones always remain). Extensions ending in EOS, and all extensions at the last
  step, are merged into a separate pool of the ``beam`` best finished
  hypotheses by score (module docstring); the others become the new live beams
  by log-prob. A row stops when its pool is full and its worst finished score
  beats the best score any live beam could still reach (its log-prob divided
  by the largest length penalty still possible, that of ``max_decode_len``
  when ``alpha >= 0``); the loop stops when every row has stopped.

  The banned ids (module docstring) get log-prob -inf *after* the log-softmax,
  so the other tokens keep the model's own log-probs and a returned score is
  the model's (teacher-forced) log-prob of the returned tokens over the length
  penalty.

  Args:
    tokens_to_logits: ``(ids [batch*beam, 1], cache) -> (logits [batch*beam, vocab], cache)``.
    init_cache: pytree for ``batch_size`` rows (leaves ``[batch, ...]`` or scalars).
    batch_size, beam_size, max_decode_len: static ints >= 1.
    bos_id, eos_id, pad_id: token ids.
    alpha: finite length-penalty exponent (0 = plain sum of log-probs).
    num_return: how many hypotheses to return per row, ``<= beam_size``.
    prompt: optional ``[batch, prompt_len]`` forced prefix (module docstring);
      its tokens count neither in the log-prob nor in the length.
    static_cache_keys: dict keys of cache leaves that never change during
      decoding and are equal across the beams of a row (e.g.
      ``models.STATIC_CACHE_KEYS``: encoder keys/values). They stay at
      ``[batch, ...]``, neither repeated to the beams nor reordered, so the
      callback must map flat row ``r`` to their row ``r // beam_size`` (the
      models' cross-attention does). This saves a gather per step and reads
      each row's encoder K/V once per step instead of once per beam.
    allow_bos: as in :func:`greedy_search`.

  Returns:
    sequences: ``[batch, num_return, max_decode_len]`` int32, best first,
      without BOS, ``pad_id`` after EOS.
    scores: ``[batch, num_return]`` float32, sum of log-probs / length penalty.
      ``-inf`` only if fewer than ``num_return`` hypotheses are possible at all.
  """
  _check_positive_int("batch_size", batch_size)
  _check_positive_int("beam_size", beam_size)
  _check_positive_int("max_decode_len", max_decode_len)
  _check_positive_int("num_return", num_return)
  if num_return > beam_size:
    raise ValueError(f"num_return={num_return} must be <= beam_size={beam_size}")
  _check_finite("alpha", alpha)
  _check_cache(init_cache, batch_size)
  prompt, prompt_length = _prepare_prompt(prompt, batch_size, max_decode_len, pad_id)
  prompt_host = None if prompt is None else host_ids(prompt)
  banned = _banned_ids(pad_id, bos_id, eos_id, allow_bos)
  b, k, max_len = batch_size, beam_size, max_decode_len
  max_generated = max_len - prompt_length  # [batch]

  def cond(state):
    t, _, _, _, live_logprobs, _, fin_scores, fin_flags = state
    # Future completion lengths lie in [t + 1 - prompt_length, max_generated].
    row_done = _beam_done(jnp.maximum(t + 1 - prompt_length, 0), max_generated,
                               live_logprobs, fin_scores, fin_flags, alpha)
    return (t < max_len) & ~jnp.all(row_done)

  def body(state):
    t, ids, cache, live_seqs, live_logprobs, fin_seqs, fin_scores, fin_flags = state
    logits, cache = tokens_to_logits(ids.reshape(b * k, 1), cache)
    _check_logits(logits, b * k)
    vocab = logits.shape[-1]
    if prompt_host is not None:
      check_token_ids(prompt_host, vocab, "prompt")
    logprobs = _ban(jax.nn.log_softmax(logits.astype(jnp.float32)), banned)
    logprobs = logprobs.reshape(b, k, vocab)
    if prompt is not None:
      is_forced = jnp.arange(vocab) == _forced_token(prompt, t)[:, None, None]
      forced_logprobs = jnp.where(is_forced, 0.0, NEG_INF)
      logprobs = jnp.where((t < prompt_length)[:, None, None], forced_logprobs, logprobs)

    parent, ids, live_seqs, live_logprobs, fin_seqs, fin_scores, fin_flags = _beam_update(
        logprobs, jnp.broadcast_to(t, (b,)), t + 1 - prompt_length, live_seqs, live_logprobs,
        fin_seqs, fin_scores, fin_flags, eos_id=eos_id, alpha=alpha)
    cache = _gather_flat_cache(cache, parent, static_cache_keys)
    return t + 1, ids, cache, live_seqs, live_logprobs, fin_seqs, fin_scores, fin_flags

  flat_cache = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.repeat(x, k, axis=0) if _is_per_beam(path, x, static_cache_keys)
      else x, init_cache)
  only_first_beam = jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)
  state = (jnp.array(0, jnp.int32),
           jnp.full((b, k), bos_id, jnp.int32),
           flat_cache,
           jnp.full((b, k, max_len), pad_id, jnp.int32),
           jnp.tile(only_first_beam[None], (b, 1)),
           jnp.full((b, k, max_len), pad_id, jnp.int32),
           jnp.full((b, k), NEG_INF, jnp.float32),
           jnp.zeros((b, k), bool))
  state = lax.while_loop(cond, body, state)
  fin_seqs, fin_scores = state[5], state[6]
  return fin_seqs[:, :num_return], fin_scores[:, :num_return]


# ---------------------------------------------------------------------------
# Step-level (continuous) beam search: rows join and leave between steps.
# ---------------------------------------------------------------------------


class BeamRows(NamedTuple):
  """A beam search over a fixed pool of rows, each at its own step (`beam_rows_*`).

  A server keeps one: a finished row leaves at once and a new sentence takes its place
  between two steps, so the pool never waits for its longest sentence (Orca-style
  iteration-level batching). The cache's step indices must be per row ([rows * beam],
  e.g. `models.rows_cache`), so each row writes and masks its own positions.

  Attributes (``rows`` slots, ``beam`` beams each):
    t: [rows] int32, steps taken by each row.
    ids: [rows, beam] int32, each live beam's last token.
    cache: the callback's cache, per-beam leaves [rows * beam, ...], static ones [rows, ...].
    live_seqs, fin_seqs: [rows, beam, max_decode_len] int32.
    live_logprobs, fin_scores: [rows, beam] float32.
    fin_flags: [rows, beam] bool.
    active: [rows] bool, a row still searching (an idle slot is inactive).
  """
  t: Array
  ids: Array
  cache: PyTree
  live_seqs: Array
  live_logprobs: Array
  fin_seqs: Array
  fin_scores: Array
  fin_flags: Array
  active: Array


def beam_rows_init(cache: PyTree, *, rows: int, beam_size: int, max_decode_len: int,
                   pad_id: int = 0, static_cache_keys: tuple[str, ...] = ()) -> BeamRows:
  """An idle pool of ``rows`` slots (all inactive) for a cache of ``rows`` rows."""
  _check_positive_int("rows", rows)
  _check_positive_int("beam_size", beam_size)
  _check_positive_int("max_decode_len", max_decode_len)
  _check_cache(cache, rows)
  for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
    if jnp.ndim(leaf) == 0:
      raise ValueError(f"cache leaf {jax.tree_util.keystr(path)} is a scalar; step-level "
                       "batching needs one value per row (e.g. models.rows_cache)")
  k = beam_size
  flat = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.repeat(x, k, axis=0) if _is_per_beam(path, x, static_cache_keys)
      else x, cache)
  seqs = lambda: jnp.full((rows, k, max_decode_len), pad_id, jnp.int32)  # distinct buffers
  return BeamRows(t=jnp.zeros((rows,), jnp.int32), ids=jnp.full((rows, k), pad_id, jnp.int32),
                  cache=flat, live_seqs=seqs(), live_logprobs=jnp.full((rows, k), NEG_INF),
                  fin_seqs=seqs(), fin_scores=jnp.full((rows, k), NEG_INF),
                  fin_flags=jnp.zeros((rows, k), bool), active=jnp.zeros((rows,), bool))


def beam_rows_start(state: BeamRows, slots: Array, cache: PyTree, *, bos_id: int,
                    pad_id: int = 0, static_cache_keys: tuple[str, ...] = ()) -> BeamRows:
  """Starts new sentences in ``slots`` of the pool.

  Args:
    state: the pool.
    slots: [n] int32 slot per new row; a slot >= the pool's rows is ignored (padding
      up to a compiled ``n``).
    cache: the new rows' initial cache, leaves [n, ...] shaped like the pool's
      (per-row step indices at 0).
  Returns:
    the pool with those slots reset to step 0 and active.
  """
  k = state.ids.shape[1]
  beam_rows = (slots[:, None] * k + jnp.arange(k)).reshape(-1)  # the slots' flat beam rows

  def put(path, pool, new):
    if _is_per_beam(path, pool, static_cache_keys):
      return pool.at[beam_rows].set(jnp.repeat(new, k, axis=0).astype(pool.dtype), mode="drop")
    return pool.at[slots].set(new.astype(pool.dtype), mode="drop")

  n = slots.shape[0]
  set_rows = lambda x, value: x.at[slots].set(jnp.broadcast_to(value, (n,) + x.shape[1:]),
                                              mode="drop")
  only_first_beam = jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)
  return BeamRows(
      t=set_rows(state.t, 0), ids=set_rows(state.ids, bos_id),
      cache=jax.tree_util.tree_map_with_path(put, state.cache, cache),
      live_seqs=set_rows(state.live_seqs, pad_id),
      live_logprobs=set_rows(state.live_logprobs, only_first_beam),
      fin_seqs=set_rows(state.fin_seqs, pad_id), fin_scores=set_rows(state.fin_scores, NEG_INF),
      fin_flags=set_rows(state.fin_flags, False), active=set_rows(state.active, True))


def beam_rows_advance(tokens_to_logits: TokensToLogits, state: BeamRows, max_steps, *,
                      max_decode_len: int, eos_id: int, bos_id: int, pad_id: int = 0,
                      alpha: float = 0.6, static_cache_keys: tuple[str, ...] = (),
                      allow_bos: bool = False) -> tuple[BeamRows, Array]:
  """Runs every active row up to ``max_steps`` steps; returns as soon as one finishes.

  Each row follows `beam_search` exactly (same candidates, finished pool, length
  penalty and stopping rule, without prompts), so a sentence gets the hypothesis it
  would get alone. Idle and finished rows are computed but keep their state.

  Args:
    tokens_to_logits: as in `beam_search` (flat ``[rows * beam, 1]`` ids).
    state: the pool (`beam_rows_init` / `beam_rows_start`).
    max_steps: int32 scalar >= 1, may be traced (one compiled loop for any value).
  Returns:
    (state, finished [rows] bool: the rows that finished in this call). A finished
    row's answer is ``state.fin_seqs[row, 0]`` (score ``state.fin_scores[row, 0]``)
    until the slot is started again.
  """
  rows, k = state.ids.shape
  max_len = max_decode_len
  banned = _banned_ids(pad_id, bos_id, eos_id, allow_bos)

  def step(s: BeamRows) -> BeamRows:
    logits, cache = tokens_to_logits(s.ids.reshape(rows * k, 1), s.cache)
    _check_logits(logits, rows * k)
    logprobs = _ban(jax.nn.log_softmax(logits.astype(jnp.float32)), banned)
    parent, ids, live_seqs, live_logprobs, fin_seqs, fin_scores, fin_flags = _beam_update(
        logprobs.reshape(rows, k, -1), s.t, s.t + 1, s.live_seqs, s.live_logprobs,
        s.fin_seqs, s.fin_scores, s.fin_flags, eos_id=eos_id, alpha=alpha)
    cache = _gather_flat_cache(cache, parent, static_cache_keys)
    new = BeamRows(s.t + 1, ids, None, live_seqs, live_logprobs, fin_seqs, fin_scores,
                   fin_flags, s.active)
    # Rows that were not searching keep their state (their cache is scratch).
    kept = jax.tree_util.tree_map(
        lambda n, o: jnp.where(s.active.reshape((rows,) + (1,) * (n.ndim - 1)), n, o),
        new, s._replace(cache=None))
    stopped = _beam_done(kept.t + 1, max_len, kept.live_logprobs, kept.fin_scores,
                              kept.fin_flags, alpha) | (kept.t >= max_len)
    return kept._replace(cache=cache, active=s.active & ~stopped)

  def cond(carry):
    n, s, finished = carry
    return (n < max_steps) & jnp.any(s.active) & ~jnp.any(finished)

  def body(carry):
    n, s, finished = carry
    new = step(s)
    return n + 1, new, finished | (s.active & ~new.active)

  _, state, finished = lax.while_loop(
      cond, body, (jnp.array(0, jnp.int32), state, jnp.zeros((rows,), bool)))
  return state, finished


# ---------------------------------------------------------------------------
# Teacher-forced scoring.
# ---------------------------------------------------------------------------


def score_sequences(tokens_to_logits: TokensToLogits, init_cache: PyTree,
                    sequences: Array, *, bos_id: int, eos_id: int,
                    pad_id: int) -> Array:
  """Summed log-probability of given sequences, teacher-forced one token per step.

  Feeds ``bos_id, sequences[:, 0], sequences[:, 1], ...`` through the same
  callback and sums ``log p(sequences[:, t])`` over the tokens up to and
  including the first EOS, skipping ``pad_id`` tokens (padding is not scored).
  Dividing by ``length_penalty(n, alpha)`` with ``n`` the number of scored
  tokens reproduces :func:`beam_search`'s scores (without a prompt).

  Args:
    tokens_to_logits: ``(ids [batch, 1], cache) -> (logits [batch, vocab], cache)``.
    init_cache: pytree; leaves with ndim >= 1 are ``[batch, ...]``.
    sequences: ``[batch, seq_len]`` int, without BOS (the decoders' output format);
      ids in ``[0, vocab)``, checked when concrete (module docstring).
    bos_id, eos_id, pad_id: token ids.

  Returns:
    ``[batch]`` float32 log-probabilities.
  """
  sequences = jnp.asarray(sequences, jnp.int32)
  if sequences.ndim != 2:
    raise ValueError(f"expected sequences [batch, seq_len], got shape {sequences.shape}")
  batch = sequences.shape[0]
  _check_cache(init_cache, batch)
  sequences_host = host_ids(sequences)
  inputs = jnp.concatenate([jnp.full((batch, 1), bos_id, jnp.int32), sequences[:, :-1]], 1)

  def step(cache, ids_and_targets):
    ids, targets = ids_and_targets  # [batch] each
    logits, cache = tokens_to_logits(ids[:, None], cache)
    _check_logits(logits, batch)
    if sequences_host is not None:
      check_token_ids(sequences_host, logits.shape[-1], "sequences")
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32))
    return cache, jnp.take_along_axis(logprobs, targets[:, None], axis=1)[:, 0]

  _, token_logprobs = lax.scan(step, init_cache, (inputs.T, sequences.T))
  is_eos = sequences == eos_id
  after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
  scored = ~after_eos & (sequences != pad_id)
  return jnp.sum(jnp.where(scored, token_logprobs.T, 0.0), axis=1)
