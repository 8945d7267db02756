"""The feed-forward experiment of the Path-SGD paper (Neyshabur et al., NIPS 2015, Sec. 5).

A fully connected ReLU network trained with softmax cross-entropy at batch size 100 by SGD,
AdaGrad, Adam and Path-SGD (optionally with momentum), from a *balanced* initialisation
(``N(0, 1/fan_in)``, zero biases) and from an *unbalanced* one (the same network after random
node rescalings, so the same function). For each optimizer and initialisation the learning
rate is chosen from a grid by the final validation error on a held-out part of the training
set; the chosen run's per-epoch curves are reported and plotted.

Protocol details (also in ``pathsgd-jax paper --help``):

* every grid point trains for the full ``--epochs`` (the selection budget equals the reported
  budget); runs whose mini-batch loss becomes NaN/inf stop and are discarded;
* the selected run is reported as is (no retraining): its curves are those of the grid run;
* the training loss is the cross-entropy on the *whole* training split (the part not held
  out), evaluated at the end of each epoch with the deterministic network (no dropout); the
  mean of the epoch's mini-batch losses is also stored (``train_loss_running``);
* all runs of a data set use the same mini-batch order and dropout masks, so Path-SGD from
  the balanced and the unbalanced start (the same function) follows the same trajectory in
  function space up to floating-point rounding.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pathsgd_jax import data as data_lib
from pathsgd_jax import init as init_lib
from pathsgd_jax.experiments import common, models, training
from pathsgd_jax.experiments import optimizers as optim_lib

INITS = ("balanced", "unbalanced")


@dataclasses.dataclass
class PaperConfig:
  """Configuration of :func:`run_paper` (the CLI's defaults)."""

  datasets: Sequence[str] = ("mnist5k",)
  data_dir: str | None = None
  width: int = 1000
  depth: int = 2
  epochs: int = 10
  batch_size: int = 100
  optimizers: Sequence[str] = ("sgd", "adagrad", "adam", "path-sgd")
  inits: Sequence[str] = INITS
  lr_grid: Sequence[float] | None = None  # None: optim_lib.DEFAULT_GRIDS.
  lr_grids: dict[str, Sequence[float]] | None = None  # Per-optimizer grids, win over lr_grid.
  dropout: float = 0.0
  seed: int = 0
  val_fraction: float = 0.1
  select_by: str = "val_error"
  momentum: float = optim_lib.MOMENTUM
  unbalance_fraction: float = 0.25
  unbalance_factor: float = 10.0
  unbalance_power_of_two: bool = True  # Exact rescaling; False: the paper's factors.
  train_subset: int | None = None
  test_subset: int | None = None
  steps_per_call: int = 50
  eval_batch: int = 1000
  preset: str | None = None

  def grid_for(self, optimizer: str) -> list[float]:
    if self.lr_grids and optimizer in self.lr_grids:
      return [float(v) for v in self.lr_grids[optimizer]]
    if self.lr_grid:
      return [float(v) for v in self.lr_grid]
    return list(optim_lib.DEFAULT_GRIDS[optimizer])


def _validate(cfg: PaperConfig) -> None:
  for name in cfg.optimizers:
    if name not in optim_lib.OPTIMIZERS:
      raise common.ConfigError(f"Unknown optimizer {name!r}; choose from "
                       f"{', '.join(optim_lib.OPTIMIZERS)}.")
  for name in cfg.inits:
    if name not in INITS:
      raise common.ConfigError(f"Unknown initialisation {name!r}; choose from {', '.join(INITS)}.")
  if not 0.0 <= cfg.dropout < 1.0:
    raise common.ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout}.")
  if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.width < 1 or cfg.depth < 1:
    raise common.ConfigError("--epochs, --batch-size, --width and --depth must be positive.")
  for opt in cfg.optimizers:
    grid = cfg.grid_for(opt)
    if not grid or any(not (v > 0 and math.isfinite(v)) for v in grid):
      raise common.ConfigError(
          f"The learning-rate grid of {opt} must be non-empty, positive and finite, got {grid}.")
  for opt in cfg.lr_grids or {}:
    if opt not in optim_lib.OPTIMIZERS:
      raise common.ConfigError(f"--lr-grids names unknown optimizer {opt!r}; choose from "
                               f"{', '.join(optim_lib.OPTIMIZERS)}.")
  if cfg.select_by not in ("val_error", "val_loss", "train_loss"):
    raise common.ConfigError("--select-by must be val_error, val_loss or train_loss.")


def _subset(x: np.ndarray, y: np.ndarray, n: int | None, seed: int):
  if n is None or n >= len(y):
    return x, y
  idx = np.sort(np.random.default_rng(seed).permutation(len(y))[:n])
  return x[idx], y[idx]


def load_splits(cfg: PaperConfig, name: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                                                      dict[str, Any]]:
  """Flattened train / validation / test splits of data set ``name`` and a description."""
  try:
    ds = data_lib.load(name, cfg.data_dir, flatten=True)
    (x_tr, y_tr), (x_val, y_val) = ds.split_validation(cfg.val_fraction, seed=cfg.seed)
  except (data_lib.DatasetNotFoundError, data_lib.MalformedDatasetError):
    raise
  except ValueError as e:  # Unknown name, bad --val-fraction.
    raise common.ConfigError(str(e)) from e
  x_tr, y_tr = _subset(x_tr, y_tr, cfg.train_subset, cfg.seed)
  x_te, y_te = _subset(ds.x_test, ds.y_test, cfg.test_subset, cfg.seed)
  if cfg.train_subset is not None:
    n_val = max(1, int(round(cfg.val_fraction * cfg.train_subset)))
    x_val, y_val = _subset(x_val, y_val, n_val, cfg.seed)
  splits = {"train": (x_tr, y_tr), "val": (x_val, y_val), "test": (x_te, y_te)}
  info = {"name": ds.name, "num_classes": ds.num_classes, "input_dim": ds.input_dim,
          "n_train": int(len(y_tr)), "n_val": int(len(y_val)), "n_test": int(len(y_te)),
          "n_train_total": int(len(ds.y_train)), "n_test_total": int(len(ds.y_test))}
  return splits, info


def initial_params(cfg: PaperConfig, sizes: list[int]) -> dict[str, Any]:
  """Balanced and unbalanced starts (the same function) from ``cfg.seed``.

  :func:`pathsgd_jax.init.balanced_init` draws the balanced network; the unbalanced one is
  :func:`pathsgd_jax.init.unbalanced_init` of it (random node rescalings). Evaluated eagerly
  (a jitted version may differ in the last bit, which would change recorded results).
  """
  key_shape, key_bal, key_unbal = jax.random.split(jax.random.key(cfg.seed), 3)
  template = models.mlp_init(key_shape, sizes)
  balanced = init_lib.balanced_init(key_bal, template)
  out = {"balanced": balanced}
  if "unbalanced" in cfg.inits:
    out["unbalanced"] = init_lib.unbalanced_init(
        key_unbal, balanced, fraction=cfg.unbalance_fraction, factor=cfg.unbalance_factor,
        power_of_two=cfg.unbalance_power_of_two)
  return out


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def run_paper(cfg: PaperConfig, *, progress: bool = False, log=print) -> dict:
  """Runs the experiment and returns the results dictionary written to ``results.json``."""
  _validate(cfg)
  t_start = time.perf_counter()
  results: dict[str, Any] = {
      "command": "paper",
      "config": dataclasses.asdict(cfg),
      "grids": {o: cfg.grid_for(o) for o in cfg.optimizers},
      "protocol": {
          "selection": f"final {cfg.select_by} after {cfg.epochs} epochs (every grid point "
                       "trains the full budget); diverged (NaN/inf) runs discarded; ties to "
                       "lower final training loss then larger learning rate",
          "train_loss": "cross-entropy on the whole training split (validation part held "
                        "out), deterministic network, evaluated at the end of each epoch",
          "train_loss_running": "mean mini-batch loss of the epoch (with dropout if used)",
          "errors": "fraction of misclassified examples",
          "learning_rate": "optimizers built at lr=1 with updates scaled by a traced lr; "
                           "all compared optimizers are linear in lr",
      },
      "environment": common.environment(),
      "datasets": {},
      "runs": [],
  }
  for ds_name in cfg.datasets:
    t_data = time.perf_counter()
    splits, info = load_splits(cfg, ds_name)
    info["load_time_s"] = time.perf_counter() - t_data
    results["datasets"][info["name"]] = info
    sizes = models.mlp_sizes(info["input_dim"], cfg.width, cfg.depth, info["num_classes"])
    info["layer_sizes"] = sizes
    log(f"[paper] {info['name']}: {info['n_train']} train / {info['n_val']} validation / "
        f"{info['n_test']} test, MLP {'-'.join(map(str, sizes))}, batch {cfg.batch_size}, "
        f"{cfg.epochs} epochs")
    starts = initial_params(cfg, sizes)
    x_train = jnp.asarray(splits["train"][0])
    y_train = jnp.asarray(splits["train"][1])
    evals = {s: training.EvalData.build(*splits[s], batch=cfg.eval_batch)
             for s in ("train", "val", "test")}
    evaluate = training.make_evaluator(models.mlp_forward)
    example = jnp.zeros((cfg.batch_size, info["input_dim"]), jnp.float32)

    def apply_train(params, x, key):
      if cfg.dropout > 0:
        return models.mlp_apply(params, x, dropout_rate=cfg.dropout, dropout_key=key)
      return models.mlp_forward(params, x)

    dropout_key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    steps_per_epoch = info["n_train"] // cfg.batch_size
    chunk = training.chunk_steps(steps_per_epoch, cfg.steps_per_call)
    for opt_name in cfg.optimizers:
      tx = optim_lib.make_optimizer(opt_name, models.mlp_forward, example,
                                     momentum=cfg.momentum)
      jitted = training.make_train_chunk(apply_train, tx)
      compiled = None
      compile_time = None
      for init_name in cfg.inits:
        params0 = starts[init_name]
        grid_runs = []
        t_grid = time.perf_counter()
        for lr in cfg.grid_for(opt_name):
          params = _copy(params0)
          opt_state = tx.init(params)
          if compiled is None:
            t0 = time.perf_counter()
            idx = jnp.zeros((chunk, cfg.batch_size), jnp.int32)
            compiled = jitted.lower(params, opt_state, jnp.float32(lr), dropout_key, x_train,
                                    y_train, idx, jnp.zeros((chunk,), jnp.int32)).compile()
            compile_time = time.perf_counter() - t0
          run = training.train_run(
              chunk_fn=compiled, evaluate=evaluate, params=params, opt_state=opt_state, lr=lr,
              x_train=x_train, y_train=y_train, evals=evals, epochs=cfg.epochs,
              batch_size=cfg.batch_size, seed=cfg.seed, steps_per_call=chunk,
              dropout_key=dropout_key, progress=progress,
              desc=f"{info['name']}/{init_name}/{opt_name} lr={common.lr_label(lr)}")
          grid_runs.append(run)
          status = (f"diverged at epoch {run.stopped_at_epoch}" if run.diverged else
                    f"train loss {common.fmt(run.final('train_loss'))}, val error "
                    f"{common.fmt(run.final('val_error'))}, test error "
                    f"{common.fmt(run.final('test_error'))}")
          log(f"[paper] {info['name']:>13} {init_name:>10} {opt_name:>17} "
              f"lr={common.lr_label(lr):>6}: {status} ({run.train_time_s:.1f}s train, "
              f"{run.examples_per_s:.0f} ex/s)")
        chosen = training.select(grid_runs, cfg.select_by)
        by_train = training.select(grid_runs, "train_loss")
        results["runs"].append({
            "dataset": info["name"],
            "init": init_name,
            "optimizer": opt_name,
            "chosen_index": chosen,
            "chosen_lr": None if chosen is None else grid_runs[chosen].lr,
            "chosen_lr_by_train_loss": None if by_train is None else grid_runs[by_train].lr,
            "curves": (grid_runs[chosen].curves if chosen is not None else
                       {k: [None] * cfg.epochs for k in grid_runs[0].curves}),
            "initial": grid_runs[0].initial,
            "grid": [r.as_dict() for r in grid_runs],
            "compile_time_s": compile_time,
            "wall_time_s": time.perf_counter() - t_grid,
        })
        compile_time = 0.0  # Reported once per optimizer and data set.
  results["summary"] = summary_rows(results, "chosen_index")
  results["summary_by_train_loss"] = summary_rows(results, "by_train_loss")
  results["wall_time_s"] = time.perf_counter() - t_start
  return results


def summary_rows(results: dict, which: str = "chosen_index") -> list[dict]:
  """One row per data set x initialisation x optimizer.

  ``which="chosen_index"`` uses the run selected by the configured criterion (validation
  error by default); ``"by_train_loss"`` the run with the lowest final training loss.
  """
  rows = []
  for run in results["runs"]:
    if which == "chosen_index":
      idx = run["chosen_index"]
    else:
      lrs = [g["lr"] for g in run["grid"]]
      lr = run["chosen_lr_by_train_loss"]
      idx = None if lr is None else lrs.index(lr)
    g = None if idx is None else run["grid"][idx]

    def last(key, g=g):
      if g is None:
        return None
      v = g["curves"][key][-1]
      return v

    rows.append({"dataset": run["dataset"], "init": run["init"],
                 "optimizer": run["optimizer"], "lr": None if g is None else g["lr"],
                 "train_loss": last("train_loss"), "val_error": last("val_error"),
                 "test_error": last("test_error")})
  return rows


def format_summary(rows: list[dict]) -> str:
  headers = ["dataset", "init", "optimizer", "chosen lr", "final train loss",
             "final val error", "final test error"]
  body = [[r["dataset"], r["init"], r["optimizer"],
           "diverged" if r["lr"] is None else common.lr_label(r["lr"]),
           common.fmt(r["train_loss"]), common.fmt(r["val_error"]),
           common.fmt(r["test_error"])] for r in rows]
  return common.table(headers, body)
