"""Flax Linen adapter: a Linen module as the ``apply_fn(params, x)`` Path-SGD expects."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.errors
import flax.linen as nn

from pathsgd_jax import _signature


def apply_fn(module: nn.Module, *, variables: Mapping[str, Any] | None = None,
             method: Callable[..., Any] | str | None = None,
             **kwargs: Any) -> Callable[[Any, Any], Any]:
  """Wraps a Linen module as ``apply_fn(params, x)`` over its ``'params'`` collection.

  The returned function calls ``module.apply({'params': params, **variables}, x,
  method=method, **kwargs)``, so ``params`` is exactly ``TrainState.params``. The path network
  must be the module's inference-mode function (no dropout masks, BatchNorm on its running
  averages), so the adapter reads the signature of the method it calls and passes the
  inference-mode keywords it has: ``deterministic=True``, ``train=False``,
  ``training=False``, ``is_training=False``, ``use_running_average=True``,
  ``inference=True``. Keywords given explicitly override them (``train=True`` included). The
  keywords used are in the returned function's ``apply_kwargs`` attribute.

  A method that needs an argument the adapter cannot supply fails at once with the keyword to
  pass; a module that still draws random numbers (a dropout layer switched by an attribute or
  by a keyword the adapter does not know) fails, when traced, with the same advice.

  Args:
    module: the Linen module.
    variables: other collections the module reads (e.g. ``{'batch_stats': ...}`` for
      eval-mode BatchNorm); they enter the path network as constants.
    method: the module method to call (default ``__call__``): a name (``"encode"``), an
      unbound method (``Model.encode``) or a function ``method(module, x, **kwargs)``.
    **kwargs: forwarded to ``module.apply`` (and so to ``method``). With ``mutable=``
      (train-mode BatchNorm: ``train=True, mutable=['batch_stats']``) only the outputs are
      returned; the network is then read at the statistics of the batch the optimizer is given
      (``tx.update(..., inputs=x)``, see :func:`apply_gradients`).

  Returns:
    ``apply_fn(params, x)``.

  Raises:
    TypeError: ``module`` is not a Linen module, or the method needs an argument that is
      neither in ``kwargs`` nor an inference-mode keyword.
    ValueError: ``variables`` contains ``'params'``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, pathsgd_jax as psgd
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool = True):
    ...     x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(8)(x)))
    ...     return nn.Dense(2)(x)
    >>> model, x = Net(), jnp.ones((4, 3))
    >>> params = model.init(jax.random.key(0), x, train=False)["params"]
    >>> fn = psgd.linen.apply_fn(model)
    >>> fn.apply_kwargs
    {'train': False}
    >>> tx = psgd.path_sgd(0.1, fn, x)
    >>> opt_state = tx.init(params)
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"pathsgd_jax.linen.apply_fn expects a flax.linen.Module, got "
                    f"{type(module).__name__}. For NNX models use pathsgd_jax.nnx.apply_fn, "
                    "for Equinox pathsgd_jax.equinox.apply_fn.")
  extra = dict(variables or {})
  if "params" in extra:
    raise ValueError("`variables` must not contain 'params': the optimizer supplies them. "
                     "Pass the other collections only, e.g. variables={'batch_stats': ...}.")
  if isinstance(method, str):
    target = getattr(module, method, None)
    if not callable(target):
      raise TypeError(f"method={method!r}: {type(module).__name__} has no method of that name.")
    sig, label = _signature.signature(target), f"{type(module).__name__}.{method}"
  else:
    sig, label = _signature.method_signature(module, method)
  call_kwargs = _signature.call_keywords(sig, label, kwargs, lambda missing: (
      ": pass the inference-mode value, pathsgd_jax.linen.apply_fn(model, "
      + ", ".join(f"{param.name}=..." for param in missing) + ")."))

  returns_state = bool(call_kwargs.get("mutable"))  # train mode: (outputs, new collections)

  def fn(params, x):
    try:
      out = module.apply({"params": params, **extra}, x, method=method, **call_kwargs)
      return out[0] if returns_state else out
    except flax.errors.InvalidRngError as e:
      known = ", ".join(f"{k}={v}" for k, v in _signature.EVAL_KEYWORDS.items())
      used = ", ".join(f"{k}={v!r}" for k, v in call_kwargs.items()) or "no keywords"
      raise ValueError(
          f"{_signature.describe(label, sig)} draws random numbers with {used} ({e}): Path-SGD "
          f"needs its inference mode. Pass the keyword that selects it, e.g. "
          f"pathsgd_jax.linen.apply_fn(model, deterministic=True) (looked for: {known}), or "
          f"method= a function that calls the module deterministically.") from None

  fn.apply_kwargs = dict(call_kwargs)
  return fn


def apply_gradients(state, *, grads, inputs, **changes):
  """``TrainState.apply_gradients`` that also hands the optimizer the batch ``inputs``.

  Path-SGD on a network with train-mode BatchNorm folds it at the statistics of the batch
  being trained on, so its ``update`` needs that batch; Flax's ``TrainState.apply_gradients``
  passes no extra arguments to ``tx.update``. ``changes`` are set on the new state as well
  (e.g. ``batch_stats=``), as in ``TrainState.apply_gradients``.

  Args:
    state: a ``flax.training.train_state.TrainState`` (or subclass).
    grads: gradients like ``state.params``.
    inputs: the batch the gradients were computed on.
    **changes: other fields to replace.

  Returns:
    The new state, with ``step`` incremented.
  """
  import optax  # pylint: disable=g-import-not-at-top

  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, inputs=inputs)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state, **changes)
