"""Pruning while training: Global Sparse Momentum (GSM) and Path-GSM on LeNets.

Test accuracy against the global compression ratio (prunable weights / non-zero prunable
weights) of LeNet-300-100 and a ReLU LeNet-5 (average pooling, so it is a path network)
for four methods, from a balanced start and from its unbalanced copy (random node rescalings
of the same function, as in the Path-SGD paper):

* dense: momentum SGD with weight decay, all weights learning (GSM at compression 1);
* magnitude: that dense network pruned by magnitude to each ratio after training;
* gsm: Global Sparse Momentum (Ding et al., NeurIPS 2019) at each ratio, then the final
  magnitude pruning to exactly Q non-zeros (no fine-tuning);
* path-gsm: the same with the path-normalised direction g/κ (saliency from the raw g), and
  a final pruning by the rescaling-invariant magnitude |w|·√κ (path mass) instead of |w|.

Hyperparameters default to the authors' LeNet runs (momentum 0.99, lr 1e-2, weight decay
5e-4, batch 256). Path-GSM's learning rate is not tuned: by default it is set so that its
first step from the balanced start has the norm of GSM's first step (--path-lr overrides),
and, Path-GSM being rescaling invariant, the same rate serves the unbalanced start. Biases
are never pruned, get no weight decay, and do not count in the ratio (as in the authors'
code). Outputs in --out: results.json (every run, its curves and per-layer sparsity) and
gsm.png (accuracy against compression, one panel per network and start).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import pathsgd_jax as psgd
from pathsgd_jax.experiments import common, models, paper, training

NETWORKS = ("lenet300", "lenet5")
METHODS = ("dense", "magnitude", "gsm", "path-gsm")
INITS = ("balanced", "unbalanced")
# The authors' numbers (full MNIST, 60k training images; approximate, for context only).
REFERENCE = {("lenet300", 60): 98.2, ("lenet5", 125): 99.2, ("lenet5", 300): 99.1}


@dataclasses.dataclass(frozen=True)
class GSMConfig:
  """Options of the GSM experiment (see ``pathsgd-jax gsm --help``)."""

  networks: tuple[str, ...] = NETWORKS
  compressions: tuple[float, ...] = (10, 60, 125, 300)
  inits: tuple[str, ...] = INITS
  methods: tuple[str, ...] = METHODS
  dataset: str = "mnist5k"
  data_dir: str | None = None
  epochs: int = 40
  batch_size: int = 256
  lr: float = 1e-2
  path_lr: float | None = None  # None: matched to GSM's first step at the balanced start.
  momentum: float = 0.99
  weight_decay: float = 5e-4
  unbalance_fraction: float = 0.25
  unbalance_factor: float = 10.0
  seed: int = 0
  val_fraction: float = 0.1
  train_subset: int | None = None
  test_subset: int | None = None
  steps_per_call: int = 50
  out: str = "runs/gsm"

  def __post_init__(self):
    for name, allowed in (("networks", NETWORKS), ("methods", METHODS), ("inits", INITS)):
      bad = [v for v in getattr(self, name) if v not in allowed]
      if bad or not getattr(self, name):
        raise common.ConfigError(f"{name} must be among {', '.join(allowed)}, got {bad}.")
    if not self.compressions or not all(c >= 1 and math.isfinite(c) for c in self.compressions):
      raise common.ConfigError(f"compressions must be finite and >= 1, got "
                               f"{self.compressions}.")
    for name in ("epochs", "batch_size", "steps_per_call"):
      if getattr(self, name) < 1:
        raise common.ConfigError(f"{name} must be positive, got {getattr(self, name)}.")
    if not 0 <= self.momentum < 1 or self.weight_decay < 0 or not self.lr > 0:
      raise common.ConfigError("need 0 <= momentum < 1, weight_decay >= 0 and lr > 0.")


# ---------------------------------------------------------------------------------------------
# Networks.
# ---------------------------------------------------------------------------------------------


def _avg_pool2(x):
  # A Python-scalar init value lowers to reduce_window_sum, which the path network knows.
  return lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") * 0.25


def lenet5_init(key, side: int, num_classes: int = 10) -> dict:
  """Balanced ``N(0, 1/fan_in)`` kernels, zero biases: conv5x5 20, conv5x5 50, 500, classes."""
  if side < 16:
    raise common.ConfigError(f"LeNet-5 needs images of at least 16x16, got {side}x{side}; "
                             "use --networks lenet300 for this data set.")
  after = ((side - 4) // 2 - 4) // 2
  shapes = {"conv1": (5, 5, 1, 20), "conv2": (5, 5, 20, 50), "fc1": (after * after * 50, 500),
            "fc2": (500, num_classes)}
  params = {}
  for k, (name, shape) in zip(jax.random.split(key, 4), shapes.items()):
    fan_in = math.prod(shape[:-1])
    params[name] = {"w": jax.random.normal(k, shape) / math.sqrt(fan_in),
                    "b": jnp.zeros(shape[-1])}
  return params


def lenet5_apply(params: dict, x: jax.Array) -> jax.Array:
  """ReLU LeNet-5 (valid convolutions, 2x2 average pooling) on flattened square images."""
  side = math.isqrt(x.shape[-1])
  h = x.reshape(x.shape[0], side, side, 1)
  for name in ("conv1", "conv2"):
    h = lax.conv_general_dilated(h, params[name]["w"], (1, 1), "VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = _avg_pool2(jax.nn.relu(h + params[name]["b"][None, None, None, :]))
  h = h.reshape(h.shape[0], -1)
  h = jax.nn.relu(h @ params["fc1"]["w"] + params["fc1"]["b"][None, :])
  return h @ params["fc2"]["w"] + params["fc2"]["b"][None, :]


def lenet5_unbalance(key, params: dict, fraction: float, factor: float) -> dict:
  """Random node rescalings of every hidden channel/unit (power-of-two factors, exact)."""
  convs = [params["conv1"]["w"].shape[-1], params["conv2"]["w"].shape[-1]]
  sizes = convs + [params["fc1"]["w"].shape[-1]]
  s1, s2, s3 = psgd.init.sample_unbalanced_scales(key, sizes, fraction=fraction,
                                                  factor=factor, power_of_two=True)
  p = jax.tree.map(jnp.asarray, params)
  rows = jnp.tile(s2, p["fc1"]["w"].shape[0] // convs[1])  # NHWC flattening: channel last
  s1_out, s1_in = s1[None, None, None, :], s1[None, None, :, None]
  s2_out = s2[None, None, None, :]
  return {"conv1": {"w": p["conv1"]["w"] * s1_out, "b": p["conv1"]["b"] * s1},
          "conv2": {"w": p["conv2"]["w"] / s1_in * s2_out, "b": p["conv2"]["b"] * s2},
          "fc1": {"w": p["fc1"]["w"] / rows[:, None] * s3[None, :], "b": p["fc1"]["b"] * s3},
          "fc2": {"w": p["fc2"]["w"] / s3[:, None], "b": p["fc2"]["b"]}}


def _network(name: str, cfg: GSMConfig, info: dict):
  """(apply_fn, {init: params}) for a network; the two starts compute the same function."""
  key_b, key_u = jax.random.split(jax.random.key(cfg.seed))
  if name == "lenet300":
    sizes = [info["input_dim"], 300, 100, info["num_classes"]]
    balanced = psgd.init.balanced_init(key_b, models.mlp_init(key_b, sizes))
    unbalanced = psgd.init.unbalanced_init(key_u, balanced, fraction=cfg.unbalance_fraction,
                                           factor=cfg.unbalance_factor, power_of_two=True)
    return models.mlp_forward, {"balanced": balanced, "unbalanced": unbalanced}
  side = math.isqrt(info["input_dim"])
  if side * side != info["input_dim"]:
    raise common.ConfigError(f"LeNet-5 needs square one-channel images; {info['name']} has "
                             f"{info['input_dim']} input features.")
  balanced = lenet5_init(key_b, side, info["num_classes"])
  return lenet5_apply, {"balanced": balanced, "unbalanced": lenet5_unbalance(
      key_u, balanced, cfg.unbalance_fraction, cfg.unbalance_factor)}


# ---------------------------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------------------------


def _optimizer(kind: str, apply_fn, example, cfg: GSMConfig):
  """GSM / Path-GSM at unit learning rate with an injected compression (one compile for all
  ratios; the training loop multiplies the update by the run's rate, as Z does not depend
  on it)."""
  common_kw = dict(learning_rate=1.0, compression=1.0, momentum=cfg.momentum,
                   weight_decay=cfg.weight_decay)
  if kind == "gsm":
    return optax.inject_hyperparams(psgd.global_sparse_momentum)(**common_kw)
  static = ("apply_fn", "example_input", "p", "refresh_every")
  return optax.inject_hyperparams(psgd.path_gsm, static_args=static)(
      apply_fn=apply_fn, example_input=example, **common_kw)


def _with_compression(state, compression):
  hyper = dict(state.hyperparams, compression=jnp.asarray(compression, jnp.float32))
  return state._replace(hyperparams=hyper)


def _accuracy(evaluate, params, data) -> float:
  return 1.0 - evaluate(params, data)[1]


def _matched_path_lr(apply_fn, params, x, y, cfg: GSMConfig) -> float:
  """The Path-GSM rate whose first step has the norm of GSM's first step (balanced start)."""
  grads = jax.grad(lambda p: jnp.mean(training.cross_entropy(apply_fn(p, x), y)))(params)
  kappa = psgd.path_scales(apply_fn, params, x)
  ratio = optax.tree.norm(grads) / optax.tree.norm(jax.tree.map(lambda g, k: g / k, grads,
                                                                kappa))
  return float(cfg.lr * ratio)


def run_gsm(cfg: GSMConfig, log=print) -> dict:
  """Trains every network x start x method x ratio; returns (and writes) the results."""
  t_start = time.perf_counter()
  splits, info = paper.load_splits(cfg, cfg.dataset)
  x_tr, y_tr = jnp.asarray(splits["train"][0]), jnp.asarray(splits["train"][1])
  evals = {s: training.EvalData.build(*splits[s], batch=1000) for s in ("val", "test")}
  steps_per_epoch = info["n_train"] // cfg.batch_size
  results = {"command": "gsm", "config": dataclasses.asdict(cfg), "dataset": info,
             "reference_full_mnist": [{"network": n, "compression": c, "test_accuracy": a}
                                      for (n, c), a in REFERENCE.items()],
             "environment": common.environment(), "networks": {}, "runs": []}
  ratios = sorted(set(cfg.compressions))
  for net_name in cfg.networks:
    apply_fn, starts = _network(net_name, cfg, info)
    conv = net_name == "lenet5"
    chunk = training.chunk_steps(steps_per_epoch, cfg.steps_per_call, convolutional=conv)
    example = x_tr[:cfg.batch_size]
    path_lr = cfg.path_lr or _matched_path_lr(apply_fn, starts["balanced"], example,
                                              y_tr[:cfg.batch_size], cfg)
    n_prunable = psgd.sparsity_report(starts["balanced"]).prunable_size
    results["networks"][net_name] = {"prunable_weights": n_prunable, "path_lr": path_lr,
                                     "steps": cfg.epochs * steps_per_epoch}
    log(f"[gsm] {net_name}: {n_prunable} prunable weights, {cfg.epochs * steps_per_epoch} "
        f"steps, lr {cfg.lr:g}, Path-GSM lr {path_lr:.3g}")
    evaluate = training.make_evaluator(apply_fn)
    kinds = {"gsm": [1.0] if {"dense", "magnitude"} & set(cfg.methods) else []}
    kinds["gsm"] += ratios if "gsm" in cfg.methods else []
    kinds["path-gsm"] = ratios if "path-gsm" in cfg.methods else []
    for kind, compressions in kinds.items():
      if not compressions:
        continue
      tx = _optimizer(kind, apply_fn, example, cfg)
      chunk_fn = training.make_train_chunk(lambda p, x, _: apply_fn(p, x), tx, convolutional=conv)
      for init_name in cfg.inits:
        for compression in compressions:
          params = jax.tree.map(jnp.copy, starts[init_name])
          state = _with_compression(tx.init(params), compression)
          began = time.perf_counter()
          params, losses = _train(chunk_fn, params, state, cfg.lr if kind == "gsm" else
                                  path_lr, x_tr, y_tr, cfg, chunk)
          base = {"network": net_name, "init": init_name, "train_loss_per_epoch": losses,
                  "train_time_s": time.perf_counter() - began}
          results["runs"].extend(_finish(params, base, kind, compression, ratios, cfg,
                                         evaluate, evals, log,
                                         lambda p: _path_mass(apply_fn, p, example)))
  results["summary"] = summary_rows(results)
  results["table"] = format_gsm(results)
  results["wall_time_s"] = time.perf_counter() - t_start
  log("\n" + results["table"])
  os.makedirs(cfg.out, exist_ok=True)
  from pathsgd_jax.experiments import plotting  # pylint: disable=g-import-not-at-top
  plotting.save_figure(plot_gsm(results), os.path.join(cfg.out, "gsm.png"))
  results["figures"] = ["gsm.png"]
  common.write_json(os.path.join(cfg.out, "results.json"), results)
  return results


def _train(chunk_fn, params, state, lr, x, y, cfg: GSMConfig, chunk: int):
  """Trains for cfg.epochs; returns the final params (None if the loss became non-finite)
  and the mean mini-batch loss of every epoch."""
  n = int(x.shape[0])
  lr = jnp.asarray(lr, jnp.float32)
  losses = []
  for epoch in range(1, cfg.epochs + 1):
    order = training.epoch_order(n, cfg.batch_size, cfg.seed, epoch)
    epoch_losses = []
    for start in range(0, len(order), chunk):
      steps = np.arange(start, start + chunk, dtype=np.int32)
      params, state, out = chunk_fn(params, state, lr, jax.random.key(0), x, y,
                                    order[start:start + chunk], steps)
      epoch_losses.append(np.asarray(out))
    losses.append(float(np.concatenate(epoch_losses).mean()))
    if not math.isfinite(losses[-1]):
      return None, losses
  return params, losses


def _path_mass(apply_fn, params, example):
  """|w|·√κ: the rescaling-invariant magnitude Path-GSM's final pruning ranks by."""
  kappa = psgd.path_scales(apply_fn, params, example)
  return jax.tree.map(lambda w, k: jnp.abs(w) * jnp.sqrt(k), params, kappa)


def _finish(params, base, kind, compression, ratios, cfg, evaluate, evals, log, path_mass):
  """Rows of one training run: the pruned network(s) evaluated, with per-layer sparsity."""
  dense = kind == "gsm" and compression == 1
  if dense:
    targets = [("dense", 1.0)] + ([("magnitude", c) for c in ratios]
                                  if "magnitude" in cfg.methods else [])
  else:
    targets = [(kind, compression)]
  rows = []
  for method, c in targets:
    row = dict(base, method=method, compression=float(c), diverged=params is None)
    if params is not None:
      pruned = params if method == "dense" else psgd.prune_to_compression(
          params, c, scores=path_mass(params) if method == "path-gsm" else None)
      report = psgd.sparsity_report(pruned)
      row.update(test_accuracy=_accuracy(evaluate, pruned, evals["test"]),
                 val_accuracy=_accuracy(evaluate, pruned, evals["val"]),
                 achieved_compression=report.compression,
                 layers=[{"path": l.path, "size": l.size, "nonzero": l.nonzero}
                         for l in report.leaves if l.prunable])
      if method != "dense":
        row["test_accuracy_before_pruning"] = _accuracy(evaluate, params, evals["test"])
    if method == "magnitude":
      row["train_loss_per_epoch"] = None  # the dense row holds them
    rows.append(row)
    log(f"[gsm] {base['network']:<8} {base['init']:<10} {method:<9} {c:>5g}x: " + (
        "diverged" if params is None else
        f"test accuracy {row['test_accuracy']:.4f}" + (
            f" (before pruning {row['test_accuracy_before_pruning']:.4f})"
            if "test_accuracy_before_pruning" in row else "")))
  return rows


def summary_rows(results: dict) -> list[dict]:
  """One row per network x start x method x ratio: test accuracy after the final pruning."""
  return [{k: r.get(k) for k in ("network", "init", "method", "compression", "test_accuracy",
                                 "test_accuracy_before_pruning", "achieved_compression")}
          for r in results["runs"]]


def format_gsm(results: dict) -> str:
  """Test accuracy (%) per network, start and method (rows) against the ratio (columns)."""
  cells = {(r["network"], r["init"], r["method"], r["compression"]): r
           for r in results["summary"]}
  ratios = sorted({c for (_, _, m, c) in cells if m != "dense"})
  body = []
  for net in results["config"]["networks"]:
    for init in results["config"]["inits"]:
      for method in METHODS:
        if not any(k[:3] == (net, init, method) for k in cells):
          continue
        row = [net, init, method]
        for c in ratios:
          r = cells.get((net, init, method, c)) or cells.get((net, init, method, 1.0))
          row.append("-" if r is None else "diverged" if r["test_accuracy"] is None else
                     f"{100 * r['test_accuracy']:.2f}")
        body.append(row)
  ref = ", ".join(f"{n} {c}x {a}%" for (n, c), a in REFERENCE.items())
  cfg = results["config"]
  return (common.table(["network", "start", "method"] + [f"{c:g}x" for c in ratios], body) +
          f"\n\nTest accuracy (%) on {results['dataset']['name']} "
          f"({results['dataset']['n_train']} training images), {cfg['epochs']} epochs, batch "
          f"{cfg['batch_size']}; dense: the unpruned network (same in every column). Authors "
          f"(full MNIST, approximate): {ref}.")


def plot_gsm(results: dict):
  """Test accuracy against compression, one panel per network and start."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  cfg = results["config"]
  panels = [(n, i) for n in cfg["networks"] for i in cfg["inits"]]
  fig = Figure(figsize=(4.0 * len(panels), 3.6), layout="constrained")
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  styles = {"magnitude": ("tab:blue", "s"), "gsm": ("tab:green", "o"),
            "path-gsm": ("tab:red", "^")}
  for ax, (net, init) in zip(axes, panels):
    mine = [r for r in results["summary"] if (r["network"], r["init"]) == (net, init)]
    for method, (color, marker) in styles.items():
      pts = sorted((r["compression"], 100 * r["test_accuracy"]) for r in mine
                   if r["method"] == method and r["test_accuracy"] is not None)
      if pts:
        ax.plot(*zip(*pts), color=color, marker=marker, label=method)
    for r in mine:
      if r["method"] == "dense" and r["test_accuracy"] is not None:
        ax.axhline(100 * r["test_accuracy"], color="gray", linestyle="--", label="dense")
    ax.set_xscale("log")
    ax.set_title(f"{net}, {init} start", fontsize=10)
    ax.set_xlabel("compression (prunable / non-zero)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"GSM vs Path-GSM vs magnitude pruning, {results['dataset']['name']}, "
               f"{cfg['epochs']} epochs", fontsize=10)
  return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
  d = GSMConfig()
  parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(d.networks))
  parser.add_argument("--compressions", nargs="+", type=float, default=list(d.compressions),
                      help="global ratios (default: %(default)s)")
  parser.add_argument("--init", nargs="+", choices=INITS, default=list(d.inits))
  parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(d.methods))
  parser.add_argument("--dataset", default=d.dataset,
                      help="mnist5k (embedded, default), fashion_mnist, mnist (--data-dir)")
  parser.add_argument("--data-dir", default=None, metavar="DIR")
  parser.add_argument("--epochs", type=int, default=d.epochs)
  parser.add_argument("--batch-size", type=int, default=d.batch_size)
  parser.add_argument("--lr", type=float, default=d.lr, help="GSM and dense learning rate")
  parser.add_argument("--path-lr", type=float, default=None,
                      help="Path-GSM learning rate (default: first step matched to GSM's)")
  parser.add_argument("--momentum", type=float, default=d.momentum)
  parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
  parser.add_argument("--seed", type=int, default=d.seed)
  parser.add_argument("--train-subset", type=int, default=None, metavar="N")
  parser.add_argument("--test-subset", type=int, default=None, metavar="N")
  parser.add_argument("--out", default=d.out, help="output directory (default: %(default)s)")
  parser.add_argument("--quiet", action="store_true", help="no per-run log lines")


def config_from_args(args: argparse.Namespace) -> GSMConfig:
  return GSMConfig(
      networks=tuple(args.networks), compressions=tuple(args.compressions),
      inits=tuple(args.init), methods=tuple(args.methods), dataset=args.dataset,
      data_dir=args.data_dir, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
      path_lr=args.path_lr, momentum=args.momentum, weight_decay=args.weight_decay,
      seed=args.seed, train_subset=args.train_subset, test_subset=args.test_subset,
      out=args.out)
