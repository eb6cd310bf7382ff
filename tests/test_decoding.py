"""Tests for flaxformer_mini.decoding with hand-written toy models.

Token ids in every toy model: 0 = PAD = BOS (its logit is -1e9, so it is never
generated and padding is unambiguous), 1 = EOS, 2.. = ordinary tokens.

* Markov model: logits = table[step, previous token]; the cache carries the
  previous token ([batch]) and a shared scalar step. Each step's distribution
  can be recomputed from the table without the cache.
* Prefix model: logits depend on the whole prefix and on a per-row context; the
  cache holds the prefix [batch, max_len], the row id [batch] and a scalar step,
  so beam search must reorder the cache correctly to get anything right.
Both have float64 NumPy references. The pad/BOS tests below also decode a tiny random
`Transformer` and compare beam scores with its full (teacher-forced) forward pass.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_mini import decoding

PAD = BOS = 0
EOS = 1


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _penalty(n, alpha):
  return ((5.0 + n) / 6.0) ** alpha


# ---------------------------------------------------------------------------
# Toy models.
# ---------------------------------------------------------------------------


class MarkovModel:
  """logits[b] = table[step, ids[b]]; cache = {'prev': [batch], 'step': ()}."""

  def __init__(self, seed, vocab, max_len, scale=2.0, eos_bias=0.0):
    table = scale * np.random.RandomState(seed).randn(max_len, vocab, vocab)
    table[:, :, EOS] += eos_bias
    table[:, :, PAD] = -1e9
    self.table = table.astype(np.float32)

  def init_cache(self, batch):
    return {"prev": jnp.zeros((batch,), jnp.int32), "step": jnp.array(0, jnp.int32)}

  def __call__(self, ids, cache):
    logits = jnp.asarray(self.table)[cache["step"], ids[:, 0]]
    return logits, {"prev": ids[:, 0], "step": cache["step"] + 1}

  def logits_np(self, step, prev):
    return self.table[step, prev]

  def logprob_np(self, tokens, start=0):
    """Sum of log p(tokens[t]) for t >= start, given the full prefix from BOS."""
    prev, total = BOS, 0.0
    for t, tok in enumerate(tokens):
      if t >= start:
        total += _log_softmax(self.table[t, prev])[tok]
      prev = tok
    return total


class PrefixModel:
  """Logits from the whole prefix and a per-row context.

  h = ctx[row] + sum_{j <= step} emb[j, prefix[j]];  logits = 3 tanh(h) @ out.
  cache = {'prefix': [batch, max_len], 'row': [batch], 'step': ()}.
  """

  def __init__(self, seed, vocab, max_len, dim=8, num_rows=8, eos_bias=0.0):
    rs = np.random.RandomState(seed)
    self.max_len = max_len
    self.emb = rs.randn(max_len, vocab, dim).astype(np.float32)
    self.ctx = rs.randn(num_rows, dim).astype(np.float32)
    self.out = rs.randn(dim, vocab).astype(np.float32)
    self.bias = np.zeros(vocab, np.float32)
    self.bias[EOS] = eos_bias
    self.bias[PAD] = -1e9

  def init_cache(self, batch):
    return {"prefix": jnp.zeros((batch, self.max_len), jnp.int32),
            "row": jnp.arange(batch, dtype=jnp.int32),
            "step": jnp.array(0, jnp.int32)}

  def __call__(self, ids, cache):
    step = cache["step"]
    prefix = cache["prefix"].at[:, step].set(ids[:, 0])
    visible = (jnp.arange(self.max_len) <= step)[None, :, None]
    e = jnp.asarray(self.emb)[jnp.arange(self.max_len)[None, :], prefix]  # [b, L, d]
    h = jnp.asarray(self.ctx)[cache["row"]] + jnp.sum(jnp.where(visible, e, 0.0), 1)
    logits = 3.0 * jnp.tanh(h) @ jnp.asarray(self.out) + jnp.asarray(self.bias)
    return logits, {"prefix": prefix, "row": cache["row"], "step": step + 1}

  def logits_np(self, row, inputs):
    """inputs: BOS + the tokens so far (len = step + 1)."""
    h = self.ctx[row].astype(np.float64)
    for j, tok in enumerate(inputs):
      h = h + self.emb[j, tok]
    return 3.0 * np.tanh(h) @ self.out + self.bias

  def logprob_np(self, row, tokens):
    inputs, total = [BOS], 0.0
    for tok in tokens:
      total += _log_softmax(self.logits_np(row, inputs))[tok]
      inputs.append(tok)
    return total


def _counting(model, counter):
  """Wraps a model to count its calls on the host (works under jit and while_loop)."""
  def tokens_to_logits(ids, cache):
    jax.debug.callback(lambda: counter.append(1))
    return model(ids, cache)
  return tokens_to_logits


def _pad(tokens, length):
  return list(tokens) + [PAD] * (length - len(tokens))


def _unpad(seq):
  """Tokens up to and including the first EOS (or all of them)."""
  seq = [int(x) for x in seq]
  return seq[:seq.index(EOS) + 1] if EOS in seq else seq


def _enumerate_hypotheses(model, row, vocab, max_len, alpha):
  """All outputs beam search can return (EOS-ended, or max_len without EOS), best first."""
  words = range(2, vocab)
  hyps = []
  for n in range(max_len):
    for body in itertools.product(words, repeat=n):
      hyps.append(list(body) + [EOS])
  hyps += [list(body) for body in itertools.product(words, repeat=max_len)]
  scored = [(model.logprob_np(row, h) / _penalty(len(h), alpha), h) for h in hyps]
  return sorted(scored, key=lambda x: -x[0])


def _check_eos_padding(seqs):
  for seq in np.asarray(seqs).reshape(-1, np.shape(seqs)[-1]).tolist():
    if EOS in seq:
      i = seq.index(EOS)
      assert all(x == PAD for x in seq[i + 1:]), seq
      assert PAD not in seq[:i], seq
    else:
      assert PAD not in seq, seq


# ---------------------------------------------------------------------------
# Beam search.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_wide_beam_matches_exhaustive_enumeration(alpha):
  # Vocab {PAD, EOS, 2, 3}, max_len 4: at most 2**3 = 8 live prefixes, so a beam
  # of 8 is as wide as the search space and must be exact, top-n order included.
  vocab, max_len, batch, beam = 4, 4, 3, 8
  model = PrefixModel(seed=1, vocab=vocab, max_len=max_len)
  seqs, scores = decoding.beam_search(
      model, model.init_cache(batch), batch_size=batch, beam_size=beam,
      max_decode_len=max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD, alpha=alpha,
      num_return=beam)
  assert seqs.shape == (batch, beam, max_len) and scores.shape == (batch, beam)
  tops = []
  for row in range(batch):
    expected = _enumerate_hypotheses(model, row, vocab, max_len, alpha)[:beam]
    gaps = -np.diff([s for s, _ in expected])
    assert gaps.min() > 1e-4, "toy model has near-ties; pick another seed"
    np.testing.assert_array_equal(seqs[row], [_pad(h, max_len) for _, h in expected])
    np.testing.assert_allclose(scores[row], [s for s, _ in expected], rtol=1e-5, atol=1e-5)
    tops.append(expected[0][1])
  # The rows condition the model differently, so they must not all agree.
  assert len({tuple(t) for t in tops}) > 1


def test_alpha_changes_the_winner():
  # Guards the test above against a length penalty that is silently ignored.
  model = PrefixModel(seed=1, vocab=4, max_len=4)
  best = {a: [_enumerate_hypotheses(model, r, 4, 4, a)[0][1] for r in range(3)]
          for a in (0.0, 0.6, 3.0)}
  seqs = {a: decoding.beam_search(
      model, model.init_cache(3), batch_size=3, beam_size=8, max_decode_len=4,
      bos_id=BOS, eos_id=EOS, alpha=a)[0][:, 0] for a in (0.0, 3.0)}
  assert best[0.0] != best[3.0]
  for a in (0.0, 3.0):
    np.testing.assert_array_equal(seqs[a], [_pad(h, 4) for h in best[a]])


def test_beam_scores_equal_score_sequences_over_length_penalty():
  vocab, max_len, batch, beam, alpha = 6, 6, 3, 3, 0.6
  model = PrefixModel(seed=2, vocab=vocab, max_len=max_len, eos_bias=0.5)
  seqs, scores = decoding.beam_search(
      model, model.init_cache(batch), batch_size=batch, beam_size=beam,
      max_decode_len=max_len, bos_id=BOS, eos_id=EOS, alpha=alpha, num_return=beam)
  _check_eos_padding(seqs)
  flat = seqs.reshape(batch * beam, max_len)
  rows = np.repeat(np.arange(batch), beam)
  cache = {"prefix": jnp.zeros((batch * beam, max_len), jnp.int32),
           "row": jnp.asarray(rows, jnp.int32), "step": jnp.array(0, jnp.int32)}
  logprobs = decoding.score_sequences(model, cache, flat, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  lengths = [len(_unpad(s)) for s in np.asarray(flat)]
  expected = np.asarray(logprobs) / _penalty(np.asarray(lengths), alpha)
  np.testing.assert_allclose(scores.reshape(-1), expected, rtol=1e-5, atol=1e-5)
  # score_sequences itself against the float64 reference.
  ref = [model.logprob_np(r, _unpad(s)) for r, s in zip(rows, np.asarray(flat))]
  np.testing.assert_allclose(logprobs, ref, rtol=1e-5, atol=1e-5)
  assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)  # best first
  for row in np.asarray(seqs):
    assert len({tuple(s) for s in row}) == beam  # distinct hypotheses


def test_beam_one_equals_greedy_without_eos():
  model = MarkovModel(seed=3, vocab=6, max_len=5, eos_bias=-1e9)  # EOS never wins
  cache = model.init_cache(4)
  greedy = decoding.greedy_search(model, cache, batch_size=4, max_decode_len=5,
                                  bos_id=BOS, eos_id=EOS)
  beam, _ = decoding.beam_search(model, cache, batch_size=4, beam_size=1,
                                 max_decode_len=5, bos_id=BOS, eos_id=EOS)
  np.testing.assert_array_equal(beam[:, 0], greedy)


def _beam_search_np(model, row, max_len, beam, alpha):
  """Float64 reference of the documented algorithm, without early stopping.

  Per step: the top 2*beam extensions by log-prob; those ending in EOS (all of
  them at the last step) join the finished pool, which keeps the best `beam` by
  score; the best `beam` others stay live.
  """
  live, finished = [(0.0, [])], []
  for t in range(max_len):
    cands = [(lp + logp, seq + [tok])
             for lp, seq in live
             for tok, logp in enumerate(_log_softmax(model.logits_np(row, [BOS] + seq)))]
    cands = sorted(cands, key=lambda c: -c[0])[:2 * beam]
    finished += [(lp / _penalty(len(seq), alpha), seq) for lp, seq in cands
                 if seq[-1] == EOS or t == max_len - 1]
    finished = sorted(finished, key=lambda c: -c[0])[:beam]
    live = [c for c in cands if c[1][-1] != EOS][:beam]
  return finished


def test_beam_search_matches_reference_and_stops_early():
  # Narrow beams on a 7-step space: checks the bookkeeping (top 2*beam, EOS
  # handling, finished pool, early stop) against the reference, which never
  # stops early, so a too-eager stopping rule changes the answer.
  # Seed 4 stops early; on seed 0 keeping only the top `beam` extensions (not
  # 2 * beam) would lose hypotheses.
  vocab, max_len, batch = 5, 7, 4
  steps_taken = []
  for seed, beam, alpha in [(4, 1, 0.6), (4, 2, 0.0), (4, 2, 2.0),
                            (0, 1, 0.6), (0, 2, 2.0), (0, 3, 0.6)]:
    model = PrefixModel(seed=seed, vocab=vocab, max_len=max_len, eos_bias=1.0)
    counter = []
    seqs, scores = decoding.beam_search(
        _counting(model, counter), model.init_cache(batch), batch_size=batch,
        beam_size=beam, max_decode_len=max_len, bos_id=BOS, eos_id=EOS, alpha=alpha,
        num_return=beam)
    jax.effects_barrier()
    steps_taken.append(len(counter))
    for row in range(batch):
      expected = _beam_search_np(model, row, max_len, beam, alpha)
      np.testing.assert_array_equal(seqs[row], [_pad(h, max_len) for _, h in expected])
      np.testing.assert_allclose(scores[row], [s for s, _ in expected], rtol=1e-5, atol=1e-5)
  # The comparison only guards the stopping rule if some run did stop early.
  assert min(steps_taken) < max_len, steps_taken


def test_beam_search_with_prompt():
  vocab, max_len, alpha = 6, 6, 0.6
  model = MarkovModel(seed=5, vocab=vocab, max_len=max_len, eos_bias=-1.0)
  prompt = np.array([[2, 3, 4], [5, 0, 0], [0, 0, 0]], np.int32)
  plen = [3, 1, 0]
  seqs, scores = decoding.beam_search(
      model, model.init_cache(3), batch_size=3, beam_size=2, max_decode_len=max_len,
      bos_id=BOS, eos_id=EOS, alpha=alpha, num_return=2, prompt=prompt)
  _check_eos_padding(seqs)
  for row in range(3):
    for k in range(2):
      seq = _unpad(np.asarray(seqs[row, k]))
      assert seq[:plen[row]] == prompt[row, :plen[row]].tolist()
      # Prompt tokens count neither in the log-prob nor in the length.
      expected = (model.logprob_np(seq, start=plen[row])
                  / _penalty(len(seq) - plen[row], alpha))
      np.testing.assert_allclose(scores[row, k], expected, rtol=1e-5, atol=1e-5)


def test_loops_stop_early_and_run_under_jit():
  # EOS is impossible at step 0 and near-certain at step 1, so every search should stop after
  # 2 calls although max_decode_len is 10.
  max_len, batch = 10, 3
  model = MarkovModel(seed=6, vocab=5, max_len=max_len)
  model.table[0, :, EOS] = -1e9
  model.table[1, :, EOS] = 30.0
  counter = []
  fn = _counting(model, counter)
  cache = model.init_cache(batch)
  greedy = jax.jit(functools.partial(
      decoding.greedy_search, fn, batch_size=batch, max_decode_len=max_len,
      bos_id=BOS, eos_id=EOS))
  out = greedy(cache)
  jax.effects_barrier()
  assert len(counter) == 2 and out.shape == (batch, max_len)
  assert np.all(np.asarray(out[:, 1]) == EOS) and np.all(np.asarray(out[:, 2:]) == PAD)

  counter.clear()
  beam = jax.jit(decoding.beam_search, static_argnums=0, static_argnames=(
      "batch_size", "beam_size", "max_decode_len", "bos_id", "eos_id", "alpha",
      "num_return"))
  seqs, scores = beam(fn, cache, batch_size=batch, beam_size=2, max_decode_len=max_len,
                      bos_id=BOS, eos_id=EOS, alpha=0.6, num_return=2)
  jax.effects_barrier()
  assert len(counter) == 2 and seqs.shape == (batch, 2, max_len)
  eager = decoding.beam_search(model, cache, batch_size=batch, beam_size=2,
                               max_decode_len=max_len, bos_id=BOS, eos_id=EOS,
                               alpha=0.6, num_return=2)
  np.testing.assert_array_equal(seqs, eager[0])
  np.testing.assert_allclose(scores, eager[1], rtol=1e-6)


# ---------------------------------------------------------------------------
# Greedy search, prompts, EOS.
# ---------------------------------------------------------------------------


def _greedy_np(model, max_len, prompt_row=()):
  out, prev = [], BOS
  for t in range(max_len):
    tok = prompt_row[t] if t < len(prompt_row) else int(np.argmax(model.logits_np(t, prev)))
    out.append(tok)
    if tok == EOS:
      break
    prev = tok
  return _pad(out, max_len)


def test_greedy_matches_reference_and_prompt_is_forced():
  vocab, max_len = 7, 8
  model = MarkovModel(seed=7, vocab=vocab, max_len=max_len, eos_bias=-0.5)
  prompt = np.array([[2, 3, 4, 5, 6], [6, 2, 0, 0, 0], [0, 0, 0, 0, 0],
                     [3, 3, 3, 3, 3]], np.int32)
  plens = [5, 2, 0, 5]
  out = decoding.greedy_search(model, model.init_cache(4), batch_size=4,
                               max_decode_len=max_len, bos_id=BOS, eos_id=EOS,
                               prompt=prompt)
  expected = [_greedy_np(model, max_len, prompt[r, :plens[r]].tolist()) for r in range(4)]
  np.testing.assert_array_equal(out, expected)
  # The prompt changes the continuation (else the test above proves little).
  assert expected[0][5:] != _greedy_np(model, max_len)[5:]
  no_prompt = decoding.greedy_search(model, model.init_cache(1), batch_size=1,
                                     max_decode_len=max_len, bos_id=BOS, eos_id=EOS)
  np.testing.assert_array_equal(no_prompt[0], _greedy_np(model, max_len))


def test_after_eos_only_pad():
  vocab, max_len, batch = 6, 8, 32
  model = MarkovModel(seed=8, vocab=vocab, max_len=max_len, scale=1.0)
  cache = model.init_cache(batch)
  kw = dict(batch_size=batch, max_decode_len=max_len, bos_id=BOS, eos_id=EOS)
  samples = decoding.sample(model, cache, jax.random.PRNGKey(0), temperature=2.0, **kw)
  beams, _ = decoding.beam_search(model, cache, beam_size=3, num_return=3, **kw)
  finished = [EOS in s for s in np.asarray(samples).tolist()]
  assert any(finished) and not all(finished)  # both cases exercised
  for seqs in (samples, beams, decoding.greedy_search(model, cache, **kw)):
    _check_eos_padding(seqs)


# ---------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------


def _sample(model, batch, max_len, key, **kw):
  return np.asarray(decoding.sample(model, model.init_cache(batch), jax.random.PRNGKey(key),
                                    batch_size=batch, max_decode_len=max_len,
                                    bos_id=BOS, eos_id=EOS, **kw))


def _steps(seqs):
  """Yields (step, previous token, token) for every generated token."""
  for seq in seqs.tolist():
    prev = BOS
    for t, tok in enumerate(_unpad(seq)):
      yield t, prev, tok
      prev = tok


def test_sampling_reproducible_and_key_dependent():
  model = MarkovModel(seed=9, vocab=8, max_len=6, scale=0.5)
  a = _sample(model, 8, 6, key=0)
  np.testing.assert_array_equal(a, _sample(model, 8, 6, key=0))
  assert not np.array_equal(a, _sample(model, 8, 6, key=1))


def test_temperature_zero_is_greedy():
  model = MarkovModel(seed=10, vocab=8, max_len=6)
  greedy = decoding.greedy_search(model, model.init_cache(4), batch_size=4,
                                  max_decode_len=6, bos_id=BOS, eos_id=EOS)
  np.testing.assert_array_equal(_sample(model, 4, 6, key=3, temperature=0.0), greedy)


@pytest.mark.parametrize("temperature, top_k, top_p, kept", [
    (2.0, 0, 1.0, [0, 1, 2, 3, 4, 5]),
    (1.0, 2, 1.0, [4, 5]),        # the 2 largest logits
    (1.5, 0, 0.7, [3, 4, 5]),     # nucleus at temperature 1.5
    (1.5, 2, 0.5, [5]),           # top-p of the renormalized top-2 (not [4, 5])
])
def test_first_step_frequencies_follow_filtered_softmax(temperature, top_k, top_p, kept):
  # First-step logits of token i >= 1 are set to 0.7 * i (PAD stays -1e9), so the
  # expected kept sets are known by hand; frequencies must then match the
  # renormalized tempered softmax over exactly those tokens.
  model = MarkovModel(seed=11, vocab=6, max_len=1)
  model.table[0, BOS, 1:] = 0.7 * np.arange(1, 6)
  draws = _sample(model, 4000, 1, key=4, temperature=temperature, top_k=top_k, top_p=top_p)
  freq = np.bincount(draws[:, 0], minlength=6) / len(draws)
  expected = np.zeros(6)
  expected[kept] = np.exp(_log_softmax(model.table[0, BOS, kept] / temperature))
  np.testing.assert_allclose(freq, expected, atol=0.03)


def test_top_k_never_leaves_the_k_most_probable():
  vocab, max_len, k = 8, 5, 3
  model = MarkovModel(seed=12, vocab=vocab, max_len=max_len, scale=1.0)

  def outside(seqs):
    return sum(tok not in np.argsort(-model.logits_np(t, prev))[:k]
               for t, prev, tok in _steps(seqs))

  assert outside(_sample(model, 64, max_len, key=5, temperature=1.5, top_k=k)) == 0
  assert outside(_sample(model, 64, max_len, key=5, temperature=1.5)) > 0


def test_top_p_never_leaves_the_nucleus():
  vocab, max_len, p, temperature = 8, 5, 0.6, 1.5
  model = MarkovModel(seed=13, vocab=vocab, max_len=max_len, scale=1.0)

  def nucleus(t, prev):
    probs = np.exp(_log_softmax(model.logits_np(t, prev) / temperature))
    order = np.argsort(-probs)
    mass_above = np.cumsum(probs[order]) - probs[order]
    return set(order[mass_above < p].tolist())

  def outside(seqs):
    return sum(tok not in nucleus(t, prev) for t, prev, tok in _steps(seqs))

  kw = dict(temperature=temperature)
  assert outside(_sample(model, 64, max_len, key=6, top_p=p, **kw)) == 0
  assert outside(_sample(model, 64, max_len, key=6, **kw)) > 0
  # top-k then top-p: the nucleus of the top-2 distribution is within the top 2.
  both = _sample(model, 64, max_len, key=7, top_k=2, top_p=p, **kw)
  assert all(tok in np.argsort(-model.logits_np(t, prev))[:2] for t, prev, tok in _steps(both))


def test_sample_with_prompt_and_jit():
  model = MarkovModel(seed=14, vocab=6, max_len=6, eos_bias=-2.0)
  prompt = np.array([[2, 3], [4, 0]], np.int32)
  fn = jax.jit(functools.partial(decoding.sample, model, batch_size=2, max_decode_len=6,
                                 bos_id=BOS, eos_id=EOS, top_k=3))
  out = np.asarray(fn(model.init_cache(2), jax.random.PRNGKey(8), prompt=prompt))
  assert out[0, :2].tolist() == [2, 3] and out[1, 0] == 4
  eager = _sample(model, 2, 6, key=8, top_k=3, prompt=prompt)
  np.testing.assert_array_equal(out, eager)


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(beam_size=0), "beam_size=0"),
    (dict(num_return=3), "num_return=3 must be <= beam_size=2"),
    (dict(max_decode_len=0), "max_decode_len=0"),
    (dict(prompt=np.ones((2, 5), np.int32)), "prompt_len=5 .* max_decode_len=4"),
    (dict(prompt=np.array([[2, 3], [9, 0]], np.int32)),
     r"prompt\[1, 0\] = 9.*vocab_size=4"),
    (dict(alpha=float("nan")), "alpha=nan"),
    (dict(alpha=float("inf")), "alpha=inf"),
])
def test_beam_search_errors(kwargs, match):
  model = MarkovModel(seed=0, vocab=4, max_len=4)
  args = dict(batch_size=2, beam_size=2, max_decode_len=4, bos_id=BOS, eos_id=EOS)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    decoding.beam_search(model, model.init_cache(2), **args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(max_decode_len=0), "max_decode_len=0"),
    (dict(prompt=np.ones((2, 5), np.int32)), "prompt_len=5 .* max_decode_len=4"),
    (dict(prompt=np.array([[2, -1], [3, 0]], np.int32)),
     r"prompt\[0, 1\] = -1.*vocab_size=4"),
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(temperature=float("nan")), "temperature=nan"),
])
def test_sample_errors(kwargs, match):
  model = MarkovModel(seed=0, vocab=4, max_len=4)
  args = dict(batch_size=2, max_decode_len=4, bos_id=BOS, eos_id=EOS)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    decoding.sample(model, model.init_cache(2), jax.random.PRNGKey(0), **args)


def test_cache_batch_axis_is_checked():
  model = MarkovModel(seed=0, vocab=4, max_len=4)
  with pytest.raises(ValueError, match=r"\['prev'\].*batch_size=3.*\(2,\)"):
    decoding.greedy_search(model, model.init_cache(2), batch_size=3, max_decode_len=4,
                           bos_id=BOS, eos_id=EOS)


def test_score_sequences_refuses_out_of_range_ids():
  model = MarkovModel(seed=0, vocab=4, max_len=4)
  with pytest.raises(ValueError, match=r"sequences\[1, 2\] = 4"):
    decoding.score_sequences(model, model.init_cache(2), np.array([[2, 3, 1], [2, 2, 4]]),
                             bos_id=BOS, eos_id=EOS, pad_id=PAD)


# ---------------------------------------------------------------------------
# Pad and BOS are never generated.
# ---------------------------------------------------------------------------


def _search(method, model, batch, max_len, bos, **kw):
  """[rows, max_len] outputs of greedy / beam (all 3 hypotheses) / sample."""
  common = dict(batch_size=batch, max_decode_len=max_len, bos_id=bos, eos_id=EOS, pad_id=PAD)
  cache = model.init_cache(batch)
  if method == "greedy":
    return np.asarray(decoding.greedy_search(model, cache, **common, **kw))
  if method == "beam":
    seqs, _ = decoding.beam_search(model, cache, beam_size=3, num_return=3, **common, **kw)
    return np.asarray(seqs).reshape(-1, max_len)
  return np.asarray(decoding.sample(model, cache, jax.random.PRNGKey(0), **common, **kw))


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_pad_and_bos_are_never_generated_even_when_most_likely(method):
  # BOS = 2 here (not PAD), so the two bans are told apart. PAD (then BOS) has the
  # largest logit at every step; unbanned, every search would emit them mid-sequence.
  vocab, max_len, batch, bos = 6, 6, 8, 2
  model = MarkovModel(seed=15, vocab=vocab, max_len=max_len, scale=1.0)
  model.table[:, :, PAD] = 20.0
  model.table[:, :, bos] = 10.0
  seqs = _search(method, model, batch, max_len, bos)
  _check_eos_padding(seqs)  # PAD only after EOS
  assert not (seqs == bos).any(), seqs
  assert (seqs > bos).any()  # ordinary tokens were generated: the check is not vacuous

  with_bos = _search(method, model, batch, max_len, bos, allow_bos=True)
  _check_eos_padding(with_bos)  # allow_bos never lets PAD through
  assert (with_bos == bos).any(), with_bos


def test_eos_is_never_banned_when_it_shares_the_bos_id():
  # Some LMs use one id for BOS and EOS: the ban on BOS must not stop rows from ending.
  model = MarkovModel(seed=16, vocab=5, max_len=6)
  model.table[1, :, EOS] = 30.0
  out = decoding.greedy_search(model, model.init_cache(3), batch_size=3, max_decode_len=6,
                               bos_id=EOS, eos_id=EOS, pad_id=PAD)
  assert np.all(np.asarray(out)[:, 1] == EOS)


def test_beam_score_equals_teacher_forced_score_of_a_tiny_transformer():
  # The output bias makes PAD the most likely token. Were it generated, the cached
  # decoder would attend to it while the full forward pass masks it (and the scores
  # would differ); banned, the beam scores are the model's own scores of the returned
  # tokens. Ids as in data.tokenizer: PAD 0, EOS 1, BOS 3.
  from flaxformer_mini.config import TransformerConfig
  from flaxformer_mini.models import STATIC_CACHE_KEYS, Transformer, seq2seq_decoding_fns
  pad, eos, bos, vocab = 0, 1, 3, 10
  batch, beam, max_len, alpha = 3, 3, 6, 0.6
  cfg = TransformerConfig(vocab_size=vocab, d_model=16, num_heads=2, d_ff=32,
                          num_encoder_layers=1, num_decoder_layers=2, max_len=8,
                          dropout_rate=0.0, tie_output=False)
  model = Transformer(cfg)
  src = jnp.array([[4, 5, 6, 7, 8], [9, 8, 7, 0, 0], [5, 5, 4, 6, 0]], jnp.int32)
  params = model.init(jax.random.PRNGKey(1), src, src[:, :max_len])["params"]
  bias = params["decoder"]["logits"]["bias"]
  params["decoder"]["logits"]["bias"] = bias.at[pad].add(4.0).at[bos].add(2.0)

  t2l, cache = seq2seq_decoding_fns(model, params, src, max_len)
  first_logits, _ = t2l(jnp.full((batch, 1), bos, jnp.int32), cache)
  assert (np.argmax(first_logits, -1) == pad).all()  # the model does want PAD
  seqs, scores = decoding.beam_search(
      t2l, cache, batch_size=batch, beam_size=beam, max_decode_len=max_len, bos_id=bos,
      eos_id=eos, pad_id=pad, alpha=alpha, num_return=beam,
      static_cache_keys=STATIC_CACHE_KEYS)
  flat = np.asarray(seqs).reshape(batch * beam, max_len)
  _check_eos_padding(flat)
  assert not (flat == bos).any()

  # Teacher forcing: one full forward pass over BOS + the returned tokens.
  decoder_inputs = np.concatenate([np.full((batch * beam, 1), bos), flat[:, :-1]], 1)
  logits = model.apply({"params": params}, jnp.repeat(src, beam, axis=0),
                       jnp.asarray(decoder_inputs, jnp.int32))
  logprobs = np.take_along_axis(_log_softmax(logits), flat[..., None], -1)[..., 0]
  is_eos = flat == eos
  scored = (np.cumsum(is_eos, 1) - is_eos) == 0  # up to and including the first EOS
  expected = (np.where(scored, logprobs, 0.0).sum(1)
              / _penalty(scored.sum(1), alpha))
  np.testing.assert_allclose(np.asarray(scores).reshape(-1), expected, rtol=1e-5, atol=1e-4)
