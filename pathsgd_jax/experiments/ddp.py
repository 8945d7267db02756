"""DDP-SGD against SGD, SGD with BatchNorm, Path-SGD and Adam (``pathsgd-jax ddp``).

The Path-SGD paper's feed-forward protocol (a ReLU MLP, softmax cross-entropy, batch 100,
balanced and unbalanced starts, learning rate chosen by the final validation error, every
grid point trained for the full budget) with DDP-SGD (:func:`pathsgd_jax.ddp_sgd`) at
α ∈ {0, 0.5, 1} among the optimizers. α = 0 is Path-SGD computed by the DDP code path (it
must match ``path-sgd``).

SGD with BatchNorm trains the same MLP with train-mode BatchNorm (with scale and shift)
after every hidden linear layer, evaluated with the statistics of each evaluation batch of
1,000 (no running averages). Its unbalanced start multiplies the incoming weights and bias
of the drawn units by the same factors as the others' (BatchNorm removes them, so it is the
same function); dividing the outgoing weights as well would change a BatchNorm network's
function.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

import pathsgd_jax
from pathsgd_jax.experiments import common, models, paper, training

OPTIMIZERS = ("sgd", "sgd-bn", "adam", "path-sgd", "ddp-0", "ddp-0.5", "ddp-1")
LABELS = {"sgd": "SGD", "sgd-bn": "SGD + BatchNorm", "adam": "Adam", "path-sgd": "Path-SGD",
          "ddp-0": "DDP-SGD α=0", "ddp-0.5": "DDP-SGD α=0.5", "ddp-1": "DDP-SGD α=1"}
GRIDS = {"sgd": (1.0, 0.1, 0.01, 0.001), "sgd-bn": (1.0, 0.1, 0.01), "adam": (0.01, 0.001, 1e-4),
         "path-sgd": (1.0, 0.1, 0.01, 0.001), "ddp-0": (1.0, 0.1, 0.01, 0.001),
         "ddp-0.5": (0.1, 0.01, 0.001), "ddp-1": (0.1, 0.01, 0.001)}


@dataclasses.dataclass
class DDPConfig:
  """Configuration of :func:`run_ddp` (the CLI's defaults)."""

  datasets: tuple[str, ...] = ("mnist5k",)
  data_dir: str | None = None
  width: int = 256
  depth: int = 2
  epochs: int = 10
  batch_size: int = 100
  optimizers: tuple[str, ...] = OPTIMIZERS
  inits: tuple[str, ...] = paper.INITS
  lr_grids: dict[str, tuple[float, ...]] | None = None
  seed: int = 0
  val_fraction: float = 0.1
  train_subset: int | None = None
  test_subset: int | None = None
  steps_per_call: int = 50
  out: str = os.path.join("runs", "ddp")

  def grid_for(self, name: str) -> list[float]:
    return list((self.lr_grids or {}).get(name, GRIDS[name]))


def bn_mlp_apply(params: dict, x: jax.Array) -> jax.Array:
  """The MLP with train-mode BatchNorm (scale, shift) after each hidden linear layer."""
  layers, norms = params["layers"], params["bn"]
  h = x
  for k, layer in enumerate(layers):
    z = h @ layer["w"] + layer["b"][None]
    if k == len(layers) - 1:
      return z
    mean = jnp.mean(z, axis=0, keepdims=True)
    var = jnp.mean(jnp.square(z - mean), axis=0, keepdims=True)
    z = (z - mean) * lax.rsqrt(var + 1e-5) * norms[k]["scale"][None] + norms[k]["shift"][None]
    h = jax.nn.relu(z)
  raise AssertionError("unreachable")


def _bn_start(balanced, unbalanced):
  """BatchNorm network: each hidden unit's incoming weights and bias times its factor."""
  layers = []
  for k, layer in enumerate(balanced):
    if k < len(balanced) - 1:
      ratio = (jnp.linalg.norm(unbalanced[k]["w"], axis=0)
               / jnp.linalg.norm(balanced[k]["w"], axis=0))
      layer = {"w": layer["w"] * ratio[None], "b": layer["b"] * ratio}
    layers.append(layer)
  norms = [{"scale": jnp.ones_like(layer["b"]), "shift": jnp.zeros_like(layer["b"])}
           for layer in balanced[:-1]]
  return {"layers": layers, "bn": norms}


def make_optimizer(name: str, example) -> tuple[optax.GradientTransformation, bool]:
  """(optimizer at unit learning rate, whether its update needs ``inputs=``)."""
  if name in ("sgd", "sgd-bn"):
    return optax.sgd(1.0), False
  if name == "adam":
    return optax.adam(1.0), False
  if name == "path-sgd":
    return pathsgd_jax.path_sgd(1.0, models.mlp_forward, example), False
  if name.startswith("ddp-"):
    return pathsgd_jax.ddp_sgd(1.0, models.mlp_forward, example,
                               alpha=float(name[4:])), True
  raise common.ConfigError(f"Unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}.")


def make_chunk(apply_fn, tx, needs_inputs: bool):
  """Like :func:`training.make_train_chunk`, passing the batch to ``tx.update`` if needed."""

  def chunk(params, opt_state, lr, key, x_all, y_all, idx, steps):
    del key, steps

    def body(carry, batch_idx):
      params, opt_state = carry
      x, y = jnp.take(x_all, batch_idx, axis=0), jnp.take(y_all, batch_idx, axis=0)
      loss, grads = jax.value_and_grad(
          lambda p: jnp.mean(training.cross_entropy(apply_fn(p, x), y)))(params)
      kwargs = {"inputs": x} if needs_inputs else {}
      updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
      updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = lax.scan(body, (params, opt_state), idx)
    return params, opt_state, losses

  return jax.jit(chunk, donate_argnums=(0, 1))


def _paper_config(cfg: DDPConfig) -> paper.PaperConfig:
  return paper.PaperConfig(datasets=cfg.datasets, data_dir=cfg.data_dir, width=cfg.width,
                           depth=cfg.depth, seed=cfg.seed, val_fraction=cfg.val_fraction,
                           train_subset=cfg.train_subset, test_subset=cfg.test_subset,
                           inits=cfg.inits)


def run_ddp(cfg: DDPConfig, log=print) -> dict:
  """Runs the comparison; writes ``results.json`` and ``ddp.png`` to ``cfg.out``."""
  for name in cfg.optimizers:
    if name not in OPTIMIZERS:
      raise common.ConfigError(f"Unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}.")
  for name in cfg.inits:
    if name not in paper.INITS:
      raise common.ConfigError(f"Unknown initialisation {name!r}; choose from "
                               f"{', '.join(paper.INITS)}.")
  t_start = time.perf_counter()
  pcfg = _paper_config(cfg)
  results: dict[str, Any] = {"command": "ddp", "config": dataclasses.asdict(cfg),
                             "grids": {o: cfg.grid_for(o) for o in cfg.optimizers},
                             "environment": common.environment(), "datasets": {}, "runs": []}
  for ds_name in cfg.datasets:
    splits, info = paper.load_splits(pcfg, ds_name)
    results["datasets"][info["name"]] = info
    sizes = models.mlp_sizes(info["input_dim"], cfg.width, cfg.depth, info["num_classes"])
    starts = paper.initial_params(pcfg, sizes)
    x_train, y_train = jnp.asarray(splits["train"][0]), jnp.asarray(splits["train"][1])
    # Evaluation batches divide each split (no padding: BatchNorm reads their statistics).
    evals = {s: training.EvalData.build(*splits[s], batch=training.largest_divisor_at_most(
        len(splits[s][1]), 1000)) for s in ("train", "val", "test")}
    example = jnp.zeros((cfg.batch_size, info["input_dim"]), jnp.float32)
    steps_per_epoch = info["n_train"] // cfg.batch_size
    chunk = training.chunk_steps(steps_per_epoch, cfg.steps_per_call)
    log(f"[ddp] {info['name']}: {info['n_train']} train / {info['n_val']} val / "
        f"{info['n_test']} test, MLP {'-'.join(map(str, sizes))}, {cfg.epochs} epochs")
    for opt_name in cfg.optimizers:
      bn = opt_name == "sgd-bn"
      apply_fn = bn_mlp_apply if bn else models.mlp_forward
      tx, needs_inputs = make_optimizer(opt_name, example)
      chunk_fn = make_chunk(apply_fn, tx, needs_inputs)
      evaluate = training.make_evaluator(apply_fn)
      for init_name in cfg.inits:
        start = starts[init_name]
        if bn:
          start = _bn_start(starts["balanced"], start)
        runs = []
        for lr in cfg.grid_for(opt_name):
          params = jax.tree.map(jnp.copy, start)
          run = training.train_run(
              chunk_fn=chunk_fn, evaluate=evaluate, params=params, opt_state=tx.init(params),
              lr=lr, x_train=x_train, y_train=y_train, evals=evals, epochs=cfg.epochs,
              batch_size=cfg.batch_size, seed=cfg.seed, steps_per_call=chunk,
              dropout_key=jax.random.key(0))
          runs.append(run)
          status = ("diverged" if run.diverged else
                    f"train loss {common.fmt(run.final('train_loss'))}, val error "
                    f"{common.fmt(run.final('val_error'))}, test error "
                    f"{common.fmt(run.final('test_error'))}")
          log(f"[ddp] {info['name']} {init_name:>10} {opt_name:>8} lr={common.lr_label(lr):>6}: "
              f"{status} ({run.train_time_s:.1f}s, {run.examples_per_s:.0f} ex/s)")
        chosen = training.select(runs, "val_error")
        results["runs"].append({
            "dataset": info["name"], "init": init_name, "optimizer": opt_name,
            "chosen_index": chosen, "chosen_lr": None if chosen is None else runs[chosen].lr,
            "curves": (runs[chosen].curves if chosen is not None
                       else {k: [None] * cfg.epochs for k in runs[0].curves}),
            "grid": [r.as_dict() for r in runs]})
  results["summary"] = paper.summary_rows(results)
  results["wall_time_s"] = time.perf_counter() - t_start
  os.makedirs(cfg.out, exist_ok=True)
  from pathsgd_jax.experiments import plotting  # pylint: disable=g-import-not-at-top
  plotting.save_figure(plot_ddp(results), os.path.join(cfg.out, "ddp.png"))
  results["figures"] = ["ddp.png"]
  common.write_json(os.path.join(cfg.out, "results.json"), results)
  log(format_ddp(results))
  return results


_STYLE = {"sgd": ("tab:gray", "-"), "sgd-bn": ("tab:brown", "-"), "adam": ("tab:purple", "-"),
          "path-sgd": ("black", ":"), "ddp-0": ("tab:orange", "-"), "ddp-0.5": ("tab:green", "-"),
          "ddp-1": ("tab:blue", "-")}


def plot_ddp(results: dict):
  """Training loss (log) and test error per epoch; one column per data set x start."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  cols = list(dict.fromkeys((r["dataset"], r["init"]) for r in results["runs"]))
  fig = Figure(figsize=(3.6 * len(cols) + 0.4, 6.2), layout="constrained")
  axes = fig.subplots(2, len(cols), squeeze=False)
  for c, col in enumerate(cols):
    for run in (r for r in results["runs"] if (r["dataset"], r["init"]) == col):
      color, style = _STYLE.get(run["optimizer"], (None, "-"))
      lr = run["chosen_lr"]
      label = LABELS.get(run["optimizer"], run["optimizer"]) + (
          " (diverged)" if lr is None else f" (lr {lr:.0e})")
      for ax, key in ((axes[0, c], "train_loss"), (axes[1, c], "test_error")):
        pts = [(e, v) for e, v in zip(run["curves"]["epoch"], run["curves"][key]) if v is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linestyle=style,
                marker="o", markersize=3, label=label)
    axes[0, c].set_title(f"{col[0]}, {col[1]}", fontsize=10)
    axes[0, c].set_yscale("log")
    axes[1, c].set_xlabel("epoch")
    axes[0, c].legend(fontsize=7)
    for ax in axes[:, c]:
      ax.grid(True, which="both", alpha=0.3)
  axes[0, 0].set_ylabel("training loss (cross-entropy)")
  axes[1, 0].set_ylabel("test error")
  cfg = results.get("config", {})
  fig.suptitle(f"DDP-SGD vs baselines: {cfg.get('depth')} x {cfg.get('width')} ReLU MLP, "
               f"batch {cfg.get('batch_size')}, lr chosen by final validation error",
               fontsize=10)
  return fig


def format_ddp(results: dict) -> str:
  rows = [[r["dataset"], r["init"], LABELS.get(r["optimizer"], r["optimizer"]),
           "diverged" if r["lr"] is None else common.lr_label(r["lr"]),
           common.fmt(r["train_loss"]), common.fmt(r["val_error"]), common.fmt(r["test_error"])]
          for r in results["summary"]]
  return common.table(["dataset", "init", "optimizer", "chosen lr", "final train loss",
                       "final val error", "final test error"], rows)


def _grid(text: str) -> tuple[str, tuple[float, ...]]:
  name, _, values = text.partition("=")
  try:
    grid = tuple(float(v) for v in values.split(","))
  except ValueError:
    grid = ()
  if name not in OPTIMIZERS or not grid or not all(v > 0 and math.isfinite(v) for v in grid):
    raise argparse.ArgumentTypeError(f"expected OPT=LR,LR,... with OPT in {', '.join(OPTIMIZERS)} "
                                     f"and positive rates, got {text!r}")
  return name, grid


def add_arguments(parser: argparse.ArgumentParser) -> None:
  d = DDPConfig()
  parser.add_argument("--dataset", nargs="+", default=list(d.datasets),
                      help="mnist5k (embedded, default), digits, fashion_mnist, mnist (--data-dir)")
  parser.add_argument("--data-dir", default=None, metavar="DIR")
  parser.add_argument("--width", type=int, default=d.width, help="hidden units (default 256)")
  parser.add_argument("--depth", type=int, default=d.depth, help="hidden layers (default 2)")
  parser.add_argument("--epochs", type=int, default=d.epochs)
  parser.add_argument("--batch-size", type=int, default=d.batch_size)
  parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(d.optimizers))
  parser.add_argument("--init", nargs="+", choices=paper.INITS, default=list(d.inits))
  parser.add_argument("--lr-grids", nargs="+", type=_grid, metavar="OPT=LR,LR,...",
                      help="per-optimizer learning-rate grids (defaults: %s)" % GRIDS)
  parser.add_argument("--seed", type=int, default=d.seed)
  parser.add_argument("--train-subset", type=int, default=None, metavar="N")
  parser.add_argument("--test-subset", type=int, default=None, metavar="N")
  parser.add_argument("--out", default=d.out, help="output directory (default: %(default)s)")
  parser.add_argument("--quiet", action="store_true", help="no per-run log lines")


def config_from_args(args: argparse.Namespace) -> DDPConfig:
  return DDPConfig(datasets=tuple(args.dataset), data_dir=args.data_dir, width=args.width,
                   depth=args.depth, epochs=args.epochs, batch_size=args.batch_size,
                   optimizers=tuple(args.optimizers), inits=tuple(args.init),
                   lr_grids=dict(args.lr_grids) if args.lr_grids else None, seed=args.seed,
                   train_subset=args.train_subset, test_subset=args.test_subset, out=args.out)
