"""Shared machinery of the Hugging Face importers (`llama.load_hf_llama`, `t5.load_hf_t5`).

An importer lists, for every parameter of our model, the HF tensor it comes from and
how to reshape it (`Rule`). `assemble` then checks the three ways a checkpoint can
disagree with the config and names the offending tensors in the error:

  * missing:    a tensor the config needs is absent from the state dict;
  * unexpected: the state dict holds a tensor nothing reads (e.g. biases where the
                config says ``use_bias=False``, or more layers than configured);
  * shape:      a tensor's shape (after the layout change) differs from the param
                shape our model expects (from ``jax.eval_shape`` of its ``init``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util

PyTree = Any
_SHOW = 8  # how many names an error lists before "... and N more"


@dataclasses.dataclass(frozen=True)
class Rule:
  """Our param ``path`` <- ``fn(state_dict[hf_key])``."""
  path: tuple[str, ...]
  hf_key: str
  fn: Callable[[np.ndarray], np.ndarray] = lambda w: w


# Layout changes from torch ``nn.Linear.weight`` [out, in] to flax kernels.
def linear(w: np.ndarray) -> np.ndarray:
  """[out, in] -> Dense kernel [in, out]."""
  return w.T


def split_heads(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
  """q/k/v projection [heads * head_dim, d_model] -> DenseGeneral kernel
  [d_model, heads, head_dim]."""
  return lambda w: w.T.reshape(w.shape[1], heads, head_dim)


def merge_heads(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
  """output projection [d_model, heads * head_dim] -> kernel [heads, head_dim, d_model]."""
  return lambda w: w.T.reshape(heads, head_dim, w.shape[0])


def to_numpy_state_dict(state_dict_or_model: Any) -> dict[str, np.ndarray]:
  """A torch module, or a mapping of name -> torch tensor / array, as float32 numpy arrays."""
  sd = state_dict_or_model
  if hasattr(sd, "state_dict") and callable(sd.state_dict):
    sd = sd.state_dict()
  if not isinstance(sd, Mapping):
    raise TypeError("expected a torch model or a state dict (mapping name -> tensor), got "
                    f"{type(state_dict_or_model).__name__}")
  out = {}
  for name, t in sd.items():
    if hasattr(t, "detach"):  # torch tensor (bfloat16 has no numpy dtype: go via float32)
      t = t.detach().cpu().float().numpy()
    out[name] = np.asarray(t, np.float32)
  return out


def config_get(hf_config: Any, key: str, default: Any = dataclasses.MISSING) -> Any:
  """``hf_config.key`` for a transformers config object or a plain dict."""
  if isinstance(hf_config, Mapping):
    value = hf_config.get(key, default)
  else:
    value = getattr(hf_config, key, default)
  if value is dataclasses.MISSING:
    raise ValueError(f"the Hugging Face config has no {key!r}")
  return value


def _names(items: Sequence[str]) -> str:
  items = sorted(items)
  more = f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
  return ", ".join(items[:_SHOW]) + more


def assemble(rules: Iterable[Rule], state_dict: Mapping[str, np.ndarray], expected: PyTree, *,
             ignore: Callable[[str], bool] = lambda name: False, what: str = "checkpoint"
             ) -> PyTree:
  """Builds our param tree from ``state_dict`` following ``rules``.

  Args:
    rules: one `Rule` per param of ``expected``.
    state_dict: name -> numpy array.
    expected: our param tree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of ``init``).
    ignore: HF names that may be present without being read (buffers, tied copies).
    what: name of the checkpoint kind for error messages.

  Returns:
    The param tree (nested dict of float32 numpy arrays), same structure as ``expected``.

  Raises:
    ValueError naming every missing / unexpected tensor and every shape mismatch.
  """
  rules = list(rules)
  want = traverse_util.flatten_dict(expected)
  have_rules = {r.path for r in rules}
  if have_rules != set(want):  # a bug in the importer, not in the checkpoint
    raise AssertionError(f"importer rules do not cover the model params: "
                         f"unmapped {sorted(set(want) - have_rules)}, "
                         f"unknown {sorted(have_rules - set(want))}")
  used = {r.hf_key for r in rules}
  missing = sorted(used - set(state_dict))
  unexpected = sorted(k for k in set(state_dict) - used if not ignore(k))
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {_names(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}): {_names(unexpected)}")
  if problems:
    raise ValueError(f"{what} does not match the config: " + "; ".join(problems))

  flat, bad = {}, []
  for r in rules:
    src = state_dict[r.hf_key]
    try:
      arr = np.asarray(r.fn(src), np.float32)
    except ValueError as e:  # reshape of the wrong size
      bad.append(f"{r.hf_key} {tuple(src.shape)} cannot become {'/'.join(r.path)} "
                 f"{tuple(want[r.path].shape)}: {e}")
      continue
    if arr.shape != tuple(want[r.path].shape):
      bad.append(f"{r.hf_key} {tuple(src.shape)} -> {'/'.join(r.path)}: expected "
                 f"{tuple(want[r.path].shape)}, got {arr.shape}")
    flat[r.path] = arr
  if bad:
    raise ValueError(f"{what} has {len(bad)} shape mismatch(es) with the config: "
                     + "; ".join(bad[:_SHOW]) + (" ..." if len(bad) > _SHOW else ""))
  return traverse_util.unflatten_dict(flat)


def expected_params(model, *args, **kwargs) -> PyTree:
  """Shapes of ``model.init(key, *args, **kwargs)['params']`` without computing them."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs)["params"])
