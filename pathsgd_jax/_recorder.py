"""Per-unit values of a real forward pass, read (or replaced) at the ReLUs of a traced network.

The path network (`_interpreter`) sees every ReLU of a network at one extension point,
`PathInterpreter.activation`. Systems that need the *real* values at those units (the gates of
the neural path kernel, the gated networks of `npk.gated`, data-dependent statistics) use
this module instead of a second interpreter:

* `find_sites(jaxpr, kinds)` runs the path interpreter shape-only on ``jaxpr`` and returns one
  `Site` per ReLU it reads (and per max pooling): its key, its equation and which operand is
  the pre-activation. Keys are ``ids of the enclosing call equations + (id of the equation,)``,
  exactly what `site_key` gives inside a `PathInterpreter`, so a subclass of the interpreter
  and this module's evaluator agree on which unit is which.
* `evaluate(jaxpr, consts, args, sites, hook)` evaluates ``jaxpr`` for real, equation by
  equation, opening only the calls that contain a site; at each site it calls
  ``hook(site, invals)``, which returns the site's outputs (to replace them) or ``None`` (to
  compute them normally). It composes with ``jit``, ``vmap`` and autodiff.
* `translate(sites, source, target)` gives the same sites in another trace of the program
  (another batch size), by position, so that a run at batch 1 and one on the batch agree.

ReLUs inside ``lax.scan`` or ``lax.cond`` bodies are not sites: `find_sites` raises for ReLUs
in a scan and `evaluate` checks that every site was reached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from pathsgd_jax._errors import PathNetworkError
from pathsgd_jax._interpreter import CALLS, PathInterpreter, subjaxpr
from pathsgd_jax._values import Kind, _Val

POOLS = frozenset({"reduce_window_max", "reduce_max"})


class NotGateableError(PathNetworkError):
  """A unit that has no 0/1 gate (a leaky ReLU, a ReLU inside a loop)."""


class Site(NamedTuple):
  """A unit of the network whose real values are read: a ReLU or a max pooling.

  Attributes:
    key: ids of the enclosing call equations, then the equation's own id.
    eqn: the equation (``max``, ``select_n`` or ``mul`` for a ReLU; the pooling for a pool).
    operand: position in ``eqn.invars`` of the activation acted on (the pre-activation).
    kind: ``"relu"`` or ``"max_pool"``.
  """

  key: tuple[int, ...]
  eqn: Any
  operand: int
  kind: str


def site_key(interp: PathInterpreter, eqn) -> tuple[int, ...]:
  """The key of ``eqn`` at the interpreter's current position (its enclosing calls)."""
  return tuple(id(c) for c in interp.callers) + (id(eqn),)


class _SiteFinder(PathInterpreter):
  """A shape-only path-network run that notes where the ReLUs and max poolings are."""

  def __init__(self, dtype, leaf_names, collect_errors: bool, p: float = 1.0,
               gates_only: bool = True):
    super().__init__(p, dtype, leaf_names)
    self.gates_only = gates_only  # False: leaky ReLUs are sites too (their slope is read)
    self.sites: dict[tuple[int, ...], Site] = {}
    self._invals: list[_Val] = []
    if collect_errors:
      self.errors = []

  def _eqn(self, eqn, invals):
    self._invals = invals
    if eqn.primitive.name in POOLS and invals and invals[0].kind == Kind.ACT:
      key = site_key(self, eqn)
      self.sites[key] = Site(key, eqn, 0, "max_pool")
    return super()._eqn(eqn, invals)

  def _sign_select(self, eqn, invals):
    if (self.gates_only and eqn.primitive.name == "select_n"
        and not any(c.kind == Kind.CONST for c in invals[1:])):
      raise NotGateableError(
          f"A leaky ReLU (`select_n` at {self.where(eqn)}) has gates other than 0 and 1; "
          "neural path features, the neural path kernel and gated networks are defined here "
          "for ReLU networks. Use jax.nn.relu.")
    return super()._sign_select(eqn, invals)

  def activation(self, eqn, val, role):
    if self.loop_depth:
      raise NotGateableError(
          f"A ReLU inside a lax.scan ({self.where(eqn)}): its gates differ at every step, "
          "which neural path features and gated networks do not support here. Unroll the "
          "loop (a Python for loop) instead.")
    operand = next(i for i, v in enumerate(self._invals) if v is val)
    key = site_key(self, eqn)
    self.sites[key] = Site(key, eqn, operand, "relu")
    return super().activation(eqn, val, role)


def find_sites(jaxpr: jex_core.ClosedJaxpr, kinds: Sequence[Kind], dtype=jnp.float32,
               leaf_names: Sequence[str] = (), collect_errors: bool = False) -> list[Site]:
  """The ReLUs and max poolings of ``jaxpr``, in evaluation order.

  Args:
    jaxpr: a closed jaxpr, e.g. ``jax.make_jaxpr(apply_fn)(params, x)``.
    kinds: per input variable, `Kind.PARAM` (a weight), `Kind.ACT` (the input) or
      `Kind.CONST`.
    dtype: the dtype of the shape-only run.
    leaf_names: names of the parameter inputs, for error messages.
    collect_errors: keep going past operations the path network cannot contain (a gated
      network may hold them); otherwise they raise.
  """
  finder = _SiteFinder(dtype, list(leaf_names), collect_errors)
  structs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype if kind == Kind.CONST else dtype)
             for v, kind in zip(jaxpr.jaxpr.invars, kinds, strict=True)]

  def run(values):
    vals = [_Val(kind, x, frozenset({i}) if kind == Kind.PARAM else frozenset())
            for i, (kind, x) in enumerate(zip(kinds, values))]
    finder.run(jaxpr.jaxpr, [_Val(Kind.CONST, c) for c in jaxpr.consts], vals)
    return 0

  jax.eval_shape(run, structs)
  return list(finder.sites.values())


def translate(sites: Sequence[Site], source: jex_core.ClosedJaxpr,
              target: jex_core.ClosedJaxpr) -> list[Site] | None:
  """``sites`` of ``source`` at the same positions in ``target``: the same program traced at
  other shapes (e.g. another batch size). None if ``target`` differs there (another program).
  """
  tables: dict[int, dict[int, int]] = {}

  def index(jaxpr, eqn_id):
    table = tables.get(id(jaxpr))
    if table is None:
      table = tables[id(jaxpr)] = {id(e): i for i, e in enumerate(jaxpr.eqns)}
    return table[eqn_id]

  out = []
  for site in sites:
    src, dst, key = source.jaxpr, target.jaxpr, []
    for depth, eqn_id in enumerate(site.key):
      i = index(src, eqn_id)
      if i >= len(dst.eqns) or dst.eqns[i].primitive != src.eqns[i].primitive:
        return None
      key.append(id(dst.eqns[i]))
      if depth + 1 < len(site.key):
        src, dst = subjaxpr(src.eqns[i])[0], subjaxpr(dst.eqns[i])[0]
    out.append(Site(tuple(key), dst.eqns[i], site.operand, site.kind))
  return out


def _bind(eqn, invals):
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
  out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def evaluate(jaxpr: jex_core.ClosedJaxpr, args: Sequence[Any], sites: Sequence[Site],
             hook: Callable[[Site, list], list | None]) -> list:
  """Evaluates ``jaxpr`` on real ``args``; ``hook(site, invals)`` may replace a site's outputs.

  Returns the outputs of ``jaxpr``. Raises if a site was not reached (it sits in a branch of
  ``lax.cond`` or in a loop, which are evaluated as a whole).
  """
  by_key = {s.key: s for s in sites}
  containers = {s.key[:i] for s in sites for i in range(1, len(s.key))}
  reached = set()

  def run(inner: jex_core.Jaxpr, consts, values, prefix):
    env = {}

    def read(var):
      return var.val if isinstance(var, jex_core.Literal) else env[var]

    for var, val in zip(inner.constvars, consts, strict=True):
      env[var] = val
    for var, val in zip(inner.invars, values, strict=True):
      env[var] = val
    for eqn in inner.eqns:
      invals = [read(v) for v in eqn.invars]
      key = prefix + (id(eqn),)
      outs = None
      if key in by_key:
        reached.add(key)
        outs = hook(by_key[key], invals)
      if outs is None and key in containers and eqn.primitive.name in CALLS:
        sub, sub_consts = subjaxpr(eqn)
        outs = run(sub, sub_consts, invals, key)
      if outs is None:
        outs = _bind(eqn, invals)
      for var, out in zip(eqn.outvars, outs, strict=True):
        if not isinstance(var, jex_core.DropVar):
          env[var] = out
    return [read(v) for v in inner.outvars]

  outs = run(jaxpr.jaxpr, jaxpr.consts, list(args), ())
  missing = set(by_key) - reached
  if missing:
    where = ", ".join(sorted({by_key[k].eqn.primitive.name for k in missing}))
    raise NotGateableError(
        f"{len(missing)} ReLU/pooling unit(s) ({where}) sit inside a lax.cond or a loop, where "
        "their real values cannot be read one unit at a time. Write the network without "
        "lax.cond/lax.scan around its activations.")
  return outs
