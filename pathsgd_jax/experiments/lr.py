"""One learning-rate rule for every model: ``suggest_learning_rate`` against grids.

For every model of the gallery (:mod:`pathsgd_jax.experiments.gallery`: the paper's MLP from
a balanced and an unbalanced start, the Flax MNIST-example CNN, a zero-initialised ResNet with
train-mode and with eval-mode BatchNorm, an NNX CNN with BatchNorm and dropout, Equinox's MLP
and a small Equinox CNN) on the embedded MNIST digits, this

1. computes the gradient of the training loss on the first batch and the suggested learning
   rate ``pathsgd_jax.suggest_learning_rate(..., target=--target, momentum=--momentum)``,
   the η whose first step changes the network by ``target`` in the path metric;
2. trains ``path_sgd(η, momentum=--momentum, max_relative_step=--max-relative-step)`` for
   --steps steps with that η (one setting for every model: no per-model tuning), and
3. for comparison the same optimizer with every η of --grid, and ``optax.sgd`` (same
   momentum) with every η of --sgd-grid.

Every run sees the same batches (batch --batch-size from the first --n-train digits). The
loss before and after is the deterministic loss (no dropout; BatchNorm as in training) on
all --n-train digits. A run whose loss or parameters turn non-finite is marked diverged. The
grid's best is the η with the lowest loss after; ``best/suggested`` is how far the rule is
from it (1 = on it).

Outputs in --out: results.json (configuration, every run's loss curve on the training
batches, the measured relative size of the suggested first step, the path norm) and lr.png
(loss after training, relative to before, against η/η_suggested: one line per model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pathsgd_jax as psgd
from pathsgd_jax._learning_rate import DEFAULT_TARGET
from pathsgd_jax.experiments import common, gallery

GRID = (1.0, 0.1, 0.01, 1e-3, 1e-4)


@dataclasses.dataclass(frozen=True)
class LrConfig:
  """Options of the learning-rate study (see ``pathsgd-jax lr --help``)."""

  models: tuple[str, ...] = gallery.MODELS
  target: float = DEFAULT_TARGET
  other_targets: tuple[float, ...] = (0.1, 1.0)
  momentum: float = 0.9
  max_relative_step: float | None = 1.0
  steps: int = 60
  batch_size: int = 64
  n_train: int = 1024
  grid: tuple[float, ...] = GRID
  sgd_grid: tuple[float, ...] = GRID
  mlp_width: int = 1000
  resnet_stages: tuple[int, ...] = (8, 16)
  resnet_blocks: int = 1
  seed: int = 0
  out: str = "runs/lr"

  def __post_init__(self):
    unknown = [m for m in self.models if m not in gallery.MODELS]
    if unknown or not self.models:
      raise common.ConfigError(f"unknown or no models {unknown!r}; choose from "
                               f"{', '.join(gallery.MODELS)}.")
    for name in ("grid", "sgd_grid"):
      if not all(v > 0 and math.isfinite(v) for v in getattr(self, name)):
        raise common.ConfigError(f"{name} must hold positive finite learning rates.")
    if not all(t > 0 and math.isfinite(t) for t in (self.target, *self.other_targets)):
      raise common.ConfigError("targets must be positive and finite.")
    if not 0 <= self.momentum < 1:
      raise common.ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}.")
    for name in ("steps", "batch_size", "n_train", "mlp_width", "resnet_blocks"):
      if getattr(self, name) < 1:
        raise common.ConfigError(f"{name} must be a positive integer.")
    if self.batch_size > self.n_train:
      raise common.ConfigError("batch_size must be at most n_train.")


def _finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


def _trainer(problem: gallery.Problem, cfg: LrConfig, kind: str, example):
  """A jitted step with the learning rate as an argument: one compilation per optimizer."""
  momentum = cfg.momentum or None

  def make_tx(lr):
    if kind == "sgd":
      return optax.sgd(lr, momentum=momentum)
    return psgd.path_sgd(lr, problem.path_fn, example, momentum=momentum,
                         max_relative_step=cfg.max_relative_step)

  @jax.jit
  def step(params, aux, opt_state, lr, xb, yb):
    (loss, aux), grads = jax.value_and_grad(problem.loss, has_aux=True)(params, aux, xb, yb)
    updates, opt_state = make_tx(lr).update(grads, opt_state, params, inputs=xb)
    return optax.apply_updates(params, updates), aux, opt_state, loss

  return make_tx, step


def run_model(name: str, cfg: LrConfig, x_nhwc: np.ndarray, y: np.ndarray, log=print) -> dict:
  """The suggested η, its run, and the grids, for one gallery model."""
  problem = gallery.make(name, x_nhwc, seed=cfg.seed, mlp_width=cfg.mlp_width,
                         resnet_stages=cfg.resnet_stages, resnet_blocks=cfg.resnet_blocks)
  x = jnp.asarray(gallery.layout(x_nhwc, problem.layout))
  y = jnp.asarray(y)
  order = np.random.default_rng(cfg.seed).integers(0, len(x) - cfg.batch_size + 1, cfg.steps)
  batches = [(x[i:i + cfg.batch_size], y[i:i + cfg.batch_size]) for i in order]
  eval_loss = jax.jit(problem.eval_loss)
  start = float(eval_loss(problem.params, problem.aux, x, y))

  t0 = time.perf_counter()
  xb, yb = batches[0]
  grads, _ = jax.jit(jax.grad(problem.loss, has_aux=True))(problem.params, problem.aux, xb, yb)
  targets = [cfg.target] + [t for t in cfg.other_targets if t != cfg.target]
  rules = [psgd.suggest_learning_rate(problem.path_fn, problem.params, grads, xb, target=t,
                                      momentum=cfg.momentum or None) for t in targets]
  suggested = rules[0]
  suggest_s = time.perf_counter() - t0
  phi = float(psgd.path_norm(problem.path_fn, problem.params, xb))
  log(f"[lr] {name}: {problem.description}; {gallery.count(problem.params):,} parameters, "
      f"φ₂ = {phi:.4g}, loss at start {start:.4f}, suggested η = {suggested:.3g} "
      f"({suggest_s:.1f}s)")

  runs = []
  n_rules = len(rules)
  for kind, rates in (("path-sgd", [*rules, *cfg.grid]), ("sgd", list(cfg.sgd_grid))):
    make_tx, step = _trainer(problem, cfg, kind, xb)
    for i, lr in enumerate(rates):
      params, aux = problem.params, problem.aux
      opt_state = make_tx(lr).init(params)
      losses, first_step = [], None
      t0 = time.perf_counter()
      for j, (xb_j, yb_j) in enumerate(batches):
        new, aux, opt_state, loss = step(params, aux, opt_state, jnp.asarray(lr, jnp.float32),
                                         xb_j, yb_j)
        if j == 0 and kind == "path-sgd" and i < n_rules:
          first_step = psgd.relative_step(problem.path_fn, params,
                                          jax.tree.map(jnp.subtract, new, params), xb_j)
        params = new
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
          break
      end = float(eval_loss(params, aux, x, y)) if _finite(params) else float("nan")
      diverged = not (math.isfinite(end) and all(map(math.isfinite, losses)))
      is_rule = kind == "path-sgd" and i < n_rules
      runs.append({"optimizer": kind, "rule": is_rule, "target": targets[i] if is_rule else None,
                   "lr": lr,
                   "loss_before": start, "loss_after": None if diverged else end,
                   "diverged": diverged, "batch_losses": losses,
                   "first_relative_step": first_step,
                   "wall_time_s": time.perf_counter() - t0})
      tag = f"(rule {targets[i]:g})" if is_rule else ""
      log(f"[lr]   {kind:8s} {tag:11s} η = {lr:<9.3g} "
          f"loss {start:.4f} -> {common.fmt(runs[-1]['loss_after'])}")
  return {"model": name, "description": problem.description,
          "parameters": gallery.count(problem.params), "path_norm": phi,
          "loss_before": start, "suggested_lr": suggested, "suggest_time_s": suggest_s,
          "runs": runs}


def _best(runs, kind):
  ok = [r for r in runs if r["optimizer"] == kind and not r["rule"] and not r["diverged"]]
  return min(ok, key=lambda r: r["loss_after"]) if ok else None


def summary_rows(results: dict) -> list[dict]:
  rows = []
  for m in results["models"]:
    rules = [r for r in m["runs"] if r["rule"]]
    rule = rules[0]
    best, sgd = _best(m["runs"], "path-sgd"), _best(m["runs"], "sgd")
    rows.append({
        "model": m["model"], "suggested_lr": m["suggested_lr"],
        "loss_before": m["loss_before"], "rule_loss_after": rule["loss_after"],
        "first_relative_step": rule["first_relative_step"],
        "other_targets": {f"{r['target']:g}": {"lr": r["lr"], "loss_after": r["loss_after"]}
                          for r in rules[1:]},
        "grid_best_lr": best and best["lr"], "grid_best_loss_after": best and best["loss_after"],
        "best_over_suggested": best and best["lr"] / m["suggested_lr"],
        "grid_diverged": [r["lr"] for r in m["runs"]
                          if r["optimizer"] == "path-sgd" and r["diverged"] and not r["rule"]],
        "sgd_best_lr": sgd and sgd["lr"], "sgd_best_loss_after": sgd and sgd["loss_after"]})
  return rows


def format_summary(rows: list[dict]) -> str:
  f = common.fmt
  others = list(rows[0]["other_targets"]) if rows else []
  return common.table(
      ["model", "suggested η", "loss before", "rule: after"]
      + [f"target {t}: after" for t in others]
      + ["grid best η", "after", "best/sugg.", "SGD best η", "after"],
      [[r["model"], f(r["suggested_lr"], ".3g"), f(r["loss_before"]), f(r["rule_loss_after"])]
       + [f(r["other_targets"][t]["loss_after"]) for t in others]
       + [f(r["grid_best_lr"], "g"), f(r["grid_best_loss_after"]),
          f(r["best_over_suggested"], ".2g"), f(r["sgd_best_lr"], "g"),
          f(r["sgd_best_loss_after"])] for r in rows])


def plot_lr(results: dict):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
  for m in results["models"]:
    pts = sorted((r["lr"] / m["suggested_lr"], min(r["loss_after"] / m["loss_before"], 1.25))
                 for r in m["runs"] if r["optimizer"] == "path-sgd" and not r["diverged"])
    line, = ax.plot(*zip(*pts), marker="o", ms=3, label=m["model"])
    rule = next(r for r in m["runs"] if r["rule"])
    if not rule["diverged"]:
      ax.plot([1.0], [min(rule["loss_after"] / m["loss_before"], 1.25)], marker="*", ms=11,
              color=line.get_color())
  ax.axvline(1.0, color="0.6", lw=0.8, ls="--")
  ax.set_xscale("log")
  ax.set_ylim(0, 1.3)  # ratios above 1.25 (blown-up losses) are drawn at 1.25
  ax.set_xlabel("η / η_suggested")
  ax.set_ylabel("loss after / loss before")
  cfg = results["config"]
  ax.set_title(f"Path-SGD, {cfg['steps']} steps, momentum {cfg['momentum']}, target "
               f"{cfg['target']} (★ = suggested η; ratios > 1.25 drawn at 1.25)", fontsize=9)
  ax.legend(fontsize=7)
  return fig


def run_lr(cfg: LrConfig, log=print, merge: Sequence[str] = ()) -> dict:
  """Runs the study, or with ``merge`` joins the results.json of runs split by --models."""
  t0 = time.perf_counter()
  if merge:
    parts = [json.load(open(os.path.join(d, "results.json"), encoding="utf-8")) for d in merge]
    configs = [{k: v for k, v in p["config"].items() if k not in ("models", "out")}
               for p in parts]
    if any(c != configs[0] for c in configs):
      raise common.ConfigError("--merge: the runs were made with different options.")
    results = {"config": {**parts[0]["config"], "out": cfg.out}, "merged_from": list(merge),
               "environment": parts[0]["environment"],
               "models": [m for p in parts for m in p["models"]]}
    results["config"]["models"] = [m["model"] for m in results["models"]]
    results["wall_time_s"] = sum(p["wall_time_s"] for p in parts)
  else:
    data = psgd.data.load("mnist5k")
    x, y = np.asarray(data.x_train[:cfg.n_train]), np.asarray(data.y_train[:cfg.n_train])
    results = {"config": dataclasses.asdict(cfg), "environment": common.environment(),
               "models": [run_model(name, cfg, x, y, log=log) for name in cfg.models]}
    results["wall_time_s"] = time.perf_counter() - t0
  results["summary"] = summary_rows(results)
  cfg = dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in results["config"].items()})
  os.makedirs(cfg.out, exist_ok=True)
  fig = plot_lr(results)
  fig.savefig(os.path.join(cfg.out, "lr.png"), dpi=150)
  results["figures"] = ["lr.png"]
  common.write_json(os.path.join(cfg.out, "results.json"), results)
  print()
  print(f"Path-SGD, momentum {cfg.momentum}, max_relative_step {cfg.max_relative_step}, "
        f"{cfg.steps} steps of batch {cfg.batch_size}; loss on the first {cfg.n_train} "
        f"digits; suggested η at target {cfg.target}:")
  print(format_summary(results["summary"]))
  print(f"Total {results['wall_time_s']:.1f}s. Wrote {os.path.join(cfg.out, 'results.json')} "
        f"and {os.path.join(cfg.out, 'lr.png')}")
  return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
  d = LrConfig()
  parser.add_argument("--models", nargs="+", default=list(d.models), choices=gallery.MODELS)
  parser.add_argument("--target", type=float, default=d.target,
                      help="relative change of the network in the first step (default "
                           "%(default)s)")
  parser.add_argument("--other-targets", type=float, nargs="*", default=list(d.other_targets),
                      help="further targets run for comparison (default %(default)s)")
  parser.add_argument("--momentum", type=float, default=d.momentum)
  parser.add_argument("--max-relative-step", type=float, default=d.max_relative_step,
                      help="path_sgd's trust region for every Path-SGD run; 0 = off "
                           "(default %(default)s)")
  parser.add_argument("--steps", type=int, default=d.steps)
  parser.add_argument("--batch-size", type=int, default=d.batch_size)
  parser.add_argument("--n-train", type=int, default=d.n_train)
  parser.add_argument("--grid", type=float, nargs="+", default=list(d.grid))
  parser.add_argument("--sgd-grid", type=float, nargs="+", default=list(d.sgd_grid))
  parser.add_argument("--mlp-width", type=int, default=d.mlp_width)
  parser.add_argument("--resnet-stages", type=int, nargs="+", default=list(d.resnet_stages))
  parser.add_argument("--resnet-blocks", type=int, default=d.resnet_blocks)
  parser.add_argument("--seed", type=int, default=d.seed)
  parser.add_argument("--out", default=d.out, help="output directory (default %(default)s)")
  parser.add_argument("--quiet", action="store_true", help="no per-run log lines")
  parser.add_argument("--merge", nargs="+", default=(), metavar="DIR",
                      help="join the results.json of runs made with the same options and "
                           "different --models into --out (no training)")


def config_from_args(args: argparse.Namespace) -> LrConfig:
  return LrConfig(models=tuple(args.models), target=args.target,
                  other_targets=tuple(args.other_targets), momentum=args.momentum,
                  max_relative_step=args.max_relative_step or None, steps=args.steps,
                  batch_size=args.batch_size, n_train=args.n_train, grid=tuple(args.grid),
                  sgd_grid=tuple(args.sgd_grid), mlp_width=args.mlp_width,
                  resnet_stages=tuple(args.resnet_stages), resnet_blocks=args.resnet_blocks,
                  seed=args.seed, out=args.out)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="pathsgd-jax lr", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(parser)
  args = parser.parse_args(argv)
  run_lr(config_from_args(args), log=(lambda *a: None) if args.quiet else print,
         merge=args.merge)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
