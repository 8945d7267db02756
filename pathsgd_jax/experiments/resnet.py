"""Path-SGD on a small BatchNorm ResNet: SGD + momentum, Path-SGD + momentum, Adam.

A ResNet v1.5-style network (:func:`pathsgd_jax.experiments.models.resnet`: stem, one basic
block per stage, the last BatchNorm scale of every residual branch initialised to 0, global
average pooling, dense head) trained with softmax cross-entropy in train mode (BatchNorm on
the batch's statistics; running averages, momentum 0.9, for evaluation) by

* ``sgd-momentum``: optax.sgd, momentum 0.9;
* ``path-sgd-momentum``: pathsgd_jax.path_sgd, momentum 0.9, the network read at the
  statistics of the batch being trained on (``tx.update(..., inputs=x)``), the paper's rule
  (no trust region);
* ``path-sgd-momentum-trust``: the same with the trust region ``max_relative_step=1.0``
  that keeps near-dead (zero-initialised) branches from taking huge steps;
* ``adam``: optax.adam.

Two starts that compute the same function: ``balanced`` (Flax's initialisation: LeCun-normal
kernels, BatchNorm scale 1 and bias 0, the branches' last scale 0) and ``unbalanced``, the
same network after two kinds of random power-of-two node rescalings (:func:`unbalance`):

1. *absorbed*: every convolution's output channel k is multiplied by a_k (all convolutions
   here feed a BatchNorm, which divides the factor out again; the running mean and variance
   are multiplied by a_k and a_k² so that evaluation mode agrees too). Exact up to
   BatchNorm's ε: the normalised value changes by a relative ≈ ε(1 − 1/a²)/(2σ²);
2. *compensated*: inside each block, channel k of the first BatchNorm's output (scale and
   bias) is multiplied by b_k and the second convolution's input channel k divided by b_k;
   ReLU is positively homogeneous, so this is exact in floating point.

The factors follow the Path-SGD paper's recipe (round(h/4) draws per layer with replacement,
each multiplying a channel's factor by 10·exp(z), z ~ N(0, 1)), rounded to powers of two.
SGD and Adam see very differently scaled weights (an absorbed factor a divides the
effective SGD learning rate of that channel by a²); Path-SGD with the train-mode reading is
invariant to both rescalings up to that ε.

Protocol as in ``pathsgd-jax paper``: for each optimizer and start every learning rate of the
optimizer's grid trains for the full ``--epochs``, runs with a non-finite loss are discarded,
the one with the lowest final validation error (ties: lower training loss, then larger rate)
is reported; the training loss is the cross-entropy on the whole training split at the end
of each epoch in evaluation mode (running averages); the mean mini-batch (train-mode) loss is
stored too. Every run sees the same mini-batches. Outputs in --out: results.json, resnet.png
(training loss and test error against epochs, one column per start); a table is printed.
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
import numpy as np
import optax
from jax import lax

import pathsgd_jax as psgd
from pathsgd_jax.experiments import common, models, paper, training

OPTIMIZERS = ("sgd-momentum", "path-sgd-momentum", "path-sgd-momentum-trust", "adam")
INITS = ("balanced", "unbalanced")
LABELS = {"sgd-momentum": "SGD + momentum", "path-sgd-momentum": "Path-SGD + momentum",
          "path-sgd-momentum-trust": "Path-SGD + momentum, trust region", "adam": "Adam"}
COLORS = {"sgd-momentum": "tab:blue", "path-sgd-momentum": "tab:orange",
          "path-sgd-momentum-trust": "tab:red", "adam": "tab:purple"}
DEFAULT_GRIDS = {"sgd-momentum": (1.0, 0.3, 0.1), "path-sgd-momentum": (1.0, 0.1, 0.01),
                 "path-sgd-momentum-trust": (3.0, 1.0, 0.3), "adam": (0.01, 0.003, 0.001)}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """Options of the ResNet experiment (see ``pathsgd-jax resnet --help``)."""

  dataset: str = "mnist5k"
  data_dir: str | None = None
  downsample: int = 4  # Average-pool the images by this factor (28x28 -> 7x7).
  stage_features: tuple[int, ...] = (8, 16, 32)
  blocks_per_stage: int = 1
  epochs: int = 6
  batch_size: int = 100
  optimizers: tuple[str, ...] = OPTIMIZERS
  inits: tuple[str, ...] = INITS
  lr_grids: dict[str, tuple[float, ...]] | None = None  # None: DEFAULT_GRIDS.
  momentum: float = 0.9
  max_relative_step: float = 1.0
  unbalance_fraction: float = 0.25
  unbalance_factor: float = 10.0
  seed: int = 0
  val_fraction: float = 0.1
  train_subset: int | None = None
  test_subset: int | None = None
  steps_per_call: int = 50
  eval_batch: int = 500
  out: str = "runs/resnet"

  def grid_for(self, optimizer: str) -> list[float]:
    grids = dict(DEFAULT_GRIDS, **(self.lr_grids or {}))
    return [float(v) for v in grids[optimizer]]

  def __post_init__(self):
    for name, allowed in (("optimizers", OPTIMIZERS), ("inits", INITS)):
      bad = [v for v in getattr(self, name) if v not in allowed]
      if bad or not getattr(self, name):
        raise common.ConfigError(f"--{name} must be among {', '.join(allowed)}, got {bad}.")
    for opt in self.lr_grids or {}:
      if opt not in OPTIMIZERS:
        raise common.ConfigError(f"--lr-grids names unknown optimizer {opt!r}; choose from "
                                 f"{', '.join(OPTIMIZERS)}.")
    for opt in self.optimizers:
      grid = self.grid_for(opt)
      if not grid or not all(v > 0 and math.isfinite(v) for v in grid):
        raise common.ConfigError(f"The learning-rate grid of {opt} must be non-empty, positive "
                                 f"and finite, got {grid}.")
    for name in ("downsample", "blocks_per_stage", "epochs", "batch_size", "steps_per_call",
                 "eval_batch"):
      if getattr(self, name) < 1:
        raise common.ConfigError(f"--{name.replace('_', '-')} must be positive, got "
                                 f"{getattr(self, name)}.")
    if not self.stage_features or min(self.stage_features) < 1:
      raise common.ConfigError(f"--stage-features must be positive, got {self.stage_features}.")
    if not 0 <= self.momentum < 1 or not self.max_relative_step > 0:
      raise common.ConfigError("need 0 <= --momentum < 1 and --max-relative-step > 0.")


# ---------------------------------------------------------------------------------------------
# Data, starts, optimizers.
# ---------------------------------------------------------------------------------------------


def load_images(cfg: ResNetConfig) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
  """Train / validation / test splits as NHWC images, average-pooled by ``cfg.downsample``."""
  splits, info = paper.load_splits(cfg, cfg.dataset)
  side = math.isqrt(info["input_dim"])
  if side * side != info["input_dim"] or side % cfg.downsample:
    raise common.ConfigError(f"{info['name']} has {info['input_dim']} input features: need "
                             f"square one-channel images whose side is divisible by "
                             f"--downsample {cfg.downsample}.")
  d, s = cfg.downsample, side // cfg.downsample
  out = {}
  for name, (x, y) in splits.items():
    x = x.reshape(len(x), s, d, s, d, 1).mean(axis=(2, 4)).astype(np.float32)
    out[name] = (x, y)
  info = dict(info, image_shape=[s, s, 1])
  return out, info


def _convs_and_norms(params: dict) -> tuple[list[tuple[tuple, tuple]], list[tuple]]:
  """(conv path, its BatchNorm path) of every convolution, and the blocks' paths."""
  pairs, blocks = [(("stem_conv",), ("stem_bn",))], []
  for name in sorted(k for k in params if k.startswith("stage")):
    blocks.append((name,))
    for conv, norm in (("conv1", "bn1"), ("conv2", "bn2"), ("proj_conv", "proj_bn")):
      if conv in params[name]:
        pairs.append(((name, conv), (name, norm)))
  return pairs, blocks


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def sample_scales(key: jax.Array, params: dict, *, fraction: float = 0.25,
                  factor: float = 10.0) -> dict[str, dict]:
  """Random power-of-two factors: ``{"absorbed": {conv path: a}, "compensated": {block: b}}``
  (a per output channel of every convolution, b per channel of every block's ``bn1``)."""
  pairs, blocks = _convs_and_norms(params)
  key_a, key_b = jax.random.split(key)
  scales_a = psgd.init.sample_unbalanced_scales(
      key_a, [_get(params, conv)["kernel"].shape[-1] for conv, _ in pairs], fraction=fraction,
      factor=factor, power_of_two=True)
  scales_b = psgd.init.sample_unbalanced_scales(
      key_b, [_get(params, blk)["bn1"]["scale"].shape[0] for blk in blocks],
      fraction=fraction, factor=factor, power_of_two=True)
  return {"absorbed": dict(zip((conv for conv, _ in pairs), scales_a)),
          "compensated": dict(zip(blocks, scales_b))}


def rescale(variables: dict, scales: dict[str, dict]) -> dict:
  """Applies :func:`sample_scales`' factors (see the module docstring); ``batch_stats`` may be
  omitted (then only ``params`` are mapped, e.g. to map an update)."""
  copy = lambda tree: jax.tree.map(lambda a: a, dict(tree))  # noqa: E731  (fresh dicts)
  params, stats = copy(variables["params"]), copy(variables.get("batch_stats", {}))
  pairs = dict(_convs_and_norms(params)[0])
  for conv, a in scales["absorbed"].items():  # absorbed by the BatchNorm after the conv
    layer = _get(params, conv)
    layer["kernel"] = layer["kernel"] * a[None, None, None, :]
    if stats:
      running = _get(stats, pairs[conv])
      running["mean"] = running["mean"] * a
      running["var"] = running["var"] * (a * a)
  for blk, b in scales["compensated"].items():  # node rescaling after bn1, undone by conv2
    block = _get(params, blk)
    block["bn1"] = {"scale": block["bn1"]["scale"] * b, "bias": block["bn1"]["bias"] * b}
    block["conv2"]["kernel"] = block["conv2"]["kernel"] / b[None, None, :, None]
  return {"params": params, "batch_stats": stats} if stats else {"params": params}


def unbalance(key: jax.Array, variables: dict, *, fraction: float = 0.25,
              factor: float = 10.0) -> tuple[dict, dict]:
  """The rescaled copy of ``variables`` (the same function), the number of channels of each
  kind whose factor is not 1, and the factors (:func:`sample_scales`)."""
  scales = sample_scales(key, variables["params"], fraction=fraction, factor=factor)
  counts = {}
  for kind, by_path in scales.items():
    counts[kind] = int(sum(int(jnp.sum(v != 1)) for v in by_path.values()))
    counts[kind + "_total"] = int(sum(v.size for v in by_path.values()))
  return rescale(variables, scales), counts, scales


def starts(cfg: ResNetConfig, model, example: jax.Array) -> tuple[dict[str, dict], dict]:
  """``{init: variables}`` for the configured starts, the rescaling counts and factors."""
  key_init, key_unbal = jax.random.split(jax.random.key(cfg.seed))
  balanced = model.init(key_init, example[:2])
  balanced = {"params": balanced["params"], "batch_stats": balanced["batch_stats"]}
  out, counts, scales = {"balanced": balanced}, {}, None
  if "unbalanced" in cfg.inits:
    out["unbalanced"], counts, scales = unbalance(
        key_unbal, balanced, fraction=cfg.unbalance_fraction, factor=cfg.unbalance_factor)
  return out, counts, scales


def function_gap(model, a: dict, b: dict, x: jax.Array) -> dict[str, float]:
  """max |logits_a − logits_b| / max |logits_a| in train mode and in evaluation mode."""
  out = {}
  for mode, train in (("train_mode", True), ("eval_mode", False)):
    la, lb = (model.apply(v, x, train=train, mutable=["batch_stats"])[0] if train
              else model.apply(v, x) for v in (a, b))
    out[mode] = float(jnp.max(jnp.abs(la - lb)) / jnp.max(jnp.abs(la)))
  return out


def make_optimizer(name: str, model, variables: dict, example: jax.Array,
                   cfg: ResNetConfig) -> optax.GradientTransformationExtraArgs:
  """Optimizer ``name`` with its learning rate injected (set per run by the train chunk).

  Path-SGD reads the network in train mode; the ``batch_stats`` given to the adapter only
  fill the collection (train-mode outputs do not depend on them).
  """
  if name == "sgd-momentum":
    return optax.inject_hyperparams(optax.sgd)(learning_rate=1.0, momentum=cfg.momentum)
  if name == "adam":
    return optax.inject_hyperparams(optax.adam)(learning_rate=1.0)
  path_fn = psgd.linen.apply_fn(model, variables={"batch_stats": variables["batch_stats"]},
                                train=True, mutable=["batch_stats"])
  static = ("apply_fn", "example_input", "momentum", "max_relative_step")
  return optax.inject_hyperparams(psgd.path_sgd, static_args=static)(
      learning_rate=1.0, apply_fn=path_fn, example_input=example, momentum=cfg.momentum,
      max_relative_step=cfg.max_relative_step if name.endswith("-trust") else None)


def make_train_chunk(model, tx) -> Any:
  """A jitted chunk of train-mode steps with the :func:`training.train_run` signature; its
  "params" are the model's variables (``params`` and ``batch_stats``)."""

  def loss_fn(params, batch_stats, x, y):
    logits, new = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                              mutable=["batch_stats"])
    return jnp.mean(training.cross_entropy(logits, y)), new["batch_stats"]

  def chunk(variables, opt_state, lr, key, x_all, y_all, idx, steps):
    del key, steps  # no dropout

    def body(carry, batch_idx):
      variables, opt_state = carry
      x, y = jnp.take(x_all, batch_idx, axis=0), jnp.take(y_all, batch_idx, axis=0)
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          variables["params"], variables["batch_stats"], x, y)
      hyper = dict(opt_state.hyperparams, learning_rate=lr.astype(jnp.float32))
      updates, opt_state = tx.update(grads, opt_state._replace(hyperparams=hyper),
                                     variables["params"], inputs=x)
      params = optax.apply_updates(variables["params"], updates)
      return ({"params": params, "batch_stats": stats}, opt_state), loss

    (variables, opt_state), losses = lax.scan(body, (variables, opt_state), idx)
    return variables, opt_state, losses

  return jax.jit(chunk, donate_argnums=(0, 1))


# ---------------------------------------------------------------------------------------------
# The experiment.
# ---------------------------------------------------------------------------------------------


def run_resnet(cfg: ResNetConfig, log=print) -> dict:
  """Trains every optimizer x start x learning rate; writes results.json and resnet.png."""
  t_start = time.perf_counter()
  splits, info = load_images(cfg)
  model = models.resnet(cfg.stage_features, cfg.blocks_per_stage, info["num_classes"])
  x_train, y_train = jnp.asarray(splits["train"][0]), jnp.asarray(splits["train"][1])
  example = x_train[:cfg.batch_size]
  inits, counts, scales = starts(cfg, model, example)
  gap = (function_gap(model, inits["balanced"], inits["unbalanced"], example)
         if "unbalanced" in inits else None)
  n_params = sum(int(v.size) for v in jax.tree.leaves(inits["balanced"]["params"]))
  evals = {s: training.EvalData.build(*splits[s], batch=min(cfg.eval_batch, len(splits[s][1])))
           for s in ("train", "val", "test")}
  evaluate = training.make_evaluator(lambda v, x: model.apply(v, x, train=False))
  steps_per_epoch = info["n_train"] // cfg.batch_size
  chunk = training.chunk_steps(steps_per_epoch, cfg.steps_per_call)
  results: dict[str, Any] = {
      "command": "resnet", "config": dataclasses.asdict(cfg),
      "grids": {o: cfg.grid_for(o) for o in cfg.optimizers},
      "dataset": info, "datasets": {info["name"]: info},
      "model": {"stage_features": list(cfg.stage_features),
                "blocks_per_stage": cfg.blocks_per_stage, "parameters": n_params,
                "steps_per_epoch": steps_per_epoch},
      "unbalanced_start": {"rescaled_channels": counts, "relative_logit_gap": gap},
      "protocol": {
          "selection": f"final val_error after {cfg.epochs} epochs (every grid point trains "
                       "the full budget); diverged (NaN/inf) runs discarded; ties to lower "
                       "final training loss then larger learning rate",
          "train_loss": "cross-entropy on the whole training split (validation part held "
                        "out), evaluation mode (running averages), end of each epoch",
          "train_loss_running": "mean train-mode mini-batch loss of the epoch",
          "errors": "fraction of misclassified examples, evaluation mode"},
      "trajectory_equivariance": {}, "environment": common.environment(), "runs": []}
  log(f"[resnet] {info['name']}: {info['n_train']} train / {info['n_val']} validation / "
      f"{info['n_test']} test images {info['image_shape']}, ResNet {cfg.stage_features} x "
      f"{cfg.blocks_per_stage} ({n_params} parameters), batch {cfg.batch_size}, "
      f"{cfg.epochs} epochs; unbalanced start: {counts}, logit gap {gap}")
  key = jax.random.key(0)
  for opt_name in cfg.optimizers:
    tx = make_optimizer(opt_name, model, inits["balanced"], example, cfg)
    chunk_fn = make_train_chunk(model, tx)
    compile_time = None
    for init_name in cfg.inits:
      grid_runs, t_grid = [], time.perf_counter()
      for lr in cfg.grid_for(opt_name):
        variables = jax.tree.map(jnp.copy, inits[init_name])
        opt_state = tx.init(variables["params"])
        if compile_time is None:
          t0 = time.perf_counter()
          idx = jnp.zeros((chunk, cfg.batch_size), jnp.int32)
          chunk_fn = chunk_fn.lower(variables, opt_state, jnp.float32(lr), key, x_train,
                                    y_train, idx, jnp.zeros((chunk,), jnp.int32)).compile()
          compile_time = time.perf_counter() - t0
          if scales is not None:
            results["trajectory_equivariance"][opt_name] = equivariance_gap(
                chunk_fn, tx, inits, scales, lr, key, x_train, y_train, cfg, chunk)
        run = training.train_run(
            chunk_fn=chunk_fn, evaluate=evaluate, params=variables, opt_state=opt_state,
            lr=lr, x_train=x_train, y_train=y_train, evals=evals, epochs=cfg.epochs,
            batch_size=cfg.batch_size, seed=cfg.seed, steps_per_call=chunk,
            dropout_key=key)
        grid_runs.append(run)
        log(f"[resnet] {init_name:>10} {opt_name:>23} lr={common.lr_label(lr):>6}: " + (
            f"diverged at epoch {run.stopped_at_epoch}" if run.diverged else
            f"train loss {common.fmt(run.final('train_loss'))}, val error "
            f"{common.fmt(run.final('val_error'))}, test error "
            f"{common.fmt(run.final('test_error'))}") + f" ({run.train_time_s:.1f}s)")
      chosen = training.select(grid_runs, "val_error")
      by_train = training.select(grid_runs, "train_loss")
      results["runs"].append({
          "dataset": info["name"], "init": init_name, "optimizer": opt_name,
          "chosen_index": chosen,
          "chosen_lr": None if chosen is None else grid_runs[chosen].lr,
          "chosen_lr_by_train_loss": None if by_train is None else grid_runs[by_train].lr,
          "curves": (grid_runs[chosen].curves if chosen is not None else
                     {k: [None] * cfg.epochs for k in grid_runs[0].curves}),
          "initial": grid_runs[0].initial, "grid": [r.as_dict() for r in grid_runs],
          "compile_time_s": compile_time, "wall_time_s": time.perf_counter() - t_grid})
      compile_time = 0.0  # Reported once per optimizer.
  results["summary"] = paper.summary_rows(results, "chosen_index")
  results["summary_by_train_loss"] = paper.summary_rows(results, "by_train_loss")
  results["start_agreement"] = start_agreement(results)
  results["table"] = format_table(results)
  results["wall_time_s"] = time.perf_counter() - t_start
  os.makedirs(cfg.out, exist_ok=True)
  from pathsgd_jax.experiments import plotting  # pylint: disable=g-import-not-at-top
  plotting.save_figure(plot_resnet(results), os.path.join(cfg.out, "resnet.png"))
  results["figures"] = ["resnet.png"]
  common.write_json(os.path.join(cfg.out, "results.json"), results)
  log("\n" + results["table"] + f"\n\nTotal wall time {results['wall_time_s']:.0f}s; wrote "
      f"{os.path.join(cfg.out, 'results.json')} and {os.path.join(cfg.out, 'resnet.png')}")
  return results


def equivariance_gap(chunk_fn, tx, inits, scales, lr, key, x, y, cfg, chunk) -> dict:
  """The first ``chunk`` steps from both starts: max over leaves of |R(θ_b) − θ_u| / |θ_u|
  (R the rescaling map, norms per leaf): ~0 for an optimizer whose trajectory follows the
  rescaling (Path-SGD, up to BatchNorm's ε), large for one whose does not."""
  idx = training.epoch_order(int(x.shape[0]), cfg.batch_size, cfg.seed, 1)[:chunk]
  steps = np.arange(chunk, dtype=np.int32)
  after = {}
  for name in ("balanced", "unbalanced"):
    v = jax.tree.map(jnp.copy, inits[name])
    after[name] = chunk_fn(v, tx.init(v["params"]), jnp.float32(lr), key, x, y, idx,
                           steps)[0]["params"]
  mapped = rescale({"params": after["balanced"]}, scales)["params"]
  gaps = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in
          zip(jax.tree.leaves(mapped), jax.tree.leaves(after["unbalanced"]))
          if float(jnp.linalg.norm(b)) > 0]
  return {"lr": lr, "steps": chunk, "max_relative_param_gap": max(gaps)}


def start_agreement(results: dict) -> list[dict]:
  """Per optimizer and learning rate: the largest relative gap between the balanced and the
  unbalanced start's training-loss curves (small for a rescaling-invariant optimizer)."""
  by = {(r["optimizer"], r["init"]): r for r in results["runs"]}
  rows = []
  for opt in results["config"]["optimizers"]:
    a, b = by.get((opt, "balanced")), by.get((opt, "unbalanced"))
    if a is None or b is None:
      continue
    for ga, gb in zip(a["grid"], b["grid"]):
      pairs = [(u, v) for u, v in zip(ga["curves"]["train_loss"], gb["curves"]["train_loss"])
               if u is not None and v is not None]
      gap = max((abs(u - v) / abs(u) for u, v in pairs), default=None)
      rows.append({"optimizer": opt, "lr": ga["lr"], "max_relative_train_loss_gap": gap,
                   "epochs_compared": len(pairs)})
  return rows


def format_table(results: dict) -> str:
  """The summary table (learning rate chosen by final validation error)."""
  cfg = results["config"]
  body = [[r["init"], LABELS[r["optimizer"]],
           "diverged" if r["lr"] is None else common.lr_label(r["lr"]),
           common.fmt(r["train_loss"]), common.fmt(r["val_error"]),
           common.fmt(r["test_error"])] for r in results["summary"]]
  head = ["start", "optimizer", "chosen lr", "final train loss", "final val error",
          "final test error"]
  info = results["dataset"]
  return (common.table(head, body) + f"\n\n{info['name']} {info['image_shape']}, "
          f"{info['n_train']} training images, ResNet {tuple(cfg['stage_features'])} x "
          f"{cfg['blocks_per_stage']}, batch {cfg['batch_size']}, {cfg['epochs']} epochs; "
          "learning rate chosen by final validation error.")


def plot_resnet(results: dict):
  """Training loss (log scale) and test error against epochs, one column per start."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

  inits = list(dict.fromkeys(r["init"] for r in results["runs"]))
  fig = Figure(figsize=(4.2 * len(inits) + 0.4, 6.2), layout="constrained")
  axes = fig.subplots(2, len(inits), squeeze=False)
  for c, init in enumerate(inits):
    for run in (r for r in results["runs"] if r["init"] == init):
      lr, opt = run["chosen_lr"], run["optimizer"]
      label = LABELS[opt] + (" (all diverged)" if lr is None else f" (lr {lr:g})")
      for row, key in enumerate(("train_loss", "test_error")):
        pts = [(e, v) for e, v in zip(run["curves"]["epoch"], run["curves"][key])
               if v is not None]
        axes[row, c].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                          color=COLORS[opt], label=label, gid=f"{init}/{opt}/{key}",
                          linestyle="--" if opt.endswith("-trust") else "-")
    axes[0, c].set_title(f"{init} start", fontsize=10)
    axes[0, c].set_yscale("log")
    axes[0, c].set_ylabel("training loss (eval mode)")
    axes[1, c].set_ylabel("test error")
    axes[1, c].set_xlabel("epoch")
    axes[0, c].legend(fontsize=7)
    for ax in axes[:, c]:
      ax.grid(True, which="both", alpha=0.3)
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  for row in range(2):
    lims = [ax.get_ylim() for ax in axes[row]]
    for ax in axes[row]:
      ax.set_ylim(min(lo for lo, _ in lims), max(hi for _, hi in lims))
  cfg, info = results["config"], results["dataset"]
  fig.suptitle(f"BatchNorm ResNet {tuple(cfg['stage_features'])} on {info['name']} "
               f"{info['image_shape'][0]}x{info['image_shape'][1]}, batch {cfg['batch_size']}, "
               "lr chosen by validation error", fontsize=10)
  return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
  d = ResNetConfig()
  parser.add_argument("--dataset", default=d.dataset,
                      help="mnist5k (embedded, default), fashion-mnist (Debian package), "
                           "mnist (--data-dir)")
  parser.add_argument("--data-dir", default=None, metavar="DIR")
  parser.add_argument("--downsample", type=int, default=d.downsample,
                      help="average-pool the images by this factor (default %(default)s)")
  parser.add_argument("--stage-features", type=int, nargs="+", default=list(d.stage_features))
  parser.add_argument("--blocks-per-stage", type=int, default=d.blocks_per_stage)
  parser.add_argument("--epochs", type=int, default=d.epochs)
  parser.add_argument("--batch-size", type=int, default=d.batch_size)
  parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
  parser.add_argument("--init", nargs="+", choices=INITS, default=list(INITS))
  parser.add_argument("--lr-grids", nargs="+", default=None, metavar="OPT=LR,LR",
                      help="per-optimizer grids, e.g. adam=0.01,0.001 (defaults: " + "; ".join(
                          f"{k}={','.join(f'{v:g}' for v in g)}"
                          for k, g in DEFAULT_GRIDS.items()) + ")")
  parser.add_argument("--momentum", type=float, default=d.momentum)
  parser.add_argument("--max-relative-step", type=float, default=d.max_relative_step,
                      help="trust region of path-sgd-momentum-trust (default %(default)s)")
  parser.add_argument("--seed", type=int, default=d.seed)
  parser.add_argument("--train-subset", type=int, default=None, metavar="N")
  parser.add_argument("--test-subset", type=int, default=None, metavar="N")
  parser.add_argument("--out", default=d.out, help="output directory (default %(default)s)")
  parser.add_argument("--quiet", action="store_true", help="no per-run log lines")


def _grids(items) -> dict[str, tuple[float, ...]] | None:
  if not items:
    return None
  out = {}
  for item in items:
    name, sep, values = item.partition("=")
    try:
      out[name] = tuple(float(v) for v in values.split(",") if v)
    except ValueError as e:
      raise common.ConfigError(f"--lr-grids: bad learning rate in {item!r} ({e}).") from e
    if not sep:
      raise common.ConfigError(f"--lr-grids expects OPT=LR,LR,..., got {item!r}.")
  return out


def config_from_args(args: argparse.Namespace) -> ResNetConfig:
  return ResNetConfig(
      dataset=args.dataset, data_dir=args.data_dir, downsample=args.downsample,
      stage_features=tuple(args.stage_features), blocks_per_stage=args.blocks_per_stage,
      epochs=args.epochs, batch_size=args.batch_size, optimizers=tuple(args.optimizers),
      inits=tuple(args.init), lr_grids=_grids(args.lr_grids), momentum=args.momentum,
      max_relative_step=args.max_relative_step, seed=args.seed,
      train_subset=args.train_subset, test_subset=args.test_subset, out=args.out)
