"""The RNN experiment: Path-SGD vs SGD with clipping vs Adam on ReLU RNNs (adding problem,
sequential MNIST), after Neyshabur, Wu, Salakhutdinov & Srebro (NIPS 2016).

Network: the Elman ReLU RNN of :mod:`pathsgd_jax.rnn` (one layer, ``--hidden`` units, output
read at the last step). Tasks: the adding problem of :mod:`pathsgd_jax.tasks` (MSE loss,
100k/10k seeded sequences, a further seeded validation set for learning-rate selection) or
sequential MNIST from the embedded 5k digits (cross-entropy; row by row, 28 steps, or pixel by
pixel, 784 steps).

Optimizers (every one built as ``chain(..., scale_by_learning_rate(1))`` and multiplied by a
traced learning rate, so one compilation serves the whole grid):

* ``path-sgd``: ``chain(scale_by_path_norm, clip_by_global_norm(--path-clip), trace(--momentum))``:
  Path-SGD with κ^(1) (the paper's choice), heavy-ball momentum on the path-normalised
  direction, and the preconditioned step clipped to a global norm (a trust region: without it,
  long-sequence runs spike and diverge; see ``--path-clip``);
* ``path-sgd-plain``: Path-SGD with momentum and no clipping (the ablation);
* ``sgd``: SGD with the raw gradient clipped by global norm (``--clip``) and the same momentum
  (the usual IRNN recipe);
* ``adam``: Adam (a modern reference), no clipping.

Initialisations (``--init``): ``gaussian``: ``W_rec ~ N(0, 1/n)``, ``W_in ~ N(0, 1/d)``,
``W_out ~ N(0, 1/n)``, biases 0; ``irnn``: Le et al. (2015): ``W_rec = I``, ``W_in``,
``W_out ~ N(0, 0.001²)``, biases 0.

Every grid point trains for the full ``--steps``; a run whose loss becomes NaN/inf stops and
is discarded; the learning rate with the lowest final validation metric is reported (its test
curve, no retraining). During training the ratio κ^(2)/κ^(1) (:func:`pathsgd_jax.rnn.
kappa_terms`) of the current weights is recorded at every evaluation.

What trains and what does not (adding problem, T = 100, 100 units, batch 50; measured with
this module and its scratch variants on a 2-core CPU):

* **Path-SGD needs the scaled Gaussian start.** From ``gaussian`` with momentum 0.9, the
  path-normalised step clipped to global norm 0.3 and a cosine decay, learning rates 0.1–0.3
  reach test MSE 0.002–0.003 in 12k steps (seed 0, the default run) and 0.0017–0.0024 in
  15k steps (seeds 1 and 2); without the decay, 0.004 and 0.03 after 10k steps (seeds 0, 1). Without the clipping (momentum or not, lr 0.01–0.3)
  the runs stay near the 1/6 plateau for 20k steps (best 0.116) and lr ≥ 1 diverges; with a
  global-norm clip of 1 instead of 0.3 the test MSE reaches 0.014–0.03 in 10k steps.
* **Path-SGD diverges from the IRNN start at every learning rate.** With input and output
  weights ~1e-3, κ of ``W_rec`` is ~1e-11 (it is a sum of products of the *other* weights'
  squares along paths that enter and leave through them), so the path-normalised direction
  is almost entirely ``W_rec``; even a clipped step of norm 0.03 raises its spectral radius
  from 1 to 1.3 in ten steps and the forward pass explodes over 100 steps. Identity ``W_rec``
  with unit-scale input weights explodes in the forward pass at initialisation already.
  Path-SGD is invariant to rescalings of hidden units, not to the overall scale of the
  function: use ``normalize=True`` (κ/φ²) or pick the initialisation accordingly.
* The same momentum, clipping and schedule serve SGD: from ``gaussian`` lr 0.01–0.03 reach
  0.0014–0.0017 in 12k steps, from ``irnn`` 0.012 (lr 0.03) and 0.044 (lr 0.01). Adam (lr
  1e-3, no clipping) is the fastest from ``gaussian`` (0.0004) and stays at the plateau
  (0.167) from ``irnn``.
* κ^(2)/κ^(1) (Σ over ``W_rec``) is small from the Gaussian start (0.0075 at initialisation,
  0.008–0.013 after training, largest entry 0.25–0.7) but not near an identity recurrent
  matrix: 0.63 at the IRNN initialisation (diagonal entries up to 65, about 2T/3) and 8–50
  along SGD's IRNN runs.

Usage: ``python -m pathsgd_jax.experiments.rnn [--out DIR] ...`` (``--help`` for the
options), or through :func:`add_arguments` and :func:`run` from another command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import pathsgd_jax
from pathsgd_jax import rnn as rnn_lib
from pathsgd_jax import tasks
from pathsgd_jax.experiments import common

TASKS = ("adding", "mnist-row", "mnist-pixel")
OPTIMIZERS = ("path-sgd", "path-sgd-plain", "sgd", "adam")
INITS = ("gaussian", "irnn")
LABELS = {"path-sgd": "Path-SGD", "path-sgd-plain": "Path-SGD (no clipping)",
          "sgd": "SGD + clipping", "adam": "Adam"}
COLORS = {"path-sgd": "tab:red", "path-sgd-plain": "tab:orange", "sgd": "tab:blue",
          "adam": "tab:purple"}

#: Default learning-rate grids (the defaults run in about 15 minutes on a 2-core CPU).
DEFAULT_GRIDS = {
    "path-sgd": (0.3, 0.1),
    "path-sgd-plain": (0.1, 0.03),
    "sgd": (0.03, 0.01),
    "adam": (1e-3,),
}
#: ``--preset paper``: the grid 10^-a (and 3·10^-a) around the values that train.
PAPER_GRIDS = {
    "path-sgd": (1.0, 0.3, 0.1, 0.03, 0.01, 0.003),
    "path-sgd-plain": (0.3, 0.1, 0.03, 0.01, 0.003),
    "sgd": (0.3, 0.1, 0.03, 0.01, 0.003, 0.001),
    "adam": (3e-3, 1e-3, 3e-4, 1e-4),
}

DEFAULTS = dict(task="adding", seq_len=[100], hidden=100, batch_size=50, steps=12_000,
                optimizers=["path-sgd", "sgd", "adam"], init=["gaussian"], lr_grid=None,
                n_train=100_000, n_test=10_000, eval_every=1000)
PAPER_PRESET = dict(task="adding", seq_len=[100, 200, 400, 750], hidden=100, batch_size=50,
                    steps=50_000, optimizers=["path-sgd", "path-sgd-plain", "sgd", "adam"],
                    init=["gaussian", "irnn"], lr_grid=None, n_train=100_000, n_test=10_000,
                    eval_every=1000)

DESCRIPTION = """\
Path-SGD on plain ReLU RNNs (Neyshabur, Wu, Salakhutdinov & Srebro, NIPS 2016): the adding
problem (default) or sequential MNIST, Path-SGD against SGD with gradient clipping and Adam,
from a scaled Gaussian or an IRNN (identity) initialisation, on a learning-rate grid
(selection by final validation MSE / error; every grid point trains the full budget).

Default (about 15 minutes on a 2-core CPU): adding problem T=100, 100 hidden units, batch 50,
12000 steps with a cosine learning-rate decay, momentum 0.9 (path-sgd, sgd), optimizers
path-sgd (lr 0.3 0.1, path-normalised step clipped to norm 0.3), sgd (lr 0.03 0.01, gradient
clipped to norm 1), adam (lr 1e-3), Gaussian initialisation. Outputs in --out (default
runs/rnn): results.json, rnn.png (test MSE or error against steps, baseline 1/6 dashed; and
kappa2/kappa1 of the current weights against steps), and a summary table.

--preset paper: T in {100, 200, 400, 750}, 50k steps, both initialisations, wider grids and
path-sgd-plain as well: for a GPU/TPU (hours on a CPU).
"""


def _positive_int(text: str) -> int:
  v = int(text)
  if v < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
  return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the options of the ``rnn`` experiment to ``parser``."""
  parser.add_argument("--preset", choices=["default", "paper"], default="default",
                      help="'paper': T in 100 200 400 750, 50k steps, both initialisations, "
                           "wide grids (for accelerators); explicit options override it")
  parser.add_argument("--task", choices=TASKS, help="adding (default), mnist-row (28 steps), "
                      "mnist-pixel (784 steps) on the embedded 5k MNIST digits")
  parser.add_argument("--seq-len", nargs="+", type=_positive_int, metavar="T",
                      help="adding-problem sequence length(s) (default 100)")
  parser.add_argument("--hidden", type=_positive_int, help="hidden units (default 100)")
  parser.add_argument("--batch-size", type=_positive_int, help="mini-batch size (default 50)")
  parser.add_argument("--steps", type=_positive_int, help="optimizer steps per run "
                      "(default 12000)")
  parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, metavar="OPT",
                      help=f"among {', '.join(OPTIMIZERS)} (default: path-sgd sgd adam)")
  parser.add_argument("--init", nargs="+", choices=INITS,
                      help="initialisations: gaussian (W_rec ~ N(0, 1/n)), irnn (identity "
                           "W_rec, N(0, 0.001^2) input/output weights) (default: gaussian)")
  parser.add_argument("--lr-grid", nargs="+", type=float, metavar="LR",
                      help="one learning-rate grid for every optimizer (default: "
                           + "; ".join(f"{k}: {' '.join(f'{v:g}' for v in g)}"
                                       for k, g in DEFAULT_GRIDS.items()) + ")")
  parser.add_argument("--momentum", type=float, default=0.9,
                      help="heavy-ball momentum of path-sgd, path-sgd-plain and sgd "
                           "(default 0.9; 0 for none)")
  parser.add_argument("--clip", type=float, default=1.0,
                      help="sgd: global-norm clipping of the raw gradient (default 1)")
  parser.add_argument("--path-clip", type=float, default=0.3,
                      help="path-sgd: global-norm clipping of the path-normalised gradient, "
                           "before momentum (default 0.3)")
  parser.add_argument("--normalize", action="store_true",
                      help="path-sgd: precondition by kappa/phi^2 instead of kappa")
  parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                      help="learning-rate schedule of every optimizer: cosine decay from lr "
                           "to 0 over --steps (default), or constant")
  parser.add_argument("--n-train", type=_positive_int, help="adding: training sequences "
                      "(default 100000)")
  parser.add_argument("--n-test", type=_positive_int, help="adding: test sequences "
                      "(default 10000)")
  parser.add_argument("--n-val", type=_positive_int, default=2000,
                      help="adding: validation sequences for lr selection (default 2000)")
  parser.add_argument("--eval-every", type=_positive_int,
                      help="evaluate (and measure kappa2/kappa1) every N steps (default 1000)")
  parser.add_argument("--steps-per-call", type=_positive_int, default=100,
                      help="optimizer steps per compiled call (default 100)")
  parser.add_argument("--no-kappa2", action="store_true",
                      help="do not measure kappa2/kappa1 during training")
  parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and "
                      "batch order (default 0)")
  parser.add_argument("--out", default=os.path.join("runs", "rnn"), metavar="DIR",
                      help="output directory (default runs/rnn)")
  parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
  parser.add_argument("--dpi", type=int, default=150, help="figure resolution (default 150)")


@dataclasses.dataclass
class RNNConfig:
  """Configuration of :func:`run_rnn` (see :func:`add_arguments`)."""

  task: str = "adding"
  seq_len: Sequence[int] = (100,)
  hidden: int = 100
  batch_size: int = 50
  steps: int = 12_000
  optimizers: Sequence[str] = ("path-sgd", "sgd", "adam")
  init: Sequence[str] = ("gaussian",)
  lr_grid: Sequence[float] | None = None
  momentum: float = 0.9
  clip: float = 1.0
  path_clip: float = 0.3
  normalize: bool = False
  schedule: str = "cosine"
  n_train: int = 100_000
  n_test: int = 10_000
  n_val: int = 2000
  eval_every: int = 1000
  steps_per_call: int = 100
  kappa2: bool = True
  seed: int = 0
  preset: str = "default"

  def grid_for(self, optimizer: str) -> list[float]:
    if self.lr_grid:
      return [float(v) for v in self.lr_grid]
    grids = PAPER_GRIDS if self.preset == "paper" else DEFAULT_GRIDS
    return list(grids[optimizer])


def config_from_args(args: argparse.Namespace) -> RNNConfig:
  base = PAPER_PRESET if args.preset == "paper" else DEFAULTS
  pick = lambda name: getattr(args, name) if getattr(args, name) is not None else base[name]
  return RNNConfig(
      task=pick("task"), seq_len=list(pick("seq_len")), hidden=pick("hidden"),
      batch_size=pick("batch_size"), steps=pick("steps"), optimizers=list(pick("optimizers")),
      init=list(pick("init")), lr_grid=pick("lr_grid"), momentum=args.momentum,
      clip=args.clip, path_clip=args.path_clip, normalize=args.normalize,
      schedule=args.schedule,
      n_train=pick("n_train"), n_test=pick("n_test"), n_val=args.n_val,
      eval_every=pick("eval_every"), steps_per_call=args.steps_per_call,
      kappa2=not args.no_kappa2, seed=args.seed, preset=args.preset)


def _validate(cfg: RNNConfig) -> None:
  if cfg.task not in TASKS:
    raise common.ConfigError(f"Unknown task {cfg.task!r}; choose from {', '.join(TASKS)}.")
  for name in cfg.optimizers:
    if name not in OPTIMIZERS:
      raise common.ConfigError(f"Unknown optimizer {name!r}; choose from "
                               f"{', '.join(OPTIMIZERS)}.")
  for name in cfg.init:
    if name not in INITS:
      raise common.ConfigError(f"Unknown initialisation {name!r}; choose from "
                               f"{', '.join(INITS)}.")
  if cfg.task == "adding" and any(t < 2 for t in cfg.seq_len):
    raise common.ConfigError("--seq-len must be at least 2 for the adding problem.")
  if not 0.0 <= cfg.momentum < 1.0:
    raise common.ConfigError(f"--momentum must be in [0, 1), got {cfg.momentum}.")
  if cfg.lr_grid is not None and any(not (v > 0 and math.isfinite(v)) for v in cfg.lr_grid):
    raise common.ConfigError(f"--lr-grid values must be positive and finite, got "
                             f"{cfg.lr_grid}.")
  for name in ("clip", "path_clip"):
    if not getattr(cfg, name) > 0:
      raise common.ConfigError(f"--{name.replace('_', '-')} must be positive.")


# ------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskData:
  name: str
  seq_len: int
  input_dim: int
  output_dim: int
  kind: str  # "regression" or "classification"
  train: tuple[np.ndarray, np.ndarray]
  val: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]
  info: dict


def load_task(cfg: RNNConfig, seq_len: int) -> TaskData:
  """The splits of one task (and sequence length for the adding problem)."""
  if cfg.task == "adding":
    splits = tasks.adding_splits(seq_len, n_train=cfg.n_train, n_test=cfg.n_test,
                                 seed=cfg.seed)
    val = tasks.adding_problem(cfg.n_val, seq_len,
                               seed=np.random.default_rng((cfg.seed, 2)))
    info = {"name": f"adding (T={seq_len})", "seq_len": seq_len, "n_train": cfg.n_train,
            "n_val": cfg.n_val, "n_test": cfg.n_test,
            "marker_convention": "one marker uniformly in steps [0, T//2), one uniformly in "
                                 "[T//2, T) (0-based); values U[0,1); target = sum of the "
                                 "two marked values",
            "baseline_mse": tasks.ADDING_BASELINE_MSE,
            "seeds": {"train": [cfg.seed, 0], "test": [cfg.seed, 1], "val": [cfg.seed, 2]}}
    return TaskData(info["name"], seq_len, 2, 1, "regression", splits["train"], val,
                    splits["test"], info)
  variant = "row" if cfg.task == "mnist-row" else "pixel"
  ds = tasks.sequential_mnist(variant)
  (x_tr, y_tr), (x_val, y_val) = ds.split_validation(0.1, seed=cfg.seed)
  info = {"name": ds.name, "seq_len": ds.input_shape[0], "n_train": int(len(y_tr)),
          "n_val": int(len(y_val)), "n_test": int(len(ds.y_test)),
          "baseline_error": 0.9}
  return TaskData(ds.name, ds.input_shape[0], ds.input_shape[1], ds.num_classes,
                  "classification", (x_tr, y_tr), (x_val, y_val), ds.test, info)


# ------------------------------------------------------------------------------------------
# Models and optimizers.
# ------------------------------------------------------------------------------------------


def initial_params(init: str, key: jax.Array, input_dim: int, hidden: int,
                   output_dim: int) -> dict[str, jax.Array]:
  """``gaussian`` or ``irnn`` parameters (see the module docstring)."""
  if init == "gaussian":
    return rnn_lib.init_rnn(key, input_dim, hidden, output_dim, recurrent="gaussian")
  return rnn_lib.init_rnn(key, input_dim, hidden, output_dim, recurrent="identity",
                          input_std=1e-3, output_std=1e-3)


def make_optimizer(name: str, cfg: RNNConfig, example: jax.Array
                   ) -> optax.GradientTransformation:
  """The optimizer ``name`` at unit learning rate (the caller multiplies by the lr)."""
  momentum = cfg.momentum or None
  tail = [optax.trace(decay=momentum) if momentum else optax.identity(),
          optax.scale_by_learning_rate(1.0)]
  if name in ("path-sgd", "path-sgd-plain"):
    head = [pathsgd_jax.scale_by_path_norm(rnn_lib.rnn_apply, example,
                                           normalize=cfg.normalize)]
    if name == "path-sgd":
      head.append(optax.clip_by_global_norm(cfg.path_clip))
    return optax.chain(*head, *tail)
  if name == "sgd":
    return optax.chain(optax.clip_by_global_norm(cfg.clip), *tail)
  if name == "adam":
    return optax.adam(1.0)
  raise ValueError(f"Unknown optimizer {name!r}.")


def _loss_fn(kind: str):
  if kind == "regression":
    return lambda out, y: jnp.mean((out - y) ** 2)
  return lambda out, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))


def lr_factor(schedule: str, step, total_steps: int):
  """Multiplier of the learning rate at (0-based) ``step``: 1 (``constant``) or the cosine
  decay ``(1 + cos(π·step/total))/2`` from 1 to 0 (``cosine``)."""
  if schedule == "constant":
    return jnp.ones_like(jnp.asarray(step, jnp.float32))
  frac = jnp.asarray(step, jnp.float32) / max(total_steps, 1)
  return 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def make_chunk(tx: optax.GradientTransformation, kind: str, schedule: str = "constant",
               total_steps: int = 1):
  """Jitted ``chunk(params, state, lr, x_all, y_all, idx, steps) -> (params, state,
  losses)``: one optimizer step per row of ``idx``, the update multiplied by
  ``lr · lr_factor(schedule, step)``."""
  loss_of = _loss_fn(kind)

  def chunk(params, opt_state, lr, x_all, y_all, idx, steps):
    def body(carry, inputs):
      params, opt_state = carry
      batch_idx, step = inputs
      x = jnp.take(x_all, batch_idx, axis=0)
      y = jnp.take(y_all, batch_idx, axis=0)
      loss, grads = jax.value_and_grad(lambda p: loss_of(rnn_lib.rnn_apply(p, x), y))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      scale = lr * lr_factor(schedule, step, total_steps)
      updates = jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = lax.scan(body, (params, opt_state), (idx, steps))
    return params, opt_state, losses

  return jax.jit(chunk, donate_argnums=(0, 1))


def make_evaluator(kind: str, batch: int = 1000):
  """``evaluate(params, x, y) -> (loss, metric)``: MSE twice, or (cross-entropy, error)."""

  @jax.jit
  def _eval(params, x, y, w):
    def one(b):
      xb, yb, wb = b
      out = rnn_lib.rnn_apply(params, xb)
      if kind == "regression":
        per = jnp.mean((out - yb) ** 2, axis=-1)
        return jnp.sum(per * wb), jnp.sum(per * wb)
      per = optax.softmax_cross_entropy_with_integer_labels(out, yb)
      wrong = (jnp.argmax(out, axis=-1) != yb).astype(jnp.float32)
      return jnp.sum(per * wb), jnp.sum(wrong * wb)

    losses, metrics = lax.map(one, (x, y, w))
    n = jnp.sum(w)
    return jnp.sum(losses) / n, jnp.sum(metrics) / n

  def prepare(x: np.ndarray, y: np.ndarray):
    n = x.shape[0]
    b = max(1, min(batch, n))
    nb = -(-n // b)
    pad = nb * b - n
    w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros((pad,) + y.shape[1:], y.dtype)])
    return (jnp.asarray(x.reshape((nb, b) + x.shape[1:])),
            jnp.asarray(y.reshape((nb, b) + y.shape[1:])), jnp.asarray(w.reshape(nb, b)))

  def evaluate(params, prepared) -> tuple[float, float]:
    loss, metric = _eval(params, *prepared)
    return float(loss), float(metric)

  return prepare, evaluate


def batch_order(n: int, batch: int, steps: int, seed: int) -> np.ndarray:
  """``(steps, batch)`` example indices: consecutive batches of per-epoch permutations seeded
  by ``(seed, epoch)``; the same for every optimizer, initialisation and learning rate."""
  per_epoch = n // batch
  if per_epoch < 1:
    raise common.ConfigError(f"{n} training examples are fewer than one batch of {batch}.")
  out = []
  epoch = 0
  while len(out) < steps:
    perm = np.random.default_rng((seed, 1000 + epoch)).permutation(n)
    out.extend(perm[:per_epoch * batch].reshape(per_epoch, batch))
    epoch += 1
  return np.asarray(out[:steps], np.int32)


def kappa_summary(params, seq_len: int) -> dict[str, float]:
  """κ^(2)/κ^(1) of the current weights: Σκ^(2)/Σκ^(1) over W_rec (``w_rec``), over all
  leaves (``total``), and the largest entrywise ratio (``w_rec_max``)."""
  k1, k2 = _kappa_terms_jit(params, seq_len)
  ratio = rnn_lib.kappa_ratio(k1, k2)
  return {"w_rec": ratio["W_rec"]["sum"], "total": ratio["total"]["sum"],
          "w_rec_max": ratio["W_rec"]["max"], "w_rec_median": ratio["W_rec"]["median"]}


_kappa_terms_jit = jax.jit(lambda p, t: rnn_lib.kappa_terms(p, t, normalize=True),
                           static_argnums=1)


# ------------------------------------------------------------------------------------------
# Runs.
# ------------------------------------------------------------------------------------------


def _finite(v) -> bool:
  return v is not None and math.isfinite(v)


def train_one(*, chunk_fn, evaluate, params, opt_state, lr: float, x_train, y_train,
              order: np.ndarray, evals: dict, cfg: RNNConfig, seq_len: int,
              progress: bool, desc: str) -> dict:
  """Trains one grid point; returns its record (curves at every evaluation)."""
  steps = order.shape[0]
  chunk = cfg.steps_per_call
  keys = ["step", "time_s", "train_loss", "val_loss", "val_metric", "test_loss",
          "test_metric", "kappa2_over_kappa1", "kappa2_over_kappa1_total",
          "kappa2_over_kappa1_max"]
  curves = {k: [] for k in keys}

  def record(step, train_loss, train_time):
    curves["step"].append(step)
    curves["time_s"].append(train_time)
    curves["train_loss"].append(train_loss)
    for split in ("val", "test"):
      loss, metric = evaluate(params, evals[split])
      curves[f"{split}_loss"].append(loss)
      curves[f"{split}_metric"].append(metric)
    if cfg.kappa2:
      ks = kappa_summary(params, seq_len)
      curves["kappa2_over_kappa1"].append(ks["w_rec"])
      curves["kappa2_over_kappa1_total"].append(ks["total"])
      curves["kappa2_over_kappa1_max"].append(ks["w_rec_max"])
    else:
      for k in keys[-3:]:
        curves[k].append(None)

  lr_arr = jnp.asarray(lr, jnp.float32)
  t_eval = time.perf_counter()
  record(0, None, 0.0)
  eval_time = time.perf_counter() - t_eval
  train_time = 0.0
  diverged = False
  losses_since = []
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=steps, desc=desc, unit="step", leave=False, file=sys.stderr,
               dynamic_ncols=True)
  done = 0
  try:
    while done < steps:
      n = min(chunk, steps - done)
      idx = order[done:done + n]
      t0 = time.perf_counter()
      step_idx = np.arange(done, done + n, dtype=np.int32)
      params, opt_state, losses = chunk_fn(params, opt_state, lr_arr, x_train, y_train, idx,
                                           step_idx)
      losses = np.asarray(losses)
      train_time += time.perf_counter() - t0
      done += n
      losses_since.append(losses)
      if bar is not None:
        bar.update(n)
        bar.set_postfix(loss=f"{float(losses.mean()):.4g}")
      if not np.all(np.isfinite(losses)):
        diverged = True
        break
      if done % cfg.eval_every == 0 or done == steps:
        t_eval = time.perf_counter()
        record(done, float(np.concatenate(losses_since).mean()), train_time)
        eval_time += time.perf_counter() - t_eval
        losses_since = []
        if not _finite(curves["test_loss"][-1]):
          diverged = True
          break
  finally:
    if bar is not None:
      bar.close()
  final_val = curves["val_metric"][-1]
  final_test = curves["test_metric"][-1]
  finite_tests = [v for v in curves["test_metric"] if _finite(v)]
  return {"lr": float(lr), "diverged": diverged, "stopped_at_step": done if diverged else None,
          "final_val_metric": None if diverged else final_val,
          "final_test_metric": None if diverged else final_test,
          "best_test_metric": min(finite_tests) if finite_tests else None,
          "curves": curves, "train_time_s": train_time, "eval_time_s": eval_time,
          "steps_per_s": done / train_time if train_time else None}


def select(grid: list[dict]) -> int | None:
  """Index of the grid point with the lowest final validation metric (diverged runs and
  non-finite values discarded; ties to the larger learning rate)."""
  best, best_key = None, None
  for i, g in enumerate(grid):
    v = g["final_val_metric"]
    if g["diverged"] or not _finite(v):
      continue
    key = (v, -g["lr"])
    if best_key is None or key < best_key:
      best, best_key = i, key
  return best


def run_rnn(cfg: RNNConfig, *, progress: bool = False, log=print) -> dict:
  """Runs the experiment; returns the results dictionary written to ``results.json``."""
  _validate(cfg)
  t_start = time.perf_counter()
  metric_name = "MSE" if cfg.task == "adding" else "error"
  results: dict[str, Any] = {
      "command": "rnn",
      "config": dataclasses.asdict(cfg),
      "grids": {o: cfg.grid_for(o) for o in cfg.optimizers},
      "protocol": {
          "metric": "test MSE" if cfg.task == "adding" else "test classification error",
          "selection": "lowest final validation metric after --steps (every grid point "
                       "trains the full budget); diverged (NaN/inf) runs discarded",
          "optimizers": {
              "path-sgd": "chain(scale_by_path_norm (kappa^(1), p=2), clip_by_global_norm("
                          f"{cfg.path_clip}), trace({cfg.momentum}), lr)"
                          + (" with normalize=True" if cfg.normalize else ""),
              "path-sgd-plain": f"chain(scale_by_path_norm, trace({cfg.momentum}), lr)",
              "sgd": f"chain(clip_by_global_norm({cfg.clip}), trace({cfg.momentum}), lr)",
              "adam": "optax.adam(lr)"},
          "inits": {"gaussian": "W_rec ~ N(0, 1/n), W_in ~ N(0, 1/d), W_out ~ N(0, 1/n), "
                                "biases 0",
                    "irnn": "W_rec = I, W_in, W_out ~ N(0, 0.001^2), biases 0 (Le et al. "
                            "2015)"},
          "kappa2_over_kappa1": "sum over W_rec of kappa^(2) / sum of kappa^(1) for the "
                                "current weights (kappa^(2) is zero on every other leaf); "
                                "'total' sums over all leaves; 'max' is the largest "
                                "entrywise ratio",
          "train_loss": "mean mini-batch loss since the previous evaluation",
          "schedule": ("cosine decay of every optimizer's learning rate from lr to 0 over "
                       "--steps" if cfg.schedule == "cosine" else "constant learning rate"),
      },
      "environment": common.environment(),
      "tasks": {},
      "runs": [],
  }
  lengths = cfg.seq_len if cfg.task == "adding" else [None]
  for seq_len in lengths:
    data = load_task(cfg, seq_len)
    results["tasks"][data.name] = data.info
    log(f"[rnn] {data.name}: {len(data.train[1])} train / {len(data.val[1])} val / "
        f"{len(data.test[1])} test sequences of {data.seq_len} steps x {data.input_dim}; "
        f"ReLU RNN {cfg.hidden} units, batch {cfg.batch_size}, {cfg.steps} steps")
    x_train = jnp.asarray(data.train[0])
    y_train = jnp.asarray(data.train[1])
    prepare, evaluate = make_evaluator(data.kind)
    evals = {"val": prepare(*data.val), "test": prepare(*data.test)}
    order = batch_order(len(data.train[1]), cfg.batch_size, cfg.steps, cfg.seed)
    example = jnp.zeros((cfg.batch_size, data.seq_len, data.input_dim), jnp.float32)
    for init in cfg.init:
      params0 = initial_params(init, jax.random.key(cfg.seed), data.input_dim, cfg.hidden,
                               data.output_dim)
      for opt in cfg.optimizers:
        tx = make_optimizer(opt, cfg, example)
        chunk_fn = make_chunk(tx, data.kind, cfg.schedule, cfg.steps)
        grid = []
        t_grid = time.perf_counter()
        for lr in cfg.grid_for(opt):
          params = jax.tree.map(jnp.copy, params0)
          rec = train_one(chunk_fn=chunk_fn, evaluate=evaluate, params=params,
                          opt_state=tx.init(params), lr=lr, x_train=x_train, y_train=y_train,
                          order=order, evals=evals, cfg=cfg, seq_len=data.seq_len,
                          progress=progress,
                          desc=f"{data.name} {init} {opt} lr={common.lr_label(lr)}")
          grid.append(rec)
          status = (f"diverged at step {rec['stopped_at_step']}" if rec["diverged"] else
                    f"val {metric_name} {common.fmt(rec['final_val_metric'])}, test "
                    f"{metric_name} {common.fmt(rec['final_test_metric'])} (best "
                    f"{common.fmt(rec['best_test_metric'])})")
          log(f"[rnn] {data.name} {init:>8} {opt:>14} lr={common.lr_label(lr):>6}: {status} "
              f"({rec['train_time_s']:.0f}s train)")
        chosen = select(grid)
        results["runs"].append({
            "task": data.name, "seq_len": data.seq_len, "init": init, "optimizer": opt,
            "chosen_index": chosen,
            "chosen_lr": None if chosen is None else grid[chosen]["lr"],
            "curves": None if chosen is None else grid[chosen]["curves"],
            "grid": grid, "wall_time_s": time.perf_counter() - t_grid})
  results["summary"] = summary_rows(results)
  results["wall_time_s"] = time.perf_counter() - t_start
  return results


def summary_rows(results: dict) -> list[dict]:
  rows = []
  for run in results["runs"]:
    g = None if run["chosen_index"] is None else run["grid"][run["chosen_index"]]
    curves = g["curves"] if g else None
    kap = [v for v in (curves or {}).get("kappa2_over_kappa1", []) if _finite(v)]
    rows.append({
        "task": run["task"], "init": run["init"], "optimizer": run["optimizer"],
        "lr": None if g is None else g["lr"],
        "final_test": None if g is None else g["final_test_metric"],
        "best_test": None if g is None else g["best_test_metric"],
        "kappa2_over_kappa1_final": kap[-1] if kap else None,
        "kappa2_over_kappa1_max": max(kap) if kap else None,
        "diverged_lrs": [x["lr"] for x in run["grid"] if x["diverged"]],
        "train_time_s": None if g is None else g["train_time_s"]})
  return rows


def format_summary(rows: list[dict], metric: str = "MSE") -> str:
  headers = ["task", "init", "optimizer", "chosen lr", f"final test {metric}",
             f"best test {metric}", "k2/k1 W_rec (final, max)", "diverged lrs", "train s"]
  body = [[r["task"], r["init"], r["optimizer"],
           "all diverged" if r["lr"] is None else common.lr_label(r["lr"]),
           common.fmt(r["final_test"]), common.fmt(r["best_test"]),
           f"{common.fmt(r['kappa2_over_kappa1_final'], '.3g')}, "
           f"{common.fmt(r['kappa2_over_kappa1_max'], '.3g')}",
           " ".join(common.lr_label(v) for v in r["diverged_lrs"]) or "-",
           common.fmt(r["train_time_s"], ".0f")] for r in rows]
  return common.table(headers, body)


# ------------------------------------------------------------------------------------------
# Figure.
# ------------------------------------------------------------------------------------------


def plot_rnn(results: dict):
  """Test MSE / error (log scale, top) and κ^(2)/κ^(1) of W_rec (bottom) against steps.

  One column per task x initialisation, one line per optimizer (its chosen learning rate);
  the adding problem's baseline 1/6 (predicting 1) is dashed. Returns a matplotlib Figure.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  cols = []
  for run in results["runs"]:
    if (run["task"], run["init"]) not in cols:
      cols.append((run["task"], run["init"]))
  fig = Figure(figsize=(max(4.2 * len(cols), 6.0) + 0.4, 6.8), layout="constrained")
  axes = fig.subplots(2, max(len(cols), 1), squeeze=False)
  adding = results["config"]["task"] == "adding"
  for c, (task, init) in enumerate(cols):
    ax, axk = axes[0, c], axes[1, c]
    for run in results["runs"]:
      if (run["task"], run["init"]) != (task, init):
        continue
      opt = run["optimizer"]
      curves = run["curves"]
      label = LABELS.get(opt, opt)
      if curves is None:
        ax.plot([], [], color=COLORS.get(opt), label=f"{label} (all lrs diverged)")
        continue
      label += f" (lr {run['chosen_lr']:g})"
      pts = [(s, v) for s, v in zip(curves["step"], curves["test_metric"]) if _finite(v)]
      ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLORS.get(opt), marker="o",
              markersize=2.5, label=label, gid=f"{task}/{init}/{opt}/test")
      kp = [(s, v) for s, v in zip(curves["step"], curves["kappa2_over_kappa1"])
            if _finite(v) and v > 0]
      if kp:
        axk.plot([p[0] for p in kp], [p[1] for p in kp], color=COLORS.get(opt),
                 marker="o", markersize=2.5, label=LABELS.get(opt, opt))
    if adding:
      ax.axhline(tasks.ADDING_BASELINE_MSE, color="gray", linestyle="--", linewidth=1,
                 label="baseline 1/6 (predict 1)")
      ax.axhline(0.01, color="gray", linestyle=":", linewidth=1, label="0.01")
    ax.set_yscale("log")
    ax.set_title(f"{task}, {init} init", fontsize=10)
    ax.set_ylabel("test MSE" if adding else "test error")
    ax.set_xlabel("step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ratios = [v for line in axk.lines for v in line.get_ydata()]
    if ratios and max(ratios) > 20 * min(ratios):
      axk.set_yscale("log")
    axk.set_title("κ(2)/κ(1) of the current weights", fontsize=9)
    axk.set_ylabel("Σκ(2) / Σκ(1) over W_rec")
    axk.set_xlabel("step")
    axk.grid(True, which="both", alpha=0.3)
    if axk.lines:
      axk.legend(fontsize=7)
  cfg = results["config"]
  fig.suptitle(f"ReLU RNN ({cfg['hidden']} units), batch {cfg['batch_size']}, "
               f"{cfg['steps']} steps, {cfg.get('schedule', 'constant')} lr schedule\n"
               f"lr chosen by final validation {'MSE' if adding else 'error'}", fontsize=10)
  return fig


# ------------------------------------------------------------------------------------------
# Entry points.
# ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
  """Runs the experiment from parsed arguments, writes ``results.json`` and ``rnn.png`` in
  ``args.out``, prints the summary table; returns the results."""
  cfg = config_from_args(args)
  log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, flush=True))
  progress = not args.quiet and sys.stderr.isatty()
  results = run_rnn(cfg, progress=progress, log=log)
  argv = getattr(args, "argv", None)
  if argv is not None:
    results["argv"] = list(argv)
    prefix = ("pathsgd-jax rnn" if getattr(args, "command", None) == "rnn"
              else "python -m pathsgd_jax.experiments.rnn")
    results["command_line"] = " ".join([prefix] + [shlex.quote(a) for a in argv])
  os.makedirs(args.out, exist_ok=True)
  fig = plot_rnn(results)
  fig.savefig(os.path.join(args.out, "rnn.png"), dpi=args.dpi)
  results["figures"] = ["rnn.png"]
  common.write_json(os.path.join(args.out, "results.json"), results)
  metric = "MSE" if cfg.task == "adding" else "error"
  if not args.quiet:
    print()
    print(f"Learning rate chosen by final validation {metric} after {cfg.steps} steps:")
    print(format_summary(results["summary"], metric))
    print(f"\nTotal wall time {results['wall_time_s']:.1f}s. Wrote "
          f"{os.path.join(args.out, 'results.json')} and {os.path.join(args.out, 'rnn.png')}")
  return results


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m pathsgd_jax.experiments.rnn",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(parser)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  args.argv = argv
  try:
    run(args)
  except common.ConfigError as e:
    print(f"rnn: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
