"""Global Sparse Momentum (GSM): pruning while training, as Optax transformations.

At every step GSM ranks all prunable weights of the network together by the first-order
Taylor saliency ``|w · ∂L/∂w|``, lets only the top ``Q`` of them receive the gradient, and
lets every prunable weight decay; the inactive ones drift to zero, so a final magnitude
pruning to ``Q`` non-zeros costs little accuracy. :func:`path_gsm` combines it with the
path-normalised direction of Path-SGD while still ranking by the raw gradient, which makes
the whole pruning trajectory invariant under the node rescalings of a ReLU network.

**The top-Q selection** is exact and runs on the device: a bisection over the bit patterns
of the float32 saliencies (non-negative floats order like their bits) finds the Q-th largest
value ``t`` in 31 rounds; every round is an element-wise comparison and a sum per leaf, so it
needs no sort, no concatenation of the leaves and no host round trip, and it shards like the
parameters (each round is one all-reduce of a scalar per leaf). Weights above ``t`` are
active; ties at ``t`` are broken by position (leaves in ``jax.tree`` flattening order,
row-major inside a leaf; one cumulative sum per leaf), so exactly ``Q`` are active. Cost:
about 32 passes over the prunable weights, O(N) memory, at any ``Q``.

References:
  Ding, Ding, Zhou, Han, Guo, Liu & Fu, `Global Sparse Momentum SGD for Pruning Very Deep
  Neural Networks <https://arxiv.org/abs/1909.12778>`_, NeurIPS 2019.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "GlobalSparseMomentumState",
    "LeafSparsity",
    "SparsityReport",
    "active_count",
    "global_sparse_momentum",
    "path_gsm",
    "prune_to_compression",
    "saliency_mask",
    "sparsity_report",
]

_INF_BITS = 0x7F800000  # bit pattern of float32 +inf: the largest saliency (NaNs count as 0)
_ROUNDS = 31  # bisection rounds over [0, _INF_BITS + 1)


class GlobalSparseMomentumState(NamedTuple):
  """State of :func:`global_sparse_momentum`.

  Attributes:
    count: number of updates made so far (int32 scalar).
    momentum: the velocity ``Z``, a tree like the params in the params' dtypes.
    mask: the active set ``B`` of the last update: a tree like the params with a boolean
      array on every prunable leaf and ``None`` on the others (exactly ``Q`` entries are
      ``True``; all ``False`` before the first update).
    direction: the state of the ``direction`` transformation (``optax.EmptyState()`` when
      there is none).
  """

  count: chex.Array
  momentum: Any
  mask: Any
  direction: Any


def _check_number(name, value, low, high=math.inf, high_open=False):
  """A Python/NumPy number or (from ``optax.inject_hyperparams``) a scalar array; traced
  values cannot be checked and pass through."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number, np.ndarray,
                                                        jax.Array)):
    raise ValueError(f"{name} must be a number, got {value!r} of type {type(value).__name__}.")
  if np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got an array of shape {np.shape(value)}.")
  try:
    number = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return
  if not (math.isfinite(number) and low <= number and (number < high if high_open
                                                       else number <= high)):
    bracket = ")" if high_open else "]"
    raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}{bracket}, got "
                     f"{value!r}.")


def _prunable_flags(params, prunable) -> list[bool]:
  """One bool per leaf of ``params``: the leaves GSM may prune."""
  leaves, treedef = jax.tree.flatten(params)
  if prunable is None:
    flags = [np.ndim(x) >= 2 for x in leaves]
  else:
    tree = prunable(params) if callable(prunable) else prunable
    spec_leaves, spec_def = jax.tree.flatten(tree)
    if spec_def != treedef:
      raise ValueError(
          "prunable must be a tree of booleans with exactly the structure of the params (or "
          f"a callable params -> such a tree); got structure\n  {spec_def}\nfor params of "
          f"structure\n  {treedef}.\nBuild it with jax.tree.map(lambda x: x.ndim >= 2, "
          "params) and edit it.")
    flags = []
    for flag in spec_leaves:
      if not isinstance(flag, (bool, np.bool_)) and not (
          hasattr(flag, "dtype") and np.ndim(flag) == 0 and flag.dtype == bool):
        raise ValueError(f"prunable must hold one Python bool per parameter leaf, got "
                         f"{flag!r}.")
      flags.append(bool(flag))
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for path, x, flag in zip(paths, leaves, flags):
    if flag and not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"Leaf params{path} has dtype {jnp.result_type(x)} and cannot be "
                       "pruned; mark it False in prunable.")
  if not any(flags):
    raise ValueError(
        "No prunable leaf: GSM needs at least one leaf to prune. The default prunes kernels "
        "of rank >= 2 (dense and conv weights); pass prunable= (a boolean tree like the "
        "params, or a callable returning one) to choose the leaves.")
  return flags


def active_count(params, compression, prunable=None):
  """``Q = floor(N / compression)``, at least 1: the number of weights GSM keeps active.

  ``N`` is the number of prunable weights, so the achieved ratio ``N / Q`` is at least
  ``compression``. A Python int when ``compression`` is concrete, else an int32 scalar.

  Examples:
    >>> import jax.numpy as jnp, pathsgd_jax as psgd
    >>> psgd.active_count({"w": jnp.zeros((10, 30)), "b": jnp.zeros(30)}, 60)
    5
  """
  _check_number("compression", compression, 1.0)
  n = sum(math.prod(np.shape(x)) for x, f in
          zip(jax.tree.leaves(params), _prunable_flags(params, prunable)) if f)
  if n >= 2**31:
    raise ValueError(f"{n} prunable weights: the selection counts in int32 (at most 2^31-1).")
  try:
    return max(1, math.floor(n / float(compression)))
  except (TypeError, jax.errors.ConcretizationTypeError):
    return jnp.clip(jnp.floor(n / compression), 1, n).astype(jnp.int32)


def _top_q(scores: list[jax.Array], q) -> list[jax.Array]:
  """Boolean masks with exactly ``q`` True entries over all ``scores`` (non-negative)."""
  bits = [jax.lax.bitcast_convert_type(
      jnp.where(jnp.isnan(s), 0.0, s).astype(jnp.float32), jnp.int32) for s in scores]

  def count(pred):
    return sum(jnp.sum(pred(b), dtype=jnp.int32) for b in bits)

  def bisect(_, bounds):  # invariant: count(bits >= lo) >= q > count(bits >= hi)
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = count(lambda b: b >= mid) >= q
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  start = (jnp.int32(0), jnp.int32(_INF_BITS + 1))
  threshold, _ = jax.lax.fori_loop(0, _ROUNDS, bisect, start)
  missing = q - count(lambda b: b > threshold)  # >= 1 ties at the threshold to admit
  masks, before = [], jnp.int32(0)
  for b in bits:
    tie = b == threshold
    rank = jnp.cumsum(tie.reshape(-1), dtype=jnp.int32).reshape(b.shape) + before
    masks.append((b > threshold) | (tie & (rank <= missing)))
    before = before + jnp.sum(tie, dtype=jnp.int32)
  return masks


def _masks(params, scores_of, compression, prunable):
  flags = _prunable_flags(params, prunable)
  leaves, treedef = jax.tree.flatten(params)
  q = active_count(params, compression, prunable)
  picked = iter(_top_q([scores_of(i, x) for i, (x, f) in enumerate(zip(leaves, flags)) if f],
                       q))
  return treedef.unflatten([next(picked) if f else None for f in flags])


def saliency_mask(params, grads, compression, *, prunable=None):
  """The active set of GSM: the global top-Q of ``|w · g|`` over all prunable leaves.

  Args:
    params: the parameters.
    grads: the raw loss gradient, a tree like ``params``.
    compression: the global ratio (``Q`` as in :func:`active_count`).
    prunable: boolean tree or callable (default: leaves of rank >= 2).

  Returns:
    A tree like ``params``: boolean arrays with exactly ``Q`` True entries in total on the
    prunable leaves, ``None`` on the others.

  Examples:
    >>> import jax.numpy as jnp, pathsgd_jax as psgd
    >>> w = {"w": jnp.array([[1.0, -2.0], [3.0, 0.5]])}
    >>> psgd.saliency_mask(w, {"w": jnp.ones((2, 2))}, 2)["w"]
    Array([[False,  True],
           [ True, False]], dtype=bool)
  """
  g = jax.tree.leaves(grads)
  return _masks(params, lambda i, w: jnp.abs(w.astype(jnp.float32) * g[i].astype(jnp.float32)),
                compression, prunable)


def prune_to_compression(params, compression, prunable=None, *, scores=None):
  """Magnitude pruning to exactly ``Q`` kept prunable weights (GSM's final step).

  The ``Q`` (see :func:`active_count`) prunable weights of largest ``|w|``, ranked globally,
  are kept and all other prunable weights set to zero (ties by position); other leaves are
  returned unchanged. The result has exactly ``Q`` non-zeros on the prunable leaves when at
  least ``Q`` of them were non-zero. Runs under ``jit``.

  ``|w|`` is not invariant under node rescalings. After :func:`path_gsm`, rank by
  ``scores = |w|·√κ`` instead (``κ`` from :func:`path_scales`): ``w²κ`` is the path mass
  through the edge, which rescalings leave unchanged, so the pruned networks of two
  rescaled-equivalent runs stay equivalent.

  Examples:
    >>> import jax.numpy as jnp, pathsgd_jax as psgd
    >>> params = {"w": jnp.array([[1.0, -4.0], [3.0, 0.5]]), "b": jnp.array([0.1, 0.2])}
    >>> psgd.prune_to_compression(params, 2)["w"]
    Array([[ 0., -4.],
           [ 3.,  0.]], dtype=float32)
  """
  score = jax.tree.leaves(scores) if scores is not None else None
  masks = _masks(params, lambda i, w: jnp.abs(w) if score is None else score[i], compression,
                 prunable)
  return jax.tree.map(lambda w, m: w if m is None else jnp.where(m, w, jnp.zeros_like(w)),
                      params, masks, is_leaf=lambda m: m is None)


class LeafSparsity(NamedTuple):
  """One leaf of a :class:`SparsityReport`: its path, shape, size and non-zeros."""

  path: str
  shape: tuple[int, ...]
  prunable: bool
  size: int
  nonzero: int

  @property
  def density(self) -> float:
    return self.nonzero / self.size if self.size else 0.0


class SparsityReport(NamedTuple):
  """Per-leaf sparsity of a parameter tree; ``str()`` gives a table."""

  leaves: tuple[LeafSparsity, ...]

  @property
  def prunable_size(self) -> int:
    return sum(l.size for l in self.leaves if l.prunable)

  @property
  def prunable_nonzero(self) -> int:
    return sum(l.nonzero for l in self.leaves if l.prunable)

  @property
  def compression(self) -> float:
    """Prunable weights over non-zero prunable weights (``inf`` when all are zero)."""
    nz = self.prunable_nonzero
    return self.prunable_size / nz if nz else math.inf

  def __str__(self) -> str:
    width = max(len(l.path) for l in self.leaves)
    lines = [f"{'leaf':<{width}}  {'shape':<16} {'non-zero':>10} {'of':>10}  density"]
    for l in self.leaves:
      tag = "" if l.prunable else "  (not prunable)"
      lines.append(f"{l.path:<{width}}  {str(l.shape):<16} {l.nonzero:>10} {l.size:>10}  "
                   f"{l.density:7.2%}{tag}")
    lines.append(f"prunable: {self.prunable_nonzero} of {self.prunable_size} non-zero, "
                 f"compression {self.compression:.4g}x")
    return "\n".join(lines)


def sparsity_report(params, prunable=None) -> SparsityReport:
  """Counts the non-zeros of every leaf (on the host), e.g. the per-layer ratios GSM found.

  Examples:
    >>> import jax.numpy as jnp, pathsgd_jax as psgd
    >>> report = psgd.sparsity_report({"w": jnp.array([[0.0, 1.0], [0.0, 0.0]])})
    >>> report.leaves[0].nonzero, report.compression
    (1, 4.0)
  """
  flags = _prunable_flags(params, prunable)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return SparsityReport(tuple(
      LeafSparsity(jax.tree_util.keystr(k, simple=True, separator="/"), tuple(np.shape(x)), f,
                   int(np.size(x)), int(np.count_nonzero(np.asarray(x))))
      for (k, x), f in zip(flat, flags)))


def global_sparse_momentum(
    learning_rate: optax.ScalarOrSchedule,
    *,
    compression: float,
    momentum: float = 0.99,
    weight_decay: float = 5e-4,
    prunable: Any = None,
    direction: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Global Sparse Momentum SGD: momentum SGD in which only the top-Q weights learn.

  .. math::
     B = \operatorname{top}_Q |W \odot g|, \qquad
     Z \leftarrow β Z + η W + B \odot d, \qquad Δ W = -α Z,

  on prunable leaves, with ``g`` the raw gradient given to ``update``, ``d`` the direction
  (``g``, or ``direction`` applied to ``g``), ``β`` the momentum, ``η`` the weight decay and
  ``α`` the learning rate. ``B`` is recomputed at every step over all prunable leaves together
  (a weight can leave and re-enter). As in the authors' code, non-prunable leaves (biases,
  normalisation parameters) are never masked and get no weight decay:
  ``Z ← βZ + d``. The update is the step itself (``optax.apply_updates`` adds it).

  Args:
    learning_rate: a scalar or an :data:`optax.Schedule` of the step count.
    compression: the global compression ratio ``>= 1``; ``Q = floor(N / compression)``
      (at least 1) of the ``N`` prunable weights are active, see :func:`active_count`.
    momentum: ``β`` in ``[0, 1)``.
    weight_decay: ``η >= 0``, applied to prunable leaves only.
    prunable: a boolean tree like the params or a callable ``params -> tree`` (default:
      leaves of rank >= 2, the dense and conv kernels). A callable given to
      ``optax.inject_hyperparams`` must be listed in its ``static_args``.
    direction: an optional transformation turning the raw gradient into the direction ``d``
      (e.g. :func:`scale_by_path_norm`, see :func:`path_gsm`); the saliency is always taken
      from the raw gradient. Do **not** write ``optax.chain(scale_by_path_norm(...),
      global_sparse_momentum(...))``: GSM would then rank by the preconditioned gradient,
      ``|w · g / κ|``, which changes under node rescalings.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires ``params``;
    its state is a :class:`GlobalSparseMomentumState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, pathsgd_jax as psgd
    >>> params = {"w": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "b": jnp.array([1.0, 1.0])}
    >>> tx = psgd.global_sparse_momentum(0.1, compression=2, momentum=0.0, weight_decay=0.0)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates["w"]  # only the Q = 2 weights of largest |w * g| learn
    Array([[-0. , -0.1],
           [-0.1, -0. ]], dtype=float32)
    >>> updates["b"]  # biases are never masked
    Array([-0.1, -0.1], dtype=float32)

  References:
    Ding et al., `Global Sparse Momentum SGD for Pruning Very Deep Neural Networks
    <https://arxiv.org/abs/1909.12778>`_, NeurIPS 2019.
  """
  _check_number("compression", compression, 1.0)
  _check_number("momentum", momentum, 0.0, 1.0, high_open=True)
  _check_number("weight_decay", weight_decay, 0.0)
  if not callable(learning_rate):
    _check_number("learning_rate", learning_rate, 0.0)
  if prunable is not None and not callable(prunable) and not jax.tree.leaves(prunable):
    raise ValueError("prunable is an empty tree; pass a boolean tree like the params.")
  inner = direction if direction is not None else optax.identity()

  def init_fn(params):
    flags = _prunable_flags(params, prunable)
    leaves, treedef = jax.tree.flatten(params)
    active_count(params, compression, prunable)  # validates N
    mask = treedef.unflatten([jnp.zeros(np.shape(x), bool) if f else None
                              for x, f in zip(leaves, flags)])
    return GlobalSparseMomentumState(
        count=jnp.zeros([], jnp.int32),
        momentum=jax.tree.map(lambda x: jnp.zeros(np.shape(x), jnp.result_type(x)), params),
        mask=mask, direction=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("global_sparse_momentum needs the current parameters (the saliency "
                       "is |w * g|): call tx.update(grads, opt_state, params).")
    flags = _prunable_flags(params, prunable)
    mask = saliency_mask(params, updates, compression, prunable=prunable)
    d, inner_state = optax.with_extra_args_support(inner).update(
        updates, state.direction, params, **extra_args)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    treedef = jax.tree.structure(params)
    masks = [m for m in jax.tree.leaves(mask, is_leaf=lambda m: m is None)]
    new_z, steps = [], []
    for w, z, di, m, f in zip(treedef.flatten_up_to(params), treedef.flatten_up_to(
        state.momentum), treedef.flatten_up_to(d), masks, flags):
      ct = jnp.promote_types(jnp.result_type(z), jnp.float32)
      di = di.astype(ct)
      if f:
        di = weight_decay * w.astype(ct) + jnp.where(m, di, 0)
      z = momentum * z.astype(ct) + di
      new_z.append(z.astype(jnp.result_type(w)))
      steps.append((-lr * z).astype(jnp.result_type(w)))
    return treedef.unflatten(steps), GlobalSparseMomentumState(
        count=optax.safe_int32_increment(state.count), momentum=treedef.unflatten(new_z),
        mask=mask, direction=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def path_gsm(
    learning_rate: optax.ScalarOrSchedule,
    apply_fn,
    example_input,
    *,
    compression: float,
    momentum: float = 0.99,
    weight_decay: float = 5e-4,
    prunable: Any = None,
    p: float = 2.0,
    path_mask: Any = None,
    normalize: bool = False,
    refresh_every: int = 1,
) -> optax.GradientTransformationExtraArgs:
  r"""Path-GSM: GSM whose active weights follow the path-normalised gradient ``g / κ``.

  .. math::
     B = \operatorname{top}_Q |W \odot g|, \qquad
     Z \leftarrow β Z + η W + B \odot g / κ(W), \qquad Δ W = -α Z.

  The saliency ``|w · g|`` is invariant under node rescalings of a ReLU network (``w`` is
  multiplied by the factor the gradient is divided by), so both networks pick the same
  ``B``; ``g/κ``, ``W`` and hence ``Z`` and the step transform like the weights. Two
  rescaled-equivalent networks therefore follow equivalent pruning trajectories, weight
  decay included (it acts on ``Z`` in parameter coordinates, which a diagonal rescaling
  commutes with). Plain GSM's steps differ by the square of the factors.

  Args:
    learning_rate: a scalar or an :data:`optax.Schedule`.
    apply_fn: ``apply_fn(params, x) -> outputs``, the network for the path scales κ.
    example_input: a batch with the real input shape (only its shape and dtype are used).
    compression, momentum, weight_decay, prunable: as in :func:`global_sparse_momentum`.
    p, normalize, refresh_every: as in :func:`scale_by_path_norm`.
    path_mask: ``scale_by_path_norm``'s ``mask`` (leaves that are not path weights).
      With ``optax.inject_hyperparams``, list ``apply_fn``, ``example_input``, ``p`` and
      ``refresh_every`` (and a callable ``prunable``) in ``static_args``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp, pathsgd_jax as psgd
    >>> mlp = lambda prm, x: jnp.maximum(x @ prm["w1"], 0.0) @ prm["w2"]
    >>> params = {"w1": jnp.array([[1.0, 2.0]]), "w2": jnp.array([[3.0], [4.0]])}
    >>> tx = psgd.path_gsm(0.1, mlp, jnp.zeros((1, 1)), compression=2, momentum=0.0,
    ...                    weight_decay=0.0)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates["w2"]  # |w * g| picks w2; each step is -0.1 / κ = -0.1 / [1, 4]
    Array([[-0.1  ],
           [-0.025]], dtype=float32)

  References:
    Ding et al., Global Sparse Momentum SGD for Pruning Very Deep Neural Networks, NeurIPS
    2019; Neyshabur, Salakhutdinov & Srebro, Path-SGD, NIPS 2015.
  """
  from pathsgd_jax import scale_by_path_norm  # pylint: disable=g-import-not-at-top
  return global_sparse_momentum(
      learning_rate, compression=compression, momentum=momentum, weight_decay=weight_decay,
      prunable=prunable,
      direction=scale_by_path_norm(apply_fn, example_input, p=p, mask=path_mask,
                                   normalize=normalize, refresh_every=refresh_every))
