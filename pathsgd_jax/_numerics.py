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


def _pow2(exponent, dtype) -> jax.Array:
  """2^e, exactly, for an integer-valued float e clipped to the normal range of ``dtype``."""
  nmant, bias, int_dtype = _float_layout(dtype)
  e = lax.clamp(np.asarray(1 - bias, dtype), exponent, np.asarray(bias, dtype))
  field = lax.convert_element_type(e, int_dtype) + np.asarray(bias, int_dtype)
  return lax.bitcast_convert_type(lax.shift_left(field, np.asarray(nmant, int_dtype)), dtype)


def _scaled(value, factor):
  """value · factor for a scalar factor (lax only: this runs once per path-network operation)."""
  if np.ndim(value) == 0:
    return lax.mul(value, factor)
  return lax.mul(value, lax.broadcast_in_dim(factor, np.shape(value), ()))


def times_pow2(value, exponent) -> jax.Array:
  """value · 2^exponent for integer-valued exponents (broadcast), exact unless it underflows.

  Applied in two factors so exponents down to twice the normal range stay exact; anything
  smaller underflows to zero for values below 2, as it should.
  """
  dtype = jnp.result_type(value)
  value = jnp.asarray(value, dtype)
  exponent = jnp.asarray(exponent, dtype)
  if np.ndim(exponent):  # one exponent per entry (rare): broadcast arithmetic
    _, bias, _ = _float_layout(dtype)
    first = jnp.clip(exponent, 1 - bias, bias)
    return value * _pow2(first, dtype) * _pow2(exponent - first, dtype)
  return times_factors(value, pow2_factors(exponent))


def pow2_factors(exponent):
  """The two scalar factors whose product is 2^exponent (see `times_pow2`), to reuse."""
  dtype = jnp.result_type(exponent)
  dtype = dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)
  exponent = jnp.asarray(exponent, dtype)
  _, bias, _ = _float_layout(dtype)
  first = lax.clamp(np.asarray(1 - bias, dtype), exponent, np.asarray(bias, dtype))
  return _pow2(first, dtype), _pow2(lax.sub(exponent, first), dtype)


def times_factors(value, factors):
  """value · 2^exponent, with the factors of `pow2_factors(exponent)`."""
  first, second = (f if f.dtype == value.dtype else lax.convert_element_type(f, value.dtype)
                   for f in factors)
  return _scaled(_scaled(value, first), second)


def normalised(value) -> tuple[jax.Array, jax.Array]:
  """``(value · 2^-e, e)`` with e = floor(log2(max value)): the largest entry put in [1, 2).

  The factor is read off the bits of the maximum in one step (its exponent field, reflected),
  so it costs a reduction and a handful of scalar operations. It is a constant for autodiff.
  An all-zero (or denormal-maximum) value, or a non-finite maximum, is left as is with e = 0;
  a maximum at or above 2^127 (float32) lands in [2, 4).
  """
  dtype = jnp.result_type(value)
  nmant, bias, int_dtype = _float_layout(dtype)
  top = lax.stop_gradient(lax.reduce_max(value, tuple(range(np.ndim(value)))))

  def i(c):
    return np.asarray(c, int_dtype)

  field = lax.bitcast_convert_type(top, int_dtype)
  field = lax.bitwise_and(lax.shift_right_arithmetic(field, i(nmant)), i(2 * bias + 1))
  # The biased exponent of 2^-e is 2·bias - field (field = e + bias), kept normal.
  special = lax.bitwise_or(lax.eq(field, i(0)), lax.eq(field, i(2 * bias + 1)))
  inverse = lax.select(special, i(bias), lax.max(lax.sub(i(2 * bias), field), i(1)))
  scale = lax.bitcast_convert_type(lax.shift_left(inverse, i(nmant)), dtype)
  exponent = lax.convert_element_type(lax.sub(i(bias), inverse), dtype)
  return _scaled(value, scale), exponent


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
    return lax.mul(x, x) if isinstance(x, jax.Array) else x * x
  if isinstance(p, float) and p == 0.5:
    return jnp.sqrt(x)
  return x ** p


def power_leaf(x, p, dtype) -> jax.Array:
  """|x|^p in ``dtype`` (float32 or float64 even for half-precision params)."""
  x = jnp.asarray(x)
  return power(lax.abs(x if x.dtype == dtype else lax.convert_element_type(x, dtype)), p)


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
