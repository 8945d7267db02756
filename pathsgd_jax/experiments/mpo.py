"""MPO-compressed networks trained in the path geometry (Gao et al., PRR 2020; ``pathsgd-jax mpo``).

Two networks, each with its fully connected layers as :class:`pathsgd_jax.mpo.MPODense` at bond
dimensions ``--bond-dims`` (and the dense network as baseline), trained by SGD + momentum,
Path-SGD + momentum and Adam from a random start and from an unbalanced-gauge start; test
accuracy against the compression ratio (parameters of the whole network / the dense one's).

* ``fc2``: the paper's FC2, 784-256-10. 784 x 256 as ``(4, 7, 7, 4) x (4, 4, 4, 4)``;
  256 x 10 as ``(4, 4, 4, 4) x (1, 10, 1, 1)``.
* ``lenet5``: conv 5x5 (6) -> ReLU -> 2x2 average pool -> conv 5x5 (16) -> ReLU -> 2x2
  average pool (28x28 -> 4x4x16 = 256) -> FC 256-120-84-10, the FC layers as MPOs:
  256 x 120 as ``(4, 4, 4, 4) x (2, 3, 5, 4)``, 120 x 84 as ``(2, 3, 5, 4) x (2, 3, 7, 2)``,
  84 x 10 as ``(2, 3, 7, 2) x (1, 10, 1, 1)``; the convolutions stay dense. (The paper's
  LeNet-5 differs in widths; average pooling keeps the path network exact.)

Starts. ``random``: MPO cores by the layer's rule (``Var W_ij = 1/fan_in``), dense layers and
convolutions Flax's LeCun normal, zero biases. ``unbalanced``: the same function, every inner
bond of every MPO layer gauged by ``g = 2^round(log2 exp(σ z))``, ``z ~ N(0, 1)``
(``σ = --gauge-sigma``; powers of two keep the function exact in floating point); the dense
baseline instead rescales every hidden unit of its FC layers by the same law (incoming
weights and bias x g, outgoing / g). Learning rates: per optimizer and start, the grid point
with the lowest final validation error (10% of the training split held out); all runs share
the mini-batch order.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import pathsgd_jax as psgd
from pathsgd_jax import data as data_lib
from pathsgd_jax import mpo
from pathsgd_jax.experiments import common, training
from pathsgd_jax.experiments import optimizers as optim_lib

MODELS = ("fc2", "lenet5")
INITS = ("random", "unbalanced")
OPTIMIZERS = ("sgd-momentum", "path-sgd-momentum", "adam")

#: FC layers of each model: (in_modes, out_modes).
FACTORISATIONS = {
    "fc2": (((4, 7, 7, 4), (4, 4, 4, 4)), ((4, 4, 4, 4), (1, 10, 1, 1))),
    "lenet5": (((4, 4, 4, 4), (2, 3, 5, 4)), ((2, 3, 5, 4), (2, 3, 7, 2)),
               ((2, 3, 7, 2), (1, 10, 1, 1))),
}

#: Default learning-rate grids (small: the CPU default run; widen with --lr-grids).
DEFAULT_GRIDS = {
    "sgd-momentum": (0.1, 0.01, 0.001),
    "path-sgd-momentum": (0.01, 0.001, 0.0001),
    "adam": (0.01, 0.001, 0.0001),
}

#: The authors' numbers on full MNIST (Gao et al. 2020), for context only.
PAPER_REFERENCE = {
    "fc2": "98.35% test accuracy at D = 16 with under 8% of the parameters (dense baseline)",
    "lenet5": "99.17% test accuracy at about 5% of the parameters",
}


@dataclasses.dataclass
class MPOConfig:
  """Configuration of :func:`run_mpo` (the CLI's defaults)."""

  dataset: str = "mnist5k"
  data_dir: str | None = None
  models: Sequence[str] = MODELS
  bond_dims: Sequence[int] = (2, 4, 8, 16)
  dense: bool = True
  optimizers: Sequence[str] = OPTIMIZERS
  inits: Sequence[str] = INITS
  lr_grids: dict[str, Sequence[float]] | None = None
  epochs: int = 5
  batch_size: int = 100
  gauge_sigma: float = 2.0
  seed: int = 0
  val_fraction: float = 0.1
  train_subset: int | None = None
  steps_per_call: int = 45
  out: str = os.path.join("runs", "mpo")
  progress: bool = False

  def grid_for(self, optimizer: str) -> list[float]:
    if self.lr_grids and optimizer in self.lr_grids:
      return [float(v) for v in self.lr_grids[optimizer]]
    return list(DEFAULT_GRIDS[optimizer])


class Net(nn.Module):
  """FC2 or LeNet-5 with MPO (``bond_dim``) or dense (``bond_dim=None``) FC layers."""

  model: str
  bond_dim: int | None

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    if self.model == "lenet5":
      h = x.reshape(x.shape[0], 28, 28, 1)
      for i, channels in enumerate((6, 16)):
        h = nn.Conv(channels, (5, 5), padding="VALID", name=f"conv{i}")(h)
        h = nn.avg_pool(nn.relu(h), (2, 2), (2, 2))
      x = h.reshape(h.shape[0], -1)
    layers = FACTORISATIONS[self.model]
    for i, (in_modes, out_modes) in enumerate(layers):
      features = math.prod(out_modes)
      if self.bond_dim is None:
        x = nn.Dense(features, name=f"fc{i}")(x)
      else:
        x = mpo.MPODense(features, in_modes, out_modes, self.bond_dim, name=f"fc{i}")(x)
      if i < len(layers) - 1:
        x = nn.relu(x)
    return x


def _pow2(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
  return 2.0 ** np.round(sigma * rng.standard_normal(size) / math.log(2.0))


def unbalance(params: dict, model: str, bond_dim: int | None, sigma: float, seed: int) -> dict:
  """The same function with large power-of-two gauge factors (see the module docstring)."""
  rng = np.random.default_rng((seed, 17))
  params = jax.tree.map(np.asarray, params)
  fcs = [f"fc{i}" for i in range(len(FACTORISATIONS[model]))]
  out = dict(params)
  if bond_dim is not None:
    for name in fcs:
      layer = dict(params[name])
      cores = [layer[f"core_{k}"] for k in range(len(FACTORISATIONS[model][0][0]))]
      scales = [_pow2(rng, c.shape[3], sigma) for c in cores[:-1]]
      for k, c in enumerate(mpo.gauge(cores, scales)):
        layer[f"core_{k}"] = np.asarray(c)
      out[name] = layer
  else:
    for left, right in zip(fcs[:-1], fcs[1:]):
      g = _pow2(rng, params[left]["bias"].shape[0], sigma).astype(np.float32)
      out[left] = {"kernel": out[left]["kernel"] * g[None, :], "bias": out[left]["bias"] * g}
      out[right] = dict(params[right], kernel=params[right]["kernel"] / g[:, None])
  return jax.tree.map(jnp.asarray, out)


def count(params) -> int:
  return sum(int(np.size(v)) for v in jax.tree.leaves(params))


def _validate(cfg: MPOConfig) -> None:
  for name, given, allowed in (("model", cfg.models, MODELS), ("init", cfg.inits, INITS),
                               ("optimizer", cfg.optimizers, OPTIMIZERS)):
    for v in given:
      if v not in allowed:
        raise common.ConfigError(f"Unknown {name} {v!r}; choose from {', '.join(allowed)}.")
  if any(d < 1 for d in cfg.bond_dims):
    raise common.ConfigError(f"--bond-dims must be >= 1, got {list(cfg.bond_dims)}.")
  if cfg.epochs < 1 or cfg.batch_size < 1:
    raise common.ConfigError("--epochs and --batch-size must be positive.")
  if not cfg.gauge_sigma >= 0:
    raise common.ConfigError(f"--gauge-sigma must be >= 0, got {cfg.gauge_sigma}.")
  for opt in cfg.lr_grids or {}:
    if opt not in OPTIMIZERS:
      raise common.ConfigError(f"--lr-grids names unknown optimizer {opt!r}.")


def _splits(cfg: MPOConfig):
  try:
    ds = data_lib.load(cfg.dataset, cfg.data_dir, flatten=True)
  except ValueError as e:
    if isinstance(e, data_lib.MalformedDatasetError):
      raise
    raise common.ConfigError(str(e)) from e
  if ds.x_train.shape[1] != 784:
    raise common.ConfigError(f"The mpo experiment needs 28x28 images (784 inputs); "
                             f"{ds.name} has {ds.x_train.shape[1]}. Use mnist5k or "
                             "fashion_mnist.")
  (x_tr, y_tr), (x_val, y_val) = ds.split_validation(cfg.val_fraction, seed=cfg.seed)
  if cfg.train_subset is not None:
    x_tr, y_tr = x_tr[:cfg.train_subset], y_tr[:cfg.train_subset]
    x_val, y_val = x_val[:max(1, cfg.train_subset // 9)], y_val[:max(1, cfg.train_subset // 9)]
  return ds.name, {"train": (x_tr, y_tr), "val": (x_val, y_val),
                   "test": (ds.x_test, ds.y_test)}


def run_mpo(cfg: MPOConfig, log=print) -> dict:
  """Runs the study, writes ``results.json`` and ``mpo.png`` to ``cfg.out``, returns results."""
  _validate(cfg)
  t_start = time.perf_counter()
  name, splits = _splits(cfg)
  x_train, y_train = (jnp.asarray(a) for a in splits["train"])
  evals = {s: training.EvalData.build(*splits[s]) for s in ("train", "val", "test")}
  example = jnp.zeros((cfg.batch_size, 784), jnp.float32)
  steps_per_epoch = len(splits["train"][1]) // cfg.batch_size
  chunk = training.chunk_steps(steps_per_epoch, cfg.steps_per_call)
  key = jax.random.key(cfg.seed)
  results: dict[str, Any] = {
      "command": "mpo", "config": dataclasses.asdict(cfg), "dataset": name,
      "n": {s: int(len(v[1])) for s, v in splits.items()},
      "factorisations": {m: [list(map(list, f)) for f in FACTORISATIONS[m]] for m in MODELS},
      "grids": {o: cfg.grid_for(o) for o in cfg.optimizers},
      "paper_reference_full_mnist": PAPER_REFERENCE, "environment": common.environment(),
      "architectures": [], "runs": []}
  bonds = ([None] if cfg.dense else []) + list(cfg.bond_dims)
  for model_name in cfg.models:
    dense_count = count(Net(model_name, None).init(key, example[:1])["params"])
    for bond in bonds:
      net = Net(model_name, bond)
      params0 = net.init(key, example[:1])["params"]
      starts = {"random": params0}
      if "unbalanced" in cfg.inits:
        starts["unbalanced"] = unbalance(params0, model_name, bond, cfg.gauge_sigma, cfg.seed)
      arch = {"model": model_name, "bond_dim": bond, "params": count(params0),
              "compression": count(params0) / dense_count,
              "path_norm": float(psgd.path_norm(psgd.linen.apply_fn(net), params0, example))}
      results["architectures"].append(arch)
      label = "dense" if bond is None else f"D={bond}"
      log(f"[mpo] {name} {model_name} {label}: {arch['params']} parameters "
          f"({100 * arch['compression']:.2f}% of dense)")
      forward = lambda p, x, net=net: net.apply({"params": p}, x)  # noqa: E731
      evaluate = training.make_evaluator(forward)
      for opt_name in cfg.optimizers:
        tx = optim_lib.make_optimizer(opt_name, psgd.linen.apply_fn(net), example)
        compiled = training.make_train_chunk(lambda p, x, k, f=forward: f(p, x), tx)
        for init_name in cfg.inits:
          grid = []
          for lr in cfg.grid_for(opt_name):
            params = jax.tree.map(jnp.copy, starts[init_name])
            run = training.train_run(
                chunk_fn=compiled, evaluate=evaluate, params=params,
                opt_state=tx.init(params), lr=lr, x_train=x_train, y_train=y_train,
                evals=evals, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                steps_per_call=chunk, dropout_key=key, progress=cfg.progress,
                desc=f"{model_name}/{label}/{opt_name}/{init_name} lr={lr:g}")
            grid.append(run)
            log(f"[mpo]   {opt_name:>17} {init_name:>10} lr={common.lr_label(lr):>6}: "
                + ("diverged" if run.diverged else
                   f"val error {common.fmt(run.final('val_error'))}, test error "
                   f"{common.fmt(run.final('test_error'))}") + f" ({run.train_time_s:.1f}s)")
          chosen = training.select(grid, "val_error")
          best = None if chosen is None else grid[chosen]
          results["runs"].append({
              **arch, "optimizer": opt_name, "init": init_name,
              "chosen_lr": None if best is None else best.lr,
              "val_error": None if best is None else best.final("val_error"),
              "test_error": None if best is None else best.final("test_error"),
              "train_loss": None if best is None else best.final("train_loss"),
              "grid": [r.as_dict() for r in grid]})
  results["wall_time_s"] = time.perf_counter() - t_start
  os.makedirs(cfg.out, exist_ok=True)
  from pathsgd_jax.experiments import plotting  # pylint: disable=g-import-not-at-top
  plotting.save_figure(plot_mpo(results), os.path.join(cfg.out, "mpo.png"))
  results["figures"] = ["mpo.png"]
  common.write_json(os.path.join(cfg.out, "results.json"), results)
  log("")
  log(format_mpo(results))
  log(f"\nWrote {os.path.join(cfg.out, 'results.json')} and mpo.png "
      f"({results['wall_time_s']:.0f}s)")
  return results


def format_mpo(results: dict) -> str:
  """Test accuracy (%) per architecture (rows) and optimizer x start (columns)."""
  runs = results["runs"]
  cols = []
  for r in runs:
    if (r["optimizer"], r["init"]) not in cols:
      cols.append((r["optimizer"], r["init"]))
  headers = ["model", "D", "params", "ratio"] + [
      f"{optim_lib.LABELS[o]} ({i})" for o, i in cols]
  rows = []
  for arch in results["architectures"]:
    row = [arch["model"], "dense" if arch["bond_dim"] is None else arch["bond_dim"],
           arch["params"], f"{100 * arch['compression']:.2f}%"]
    for o, i in cols:
      match = [r for r in runs if r["model"] == arch["model"] and r["bond_dim"] ==
               arch["bond_dim"] and r["optimizer"] == o and r["init"] == i]
      err = match[0]["test_error"] if match else None
      row.append("-" if err is None else f"{100 * (1 - err):.2f} ({common.lr_label(match[0]['chosen_lr'])})")
    rows.append(row)
  return common.table(headers, rows)


def plot_mpo(results: dict):
  """Test accuracy against compression ratio, one panel per model."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  models = list(dict.fromkeys(a["model"] for a in results["architectures"]))
  fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
  colors = {"sgd-momentum": "tab:blue", "path-sgd-momentum": "tab:red", "adam": "tab:green"}
  for ax, model in zip(axes[0], models):
    for opt in dict.fromkeys(r["optimizer"] for r in results["runs"]):
      for init, style in (("random", "-o"), ("unbalanced", "--s")):
        rs = sorted((r for r in results["runs"] if r["model"] == model and
                     r["optimizer"] == opt and r["init"] == init), key=lambda r: r["compression"])
        # Diverged runs (no learning rate trained) break the line instead of being skipped.
        pts = [(r["compression"], math.nan if r["test_error"] is None else
                100 * (1 - r["test_error"])) for r in rs]
        if any(math.isfinite(y) for _, y in pts):
          ax.plot(*zip(*pts), style, color=colors.get(opt), ms=4,
                  label=f"{optim_lib.LABELS[opt]} ({init})")
    ax.set_xscale("log")
    ax.set_xlabel("parameters / dense network's")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model} on {results['dataset']}")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  return fig


def _grids(text: str) -> tuple[str, list[float]]:
  name, _, values = text.partition("=")
  try:
    return name, [float(v) for v in values.split(",") if v]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected OPT=LR,LR,..., got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
  d = MPOConfig()
  parser.add_argument("--dataset", default=d.dataset, help="mnist5k (default) or fashion_mnist")
  parser.add_argument("--data-dir", default=None, help="directory of file-based data sets")
  parser.add_argument("--models", nargs="+", default=list(d.models), choices=MODELS)
  parser.add_argument("--bond-dims", nargs="+", type=int, default=list(d.bond_dims))
  parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
  parser.add_argument("--optimizers", nargs="+", default=list(d.optimizers), choices=OPTIMIZERS)
  parser.add_argument("--inits", nargs="+", default=list(d.inits), choices=INITS)
  parser.add_argument("--lr-grids", nargs="+", type=_grids, metavar="OPT=LR,LR",
                      help=f"per-optimizer grids (default {DEFAULT_GRIDS})")
  parser.add_argument("--epochs", type=int, default=d.epochs)
  parser.add_argument("--batch-size", type=int, default=d.batch_size)
  parser.add_argument("--gauge-sigma", type=float, default=d.gauge_sigma,
                      help="log-normal σ of the unbalanced start's gauge factors")
  parser.add_argument("--train-subset", type=int, default=None,
                      help="use only this many training examples (smoke tests)")
  parser.add_argument("--seed", type=int, default=d.seed)
  parser.add_argument("--out", default=d.out, help="output directory")
  parser.add_argument("--quiet", action="store_true", help="no log lines or progress bar")


def config_from_args(args: argparse.Namespace) -> MPOConfig:
  return MPOConfig(dataset=args.dataset, data_dir=args.data_dir, models=tuple(args.models),
                   bond_dims=tuple(args.bond_dims), dense=not args.no_dense,
                   optimizers=tuple(args.optimizers), inits=tuple(args.inits),
                   lr_grids=dict(args.lr_grids) if args.lr_grids else None,
                   epochs=args.epochs, batch_size=args.batch_size,
                   gauge_sigma=args.gauge_sigma, seed=args.seed,
                   train_subset=args.train_subset, out=args.out,
                   progress=not args.quiet and sys.stderr.isatty())
