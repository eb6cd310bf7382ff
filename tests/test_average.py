"""flaxformer_mini.average: the written run's params are the float64 mean of the chosen
checkpoints, it loads and translates like any run, and bad requests are refused by name."""

import jax
import numpy as np
import pytest

from flaxformer_mini import average, checkpoints, translate


def test_average_run_is_the_mean_and_loads_as_a_run(smoke_run_dir, tmp_path):
  assert average.run_steps(smoke_run_dir) == [20, 40]  # the smoke run keeps two
  out = str(tmp_path / 'avg')
  assert average.main([f'--workdir={smoke_run_dir}', '--last=2', f'--out={out}']) == 0
  _, p20, _ = checkpoints.load_run(smoke_run_dir, 20)
  _, p40, _ = checkpoints.load_run(smoke_run_dir, 40)
  config, mean, assets, meta = checkpoints.load_run(out, with_meta=True)
  assert meta['step'] == 40 and meta['averaged_steps'] == [20, 40]
  assert config.model == checkpoints.load_run(smoke_run_dir, 40)[0].model
  assert set(assets) == {'spm.model'}
  flat = jax.tree_util.tree_leaves_with_path(mean)
  assert flat and len(flat) == len(jax.tree_util.tree_leaves(p20))
  for (path, got), a, b in zip(flat, jax.tree_util.tree_leaves(p20),
                               jax.tree_util.tree_leaves(p40)):
    want = (np.asarray(a, np.float64) + np.asarray(b, np.float64)) / 2
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  assert not np.allclose(jax.tree_util.tree_leaves(p20)[0], jax.tree_util.tree_leaves(p40)[0])
  translator = translate.Translator.from_workdir(out, batch_size=2)
  assert len(translator.translate(['Bom dia.'], translate.SearchConfig('greedy'))) == 1


def test_average_refuses_bad_requests(smoke_run_dir, tmp_path, capsys):
  out = str(tmp_path / 'avg')
  assert average.main([f'--workdir={smoke_run_dir}', '--steps=20,30', f'--out={out}']) == 1
  assert 'has no checkpoint step 30 (it has [20, 40])' in capsys.readouterr().err
  assert average.main([f'--workdir={smoke_run_dir}', '--steps=40,40', f'--out={out}']) == 1
  assert 'at least 2 distinct steps' in capsys.readouterr().err
  assert average.main([f'--workdir={smoke_run_dir}', '--last=3', f'--out={out}']) == 1
  assert '--last=3' in capsys.readouterr().err
  assert average.main([f'--workdir={smoke_run_dir}', '--steps=2x', f'--out={out}']) == 1
  assert 'comma-separated integers' in capsys.readouterr().err
  assert average.main([f'--workdir={tmp_path}/none', '--last=2', f'--out={out}']) == 1
  assert 'no checkpoint directory' in capsys.readouterr().err
  assert average.main([f'--workdir={smoke_run_dir}', '--last=2', f'--out={smoke_run_dir}']) == 1
  assert 'already holds checkpoints' in capsys.readouterr().err
  with pytest.raises(ValueError, match=r"param \['w'\] has shape \(3,\) in checkpoint 1"):
    average.average_params([{'w': np.zeros(2)}, {'w': np.zeros(3)}])
