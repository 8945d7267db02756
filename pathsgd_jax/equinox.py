"""Equinox adapter: an Equinox model as the ``apply_fn(params, x)`` Path-SGD expects.

Needs the optional extra ``equinox`` (``pip install "pathsgd-jax[equinox]"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from pathsgd_jax import _signature

try:
  import equinox as eqx
except ImportError as _error:  # pragma: no cover - exercised without the extra only
  raise ImportError("pathsgd_jax.equinox needs Equinox: pip install 'pathsgd-jax[equinox]' "
                    "(or pip install equinox).") from _error


def apply_fn(model: eqx.Module, *, filter_spec: Any = eqx.is_array,
             batch_axis: int | None = 0, method: Callable[..., Any] | None = None,
             **kwargs: Any) -> Callable[[Any, Any], Any]:
  """Wraps an Equinox model as ``apply_fn(params, x)`` over its arrays.

  ``params`` is ``eqx.filter(model, filter_spec)`` — by default
  ``eqx.filter(model, eqx.is_array)``, the first half of ``eqx.partition(model,
  eqx.is_array)`` — the tree an Equinox training loop hands to optax. The rest of the model
  (activation functions, static fields) is taken from ``model``. The model is combined
  from the two halves, switched to inference mode with ``eqx.nn.inference_mode`` (every
  ``eqx.nn.Dropout`` off), and called.

  Batching: Equinox layers act on one example (``eqx.nn.MLP`` takes ``(in_size,)``,
  ``eqx.nn.Conv2d`` ``(channels, height, width)``), so by default the model is
  ``jax.vmap``-ed over axis 0 of ``x`` and ``apply_fn`` takes a batch like every other
  adapter. For a model that already takes a batch, pass ``batch_axis=None``.

  Inference-mode keywords of the called method's signature (``inference=True``,
  ``deterministic=True``...) are passed, ``kwargs`` override them; a ``__call__`` that needs
  more than the input (a ``key``, a ``state``) fails at once with the ``method=`` to pass.
  ``eqx.nn.BatchNorm`` (which threads a ``state``) is not supported.

  Args:
    model: the Equinox model.
    filter_spec: the filter that made ``params`` from ``model`` (default ``eqx.is_array``).
    batch_axis: the batch axis of ``x`` to vmap over, or ``None`` to call the model on the
      whole batch.
    method: optional ``method(model, x, **kwargs)`` to call instead of ``model(x, **kwargs)``
      (on one example, unless ``batch_axis=None``).
    **kwargs: keyword arguments of the call.

  Returns:
    ``apply_fn(params, x)``; the keywords it passes are in its ``apply_kwargs`` attribute.

  Raises:
    TypeError: ``model`` is not an Equinox module, or its ``__call__`` needs an argument the
      adapter cannot supply.
    ValueError: (when traced) ``params`` does not have the structure of
      ``eqx.filter(model, filter_spec)``.

  Examples:
    >>> import jax, jax.numpy as jnp, equinox as eqx, pathsgd_jax as psgd
    >>> model = eqx.nn.MLP(3, 2, width_size=8, depth=2, key=jax.random.key(0))
    >>> params = eqx.filter(model, eqx.is_array)
    >>> x = jnp.ones((4, 3))
    >>> fn = psgd.equinox.apply_fn(model)
    >>> fn(params, x).shape
    (4, 2)
    >>> tx = psgd.path_sgd(0.1, fn, x)
    >>> opt_state = tx.init(params)
  """
  if not isinstance(model, eqx.Module):
    raise TypeError(f"pathsgd_jax.equinox.apply_fn expects an equinox.Module, got "
                    f"{type(model).__name__}. For Flax use pathsgd_jax.linen.apply_fn or "
                    "pathsgd_jax.nnx.apply_fn.")
  if batch_axis is not None and not isinstance(batch_axis, int):
    raise ValueError(f"batch_axis must be an int or None, got {batch_axis!r}.")
  sig, label = _signature.method_signature(model, method)
  call_kwargs = _signature.call_keywords(sig, label, kwargs, lambda missing: (
      ". Path-SGD runs the model in inference mode (no dropout key is used), so pass "
      f"pathsgd_jax.equinox.apply_fn(model, {_signature.call_hint(missing, {})})."))
  expected, static = eqx.partition(model, filter_spec)
  expected_structure = jax.tree.structure(expected)

  def fn(params, x):
    structure = jax.tree.structure(params)
    if structure != expected_structure:
      raise ValueError(
          f"params does not have the structure of eqx.filter(model, filter_spec) "
          f"({structure.num_leaves} leaves where {expected_structure.num_leaves} are expected). "
          f"Pass params = eqx.filter(model, eqx.is_array) (or the first half of "
          f"eqx.partition(model, eqx.is_array)), made with the filter_spec given to the adapter.")
    net = eqx.nn.inference_mode(eqx.combine(params, static))

    def one(xi):
      return net(xi, **call_kwargs) if method is None else method(net, xi, **call_kwargs)

    return one(x) if batch_axis is None else jax.vmap(one, in_axes=batch_axis)(x)

  fn.apply_kwargs = dict(call_kwargs)
  return fn
