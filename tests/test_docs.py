"""The docstring examples of every public module run and print what they claim."""

import doctest
import importlib
import pkgutil

import jax
import pytest

import pathsgd_jax

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(pathsgd_jax.__path__, "pathsgd_jax.")
    if not info.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  # Examples show the idioms users write (`x @ w + b`), which the suite's strict rank
  # promotion would reject.
  with jax.numpy_rank_promotion("allow"):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
