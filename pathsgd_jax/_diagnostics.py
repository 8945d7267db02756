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
    "additions, ReLU/leaky ReLU and pooling. Replace the operation, or, if the leaves feeding "
    "it are not path weights (e.g. a normalisation scale), pass `mask=` to exclude them and "
    "restructure the model so the operation does not act on activations."
)


def _where(eqn, callers: Sequence[Any] = ()) -> str:
  """Module path and source lines of an equation, falling back to its enclosing calls."""
  inside = [c.params["name"] for c in callers if "name" in c.params]
  for candidate in [eqn, *reversed(callers)]:
    frames = list(source_info_util.user_frames(candidate.source_info.traceback))
    if frames:
      break
  # Innermost frame first, then its callers: a library frame (e.g. flax) and the user's line.
  shown = [f"{f.file_name}:{f.start_line} ({f.function_name})" for f in frames[:3]]
  scope = str(candidate.source_info.name_stack)
  text = " <- ".join(shown) if shown else "unknown source"
  if inside:
    text = f"{text}, inside {' > '.join(inside)}"
  return f"{scope}: {text}" if scope else text
