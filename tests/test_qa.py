"""Tests of flaxformer_mini.tasks.qa, bert.BertForQuestionAnswering and configs/qa_faq.py.

* Baselines: sentences split by hand, TF-IDF cosine against scikit-learn's TfidfVectorizer.
* The span loss against a NumPy float64 cross-entropy.
* The task on tiny SQuAD files: bad questions (stop / skip), the kept windows, batches.
* BertForQuestionAnswering with the MiniLM weights against Hugging Face's
  BertForQuestionAnswering and against `bert.BertModel` + the dense head (slow).
* One tiny end-to-end train.py run (in-process, module-scoped; slow): a from-scratch BERT
  learns where a planted 'secret code' is, writes EM/F1 to metrics.jsonl and
  dev_predictions.json, and `QuestionAnswerer.from_workdir` reproduces the predictions.
"""

import dataclasses
import json
import os
import random
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_mini.data import records, squad
from flaxformer_mini.tasks import qa
from flaxformer_mini.variants import bert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402
from configs import qa_faq  # noqa: E402

WORDS = ['apple', 'river', 'stone', 'cloud', 'table', 'window', 'garden', 'paper', 'music',
         'light', 'forest', 'summer', 'yellow', 'bridge', 'market', 'silver', 'horse',
         'candle', 'winter', 'ocean']
SPECIALS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']


def _squad(n, seed):
  """n contexts of filler words around 'The secret code is <w> <w>.', asked for the code."""
  r = random.Random(seed)
  paras = []
  for i in range(n):
    filler = lambda: ' '.join(r.choice(WORDS) for _ in range(r.randint(5, 30)))
    code = f'{r.choice(WORDS)} {r.choice(WORDS)}'
    context = f'{filler()}. The secret code is {code}. {filler()}.'
    paras.append({'context': context, 'qas': [{
        'id': f's{seed}-{i}', 'question': 'What is the secret code?',
        'answers': [{'text': code, 'answer_start': context.index(' is ' + code) + 4}]}]})
  return {'version': '1.1', 'data': [{'title': 'codes', 'paragraphs': paras}]}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """train.json / dev.json and a vocab.txt holding every word of them."""
  root = tmp_path_factory.mktemp('qa_data')
  files = {}
  for name, n, seed in (('train', 160, 1), ('dev', 24, 2)):
    files[name] = str(root / f'{name}.json')
    with open(files[name], 'w') as f:
      json.dump(_squad(n, seed), f)
  vocab = root / 'vocab.txt'
  vocab.write_text('\n'.join(SPECIALS + sorted(WORDS) + ['the', 'secret', 'code', 'is',
                                                          'what', '.', '?']) + '\n')
  return {**files, 'vocab': str(vocab), 'root': root}


def _config(data, **overrides):
  """configs/qa_faq.py:scratch made tiny: a 2-layer d=32 BERT, 32-token windows."""
  c = qa_faq.get_config('scratch')
  c.model.encoder.update(vocab_size=40, d_model=32, num_heads=2, d_ff=64,
                         num_encoder_layers=2, max_len=32)
  c.data.update(train_file=data['train'], dev_file=data['dev'], tokenizer=data['vocab'],
                max_seq_len=32, doc_stride=8, max_query_len=8, length_bucket=16,
                eval_batch_size=16)
  c.eval.update(max_answer_len=5, num_samples=2)
  c.update(batch_size=16, num_train_steps=200, log_every=50, checkpoint_every=200)
  c.optimizer.learning_rate = 5e-3
  for key, value in overrides.items():
    node = c
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    node[last] = value
  return c


# ----------------------------------------------------------------------------- baselines


def test_sentence_spans_by_hand():
  text = '  Hello there.  Is it 3.5 now? Yes!\nNo end'
  assert [text[s:e] for s, e in qa.sentence_spans(text)] == [
      'Hello there.', 'Is it 3.5 now?', 'Yes!', 'No end']
  assert qa.sentence_spans('one') == [(0, 3)]


def test_tfidf_similarities_match_scikit_learn():
  from sklearn.feature_extraction.text import TfidfVectorizer
  sentences = ['The cat sat on the mat.', 'Dogs chase cats; cats chase mice.',
               'A mat is a flat piece of fabric.', 'Nothing in common here!', 'x y z']
  for question in ('Where did the cat sit on a mat?', 'Which animals chase cats?', 'zebra'):
    vec = TfidfVectorizer().fit(sentences)
    x, q = vec.transform(sentences).toarray(), vec.transform([question]).toarray()[0]
    np.testing.assert_allclose(qa.tfidf_similarities(question, sentences), x @ q,
                               rtol=0, atol=1e-12)


def test_baseline_answers_by_hand():
  context = ('Bread is baked daily. The oven runs on gas. Prices rise in winter. '
             'Coffee is cheap. Tea is free.')
  got = qa.baseline_answers('Why do prices rise?', context, passage_words=6)
  assert got == {'first_sentence': 'Bread is baked daily.',
                 'tfidf_sentence': 'Prices rise in winter.',
                 'tfidf_passage': 'Prices rise in winter. Coffee is cheap.'}
  examples = [squad.SquadExample('a', 'Why do prices rise?', context, ('Prices rise',), (44,))]
  m = qa.baseline_metrics(examples, passage_words=6)
  # 'prices rise in winter' vs 'prices rise': P 2/4, R 1 -> F1 2/3.
  assert m['baseline_tfidf_sentence_f1'] == pytest.approx(100 * 2 / 3)
  assert m['baseline_first_sentence_f1'] == 0.0 and m['baseline_tfidf_passage_exact_match'] == 0


# ---------------------------------------------------------------------------------- loss


def _ce(logits, mask, target):
  """-log softmax(logits)[target] over the unmasked positions, float64."""
  x = logits.astype(np.float64)[mask > 0]
  return np.log(np.exp(x).sum()) - float(logits[target])


def test_span_loss_matches_numpy(rng):
  b, l = 5, 7
  start, end = rng.normal(size=(2, b, l)).astype(np.float32)
  mask = (np.arange(l)[None] < np.array([7, 5, 3, 7, 6])[:, None]).astype(np.int32)
  batch = {'start_positions': np.array([0, 3, 1, 6, 2]),
           'end_positions': np.array([2, 4, 2, 6, 0]),
           'attention_mask': mask, 'weight': np.array([1, 1, 1, 1, 0], np.float32)}
  got = qa.span_loss_sums(jnp.asarray(start), jnp.asarray(end), batch)
  want = sum(w * (_ce(start[i], mask[i], s) + _ce(end[i], mask[i], e)) / 2
             for i, (s, e, w) in enumerate(zip(batch['start_positions'],
                                               batch['end_positions'], batch['weight'])))
  assert float(got['loss']) == pytest.approx(want, rel=1e-5)
  hits = [np.argmax(np.where(mask[i] > 0, start[i], -np.inf)) == batch['start_positions'][i]
          for i in range(4)]
  assert float(got['start_accuracy']) == sum(hits) and float(got['weight']) == 4


# ---------------------------------------------------------------------------------- task


def test_task_keeps_answer_windows_and_k_negatives(data, tmp_path):
  task = qa.QATask(_config(data, **{'data.train_negatives': 2}), str(tmp_path / 'run'))
  train_examples = squad.read_squad(data['train'], records.RowErrors())
  full = squad.featurize(train_examples, task.tokenizer.hf, task.windows)
  positive = full['start_positions'] > 0
  negatives = np.bincount(full['example_index'][~positive], minlength=len(train_examples))
  assert positive.any() and negatives.max() > 2
  kept = task.train_features
  assert (kept['start_positions'] > 0).sum() == positive.sum()
  assert len(kept['input_ids']) == positive.sum() + np.minimum(negatives, 2).sum()
  batches = list(task.eval_batches())
  assert sum(b['weight'].sum() for b in batches) == len(task.dev_loss_features['input_ids'])
  assert all(b['input_ids'].shape == (16, 32) for b in batches)  # 32 is the bucket multiple
  batch = next(task.train_iterator())
  assert batch['input_ids'].shape == (16, 32) and batch['weight'].sum() == 16
  assert {'model.json', 'tokenizer.json'} <= set(os.listdir(tmp_path / 'run'))


def test_task_bad_questions_stop_or_skip(data, tmp_path):
  doc = _squad(4, 3)
  doc['data'][0]['paragraphs'][2]['qas'][0]['answers'][0]['answer_start'] += 1
  dev = str(tmp_path / 'dev_bad.json')
  with open(dev, 'w') as f:
    json.dump(doc, f)
  with pytest.raises(records.BadRowError,
                     match=r'dev_bad\.json data\[0\]\.paragraphs\[2\]\.qas\[0\] \(id s3-2\)'
                           r': answer span not in its context'):
    qa.QATask(_config(data, **{'data.dev_file': dev}), str(tmp_path / 'a'))
  task = qa.QATask(_config(data, **{'data.dev_file': dev, 'data.on_bad_row': 'skip'}),
                   str(tmp_path / 'b'))
  assert [ex.qid for ex in task.dev_examples] == ['s3-0', 's3-1', 's3-3']


def test_task_config_errors_name_the_key(data, tmp_path):
  with pytest.raises(ValueError, match=r"config\.data\.max_seq_len=64 exceeds the model's "
                     r'position table \(32'):
    qa.QATask(_config(data, **{'data.max_seq_len': 64}), str(tmp_path / 'a'))
  with pytest.raises(ValueError, match=r'config\.data\.doc_stride=30 is longer than a window'):
    qa.QATask(_config(data, **{'data.doc_stride': 30}), str(tmp_path / 'b'))


def _tfds_rows(doc):
  """A SQuAD JSON document as TFDS's squad data source gives it (bytes, answer lists)."""
  return [{'id': qa['id'].encode(), 'title': b'', 'context': para['context'].encode(),
           'question': qa['question'].encode(),
           'answers': {'text': [a['text'].encode() for a in qa['answers']],
                       'answer_start': [np.int32(a['answer_start']) for a in qa['answers']]}}
          for article in doc['data'] for para in article['paragraphs'] for qa in para['qas']]


def test_task_reads_a_tfds_dataset_by_name(data, tmp_path):
  import tensorflow_datasets as tfds
  dev = _squad(24, 2)
  dev['data'][0]['paragraphs'][5]['qas'][0]['question'] = ' '
  splits = {'train[:150]': _tfds_rows(_squad(160, 1))[:150], 'validation': _tfds_rows(dev)}
  data_dirs = []

  def as_data_source(builder, split, **kwargs):
    data_dirs.append(builder.data_dir)
    return type('Source', (list,), {'dataset_info': builder.info})(splits[split])
  config = _config(data, **{'data.tfds_name': 'squad', 'data.train_split': 'train[:150]',
                            'data.train_file': '', 'data.dev_file': ''})
  # TFDS squad's own features (from its code, offline), rows as its data source gives them.
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                              as_data_source_fn=as_data_source):
    with pytest.raises(records.BadRowError, match=r'^tfds:squad/validation example 5 \(id '
                       r's2-5\): empty question \(tfds:squad validation;'):
      qa.QATask(config, str(tmp_path / 'stop'))
    config.data.on_bad_row = 'skip'
    task = qa.QATask(config, str(tmp_path / 'skip'))
  want = [ex for ex in squad.read_squad(data['dev'], records.RowErrors()) if ex.qid != 's2-5']
  assert [(ex.qid, ex.question, ex.context, ex.answers, ex.answer_starts)
          for ex in task.dev_examples] == [(ex.qid, ex.question, ex.context, ex.answers,
                                            ex.answer_starts) for ex in want]
  assert task.dev_examples[5].where == 'example 6 (id s2-6)'
  assert len(set(task.train_features['example_index'])) == 150
  # TFDS's own data dir (tfds_dir is ''), not <workdir>/tfds.
  assert not any(str(tmp_path) in d for d in data_dirs) and data_dirs
  assert not (tmp_path / 'skip' / 'tfds').exists()


def test_workdir_refuses_another_tokenizer_once_trained(data, tmp_path):
  from flaxformer_mini import checkpoints
  workdir = tmp_path / 'run'
  vocab2 = tmp_path / 'vocab2.txt'
  vocab2.write_text(Path(data['vocab']).read_text() + 'extra\n')
  qa.QATask(_config(data), str(workdir))
  # No checkpoint yet: the tokenizer the config names replaces the saved one.
  task = qa.QATask(_config(data, **{'data.tokenizer': str(vocab2)}), str(workdir))
  assert task.tokenizer.vocab_size == 33 and task.tokenizer.hf.token_to_id('extra') == 32
  saved = (workdir / 'tokenizer.json').read_text()
  (workdir / checkpoints.CHECKPOINT_SUBDIR / '10').mkdir(parents=True)
  with pytest.raises(ValueError, match=r'tokenizer\.json is not config\.data\.tokenizer=.*'
                     r'vocab\.txt.*trained with the former\); use a fresh --workdir'):
    qa.QATask(_config(data), str(workdir))
  assert (workdir / 'tokenizer.json').read_text() == saved  # untouched by the refusal
  assert qa.QATask(_config(data, **{'data.tokenizer': str(vocab2)}), str(workdir))


# ------------------------------------------------------------------------- MiniLM model


@pytest.mark.slow
def test_pretrained_encoder_drops_the_pooler_and_names_what_differs():
  cfg, init_dir = bert.config_from_init('minilm', {'dropout_rate': 0.0, 'd_model': 8},
                                        pooler=False)
  assert init_dir == bert.minilm_dir() and not cfg.pooler
  # The checkpoint's sizes, the config's dropout rate.
  assert (cfg.encoder.d_model, cfg.encoder.dropout_rate) == (384, 0.0)
  ids = jnp.ones((1, 8), jnp.int32)
  like = jax.eval_shape(bert.BertModel(cfg).init, jax.random.key(0), ids)['params']
  got = bert.pretrained_encoder(init_dir, like)
  _, want = bert.load_hf_bert(init_dir)
  assert 'pooler' in want and 'pooler' not in got
  want.pop('pooler')
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  fewer = bert.BertConfig(dataclasses.replace(cfg.encoder, num_encoder_layers=5), pooler=False)
  like = jax.eval_shape(bert.BertModel(fewer).init, jax.random.key(0), ids)['params']
  with pytest.raises(ValueError, match=r"does not fit the model: \[\(\"\['layer_5'\]"):
    bert.pretrained_encoder(init_dir, like)
  with pytest.raises(FileNotFoundError, match=r"config\.model\.init_from='/no/such': not a "
                     r'directory'):
    bert.config_from_init('/no/such', {})


@pytest.mark.slow
def test_qa_model_with_minilm_matches_hf_and_bert_model():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  path = bert.minilm_dir()
  c = qa_faq.get_config()
  cfg, init_dir = qa.model_config(c.model)
  assert init_dir == path and not cfg.pooler
  model = bert.BertForQuestionAnswering(cfg)
  ids = jnp.ones((1, 8), jnp.int32)
  params = qa.pretrained_params(path, model.init(jax.random.key(0), ids, ids, ids)['params'])
  tok = transformers.BertTokenizerFast.from_pretrained(path)
  enc = tok(['Who baked the bread?', 'When?'],
            ['Ada baked the bread at dawn, as every day.', 'At dawn.'], padding=True,
            return_tensors='np')
  args = [jnp.asarray(enc[k]) for k in ('input_ids', 'attention_mask', 'token_type_ids')]
  start, end = model.apply({'params': params}, *args)
  # The encoder under 'bert' is bert.BertModel with the MiniLM weights.
  hf_cfg, plain = bert.load_hf_bert(path)
  hidden, _ = bert.BertModel(hf_cfg).apply({'params': plain}, *args)
  head = np.asarray(hidden, np.float64) @ np.asarray(params['qa_outputs']['kernel'], np.float64)
  head += np.asarray(params['qa_outputs']['bias'], np.float64)
  np.testing.assert_allclose(start, head[..., 0], atol=1e-5)
  np.testing.assert_allclose(end, head[..., 1], atol=1e-5)
  ref = transformers.BertForQuestionAnswering.from_pretrained(path).eval()
  with torch.no_grad():
    ref.qa_outputs.weight.copy_(torch.tensor(np.asarray(params['qa_outputs']['kernel']).T))
    ref.qa_outputs.bias.copy_(torch.tensor(np.asarray(params['qa_outputs']['bias'])))
    out = ref(**{k: torch.tensor(v) for k, v in enc.items()})
  real = enc['attention_mask'] > 0  # HF computes pad positions too; they are never read
  np.testing.assert_allclose(np.asarray(start)[real], out.start_logits.numpy()[real], atol=1e-4)
  np.testing.assert_allclose(np.asarray(end)[real], out.end_logits.numpy()[real], atol=1e-4)


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope='module')
def run(data):
  workdir = str(data['root'] / 'run')
  final = train.train_and_evaluate(_config(data), workdir)
  return workdir, final


@pytest.mark.slow
def test_run_learns_the_span_and_writes_its_outputs(run, data):
  workdir, final = run
  for name in ('model.json', 'tokenizer.json', 'dev_predictions.json', 'metrics.jsonl'):
    assert os.path.isfile(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    last = json.loads(f.readlines()[-1])
  for key in ('exact_match', 'f1', 'baseline_first_sentence_f1', 'baseline_tfidf_sentence_f1',
              'baseline_tfidf_passage_f1', 'answer_in_a_window'):
    assert last[f'final/{key}'] == pytest.approx(final[f'dev/{key}'])
  # Two random words after 'The secret code is': learnt, not matched by the baselines.
  assert last['final/exact_match'] >= 40 and last['final/f1'] >= 70
  assert last['final/f1'] > last['final/baseline_tfidf_passage_f1'] + 10
  assert last['final/answer_in_a_window'] == 100
  with open(os.path.join(workdir, 'dev_predictions.json')) as f:
    preds = json.load(f)
  dev = squad.read_squad(data['dev'], records.RowErrors())
  assert sorted(preds) == sorted(ex.qid for ex in dev)
  assert all(preds[ex.qid] in ex.context for ex in dev)


@pytest.mark.slow
def test_question_answerer_from_workdir_reproduces_dev_predictions(run, data):
  workdir, _ = run
  with open(os.path.join(workdir, 'dev_predictions.json')) as f:
    preds = json.load(f)
  answerer = qa.QuestionAnswerer.from_workdir(workdir)
  dev = squad.read_squad(data['dev'], records.RowErrors())
  answers = answerer.answer([ex.question for ex in dev], [ex.context for ex in dev])
  assert [a.text for a in answers] == [preds[ex.qid] for ex in dev]
  for ex, a in zip(dev, answers):
    assert ex.context[a.start_char:a.end_char] == a.text and np.isfinite(a.score)
  with pytest.raises(ValueError, match='2 questions but 1 contexts'):
    answerer.answer(['a?', 'b?'], ['c'])
  with pytest.raises(ValueError, match='context 0 is empty'):
    answerer.answer(['a?'], [' '])


@pytest.mark.slow
def test_predict_cli_answers_jsonl_and_a_context_file(run, data, tmp_path, capsys):
  from flaxformer_mini import predict
  workdir, _ = run
  dev = squad.read_squad(data['dev'], records.RowErrors())[:3]
  src = tmp_path / 'q.jsonl'
  src.write_text('\n'.join(json.dumps({'question': ex.question, 'context': ex.context})
                           for ex in dev) + '\n\n', encoding='utf-8')
  assert predict.main([f'--workdir={workdir}', f'--input={src}', '--json']) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  want = qa.QuestionAnswerer.from_workdir(workdir).answer([ex.question for ex in dev],
                                                           [ex.context for ex in dev])
  assert [r['text'] for r in rows[:3]] == [a.text for a in want] and rows[3] == {}
  assert [r['start_char'] for r in rows[:3]] == [a.start_char for a in want]
  context = tmp_path / 'context.txt'
  context.write_text(dev[0].context, encoding='utf-8')
  assert predict.main([f'--workdir={workdir}', f'--context_file={context}',
                       dev[0].question]) == 0
  assert capsys.readouterr().out.strip() == ' '.join(want[0].text.split())
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"question": "why?"}\n', encoding='utf-8')
  assert predict.main([f'--workdir={workdir}', f'--input={bad}']) == 1
  assert 'line 1: expected an object with non-empty "question" and "context"' in (
      capsys.readouterr().err)
