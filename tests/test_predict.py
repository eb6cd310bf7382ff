"""flaxformer_mini.predict: the task of a run picks the predictor; translation runs through
it like `Translator`; input and error handling. The classification, QA and summarization
paths are tested beside their tasks' tiny runs (test_classification.py, test_qa.py,
test_summarization.py)."""

import json

import pytest

from flaxformer_mini import predict, translate
from flaxformer_mini.tasks.classification import Prediction
from flaxformer_mini.tasks.qa import Answer

SOURCES = ['O certificado diverge.', 'Eu gosto de gatos.', 'Obrigado.']


@pytest.mark.slow
def test_translation_run_predicts_like_translator(smoke_run_dir, tmp_path, capsys):
  src = tmp_path / 'in.txt'
  src.write_text('\n'.join([SOURCES[0], '', *SOURCES[1:]]) + '\n', encoding='utf-8')
  out = tmp_path / 'out.txt'
  assert predict.main([f'--workdir={smoke_run_dir}', f'--input={src}', f'--output={out}']) == 0
  want = translate.Translator.from_workdir(smoke_run_dir).translate(SOURCES)
  assert out.read_text(encoding='utf-8').split('\n')[:4] == [want[0], '', *want[1:]]
  from flaxformer_mini import checkpoints
  assert checkpoints.run_task(smoke_run_dir) == 'translation'
  assert predict.main([f'--workdir={smoke_run_dir}', '--json', SOURCES[2]]) == 0
  assert json.loads(capsys.readouterr().out) == {'text': want[2]}


@pytest.mark.slow
def test_errors_are_one_line_and_exit_1(smoke_run_dir, tmp_path, capsys):
  assert predict.main([f'--workdir={tmp_path / "nope"}', 'x']) == 1
  assert 'run directory not found' in capsys.readouterr().err
  bad = tmp_path / 'bad.txt'
  bad.write_bytes(b'ok\n\xff\xfe\n')
  assert predict.main([f'--workdir={smoke_run_dir}', f'--input={bad}']) == 1
  assert 'line 2: not valid UTF-8' in capsys.readouterr().err
  context = tmp_path / 'c.txt'
  context.write_text('some context', encoding='utf-8')
  assert predict.main([f'--workdir={smoke_run_dir}', f'--context_file={context}', 'q']) == 1
  assert "--context_file is for QA runs" in capsys.readouterr().err


def test_qa_input_lines(tmp_path):
  lines = ['{"question": "Why?", "context": "Because."}', '', 'plain question']
  assert predict._qa_inputs(lines[:2], None, 'f') == [('Why?', 'Because.'), None]
  assert predict._qa_inputs(lines[2:], 'ctx', 'f') == [('plain question', 'ctx')]
  with pytest.raises(ValueError, match='f line 1: not JSON'):
    predict._qa_inputs(['plain question'], None, 'f')
  with pytest.raises(ValueError, match='f line 1: expected an object'):
    predict._qa_inputs(['{"question": "q", "context": " "}'], None, 'f')


def test_format_prediction_per_task():
  p = Prediction('positive', 0.875, {'negative': 0.125, 'positive': 0.875})
  assert predict.format_prediction('classification', p, False) == 'positive\t0.8750'
  assert json.loads(predict.format_prediction('classification', p, True))['probabilities'] == {
      'negative': 0.125, 'positive': 0.875}
  a = Answer('the  answer\nspans lines', 3.5, 10, 35)
  assert predict.format_prediction('qa', a, False) == 'the answer spans lines'
  assert json.loads(predict.format_prediction('qa', a, True))['start_char'] == 10
  assert predict.format_prediction('summarization', 'A tool.', False) == 'A tool.'
  assert predict.format_prediction('translation', None, False) == ''
  assert predict.format_prediction('qa', None, True) == '{}'
