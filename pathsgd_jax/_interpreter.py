"""The path network's interpreter: the user's jaxpr re-read with powered weights.

For a ReLU network with weights ``w``, the *path network* ``N(v, 1)`` evaluates the same
computation graph with every edge weight replaced by ``v = |w|^p`` on an all-ones input, with
every ReLU acting as the identity. Its summed output is the path sum
``g(v) = Σ_paths Π_{e∈path} |w_e|^p`` and ``∂g/∂v_e`` is the sum over paths through ``e`` of
the product of the other edges (Neyshabur et al., 2015).

Simply calling ``apply_fn(|θ|^p, ones)`` is wrong whenever the graph holds a multiplicative
constant that is not a parameter (average pooling's ``1/k``, a residual scale, a subtraction),
an additive constant (BatchNorm's mean, which folds into its neuron's bias) or an operation
that is not linear and positively homogeneous (tanh, LayerNorm, ...). So the network is traced
to a jaxpr and re-evaluated here, one rule per primitive (`_rules.RULES`), on values that
carry a kind (`_values.Kind`). This module holds what every rule shares: the driver, the
power-of-two scales, closing affine neurons, ReLU's sign tests, calls and control flow.

Extension point: `PathInterpreter.activation` is called at every ReLU (and leaky ReLU) with
the activation it acts on; the path network's own rule is the identity. A subclass may
replace it (a gate, a data-dependent weight) without touching the rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from pathsgd_jax._diagnostics import _where, diagnose
from pathsgd_jax._errors import UnsupportedOperationError
from pathsgd_jax._numerics import _concrete, _shifted, normalised, power, times_pow2
from pathsgd_jax._rules import KEEPS_NEURON_OPEN, RULES, _Out, broadcast_op
from pathsgd_jax._values import Kind, Operation, _Val, memoised

__all__ = ["Kind", "Operation", "PathInterpreter"]

CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
                   "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_STOCHASTIC = frozenset({"random_bits", "rng_bit_generator", "rng_uniform", "threefry2x32"})
_COMPARISONS = {"gt": True, "ge": True, "lt": False, "le": False}
_MIRRORED = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}
_FOLDED_ROLES = (({"constant shift", "parameter scale"}, "batch norm (folded)"),
                 ({"constant shift", "parameter shift"}, "batch norm (folded)"),
                 ({"parameter shift"}, "bias"), ({"constant shift"}, "constant bias"))


def _open(inner) -> tuple[jex_core.Jaxpr, Sequence[Any]] | None:
  """(jaxpr, consts) of a closed jaxpr, or of a plain one (newer JAX keeps no consts)."""
  if isinstance(inner, jex_core.ClosedJaxpr):
    return inner.jaxpr, inner.consts
  if isinstance(inner, jex_core.Jaxpr):
    return inner, ()
  return None


def subjaxpr(eqn) -> tuple[jex_core.Jaxpr, Sequence[Any]] | None:
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
    kappa_rule: differentiate folded sums by the κ rule (`param_value`); False gives the true
      gradient of the path sum (for path norms used as a regulariser).
    statistics: optional values of batch statistics by variable (see `_statistics`): those
      variables are constants of this evaluation and the computations that only feed them are
      skipped.
  """

  def __init__(self, p: float, dtype, leaf_names: Sequence[str], record: bool = False,
               statistics: dict | None = None, kappa_rule: bool = True):
    self.p = p
    self.kappa_rule = kappa_rule
    self.dtype = dtype
    self.leaf_names = list(leaf_names)
    self.record = record
    self.statistics = statistics or {}
    self.operations: list[Operation] = []
    self.leaf_roles: dict[int, set[str]] = {}
    self.callers: list[Any] = []  # enclosing call equations, for error messages
    # Gradient exponents (see `operand`): leaves whose gradient is returned as
    # true_gradient · 2^(-exponent), the exponent of each, and the leaves not eligible.
    self.shiftable: frozenset[int] = frozenset()
    self.gradient_exponents: dict[int, jax.Array] = {}
    self.unshiftable: set[int] = set()
    self.loop_depth = 0
    # When a list: unsupported operations are collected here instead of raised at once.
    self.errors: list[UnsupportedOperationError] | None = None
    # Leaves that make up the same affine neurons (a layer's kernel, its bias, a folded
    # BatchNorm's scale and shift): union-find parents, for the trust region of path_sgd.
    self.group_parent: dict[int, int] = {}

  def where(self, eqn) -> str:
    return _where(eqn, self.callers)

  def unsupported(self, eqn, detail: str, on_activations: bool = True
                  ) -> UnsupportedOperationError:
    what, advice = diagnose(eqn, self.callers, on_activations)
    return UnsupportedOperationError(
        f"The path network cannot contain {what}: {detail}. It was produced at "
        f"{self.where(eqn)}. {advice}")

  # ------------------------------------------------------------------------------ values
  def power(self, c) -> jax.Array:
    """|c|^p for a constant, in the compute dtype."""
    return power(jnp.abs(jnp.asarray(c).astype(self.dtype)), self.p)

  def signed_of(self, val: _Val):
    """The true (signed) value of a constant or a parameter value."""
    if val.kind == Kind.CONST:
      return val.value
    if val.signed is None:
      raise self.unsupported_folding()
    return val.signed()

  def unsupported_folding(self):
    return UnsupportedOperationError(
        "The path network needs the true value of a sum of parameters here (a bias folded "
        "with a constant or another parameter, as in BatchNorm), but the parameters reach "
        "this point through a lax.scan, which this interpreter reads in powered form only. "
        "Move the sum out of the scan body, or keep one bias per neuron there.")

  def param_value(self, val: _Val) -> jax.Array:
    """The powered value of a parameter value: its path-network value forward, the κ rule's
    gradient backward.

    For a folded sum of parameters and constants (``β − μ·s``) the forward value is
    ``|β − μ·s|^p``, and the gradient is the surrogate's: each term's powered value is
    differentiated as if the term were an edge of its own, which gives each parameter the
    coordinate-wise step's ``|∂e/∂θ|^p`` (see `_rules`).
    """
    if val.exact:
      return val.value
    folded = self.power(self.signed_of(val))
    if not self.kappa_rule:
      return folded
    return val.value + lax.stop_gradient(broadcast_op(lax.sub, folded, val.value))

  def lift(self, val: _Val, kind: Kind) -> jax.Array:
    """A constant or parameter operand as a powered value (constants kept below ``PARAM``)."""
    if val.kind == Kind.CONST:
      return self.power(val.value) if kind != Kind.CONST else val.value
    return self.param_value(val) if val.kind == Kind.PARAM else val.value

  def combine(self, a: _Val, b: _Val | None, op: str) -> _Val:
    """A pending bias and a term, combined with their signs: ``-a``, ``a + b``, ``a·b``, ``a/b``."""
    if op == "neg":
      if a.kind == Kind.CONST:
        return _Val(Kind.CONST, -a.value if not isinstance(a.value, bool) else a.value)
      return dataclasses.replace(a, signed=memoised(lambda: -self.signed_of(a)))
    binary = {"add": lax.add, "mul": lax.mul, "div": lax.div}[op]
    if a.kind == Kind.CONST and b.kind == Kind.CONST:
      with jax.ensure_compile_time_eval():
        return _Val(Kind.CONST, broadcast_op(binary, a.value, b.value))
    if op == "div":
      value = broadcast_op(lax.mul, self.lift(a, Kind.PARAM), 1.0 / self.power(b.value))
      exact = a.exact
    elif op == "mul":
      value = broadcast_op(lax.mul, self.lift(a, Kind.PARAM), self.lift(b, Kind.PARAM))
      exact = True
    else:
      value = broadcast_op(lax.add, self.lift(a, Kind.PARAM), self.lift(b, Kind.PARAM))
      exact = False
    signed = memoised(lambda: broadcast_op(binary, self.signed_of(a), self.signed_of(b)))
    return _Val(Kind.PARAM, value, a.leaves | b.leaves, signed=signed, exact=exact)

  def normalise(self, value, log_scale):
    """Divides by the power of two nearest below the largest entry; adds it to the scale.

    Path sums grow or shrink geometrically with depth; kept as value·2^log_scale with
    value < 2 they never overflow or underflow on the way, and powers of two keep every
    rescaling exact. The factor is a constant for autodiff: it cancels between the value and
    the log-scale.
    """
    if not np.size(value):
      return value, log_scale
    value, exponent = normalised(value)
    return value, log_scale + exponent

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
    value = self.param_value(val)
    if self.loop_depth or len(leaves) != 1:
      self.unshiftable.update(leaves)
    (leaf,) = leaves if len(leaves) == 1 else (None,)
    static_zero = isinstance(shift, float) and shift == 0
    if leaf not in self.shiftable:
      return value if static_zero else times_pow2(value, shift)
    # A first use with no shift (a weight) keeps the leaf's gradient as is: no extra passes
    # over large weight matrices on the hot path.
    reference = self.gradient_exponents.setdefault(
        leaf, 0.0 if static_zero else jnp.asarray(shift, self.dtype))
    if static_zero and isinstance(reference, float):
      return value
    return _shifted(value, jnp.asarray(shift, self.dtype),
                    jnp.asarray(shift - reference, self.dtype))

  def note(self, eqn, role: str, out, inputs: Sequence[_Val], param_role: str | None = None):
    leaves = frozenset().union(*(v.leaves for v in inputs if v.kind == Kind.PARAM))
    if param_role is not None:
      for leaf in leaves:
        self.leaf_roles.setdefault(leaf, set()).add(param_role)
    if self.record:
      self.operations.append(Operation(
          primitive=eqn.primitive.name, role=role, shape=tuple(np.shape(out)),
          leaves=tuple(self.leaf_names[i] for i in sorted(leaves)), where=self.where(eqn)))

  def group(self, leaf: int) -> int:
    parent = self.group_parent.setdefault(leaf, leaf)
    if parent != leaf:
      parent = self.group_parent[leaf] = self.group(parent)
    return parent

  def join(self, leaves) -> None:
    leaves = sorted(leaves)
    for leaf in leaves[1:]:
      self.group_parent[self.group(leaf)] = self.group(leaves[0])

  def flush(self, val: _Val) -> _Val:
    """Closes an activation's affine neuron: its pending signed bias ``b`` adds ``|b|^p``."""
    if val.kind != Kind.ACT or val.bias is None:
      return val
    self.join(val.bias.leaves | val.neuron_leaves)
    base = dataclasses.replace(val, bias=None, chain=frozenset(), bias_at=None)
    (x, b), common = self.align([base, val.bias], Kind.ACT)
    value = broadcast_op(lax.add, x, b)
    role = next((r for steps, r in _FOLDED_ROLES if steps <= val.chain), "bias")
    if val.bias.kind == Kind.PARAM:
      self.note(val.bias_at, role, value, [val.bias], "bias")
    elif self.record:
      self.note(val.bias_at, role, value, [])
    # Not renormalised: what follows a neuron (a linear map, a sum) renormalises if needed.
    return _Val(Kind.ACT, value, log_scale=common, origin=val.origin)

  def activation(self, eqn, val: _Val, role: str) -> _Val:
    """A ReLU (or leaky ReLU) acting on ``val``: the identity on path values.

    The extension point of the interpreter (see the module docstring).
    """
    self.note(eqn, role, val.value, [])
    return val

  # ------------------------------------------------------------------------------ driver
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
    statistics = self.statistics
    live = statistics.get(id(jaxpr), {}).get("live") if statistics else None
    for index, eqn in enumerate(jaxpr.eqns):
      if live is not None:
        if index not in live:
          continue
        known = statistics[id(jaxpr)]["values"]
        if index in known:
          for var, value in zip(eqn.outvars, known[index], strict=True):
            env[var] = _Val(Kind.CONST, value)
          continue
      invals = [read(v) for v in eqn.invars]
      if not self._keeps_neuron_open(eqn, invals):
        for i, (var, val) in enumerate(zip(eqn.invars, invals)):
          if val.bias is not None:
            invals[i] = self.flush(val)
            if not isinstance(var, jex_core.Literal):
              env[var] = invals[i]
      outs = self.eqn(eqn, invals)
      for var, out in zip(eqn.outvars, outs, strict=True):
        if not isinstance(var, jex_core.DropVar):
          env[var] = out
    return [read(v) for v in jaxpr.outvars]

  @staticmethod
  def _keeps_neuron_open(eqn, invals) -> bool:
    return (eqn.primitive.name in KEEPS_NEURON_OPEN
            and sum(v.kind == Kind.ACT for v in invals) <= 1
            and all(v.tested is None for v in invals))

  def eqn(self, eqn, invals: list[_Val]) -> list[_Val]:
    """The path-network values of one equation's outputs."""
    try:
      return self._eqn(eqn, invals)
    except UnsupportedOperationError as error:
      if self.errors is None or eqn.primitive.name in CALLS:
        raise
      # Collecting (the first, shape-only run): note it, go on as if it were an activation.
      self.errors.append(error)
      return [_Val(Kind.ACT, jnp.zeros(v.aval.shape, self.dtype)) for v in eqn.outvars]

  def _eqn(self, eqn, invals: list[_Val]) -> list[_Val]:
    name = eqn.primitive.name
    if name in _STOCHASTIC:
      raise UnsupportedOperationError(
          f"The network draws random numbers (`{name}` at {self.where(eqn)}): the path network must "
          "be deterministic. Build `apply_fn` in inference mode (e.g. dropout with "
          "deterministic=True / train=False, or model.eval() for NNX).")
    if name in CALLS:
      opened = subjaxpr(eqn)
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
    if name in _COMPARISONS:
      return self._sign_test(eqn, invals)
    rule = RULES.get(name)
    out = _Out(self, eqn, invals)
    if rule is None:
      raise self.unsupported(eqn, "it acts on activations" if out.kind == Kind.ACT
                             else "it derives a weight non-monomially from parameters",
                             on_activations=out.kind == Kind.ACT)
    return rule(self, eqn, invals, out)

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
    return [self.activation(eqn, taken, "relu (identity)")]

  def _constant(self, eqn, invals):
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    # Older JAX returns (subfuns, params); newer returns params only.
    subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    with jax.ensure_compile_time_eval():
      out = eqn.primitive.bind(*subfuns, *[v.value for v in invals], **params)
    outs = out if eqn.primitive.multiple_results else [out]
    return [_Val(Kind.CONST, o) for o in outs]

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
          f"The path network cannot contain `{eqn.primitive.name}` (a comparison of "
          f"input-derived integers: a padding mask, or the index arithmetic of an embedding "
          f"lookup, a `gather`) at {self.where(eqn)}. Path-SGD needs real-valued inputs that "
          "reach the outputs through linear maps: compute masks and indices outside apply_fn "
          "and pass the masked (or embedded) values as its input; exclude an embedding table "
          "with `mask=`.")
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
      val = self.flush(val)
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
      ys = [(o.value, jnp.asarray(o.log_scale, self.dtype))
            for o in map(self.flush, outs[n_carry:])]
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
