"""One learning rate across depths: Path-SGD with raw κ against κ/φ² (``normalize=True``).

Raw κ grows like the path norm, which in a He-initialised ReLU MLP doubles with every layer,
so the learning rate that suits depth 8 barely moves a depth-32 network, and at depth 128
most raw κ do not fit float32 at all (their update is 0). Normalised κ is scale-free.

For every depth (He-initialised, bias-free MLPs of one width) this trains, for each learning
rate of a grid, plain SGD, Path-SGD with κ/φ² and Path-SGD with raw κ, and reports the
training loss after a fixed number of steps, relative to the loss at the start. A run
*trains* when that ratio is at most --trains-below. The summary names the learning rates
that train every depth, per optimizer.

The raw-κ grid is the normalised grid times φ²(θ₀) of the shallowest network: there the two
make the same first step, and the table shows what the same raw learning rates do deeper.
SGD gets its own grid (--sgd-learning-rates), as its steps are on another scale.

The networks have no biases: a bias is an edge from a constant node whose path mass is 1,
while a hidden unit at layer l carries path mass ~2^l in a He network, so κ/φ² of a deep
bias is ~2^-l and its normalised step ~2^l times a weight's: Path-SGD's geometry, not an
artefact, but it makes "one learning rate for every depth" a statement about weights.

Outputs in --out: results.json (every run, the per-depth path norms and the number of raw κ
entries out of float32 range) and depth.png (relative loss against learning rate, one panel
per optimizer, one line per depth).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pathsgd_jax as psgd
from pathsgd_jax.experiments import common

OPTIMIZERS = ("sgd", "path-sgd normalize", "path-sgd raw")
_PROGRESS_CHUNKS = 20


@dataclasses.dataclass(frozen=True)
class DepthConfig:
  """Options of the depth experiment (see ``pathsgd-jax depth --help``)."""

  depths: tuple[int, ...] = (8, 32, 128)
  width: int = 256
  steps: int = 2000
  batch_size: int = 100
  learning_rates: tuple[float, ...] = (1e-6, 3e-6, 1e-5)
  sgd_learning_rates: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
  trains_below: float = 0.6
  dataset: str = "digits"
  seed: int = 0
  out: str = "runs/depth"
  progress: bool = False

  def __post_init__(self):
    for name in ("depths", "learning_rates", "sgd_learning_rates"):
      values = getattr(self, name)
      if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise common.ConfigError(f"{name} must be positive and finite, got {values!r}.")
    if min(self.depths) < 2:
      raise common.ConfigError(
          f"depths must be at least 2 (one hidden layer), got {self.depths!r}.")
    if not 0 < self.trains_below < 1:
      raise common.ConfigError(f"trains_below is a fraction of the loss at start, in (0, 1), "
                               f"got {self.trains_below!r}.")
    for name in ("width", "steps", "batch_size"):
      if getattr(self, name) < 1:
        raise common.ConfigError(
            f"{name} must be a positive integer, got {getattr(self, name)!r}.")


def he_mlp(key, sizes: Sequence[int]) -> list[jax.Array]:
  """He-normal kernels N(0, 2/fan_in), no biases: activations stay O(1) at any depth."""
  keys = jax.random.split(key, len(sizes) - 1)
  return [jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a)
          for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp(params, x):
  for i, kernel in enumerate(params):
    x = x @ kernel
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def _loss(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()


def _direction(name: str, x) -> optax.GradientTransformation:
  """The optimizer at learning rate 1: the step is this update times the run's rate."""
  if name == "sgd":
    return optax.sgd(1.0)
  return psgd.path_sgd(1.0, mlp, x, normalize=name == "path-sgd normalize")


class _Trainer:
  """Compiled once per optimizer and depth; the learning rate is a runtime scalar."""

  def __init__(self, tx, x, y):
    self.tx = tx

    def run(params, state, lr, idx):
      def step(carry, i):
        prm, st = carry
        updates, st = tx.update(jax.grad(_loss)(prm, x[i], y[i]), st, prm)
        return (optax.apply_updates(prm, jax.tree.map(lambda u: lr * u, updates)), st), None

      (params, state), _ = jax.lax.scan(step, (params, state), idx)
      return params, state

    self.run = jax.jit(run)
    self.loss = jax.jit(lambda prm: _loss(prm, x, y))

    def first_step(params, lr, xb, yb):
      updates, _ = tx.update(jax.grad(_loss)(params, xb, yb), tx.init(params), params)
      return optax.tree.norm(updates) * lr / optax.tree.norm(params)

    self.first_step = jax.jit(first_step)

  def train(self, params, lr: float, order: np.ndarray, bar=None) -> float:
    state = self.tx.init(params)
    lr = jnp.asarray(lr, jnp.float32)
    chunk = max(1, -(-len(order) // _PROGRESS_CHUNKS))
    for start in range(0, len(order), chunk):
      idx = jnp.asarray(order[start:start + chunk])
      params, state = self.run(params, state, lr, idx)
      if bar is not None:
        jax.block_until_ready(params)
        bar.update(len(idx))
    return float(self.loss(params))


def _raw_kappa_out_of_range(params, x) -> tuple[int, int]:
  """How many raw κ entries do not fit float32 (their Path-SGD update is 0), of how many."""
  report = psgd.path_structure(mlp, params, x)
  total = sum(math.prod(leaf.shape) for leaf in report.leaves)
  return sum(leaf.unrepresentable for leaf in report.leaves), total


def _progress_bar(cfg: DepthConfig, total: int):
  if not cfg.progress:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)


def run_depth(cfg: DepthConfig, log=print) -> dict:
  """Trains every depth with every optimizer at every learning rate of its grid."""
  data = psgd.data.load(cfg.dataset).flat()
  x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  order = np.random.default_rng(cfg.seed).integers(0, len(x), (cfg.steps, cfg.batch_size))
  networks = {}
  for depth in cfg.depths:
    sizes = [x.shape[1]] + [cfg.width] * (depth - 1) + [data.num_classes]
    params = he_mlp(jax.random.key(cfg.seed), sizes)
    lost, total = _raw_kappa_out_of_range(params, x)
    networks[depth] = {
        "params": params, "sizes": sizes,
        "log2_path_norm_squared": float(2 * jnp.log2(psgd.path_norm(mlp, params, x))),
        "loss_at_start": float(_loss(params, x, y)),
        "raw_kappa_out_of_float32_range": lost, "num_weights": total}
  shallowest = networks[min(cfg.depths)]["log2_path_norm_squared"]
  grids = {"sgd": list(cfg.sgd_learning_rates),
           "path-sgd normalize": list(cfg.learning_rates),
           "path-sgd raw": [lr * 2.0 ** shallowest for lr in cfg.learning_rates]}
  runs = []
  bar = _progress_bar(cfg, cfg.steps * len(cfg.depths) * sum(map(len, grids.values())))
  for depth, net in networks.items():
    log(f"[depth] depth {depth}: log2 φ₂² = {net['log2_path_norm_squared']:.1f}, loss at start "
        f"{net['loss_at_start']:.4f}, raw κ out of float32 range: "
        f"{net['raw_kappa_out_of_float32_range']:,} of {net['num_weights']:,} weights")
    for name in OPTIMIZERS:
      trainer = _Trainer(_direction(name, x), x, y)
      for lr in grids[name]:
        if bar is not None:
          bar.set_description(f"depth {depth} {name} lr {lr:.3g}")
        began = time.perf_counter()
        first = float(trainer.first_step(net["params"], lr, x[order[0]], y[order[0]]))
        final = trainer.train(net["params"], lr, order, bar)
        relative = final / net["loss_at_start"]
        runs.append({"depth": depth, "optimizer": name, "learning_rate": lr,
                     "final_train_loss": final, "relative_loss": relative,
                     "trains": bool(relative <= cfg.trains_below),
                     "first_relative_step": first, "seconds": time.perf_counter() - began})
        log(f"[depth] depth {depth:4d}  {name:<19} lr {lr:<10.3g} first step {first:<9.3g} "
            f"train loss {final:.4g} ({relative:.3f} of start)")
  if bar is not None:
    bar.close()
  output = {"config": dataclasses.asdict(cfg), "grids": grids,
            "networks": {str(d): {k: v for k, v in n.items() if k != "params"}
                         for d, n in networks.items()},
            "runs": runs,
            "learning_rates_training_every_depth": _summary(runs, cfg.depths, grids),
            "environment": common.environment()}
  output["table"] = format_depth(output)
  log("\n" + output["table"])
  os.makedirs(cfg.out, exist_ok=True)
  common.write_json(os.path.join(cfg.out, "results.json"), output)
  from pathsgd_jax.experiments import plotting  # pylint: disable=g-import-not-at-top
  plotting.save_figure(plot_depth(output), os.path.join(cfg.out, "depth.png"))
  return output


def _summary(runs, depths, grids) -> dict[str, list[float]]:
  """Per optimizer, the learning rates whose runs train at every depth."""
  trains = {(r["optimizer"], r["learning_rate"], r["depth"]): r["trains"] for r in runs}
  return {name: [lr for lr in lrs if all(trains[name, lr, d] for d in depths)]
          for name, lrs in grids.items()}


def format_depth(results: dict) -> str:
  """The printed table (from a results dict): final training loss per learning rate and depth.

  Each cell is the loss after training, then its ratio to the loss at start; ``*`` marks the
  runs that train.
  """
  cfg = results["config"]
  depths = cfg["depths"]
  cells = {(r["optimizer"], r["learning_rate"], r["depth"]): r for r in results["runs"]}
  rows = [["log2 φ₂² at start", ""] + [
      common.fmt(results["networks"][str(d)]["log2_path_norm_squared"], ".1f") for d in depths]]
  for name, lrs in results["grids"].items():
    for lr in lrs:
      row = [name, f"{lr:.3g}"]
      for d in depths:
        r = cells.get((name, lr, d))
        row.append("-" if r is None else f"{common.fmt(r['final_train_loss'], '.3g')} "
                   f"({r['relative_loss']:.2f}){'*' if r['trains'] else ' '}")
      rows.append(row)
  lines = [common.table(["optimizer", "lr"] + [f"depth {d}" for d in depths], rows), "",
           f"Train loss after {cfg['steps']} steps (batch {cfg['batch_size']}, width "
           f"{cfg['width']}, {cfg['dataset']}), in brackets relative to the start;",
           f"* trains (at most {cfg['trains_below']:g} of the start). Learning rates that train "
           "every depth:"]
  for name, lrs in results["learning_rates_training_every_depth"].items():
    lines.append(f"  {name:<19} " + (", ".join(f"{lr:.3g}" for lr in lrs) or "none"))
  return "\n".join(lines)


def plot_depth(results: dict):
  """Relative training loss against learning rate: one panel per optimizer, a line per depth."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  from matplotlib.ticker import NullFormatter  # pylint: disable=g-import-not-at-top

  cfg = results["config"]
  fig, axes = plt.subplots(1, len(OPTIMIZERS), figsize=(4.2 * len(OPTIMIZERS), 3.6),
                           constrained_layout=True)
  titles = {"sgd": "SGD", "path-sgd normalize": "Path-SGD, κ/φ² (normalize=True)",
            "path-sgd raw": f"Path-SGD, raw κ (lr = κ/φ² lr × φ² at depth {min(cfg['depths'])})"}
  # Distinct markers and dashes: runs that do not move at all lie on top of each other.
  styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-")]
  for ax, name in zip(axes, OPTIMIZERS):
    for i, depth in enumerate(cfg["depths"]):
      mine = sorted((r["learning_rate"], r["relative_loss"]) for r in results["runs"]
                    if r["optimizer"] == name and r["depth"] == depth)
      marker, dashes = styles[i % len(styles)]
      if mine:
        ax.plot(*zip(*mine), marker=marker, linestyle=dashes, markersize=7 - i,
                label=f"depth {depth}")
    ax.axhline(cfg["trains_below"], color="gray", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, max(1.2, ax.get_ylim()[1]))
    ax.set_title(titles[name], fontsize=10)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("train loss / loss at start")
    ax.legend(fontsize=8)
  fig.suptitle(f"He MLPs, width {cfg['width']}, {cfg['steps']} steps, batch "
               f"{cfg['batch_size']}, {cfg['dataset']} (dotted: 'trains' threshold)",
               fontsize=10)
  return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
  defaults = DepthConfig()
  parser.add_argument("--depths", type=int, nargs="+", default=list(defaults.depths),
                      help="numbers of layers (default: %(default)s)")
  parser.add_argument("--width", type=int, default=defaults.width,
                      help="hidden width (default: %(default)s)")
  parser.add_argument("--steps", type=int, default=defaults.steps,
                      help="training steps per run (default: %(default)s)")
  parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
  parser.add_argument("--learning-rates", type=float, nargs="+",
                      default=list(defaults.learning_rates),
                      help="Path-SGD (normalize=True) grid; the raw-κ grid is this times "
                           "φ²(θ₀) of the shallowest network (default: %(default)s)")
  parser.add_argument("--sgd-learning-rates", type=float, nargs="+",
                      default=list(defaults.sgd_learning_rates),
                      help="SGD grid (default: %(default)s)")
  parser.add_argument("--trains-below", type=float, default=defaults.trains_below,
                      help="a run trains when its final loss is at most this fraction of the "
                           "loss at start (default: %(default)s)")
  parser.add_argument("--dataset", default=defaults.dataset,
                      help="data set name for pathsgd_jax.data.load (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--out", default=defaults.out, help="output directory")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> DepthConfig:
  return DepthConfig(depths=tuple(args.depths), width=args.width, steps=args.steps,
                     batch_size=args.batch_size, learning_rates=tuple(args.learning_rates),
                     sgd_learning_rates=tuple(args.sgd_learning_rates),
                     trains_below=args.trains_below, dataset=args.dataset, seed=args.seed,
                     out=args.out, progress=not args.quiet and sys.stderr.isatty())


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="pathsgd-jax depth", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(parser)
  run_depth(config_from_args(parser.parse_args(argv)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
