"""Training and evaluation loops of the experiments.

The train step of one optimizer is compiled once (ahead of time, per input shapes) and scans
over a *chunk* of mini-batches per call: the data set lives on the device, each call receives
a ``(steps, batch)`` block of example indices, gathers the batches inside the compiled code and
runs ``steps`` optimizer steps with :func:`jax.lax.scan` (unrolled, for convolutional networks
on the CPU: see :func:`make_train_chunk`). Python is entered once per chunk, which is
also when the progress bar updates and divergence is checked.

The learning rate is a traced argument (the optimizers are built at unit learning rate, see
:mod:`pathsgd_jax.experiments.optimizers`), so the whole learning-rate grid of an optimizer
reuses one executable.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from pathsgd_jax.experiments import common

# Steps per call of an unrolled chunk (see `make_train_chunk`).
_UNROLLED_STEPS_PER_CALL = 2

ApplyTrain = Callable[..., jax.Array]  # apply(params, x, key) -> logits, may use dropout.
ApplyEval = Callable[[Any, jax.Array], jax.Array]  # deterministic apply(params, x) -> logits.


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def largest_divisor_at_most(n: int, cap: int) -> int:
  """The largest divisor of ``n`` that is ``<= cap`` (at least 1)."""
  cap = max(1, min(cap, n))
  for d in range(cap, 0, -1):
    if n % d == 0:
      return d
  return 1


def _unrolled(convolutional: bool) -> bool:
  return convolutional and jax.default_backend() == "cpu"


def chunk_steps(steps_per_epoch: int, steps_per_call: int, *,
                convolutional: bool = False) -> int:
  """Steps per call of `make_train_chunk`: a divisor of the epoch, at most ``steps_per_call``
  (and short where the chunk is unrolled)."""
  if _unrolled(convolutional):
    steps_per_call = min(steps_per_call, _UNROLLED_STEPS_PER_CALL)
  return largest_divisor_at_most(max(steps_per_epoch, 1), steps_per_call)


def make_train_chunk(apply_train: ApplyTrain, tx: optax.GradientTransformation, *,
                     convolutional: bool = False) -> Callable:
  """A jitted ``chunk(params, opt_state, lr, key, x_all, y_all, idx, steps)``.

  Runs ``idx.shape[0]`` optimizer steps; step ``s`` uses the batch ``x_all[idx[s]]`` and the
  dropout key ``fold_in(key, steps[s])``. Returns ``(params, opt_state, losses)`` with the
  mini-batch training losses (as seen by the step, i.e. with dropout if any). ``params`` and
  ``opt_state`` are donated.

  ``convolutional=True`` on the CPU runs the steps as straight-line code instead of a scan:
  XLA:CPU runs convolutions inside a while loop several times slower than outside one
  (jax-ml/jax#12868; a LeNet-5 step at batch 256 on 2 cores takes 0.95 s in a scan and
  0.14 s unrolled). Compile time grows with the chunk, so size chunks with `chunk_steps`
  (same flag). Other backends scan.
  """

  def loss_fn(params, x, y, key):
    return jnp.mean(cross_entropy(apply_train(params, x, key), y))

  def chunk(params, opt_state, lr, key, x_all, y_all, idx, steps):
    def body(carry, inputs):
      params, opt_state = carry
      batch_idx, step = inputs
      x = jnp.take(x_all, batch_idx, axis=0)
      y = jnp.take(y_all, batch_idx, axis=0)
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y, jax.random.fold_in(key, step))
      updates, opt_state = tx.update(grads, opt_state, params)
      updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
      return (optax.apply_updates(params, updates), opt_state), loss

    if not _unrolled(convolutional):
      (params, opt_state), losses = lax.scan(body, (params, opt_state), (idx, steps))
      return params, opt_state, losses
    carry, losses = (params, opt_state), []
    for s in range(idx.shape[0]):
      carry, loss = body(carry, (idx[s], steps[s]))
      losses.append(loss)
    return *carry, jnp.stack(losses)

  return jax.jit(chunk, donate_argnums=(0, 1))


@dataclasses.dataclass(frozen=True)
class EvalData:
  """A split padded and reshaped to ``(num_batches, batch, ...)`` on the device."""

  x: jax.Array
  y: jax.Array
  weight: jax.Array
  n: int

  @classmethod
  def build(cls, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> EvalData:
    n = int(x.shape[0])
    batch = max(1, min(batch, n))
    nb = -(-n // batch)
    pad = nb * batch - n
    xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    yp = np.concatenate([y, np.zeros((pad,), y.dtype)]) if pad else y
    w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return cls(jnp.asarray(xp.reshape((nb, batch) + x.shape[1:])),
               jnp.asarray(yp.reshape(nb, batch)), jnp.asarray(w.reshape(nb, batch)), n)


def make_evaluator(apply_eval: ApplyEval) -> Callable[[Any, EvalData], tuple[float, float]]:
  """``evaluate(params, data) -> (mean loss, error rate)``, deterministic network."""

  @jax.jit
  def _eval(params, x, y, w):
    def one(batch):
      xb, yb, wb = batch
      logits = apply_eval(params, xb)
      loss = cross_entropy(logits, yb)
      wrong = (jnp.argmax(logits, axis=-1) != yb).astype(jnp.float32)
      return jnp.sum(loss * wb), jnp.sum(wrong * wb)

    losses, wrongs = lax.map(one, (x, y, w))
    n = jnp.sum(w)
    return jnp.sum(losses) / n, jnp.sum(wrongs) / n

  def evaluate(params, data: EvalData) -> tuple[float, float]:
    loss, err = _eval(params, data.x, data.y, data.weight)
    return float(loss), float(err)

  return evaluate


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
  """Example indices of one epoch as ``(steps, batch_size)`` (last partial batch dropped).

  The order depends only on ``(seed, epoch)``: every optimizer, learning rate and
  initialisation of an experiment sees the same mini-batches in the same order.
  """
  steps = n // batch_size
  perm = np.random.default_rng((seed, epoch)).permutation(n)
  return perm[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


@dataclasses.dataclass
class RunResult:
  """Outcome of one training run (one optimizer, initialisation and learning rate)."""

  lr: float
  diverged: bool
  curves: dict[str, list]
  initial: dict[str, float]
  train_time_s: float
  eval_time_s: float
  examples_per_s: float
  stopped_at_epoch: int | None = None

  def final(self, key: str) -> float:
    values = self.curves.get(key) or []
    return values[-1] if values and values[-1] is not None else float("nan")

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _finite(x: float) -> bool:
  return x is not None and math.isfinite(x)


def train_run(*, chunk_fn: Callable, evaluate: Callable, params: Any, opt_state: Any,
              lr: float, x_train: jax.Array, y_train: jax.Array, evals: dict[str, EvalData],
              epochs: int, batch_size: int, seed: int, steps_per_call: int,
              dropout_key: jax.Array, progress: bool = False, desc: str = "") -> RunResult:
  """Trains for ``epochs`` epochs and evaluates every split of ``evals`` at each epoch end.

  Curves (one value per epoch, evaluated on the *full* split with the deterministic network
  at the end of the epoch): ``{split}_loss`` and ``{split}_error`` for every split in
  ``evals`` (e.g. ``train``, ``val``, ``test``), plus ``train_loss_running``, the mean of the
  epoch's mini-batch losses (with dropout if used), ``epoch`` (1..E) and ``time_s``
  (cumulative training time). A run whose mini-batch loss becomes NaN/inf stops and is
  marked ``diverged``; its remaining epochs are ``None``.

  ``params`` and ``opt_state`` are consumed (donated); pass copies if they are reused.
  """
  n = int(x_train.shape[0])
  steps_per_epoch = n // batch_size
  if steps_per_epoch < 1:
    raise common.ConfigError(f"The training split has {n} examples, fewer than one batch of "
                     f"{batch_size}; lower --batch-size.")
  chunk = largest_divisor_at_most(steps_per_epoch, steps_per_call)
  lr_arr = jnp.asarray(lr, jnp.float32)
  keys = ["epoch", "time_s", "train_loss_running"] + [
      f"{s}_{m}" for s in evals for m in ("loss", "error")]
  curves: dict[str, list] = {k: [] for k in keys}
  t_eval = time.perf_counter()
  initial = {}
  for split, data in evals.items():
    initial[f"{split}_loss"], initial[f"{split}_error"] = evaluate(params, data)
  eval_time = time.perf_counter() - t_eval
  train_time = 0.0
  diverged = False
  stopped = None
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", leave=False,
               file=sys.stderr, dynamic_ncols=True)
  try:
    for epoch in range(1, epochs + 1):
      order = epoch_order(n, batch_size, seed, epoch)
      losses = []
      for start in range(0, steps_per_epoch, chunk):
        idx = order[start:start + chunk]
        first = (epoch - 1) * steps_per_epoch + start
        steps = np.arange(first, first + chunk, dtype=np.int32)
        t0 = time.perf_counter()
        params, opt_state, chunk_losses = chunk_fn(params, opt_state, lr_arr, dropout_key,
                                                   x_train, y_train, idx, steps)
        chunk_losses = np.asarray(chunk_losses)  # Synchronises.
        train_time += time.perf_counter() - t0
        losses.append(chunk_losses)
        if bar is not None:
          bar.update(chunk)
          done = (epoch - 1) * steps_per_epoch + sum(map(len, losses))
          bar.set_postfix(epoch=f"{epoch}/{epochs}", loss=f"{float(chunk_losses.mean()):.4g}",
                          ex_per_s=f"{done * batch_size / max(train_time, 1e-9):.0f}")
        if not np.all(np.isfinite(chunk_losses)):
          diverged = True
          break
      curves["epoch"].append(epoch)
      curves["time_s"].append(train_time)
      if diverged:
        stopped = epoch
        for k in keys[2:]:
          curves[k].append(None)
        break
      curves["train_loss_running"].append(float(np.concatenate(losses).mean()))
      t_eval = time.perf_counter()
      for split, data in evals.items():
        loss, err = evaluate(params, data)
        curves[f"{split}_loss"].append(loss)
        curves[f"{split}_error"].append(err)
      eval_time += time.perf_counter() - t_eval
      if not _finite(curves[f"{next(iter(evals))}_loss"][-1]):
        diverged, stopped = True, epoch
        break
  finally:
    if bar is not None:
      bar.close()
  # Pad the curves of a stopped run to the full length.
  for k in keys:
    while len(curves[k]) < epochs:
      curves[k].append(len(curves["epoch"]) + 1 if k == "epoch" else None)
  steps_done = sum(1 for v in curves["train_loss_running"] if v is not None) * steps_per_epoch
  return RunResult(lr=float(lr), diverged=diverged, curves=curves, initial=initial,
                   train_time_s=train_time, eval_time_s=eval_time,
                   examples_per_s=steps_done * batch_size / train_time if train_time else 0.0,
                   stopped_at_epoch=stopped)


def select(runs: list[RunResult], by: str = "val_error") -> int | None:
  """Index of the best run by the final value of curve ``by`` (lower is better).

  Diverged runs and runs whose final value is NaN are discarded; ties go to the lower final
  training loss, then the larger learning rate. ``None`` if every run diverged.
  """
  best, best_key = None, None
  for i, run in enumerate(runs):
    value = run.final(by)
    if run.diverged or not math.isfinite(value):
      continue
    train = run.final("train_loss")
    key = (value, train if math.isfinite(train) else float("inf"), -run.lr)
    if best_key is None or key < best_key:
      best, best_key = i, key
  return best
