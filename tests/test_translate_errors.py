"""Errors of the translate entry point that need no trained run: bad flags, bad input bytes,
an unwritable --output, out-of-range token ids.

Every CLI test here replaces `Translator.from_workdir` with a function that fails the
test, so each error is shown to come before any checkpoint is loaded or decoded.
"""

import io
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_mini import translate
from flaxformer_mini.config import TransformerConfig
from flaxformer_mini.models import Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 20


@pytest.fixture
def no_loading(monkeypatch):
  """Fails the test if the CLI gets as far as loading a checkpoint."""
  def load(*args, **kwargs):
    raise AssertionError('the CLI loaded a checkpoint before reporting the error')
  monkeypatch.setattr(translate.Translator, 'from_workdir', load)


def cli(capsys, *args):
  """Runs the CLI in-process: (exit code, stdout, stderr)."""
  code = translate.main(list(args))
  out, err = capsys.readouterr()
  return code, out, err


# ------------------------------------------------------------------- float options


@pytest.mark.parametrize('args, option', [
    (['--alpha=nan'], '--alpha'),
    (['--alpha=inf'], '--alpha'),
    (['--beam=2', '--alpha=-inf'], '--alpha'),
    (['--sample', '--temperature=nan'], '--temperature'),
    (['--sample', '--temperature=inf'], '--temperature'),
    (['--sample', '--top_p=nan'], '--top_p'),
    (['--batch_size=0'], '--batch_size'),
])
def test_non_finite_or_out_of_range_options_exit_2_naming_the_option(
    args, option, tmp_path, capsys, no_loading):
  with pytest.raises(SystemExit) as exit_info:
    translate.main([f'--workdir={tmp_path}', *args, 'Olá.'])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  [line] = [l for l in err.splitlines() if 'error:' in l]  # one error line (after usage)
  assert f'argument {option}:' in line and args[-1].split('=')[1] in line, err


@pytest.mark.parametrize('field, value', [
    ('alpha', math.nan), ('alpha', math.inf), ('temperature', math.inf),
    ('temperature', math.nan), ('top_p', math.nan)])
def test_search_config_refuses_non_finite_floats(field, value):
  with pytest.raises(ValueError, match=f'{field}={value!r} must be a finite number'):
    translate.SearchConfig(**{field: value})


# ----------------------------------------------------------------------- input bytes


@pytest.mark.slow
def test_non_utf8_stdin_names_stdin_and_the_line_without_traceback(tmp_path):
  # The real stdin (surrogateescape under a UTF-8 locale), so a subprocess.
  proc = subprocess.run(
      [sys.executable, '-m', 'flaxformer_mini.translate', f'--workdir={tmp_path / "nope"}'],
      input=b'Bom dia.\nOl\xe1, tudo bem?\n', cwd=REPO, capture_output=True, timeout=120)
  err = proc.stderr.decode()
  assert proc.returncode == 1 and proc.stdout == b'', err
  assert 'stdin line 2 is not valid UTF-8 (byte 0xe1 at column 3)' in err, err
  assert 'Traceback' not in err and 'run directory' not in err, err


def test_non_utf8_input_file_names_the_file_and_the_line(tmp_path, capsys, no_loading):
  path = tmp_path / 'src.pt'
  path.write_bytes(b'Bom dia.\r\n\r\nObrigado \xff\xfe.\r\n')
  code, out, err = cli(capsys, f'--workdir={tmp_path}', f'--input={path}')
  assert code == 1 and out == ''
  assert f"--input {str(path)!r} line 3 is not valid UTF-8 (byte 0xff at column 10)" in err


def test_in_memory_stdin_and_arguments_are_checked_too(tmp_path, capsys, monkeypatch,
                                                       no_loading):
  monkeypatch.setattr(sys, 'stdin', io.TextIOWrapper(io.BytesIO(b'ok\n\x80\n')))
  code, _, err = cli(capsys, f'--workdir={tmp_path}')
  assert code == 1 and 'stdin line 2 is not valid UTF-8' in err
  # Non-UTF-8 bytes in argv reach Python as lone surrogates (os.fsdecode).
  code, _, err = cli(capsys, f'--workdir={tmp_path}', 'Bom dia.', os.fsdecode(b'Ol\xe1.'))
  assert code == 1 and 'sentence argument 2 is not valid UTF-8' in err


# --------------------------------------------------------------------------- output


def test_output_in_missing_directory_is_refused_before_loading(tmp_path, capsys, no_loading):
  missing = tmp_path / 'no_such_dir'
  code, _, err = cli(capsys, f'--workdir={tmp_path}', f'--output={missing / "hyp.txt"}', 'Olá.')
  assert code == 1 and f'directory {str(missing)!r} does not exist' in err
  code, _, err = cli(capsys, f'--workdir={tmp_path}', f'--output={tmp_path}', 'Olá.')
  assert code == 1 and 'is a directory' in err


@pytest.mark.skipif(os.geteuid() == 0, reason='root may write to read-only directories')
def test_output_in_read_only_directory_is_refused_before_loading(tmp_path, capsys, no_loading):
  locked = tmp_path / 'locked'
  locked.mkdir()
  locked.chmod(0o500)
  try:
    code, _, err = cli(capsys, f'--workdir={tmp_path}', f'--output={locked / "h.txt"}', 'Olá.')
  finally:
    locked.chmod(0o700)
  assert code == 1 and 'is not writable' in err


# ---------------------------------------------------------------------- token ids


class _Vocab:
  """Stands in for the tokenizer: search_ids needs only the vocab size to match."""
  model_path = 'stub.model'
  vocab_size = VOCAB


@pytest.fixture(scope='module')
def tiny_translator():
  cfg = TransformerConfig(vocab_size=VOCAB, d_model=8, num_heads=2, d_ff=16,
                          num_encoder_layers=1, num_decoder_layers=1, max_len=8,
                          dropout_rate=0.0)
  ids = jnp.ones((1, 4), jnp.int32)
  params = Transformer(cfg).init(jax.random.PRNGKey(0), ids, ids)['params']
  return translate.Translator(cfg, params, _Vocab(), max_decode_len=4)


@pytest.mark.parametrize('bad, where', [(VOCAB, (1, 2)), (-1, (0, 0)), (VOCAB + 7, (1, 0))])
def test_search_ids_refuses_out_of_range_ids_before_the_jitted_search(
    tiny_translator, bad, where):
  inputs = np.array([[5, 6, 7, 0], [8, 9, 10, 0]], np.int32)
  inputs[where] = bad
  before = translate.compiled_shapes()
  row, col = where
  with pytest.raises(ValueError, match=(rf'inputs\[{row}, {col}\] = {bad}'
                                        rf' is not a token id.*vocab_size={VOCAB}\)')):
    tiny_translator.search_ids(inputs, translate.SearchConfig('greedy'))
  assert translate.compiled_shapes() == before  # refused on the host, nothing traced


def test_search_ids_in_range_still_decodes(tiny_translator):
  inputs = np.array([[5, 6, 7, 0], [8, 9, VOCAB - 1, 0]], np.int32)
  seqs, scores = tiny_translator.search_ids(inputs, translate.SearchConfig('beam', 2))
  assert seqs.shape == (2, 4) and np.isfinite(np.asarray(scores)).all()
