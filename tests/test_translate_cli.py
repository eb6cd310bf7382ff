"""The translate entry point on a real (tiny) training run: CLI, Translator, errors.

The session fixture ``smoke_run_dir`` (conftest.py) runs ``train.py`` on configs/smoke.py
for a few dozen steps; every test then decodes its checkpoints. Most CLI calls run
``translate.main`` in-process so that all tests share the compiled searches (one compile per
search kind).
"""

import functools
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_mini import checkpoints, decoding, translate
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.data import tokenizer as tok_lib
from flaxformer_mini.models import Transformer, seq2seq_decoding_fns

from conftest import SMOKE_MAX_DECODE_LEN as MAX_DECODE_LEN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SOURCES = ['O certificado diverge.', 'Eu gosto de gatos.',
           'A casa é muito grande e bonita.', 'Obrigado.',
           'Nós vamos para a escola amanhã de manhã.']
REFERENCES = ['The certificate differs.', 'I like cats.', 'The house is very big and pretty.',
              'Thank you.', 'We are going to school tomorrow morning.']
LONG = ' '.join(['O gato preto dorme no sofá da sala.'] * 6)  # > max_len=32 tokens
GREEDY = ['--greedy']


@pytest.fixture(scope='module')
def run_dir(smoke_run_dir):
  return smoke_run_dir


@pytest.fixture(scope='module')
def translator(run_dir):
  return translate.Translator.from_workdir(run_dir)


def cli(capsys, *args):
  """Runs the CLI in-process: (exit code, stdout, stderr)."""
  code = translate.main(list(args))
  out, err = capsys.readouterr()
  return code, out, err


def write(path, lines):
  path.write_text(''.join(l + '\n' for l in lines), encoding='utf-8')
  return str(path)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_args_file_and_stdin_agree_and_keep_empty_lines(run_dir, tmp_path, capsys, monkeypatch):
  # Seeded sampling, not greedy: the 40-step model sits near the unigram plateau, where
  # greedy may map every sentence to '' (EOS first) and make the comparisons vacuous.
  # Sampling is deterministic here: empty lines are skipped before batching.
  method = ['--sample', '--seed=3']
  code, out, _ = cli(capsys, f'--workdir={run_dir}', *method, *SOURCES)
  assert code == 0
  by_args = out.splitlines()
  assert len(by_args) == len(SOURCES) and any(by_args), by_args

  with_gaps = ['', SOURCES[0], '', '   ', *SOURCES[1:], '']
  out_path = tmp_path / 'hyp.txt'
  code, _, _ = cli(capsys, f'--workdir={run_dir}', *method,
                   f'--input={write(tmp_path / "src.txt", with_gaps)}', f'--output={out_path}')
  assert code == 0
  by_file = out_path.read_text(encoding='utf-8').split('\n')[:-1]
  assert by_file == ['', by_args[0], '', '', *by_args[1:], '']

  monkeypatch.setattr(sys, 'stdin', io.StringIO('\n'.join(with_gaps) + '\n'))
  code, out, _ = cli(capsys, f'--workdir={run_dir}', *method)
  assert code == 0 and out.split('\n')[:-1] == by_file


@pytest.mark.slow
def test_python_dash_m_entry_point_reports_missing_run_dir(tmp_path):
  missing = str(tmp_path / 'nope')
  proc = subprocess.run([sys.executable, '-m', 'flaxformer_mini.translate', f'--workdir={missing}',
                         'Olá.'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and proc.stdout == ''
  assert 'run directory not found' in proc.stderr and missing in proc.stderr


@functools.partial(jax.jit, static_argnames='model')
def direct_greedy(model, params, inputs):
  """decoding.greedy_search on inputs [batch, len] as given: (sequences, their log-probs)."""
  t2l, cache = seq2seq_decoding_fns(model, params, inputs, MAX_DECODE_LEN)
  seqs = decoding.greedy_search(t2l, cache, batch_size=inputs.shape[0],
                                max_decode_len=MAX_DECODE_LEN, bos_id=tok_lib.BOS_ID,
                                eos_id=tok_lib.EOS_ID, pad_id=tok_lib.PAD_ID)
  return seqs, logprob(model, params, inputs, seqs)


@functools.partial(jax.jit, static_argnames='model')
def logprob(model, params, inputs, sequences):
  """decoding.score_sequences: [batch] summed log-probs of sequences given inputs."""
  t2l, cache = seq2seq_decoding_fns(model, params, inputs, MAX_DECODE_LEN)
  return decoding.score_sequences(t2l, cache, sequences, bos_id=tok_lib.BOS_ID,
                                  eos_id=tok_lib.EOS_ID, pad_id=tok_lib.PAD_ID)


@pytest.mark.slow
def test_greedy_matches_decoding_greedy_search_called_directly(run_dir, translator, capsys):
  code, out, _ = cli(capsys, f'--workdir={run_dir}', *GREEDY, *SOURCES)
  assert code == 0
  config, params, tokenizer = checkpoints.load_for_inference(run_dir)
  model = Transformer(TransformerConfig.from_dict(config.model))
  longest = max(map(len, tokenizer.encode(SOURCES)))
  seqs, logp = direct_greedy(model, params, jnp.asarray(tokenizer.encode_padded(SOURCES, longest)))
  assert out.splitlines() == tokenizer.decode(np.asarray(seqs))

  # A barely trained model may say the same thing for every input, so also check the
  # (input-dependent) log-probs: the length-sorted, bucket-padded rows the Translator
  # decodes are the right sentences, and padding changes nothing.
  [(idx, inputs)] = translator.batches(translator.encode(SOURCES))
  rows, length = inputs.shape
  assert idx != sorted(idx) and rows == 8 and length == max(4, 1 << (longest - 1).bit_length())
  bucket_seqs, _ = translator.search_ids(inputs, translate.SearchConfig('greedy'))
  bucket_logp = logprob(model, translator.params, jnp.asarray(inputs), bucket_seqs)
  np.testing.assert_array_equal(np.asarray(bucket_seqs)[:len(idx)], np.asarray(seqs)[idx])
  np.testing.assert_allclose(np.asarray(bucket_logp)[:len(idx)], np.asarray(logp)[idx],
                             rtol=1e-5, atol=1e-5)
  assert len(set(np.round(np.asarray(logp), 3))) > 1  # the check above is not vacuous


@pytest.mark.slow
def test_beam_runs_and_beats_greedy_under_score_sequences(run_dir, translator, capsys):
  code, out, _ = cli(capsys, f'--workdir={run_dir}', '--beam=4', '--alpha=0.6', *SOURCES)
  assert code == 0 and len(out.splitlines()) == len(SOURCES)

  [(idx, inputs)] = translator.batches(translator.encode(SOURCES))
  beam_seqs, beam_scores = translator.search_ids(inputs, translate.SearchConfig('beam', 4, 0.6))
  greedy_seqs, none = translator.search_ids(inputs, translate.SearchConfig('greedy'))
  assert none is None
  n = len(idx)
  assert [out.splitlines()[i] for i in idx] == translator.tokenizer.decode(
      np.asarray(beam_seqs)[:n])

  model = Transformer(translator.model_config)
  greedy_logp = logprob(model, translator.params, jnp.asarray(inputs), greedy_seqs)
  greedy_len = np.sum(np.asarray(greedy_seqs) != tok_lib.PAD_ID, axis=1)
  greedy_scores = np.asarray(greedy_logp) / np.asarray(decoding.length_penalty(greedy_len, 0.6))
  np.testing.assert_array_less(greedy_scores[:n] - 1e-4, np.asarray(beam_scores)[:n])


@pytest.mark.slow
def test_reference_prints_sacrebleu_bleu_and_chrf(run_dir, tmp_path, capsys):
  import sacrebleu
  out_path = tmp_path / 'hyp.txt'
  code, out, _ = cli(capsys, f'--workdir={run_dir}', *GREEDY,
                     f'--input={write(tmp_path / "src.txt", SOURCES)}', f'--output={out_path}',
                     f'--reference={write(tmp_path / "ref.txt", REFERENCES)}')
  assert code == 0
  hyps = out_path.read_text(encoding='utf-8').splitlines()
  bleu = sacrebleu.metrics.BLEU()
  chrf = sacrebleu.metrics.CHRF()
  expected = [bleu.corpus_score(hyps, [REFERENCES]).format(signature=str(bleu.get_signature())),
              chrf.corpus_score(hyps, [REFERENCES]).format(signature=str(chrf.get_signature()))]
  assert out.splitlines() == expected
  assert expected[0].startswith('BLEU|nrefs:1') and expected[1].startswith('chrF2|nrefs:1')


@pytest.mark.slow
def test_one_compile_per_bucket_shape(translator):
  greedy = translate.SearchConfig('greedy')
  translator.translate(SOURCES, greedy)  # 5 rows -> bucket 8
  before = translate.compiled_shapes()
  assert translator.translate(SOURCES[:3] + ['', 'Bom dia.', 'Boa noite.'], greedy)[3] == ''
  assert translate.compiled_shapes() == before  # 5 rows again, same length bucket


@pytest.mark.slow
def test_search_flags_are_validated(run_dir, capsys):
  for args in (['--top_k=5'], ['--greedy', '--alpha=0.5'], ['--greedy', '--beam=2'],
               ['--sample', '--top_p=0']):
    with pytest.raises(SystemExit) as exit_info:
      translate.main([f'--workdir={run_dir}', *args, 'Olá.'])
    assert exit_info.value.code == 2, args
  err = capsys.readouterr().err
  assert '--top_k only apply with --sample' in err and '--alpha only applies to beam' in err


@pytest.mark.slow
def test_sample_with_temperature_zero_is_greedy(translator):
  assert (translator.translate(SOURCES, translate.SearchConfig('sample', temperature=0.0, seed=3))
          == translator.translate(SOURCES, translate.SearchConfig('greedy')))


# ----------------------------------------------------------------------------- errors


def test_no_checkpoint_names_the_dir_and_what_was_expected(tmp_path, capsys):
  code, out, err = cli(capsys, f'--workdir={tmp_path}', 'Olá.')
  assert code == 1 and out == ''
  assert str(tmp_path) in err and "missing '" in err and 'checkpoints' in err


@pytest.mark.slow
def test_unknown_step_lists_the_available_ones(run_dir, capsys):
  code, _, err = cli(capsys, f'--workdir={run_dir}', '--step=7', 'Olá.')
  assert code == 1 and 'step 7 not found' in err and '[20, 40]' in err


@pytest.mark.slow
def test_named_step_loads(run_dir, capsys):
  code, out, _ = cli(capsys, f'--workdir={run_dir}', '--step=20', *GREEDY, *SOURCES, '')
  assert code == 0 and out.count('\n') == len(SOURCES) + 1


def _copy_run(run_dir, tmp_path):
  copy = str(tmp_path / 'run_copy')
  shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns('tfds', 'tb'))
  return copy


def _edit_json(path, edit):
  with open(path) as f:
    value = json.load(f)
  edit(value)
  with open(path, 'w') as f:
    json.dump(value, f)


@pytest.mark.slow
def test_param_tree_vs_config_mismatch_names_first_differing_path(run_dir, tmp_path, capsys):
  copy = _copy_run(run_dir, tmp_path)
  _edit_json(os.path.join(copy, 'checkpoints', '40', 'config', 'metadata'),
             lambda c: c['model'].update(num_decoder_layers=2))
  code, _, err = cli(capsys, f'--workdir={copy}', 'Olá.')
  assert code == 1 and copy in err
  assert "first differing path 'decoder/layer_1/" in err and 'missing from the checkpoint' in err


@pytest.mark.slow
def test_tokenizer_vocab_mismatch_names_both_sizes(run_dir, tmp_path, capsys):
  copy = _copy_run(run_dir, tmp_path)
  other = tok_lib.train_tokenizer(REFERENCES * 20 + SOURCES * 20, str(tmp_path / 'spm'),
                                  vocab_size=60)
  shutil.copy(other, os.path.join(copy, tok_lib.MODEL_FILENAME))
  _edit_json(os.path.join(copy, 'checkpoints', '40', 'meta', 'metadata'),
             lambda m: m.pop('assets'))  # skip the sha256 check: reach the vocab check
  code, _, err = cli(capsys, f'--workdir={copy}', 'Olá.')
  assert code == 1 and 'vocab_size=60' in err and 'expected vocab_size=400' in err


@pytest.mark.slow
def test_long_input_refused_with_line_and_length_or_truncated_with_warning(
    run_dir, translator, tmp_path, capsys, caplog):
  lines = [SOURCES[0], '', LONG]
  n_tokens = len(translator.tokenizer.encode([LONG])[0])
  assert n_tokens > 32
  code, _, err = cli(capsys, f'--workdir={run_dir}', '--on_long=error',
                     f'--input={write(tmp_path / "src.txt", lines)}')
  assert code == 1 and f'input line 3 has {n_tokens} tokens' in err and 'max_len=32' in err

  # The default, on the encode step the CLI uses (decoding a 32-token input is not special).
  encoded = translator.encode(lines)
  assert [None if x is None else len(x) for x in encoded] == [len(encoded[0]), None, 32]
  np.testing.assert_array_equal(encoded[2], translator.tokenizer.encode([LONG])[0][:32])
  assert f'input line 3 has {n_tokens} tokens' in caplog.text and 'truncated' in caplog.text
