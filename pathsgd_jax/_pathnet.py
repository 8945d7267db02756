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

from pathsgd_jax._errors import PathNetworkError, UnsupportedOperationError
from pathsgd_jax._interpreter import Kind, Operation, PathInterpreter, _Val  # noqa: F401
from pathsgd_jax._numerics import check_p, power, power_leaf, times_pow2  # noqa: F401
from pathsgd_jax._statistics import batch_struct, evaluate_statistics, find_statistics
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
    self._abstract_params = abstract_params
    self.closed_jaxpr = _trace(self.apply_fn, self.treedef, abstract_params,
                               self.input_struct, self.leaf_names)
    self._shiftable = None
    self.leaf_groups = None  # per leaf, the leaf heading its group of neurons (first run)
    self._statistics_plan = None  # set by the first evaluation if the net reads batch stats
    self._batched_traces = {}

  def path_sum(self, weights: Sequence[jax.Array], constants: Sequence[Any],
               interpreter: PathInterpreter | None = None,
               deltas: Sequence[jax.Array] | None = None, inputs: Any = None,
               sources: Sequence[jax.Array] | None = None):
    """g(v) = Σ_outputs N(v, 1) at v = |θ|^p, as (mantissa, exponent, gradient exponents).

    g = mantissa · 2^exponent. The path network renormalises by powers of two as it goes, so
    this is exact to rounding and free of overflow whatever the size of g and of the path
    sums on the way. The exponents carry no gradient: ∂ log(mantissa)/∂v = (∂g/∂v)/g, except
    that the gradient of included leaf i comes out multiplied by 2^(-gradient_exponents[i])
    (see `PathInterpreter.operand`).

    Args:
      weights: the included leaves θ (their true values), in leaf order.
      constants: the real values of the excluded leaves, in leaf order.
      interpreter: an interpreter to record with; a fresh one by default.
      deltas: optional zeros δ per included leaf, added to |θ|^p: differentiate with respect
        to them for κ (dense layers then skip forming |θ|^p at full size).
      inputs: the batch being trained on; needed (only) by networks that normalise with
        batch statistics, which are computed from it (see `_statistics`).
      sources: optional values of the input nodes, one per input leaf with its shape (all
        ones by default, the path network's); data-dependent readers (`ddp`) pass others.
    """
    interp = interpreter or PathInterpreter(self.p, self.dtype, self.leaf_names)
    shiftable = self._shiftable_leaves(weights, constants)
    # Gradient exponents are for κ, whose caller undoes them; a true gradient has none.
    interp.shiftable = shiftable if interp.kappa_rule else frozenset()
    if self._statistics_plan is not None:
      interp.statistics = self._statistics(weights, constants, inputs)
    mantissa, exponent = self._evaluate(weights, constants, interp, deltas, sources)
    zero = jnp.zeros((), self.dtype)
    gradient_exponents = [lax.stop_gradient(jnp.asarray(interp.gradient_exponents.get(i, zero),
                                                        self.dtype))
                          for i, inc in enumerate(self.included) if inc]
    return mantissa, exponent, gradient_exponents

  def _evaluate(self, weights, constants, interp, deltas=None, sources=None):
    weight_iter, constant_iter = iter(weights), iter(constants)
    delta_iter = iter(deltas) if deltas is not None else None
    args = []
    for i, inc in enumerate(self.included):
      if not inc:
        args.append(_Val(Kind.CONST, next(constant_iter)))
        continue
      w = next(weight_iter)
      powered = power_leaf(w, self.p, self.dtype)
      raw = None
      if delta_iter is not None:
        delta = next(delta_iter)
        powered, raw = powered + delta, (w, delta)
      args.append(_Val(Kind.PARAM, powered, frozenset({i}), raw=raw,
                       signed=lambda w=w: w))
    structs = jax.tree.leaves(self.input_struct)
    for struct, source in zip(structs, sources if sources is not None else [None] * len(structs)):
      args.append(_Val(Kind.ACT, jnp.ones(struct.shape, self.dtype), bounded=True)
                  if source is None else _Val(Kind.ACT, jnp.asarray(source, self.dtype)))
    jaxpr = self.closed_jaxpr
    outs = interp.run(jaxpr.jaxpr, [_Val(Kind.CONST, c) for c in jaxpr.consts], args)
    summed = []
    for out in outs:
      if out.kind == Kind.ACT:
        out = interp.flush(out)
        summed.append(dataclasses.replace(out, value=jnp.sum(out.value)))
      elif jnp.issubdtype(jnp.result_type(out.value), jnp.inexact):  # paths from biases only
        summed.append(_Val(Kind.PARAM, jnp.sum(interp.lift(out, Kind.ACT))))
    if not summed:
      raise PathNetworkError("apply_fn returns no floating-point output: there is no path sum.")
    values, exponent = interp.align(summed, Kind.ACT)
    return sum(values[1:], values[0]), jnp.asarray(exponent, self.dtype)

  def _shiftable_leaves(self, weights, constants) -> frozenset[int]:
    """Leaves whose gradient may be returned with an exponent: found by a shape-only run.

    The same run finds out whether the network reads batch statistics: a train-mode
    BatchNorm fails to read at batch size 1 without them, and reads with them.
    """
    if self._shiftable is None:
      structs = [jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)) for v in weights]
      dry = self._dry_run(structs, constants)
      if dry.errors:
        plan, batched = self._find_statistics()
        if plan is None:
          raise _all_errors(dry.errors)
        abstract = {index: [jnp.zeros(v.aval.shape, v.aval.dtype)
                            for v in batched.jaxpr.eqns[index].outvars] for index in plan.roots}
        dry = self._dry_run(structs, constants, statistics={
            id(self.closed_jaxpr.jaxpr): {"live": plan.live, "values": abstract}})
        if dry.errors:
          raise _all_errors(dry.errors)
        self._statistics_plan = plan
      self._shiftable = frozenset(
          i for i, inc in enumerate(self.included) if inc and i not in dry.unshiftable)
      self.leaf_groups = [dry.group(i) for i in range(len(self.included))]
    return self._shiftable

  def _dry_run(self, structs, constants, statistics=None) -> PathInterpreter:
    """A shape-only evaluation that collects every unsupported operation instead of raising."""
    dry = PathInterpreter(self.p, self.dtype, self.leaf_names, statistics=statistics)
    dry.errors = []
    jax.eval_shape(lambda v: self._evaluate(v, constants, dry), structs)
    return dry

  def _input_kinds(self):
    kinds = [Kind.PARAM if inc else Kind.CONST for inc in self.included]
    return kinds + [Kind.ACT] * len(jax.tree.leaves(self.input_struct))

  def _batched_trace(self, struct):
    key = str(jax.tree.map(lambda s: (tuple(s.shape), str(s.dtype)), struct))
    if key not in self._batched_traces:
      self._batched_traces[key] = _trace(self.apply_fn, self.treedef, self._abstract_params,
                                         struct, self.leaf_names)
    return self._batched_traces[key]

  def _find_statistics(self):
    batched = self._batched_trace(batch_struct(self.example_input, 2))
    plan = find_statistics(self.closed_jaxpr.jaxpr, batched.jaxpr, self._input_kinds())
    return plan, batched

  def _statistics(self, weights, constants, inputs):
    """The batch statistics of ``inputs`` at the current weights, for the interpreter."""
    if inputs is None or any(isinstance(x, jax.ShapeDtypeStruct)
                             for x in jax.tree.leaves(inputs)):
      raise PathNetworkError(
          "This network normalises with the statistics of its batch (e.g. BatchNorm in train "
          "mode): its path network is the network folded at the current batch's statistics, "
          "so it needs that batch. Pass it: `tx.update(grads, opt_state, params, inputs=x)` "
          "(nnx: `optimizer.update(model, grads, inputs=x)`), or a real batch as "
          "`example_input` of path_scales/path_norm/path_structure. Or trace `apply_fn` in "
          "eval mode (train=False / use_running_average=True).")
    struct = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)),
                          inputs)
    batched = self._batched_trace(struct)
    if len(batched.jaxpr.eqns) != len(self.closed_jaxpr.jaxpr.eqns):
      raise PathNetworkError("apply_fn traces to a different program at the batch size of "
                             "`inputs`; its batch statistics cannot be located.")
    weight_iter, constant_iter = iter(weights), iter(constants)
    leaves = [next(weight_iter) if inc else next(constant_iter) for inc in self.included]
    values = evaluate_statistics(batched, self._statistics_plan,
                                 leaves + jax.tree.leaves(inputs))
    return {id(self.closed_jaxpr.jaxpr): {"live": self._statistics_plan.live,
                                          "values": values}}


_SHOWN_ERRORS = 8


def _all_errors(errors) -> UnsupportedOperationError:
  """One error for every operation the path network cannot contain (repeats listed once)."""
  # One entry per place (GELU's cube, tanh and products share a line): its first operation.
  by_place: dict[str, list[str]] = {}
  for error in errors:
    text = str(error)
    place = text.split(" It was produced at ", 1)[-1].split(". ", 1)[0]
    by_place.setdefault(place, []).append(text)
  messages = [group[0] for group in by_place.values()]
  if len(messages) == 1:
    return UnsupportedOperationError(messages[0])
  shown = "\n".join(f"{i}. {m}" for i, m in enumerate(messages[:_SHOWN_ERRORS], 1))
  more = len(messages) - _SHOWN_ERRORS
  tail = f"\n... and {more} more." if more > 0 else ""
  return UnsupportedOperationError(
      f"The path network cannot contain {len(messages)} operations of this network (fix them "
      f"all; each names its primitive, where it was produced and what to do):\n{shown}{tail}")
