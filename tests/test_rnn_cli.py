"""Smoke test of the ``rnn`` experiment (tiny T, few steps: seconds).

No run diverges at these sizes, and the tests say so: a run that diverged (a NaN step of
Path-SGD, say) used to skip every curve check and the figure check. Mutation caught: an
update that turns NaN (every run then reports `diverged`).
"""

import argparse
import json

import numpy as np
import pytest

from pathsgd_jax.experiments import rnn as rnn_exp

STEPS = 60
GRID = ["0.1", "0.01"]


@pytest.fixture(scope="module")
def rnn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rnn")
    argv = ["--seq-len", "6", "--hidden", "6", "--batch-size", "16", "--steps", str(STEPS),
            "--eval-every", "20", "--steps-per-call", "20", "--n-train", "400", "--n-test",
            "100", "--n-val", "50", "--lr-grid", *GRID, "--optimizers", "path-sgd", "sgd",
            "adam", "--init", "gaussian", "irnn", "--out", str(out), "--quiet"]
    code = rnn_exp.main(argv)
    with open(out / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    return code, out, results


def test_exit_code_and_files(rnn_run):
    code, out, results = rnn_run
    assert code == 0
    assert (out / "rnn.png").stat().st_size > 10_000
    assert results["figures"] == ["rnn.png"]
    assert results["command"] == "rnn"
    assert results["command_line"].startswith("python -m pathsgd_jax.experiments.rnn")


def test_results_hold_configuration_and_versions(rnn_run):
    _, _, results = rnn_run
    cfg = results["config"]
    assert cfg["task"] == "adding" and cfg["seq_len"] == [6] and cfg["hidden"] == 6
    assert cfg["steps"] == STEPS and cfg["batch_size"] == 16
    assert cfg["optimizers"] == ["path-sgd", "sgd", "adam"]
    assert cfg["init"] == ["gaussian", "irnn"]
    assert cfg["lr_grid"] == [float(v) for v in GRID]
    for pkg in ("jax", "optax", "flax", "numpy"):
        assert results["environment"]["versions"][pkg]
    task = results["tasks"]["adding (T=6)"]
    assert task["baseline_mse"] == pytest.approx(1 / 6)
    assert "T//2" in task["marker_convention"]
    assert results["wall_time_s"] > 0


def test_curves_and_summary(rnn_run):
    _, _, results = rnn_run
    assert len(results["runs"]) == 6  # 3 optimizers x 2 inits.
    for run in results["runs"]:
        assert [g["lr"] for g in run["grid"]] == [float(v) for v in GRID]
        for g in run["grid"]:
            curves = g["curves"]
            # At these sizes no run diverges; a diverged run used to skip every check here.
            assert not g["diverged"], (run["init"], run["optimizer"], g["lr"])
            assert curves["step"] == [0, 20, 40, 60]
            for key in ("test_metric", "val_metric", "kappa2_over_kappa1", "time_s"):
                assert len(curves[key]) == 4, key
            assert all(np.isfinite(curves["test_metric"]))
            # κ^(2)/κ^(1) is a ratio of non-negative sums.
            assert all(v >= 0 for v in curves["kappa2_over_kappa1"])
        assert run["chosen_index"] is not None
        chosen = run["grid"][run["chosen_index"]]
        assert run["chosen_lr"] == chosen["lr"]
        assert run["curves"] == chosen["curves"]
    # From the Gaussian start every optimizer lowers the test MSE below its start.
    for run in results["runs"]:
        if run["init"] == "gaussian":
            metric = run["curves"]["test_metric"]
            assert metric[-1] < 0.5 * metric[0], (run["optimizer"], metric)
    rows = results["summary"]
    assert {(r["init"], r["optimizer"]) for r in rows} == {
        (i, o) for i in ("gaussian", "irnn") for o in ("path-sgd", "sgd", "adam")}
    text = rnn_exp.format_summary(rows)
    assert "path-sgd" in text and "final test MSE" in text


def test_figure_has_baseline_and_lines(rnn_run):
    _, _, results = rnn_run
    fig = rnn_exp.plot_rnn(results)
    ax = fig.axes[0]
    ys = [line.get_ydata() for line in ax.lines]
    assert any(len(y) == 2 and np.allclose(y, 1 / 6) for y in ys)  # the baseline
    lines = {line.get_gid(): line for a in fig.axes for line in a.lines}
    for run in results["runs"]:
        line = lines[f"adding (T=6)/{run['init']}/{run['optimizer']}/test"]
        np.testing.assert_array_equal(line.get_ydata(), run["curves"]["test_metric"])


def test_add_arguments_and_bad_options():
    parser = argparse.ArgumentParser()
    rnn_exp.add_arguments(parser)
    args = parser.parse_args(["--preset", "paper", "--steps", "5"])
    cfg = rnn_exp.config_from_args(args)
    assert cfg.seq_len == [100, 200, 400, 750] and cfg.steps == 5
    assert cfg.init == ["gaussian", "irnn"]
    assert rnn_exp.main(["--momentum", "1.5", "--quiet", "--steps", "1"]) == 2


def test_mnist_row_smoke(tmp_path):
    argv = ["--task", "mnist-row", "--hidden", "8", "--batch-size", "32", "--steps", "20",
            "--eval-every", "10", "--steps-per-call", "10", "--lr-grid", "0.01",
            "--optimizers", "path-sgd", "--out", str(tmp_path), "--quiet"]
    assert rnn_exp.main(argv) == 0
    with open(tmp_path / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    run = results["runs"][0]
    assert run["seq_len"] == 28
    errors = run["grid"][0]["curves"]["test_metric"]
    assert all(0.0 <= e <= 1.0 for e in errors)
