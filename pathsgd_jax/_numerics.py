"""Numerics of the path network: exponents read off float bits, exact powers of two, |x|^p.

Path sums grow or shrink geometrically with depth. The interpreter keeps them as
``mantissa · 2^exponent`` and moves powers of two between the two exactly; these helpers do
that arithmetic without rounding (powers of two are exact in binary floating point).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _concrete(x) -> np.ndarray | None:
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
    return None



def _float_layout(dtype):
  finfo = jnp.finfo(dtype)
  bias = int(finfo.maxexp) - 1
  return int(finfo.nmant), bias, (jnp.int64 if finfo.bits == 64 else jnp.int32)


def binary_exponent(x) -> jax.Array:
  """floor(log2(x)) of a positive finite scalar, read off its bits; 0 for 0, inf or NaN."""
  nmant, bias, int_dtype = _float_layout(x.dtype)
  field = (lax.bitcast_convert_type(x, int_dtype) >> nmant) & (2 * bias + 1)
  exponent = jnp.maximum(field - bias, 1 - bias).astype(x.dtype)
  return jnp.where((x > 0) & jnp.isfinite(x), exponent, jnp.zeros((), x.dtype))


def _pow2(exponent, dtype) -> jax.Array:
  """2^e, exactly, for an integer-valued e clipped to the normal range of ``dtype``."""
  nmant, bias, int_dtype = _float_layout(dtype)
  e = jnp.clip(exponent, 1 - bias, bias).astype(int_dtype)
  return lax.bitcast_convert_type((e + bias) << nmant, dtype)


def times_pow2(value, exponent) -> jax.Array:
  """value · 2^exponent for integer-valued exponents (broadcast), exact unless it underflows.

  Applied in two factors so exponents down to twice the normal range stay exact; anything
  smaller underflows to zero for values below 2, as it should.
  """
  dtype = jnp.result_type(value)
  exponent = jnp.asarray(exponent, dtype)
  _, bias, _ = _float_layout(dtype)
  first = jnp.clip(exponent, 1 - bias, bias)
  return value * _pow2(first, dtype) * _pow2(exponent - first, dtype)



@jax.custom_vjp
def _shifted(value, forward_shift, backward_shift):
  """value · 2^forward_shift, whose gradient is multiplied by 2^backward_shift instead."""
  return times_pow2(value, forward_shift)


def _shifted_fwd(value, forward_shift, backward_shift):
  return times_pow2(value, forward_shift), (forward_shift, backward_shift)


def _shifted_bwd(residuals, cotangent):
  forward_shift, backward_shift = residuals
  return (times_pow2(cotangent, backward_shift), jnp.zeros_like(forward_shift),
          jnp.zeros_like(backward_shift))


_shifted.defvjp(_shifted_fwd, _shifted_bwd)


def power(x, p) -> jax.Array:
  """x ** p for x >= 0, exact and cheap for the common static exponents 1 and 2.

  ``p`` is a float, or a traced scalar when the transformation is rebuilt inside
  ``optax.inject_hyperparams``.
  """
  if isinstance(p, float) and p == 1:
    return x
  if isinstance(p, float) and p == 2:
    return x * x
  if isinstance(p, float) and p == 0.5:
    return jnp.sqrt(x)
  return x ** p


def power_leaf(x, p, dtype) -> jax.Array:
  """|x|^p in ``dtype`` (float32 or float64 even for half-precision params)."""
  return power(jnp.abs(x.astype(dtype)), p)


def check_p(p):
  """Validates the path-norm exponent; returns it as a float.

  A traced scalar (``optax.inject_hyperparams`` rebuilding the transformation under ``jit``)
  cannot be checked and is returned as is; it was checked when the state was initialised.
  """
  if isinstance(p, (jax.Array, np.ndarray)) and np.shape(p) == ():
    concrete = _concrete(p)
    if concrete is None:
      return p
    p = concrete.item()
  if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
    raise ValueError(f"p must be a real number >= 1, got {p!r} of type {type(p).__name__}.")
  if not math.isfinite(p) or p < 1:
    raise ValueError(f"p must be a finite real number >= 1 (path norms are defined for "
                     f"p >= 1; the paper uses p = 2), got {p}.")
  return float(p)
