"""The docstring examples of every public module run and print what they claim.

A module whose docstrings hold no example passes a bare ``result.failed == 0`` check, so the
runs below also count what was attempted: every public library module, and every function
of the README's API table, must hold examples that run (``# doctest: +SKIP`` ones do not
count). Mutation caught: deleting a module's or a function's examples (the old test passed
for 21 of 29 modules that had none).
"""

import doctest
import importlib
import pkgutil

import jax
import pytest

import pathsgd_jax

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(pathsgd_jax.__path__, "pathsgd_jax.")
    if not info.name.endswith("__main__"))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _is_public_library_module(name):
    parts = name.split(".")[1:]
    return not any(part.startswith("_") for part in parts) and parts[0] != "experiments"


# Public modules that have no running example yet (library change needed: add Examples).
MISSING_EXAMPLES: dict[str, str] = {}
# data's submodules are implementation detail behind pathsgd_jax.data.load.
REQUIRED = {name for name in MODULES
            if _is_public_library_module(name) and not name.startswith("pathsgd_jax.data.")}


def _run(name):
    module = importlib.import_module(name)
    # Examples show the idioms users write (`x @ w + b`), which the suite's strict rank
    # promotion would reject.
    with jax.numpy_rank_promotion("allow"):
        return doctest.testmod(module, optionflags=FLAGS)


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=MISSING_EXAMPLES[name]))
    if name in MISSING_EXAMPLES else name for name in MODULES])
def test_docstring_examples(name):
    result = _run(name)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
    if name in REQUIRED:
        assert result.attempted > 0, f"{name}: no docstring example ran"


README_API = {
    "path_sgd": pathsgd_jax.path_sgd,
    "scale_by_path_norm": pathsgd_jax.scale_by_path_norm,
    "path_scales": pathsgd_jax.path_scales,
    "path_norm": pathsgd_jax.path_norm,
    "path_structure": pathsgd_jax.path_structure,
    "linen.apply_fn": pathsgd_jax.linen.apply_fn,
    "nnx.apply_fn": pathsgd_jax.nnx.apply_fn,
    "balanced_init": pathsgd_jax.balanced_init,
    "unbalanced_init": pathsgd_jax.unbalanced_init,
    "suggest_learning_rate": pathsgd_jax.suggest_learning_rate,
    "relative_step": pathsgd_jax.relative_step,
}
NO_OWN_EXAMPLE: set[str] = set()


def _running_examples(func):
    """The examples of ``func``'s own docstring that doctest runs (not +SKIP)."""
    tests = doctest.DocTestFinder(exclude_empty=True).find(
        func, func.__qualname__, globs=dict(func.__globals__))
    return [ex for test in tests for ex in test.examples
            if not ex.options.get(doctest.SKIP, False)]


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="no Examples in its docstring"))
    if n in NO_OWN_EXAMPLE else n for n in sorted(README_API)])
def test_readme_api_functions_have_examples(name):
    """Each has examples of its own; test_docstring_examples runs them with its module."""
    func = README_API[name]
    assert func.__module__ in MODULES
    assert _running_examples(func), f"{name}: its docstring has no example that runs"
