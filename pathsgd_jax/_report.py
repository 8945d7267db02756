"""A readable account of the path network that Path-SGD derives from a model."""

from __future__ import annotations

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


@dataclasses.dataclass(frozen=True)
class PathStructure:
  """The structure report of :func:`path_structure`: leaves, layered operations and notes.

  ``str(report)`` renders it as text; the fields hold the same facts as data.
  """

  p: float
  path_norm: float
  leaves: tuple[LeafReport, ...]
  operations: tuple[Operation, ...]
  notes: tuple[str, ...]

  def __str__(self) -> str:
    lines = [f"Path network (p = {self.p:g}), path norm φ_p = {self.path_norm:.6g}", "",
             "Parameter leaves:"]
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


def path_structure(apply_fn: ApplyFn, params, example_input, *, p: float = 2.0,
                   mask=None) -> PathStructure:
  """Reports which leaves are path weights, the path network's operations and κ per leaf.

  Use it to check what Path-SGD will do with a model before training: every parameter leaf
  is classified (weight, bias, excluded, unused), every operation acting on activations is
  listed in order with its output shape (for one example) and the leaves it reads, and
  approximations (max pooling read as a sum) are stated.

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs``.
    params: the parameter tree.
    example_input: a batch with the real input shape.
    p: the path-norm exponent.
    mask: leaves that are not path weights (see :func:`path_scales`).

  Returns:
    A :class:`PathStructure`; print it for a text report.

  Examples:
    >>> import jax.numpy as jnp, pathsgd_jax as psgd
    >>> mlp = lambda prm, x: jnp.maximum(x @ prm["w1"] + prm["b1"], 0.0) @ prm["w2"]
    >>> params = {"w1": jnp.ones((3, 2)), "b1": jnp.zeros(2), "w2": jnp.ones((2, 1))}
    >>> report = psgd.path_structure(mlp, params, jnp.zeros((1, 3)))
    >>> [(leaf.name, leaf.role) for leaf in report.leaves]
    [('b1', 'bias'), ('w1', 'weight'), ('w2', 'weight')]
  """
  net = PathNetwork(apply_fn, params, example_input, check_p(p), mask)
  interpreter = PathInterpreter(net.p, net.dtype, net.leaf_names, record=True)
  scales = compute_scales(net, params, normalize=False, interpreter=interpreter)
  leaves = net.treedef.flatten_up_to(params)
  reports = []
  for i, (name, leaf, k, lost) in enumerate(zip(net.leaf_names, leaves, scales.kappa,
                                                 scales.unrepresentable)):
    if not net.included[i]:
      role = "excluded"
    else:
      role = "+".join(sorted(interpreter.leaf_roles.get(i, ()))) or "unused"
    k = np.asarray(k)
    reports.append(LeafReport(
        name=name, shape=tuple(np.shape(leaf)), dtype=str(jax.numpy.result_type(leaf)),
        role=role, kappa_min=float(k.min()) if k.size else float("nan"),
        kappa_max=float(k.max()) if k.size else float("nan"),
        unrepresentable=int(np.sum(lost))))
  operations = tuple(interpreter.operations)
  lost = sum(leaf.unrepresentable for leaf in reports)
  notes = [_MAX_POOL_NOTE] if any("max pooling" in op.role for op in operations) else []
  if lost:
    notes.append(f"{lost} κ entries do not fit {np.dtype(net.dtype).name} (the path norm is "
                 "out of range): their Path-SGD update is 0. Use normalize=True.")
  return PathStructure(p=net.p, path_norm=float(np.exp(scales.log_path_sum / net.p)), leaves=tuple(reports),
                       operations=operations, notes=tuple(notes))
