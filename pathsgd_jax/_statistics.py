"""Batch statistics (train-mode BatchNorm) as constants of the path network for one step.

A network that normalises with the statistics of its batch (BatchNorm in train mode) is, on
that batch, the eval-mode network whose running statistics are the batch's own. Path-SGD
reads it so: at every step the statistics of the batch being trained on are computed from the
real batch and the current parameters, and held constant; the path network is the network
folded at them (see `_rules`), so κ and the update are those of the folded network, recomputed
from fresh statistics at every step.

What is invariant: a rescaling of the units that feed a BatchNorm changes its batch mean and
standard deviation by the same factor, so the folded network is unchanged and κ transforms
exactly against the gradient, as for any node rescaling; Path-SGD's updates are equivariant
under the rescalings of the folded network.

How statistics are found, without knowing the model: ``apply_fn`` is traced at batch size 1
(the path network's) and at a larger batch. A *statistic* is a value computed from the input
with no batch axis (its shape is the same in both traces) by an equation that reads no
parameter-only value, e.g. ``reduce_sum`` of an activation over the batch. Its value comes from
evaluating the larger trace on the real batch; in the path network it is a constant, and the
equations that only feed statistics (the square of the activation for the variance, the update
of the running averages) are skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from pathsgd_jax._values import Kind


@dataclasses.dataclass(frozen=True)
class StatisticsPlan:
  """Where a network reads batch statistics, by equation index of its top-level jaxpr.

  Attributes:
    roots: indices of the equations whose outputs are batch statistics.
    live: indices of the equations the path network evaluates (the rest only feed roots).
  """

  roots: frozenset[int]
  live: frozenset[int]


def _is_var(atom) -> bool:
  return not isinstance(atom, jex_core.Literal)


def find_statistics(single: jex_core.Jaxpr, batched: jex_core.Jaxpr,
                    input_kinds: Sequence[Kind]) -> StatisticsPlan | None:
  """The statistics plan of a network traced at batch 1 (``single``) and at a larger batch.

  Returns None when the network reads no batch statistic.
  """
  if len(single.eqns) != len(batched.eqns) or any(
      a.primitive is not b.primitive for a, b in zip(single.eqns, batched.eqns)):
    return None  # the program depends on the batch size: no statistics can be located
  kinds: dict[Any, Kind] = dict(zip(single.invars, input_kinds, strict=True))
  statistics: set[Any] = set()  # variables holding batch statistics (or functions of them)
  stat_eqns = set()
  for index, (eqn, twin) in enumerate(zip(single.eqns, batched.eqns)):
    operands = [v for v in eqn.invars if _is_var(v)]
    in_kinds = [kinds.get(v, Kind.CONST) for v in operands]
    batch_free = all(np.shape(a.aval) == np.shape(b.aval)
                     for a, b in zip(eqn.outvars, twin.outvars))
    reads_data = any(k == Kind.ACT or v in statistics for v, k in zip(operands, in_kinds))
    floating = all(jnp.issubdtype(v.aval.dtype, jnp.floating) for v in eqn.outvars)
    # Only real-valued statistics: a branch or an index on a batch reduction stays rejected.
    if reads_data and batch_free and floating and Kind.PARAM not in in_kinds:
      # A statistic, or arithmetic on statistics (its literals, such as the count it
      # divides by, may depend on the batch size: it is evaluated at the real batch).
      stat_eqns.add(index)
      statistics.update(eqn.outvars)
      kind = Kind.CONST
    else:
      kind = max((k if v not in statistics else Kind.CONST for v, k in zip(operands, in_kinds)),
                 default=Kind.CONST)
    for var in eqn.outvars:
      kinds[var] = kind
  if not stat_eqns:
    return None
  for index, eqn in enumerate(single.eqns):
    reads_statistic = any(_is_var(v) and v in statistics for v in eqn.invars)
    if index not in stat_eqns and reads_statistic and (
        eqn.primitive.name in ("cond", "while", "scan") or not all(
            jnp.issubdtype(v.aval.dtype, jnp.floating) for v in eqn.outvars)):
      return None  # a branch, a loop or an index on the batch: not a normalisation
  # The statistics the rest of the network reads (the roots): their values are given.
  used_outside = {v for i, eqn in enumerate(single.eqns) if i not in stat_eqns
                  for v in eqn.invars if _is_var(v)} | set(single.outvars)
  roots = {i for i in stat_eqns if any(v in used_outside for v in single.eqns[i].outvars)}
  live_vars = {v for v in single.outvars if _is_var(v)}
  live = set()
  for index in reversed(range(len(single.eqns))):
    eqn = single.eqns[index]
    if not any(v in live_vars for v in eqn.outvars):
      continue
    live.add(index)
    if index not in roots:
      live_vars.update(v for v in eqn.invars if _is_var(v))
  return StatisticsPlan(frozenset(roots), frozenset(live))


def evaluate_statistics(batched: jex_core.ClosedJaxpr, plan: StatisticsPlan,
                        args: Sequence[Any]) -> dict[int, list[Any]]:
  """The statistics' values: the equations that feed them, evaluated on the real batch."""
  jaxpr = batched.jaxpr
  needed_vars = set()
  for index in plan.roots:
    needed_vars.update(v for v in jaxpr.eqns[index].outvars)
  needed = set()
  for index in reversed(range(len(jaxpr.eqns))):
    eqn = jaxpr.eqns[index]
    if index in plan.roots or any(v in needed_vars for v in eqn.outvars):
      needed.add(index)
      needed_vars.update(v for v in eqn.invars if _is_var(v))
  env = dict(zip(jaxpr.constvars, batched.consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
  values = {}
  for index in sorted(needed):
    eqn = jaxpr.eqns[index]
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    outs = eqn.primitive.bind(*subfuns, *map(read, eqn.invars), **params)
    outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
    if index in plan.roots:
      values[index] = [jax.lax.stop_gradient(o) for o in outs]
  return values


def batch_struct(example_input, batch: int):
  """``example_input``'s structure with the leading (batch) axis set to ``batch``."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((batch, *np.shape(x)[1:]), jnp.result_type(x)),
      example_input)
