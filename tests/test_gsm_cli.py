"""Smoke test of `pathsgd-jax gsm` (tiny sizes) and of the experiment's hand-written LeNet-5
rescaling."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathsgd_jax.experiments import cli, gsm


@pytest.fixture(scope="module")
def gsm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gsm")
    argv = ["gsm", "--networks", "lenet300", "--train-subset", "300", "--test-subset", "100",
            "--epochs", "2", "--compressions", "10", "--methods", "magnitude", "path-gsm",
            "--out", str(out), "--quiet"]
    code = cli.main(argv)
    with open(out / "results.json", encoding="utf-8") as f:
        return code, out, json.load(f)


def test_gsm_cli_writes_results_and_figure(gsm_run):
    code, out, results = gsm_run
    assert code == 0
    assert (out / "gsm.png").stat().st_size > 10_000
    methods = sorted((r["init"], r["method"]) for r in results["runs"])
    assert methods == sorted((i, m) for i in gsm.INITS
                             for m in ("dense", "magnitude", "path-gsm"))
    for r in results["runs"]:
        if r["method"] != "dense":
            # Exactly Q = floor(N / 10) non-zero prunable weights after the final pruning.
            nonzero = sum(layer["nonzero"] for layer in r["layers"])
            assert nonzero == results["networks"]["lenet300"]["prunable_weights"] // 10
    assert "lenet300" in results["table"] and "10x" in results["table"]


def test_path_gsm_runs_agree_across_starts(gsm_run):
    """Balanced and unbalanced starts are the same function and Path-GSM (with its path-mass
    final pruning) is rescaling invariant: the two runs give the same accuracies."""
    _, _, results = gsm_run
    rows = {r["init"]: r for r in results["runs"] if r["method"] == "path-gsm"}
    for key in ("test_accuracy", "test_accuracy_before_pruning"):
        assert rows["balanced"][key] == pytest.approx(rows["unbalanced"][key], abs=1e-6)
    np.testing.assert_allclose(rows["balanced"]["train_loss_per_epoch"],
                               rows["unbalanced"]["train_loss_per_epoch"], rtol=1e-4)


def test_lenet5_unbalance_keeps_the_function():
    params = gsm.lenet5_init(jax.random.key(0), 28)
    # Non-zero biases, so their rescaling is exercised too.
    params = {name: {"w": layer["w"], "b": 0.1 + 0.01 * jnp.arange(layer["b"].size)}
              for name, layer in params.items()}
    other = gsm.lenet5_unbalance(jax.random.key(1), params, 0.5, 10.0)
    x = jax.random.uniform(jax.random.key(2), (4, 784))
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(params),
                                                     jax.tree.leaves(other))]
    assert sum(changed) == 7  # every leaf but the output bias really rescaled
    apply = jax.jit(gsm.lenet5_apply)
    np.testing.assert_allclose(apply(other, x), apply(params, x),
                               rtol=1e-4, atol=1e-5)
