"""Smoke test of `pathsgd-jax npk` at tiny sizes."""

import json

import numpy as np

from pathsgd_jax.experiments import cli


def test_npk_cli_writes_results_and_figure(tmp_path):
  argv = ["npk", "--dataset", "digits", "--archs", "fc", "--variants", "relu", "flnpf",
          "--width", "8", "--depth", "2", "--epochs", "1", "--lr-grid", "0.03",
          "--train-subset", "200", "--test-subset", "50", "--kernel-examples", "8",
          "--out", str(tmp_path), "--quiet"]
  assert cli.main(argv) == 0
  assert (tmp_path / "npk.png").stat().st_size > 10_000
  with open(tmp_path / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  summary = {s["variant"]: s for s in results["summary"]}
  assert sorted(summary) == ["flnpf", "relu"]
  relu, flnpf = summary["relu"], summary["flnpf"]
  assert len(relu["alignment"]) == 2 and all(-1 <= a <= 1 for a in relu["alignment"])
  # FLNPF runs on the trained ReLU network's gates: the same kernel
  np.testing.assert_allclose(flnpf["frozen_gate_alignment"], relu["alignment"][-1], rtol=1e-6)
  assert "flnpf" in results["table"] and 0 <= relu["test_accuracy"] <= 1
