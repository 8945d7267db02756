"""Smoke test of `pathsgd-jax ddp` at tiny sizes, with the invariants it must show."""

import json
import os

import numpy as np

from pathsgd_jax.experiments import cli


def test_ddp_cli_smoke(tmp_path):
    out = tmp_path / "ddp"
    code = cli.main(["ddp", "--train-subset", "200", "--test-subset", "100", "--width", "8",
                     "--epochs", "2", "--batch-size", "50", "--optimizers", "ddp-0.5",
                     "--lr-grids", "ddp-0.5=0.01",
                     "--out", str(out), "--quiet"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert os.path.getsize(out / "ddp.png") > 1000
    runs = {(r["optimizer"], r["init"]): r["curves"] for r in results["runs"]}
    assert len(results["summary"]) == 2
    # DDP-SGD is rescaling invariant: the balanced and unbalanced starts (the same function)
    # give the same curves; and it trains.
    for key in ("train_loss", "test_error"):
        np.testing.assert_allclose(runs["ddp-0.5", "balanced"][key],
                                   runs["ddp-0.5", "unbalanced"][key], rtol=1e-3)
    curves = runs["ddp-0.5", "balanced"]
    assert curves["train_loss"][-1] < results["runs"][0]["grid"][0]["initial"]["train_loss"]


def test_ddp_cli_rejects_bad_grids(capsys):
    import pytest

    with pytest.raises(SystemExit):
        cli.main(["ddp", "--lr-grids", "ddp-2=0.1"])
    assert "OPT=LR" in capsys.readouterr().err
