"""Flax NNX adapter: an NNX model as the ``apply_fn(params, x)`` Path-SGD expects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from pathsgd_jax import _signature

_SHOWN = 4  # leaf names listed in a mismatch message


def _leaf_paths(tree) -> list[str]:
  """``'l1/kernel'`` for every leaf, whether ``tree`` holds arrays or ``Variable`` s."""
  out = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = []
    for k in path:
      if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
        continue
      parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    out.append("/".join(parts))
  return out


def _listing(names: list[str]) -> str:
  more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
  return ", ".join(names[:_SHOWN]) + more


def apply_fn(model: nnx.Module, *, wrt: Any = nnx.Param,
             method: Callable[..., Any] | None = None, batch_statistics: bool = False,
             **kwargs: Any) -> Callable[[Any, Any], Any]:
  """Wraps an NNX model as ``apply_fn(params, x)`` over its ``wrt`` (``nnx.Param``) state.

  ``params`` is the state ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` hands to optax, i.e.
  ``nnx.state(model, nnx.Param)`` (as ``nnx.State`` of arrays or of ``Param`` variables, or
  as ``nnx.to_pure_dict`` of it). The rest of the model's state (batch statistics, RNG
  counters) is read from ``model`` at trace time and enters the path network as constants.

  Inference mode: the model is run on a copy switched with ``model.eval()`` (every
  ``Dropout`` deterministic, every ``BatchNorm`` on its running averages), so ``model``
  itself is never modified; inference-mode keywords of the called method's signature
  (``deterministic=True``, ``train=False``, ``training=False``...) are passed as well, and
  ``kwargs`` override them. A ``__call__`` that needs more than the input (``rngs``, a
  mask) fails at once with the ``method=`` to pass, e.g. ``method=lambda m, x: m(x, None)``:
  in eval mode dropout draws nothing, so ``None`` serves for ``rngs``.

  Args:
    model: the NNX model.
    wrt: the variable filter the optimizer differentiates (default ``nnx.Param``); the
      params must be ``nnx.state(model, wrt)``.
    method: optional ``method(model, x, **kwargs)`` to call instead of ``model(x, **kwargs)``.
    batch_statistics: run every ``nnx.BatchNorm`` on the statistics of the batch (train
      mode) while the rest of the model stays in eval mode (dropout off). Path-SGD then
      reads the network folded at the current batch's statistics, so the optimizer needs the
      batch: ``optimizer.update(model, grads, inputs=x)``.
    **kwargs: keyword arguments of the call.

  Returns:
    ``apply_fn(params, x)``; the keywords it passes are in its ``apply_kwargs`` attribute.

  Raises:
    TypeError: ``model`` is not an NNX module, or its ``__call__`` needs an argument the
      adapter cannot supply.
    ValueError: (when traced) ``params`` is not ``nnx.state(model, wrt)``, e.g. the whole
      ``nnx.state(model)`` with batch statistics or RNG counters in it.

  Examples:
    >>> import jax.numpy as jnp, optax, pathsgd_jax as psgd
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Dropout(0.5, rngs=nnx.Rngs(2)),
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> x = jnp.ones((4, 3))
    >>> optimizer = nnx.Optimizer(model, psgd.path_sgd(0.1, psgd.nnx.apply_fn(model), x),
    ...                           wrt=nnx.Param)

    A ``__call__(self, x, rngs)``:

    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.l1, self.l2 = nnx.Linear(3, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)
    ...     self.drop = nnx.Dropout(0.5)
    ...   def __call__(self, x, rngs):
    ...     return self.l2(self.drop(nnx.relu(self.l1(x)), rngs=rngs))
    >>> net = Net(nnx.Rngs(0))
    >>> fn = psgd.nnx.apply_fn(net, method=lambda m, x: m(x, None))
    >>> kappa = psgd.path_scales(fn, nnx.state(net, nnx.Param), x)
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"pathsgd_jax.nnx.apply_fn expects a flax.nnx.Module, got "
                    f"{type(model).__name__}. For Linen use pathsgd_jax.linen.apply_fn, "
                    "for Equinox pathsgd_jax.equinox.apply_fn.")
  sig, label = _signature.method_signature(model, method)
  call_kwargs = _signature.call_keywords(sig, label, kwargs, lambda missing: (
      ". Path-SGD runs the model in eval mode (model.eval(): dropout draws nothing), so pass "
      f"pathsgd_jax.nnx.apply_fn(model, {_signature.call_hint(missing, {})})."))

  def fn(params, x):
    graphdef, expected, rest = nnx.split(model, wrt, ...)
    got_names, want_names = _leaf_paths(params), _leaf_paths(expected)
    if sorted(got_names) != sorted(want_names):
      extra = [n for n in got_names if n not in set(want_names)]
      absent = [n for n in want_names if n not in set(got_names)]
      detail = "; ".join(part for part in (
          f"not in it: {_listing(extra)}" if extra else "",
          f"missing: {_listing(absent)}" if absent else "") if part)
      raise ValueError(
          f"params is not nnx.state(model, {getattr(wrt, '__name__', wrt)}) ({detail}). "
          f"Pass nnx.state(model, nnx.Param), and build the optimizer with "
          f"nnx.Optimizer(model, tx, wrt=nnx.Param) (the whole nnx.state(model) holds batch "
          f"statistics and RNG counters, which are not path weights).")
    copy = nnx.merge(graphdef, params, rest, copy=True)
    copy.eval()
    if batch_statistics:
      for _, module in copy.iter_modules():
        if isinstance(module, nnx.BatchNorm):
          module.use_running_average = False
    if method is None:
      return copy(x, **call_kwargs)
    return method(copy, x, **call_kwargs)

  fn.apply_kwargs = dict(call_kwargs)
  return fn
