"""Smoke test of `pathsgd-jax resnet` (tiny sizes) and of its balanced / rescaled starts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathsgd_jax.experiments import cli, models, resnet

OPTIMIZERS = ("sgd-momentum", "path-sgd-momentum-trust")
EPOCHS = 2


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet")
    argv = ["resnet", "--train-subset", "200", "--test-subset", "50", "--epochs", str(EPOCHS),
            "--batch-size", "50", "--downsample", "4", "--stage-features", "4",
            "--optimizers", *OPTIMIZERS, "--lr-grids", "sgd-momentum=0.3,0.03",
            "path-sgd-momentum-trust=0.03", "--out", str(out), "--quiet"]
    code = cli.main(argv)
    with open(out / "results.json", encoding="utf-8") as f:
        return code, out, json.load(f)


def test_resnet_cli_writes_results_and_figure(resnet_run):
    code, out, results = resnet_run
    assert code == 0
    assert (out / "resnet.png").stat().st_size > 10_000
    assert results["dataset"]["image_shape"] == [7, 7, 1]
    assert results["grids"] == {"sgd-momentum": [0.3, 0.03], "path-sgd-momentum-trust": [0.03]}
    runs = {(r["init"], r["optimizer"]): r for r in results["runs"]}
    assert sorted(runs) == sorted((i, o) for i in resnet.INITS for o in OPTIMIZERS)
    for (init, opt), run in runs.items():
        assert len(run["grid"]) == len(results["grids"][opt])
        for g in run["grid"]:  # every grid point trains the full budget, nothing diverges
            assert not g["diverged"]
            assert len(g["curves"]["train_loss"]) == EPOCHS
            assert all(np.isfinite(v) for v in g["curves"]["test_error"])
        # The chosen run is the grid run with the lowest final validation error.
        finals = [g["curves"]["val_error"][-1] for g in run["grid"]]
        assert run["grid"][run["chosen_index"]]["curves"]["val_error"][-1] == min(finals)
        assert run["chosen_lr"] == run["grid"][run["chosen_index"]]["lr"]
        assert run["curves"] == run["grid"][run["chosen_index"]]["curves"]
    assert len(results["summary"]) == 4
    for label in ("SGD + momentum", "Path-SGD + momentum, trust region"):
        assert label in results["table"]
    counts = results["unbalanced_start"]["rescaled_channels"]
    assert counts["absorbed"] > 0 and counts["compensated"] > 0
    gap = results["unbalanced_start"]["relative_logit_gap"]
    assert 0 < gap["train_mode"] < 1e-3 and 0 < gap["eval_mode"] < 1e-3  # BatchNorm's ε only


def test_path_sgd_follows_the_same_run_from_both_starts(resnet_run):
    """Path-SGD (train-mode reading, rescaling invariant) gives the same curves from the two
    starts (the same function) up to BatchNorm's ε; SGD's curves differ far more."""
    _, _, results = resnet_run
    runs = {r["init"]: r for r in results["runs"] if r["optimizer"] == "path-sgd-momentum-trust"}
    np.testing.assert_allclose(runs["unbalanced"]["curves"]["train_loss"],
                               runs["balanced"]["curves"]["train_loss"], rtol=1e-3)
    # In parameter space: after the first steps the rescaled balanced run is the unbalanced
    # run for Path-SGD, not for SGD (whose steps scale inversely to the weights).
    gaps = {k: v["max_relative_param_gap"] for k, v in results["trajectory_equivariance"].items()}
    # (Not 0: BatchNorm's ε, and the nearly dead last scales amplify rounding; measured 0.04
    # here against 6 for SGD.)
    assert gaps["path-sgd-momentum-trust"] < 0.1, gaps
    assert gaps["sgd-momentum"] > 20 * gaps["path-sgd-momentum-trust"], gaps


def _start(epsilon):
    """A two-stage version of the smoke run's network (with a projection shortcut), non-zero last
    scales and shifts so that every leaf and the compensated rescaling matter."""
    model = models.resnet((4, 8), bn_epsilon=epsilon)
    x = jax.random.uniform(jax.random.key(10), (50, 7, 7, 1))
    variables = model.init(jax.random.key(0), x[:2])
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.5 if "bn" in jax.tree_util.keystr(path) else v,
        variables["params"])
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    scales = resnet.sample_scales(jax.random.key(1), params, fraction=1.0, factor=10.0)
    return model, x, variables, scales


def test_starts_compute_the_same_function():
    """The compensated rescaling is exact (bit for bit, both modes); the absorbed one is exact
    up to BatchNorm's ε (with ε = 0: to rounding); the leaves really change, and a wrong
    compensation is seen."""
    model, x, variables, scales = _start(1e-5)
    ones = {k: jax.tree.map(jnp.ones_like, v) for k, v in scales.items()}
    compensated = resnet.rescale(variables, dict(ones, compensated=scales["compensated"]))
    for mode in (True, False):
        np.testing.assert_array_equal(
            model.apply(compensated, x, train=mode, mutable=["batch_stats"])[0],
            model.apply(variables, x, train=mode, mutable=["batch_stats"])[0])
    both = resnet.rescale(variables, scales)
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(both["params"]))]
    assert sum(changed) == len(scales["absorbed"]) + len(scales["compensated"]) * 2
    gap = resnet.function_gap(model, variables, both, x)
    assert 1e-7 < gap["train_mode"] < 1e-3 and gap["eval_mode"] < 1e-3, gap
    model0, _, variables0, scales0 = _start(0.0)
    gap0 = resnet.function_gap(model0, variables0, resnet.rescale(variables0, scales0), x)
    assert gap0["train_mode"] < 1e-6 and gap0["eval_mode"] < 1e-6, gap0
    broken = resnet.rescale(variables0, dict(ones, compensated=scales0["compensated"]))
    for (block,) in scales0["compensated"]:  # conv2's input channels left undivided
        broken["params"][block]["conv2"] = variables0["params"][block]["conv2"]
    assert resnet.function_gap(model0, variables0, broken, x)["train_mode"] > 1e-2


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="optimizers"):
        resnet.ResNetConfig(optimizers=("sgd",))
    with pytest.raises(ValueError, match="lr-grids"):
        resnet.ResNetConfig(lr_grids={"nope": (0.1,)})
    assert cli.main(["resnet", "--downsample", "3", "--epochs", "1", "--quiet"]) == 2
