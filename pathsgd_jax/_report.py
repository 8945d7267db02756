"""A readable account of the path network that Path-SGD derives from a model."""

from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np

from pathsgd_jax._pathnet import Operation, PathInterpreter, PathNetwork, check_p
from pathsgd_jax._scales import ApplyFn, compute_scales

_MAX_POOL_NOTE = (
    "max pooling is not linear: following the path-norm literature it is replaced by a sum over "
    "its window, so κ and the path norm are those of that upper-bounding sum network.")


@dataclasses.dataclass(frozen=True)
class LeafReport:
  """How one parameter leaf enters the path network.

  Attributes:
    name: the leaf's key path, e.g. ``"Dense_0/kernel"``.
    shape: its shape.
    dtype: its dtype name.
    role: ``"weight"`` (multiplies activations), ``"bias"`` (added to activations), both
      joined by ``+``, ``"excluded"`` (masked out by the user) or ``"unused"`` (on no path).
    kappa_min: smallest κ over the leaf's entries.
    kappa_max: largest κ over the leaf's entries.
    unrepresentable: entries whose κ does not fit the compute dtype (inf, or 0 on a live
      path): Path-SGD leaves them in place. Non-zero means the path norm is out of float
      range; ``normalize=True`` avoids it.
  """

  name: str
  shape: tuple[int, ...]
  dtype: str
  role: str
  kappa_min: float
  kappa_max: float
  unrepresentable: int = 0
  kappa_min_positive: float = float("nan")


# A leaf whose positive κ spans more than this ratio (20 decades) gets a warning.
KAPPA_RANGE_LIMIT = 1e20


@dataclasses.dataclass(frozen=True)
class StructureWarning:
  """A warning of :func:`path_structure` about one parameter leaf.

  Attributes:
    leaf: the leaf's name.
    kind: ``"kappa_zero"`` (κ = 0 on every entry: Path-SGD does not move the leaf) or
      ``"kappa_range"`` (positive κ spans more than 20 decades: the smallest κ give huge
      steps).
    message: the warning as text.
  """

  leaf: str
  kind: str
  message: str

  def __str__(self) -> str:
    return self.message


def _leaf_warnings(leaf: LeafReport) -> list[StructureWarning]:
  if leaf.role in ("excluded", "unused") or not np.isfinite(leaf.kappa_max):
    return []
  if leaf.kappa_max == 0:
    return [StructureWarning(leaf.name, "kappa_zero", (
        f"{leaf.name}: κ = 0 on every entry, so Path-SGD does not move it (every path through "
        "it crosses a zero weight, e.g. a zero-initialised scale or dead units). If a "
        "zero-initialised scale feeds it, the first steps make its κ tiny and its updates "
        "huge."))]
  ratio = leaf.kappa_max / leaf.kappa_min_positive
  if ratio > KAPPA_RANGE_LIMIT:
    return [StructureWarning(leaf.name, "kappa_range", (
        f"{leaf.name}: positive κ spans {np.log10(ratio):.0f} decades "
        f"([{leaf.kappa_min_positive:.3g}, {leaf.kappa_max:.3g}]); the entries with the "
        "smallest κ get steps about that much larger than the rest (a near-dead branch)."))]
  return []


def _group_name(name: str, depth: int | None) -> str:
  parts = name.split("/")
  if len(parts) == 1:
    return name
  return "/".join(parts[:-1] if depth is None else parts[:depth])


@dataclasses.dataclass(frozen=True)
class PathStructure:
  """The structure report of :func:`path_structure`: warnings, leaves, operations and notes.

  ``str(report)`` renders it as text (the compact :meth:`summary` if the report was made with
  ``compact=True``, else the full :meth:`details`); the fields hold the same facts as data.
  """

  p: float
  path_norm: float
  leaves: tuple[LeafReport, ...]
  operations: tuple[Operation, ...]
  notes: tuple[str, ...]
  warnings: tuple[StructureWarning, ...] = ()
  compact: bool = False

  def __str__(self) -> str:
    return self.summary() if self.compact else self.details()

  def _header(self) -> list[str]:
    lines = [f"Path network (p = {self.p:g}), path norm φ_p = {self.path_norm:.6g}"]
    if self.warnings:
      lines += ["", f"Warnings ({len(self.warnings)}):"]
      lines += [f"  ! {warning.message}" for warning in self.warnings]
    return lines

  def summary(self, depth: int | None = None) -> str:
    """The compact report: warnings first, one line per leaf group, operations counted.

    Args:
      depth: group leaves by the first ``depth`` parts of their names
        (``"layer1/block0/conv1/kernel"`` with ``depth=2`` is in ``layer1/block0``); by
        default by everything but the last part (one line per layer).

    Returns:
      The text.
    """
    groups: dict[str, list[LeafReport]] = {}
    for leaf in self.leaves:
      groups.setdefault(_group_name(leaf.name, depth), []).append(leaf)
    warned = {warning.leaf for warning in self.warnings}
    lines = self._header() + ["", f"Parameter groups ({len(self.leaves)} leaves):"]
    width = max([len(name) for name in groups] + [4])
    for name, members in groups.items():
      size = sum(int(np.prod(leaf.shape)) for leaf in members)
      roles = "+".join(sorted({r for leaf in members for r in leaf.role.split("+")}))
      live = [leaf for leaf in members if leaf.role not in ("excluded", "unused")
              and np.isfinite(leaf.kappa_max)]
      kappa = (f"  κ in [{min(leaf.kappa_min for leaf in live):.3g}, "
               f"{max(leaf.kappa_max for leaf in live):.3g}]") if live else ""
      flag = sum(leaf.name in warned for leaf in members)
      flag = f"  ({flag} warned)" if flag else ""
      lines.append(f"  {name:<{width}}  {len(members):3d} leaves {size:>10,d} entries  "
                   f"{roles:<14}{kappa}{flag}")
    counts: dict[str, int] = {}
    for op in self.operations:
      counts[op.role] = counts.get(op.role, 0) + 1
    lines += ["", f"Operations on activations ({len(self.operations)}): " +
              ", ".join(f"{n} {role}" for role, n in counts.items())]
    if self.notes:
      lines += ["", "Notes:"] + [f"  - {note}" for note in self.notes]
    return "\n".join(lines)

  def details(self) -> str:
    """The full report: warnings first, every leaf, every operation in order, notes."""
    lines = self._header() + ["", "Parameter leaves:"]
    width = max([len(leaf.name) for leaf in self.leaves] + [4])
    for leaf in self.leaves:
      kappa = ("" if leaf.role in ("excluded",) else
               f"  κ in [{leaf.kappa_min:.3g}, {leaf.kappa_max:.3g}]")
      if leaf.unrepresentable:
        kappa += f"  ({leaf.unrepresentable} κ out of float range: not updated)"
      lines.append(f"  {leaf.name:<{width}}  {str(leaf.shape):<16} {leaf.dtype:<9} "
                   f"{leaf.role:<12}{kappa}")
    lines += ["", "Operations on activations (in order):"]
    for i, op in enumerate(self.operations):
      reads = f" <- {', '.join(op.leaves)}" if op.leaves else ""
      lines.append(f"  {i:3d}. {op.role:<30} {str(op.shape):<18} [{op.primitive}]{reads}")
    if self.notes:
      lines += ["", "Notes:"] + [f"  - {note}" for note in self.notes]
    return "\n".join(lines)


_REPORTS: collections.OrderedDict = collections.OrderedDict()
_CACHED_REPORTS = 8


def _compiled_report(net: PathNetwork):
  """``(net, interpreter, evaluate)``: κ and φ_p of ``net`` as one compiled program.

  The interpreter records the operations while ``evaluate`` is traced. Evaluated op by op, a
  ResNet50 would compile a few hundred small programs instead. Reused for a network that
  traces to the same program with the same constants (a second report of the same model).
  """
  jaxpr = net.closed_jaxpr
  key = (str(jaxpr.jaxpr), tuple(id(c) for c in jaxpr.consts), net.p, tuple(net.included),
         str(net.treedef),
         str(net.input_struct), tuple(net._abstract_params))  # pylint: disable=protected-access
  if key in _REPORTS:
    _REPORTS.move_to_end(key)
    return _REPORTS[key][1:]
  interpreter = PathInterpreter(net.p, net.dtype, net.leaf_names, record=True)

  def evaluate(params, example_input):
    scales = compute_scales(net, params, normalize=False, interpreter=interpreter,
                            inputs=example_input)
    return scales.log_path_sum, scales.kappa, scales.unrepresentable

  # The key holds the constants' ids: keeping them alive keeps the ids unique.
  _REPORTS[key] = (jaxpr.consts, net, interpreter, jax.jit(evaluate))
  while len(_REPORTS) > _CACHED_REPORTS:
    _REPORTS.popitem(last=False)
  return _REPORTS[key][1:]


def path_structure(apply_fn: ApplyFn, params, example_input, *, p: float = 2.0,
                   mask=None, compact: bool = False) -> PathStructure:
  """Reports which leaves are path weights, the path network's operations and κ per leaf.

  Use it to check what Path-SGD will do with a model before training: every parameter leaf
  is classified (weight, bias, excluded, unused), every operation acting on activations is
  listed in order with its output shape (for one example) and the leaves it reads, and
  approximations (max pooling read as a sum) are stated. Leaves whose κ is 0 on every entry
  (Path-SGD cannot move them) or whose positive κ spans more than 20 decades (a near-dead
  branch, whose smallest κ give huge steps) are listed as warnings at the top of the report
  and in its ``warnings`` field.

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs``.
    params: the parameter tree.
    example_input: a batch with the real input shape.
    p: the path-norm exponent.
    mask: leaves that are not path weights (see :func:`path_scales`).
    compact: render ``str(report)`` as the compact :meth:`PathStructure.summary` (one line
      per leaf group, operations counted) instead of the full report; both stay available
      as methods.

  Returns:
    A :class:`PathStructure`; print it for a text report.

  Examples:
    >>> import jax.numpy as jnp, pathsgd_jax as psgd
    >>> mlp = lambda prm, x: jnp.maximum(x @ prm["w1"] + prm["b1"], 0.0) @ prm["w2"]
    >>> params = {"w1": jnp.ones((3, 2)), "b1": jnp.zeros(2), "w2": jnp.ones((2, 1))}
    >>> report = psgd.path_structure(mlp, params, jnp.zeros((1, 3)))
    >>> [(leaf.name, leaf.role) for leaf in report.leaves]
    [('b1', 'bias'), ('w1', 'weight'), ('w2', 'weight')]

    A zero-initialised residual branch leaves no live path through its first layer:

    >>> skip = lambda prm, x: mlp(prm, x) + x @ prm["w3"]
    >>> dead = dict(params, w2=jnp.zeros((2, 1)), w3=jnp.ones((3, 1)))
    >>> [(w.leaf, w.kind) for w in psgd.path_structure(skip, dead, jnp.zeros((1, 3))).warnings]
    [('b1', 'kappa_zero'), ('w1', 'kappa_zero')]
    >>> print(psgd.path_structure(mlp, params, jnp.zeros((1, 3)), compact=True))
    Path network (p = 2), path norm φ_p = 2.44949
    <BLANKLINE>
    Parameter groups (3 leaves):
      b1      1 leaves          2 entries  bias            κ in [1, 1]
      w1      1 leaves          6 entries  weight          κ in [1, 1]
      w2      1 leaves          2 entries  weight          κ in [3, 3]
    <BLANKLINE>
    Operations on activations (4): 2 dense, 1 bias, 1 relu (identity)
  """
  net = PathNetwork(apply_fn, params, example_input, check_p(p), mask)
  net, interpreter, evaluate = _compiled_report(net)
  log_path_sum, kappas, unrepresentable = evaluate(params, example_input)
  leaves = net.treedef.flatten_up_to(params)
  reports = []
  for i, (name, leaf, k, lost) in enumerate(zip(net.leaf_names, leaves, kappas,
                                                 unrepresentable)):
    if not net.included[i]:
      role = "excluded"
    else:
      role = "+".join(sorted(interpreter.leaf_roles.get(i, ()))) or "unused"
    k = np.asarray(k)
    positive = k[k > 0]
    reports.append(LeafReport(
        name=name, shape=tuple(np.shape(leaf)), dtype=str(jax.numpy.result_type(leaf)),
        role=role, kappa_min=float(k.min()) if k.size else float("nan"),
        kappa_max=float(k.max()) if k.size else float("nan"),
        unrepresentable=int(np.sum(lost)),
        kappa_min_positive=float(positive.min()) if positive.size else float("nan")))
  operations = tuple(interpreter.operations)
  lost = sum(leaf.unrepresentable for leaf in reports)
  notes = [_MAX_POOL_NOTE] if any("max pooling" in op.role for op in operations) else []
  if lost:
    notes.append(f"{lost} κ entries do not fit {np.dtype(net.dtype).name} (the path norm is "
                 "out of range): their Path-SGD update is 0. Use normalize=True.")
  warnings = tuple(w for leaf in reports for w in _leaf_warnings(leaf))
  return PathStructure(p=net.p, path_norm=float(np.exp(log_path_sum / net.p)),
                       leaves=tuple(reports), operations=operations, notes=tuple(notes),
                       warnings=warnings, compact=compact)
