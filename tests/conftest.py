"""Shared pytest fixtures for the flaxformer_mini tests (kept tiny on purpose)."""

import jax
import numpy as np
import pytest

# Tests run in float32 (the JAX default); float64 lives only in the NumPy references.
jax.config.update("jax_enable_x64", False)


@pytest.fixture
def rng():
  """A fresh, seeded NumPy generator per test: random inputs are reproducible."""
  return np.random.default_rng(0)
