"""Flax Linen adapter: a Linen module as the ``apply_fn(params, x)`` Path-SGD expects."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn


def apply_fn(module: nn.Module, *, variables: Mapping[str, Any] | None = None,
             method: Callable[..., Any] | str | None = None,
             **kwargs: Any) -> Callable[[Any, Any], Any]:
  """Wraps a Linen module as ``apply_fn(params, x)`` over its ``'params'`` collection.

  The returned function calls ``module.apply({'params': params, **variables}, x, **kwargs)``,
  so ``params`` is exactly ``TrainState.params``. Pass the keyword arguments that put the
  module in inference mode (``deterministic=True``, ``train=False``): the path network must
  not draw dropout masks.

  Args:
    module: the Linen module.
    variables: other collections the module reads (e.g. ``{'batch_stats': ...}`` for
      eval-mode BatchNorm); they enter the path network as constants.
    method: the module method to call (default ``__call__``).
    **kwargs: forwarded to ``module.apply``.

  Returns:
    ``apply_fn(params, x)``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, pathsgd_jax as psgd
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((4, 3))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tx = psgd.path_sgd(0.1, psgd.linen.apply_fn(model), x)
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"pathsgd_jax.linen.apply_fn expects a flax.linen.Module, got "
                    f"{type(module).__name__}. For NNX models use pathsgd_jax.nnx.apply_fn.")
  extra = dict(variables or {})
  if "params" in extra:
    raise ValueError("`variables` must not contain 'params': the optimizer supplies them.")

  def fn(params, x):
    return module.apply({"params": params, **extra}, x, method=method, **kwargs)

  return fn
