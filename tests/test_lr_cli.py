"""Smoke test of ``pathsgd-jax lr`` at tiny sizes: files, the promised first step, --merge."""

import json

import numpy as np
import pytest

from pathsgd_jax.experiments import cli

TINY = ["--mlp-width", "8", "--steps", "2", "--n-train", "64", "--batch-size", "32",
        "--grid", "0.1", "--sgd-grid", "0.1", "--other-targets", "--quiet"]


def _run(out, *models):
  assert cli.main(["lr", "--models", *models, *TINY, "--out", str(out)]) == 0
  with open(out / "results.json", encoding="utf-8") as f:
    return json.load(f)


def test_lr_cli_runs_merges_and_keeps_its_promises(tmp_path):
  a = _run(tmp_path / "a", "mlp-unbalanced")
  assert (tmp_path / "a" / "lr.png").stat().st_size > 10_000
  for m in a["models"]:
    rule = next(r for r in m["runs"] if r["rule"])
    assert rule["target"] == 0.3 and not rule["diverged"]
    np.testing.assert_allclose(rule["first_relative_step"], 0.3 * (1 - 0.9), rtol=1e-4)
    assert [r["optimizer"] for r in m["runs"]] == ["path-sgd", "path-sgd", "sgd"]
  # --merge joins runs of the same options; the table rows follow the parts' order.
  b = {**a, "models": [{**a["models"][0], "model": "mlp-balanced"}]}
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "results.json").write_text(json.dumps(b))
  assert cli.main(["lr", "--merge", str(tmp_path / "b"), str(tmp_path / "a"), "--out",
                   str(tmp_path / "m"), "--quiet"]) == 0
  merged = json.loads((tmp_path / "m" / "results.json").read_text())
  assert [r["model"] for r in merged["summary"]] == ["mlp-balanced", "mlp-unbalanced"]
  b["config"] = {**b["config"], "steps": 3}
  (tmp_path / "b" / "results.json").write_text(json.dumps(b))
  assert cli.main(["lr", "--merge", str(tmp_path / "b"), str(tmp_path / "a"), "--out",
                   str(tmp_path / "m")]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--models", "vgg"], "invalid choice"),
])
def test_lr_cli_rejects_unknown_models(argv, message, capsys):
  with pytest.raises(SystemExit):
    cli.main(["lr", *argv])
  assert message in capsys.readouterr().err
