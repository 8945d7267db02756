"""The inference-mode keywords a model's call signature offers, shared by the adapters.

Path-SGD evaluates a model once per step on a single example, and that evaluation must be the
deterministic one (no dropout masks, BatchNorm on its running averages). Frameworks spell the
switch differently (``deterministic=True``, ``train=False``, ``training=False``,
``inference=True``...); the adapters read the signature of the method they call and pass the
spellings it has.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

# Keyword -> the value that selects inference (evaluation) mode.
EVAL_KEYWORDS: Mapping[str, bool] = {
    "deterministic": True,
    "train": False,
    "training": False,
    "is_training": False,
    "use_running_average": True,
    "inference": True,
}

_NO_VALUE_NAMES = ("rngs", "rng", "key", "keys", "dropout_rng")


def signature(fn: Callable[..., Any], *, drop_first: bool = False) -> inspect.Signature | None:
  """``fn``'s signature (without its first parameter if ``drop_first``), or None if unknown."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return None
  if drop_first:
    params = list(sig.parameters.values())
    if params and params[0].kind in (params[0].POSITIONAL_ONLY,
                                     params[0].POSITIONAL_OR_KEYWORD):
      sig = sig.replace(parameters=params[1:])
  return sig


def inference_kwargs(sig: inspect.Signature | None, explicit: Mapping[str, Any]) -> dict[str, Any]:
  """The inference-mode keywords ``sig`` accepts by name that ``explicit`` does not set."""
  if sig is None:
    return {}
  out = {}
  for name, param in sig.parameters.items():
    if (name in EVAL_KEYWORDS and name not in explicit
        and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)):
      out[name] = EVAL_KEYWORDS[name]
  return out


def missing_arguments(sig: inspect.Signature | None,
                      supplied: Mapping[str, Any]) -> list[inspect.Parameter]:
  """Required parameters of ``sig`` left unfilled by a call ``f(x, **supplied)``."""
  if sig is None:
    return []
  missing, input_taken = [], False
  for name, param in sig.parameters.items():
    if param.kind is param.VAR_POSITIONAL:
      input_taken = True
    if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
      continue
    if not input_taken and param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
      input_taken = True  # the input x
      continue
    if param.default is param.empty and name not in supplied:
      missing.append(param)
  return missing


def call_hint(missing: list[inspect.Parameter], supplied: Mapping[str, Any]) -> str:
  """``lambda m, x: m(x, ...)`` filling ``missing``, e.g. ``m(x, None)`` for ``rngs``."""
  args = []
  for param in missing:
    value = "None" if param.name in _NO_VALUE_NAMES else f"<{param.name}>"
    args.append(value if param.kind is not param.KEYWORD_ONLY else f"{param.name}={value}")
  args += [f"{k}={v!r}" for k, v in supplied.items()]
  return f"method=lambda m, x: m(x, {', '.join(args)})"


def describe(name: str, sig: inspect.Signature | None) -> str:
  """``Model.__call__(x, train=True)`` for messages (names and defaults, no annotations)."""
  if sig is None:
    return name
  plain = [param.replace(annotation=param.empty) for param in sig.parameters.values()]
  return f"{name}{sig.replace(parameters=plain, return_annotation=sig.empty)}"


def method_signature(model, method) -> tuple[inspect.Signature | None, str]:
  """The signature and label of what an adapter calls: ``model.__call__`` or
  ``method(model, x, ...)``."""
  if method is None:
    return signature(model.__call__), f"{type(model).__name__}.__call__"
  return signature(method, drop_first=True), getattr(method, "__qualname__", "method")


def call_keywords(sig: inspect.Signature | None, label: str, kwargs: Mapping[str, Any],
                  fix: Callable[[list[inspect.Parameter]], str]) -> dict[str, Any]:
  """The keywords an adapter passes: the inference ones of ``sig``, overridden by ``kwargs``.

  Raises a TypeError naming the arguments the adapter cannot supply, ending with ``fix``'s
  advice for them.
  """
  call_kwargs = {**inference_kwargs(sig, kwargs), **kwargs}
  missing = missing_arguments(sig, call_kwargs)
  if missing:
    names = ", ".join(f"`{param.name}`" for param in missing)
    raise TypeError(f"{describe(label, sig)} needs {names}, which apply_fn(params, x) cannot "
                    f"supply{fix(missing)}")
  return call_kwargs
