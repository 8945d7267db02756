"""What the path network tells a user when it cannot read a network: causes, places, fixes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax._src import source_info_util


_HINTS = {
    "tanh": "tanh (jnp.tanh, or the tanh approximation inside jax.nn.gelu)",
    "logistic": "a sigmoid (jax.nn.sigmoid, jax.nn.silu/swish, gating)",
    "erf": "an erf (the exact jax.nn.gelu)",
    "exp": "an exponential (softmax, softplus, ELU, log-sum-exp)",
    "exp2": "an exponential",
    "log": "a logarithm (log_softmax, softplus)",
    "log1p": "a logarithm (softplus, log_sigmoid)",
    "rsqrt": "a normalisation by a statistic (LayerNorm, RMSNorm, train-mode BatchNorm)",
    "sqrt": "a square root (a norm or a normalisation)",
    "integer_pow": "a power (a variance in LayerNorm/BatchNorm, a squared activation)",
    "square": "a square (a variance in LayerNorm/BatchNorm)",
    "pow": "a power",
    "gather": "an indexing by input-derived indices (an embedding lookup)",
    "reduce_max": "a maximum",
    "min": "a minimum (ReLU6, clipping)",
    "clamp": "a clipping (ReLU6, hard_tanh, jnp.clip)",
    "sign": "a sign",
    "abs": "an absolute value",
    "div": "a division by a parameter or activation (weight normalisation, a statistic)",
    "ne": "a comparison of activations (softplus thresholds, masks)",
    "eq": "a comparison of activations (one-hot encoding, masks)",
    "mul": "a product of two activations (attention, gating, a variance)",
    "dot_general": "a product of two activations (attention, bilinear layers)",
    "while": "a while loop (lax.fori_loop/while_loop with a traced trip count)",
    "cond": "a data-dependent branch (lax.cond/switch)",
}

_ADVICE = (
    "Path-SGD and path norms need a network whose activations pass only through linear maps, "
    "additions, ReLU/leaky ReLU, pooling and BatchNorm (see the supported operations in the "
    "README). Replace the operation.")
_ACTIVATION_ADVICE = (
    "Only positively homogeneous activations have a path network: use ReLU or leaky ReLU.")
_NORMALISATION_ADVICE = (
    "LayerNorm and RMSNorm have no path network (they divide activations by a statistic of "
    "the same example): see the supported operations in the README. BatchNorm is supported in "
    "eval mode, and in train mode when the optimizer is given the batch (`inputs=`).")
_PARAMETER_ADVICE = (
    "If these leaves are not path weights, pass `mask=` to exclude them: excluded leaves are "
    "constants of the path network.")
_ACTIVATIONS = frozenset({"tanh", "logistic", "erf", "erf_inv", "exp", "exp2", "expm1", "log",
                          "log1p", "sin", "cos", "pow", "min", "clamp", "sign", "abs"})
_NORMALISATIONS = frozenset({"rsqrt", "sqrt", "square", "cbrt"})
_SOFTMAX = ("log_softmax", "softmax", "logsumexp")


def diagnose(eqn, callers: Sequence[Any], on_activations: bool) -> tuple[str, str]:
  """(what the operation is, what to do) for an operation the path network cannot contain."""
  name = eqn.primitive.name
  inside = [c.params.get("name") for c in callers]
  softmax = next((n for n in inside if n in _SOFTMAX), None)
  if softmax is not None:
    return (f"`{name}` inside jax.nn.{softmax}",
            f"apply_fn must return the logits: put {softmax} in the loss instead (e.g. "
            "optax.softmax_cross_entropy, or jax.nn.log_softmax applied to apply_fn's output).")
  hint = _HINTS.get(name)
  if name == "integer_pow" and eqn.params.get("y") == 3:
    hint = "x³, the cube in the tanh approximation of jax.nn.gelu"
  what = f"`{name}`" + (f" ({hint})" if hint else "")
  if not on_activations:
    return what, _PARAMETER_ADVICE
  if name == "integer_pow" and eqn.params.get("y") == 3 or name in _ACTIVATIONS:
    return what, _ACTIVATION_ADVICE
  if name in _NORMALISATIONS or name == "integer_pow" or name == "div":
    return what, _NORMALISATION_ADVICE
  return what, _ADVICE


_LIBRARIES = ("/flax/", "/optax/", "/equinox/", "/pathsgd_jax/", "/jax/")


def _in_library(file_name: str) -> bool:
  return any(part in file_name.replace("\\", "/") for part in _LIBRARIES)


def _where(eqn, callers: Sequence[Any] = ()) -> str:
  """Module path and source lines of an equation, falling back to its enclosing calls."""
  inside = [c.params["name"] for c in callers if "name" in c.params]
  for candidate in [eqn, *reversed(callers)]:
    frames = list(source_info_util.user_frames(candidate.source_info.traceback))
    if frames:
      break
  # Innermost frame first, then its callers: a library frame (e.g. flax) and the user's line.
  shown_frames = frames[:3]
  # Flax's own frames can fill the first three (NNX layers): add the user's line after them.
  if frames and all(_in_library(f.file_name) for f in shown_frames):
    shown_frames += [next((f for f in frames[3:] if not _in_library(f.file_name)), frames[-1])]
  shown = [f"{f.file_name}:{f.start_line} ({f.function_name})" for f in shown_frames]
  scope = str(candidate.source_info.name_stack)
  text = " <- ".join(shown) if shown else "unknown source"
  if inside:
    text = f"{text}, inside {' > '.join(inside)}"
  return f"{scope}: {text}" if scope else text
