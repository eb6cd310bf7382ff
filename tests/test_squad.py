"""Tests of flaxformer_mini.data.squad (reading, storage, windows, post-processing) and
flaxformer_mini.metrics_squad (the official SQuAD v1.1 EM/F1).

References: hand-written JSON and messages, Hugging Face's BertTokenizerFast windows
(return_overflowing_tokens), a transcription of BERT's run_squad.py max-context loop,
a brute-force search over every valid span, and EM/F1 values worked out by hand from
the definitions in evaluate-v1.1.py.
"""

import contextlib
import dataclasses
import gzip
import itertools
import json
import os
import re

import numpy as np
import pytest

from flaxformer_mini import metrics_squad
from flaxformer_mini.data import records, squad
from flaxformer_mini.variants import bert

# Context words are chosen so that every answer starts and ends on a WordPiece token
# boundary (a label maps back to the exact answer text); 'café' and 'naïve' check that
# offsets count characters, not bytes.
CONTEXT = ('The café opened in 1998 on a narrow street near the river. Its first owner was '
           'a naïve but generous baker named Ada Lind, who sold bread and cheap coffee to '
           'students. In 2004 the café moved to a larger building beside the old railway '
           'station, where it still serves breakfast every morning except Sunday.')
QUESTIONS = [('Who was the first owner?', 'a naïve but generous baker named Ada Lind'),
             ('When did the café move?', 'In 2004'),
             ('Where is the café now?', 'a larger building beside the old railway station'),
             ('When is no breakfast served?', 'Sunday')]


def squad_json(questions=QUESTIONS, context=CONTEXT):
  qas = [{'id': f'q{i}', 'question': q,
          'answers': [{'text': a, 'answer_start': context.index(a)}]}
         for i, (q, a) in enumerate(questions)]
  return {'version': '1.1', 'data': [{'title': 'cafe', 'paragraphs': [
      {'context': context, 'qas': qas}]}]}


def write(tmp_path, name, obj, gz=False):
  path = tmp_path / name
  blob = (obj if isinstance(obj, str) else json.dumps(obj)).encode('utf-8')
  path.write_bytes(gzip.compress(blob) if gz else blob)
  return str(path)


def read(path, on_error='stop'):
  errors = records.RowErrors(on_error, 'test split')
  return squad.read_squad(path, errors), errors


@pytest.fixture(scope='module')
def tokenizer():
  from tokenizers import Tokenizer
  return Tokenizer.from_file(os.path.join(bert.minilm_dir(), 'tokenizer.json'))


@pytest.fixture(scope='module')
def examples(tmp_path_factory):
  path = write(tmp_path_factory.mktemp('squad'), 'cafe.json.gz', squad_json(), gz=True)
  return read(path)[0]


# ------------------------------------------------------------------------------ reading


def test_read_squad_reads_every_field(tmp_path):
  path = write(tmp_path, 'cafe.json.gz', squad_json(), gz=True)
  got, errors = read(path)
  assert [ex.qid for ex in got] == ['q0', 'q1', 'q2', 'q3']
  assert got[1].question == 'When did the café move?' and got[1].answers == ('In 2004',)
  assert got[1].answer_starts == (CONTEXT.index('In 2004'),) and got[1].title == 'cafe'
  assert got[1].where == 'data[0].paragraphs[0].qas[1] (id q1)' and got[1].context == CONTEXT
  assert errors.good == 4 and errors.count == 0


def _bad(qa, context=CONTEXT):
  good = squad_json()['data'][0]['paragraphs'][0]
  return {'data': [{'title': 't', 'paragraphs': [good, {'context': context, 'qas': [qa]}]}]}


START = CONTEXT.index('In 2004')
BAD_QUESTIONS = [
    (_bad({'id': 'b', 'question': 'x?', 'answers': [{'text': 'In', 'answer_start': 0}]},
          context='  '), 'empty context'),
    (_bad({'id': 'b', 'question': ' ', 'answers': [{'text': 'In', 'answer_start': START}]}),
     'empty question'),
    (_bad({'id': 'b', 'question': 'x?', 'answers': []}), 'no answers'),
    (_bad({'id': 'b', 'question': 'x?', 'answers': [{'text': 'In 2004',
                                                       'answer_start': START + 1}]}),
     f'answer span not in its context: answers[0] answer_start={START + 1} does not point at '
     f"its text 'In 2004' (the text occurs at {START})"),
    (_bad({'id': 'b', 'question': 'x?', 'answers': [{'text': 'In 2005', 'answer_start': 3}]}),
     "answers[0] answer_start=3 does not point at its text 'In 2005' (the text is not in it)"),
    (_bad({'id': 'b', 'question': 'x?', 'answers': [{'text': 'In 2004', 'answer_start': '9'}]}),
     "answers[0]: answer_start must be an integer >= 0, got '9'"),
    (_bad({'id': 'b', 'question': 'x?', 'answers': [{'answer_start': 3}]}),
     'answers[0] has no "text"'),
    (_bad({'id': 'q1', 'question': 'x?', 'answers': [{'text': 'In', 'answer_start': START}]}),
     "id 'q1' repeats an earlier question's id"),
]


@pytest.mark.parametrize('doc,why', BAD_QUESTIONS)
def test_bad_question_stops_naming_json_path_and_id(tmp_path, doc, why):
  path = write(tmp_path, 'bad.json', doc)
  with pytest.raises(records.BadRowError) as e:
    read(path, 'stop')
  qid = 'q1' if 'repeats' in why else 'b'
  assert f'{path} data[0].paragraphs[1].qas[0] (id {qid}): ' in str(e.value)
  assert why in str(e.value)


@pytest.mark.parametrize('doc,why', BAD_QUESTIONS)
def test_bad_question_skipped_keeps_the_good_ones(tmp_path, doc, why):
  path = write(tmp_path, 'bad.json', doc)
  got, errors = read(path, 'skip')
  assert [ex.qid for ex in got] == ['q0', 'q1', 'q2', 'q3']
  assert errors.count == 1 and errors.good == 4 and why in errors.first[0]


def test_question_without_id_is_bad(tmp_path):
  doc = _bad({'question': 'x?', 'answers': [{'text': 'In', 'answer_start': START}]})
  with pytest.raises(records.BadRowError, match=r'json data\[0\]\.paragraphs\[1\]\.qas\[0\]: '
                     r'no "id"'):
    read(write(tmp_path, 'bad.json', doc))


def test_every_question_bad_is_an_error(tmp_path):
  doc = {'data': [{'paragraphs': [{'context': CONTEXT, 'qas': [{'id': 'a', 'question': ''}]}]}]}
  got, errors = read(write(tmp_path, 'bad.json', doc), 'skip')
  assert got == []
  with pytest.raises(records.BadRowError, match='no usable rows'):
    errors.finish()


@pytest.mark.parametrize('doc,where', [
    ([{'paragraphs': []}], 'the top level has no list "data"'),
    ({'data': [{'title': 'x'}]}, 'data[0] has no list "paragraphs"'),
    ({'data': [{'paragraphs': [{'context': 'c', 'qas': {'id': 'a'}}]}]},
     'data[0].paragraphs[0] has no list "qas"'),
])
def test_not_squad_structure_names_the_json_path(tmp_path, doc, where):
  path = write(tmp_path, 'x.json', doc)
  with pytest.raises(ValueError, match=r'expected SQuAD v1\.1 JSON') as e:
    read(path)
  assert str(e.value).startswith(f'{path}: {where} (expected SQuAD v1.1 JSON')


def test_unreadable_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'missing\.json'):
    read(str(tmp_path / 'missing.json'))
  path = str(tmp_path / 'junk.json.gz')
  with open(path, 'wb') as f:
    f.write(b'not gzip at all')
  with pytest.raises(ValueError, match=re.escape(f'{path}: not a readable gzip file')):
    read(path)
  path = str(tmp_path / 'cut.json.gz')
  with open(path, 'wb') as f:
    f.write(gzip.compress(json.dumps(squad_json()).encode())[:-30])
  with pytest.raises(ValueError, match=re.escape(f'{path}: not a readable gzip file')):
    read(path)
  path = write(tmp_path, 'broken.json', '{"data": [\n  {"paragraphs": [}\n]}')
  with pytest.raises(ValueError, match=re.escape(f'{path} line 2 column 19: invalid JSON')):
    read(path)


def test_tfds_storage_round_trip_and_cached_bad_counts(tmp_path):
  train = write(tmp_path, 'train.json.gz', squad_json(), gz=True)
  dev = write(tmp_path, 'dev.json', BAD_QUESTIONS[2][0])
  files = {'train': train, 'validation': dev}
  with pytest.raises(records.BadRowError, match='no answers'):
    squad.prepare_squad_builder(files, str(tmp_path / 'tfds'), 'stop')
  builder = squad.prepare_squad_builder(files, str(tmp_path / 'tfds'), 'skip')
  for split, path in files.items():
    assert squad.squad_examples(builder, split) == read(path, 'skip')[0]
  again = squad.prepare_squad_builder(files, str(tmp_path / 'tfds'), 'skip')
  assert again.data_dir == builder.data_dir
  # The cached build skipped a question: 'stop' refuses it without reading the JSON again.
  with pytest.raises(records.BadRowError, match='prepared earlier with on_bad_row=skip'):
    squad.prepare_squad_builder(files, str(tmp_path / 'tfds'), 'stop')


# ------------------------------------------------------------------- TFDS dataset by name


def tfds_rows(doc):
  """A SQuAD JSON document's questions as TFDS's squad data source gives them (array_record
  decoding: strings as bytes, answers as lists of bytes and numpy int32)."""
  return [{'id': qa['id'].encode(), 'title': article['title'].encode(),
           'context': para['context'].encode(), 'question': qa['question'].encode(),
           'answers': {'text': [a['text'].encode() for a in qa['answers']],
                       'answer_start': [np.int32(a['answer_start']) for a in qa['answers']]}}
          for article in doc['data'] for para in article['paragraphs'] for qa in para['qas']]


class _Source(list):
  """A data source: random access plus the dataset's info."""
  dataset_info = None


@contextlib.contextmanager
def mock_tfds(splits):
  """``tfds.data_source(name, split)`` gives ``splits[split]``, under the named dataset's
  own features (from TFDS's code, offline: no download, no prepared files)."""
  import tensorflow_datasets as tfds

  def as_data_source(builder, split, **kwargs):
    source = _Source(splits[split])
    source.dataset_info = builder.info
    return source
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                              as_data_source_fn=as_data_source):
    yield


def test_tfds_squad_by_name_gives_what_the_json_gives(tmp_path):
  with mock_tfds({'train': tfds_rows(squad_json())}):
    errors = records.RowErrors('stop', 'tfds:squad train')
    got = squad.tfds_examples('squad', 'train', errors)
  want = read(write(tmp_path, 'cafe.json', squad_json()))[0]
  assert got == [dataclasses.replace(ex, where=f'example {i} (id {ex.qid})')
                 for i, ex in enumerate(want)]
  assert errors.good == 4 and errors.count == 0


# The bad questions a TFDS squad row can hold (its answer_start is an int, its text a string).
TFDS_BAD = [(doc, why) for doc, why in BAD_QUESTIONS
            if "'9'" not in why and 'has no "text"' not in why]


@pytest.mark.parametrize('doc,why', TFDS_BAD)
def test_tfds_bad_question_named_by_split_and_index(doc, why):
  with mock_tfds({'validation[:9]': tfds_rows(doc)}):
    with pytest.raises(records.BadRowError) as e:
      squad.tfds_examples('squad', 'validation[:9]', records.RowErrors('stop'))
    errors = records.RowErrors('skip')
    got = squad.tfds_examples('squad', 'validation[:9]', errors)
  qid = 'q1' if 'repeats' in why else 'b'
  assert str(e.value).startswith(f'tfds:squad/validation[:9] example 4 (id {qid}): ')
  assert why in str(e.value)
  assert [ex.qid for ex in got] == ['q0', 'q1', 'q2', 'q3'] and errors.count == 1


def test_tfds_dataset_without_squad_features_is_named():
  with mock_tfds({'train': []}), pytest.raises(
      ValueError, match=r"TFDS dataset 'imdb_reviews' has no feature\(s\) \['id', 'question', "
      r"'context', 'answers'\]; a SQuAD-style dataset .* it has \['label', 'text'\]"):
    squad.tfds_examples('imdb_reviews', 'train', records.RowErrors())


# ---------------------------------------------------------------------------- featurize


WINDOWS = squad.WindowConfig(max_seq_len=32, doc_stride=7, max_query_len=12)


def test_window_starts_cover_every_token():
  for n in range(1, 40):
    for window in range(1, 12):
      for stride in range(1, window + 1):
        spans = squad.window_starts(n, window, stride)
        covered = np.zeros(n, int)
        for s, length in spans:
          assert 1 <= length <= window
          covered[s:s + length] += 1
        assert covered.min() >= 1 and spans[0][0] == 0
        assert sum(spans[-1]) == n and all(sum(sp) < n for sp in spans[:-1])
        assert [b[0] - a[0] for a, b in itertools.pairwise(spans)] == [stride] * (len(spans) - 1)


def _bert_is_max_context(doc_spans, cur_span_index, position):
  """run_squad.py's _check_is_max_context, transcribed."""
  best_score, best_span_index = None, None
  for span_index, (start, length) in enumerate(doc_spans):
    end = start + length - 1
    if position < start or position > end:
      continue
    score = min(position - start, end - position) + 0.01 * length
    if best_score is None or score > best_score:
      best_score, best_span_index = score, span_index
  return cur_span_index == best_span_index


def test_max_context_matches_bert_on_a_grid_with_ties():
  for n in range(1, 30):
    for window in range(1, 10):
      for stride in range(1, window + 1):
        spans = squad.window_starts(n, window, stride)
        best = squad._max_context_windows(n, spans)
        for pos in range(n):
          want = [w for w in range(len(spans)) if _bert_is_max_context(spans, w, pos)]
          assert [best[pos]] == want, (n, window, stride, pos)


def test_featurize_windows_labels_and_max_context(examples, tokenizer):
  f = squad.featurize(examples, tokenizer, WINDOWS)
  plain = squad.plain_tokenizer(tokenizer)
  ctx = plain.encode(CONTEXT, add_special_tokens=False)
  for e, ex in enumerate(examples):
    rows = np.flatnonzero(f['example_index'] == e)
    q_len = len(plain.encode(ex.question, add_special_tokens=False).ids)
    first = q_len + 2
    spans = squad.window_starts(len(ctx.ids), WINDOWS.max_seq_len - first - 1,
                                WINDOWS.doc_stride)
    assert len(rows) == len(spans) > 2
    a0 = ex.answer_starts[0]
    t0, t1 = ctx.char_to_token(a0), ctx.char_to_token(a0 + len(ex.answers[0]) - 1)
    labelled = crossing = 0
    for w, r in enumerate(rows):
      ws, length = spans[w]
      assert f['window_start'][r] == ws
      assert f['input_ids'][r, first:first + length].tolist() == ctx.ids[ws:ws + length]
      for p in range(first, first + length):
        assert f['max_context'][r, p] == _bert_is_max_context(spans, w, ws + p - first)
      assert not f['max_context'][r, :first].any()
      start, end = f['start_positions'][r], f['end_positions'][r]
      if ws <= t0 and t1 < ws + length:
        labelled += 1
        assert (start, end) == (t0 - ws + first, t1 - ws + first)
        text = CONTEXT[f['offsets'][r, start, 0]:f['offsets'][r, end, 1]]
        assert text == ex.answers[0]
      else:
        assert (start, end) == (0, 0)
        crossing += ws <= t1 and t0 < ws + length  # part of the answer only
    assert labelled >= 1
    if e == 2:  # the 9-token answer: some windows hold only part of it
      assert crossing >= 1


def test_featurize_matches_hugging_face_windows(examples, tokenizer):
  from transformers import BertTokenizerFast
  hf = BertTokenizerFast(tokenizer_file=os.path.join(bert.minilm_dir(), 'tokenizer.json'))
  f = squad.featurize(examples, tokenizer, WINDOWS)
  for e, ex in enumerate(examples):
    rows = np.flatnonzero(f['example_index'] == e)
    q_len = len(hf(ex.question, add_special_tokens=False)['input_ids'])
    window = WINDOWS.max_seq_len - q_len - 3
    enc = hf(ex.question, ex.context, truncation='only_second',
             max_length=WINDOWS.max_seq_len, stride=window - WINDOWS.doc_stride,
             return_overflowing_tokens=True, return_offsets_mapping=True,
             padding='max_length')
    assert len(enc['input_ids']) == len(rows)
    for w, r in enumerate(rows):
      for key in ('input_ids', 'token_type_ids', 'attention_mask'):
        assert f[key][r].tolist() == enc[key][w], (key, e, w)
      seq = enc.sequence_ids(w)
      want = [off if s == 1 else (-1, -1) for off, s in zip(enc['offset_mapping'][w], seq)]
      assert [tuple(o) for o in f['offsets'][r].tolist()] == want


def test_sample_windows_keeps_answers_and_k_negatives(examples, tokenizer):
  f = squad.featurize(examples, tokenizer, WINDOWS)
  keep = squad.sample_windows(f, 2, seed=0)
  assert (keep == squad.sample_windows(f, 2, seed=0)).all()
  positive = f['start_positions'] > 0
  assert set(np.flatnonzero(positive)) <= set(keep)
  for e in range(len(examples)):
    mine = keep[f['example_index'][keep] == e]
    assert (~positive[mine]).sum() == min(2, (~positive[f['example_index'] == e]).sum())
  assert len(squad.sample_windows(f, -1, seed=0)) == len(positive)


def test_window_config_errors_name_the_keys():
  with pytest.raises(ValueError, match=r'data\.doc_stride=30 is longer than a window'):
    squad.WindowConfig(max_seq_len=32, doc_stride=30, max_query_len=12)
  with pytest.raises(ValueError, match=r'data\.max_seq_len=10 leaves no room'):
    squad.WindowConfig(max_seq_len=10, doc_stride=1, max_query_len=8)


# ------------------------------------------------------------------------ post-processing


def _brute_force(start_logits, end_logits, f, e, max_answer_len):
  """The best valid (score, window, start, end) of example e, every pair tried."""
  best = None
  for w in np.flatnonzero(f['example_index'] == e):
    ctx = np.flatnonzero(f['offsets'][w, :, 0] >= 0)
    for s in ctx:
      if not f['max_context'][w, s]:
        continue
      for t in ctx:
        if s <= t < s + max_answer_len:
          score = float(start_logits[w, s]) + float(end_logits[w, t])
          if best is None or score > best[0]:
            best = (score, int(w), int(s), int(t))
  return best


def test_best_spans_equals_brute_force_on_random_logits(examples, tokenizer, rng):
  f = squad.featurize(examples, tokenizer, WINDOWS)
  for max_answer_len in (1, 3, 50):
    start, end = rng.normal(size=(2, *f['input_ids'].shape))
    spans = squad.best_spans(start, end, f, len(examples), n_best=WINDOWS.max_seq_len,
                             max_answer_len=max_answer_len)
    for e, span in enumerate(spans):
      score, w, s, t = _brute_force(start, end, f, e, max_answer_len)
      assert (span.window, span.start, span.end) == (w, s, t)
      assert span.score == pytest.approx(score, abs=1e-12)
      assert (span.start_char, span.end_char) == (f['offsets'][w, s, 0], f['offsets'][w, t, 1])


def test_best_spans_picks_the_planted_span(examples, tokenizer, rng):
  f = squad.featurize(examples, tokenizer, WINDOWS)
  e = 2
  rows = np.flatnonzero(f['example_index'] == e)
  start, end = rng.uniform(-1, 0, size=(2, *f['input_ids'].shape))
  # A start on [CLS] or a question token would win (50 + end) if allowed.
  first = int(np.argmax(f['token_type_ids'][rows[0]]))
  start[:, :first] = 50.0
  w = rows[len(rows) // 2]
  ctx = np.flatnonzero(f['max_context'][w])
  s, t = int(ctx[1]), int(ctx[1]) + 3
  start[w, s], end[w, t] = 10.0, 10.0
  # A start outside its max-context window would win (30 + end) if allowed.
  other = rows[0]
  not_max = np.flatnonzero((f['offsets'][other, :, 0] >= 0) & ~f['max_context'][other])
  start[other, not_max[0]] = 30.0
  # A pair 7 tokens long would win (24) with max_answer_len >= 7.
  w2 = rows[-2]
  p = next(int(p) for p in np.flatnonzero(f['max_context'][w2])
           if f['offsets'][w2, p + 6, 0] >= 0)
  start[w2, p], end[w2, p + 6] = 12.0, 12.0
  assert squad.best_spans(start, end, f, len(examples), n_best=5, max_answer_len=7)[e].score \
      == pytest.approx(24.0)
  span = squad.best_spans(start, end, f, len(examples), n_best=5, max_answer_len=6)[e]
  assert (span.window, span.start, span.end) == (w, s, t)
  assert span.score == pytest.approx(20.0)
  want = CONTEXT[f['offsets'][w, s, 0]:f['offsets'][w, t, 1]]
  assert CONTEXT[span.start_char:span.end_char] == want


def test_best_spans_checks_shapes(examples, tokenizer):
  f = squad.featurize(examples, tokenizer, WINDOWS)
  with pytest.raises(ValueError, match='expected start/end logits'):
    squad.best_spans(np.zeros((1, 32)), np.zeros((1, 32)), f, len(examples))


# ---------------------------------------------------------------------------- EM / F1


def test_normalize_answer_as_the_official_script():
  assert metrics_squad.normalize_answer('The  Quick, brown FOX!') == 'quick brown fox'
  assert metrics_squad.normalize_answer('an apple a day, theater') == 'apple day theater'
  assert metrics_squad.normalize_answer('U.S.A. (1998)\n') == 'usa 1998'
  assert metrics_squad.normalize_answer('the-end') == 'theend'  # '-' removed before articles


def test_f1_and_exact_match_hand_computed():
  # pred 'cat sat on mat' (4 tokens), gold 'cat on mat' (3), 3 shared: P 3/4, R 1.
  assert metrics_squad.f1_score('The cat sat on the mat.', 'cat on mat') == pytest.approx(
      2 * 0.75 / 1.75)
  # Multisets: 'x x y' vs 'x y y' share one x and one y: P = R = 2/3.
  assert metrics_squad.f1_score('x x y', 'x y y') == pytest.approx(2 / 3)
  assert metrics_squad.f1_score('dog', 'cat') == 0.0
  assert metrics_squad.f1_score('the', 'a') == 0.0          # both normalise to nothing
  assert metrics_squad.exact_match_score('the', 'a') == 1.0
  assert metrics_squad.exact_match_score('Ada Lind!', 'ada  lind') == 1.0


def test_squad_v1_max_over_golds_and_missing_predictions():
  gold = {'q1': ['Ada Lind', 'a baker named Ada Lind'], 'q2': ['in 2004'], 'q3': ['Sunday']}
  preds = {'q1': 'baker Ada Lind', 'q2': 'In 2004.'}   # q3 missing: scores 0
  # q1 'baker ada lind': vs 'ada lind' P 2/3, R 1 -> 0.8; vs 'baker named ada lind'
  # P 1, R 3/4 -> 6/7 (the max); EM 0. q2: EM 1, F1 1.
  got = metrics_squad.squad_v1(preds, gold)
  assert got['exact_match'] == pytest.approx(100 * 1 / 3)
  assert got['f1'] == pytest.approx(100 * (6 / 7 + 1) / 3)
  preds['q1'] = 'Lind'  # F1 vs 'Ada Lind': P 1, R 1/2 -> 2/3; vs the other: R 1/4 -> 0.4
  assert metrics_squad.squad_v1(preds, gold)['f1'] == pytest.approx(100 * (2 / 3 + 1) / 3)
  with pytest.raises(ValueError, match="question 'q' has no gold answer"):
    metrics_squad.squad_v1({}, {'q': []})
