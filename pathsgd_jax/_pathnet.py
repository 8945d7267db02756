"""The path network of ``apply_fn``: trace once, evaluate the path sum at powered weights.

See `_interpreter` for how each primitive is read, `_numerics` for the power-of-two
bookkeeping and `_kernels` for the dense-layer products.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pathsgd_jax._errors import PathNetworkError
from pathsgd_jax._interpreter import Kind, Operation, PathInterpreter, _Val  # noqa: F401
from pathsgd_jax._numerics import check_p, power, power_leaf, times_pow2  # noqa: F401
from pathsgd_jax._tracing import (_check_no_masked_nodes, _leaf_name, _resolve_mask,
                                  _single_example, _trace)


@dataclasses.dataclass
class PathNetwork:
  """A traced network, ready to evaluate its path sum at powered weights.

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs``.
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``); only structure, shapes
      and dtypes are used for tracing.
    example_input: a batch (array, ``ShapeDtypeStruct`` or pytree of them) with the real input
      shape; the path network runs on one all-ones example with the leading axis set to 1.
    p: exponent of the path norm.
    mask: boolean tree like ``params`` (or a callable returning it): ``False`` leaves are not
      path weights and act as fixed constants.
  """

  apply_fn: Callable[..., Any]
  params: Any
  example_input: Any
  p: float
  mask: Any = None

  def __post_init__(self):
    _check_no_masked_nodes(self.params)
    leaves_with_paths, self.treedef = jax.tree_util.tree_flatten_with_path(self.params)
    self.leaf_names = [_leaf_name(path) for path, _ in leaves_with_paths]
    leaves = [leaf for _, leaf in leaves_with_paths]
    for name, leaf in zip(self.leaf_names, leaves):
      dtype = jnp.result_type(leaf)
      if not jnp.issubdtype(dtype, jnp.floating):
        raise PathNetworkError(
            f"Parameter leaf '{name}' has dtype {dtype}; path scales are defined for real "
            "floating-point weights only. Exclude it with `mask=` or keep it out of the "
            "optimised tree.")
    self.included = _resolve_mask(self.mask, self.params, self.treedef)
    self.dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    abstract_params = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in leaves]
    self.input_struct = jax.tree.map(_single_example, self.example_input)
    self.closed_jaxpr = _trace(self.apply_fn, self.treedef, abstract_params,
                               self.input_struct, self.leaf_names)
    self._shiftable = None

  def path_sum(self, powered: Sequence[jax.Array], constants: Sequence[Any],
               interpreter: PathInterpreter | None = None, raw: Sequence[Any] | None = None):
    """g(v) = Σ_outputs N(v, 1) as (mantissa, exponent, gradient exponents).

    g = mantissa · 2^exponent. The path network renormalises by powers of two as it goes, so
    this is exact to rounding and free of overflow whatever the size of g and of the path
    sums on the way. The exponents carry no gradient: ∂ log(mantissa)/∂v = (∂g/∂v)/g, except
    that the gradient of included leaf i comes out multiplied by 2^(-gradient_exponents[i])
    (see `PathInterpreter.operand`).

    Args:
      powered: ``|θ|^p`` for each included leaf (in the compute dtype), in leaf order.
      constants: the real values of the excluded leaves, in leaf order.
      interpreter: an interpreter to record with; a fresh one by default.
      raw: optional (w, δ) per included leaf with powered = |w|^p + δ, δ = 0, for the fast
        dense path; the gradient then belongs to δ.
    """
    interp = interpreter or PathInterpreter(self.p, self.dtype, self.leaf_names)
    interp.shiftable = self._shiftable_leaves(powered, constants)
    mantissa, exponent = self._evaluate(powered, constants, interp, raw)
    zero = jnp.zeros((), self.dtype)
    gradient_exponents = [lax.stop_gradient(jnp.asarray(interp.gradient_exponents.get(i, zero),
                                                        self.dtype))
                          for i, inc in enumerate(self.included) if inc]
    return mantissa, exponent, gradient_exponents

  def _evaluate(self, powered, constants, interp, raw=None):
    powered_iter, constant_iter = iter(powered), iter(constants)
    raw_iter = iter(raw) if raw is not None else None
    args = []
    for i, inc in enumerate(self.included):
      if inc:
        args.append(_Val(Kind.PARAM, next(powered_iter), frozenset({i}),
                         raw=next(raw_iter) if raw_iter is not None else None))
      else:
        args.append(_Val(Kind.CONST, next(constant_iter)))
    for struct in jax.tree.leaves(self.input_struct):
      args.append(_Val(Kind.ACT, jnp.ones(struct.shape, self.dtype)))
    jaxpr = self.closed_jaxpr
    outs = interp.run(jaxpr.jaxpr, [_Val(Kind.CONST, c) for c in jaxpr.consts], args)
    summed = []
    for out in outs:
      if out.kind == Kind.ACT:
        summed.append(dataclasses.replace(out, value=jnp.sum(out.value)))
      elif jnp.issubdtype(jnp.result_type(out.value), jnp.inexact):  # paths from biases only
        summed.append(_Val(Kind.PARAM, jnp.sum(interp.lift(out, Kind.ACT))))
    if not summed:
      raise PathNetworkError("apply_fn returns no floating-point output: there is no path sum.")
    values, exponent = interp.align(summed, Kind.ACT)
    return sum(values[1:], values[0]), jnp.asarray(exponent, self.dtype)

  def _shiftable_leaves(self, powered, constants) -> frozenset[int]:
    """Leaves whose gradient may be returned with an exponent: found by a shape-only run."""
    if self._shiftable is None:
      dry = PathInterpreter(self.p, self.dtype, self.leaf_names)
      structs = [jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)) for v in powered]
      jax.eval_shape(lambda v: self._evaluate(v, constants, dry), structs)
      self._shiftable = frozenset(
          i for i, inc in enumerate(self.included) if inc and i not in dry.unshiftable)
    return self._shiftable
