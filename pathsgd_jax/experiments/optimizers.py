"""The optimizers compared in the experiments, built at unit learning rate.

Every optimizer here is *linear in the learning rate*: its update is ``lr * d(grads, state)``
for a direction ``d`` that does not depend on ``lr`` (plain and momentum SGD, AdaGrad, Adam,
Path-SGD with or without momentum). The experiments therefore build each optimizer once with
``learning_rate=1.0`` and multiply its updates by a *traced* learning rate: one compiled train
step per optimizer serves the whole learning-rate grid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

import pathsgd_jax

#: Momentum coefficient of the ``*-momentum`` variants.
MOMENTUM = 0.9

#: Optimizer names accepted by ``--optimizers``.
OPTIMIZERS = ("sgd", "sgd-momentum", "adagrad", "adam", "path-sgd", "path-sgd-momentum")

#: The paper's learning-rate grid: 10^-α, α = 0, ..., 10.
PAPER_GRID = tuple(10.0 ** -a for a in range(11))

#: Default per-optimizer sub-grids of the paper grid (fast default runs). They bracket the
#: learning rates selected on the embedded MNIST subset with a 2 x 1000 ReLU MLP at batch 100
#: from both initialisations (SGD needs ~1 balanced but ~1e-4 unbalanced, hence its wider
#: grid); use ``--lr-grid`` or ``--preset paper`` for the full grid.
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "sgd": (1.0, 0.1, 0.01, 0.001, 0.0001),
    "sgd-momentum": (0.1, 0.01, 0.001, 0.0001, 0.00001),
    "adagrad": (0.1, 0.01, 0.001),
    "adam": (0.01, 0.001, 0.0001),
    "path-sgd": (0.1, 0.01, 0.001),
    "path-sgd-momentum": (0.01, 0.001, 0.0001),
}

#: Labels used in tables and figure legends.
LABELS = {
    "sgd": "SGD",
    "sgd-momentum": "SGD + momentum",
    "adagrad": "AdaGrad",
    "adam": "Adam",
    "path-sgd": "Path-SGD",
    "path-sgd-momentum": "Path-SGD + momentum",
}


def make_optimizer(name: str, apply_fn: Callable[[Any, Any], Any], example_input: Any, *,
                   momentum: float = MOMENTUM, refresh_every: int = 1,
                   learning_rate: float = 1.0) -> optax.GradientTransformation:
  """Builds optimizer ``name`` (see :data:`OPTIMIZERS`).

  Args:
    name: one of :data:`OPTIMIZERS`.
    apply_fn: deterministic ``apply_fn(params, x)`` of the network (for Path-SGD's path
      network; it must not use dropout).
    example_input: an input batch (shape and dtype only).
    momentum: momentum of the ``*-momentum`` variants.
    refresh_every: Path-SGD's κ refresh period (1 = every step, the paper's rule).
    learning_rate: the learning rate; the experiments use 1 and scale the updates.

  Returns:
    The optax transformation. Path-SGD's ``update`` needs ``params``; passing them to the
    others is harmless.
  """
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "sgd-momentum":
    return optax.sgd(learning_rate, momentum=momentum)
  if name == "adagrad":
    return optax.adagrad(learning_rate)
  if name == "adam":
    return optax.adam(learning_rate)
  if name == "path-sgd":
    return pathsgd_jax.path_sgd(learning_rate, apply_fn, example_input,
                                refresh_every=refresh_every)
  if name == "path-sgd-momentum":
    return pathsgd_jax.path_sgd(learning_rate, apply_fn, example_input, momentum=momentum,
                                refresh_every=refresh_every)
  raise ValueError(f"Unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}.")
