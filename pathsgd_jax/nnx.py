"""Flax NNX adapter: an NNX model as the ``apply_fn(params, x)`` Path-SGD expects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx


def apply_fn(model: nnx.Module, *, wrt: Any = nnx.Param,
             method: Callable[..., Any] | None = None) -> Callable[[Any, Any], Any]:
  """Wraps an NNX model as ``apply_fn(params, x)`` over its ``wrt`` (``nnx.Param``) state.

  ``params`` is the state ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` hands to optax (an
  ``nnx.State`` of arrays or of ``Param`` variables). The rest of the model's state (batch
  statistics, RNG counters) is read from ``model`` at trace time and enters the path network
  as constants; the model is run on a copy switched to evaluation mode (dropout off,
  BatchNorm on its running averages), so ``model`` itself is never modified.

  Args:
    model: the NNX model.
    wrt: the variable filter the optimizer differentiates (default ``nnx.Param``).
    method: optional ``method(model, x)`` to call instead of ``model(x)``.

  Returns:
    ``apply_fn(params, x)``.

  Examples:
    >>> import jax.numpy as jnp, optax, pathsgd_jax as psgd
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> x = jnp.ones((4, 3))
    >>> optimizer = nnx.Optimizer(model, psgd.path_sgd(0.1, psgd.nnx.apply_fn(model), x),
    ...                           wrt=nnx.Param)
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"pathsgd_jax.nnx.apply_fn expects a flax.nnx.Module, got "
                    f"{type(model).__name__}. For Linen use pathsgd_jax.linen.apply_fn.")

  def fn(params, x):
    graphdef, _, rest = nnx.split(model, wrt, ...)
    copy = nnx.merge(graphdef, params, rest, copy=True)
    copy.eval()
    return copy(x) if method is None else method(copy, x)

  return fn
