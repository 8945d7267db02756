"""The values of the path network: what every variable of the user's jaxpr stands for."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, NamedTuple


class Kind(enum.IntEnum):
  """What a value depends on; an operation's result has the largest kind of its operands.

  ``CONST``
    neither parameters nor input; kept at its true (signed) value, concrete when possible,
    and raised to ``|c|^p`` only where it meets an activation.
  ``PARAM``
    parameters only (a weight, possibly reshaped, cast, scaled or summed with others).
  ``ACT``
    the input: an activation of the path network, held as its non-negative path value.
  """

  CONST = 0
  PARAM = 1
  ACT = 2


@dataclasses.dataclass(frozen=True)
class _Val:
  """One value of the path network.

  A ``PARAM`` value holds ``value``, its powered form: ``|w|^p`` for a weight, the product of
  the powered factors for a product, and for a sum of parameters and constants (a folded
  bias, ``β − μ·s``) the sum of the terms' powered values: a *surrogate* whose gradient is
  the κ rule's (each parameter counts the change it makes to the sum, see
  `PathInterpreter.param_value`), while the forward value used where it meets an activation
  is ``|signed()|^p`` (``exact`` is False then). ``signed`` computes the true value lazily.

  An ``ACT`` value stands for ``value · 2^log_scale``; ``bounded`` says its entries are
  known to be below 2, so that a scaling or a sum may skip renormalising (see `_rules`). ``bias`` is the signed, not yet powered
  additive part of the affine neuron the activation is in (see `_rules` for when a neuron
  closes); ``chain`` names the affine steps folded into it, for the report.
  """

  kind: Kind
  value: Any
  leaves: frozenset[int] = frozenset()  # parameter leaves a PARAM value was derived from
  log_scale: Any = 0.0
  # An ACT value's identity up to constant factors: scaling by a constant keeps it.
  origin: Any = None
  # Set on the result of `x > 0` and kin: the origin of the activation x that was tested,
  # and the comparison's primitive.
  tested: Any = None
  tested_by: str = ""
  # For a parameter leaf itself: (raw weight, zero perturbation δ) with value = |w|^p + δ, so
  # a large dense layer can be applied without materialising |w|^p (see `_powered_matvec`).
  raw: Any = None
  signed: Any = None  # PARAM: a memoised thunk returning the true (signed) value
  exact: bool = True  # PARAM: value is the path network's own value (no folded sum in it)
  bias: Any = None  # ACT: the open neuron's pending bias, a CONST or PARAM _Val
  chain: frozenset[str] = frozenset()  # ACT: affine steps folded into the open neuron
  bias_at: Any = None  # ACT: the equation that last changed the pending bias (for the report)
  # ACT: leaves of the linear map that opened the neuron; a bias closing it joins their group.
  neuron_leaves: frozenset[int] = frozenset()
  # ACT: value's entries are known to be below 2 (renormalised by the operation that made it,
  # or moved without arithmetic since); an operation that may grow it renormalises only if not.
  bounded: bool = False

  def __post_init__(self):
    if self.kind == Kind.ACT and self.origin is None:
      object.__setattr__(self, "origin", object())


def memoised(fn):
  """A zero-argument thunk that computes ``fn()`` once, when first called."""
  cache = []

  def get():
    if not cache:
      cache.append(fn())
    return cache[0]

  return get


class Operation(NamedTuple):
  """One operation of the path network, as listed in the structure report.

  Attributes:
    primitive: the JAX primitive of the user's network.
    role: what the path network does with it (``"dense"``, ``"conv"``, ``"bias"``,
      ``"batch norm (folded)"``, ``"relu (identity)"``, ``"max pooling (sum over window)"``,
      ...).
    shape: shape of the activation it produces (for the single all-ones example).
    leaves: names of the parameter leaves it reads.
    where: the module path and source line that produced it.
  """

  primitive: str
  role: str
  shape: tuple[int, ...]
  leaves: tuple[str, ...]
  where: str
