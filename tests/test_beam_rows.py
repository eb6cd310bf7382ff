"""Step-level beam search (`decoding.beam_rows_*`): a sentence that joins a busy pool
between steps gets exactly what `decoding.beam_search` gives it alone.

The reference is the batch search of one sentence at a time; the pool mixes sentences
of different source lengths, admitted at different steps into reused slots, so every
row is at its own position (per-row cache indices, `models.rows_cache`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_mini import decoding
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.models import (
  STATIC_CACHE_KEYS,
  Transformer,
  rows_cache,
  seq2seq_decoding_fns,
  seq2seq_step_fn,
)

BOS, EOS, PAD = 1, 2, 0
MAX_DECODE, SRC, BEAM, ROWS = 10, 8, 3, 3


def _boosted(t2l):
  """t2l with EOS made likelier the shorter the source, so random-weight hypotheses end
  at different steps (the boost reads the cache's source mask, as both searches hold it)."""
  def step(ids, cache):
    logits, cache = t2l(ids, cache)
    src_len = jnp.sum(cache['decoder']['encoder_valid'], axis=-1)  # [rows], not per beam
    src_len = jnp.repeat(src_len, ids.shape[0] // src_len.shape[0])
    return logits.at[:, EOS].add(0.5 * (SRC - src_len)), cache
  return step


def _model(**overrides):
  cfg = TransformerConfig(vocab_size=40, d_model=32, num_heads=4, d_ff=64,
                          num_encoder_layers=1, num_decoder_layers=2, max_len=16,
                          dropout_rate=0.0, **overrides)
  model = Transformer(cfg)
  ids = jnp.ones((1, 4), jnp.int32)
  return model, model.init(jax.random.PRNGKey(0), ids, ids)['params']


def _sources(n: int) -> list[np.ndarray]:
  rng = np.random.default_rng(0)
  return [rng.integers(3, 40, size=int(rng.integers(2, SRC + 1))) for _ in range(n)]


def _padded(sources, length):
  inputs = np.full((len(sources), length), PAD, np.int32)
  for row, src in enumerate(sources):
    inputs[row, :len(src)] = src
  return jnp.asarray(inputs)


def _alone(model, params, alpha):
  """sources -> [(tokens, score)], each searched alone (a batch of one, padded to SRC)."""
  @jax.jit
  def search(inputs):
    t2l, cache = seq2seq_decoding_fns(model, params, inputs, MAX_DECODE)
    return decoding.beam_search(
        _boosted(t2l), cache, batch_size=1, beam_size=BEAM, max_decode_len=MAX_DECODE,
        bos_id=BOS, eos_id=EOS, pad_id=PAD, alpha=alpha, static_cache_keys=STATIC_CACHE_KEYS)

  def run(sources):
    out = []
    for src in sources:
      seqs, scores = search(_padded([src], SRC))
      out.append((np.asarray(seqs[0, 0]), float(scores[0, 0])))
    return out
  return run


def _pool(model, params, sources, alpha, admit_per_call=2):
  """Runs ``sources`` through a ROWS-slot pool; returns {index: (tokens, score)} and the
  largest number of rows that were ever active at once."""

  @jax.jit
  def start(state, inputs, slots):
    _, cache = seq2seq_decoding_fns(model, params, inputs, MAX_DECODE)
    return decoding.beam_rows_start(state, slots, rows_cache(cache, SRC), bos_id=BOS,
                                    pad_id=PAD, static_cache_keys=STATIC_CACHE_KEYS)

  @functools.partial(jax.jit, static_argnames='max_steps')
  def advance(state, max_steps):
    return decoding.beam_rows_advance(
        _boosted(seq2seq_step_fn(model, params)), state, max_steps, max_decode_len=MAX_DECODE,
        eos_id=EOS, bos_id=BOS, pad_id=PAD, alpha=alpha, static_cache_keys=STATIC_CACHE_KEYS)

  _, template = seq2seq_decoding_fns(model, params, jnp.zeros((ROWS, SRC), jnp.int32),
                                     MAX_DECODE)
  state = decoding.beam_rows_init(rows_cache(template, SRC), rows=ROWS, beam_size=BEAM,
                                  max_decode_len=MAX_DECODE, pad_id=PAD,
                                  static_cache_keys=STATIC_CACHE_KEYS)
  queue, owner, out, most = list(range(len(sources))), {}, {}, 0
  while queue or owner:
    free = [r for r in range(ROWS) if r not in owner][:admit_per_call]
    if queue and free:
      take = queue[:len(free)]
      queue = queue[len(take):]
      length = 4 if max(len(sources[i]) for i in take) <= 4 else SRC  # two source buckets
      for row, i in enumerate(take):
        owner[free[row]] = i
      state = start(state, _padded([sources[i] for i in take], length),
                    jnp.asarray(free[:len(take)], jnp.int32))
    most = max(most, len(owner))
    state, finished = advance(state, 3)  # a few steps, so admissions land mid-search
    for row in np.flatnonzero(np.asarray(finished)):
      out[owner.pop(int(row))] = (np.asarray(state.fin_seqs[row, 0]),
                                  float(state.fin_scores[row, 0]))
  return out, most


@pytest.mark.parametrize('overrides,alpha', [
    ({}, 0.6),
    ({'scan_layers': True}, 0.6),
    ({'position_kind': 'relative'}, 0.0),
])
def test_rows_join_mid_search_and_match_beam_search_alone(overrides, alpha):
  model, params = _model(**overrides)
  sources = _sources(9)
  got, most = _pool(model, params, sources, alpha)
  assert most == ROWS  # the pool was full, so rows shared steps at different positions
  lengths = set()
  for i, (want_tokens, want_score) in enumerate(_alone(model, params, alpha)(sources)):
    np.testing.assert_array_equal(got[i][0], want_tokens, err_msg=f'sentence {i}')
    np.testing.assert_allclose(got[i][1], want_score, rtol=1e-5, err_msg=f'sentence {i}')
    lengths.add(int(np.sum(want_tokens != PAD)))
  assert len(lengths) > 2, lengths  # hypotheses ended at different steps


def test_pool_checks_its_cache():
  model, params = _model()
  _, cache = seq2seq_decoding_fns(model, params, jnp.zeros((2, SRC), jnp.int32), MAX_DECODE)
  with pytest.raises(ValueError, match=r'decode_index.*scalar.*rows_cache'):
    decoding.beam_rows_init(cache, rows=2, beam_size=2, max_decode_len=MAX_DECODE,
                            static_cache_keys=STATIC_CACHE_KEYS)
  with pytest.raises(ValueError, match='has 8 source positions, more than src_len=4'):
    rows_cache(cache, 4)


def test_beam_slots_translate_like_translator_and_refuse_misuse(smoke_run_dir):
  from flaxformer_mini import translate
  translator = translate.Translator.from_workdir(smoke_run_dir, batch_size=2)
  texts = ['Eu gosto de gatos.', 'Bom dia.', 'A casa é muito grande e bonita.', 'Obrigado.']
  want = translator.translate(texts)
  slots = translate.BeamSlots(translator, translate.SearchConfig())  # 2 slots
  queue, got = list(enumerate(translator.encode(texts))), {}
  with pytest.raises(ValueError, match='3 sentences for 2 free slots'):
    slots.start(queue[:3])
  with pytest.raises(ValueError, match='must not be None'):
    slots.start([(None, queue[0][1])])
  while queue or slots.busy:
    take, queue = queue[:slots.free], queue[slots.free:]
    slots.start(take)  # into the slots freed by the last advance, mid-search of the others
    for tag, tokens in slots.advance(2):
      got[tag] = translator.tokenizer.decode(tokens[None])[0]
  assert [got[i] for i in range(len(texts))] == want
  with pytest.raises(ValueError, match="BeamSlots runs beam search, got method='greedy'"):
    translate.BeamSlots(translator, translate.SearchConfig('greedy'))
