"""One learning rate across depths: Path-SGD with raw κ against κ/φ² (``normalize=True``).

Raw κ grows like the path norm, which in a He-initialised ReLU MLP doubles with every layer, so
the learning rate that suits depth 8 barely moves a depth-128 network. Normalised κ is
scale-free. This experiment trains He-initialised MLPs of several depths with the *same*
learning rate and reports, per depth, the relative size of the first step
(‖Δθ‖/‖θ‖ over all weights; the quantity a learning rate sets) and the training loss after a
fixed budget.

The networks have no biases: a bias is an edge from a constant node whose path mass is 1,
while a hidden unit at layer l carries path mass ~2^l in a He network, so κ/φ² of a deep
bias is ~2^-l and its normalised step ~2^l times a weight's — Path-SGD's geometry, not an
artefact, but it makes "one learning rate for every depth" a statement about weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pathsgd_jax as psgd
from pathsgd_jax.experiments import common


@dataclasses.dataclass(frozen=True)
class DepthConfig:
  """Options of the depth experiment (see ``pathsgd-jax depth --help``)."""

  depths: tuple[int, ...] = (8, 32, 128)
  width: int = 64
  steps: int = 300
  batch_size: int = 100
  learning_rate: float = 0.05
  dataset: str = "digits"
  seed: int = 0
  out: str = "runs/depth"


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


def _relative_step(params, tx, x, y):
  def loss(prm):
    return optax.softmax_cross_entropy_with_integer_labels(mlp(prm, x), y).mean()

  updates, _ = jax.jit(tx.update)(jax.grad(loss)(params), tx.init(params), params)
  return float(optax.global_norm(updates) / optax.global_norm(params))


def _train(params, tx, x, y, steps, batch_size, seed):
  def loss(prm, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(mlp(prm, xb), yb).mean()

  order = np.random.default_rng(seed).integers(0, len(x), (steps, batch_size))

  @jax.jit
  def run(prm, state, idx):
    def step(carry, i):
      prm, state = carry
      grads = jax.grad(loss)(prm, x[i], y[i])
      updates, state = tx.update(grads, state, prm)
      return (optax.apply_updates(prm, updates), state), None

    (prm, state), _ = jax.lax.scan(step, (prm, state), idx)
    return prm, loss(prm, x, y)

  _, final = run(params, tx.init(params), jnp.asarray(order))
  return float(final)


def run_depth(cfg: DepthConfig, log=print) -> dict:
  """Trains each depth with SGD, raw Path-SGD and normalised Path-SGD at one learning rate."""
  data = psgd.data.load(cfg.dataset).flat()
  x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  start_loss = float(np.log(data.num_classes))
  optimizers = {
      "sgd": lambda: optax.sgd(cfg.learning_rate),
      "path-sgd": lambda: psgd.path_sgd(cfg.learning_rate, mlp, x),
      "path-sgd normalize": lambda: psgd.path_sgd(cfg.learning_rate, mlp, x, normalize=True),
  }
  rows, results = [], {}
  for depth in cfg.depths:
    sizes = [x.shape[1]] + [cfg.width] * (depth - 1) + [data.num_classes]
    params = he_mlp(jax.random.key(cfg.seed), sizes)
    log_norm = float(jnp.log(psgd.path_norm(mlp, params, x)))
    for name, make in optimizers.items():
      began = time.perf_counter()
      relative = _relative_step(params, make(), x[:cfg.batch_size], y[:cfg.batch_size])
      final = _train(params, make(), x, y, cfg.steps, cfg.batch_size, cfg.seed)
      results[f"{name}@{depth}"] = {"depth": depth, "optimizer": name, "final_train_loss": final,
                                    "first_relative_step": relative, "log_path_norm": log_norm,
                                    "seconds": time.perf_counter() - began}
      rows.append([depth, name, common.fmt(log_norm / np.log(2), ".1f"), common.fmt(relative),
                   common.fmt(final)])
      log(f"depth {depth:4d}  {name:<20} first step {relative:.3g}  train loss {final:.4g}")
  table = common.table(["depth", "optimizer", "log2 φ₂", "‖Δθ‖/‖θ‖ (step 1)", "train loss"],
                       rows)
  log(f"\nOne learning rate ({cfg.learning_rate:g}), {cfg.steps} steps, batch "
      f"{cfg.batch_size}, {cfg.dataset}; the loss at start is log {data.num_classes} = "
      f"{start_loss:.3f}\n{table}")
  output = {"config": dataclasses.asdict(cfg), "results": results, "table": table,
            "environment": common.environment()}
  common.write_json(f"{cfg.out}/results.json", output)
  return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
  defaults = DepthConfig()
  parser.add_argument("--depths", type=int, nargs="+", default=list(defaults.depths),
                      help="numbers of layers (default: %(default)s)")
  parser.add_argument("--width", type=int, default=defaults.width, help="hidden width")
  parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
  parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
  parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate,
                      help="the one learning rate every run uses (default: %(default)s)")
  parser.add_argument("--dataset", default=defaults.dataset,
                      help="data set name for pathsgd_jax.data.load (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--out", default=defaults.out, help="output directory")


def config_from_args(args: argparse.Namespace) -> DepthConfig:
  return DepthConfig(depths=tuple(args.depths), width=args.width, steps=args.steps,
                     batch_size=args.batch_size, learning_rate=args.learning_rate,
                     dataset=args.dataset, seed=args.seed, out=args.out)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="pathsgd-jax depth", description=__doc__)
  add_arguments(parser)
  run_depth(config_from_args(parser.parse_args(argv)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
