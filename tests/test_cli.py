"""Smoke tests of the ``pathsgd-jax`` command line (tiny settings, seconds each)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathsgd_jax.experiments import bench, cli, plotting, training

EPOCHS = 2
GRID = ["0.1", "0.01"]


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("paper")
  argv = ["paper", "--dataset", "digits", "--width", "16", "--epochs", str(EPOCHS),
          "--optimizers", "sgd", "path-sgd", "--lr-grid", *GRID, "--dropout", "0.2",
          "--out", str(out), "--quiet"]
  code = cli.main(argv)
  with open(out / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  return code, out, results


def test_paper_exit_code_and_files(paper_run):
  code, out, results = paper_run
  assert code == 0
  assert (out / "paper.png").stat().st_size > 10_000
  assert results["figures"] == ["paper.png"]


def test_paper_results_hold_configuration(paper_run):
  _, _, results = paper_run
  cfg = results["config"]
  assert cfg["datasets"] == ["digits"]
  assert (cfg["width"], cfg["depth"], cfg["epochs"], cfg["batch_size"]) == (16, 2, EPOCHS, 100)
  assert cfg["optimizers"] == ["sgd", "path-sgd"]
  assert cfg["inits"] == ["balanced", "unbalanced"]
  assert cfg["dropout"] == 0.2
  assert cfg["lr_grid"] == [float(v) for v in GRID]
  env = results["environment"]
  for pkg in ("jax", "jaxlib", "optax", "flax", "numpy"):
    assert env["versions"][pkg]
  assert env["python"] and env["platform"] and env["devices"]
  assert results["datasets"]["digits"]["layer_sizes"] == [64, 16, 16, 10]
  assert results["wall_time_s"] > 0


def test_paper_curves_have_one_value_per_epoch(paper_run):
  _, _, results = paper_run
  assert len(results["runs"]) == 4  # 2 optimizers x 2 inits.
  for run in results["runs"]:
    assert run["chosen_lr"] in [float(v) for v in GRID]
    assert run["curves"]["epoch"] == list(range(1, EPOCHS + 1))
    for key in ("train_loss", "test_error", "val_error", "train_loss_running", "time_s"):
      assert len(run["curves"][key]) == EPOCHS, key
    assert len(run["grid"]) == len(GRID)
    for g in run["grid"]:
      assert len(g["curves"]["train_loss"]) == EPOCHS
    chosen = run["grid"][run["chosen_index"]]
    assert chosen["curves"] == run["curves"]
  assert len(results["summary"]) == 4


def test_paper_path_sgd_is_rescaling_invariant(paper_run):
  """README: balanced and unbalanced Path-SGD runs are "bit-for-bit the same".

  Same batches and dropout masks; the unbalanced start is the balanced network rescaled by
  powers of two, so every stored curve of every learning rate is identical (only wall times
  differ). Mutation caught: the old check (training loss at rtol=1e-3) let curves that
  differ in the last bits, or a different test/validation error, through.
  """
  _, _, results = paper_run
  runs = {(r["init"], r["optimizer"]): r for r in results["runs"]}
  assert results["config"]["unbalance_power_of_two"] is True
  bal, unbal = runs["balanced", "path-sgd"], runs["unbalanced", "path-sgd"]
  assert bal["chosen_lr"] == unbal["chosen_lr"]

  def curves(run):
    return {k: v for k, v in run["curves"].items() if k != "time_s"}

  assert set(curves(bal)) >= {"train_loss", "test_error", "val_error", "train_loss_running"}
  assert curves(bal) == curves(unbal)
  assert [g["lr"] for g in bal["grid"]] == [g["lr"] for g in unbal["grid"]]
  for g_bal, g_unbal in zip(bal["grid"], unbal["grid"], strict=True):
    assert curves(g_bal) == curves(g_unbal), g_bal["lr"]
  # SGD is not invariant: its unbalanced curves differ (the comparison can fail).
  sgd_bal, sgd_unbal = runs["balanced", "sgd"], runs["unbalanced", "sgd"]
  assert sgd_bal["grid"][0]["curves"]["train_loss"] != sgd_unbal["grid"][0]["curves"]["train_loss"]


def test_paper_figure_plots_the_json_curves(paper_run):
  _, _, results = paper_run
  fig = plotting.plot_paper(results)
  lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()}
  assert len(fig.axes) == 4  # (training loss, test error) x (balanced, unbalanced).
  for run in results["runs"]:
    for key in ("train_loss", "test_error"):
      line = lines[f"{run['dataset']}/{run['init']}/{run['optimizer']}/{key}"]
      np.testing.assert_array_equal(line.get_xdata(), run["curves"]["epoch"])
      np.testing.assert_array_equal(line.get_ydata(), run["curves"][key])
  assert fig.axes[0].get_yscale() == "log"


def test_paper_missing_dataset_is_a_clean_error(tmp_path, capsys):
  code = cli.main(["paper", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out",
                   str(tmp_path / "o"), "--quiet"])
  assert code == 2
  assert "CIFAR-10" in capsys.readouterr().err


def test_bench_cli_tiny(tmp_path):
  code = cli.main(["bench", "--mlp-sizes", "12", "16", "4", "--cnn-channels", "2", "3",
                   "--image-size", "8", "--batch", "4", "--repeats", "3", "--warmup", "1",
                   "--refresh-every", "1", "2", "--out", str(tmp_path), "--quiet"])
  assert code == 0
  assert (tmp_path / "bench.png").exists()
  with open(tmp_path / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  assert results["config"]["refresh_every"] == [1, 2]
  assert set(results["networks"]) == {"mlp", "cnn"}
  for net in results["networks"].values():
    assert net["number"] == 2  # lcm of the refresh periods.
    assert set(net["variants"]) == {"sgd", "adagrad", "adam", "path-sgd (refresh 1)",
                                    "path-sgd (refresh 2)"}
    sgd = net["variants"]["sgd"]
    assert sgd["ratio_to_sgd"] == sgd["ratio_to_sgd_paired"] == sgd["ratio_to_sgd_min"] == 1.0
    assert sgd["compile_ratio_to_sgd"] == 1.0
    for v in net["variants"].values():
      assert len(v["times_s"]) == 3 and v["median_s"] > 0
      assert v["memory"]["peak_estimate"] > 0
      assert 0 < v["trace_time_s"] < v["compile_time_s"]
      assert v["compile_time_s"] == pytest.approx(v["trace_time_s"] + v["xla_compile_time_s"])
  assert results["environment"]["versions"]["jax"]


def test_bench_compile_only(tmp_path):
  """--repeats 0 compiles and sizes every variant without timing steps."""
  code = cli.main(["bench", "--networks", "mlp", "--mlp-sizes", "6", "5", "3", "--batch", "2",
                   "--repeats", "0", "--refresh-every", "1", "--out", str(tmp_path), "--quiet"])
  assert code == 0
  with open(tmp_path / "results.json", encoding="utf-8") as f:
    (net,) = json.load(f)["networks"].values()
  for v in net["variants"].values():
    assert "median_s" not in v and v["compile_time_s"] > 0 and v["memory"]["peak_estimate"] > 0
  assert "kappa_bandwidth_floor" not in net


def test_bench_resnets_are_resnet_v1_5():
  """The benchmark's ResNets: parameter counts of ResNet v1.5 (CIFAR stem, 10 classes)."""
  from pathsgd_jax.experiments import resnets  # pylint: disable=g-import-not-at-top

  counts = {}
  for depth in (18, 50):  # shapes only: abstract evaluation
    model = resnets.ResNet(depth, classes=10, small_images=True)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    counts[depth] = sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
    logits = jax.eval_shape(model.apply, variables, jnp.ones((2, 8, 8, 3)))
    assert logits.shape == (2, 10)
  # Known sizes of these architectures with a 3x3 stem and a 10-way head (BatchNorm scales
  # and biases included): 11,173,962 and 23,520,842.
  assert counts == {18: 11_173_962, 50: 23_520_842}


def test_time_interleaved_counts_and_orders():
  calls = []
  out = bench.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               repeats=4, warmup=1, number=2)
  assert len(calls) == 10
  assert calls[:4] == ["a", "b", "b", "a"]  # Order rotates between repeats.
  assert all(len(v["times_s"]) == 4 for v in out.values())


def test_select_discards_diverged_runs():
  def run(lr, val, diverged=False):
    return training.RunResult(lr=lr, diverged=diverged,
                              curves={"val_error": [val], "train_loss": [1.0]}, initial={},
                              train_time_s=1.0, eval_time_s=0.0, examples_per_s=1.0)

  runs = [run(1.0, 0.01, diverged=True), run(0.1, 0.2), run(0.01, 0.1), run(0.001, float("nan"))]
  assert training.select(runs) == 2
  assert training.select([runs[0], runs[3]]) is None


def test_module_entry_point_help():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "pathsgd_jax", "paper", "--help"],
                        capture_output=True, text=True, env=env, timeout=60, check=False)
  assert proc.returncode == 0
  assert "mnist5k" in proc.stdout and "--lr-grid" in proc.stdout and "--preset" in proc.stdout


def test_depth_and_rnn_subcommands(tmp_path):
  """The depth and rnn experiments are reachable through the console script's parser."""
  from pathsgd_jax.experiments import cli  # pylint: disable=g-import-not-at-top

  assert cli.main(["depth", "--depths", "2", "3", "--steps", "40", "--width", "8",
                   "--learning-rates", "1e-2", "--sgd-learning-rates", "0.5",
                   "--trains-below", "0.9", "--out", str(tmp_path / "depth"), "--quiet"]) == 0
  assert (tmp_path / "depth" / "depth.png").exists()
  with open(tmp_path / "depth" / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  runs = {(r["optimizer"], r["depth"]): r for r in results["runs"]}
  assert set(runs) == {(o, d) for o in ("sgd", "path-sgd normalize", "path-sgd raw")
                       for d in (2, 3)}
  # The raw grid is the normalised one times φ²(θ₀) of the shallowest net: same first step.
  phi2 = 2.0 ** results["networks"]["2"]["log2_path_norm_squared"]
  assert results["grids"]["path-sgd raw"][0] == pytest.approx(1e-2 * phi2)
  assert runs["path-sgd raw", 2]["first_relative_step"] == pytest.approx(
      runs["path-sgd normalize", 2]["first_relative_step"], rel=1e-4)
  for run in results["runs"]:
    start = results["networks"][str(run["depth"])]["loss_at_start"]
    assert run["relative_loss"] == pytest.approx(run["final_train_loss"] / start)
    assert run["trains"] == (run["relative_loss"] <= 0.9)
  every = {name: [r["learning_rate"] for r in results["runs"] if r["optimizer"] == name]
           for name in ("sgd", "path-sgd normalize", "path-sgd raw")}
  expected = {name: [lr for lr in set(lrs) if all(
      r["trains"] for r in results["runs"] if r["optimizer"] == name and
      r["learning_rate"] == lr)] for name, lrs in every.items()}
  assert results["learning_rates_training_every_depth"] == expected
  assert results["learning_rates_training_every_depth"]["path-sgd normalize"] == [1e-2]
  assert cli.main(["depth", "--depths", "1", "--out", str(tmp_path / "bad")]) == 2
  assert cli.main(["rnn", "--task", "mnist-row", "--hidden", "8", "--batch-size", "32",
                   "--steps", "10", "--eval-every", "10", "--steps-per-call", "10",
                   "--lr-grid", "0.01", "--optimizers", "path-sgd",
                   "--out", str(tmp_path / "rnn"), "--quiet"]) == 0
  assert (tmp_path / "rnn" / "rnn.png").exists()
