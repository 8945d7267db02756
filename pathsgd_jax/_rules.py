"""The rule table of the path network: one small function per primitive (or family).

``RULES[name](interp, eqn, invals, out)`` returns the path-network values of ``eqn``'s
outputs; ``out`` (an `_Out`) builds them. The interpreter (`_interpreter`) handles what is
common to every primitive: constants folded at compile time, calls opened, sign tests of
ReLU, and closing neurons.

Affine neurons and folding
--------------------------
Path norms are defined on a network of *affine neurons*: a unit's pre-activation is
``Σ_u w_u·x_u + b`` with one bias ``b``, contributing ``|b|^p`` times the paths from it.
A jaxpr spells a neuron out in several steps (a dense layer, ``+ bias``, BatchNorm's
``(z − μ)·s/σ + β``, a constant shift), and the path norm must not depend on how:

* An activation ``z`` fresh from a linear map (dense, conv, pooling, a sum of activations,
  the input) opens a neuron with pending bias 0.
* ``z ± c``, ``c − z`` (``c`` a constant or a value of parameters only, broadcast) add
  ``±c`` to the pending bias, with its sign; ``−z`` negates it.
* ``z·c`` and ``z/c`` (elementwise, ``c`` constant or parameter-only) scale the
  activation's path value by ``|c|^p`` and the pending bias by ``c``; casts keep both.
* Any other operation on the activation (ReLU, a linear map, pooling, a reshape, a sum with
  another activation, a network output) *closes* the neuron first: the path network adds
  ``|b|^p`` for the pending signed bias ``b``.

So eval-mode BatchNorm after a convolution is the single neuron ``z·s/σ + (β − μ·s/σ)``,
as in the path-norm literature (BatchNorm folded into the preceding layer), and
re-parametrisations of constants that leave the function unchanged leave φ_p unchanged.
A network without such chains (one bias per layer) reads exactly as before.

κ of a folded bias follows the paper's coordinate-wise steepest-descent step: for a
parameter θ and the edges e it enters, ``κ_θ^{p/2} = Σ_e |∂e/∂θ|^p · ∂g/∂v_e`` with
``v_e = |e|^p`` and ``g`` the path sum; for a weight (``e = θ·c``) this is the plain rule,
for ``β − μ·s/σ`` it counts ``|μ/σ|^p`` of the scale's change. For p = 2 and networks in
which a path meets each parameter at most once (MLPs, CNNs, ResNets), κ is half the diagonal
of the Hessian of φ₂².
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pathsgd_jax._kernels import _MATVEC_MIN_SIZE, _powered_matvec
from pathsgd_jax._numerics import _concrete
from pathsgd_jax._tracing import _on_stand_in_mesh
from pathsgd_jax._values import Kind, _Val, memoised

# Primitives that only move, copy or select entries: they act on powered values unchanged.
LAYOUT = frozenset({
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "rev", "slice",
    "copy", "copy_p", "sharding_constraint", "mesh_cast", "reshard", "device_put",
    "optimization_barrier", "split",
})
# Linear in their (non-index) operands; the summing ones make a parameter value a sum.
LINEAR = frozenset({
    "concatenate", "pad", "reduce_sum", "reduce_window_sum", "cumsum", "select_n",
    "dynamic_slice", "dynamic_update_slice", "gather", "scatter-add", "scatter_add",
})
_SUMMING = frozenset({"reduce_sum", "reduce_window_sum", "cumsum", "scatter-add",
                      "scatter_add"})
ADDITIVE = frozenset({"add", "add_any", "sub"})
IDENTITY = frozenset({"neg", "convert_element_type", "reduce_precision"})
# GSPMD placement hints, dropped on activations: the path network's single example cannot
# follow a batch layout. (Explicit-mode `reshard` changes types and is kept, except where
# the network was traced over the stand-in mesh of `_stand_in_mesh`.)
_SHARDING = frozenset({"sharding_constraint"})
_PLACEMENT = frozenset({"sharding_constraint", "reshard", "mesh_cast", "copy", "copy_p"})
# Operations that keep an activation's neuron open (see the module docstring).
KEEPS_NEURON_OPEN = ADDITIVE | IDENTITY | _PLACEMENT | {"mul", "div"}
# Operands of these primitives that must be constants (indices), by position.
_INDEX_OPERANDS = {"dynamic_slice": slice(1, None), "dynamic_update_slice": slice(2, None),
                   "gather": slice(1, 2), "scatter-add": slice(1, 2), "scatter_add": slice(1, 2),
                   "select_n": slice(0, 1)}


def broadcast_op(op, a, b):
  """``op(a, b)`` with explicit broadcasting and a common dtype (rank promotion may raise)."""
  shape = np.broadcast_shapes(np.shape(a), np.shape(b))
  dtype = jnp.result_type(a, b)
  return op(_broadcast(a, shape, dtype), _broadcast(b, shape, dtype))


def _broadcast(x, shape, dtype):
  """x as an array of ``shape`` and ``dtype`` (lax only: this runs for most operations)."""
  if not isinstance(x, jax.Array):
    x = np.asarray(x, dtype)
  elif x.dtype != dtype:
    x = lax.convert_element_type(x, dtype)
  if np.shape(x) == shape:
    return x
  rank = len(shape) - np.ndim(x)
  return lax.broadcast_in_dim(x, shape, tuple(range(rank, len(shape))))


class _Out:
  """Builds the results of one equation: kinds, leaves, scales, signed values, the report."""

  def __init__(self, interp, eqn, invals):
    self.interp, self.eqn, self.invals = interp, eqn, invals
    self.kind = max(v.kind for v in invals)
    self.leaves = frozenset().union(*(v.leaves for v in invals))
    self.act = [v for v in invals if v.kind == Kind.ACT]

  def __call__(self, value, role=None, param_role=None, log_scale=None, renormalise=False,
               exact=None, keeps_origin=False, bounded=False):
    interp, eqn = self.interp, self.eqn
    values = value if eqn.primitive.multiple_results else [value]
    if self.kind == Kind.PARAM:
      if exact is None:
        exact = all(v.exact for v in self.invals if v.kind == Kind.PARAM)
      thunk = memoised(lambda: self.signed_outputs())
      return [_Val(Kind.PARAM, v, self.leaves, exact=exact,
                   signed=memoised(lambda i=i: thunk()[i])) for i, v in enumerate(values)]
    if role is not None:
      interp.note(eqn, role, value, self.invals, param_role)
    if log_scale is None:
      log_scale = self.act[0].log_scale
    pairs = ([interp.normalise(v, log_scale) for v in values] if renormalise
             else [(v, log_scale) for v in values])
    # Scaling by constants keeps an activation's identity, for the sign tests of leaky ReLU.
    origin = None
    if keeps_origin and len(self.act) == 1 and all(
        v.kind == Kind.CONST for v in self.invals if v is not self.act[0]):
      origin = self.act[0].origin
    bounded = renormalise or bounded
    return [_Val(Kind.ACT, v, log_scale=ls, origin=origin, bounded=bounded) for v, ls in pairs]

  def signed_outputs(self):
    """The true outputs of a parameter-only equation, from its operands' true values."""
    eqn = self.eqn
    operands = [self.interp.signed_of(v) for v in self.invals]
    out = eqn.primitive.bind(*operands, **eqn.params)
    return out if eqn.primitive.multiple_results else [out]


# ------------------------------------------------------------------------------- the rules
def _identity(interp, eqn, invals, out):
  (val,) = invals
  if val.kind == Kind.ACT:  # a cast or negation inside an open neuron
    bias = val.bias
    if bias is not None and eqn.primitive.name == "neg":
      bias = interp.combine(bias, None, "neg")
    return [dataclasses.replace(val, bias=bias)]
  return out(val.value, keeps_origin=True)


def _placement(interp, eqn, invals, out):
  val = invals[0]
  if val.kind == Kind.ACT and (eqn.primitive.name in _SHARDING or _on_stand_in_mesh(
      eqn.params.get("dst_sharding"))):
    return [val]  # placement only: the single example cannot follow a batch layout
  return _layout(interp, eqn, invals, out)


def _layout(interp, eqn, invals, out):
  values = [interp.lift(v, out.kind) if v.kind != Kind.ACT else v.value for v in invals]
  return out(eqn.primitive.bind(values[0], *values[1:], **eqn.params), keeps_origin=True,
             bounded=all(v.bounded for v in out.act))


def _additive(interp, eqn, invals, out):
  a, b = invals
  name = eqn.primitive.name
  if out.kind == Kind.ACT and (a.kind == Kind.ACT) != (b.kind == Kind.ACT):
    # z ± c or c − z: the constant joins the open neuron's bias, with its sign.
    act, other = (a, b) if a.kind == Kind.ACT else (b, a)
    pending = act.bias
    if name == "sub" and b is act and pending is not None:  # c − z = −(z) + c
      pending = interp.combine(pending, None, "neg")
    term = interp.combine(other, None, "neg") if name == "sub" and b is other else other
    bias = term if pending is None else interp.combine(pending, term, "add")
    shape = eqn.outvars[0].aval.shape
    value = act.value if np.shape(act.value) == shape else jnp.broadcast_to(act.value, shape)
    step = "constant shift" if other.kind == Kind.CONST else "parameter shift"
    return [_Val(Kind.ACT, value, log_scale=act.log_scale, bias=bias,
                 chain=act.chain | {step}, bias_at=eqn, neuron_leaves=act.neuron_leaves,
                 bounded=act.bounded)]
  if out.kind == Kind.ACT:  # a sum of activations (a residual connection): closes both neurons
    flushed = [interp.flush(v) for v in invals]
    (x, y), common = interp.align(flushed, Kind.ACT)
    # Two entries below 2 sum to below 4: renormalised by the next operation that may grow it.
    return out(broadcast_op(lax.add, x, y), "sum of activations", log_scale=common,
               renormalise=not all(v.bounded for v in flushed))
  x, y = (interp.lift(v, Kind.PARAM) for v in invals)  # parameters: a sum, folded where used
  return out(broadcast_op(lax.add, x, y), exact=False)


def _linear(interp, eqn, invals, out):
  name = eqn.primitive.name
  index_slot = _INDEX_OPERANDS.get(name, slice(0, 0))
  for idx in invals[index_slot]:
    if idx.kind != Kind.CONST:
      detail = "its indices (or selector) depend on the " + (
          "input" if idx.kind == Kind.ACT else "parameters")
      if idx.kind == Kind.ACT and name == "gather":
        detail += (" (an embedding lookup): feed the embedded vectors as the input of "
                   "apply_fn, and exclude the embedding table with `mask=`")
      raise interp.unsupported(eqn, detail, on_activations=idx.kind == Kind.ACT)
  index_positions = range(len(invals))[index_slot]
  summed = [v for i, v in enumerate(invals) if i not in index_positions]
  aligned, common = interp.align(summed, out.kind)
  aligned_iter = iter(aligned)
  operands = [v.value if i in index_positions else next(aligned_iter)
              for i, v in enumerate(invals)]
  value = eqn.primitive.bind(*operands, **eqn.params)
  if out.kind != Kind.ACT:
    exact = name not in _SUMMING and all(v.exact for v in summed if v.kind == Kind.PARAM)
    return out(value, exact=exact)
  role = {"reduce_window_sum": "sum pooling", "concatenate": "concatenate",
          "select_n": "select"}.get(name)
  # Moving, padding or selecting entries keeps them below 2 (aligned operands only shrink).
  bounded = name not in _SUMMING and all(v.bounded for v in summed if v.kind == Kind.ACT)
  return out(value, role, "bias" if name in ("concatenate", "pad", "select_n") else None,
             log_scale=common, renormalise=len(summed) > 1 and not bounded, bounded=bounded)


def _mul(interp, eqn, invals, out):
  a, b = invals
  if a.kind == Kind.ACT and b.kind == Kind.ACT:
    raise interp.unsupported(eqn, "both factors depend on the input")
  if out.kind != Kind.ACT:
    return out(broadcast_op(lax.mul, *(interp.lift(v, Kind.PARAM) for v in invals)), exact=True)
  act, factor = (a, b) if a.kind == Kind.ACT else (b, a)
  scale = interp.operand(factor, 0.0) if factor.kind == Kind.PARAM else interp.power(factor.value)
  value = broadcast_op(lax.mul, act.value, scale)
  # A scaling renormalises only an activation not already below 2: BatchNorm's scale right
  # after a convolution costs no renormalisation of its own.
  (result,) = out(value, "scale", "weight", renormalise=not act.bounded, keeps_origin=True)
  result = dataclasses.replace(result, neuron_leaves=act.neuron_leaves | factor.leaves)
  return [_reopen(interp, act, result, factor, "mul", eqn)]


def _div(interp, eqn, invals, out):
  a, b = invals
  if b.kind != Kind.CONST:
    raise interp.unsupported(eqn, "the divisor depends on the "
                             + ("input" if b.kind == Kind.ACT else "parameters"),
                             on_activations=b.kind == Kind.ACT)
  inverse = 1.0 / interp.power(b.value)
  if out.kind != Kind.ACT:
    return out(broadcast_op(lax.mul, interp.lift(a, Kind.PARAM), inverse), exact=a.exact)
  (result,) = out(broadcast_op(lax.mul, a.value, inverse), "scale by constant",
                  renormalise=not a.bounded, keeps_origin=True)
  return [_reopen(interp, a, result, b, "div", eqn)]


def _reopen(interp, act, result, factor, op, eqn):
  """The scaled activation stays in its neuron: the pending bias is scaled by the factor."""
  if act.bias is None:
    return result
  bias = interp.combine(act.bias, factor, op)
  step = "constant scale" if factor.kind == Kind.CONST else "parameter scale"
  return dataclasses.replace(result, bias=bias, chain=act.chain | {step}, bias_at=eqn,
                             neuron_leaves=act.neuron_leaves | factor.leaves)


def _contraction(interp, eqn, invals, out):
  """dot_general and conv_general_dilated: a dense or convolutional layer."""
  a, b = invals
  name = eqn.primitive.name
  if a.kind == Kind.ACT and b.kind == Kind.ACT:
    raise interp.unsupported(eqn, "both operands depend on the input")
  # Full precision: κ feeds a division, and TPUs otherwise multiply f32 in bfloat16.
  params = dict(eqn.params, preferred_element_type=None,
                precision=(lax.Precision.HIGHEST, lax.Precision.HIGHEST))
  if out.kind != Kind.ACT:  # a product of parameter tensors: a linear subnetwork
    x, y = (interp.lift(v, Kind.PARAM) for v in invals)
    return out(eqn.primitive.bind(x, y, **params), exact=True)
  if name == "dot_general" and _is_powered_matvec(interp, eqn, a, b):
    interp.operand(b, 0.0)  # registers the leaf's use (gradient exponent 0)
    (result,) = out(_powered_matvec(a.value, *b.raw, interp.p), "dense", "weight",
                    renormalise=True)
    return [dataclasses.replace(result, neuron_leaves=b.leaves)]
  x, y = (interp.operand(v, 0.0) if v.kind == Kind.PARAM else interp.lift(v, Kind.ACT)
          for v in invals)
  (result,) = out(eqn.primitive.bind(x, y, **params),
                  "dense" if name == "dot_general" else "conv", "weight", renormalise=True)
  return [dataclasses.replace(result, neuron_leaves=out.leaves)]


def _is_powered_matvec(interp, eqn, a: _Val, b: _Val) -> bool:
  """`x @ W` on one example with W a large parameter leaf: the common dense layer."""
  (contract_a, contract_b), (batch_a, batch_b) = eqn.params["dimension_numbers"]
  shape_a = np.shape(a.value)
  if not (a.kind == Kind.ACT and b.kind == Kind.PARAM and b.raw is not None):
    return False
  exponent = interp.gradient_exponents.get(next(iter(b.leaves)), 0.0)
  return (not batch_a and not batch_b and np.ndim(b.value) == 2
          and tuple(contract_b) == (0,) and tuple(contract_a) == (len(shape_a) - 1,)
          and math.prod(shape_a[:-1]) == 1 and np.size(b.value) >= _MATVEC_MIN_SIZE
          and isinstance(exponent, float) and exponent == 0.0)


def _power_of_param(interp, eqn, invals, out):
  (a,) = invals
  y = eqn.params.get("y", 2)
  if out.kind == Kind.ACT or y < 1:
    raise interp.unsupported(eqn, "it raises an activation to a power" if out.kind == Kind.ACT
                             else "a negative power of a weight is not a path weight",
                             on_activations=out.kind == Kind.ACT)
  return out(interp.lift(a, Kind.PARAM) ** y, exact=True)


def _abs(interp, eqn, invals, out):
  if out.kind != Kind.PARAM:
    raise interp.unsupported(eqn, "it acts on activations")
  return out(interp.lift(invals[0], Kind.PARAM), exact=True)


def _max(interp, eqn, invals, out):
  """max(x, 0): ReLU, the identity on the path network's non-negative values."""
  a, b = invals
  act, other = (a, b) if a.kind >= b.kind else (b, a)
  if act.kind == Kind.ACT and other.kind == Kind.CONST:
    c = _concrete(other.value)
    if c is None:
      raise interp.unsupported(eqn, "its threshold is not a compile-time constant, so it cannot "
                               "be checked to be a ReLU (max(x, 0))")
    if np.all(c == 0):
      return [interp.activation(eqn, act, "relu (identity)")]
    raise interp.unsupported(eqn, "max(x, c) with c != 0 is not positively homogeneous")
  raise interp.unsupported(eqn, "a maximum of activations or parameters (maxout) is not a path "
                           "network operation; only max(x, 0) (ReLU) is")


def _max_pooling(interp, eqn, invals, out):
  if out.kind != Kind.ACT:
    raise interp.unsupported(eqn, "it derives a weight non-monomially from parameters",
                             on_activations=False)
  name = eqn.primitive.name
  if name == "argmax":
    raise interp.unsupported(eqn, "the output of argmax is not linear in the activations")
  if name == "reduce_max":
    value = jnp.sum(invals[0].value, axis=tuple(eqn.params["axes"]))
  else:
    value = lax.reduce_window_sum_p.bind(invals[0].value, **eqn.params)
  return out(value, "max pooling (sum over window)")


RULES = {
    **{name: _identity for name in IDENTITY},
    **{name: _layout for name in LAYOUT - _PLACEMENT},
    **{name: _placement for name in _PLACEMENT},
    **{name: _additive for name in ADDITIVE},
    **{name: _linear for name in LINEAR},
    "mul": _mul,
    "div": _div,
    "dot_general": _contraction,
    "conv_general_dilated": _contraction,
    "integer_pow": _power_of_param,
    "square": _power_of_param,
    "abs": _abs,
    "max": _max,
    "reduce_max": _max_pooling,
    "reduce_window_max": _max_pooling,
    "argmax": _max_pooling,
}
