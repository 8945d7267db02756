"""The path network: the user's network re-read, primitive by primitive, with powered weights.

For a ReLU network with weights ``w``, the *path network* ``N(v, 1)`` evaluates the same
computation graph with every edge weight replaced by ``v = |w|^p`` on an all-ones input, with
every ReLU acting as the identity. Its summed output is the path sum
``g(v) = Σ_paths Π_{e∈path} |w_e|^p`` and ``∂g/∂v_e`` is the sum over paths through ``e`` of
the product of the other edges (Neyshabur et al., 2015).

Simply calling ``apply_fn(|θ|^p, ones)`` is wrong whenever the graph holds a multiplicative
constant that is not a parameter (average pooling's ``1/k``, a residual scale, a subtraction)
or an operation that is not linear and positively homogeneous (tanh, LayerNorm, ...). So the
network is traced to a jaxpr and re-evaluated here with one explicit rule per primitive. Every
value carries a *kind*:

``CONST``
  depends on neither parameters nor input; kept at its true value (concrete when possible),
  and raised to ``|c|^p`` only where it meets a parameter or an activation.
``PARAM``
  depends on parameters only (a weight, possibly reshaped, cast or scaled); held as ``|w|^p``.
``ACT``
  depends on the input: an activation of the path network, held as its (non-negative) value.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from pathsgd_jax._diagnostics import _ADVICE, _HINTS, _where
from pathsgd_jax._errors import UnsupportedOperationError
from pathsgd_jax._kernels import _MATVEC_MIN_SIZE, _powered_matvec
from pathsgd_jax._numerics import _concrete, _shifted, binary_exponent, power, times_pow2
from pathsgd_jax._tracing import _on_stand_in_mesh


class Kind(enum.IntEnum):
  CONST = 0
  PARAM = 1
  ACT = 2


@dataclasses.dataclass(frozen=True)
class _Val:
  kind: Kind
  value: Any
  leaves: frozenset[int] = frozenset()  # parameter leaves a PARAM value was derived from
  log_scale: Any = 0.0  # an ACT value stands for value * 2^log_scale
  # An ACT value's identity up to constant factors: scaling by a constant keeps it.
  origin: Any = None
  # Set on the result of `x > 0` and kin: the origin of the activation x that was tested,
  # and the comparison's primitive.
  tested: Any = None
  tested_by: str = ""
  # For a parameter leaf itself: (raw weight, zero perturbation δ) with value = |w|^p + δ, so
  # a large dense layer can be applied without materialising |w|^p (see `_powered_matvec`).
  raw: Any = None

  def __post_init__(self):
    if self.kind == Kind.ACT and self.origin is None:
      object.__setattr__(self, "origin", object())


class Operation(NamedTuple):
  """One operation of the path network, as listed in the structure report.

  Attributes:
    primitive: the JAX primitive of the user's network.
    role: what the path network does with it (``"dense"``, ``"conv"``, ``"bias"``,
      ``"relu (identity)"``, ``"max pooling (sum over window)"``, ...).
    shape: shape of the activation it produces (for the single all-ones example).
    leaves: names of the parameter leaves it reads.
    where: the module path and source line that produced it.
  """

  primitive: str
  role: str
  shape: tuple[int, ...]
  leaves: tuple[str, ...]
  where: str


# Primitives that only move, copy, sum or select entries: linear in each operand, so they act
# on powered values unchanged (constants among their operands are powered first).
_LAYOUT = frozenset({
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "rev", "slice",
    "copy", "copy_p", "sharding_constraint", "mesh_cast", "reshard", "device_put",
    "optimization_barrier", "split",
})
_LINEAR = frozenset({
    "concatenate", "pad", "reduce_sum", "reduce_window_sum", "cumsum", "select_n",
    "dynamic_slice", "dynamic_update_slice", "gather", "scatter-add", "scatter_add",
})
_ADDITIVE = frozenset({"add", "add_any", "sub"})
# GSPMD placement hints, dropped on activations: the path network's single example cannot
# follow a batch layout. (Explicit-mode `reshard` changes types and is kept, except where
# the network was traced over the stand-in mesh of `_stand_in_mesh`.)
_SHARDING = frozenset({"sharding_constraint"})
_IDENTITY = frozenset({"neg", "convert_element_type", "reduce_precision"})
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
                    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_STOCHASTIC = frozenset({"random_bits", "rng_bit_generator", "rng_uniform", "threefry2x32"})
_COMPARISONS = {"gt": True, "ge": True, "lt": False, "le": False}
_MIRRORED = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}
# Operands of these primitives that must be constants (indices), by position.
_INDEX_OPERANDS = {"dynamic_slice": slice(1, None), "dynamic_update_slice": slice(2, None),
                   "gather": slice(1, 2), "scatter-add": slice(1, 2), "scatter_add": slice(1, 2),
                   "select_n": slice(0, 1)}


def _open(inner) -> tuple[jex_core.Jaxpr, Sequence[Any]] | None:
  """(jaxpr, consts) of a closed jaxpr, or of a plain one (newer JAX keeps no consts)."""
  if isinstance(inner, jex_core.ClosedJaxpr):
    return inner.jaxpr, inner.consts
  if isinstance(inner, jex_core.Jaxpr):
    return inner, ()
  return None


def _subjaxpr(eqn) -> tuple[jex_core.Jaxpr, Sequence[Any]] | None:
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    opened = _open(eqn.params.get(key))
    if opened is not None:
      return opened
  return None


def _scan_layout(params) -> tuple[int, int]:
  """(number of consts, number of carries) of a scan, across JAX versions."""
  if "num_consts" in params:
    return params["num_consts"], params["num_carry"]
  # JAX >= 0.11: a flat tree of the operands in three groups (consts, carry, xs).
  consts, carry, _ = params["ft_in"].unpack()
  return len(list(consts.vals)), len(list(carry.vals))


class PathInterpreter:
  """Evaluates a jaxpr as the path network. One instance per evaluation.

  Args:
    p: the exponent of the path norm.
    dtype: the floating dtype every powered value is computed in.
    leaf_names: names of the parameter leaves, for the structure report.
    record: whether to record the operations for the structure report.
  """

  def __init__(self, p: float, dtype, leaf_names: Sequence[str], record: bool = False):
    self.p = p
    self.dtype = dtype
    self.leaf_names = list(leaf_names)
    self.record = record
    self.operations: list[Operation] = []
    self.leaf_roles: dict[int, set[str]] = {}
    self.callers: list[Any] = []  # enclosing call equations, for error messages
    # Gradient exponents (see `operand`): leaves whose gradient is returned as
    # true_gradient · 2^(-exponent), the exponent of each, and the leaves not eligible.
    self.shiftable: frozenset[int] = frozenset()
    self.gradient_exponents: dict[int, jax.Array] = {}
    self.unshiftable: set[int] = set()
    self.loop_depth = 0

  def where(self, eqn) -> str:
    return _where(eqn, self.callers)

  def unsupported(self, eqn, detail: str) -> UnsupportedOperationError:
    name = eqn.primitive.name
    hint = _HINTS.get(name)
    what = f"`{name}`" + (f" ({hint})" if hint else "")
    return UnsupportedOperationError(
        f"The path network cannot contain {what}: {detail}. It was produced at "
        f"{self.where(eqn)}. " + _ADVICE)

  # ----------------------------------------------------------------------------- helpers
  def power(self, c) -> jax.Array:
    """|c|^p for a constant, in the compute dtype."""
    return power(jnp.abs(jnp.asarray(c).astype(self.dtype)), self.p)

  def lift(self, val: _Val, kind: Kind) -> jax.Array:
    if val.kind == Kind.CONST and kind != Kind.CONST:
      return self.power(val.value)
    return val.value

  def normalise(self, value, log_scale):
    """Divides by the power of two nearest below the largest entry; adds it to the scale.

    Path sums grow or shrink geometrically with depth; kept as value·2^log_scale with
    value < 2 they never overflow or underflow on the way, and powers of two keep every
    rescaling exact. The factor is a constant for autodiff: it cancels between the value and
    the log-scale.
    """
    if not np.size(value):
      return value, log_scale
    exponent = lax.stop_gradient(binary_exponent(jnp.max(value)))
    return times_pow2(value, -exponent), log_scale + exponent

  def align(self, vals: Sequence[_Val], kind: Kind):
    """Brings the operands of a sum-like operation to one common base-2 log-scale ``m``.

    Returns the operands' values as multiples of 2^m, and m. Constants and parameters are
    normalised first, so no operand is multiplied by more than 1.
    """
    if kind != Kind.ACT:
      return [self.lift(v, kind) for v in vals], 0.0
    pairs = [(v.value, v.log_scale) if v.kind == Kind.ACT
             else self.normalise(self.lift(v, kind), 0.0) for v in vals]
    common = pairs[0][1]
    for _, log_scale in pairs[1:]:
      common = jnp.maximum(common, log_scale)
    return [times_pow2(value, log_scale - common) if val.kind != Kind.PARAM
            else self.operand(val, -common) for val, (value, log_scale) in zip(vals, pairs)], common

  def operand(self, val: _Val, shift) -> jax.Array:
    """A parameter value entering an operation on activations, times 2^shift.

    A bias added deep in a network meets activations of scale 2^m and enters as b·2^(-m):
    its true gradient is tiny (its paths carry a tiny share of the path sum) and would
    underflow although its κ = gradient·g is representable. So the gradient of such a leaf is
    returned as true_gradient·2^(-E) with E the shift of its first use, recorded in
    `gradient_exponents`. Leaves used inside loops or mixed with other leaves keep E = 0.
    """
    leaves = val.leaves
    if self.loop_depth or len(leaves) != 1:
      self.unshiftable.update(leaves)
    (leaf,) = leaves if len(leaves) == 1 else (None,)
    static_zero = isinstance(shift, float) and shift == 0
    if leaf not in self.shiftable:
      return val.value if static_zero else times_pow2(val.value, shift)
    # A first use with no shift (a weight) keeps the leaf's gradient as is: no extra passes
    # over large weight matrices on the hot path.
    reference = self.gradient_exponents.setdefault(
        leaf, 0.0 if static_zero else jnp.asarray(shift, self.dtype))
    if static_zero and isinstance(reference, float):
      return val.value
    return _shifted(val.value, jnp.asarray(shift, self.dtype),
                    jnp.asarray(shift - reference, self.dtype))

  def _note(self, eqn, role: str, out, inputs: Sequence[_Val], param_role: str | None = None):
    leaves = frozenset().union(*(v.leaves for v in inputs if v.kind == Kind.PARAM))
    if param_role is not None:
      for leaf in leaves:
        self.leaf_roles.setdefault(leaf, set()).add(param_role)
    if self.record:
      self.operations.append(Operation(
          primitive=eqn.primitive.name, role=role, shape=tuple(np.shape(out)),
          leaves=tuple(self.leaf_names[i] for i in sorted(leaves)), where=self.where(eqn)))

  # ----------------------------------------------------------------------------- driver
  def run(self, jaxpr: jex_core.Jaxpr, consts: Sequence[_Val], args: Sequence[_Val]) -> list[_Val]:
    env: dict[Any, _Val] = {}

    def read(var) -> _Val:
      if isinstance(var, jex_core.Literal):
        return _Val(Kind.CONST, var.val)
      return env[var]

    for var, val in zip(jaxpr.constvars, consts, strict=True):
      env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
      env[var] = val
    for eqn in jaxpr.eqns:
      outs = self.eqn(eqn, [read(v) for v in eqn.invars])
      for var, out in zip(eqn.outvars, outs, strict=True):
        if not isinstance(var, jex_core.DropVar):
          env[var] = out
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, invals: list[_Val]) -> list[_Val]:
    name = eqn.primitive.name
    if name in _STOCHASTIC:
      raise UnsupportedOperationError(
          f"The network draws random numbers (`{name}` at {self.where(eqn)}): the path network must "
          "be deterministic. Build `apply_fn` in inference mode (e.g. dropout with "
          "deterministic=True / train=False, or model.eval() for NNX).")
    if name in _CALLS:
      opened = _subjaxpr(eqn)
      if opened is None:
        raise self.unsupported(eqn, "it calls a sub-computation this interpreter cannot open")
      inner, inner_consts = opened
      self.callers.append(eqn)
      try:
        return self.run(inner, [_Val(Kind.CONST, c) for c in inner_consts], invals)
      finally:
        self.callers.pop()
    if name == "convert_element_type" and invals[0].tested is not None:
      (mask,) = invals  # x > 0 as a 0/1 mask, for x * (x > 0)
      return [dataclasses.replace(mask, value=np.asarray(mask.value, eqn.params["new_dtype"]))]
    if name == "mul" and any(v.tested is not None for v in invals):
      return self._sign_select(eqn, invals if invals[0].tested is not None else invals[::-1])
    if any(v.tested is not None for v in invals) and name != "select_n":
      test = next(v.tested_by for v in invals if v.tested is not None)
      raise self.unsupported(
          eqn, f"it uses the sign of an activation (`{test}`) other than to select between that "
          "activation, a constant multiple of it and 0 (as ReLU and leaky ReLU do): a step "
          "function, a mask or a branch on activations is not a path network")
    if name == "scan":
      return self._scan(eqn, invals)
    if name == "cond":
      return self._cond(eqn, invals)
    if name == "select_n" and invals[0].tested is not None:
      return self._sign_select(eqn, invals)
    if all(v.kind == Kind.CONST for v in invals):
      return self._constant(eqn, invals)
    return self._rule(eqn, invals)

  def _sign_select(self, eqn, invals):
    """`where(x > 0, x, a·x)` and `where(x > 0, x, 0)`: ReLU and leaky ReLU, the identity here.

    Path values are sums of positive products, so the branch for positive inputs is taken;
    it is only valid when every branch is the tested activation, a constant multiple of it,
    or zero, which makes the selection positively homogeneous.
    """
    predicate, *cases = invals
    if eqn.primitive.name == "mul":  # mask · x == select(mask, 0, x)
      cases = [_Val(Kind.CONST, np.zeros((), predicate.value.dtype)), cases[0]]
    for case in cases:
      zero = case.kind == Kind.CONST and (c := _concrete(case.value)) is not None and not c.any()
      if not zero and (case.kind != Kind.ACT or case.origin is not predicate.tested):
        raise self.unsupported(
            eqn, "it selects by the sign of an activation between values other than that "
            "activation, a constant multiple of it and 0")
    taken = cases[int(np.asarray(predicate.value).flat[0])]
    if taken.kind == Kind.CONST:
      # where(x > 0, 0, x) = min(x, 0): zero on the path network's positive values, but still
      # an activation, so that a nonlinearity applied to it (ELU's expm1) is caught.
      return [_Val(Kind.ACT, jnp.zeros(eqn.outvars[0].aval.shape, self.dtype))]
    self._note(eqn, "relu (identity)", taken.value, invals)
    return [taken]

  def _constant(self, eqn, invals):
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    # Older JAX returns (subfuns, params); newer returns params only.
    subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    with jax.ensure_compile_time_eval():
      out = eqn.primitive.bind(*subfuns, *[v.value for v in invals], **params)
    outs = out if eqn.primitive.multiple_results else [out]
    return [_Val(Kind.CONST, o) for o in outs]

  # ----------------------------------------------------------------------------- rules
  def _rule(self, eqn, invals: list[_Val]) -> list[_Val]:
    name = eqn.primitive.name
    kind = max(v.kind for v in invals)
    leaves = frozenset().union(*(v.leaves for v in invals))

    act = [v for v in invals if v.kind == Kind.ACT]
    act_scale = act[0].log_scale if act else 0.0
    # Scaling by constants keeps an activation's identity, for the sign tests of leaky ReLU.
    keeps_origin = len(act) == 1 and all(v.kind == Kind.CONST for v in invals if v is not act[0])
    same = name in _IDENTITY or name in ("mul", "div", "max", "sharding_constraint", "reshard",
                                         "mesh_cast", "copy", "copy_p")

    def result(value, role=None, param_role=None, log_scale=act_scale, renormalise=False):
      if kind == Kind.ACT and role is not None:
        self._note(eqn, role, value, invals, param_role)
      values = value if eqn.primitive.multiple_results else [value]
      if kind != Kind.ACT:
        return [_Val(kind, v, leaves if kind == Kind.PARAM else frozenset()) for v in values]
      if renormalise:
        pairs = [self.normalise(v, log_scale) for v in values]
      else:
        pairs = [(v, log_scale) for v in values]
      origin = act[0].origin if keeps_origin and same else None
      return [_Val(kind, v, log_scale=ls, origin=origin) for v, ls in pairs]

    if name in _IDENTITY:
      (val,) = invals
      return result(val.value)

    if kind == Kind.ACT and (name in _SHARDING or (
        name in ("reshard", "mesh_cast") and _on_stand_in_mesh(eqn.params.get("dst_sharding")))):
      # Placement only; the single example of the path network cannot follow a batch layout.
      return result(invals[0].value)

    if name in _LAYOUT:
      out = eqn.primitive.bind(invals[0].value, *[v.value for v in invals[1:]], **eqn.params)
      return result(out)

    if name in _ADDITIVE:
      (a, b), common = self.align(invals, kind)
      out = lax.add(*jnp.broadcast_arrays(a, b)) if np.shape(a) != np.shape(b) else lax.add(a, b)
      param_inputs = any(v.kind == Kind.PARAM for v in invals)
      role = "bias" if param_inputs else ("sum of activations" if all(
          v.kind == Kind.ACT for v in invals) else "constant bias")
      return result(out, role, "bias", log_scale=common, renormalise=True)

    if name in _LINEAR:
      index_slot = _INDEX_OPERANDS.get(name, slice(0, 0))
      for idx in invals[index_slot]:
        if idx.kind != Kind.CONST:
          raise self.unsupported(eqn, "its indices (or selector) depend on the "
                             + ("input" if idx.kind == Kind.ACT else "parameters"))
      index_positions = range(len(invals))[index_slot]
      summed = [v for i, v in enumerate(invals) if i not in index_positions]
      aligned, common = self.align(summed, kind)
      aligned_iter = iter(aligned)
      operands = [v.value if i in index_positions else next(aligned_iter)
                  for i, v in enumerate(invals)]
      out = eqn.primitive.bind(*operands, **eqn.params)
      role = {"reduce_window_sum": "sum pooling", "concatenate": "concatenate",
              "pad": None, "select_n": "select"}.get(name)
      return result(out, role, "bias" if name in ("concatenate", "pad", "select_n") else None,
                    log_scale=common, renormalise=len(summed) > 1)

    if name == "mul":
      a, b = invals
      if a.kind == Kind.ACT and b.kind == Kind.ACT:
        raise self.unsupported(eqn, "both factors depend on the input")
      x, y = (self.operand(v, 0.0) if v.kind == Kind.PARAM and kind == Kind.ACT
              else self.lift(v, kind) for v in invals)
      out = lax.mul(x, y) if np.shape(x) == np.shape(y) else jnp.multiply(x, y)
      return result(out, "scale", "weight", renormalise=True)

    if name == "div":
      a, b = invals
      if b.kind != Kind.CONST:
        raise self.unsupported(eqn, "the divisor depends on the "
                           + ("input" if b.kind == Kind.ACT else "parameters"))
      inv = 1.0 / self.power(b.value)
      out = a.value * inv
      return result(out, "scale by constant", renormalise=True)

    if name in ("dot_general", "conv_general_dilated"):
      a, b = invals
      if a.kind == Kind.ACT and b.kind == Kind.ACT:
        raise self.unsupported(eqn, "both operands depend on the input")
      # Full precision: κ feeds a division, and TPUs otherwise multiply f32 in bfloat16.
      params = dict(eqn.params, preferred_element_type=None,
                    precision=(lax.Precision.HIGHEST, lax.Precision.HIGHEST))
      if name == "dot_general" and self._is_powered_matvec(eqn, a, b):
        self.operand(b, 0.0)  # registers the leaf's use (gradient exponent 0)
        out = _powered_matvec(a.value, *b.raw, self.p)
        return result(out, "dense", "weight", renormalise=True)
      x, y = (self.operand(v, 0.0) if v.kind == Kind.PARAM and kind == Kind.ACT
              else self.lift(v, kind) for v in invals)
      out = eqn.primitive.bind(x, y, **params)
      return result(out, "dense" if name == "dot_general" else "conv", "weight",
                    renormalise=True)

    if name == "integer_pow" or name == "square":
      (a,) = invals
      y = eqn.params.get("y", 2)
      if kind == Kind.ACT or y < 1:
        raise self.unsupported(eqn, "it raises an activation to a power" if kind == Kind.ACT
                           else "a negative power of a weight is not a path weight")
      return result(a.value ** y)

    if name == "abs" and kind == Kind.PARAM:
      return result(invals[0].value)

    if name == "max":
      return self._relu(eqn, invals, result)

    if name in _COMPARISONS:
      return self._sign_test(eqn, invals)

    if name in ("reduce_max", "reduce_window_max", "argmax") and kind == Kind.ACT:
      if name == "argmax":
        raise self.unsupported(eqn, "the output of argmax is not linear in the activations")
      if name == "reduce_max":
        out = jnp.sum(invals[0].value, axis=tuple(eqn.params["axes"]))
      else:
        out = lax.reduce_window_sum_p.bind(invals[0].value, **eqn.params)
      return result(out, "max pooling (sum over window)")

    detail = ("it acts on activations" if kind == Kind.ACT
              else "it derives a weight non-monomially from parameters")
    raise self.unsupported(eqn, detail)

  def _is_powered_matvec(self, eqn, a: _Val, b: _Val) -> bool:
    """`x @ W` on one example with W a large parameter leaf: the common dense layer."""
    (contract_a, contract_b), (batch_a, batch_b) = eqn.params["dimension_numbers"]
    shape_a = np.shape(a.value)
    return (a.kind == Kind.ACT and b.kind == Kind.PARAM and b.raw is not None
            and not batch_a and not batch_b and np.ndim(b.value) == 2
            and tuple(contract_b) == (0,) and tuple(contract_a) == (len(shape_a) - 1,)
            and math.prod(shape_a[:-1]) == 1 and np.size(b.value) >= _MATVEC_MIN_SIZE
            and self.gradient_exponents.get(next(iter(b.leaves)), 0.0) == 0.0
            and isinstance(self.gradient_exponents.get(next(iter(b.leaves)), 0.0), float))

  def _relu(self, eqn, invals, result):
    a, b = invals
    act, other = (a, b) if a.kind >= b.kind else (b, a)
    if act.kind == Kind.ACT and other.kind == Kind.CONST:
      c = _concrete(other.value)
      if c is None:
        raise self.unsupported(eqn, "its threshold is not a compile-time constant, so it cannot be "
                           "checked to be a ReLU (max(x, 0))")
      if np.all(c == 0):
        return result(act.value, "relu (identity)")
      raise self.unsupported(eqn, "max(x, c) with c != 0 is not positively homogeneous")
    raise self.unsupported(eqn, "a maximum of activations or parameters (maxout) is not a path "
                       "network operation; only max(x, 0) (ReLU) is")

  def _sign_test(self, eqn, invals):
    """Comparisons of an activation with 0: true activations are positive in the path network.

    Leaky ReLU and `jnp.where(x > 0, x, 0)` branch on the sign of an activation; path values
    are sums of positive products, so the branch taken is the one for positive inputs.
    """
    a, b = invals
    name = eqn.primitive.name
    if b.kind == Kind.ACT and a.kind == Kind.CONST:
      a, b, name = b, a, _MIRRORED[name]
    c = _concrete(b.value) if b.kind == Kind.CONST else None
    if a.kind == Kind.ACT and not any(jnp.issubdtype(v.aval.dtype, jnp.floating)
                                      for v in eqn.invars if hasattr(v, "aval")):
      raise UnsupportedOperationError(
          f"The path network cannot use input-derived integers: `{eqn.primitive.name}` at "
          f"{self.where(eqn)} works on integer values computed from the input, i.e. indices "
          "(an embedding lookup or take: a `gather`). Path-SGD needs real-valued inputs that "
          "reach the outputs through linear maps; feed embeddings as the input instead, and "
          "exclude the embedding table with `mask=`.")
    if a.kind != Kind.ACT or c is None or not np.all(c == 0):
      raise self.unsupported(eqn, "the path network can only compare an activation with the "
                             "constant 0 (as ReLU and leaky ReLU do)")
    shape = eqn.outvars[0].aval.shape
    return [_Val(Kind.CONST, np.full(shape, _COMPARISONS[name]), tested=a.origin,
                 tested_by=eqn.primitive.name)]

  def _cond(self, eqn, invals):
    index = invals[0]
    c = _concrete(index.value) if index.kind == Kind.CONST else None
    if c is None:
      raise self.unsupported(eqn, "the branch taken depends on the input or the parameters, or is "
                         "not known at compile time")
    branch = eqn.params["branches"][int(c)]
    branch_jaxpr, branch_consts = _open(branch)
    return self.run(branch_jaxpr, [_Val(Kind.CONST, k) for k in branch_consts], invals[1:])

  def _scan(self, eqn, invals):
    """A scan (an RNN over time, a stack of layers) with powered values in the carry.

    A carry's kind can grow along the loop (a zero initial state becomes an activation after
    one step), so kinds are iterated to a fixed point before the real loop runs.
    """
    params = eqn.params
    body, body_consts = _open(params["jaxpr"])
    n_consts, n_carry = _scan_layout(params)
    consts = invals[:n_consts]
    init = invals[n_consts:n_consts + n_carry]
    xs = invals[n_consts + n_carry:]
    body_consts = [_Val(Kind.CONST, c) for c in body_consts]
    leaves = frozenset().union(*(v.leaves for v in invals))
    carry_kinds = [v.kind for v in init]
    record = self.record

    zero = jnp.zeros((), self.dtype)

    def as_val(kind, value, log_scale):
      if kind == Kind.ACT:
        return _Val(kind, value, log_scale=log_scale)
      return _Val(kind, value, leaves if kind == Kind.PARAM else frozenset())

    def carried(val: _Val, kind: Kind):
      """(value, log-scale) of a carry lifted to the loop's kind for it."""
      if kind == Kind.ACT and val.kind == Kind.ACT:
        return val.value, jnp.asarray(val.log_scale, self.dtype)
      if kind == Kind.ACT and val.kind == Kind.PARAM:
        self.unshiftable.update(val.leaves)
      return self.lift(val, kind), zero

    def step(carry_kinds, y_kinds_out, carry, x):
      carry_vals = [as_val(k, c, ls) for k, (c, ls) in zip(carry_kinds, carry)]
      x_vals = [_Val(v.kind, xi, v.leaves, v.log_scale) for v, xi in zip(xs, x)]
      self.loop_depth += 1
      try:
        outs = self.run(body, body_consts, list(consts) + carry_vals + x_vals)
      finally:
        self.loop_depth -= 1
      y_kinds_out[:] = [o.kind for o in outs[n_carry:]]
      new_carry = [carried(o, k) for o, k in zip(outs[:n_carry], carry_kinds)]
      ys = [(o.value, jnp.asarray(o.log_scale, self.dtype)) for o in outs[n_carry:]]
      return new_carry, ys, [o.kind for o in outs[:n_carry]]

    def lifted_init(kinds):
      return [carried(v, k) for v, k in zip(init, kinds)]

    self.record = False
    try:
      for _ in range(len(Kind) * max(n_carry, 1) + 1):
        found: list[list[Kind]] = []

        def probe(carry, x, kinds=tuple(carry_kinds)):
          new_carry, _, out_kinds = step(kinds, [], carry, x)
          found.append(out_kinds)
          return new_carry

        x0 = [jax.ShapeDtypeStruct(np.shape(v.value)[1:], jnp.result_type(v.value)) for v in xs]
        jax.eval_shape(probe, lifted_init(carry_kinds), x0)
        grown = [max(k, o) for k, o in zip(carry_kinds, found[-1])]
        if grown == carry_kinds:
          break
        carry_kinds = grown
    finally:
      self.record = record

    y_kinds: list[Kind] = []

    def scan_body(carry, x):
      new_carry, ys, _ = step(carry_kinds, y_kinds, carry, x)
      return new_carry, ys

    if self.record:
      self.operations.append(Operation("scan", f"loop over {params['length']} steps (begin)",
                                       (), (), self.where(eqn)))
    final, ys = lax.scan(scan_body, lifted_init(carry_kinds), [v.value for v in xs],
                         length=params["length"], reverse=params["reverse"],
                         unroll=params["unroll"])
    if self.record:
      self.operations.append(Operation("scan", "loop (end)", (), (), self.where(eqn)))
    carry_out = [as_val(k, c, ls) for k, (c, ls) in zip(carry_kinds, final)]
    ys_out = []
    for kind, (y, step_scales) in zip(y_kinds, ys):
      if kind != Kind.ACT:
        ys_out.append(as_val(kind, y, 0.0))
        continue
      # Each step's output has its own scale; stacked, they share the largest one.
      common = jnp.max(step_scales)
      relative = (step_scales - common).reshape((-1,) + (1,) * (y.ndim - 1))
      ys_out.append(as_val(kind, times_pow2(y, relative), common))
    return carry_out + ys_out
