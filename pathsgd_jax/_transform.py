"""Path-SGD as Optax gradient transformations."""

from __future__ import annotations

from typing import Any, NamedTuple

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pathsgd_jax._pathnet import PathNetwork, check_p
from pathsgd_jax._scales import ApplyFn, compute_scales

_NO_PARAMS = (
    "scale_by_path_norm needs the current parameters: the path scales κ are recomputed from "
    "them at every step. Call `tx.update(grads, opt_state, params)`. You are using a "
    "transformation that requires the current value of parameters, but you are not passing "
    "`params` when calling `update`.")


class ScaleByPathNormState(NamedTuple):
  """State of :func:`scale_by_path_norm`.

  Attributes:
    count: number of updates made so far (int32 scalar).
    kappa: the path scales of the last refresh, a tree like the params given to ``init``
      (float32, or float64 with x64; same shardings), kept only when ``refresh_every > 1``;
      ``None`` otherwise, so the paper's every-step rule costs no memory. Its structure is
      fixed at ``init`` (``nnx.Optimizer`` gives ``init`` a tree of variables and ``update``
      a tree of arrays with the same leaves).
  """

  count: chex.Array
  kappa: Any


def _safe_divide(update, kappa):
  """update / κ, with 0 where κ == 0.

  κ_e = 0 exactly when no path with non-zero weights passes through edge e (a dead unit);
  the loss gradient on such an edge is 0 too. Any κ > 0, however small, is divided by as is, so
  the guard never touches ordinary values and the update stays rescaling invariant.
  """
  positive = kappa > 0
  scaled = update.astype(kappa.dtype) / jnp.where(positive, kappa, 1)
  return jnp.where(positive, scaled, 0).astype(update.dtype)


def _trust_region(directions, kappa, weights, heads, learning_rate, limit):
  """The directions, scaled down together if the step leaves the path-metric trust region.

  For each group G of leaves (the leaves of the same affine neurons: a layer's kernel and
  bias, a folded BatchNorm's scale and shift) the relative step is
  ρ_G = η·(Σ_G u²κ / Σ_G w²κ)^½, both sums rescaling invariant; a group that is exactly 0 is
  left out (it can leave 0). A path crosses many groups and its product changes by about the
  sum of their ρ_G, so the whole update is scaled by ``limit / Σ_G ρ_G`` where that sum
  exceeds ``limit``. Where it does not, the directions are returned unchanged (a select).
  """
  step, mass = {}, {}
  for u, k, w, head in zip(directions, kappa, weights, heads):
    if head is None:
      continue
    u = u.astype(k.dtype)
    step[head] = step.get(head, 0.0) + jnp.sum(u * u * k)
    mass[head] = mass.get(head, 0.0) + jnp.sum(jnp.square(w.astype(k.dtype)) * k)
  if not step:
    return directions
  dtype = next(iter(mass.values())).dtype
  rate = jnp.abs(jnp.asarray(learning_rate, dtype))
  total = sum(jnp.where(mass[h] > 0, rate * jnp.sqrt(step[h] / jnp.where(mass[h] > 0, mass[h], 1)),
                        0.0) for h in step)
  # A non-finite gradient passes through as it came (as optax.sgd's does), unclipped.
  exceeded = jnp.isfinite(total) & (total > limit)
  factor = limit / jnp.where(exceeded, total, 1.0)
  return [u if head is None else jnp.where(exceeded, (u.astype(dtype) * factor).astype(u.dtype), u)
          for u, head in zip(directions, heads)]


def _check_number(name, value, *, low, high=float("inf"), low_open=False, high_open=False):
  """Validates a hyperparameter that is a Python or concrete number (arrays from
  ``optax.inject_hyperparams`` are checked when concrete, passed through when traced)."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number, jax.Array)):
    raise ValueError(f"{name} must be a number, got {value!r} of type {type(value).__name__}.")
  try:
    number = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return
  too_low = number <= low if low_open else number < low
  too_high = number >= high if high_open else number > high
  if not math.isfinite(number) or too_low or too_high:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}.")


def _like(kappa, cached):
  """κ with the type of the cached κ, sharding included (explicit-sharding meshes type it)."""
  sharding = jax.typeof(cached).sharding
  if jax.typeof(kappa).sharding != sharding and not sharding.mesh.empty:
    kappa = jax.sharding.reshard(kappa, sharding.spec)
  return kappa


def _compute_dtype():
  return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def _check_refresh(refresh_every):
  if isinstance(refresh_every, jax.Array) and np.shape(refresh_every) == ():
    try:
      refresh_every = int(refresh_every)
    except jax.errors.ConcretizationTypeError:  # rebuilt by inject_hyperparams under jit
      return refresh_every
  if isinstance(refresh_every, np.integer):
    refresh_every = int(refresh_every)
  if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
    raise ValueError(f"refresh_every must be a positive integer (1 = recompute κ at every "
                     f"step, as in the paper), got {refresh_every!r}.")
  return refresh_every


def _rate_at(learning_rate, count):
  return learning_rate(count) if callable(learning_rate) else learning_rate


def _path_directions(apply_fn, example_input, *, p, mask, refresh_every, normalize):
  """``init_fn`` and ``directions_of(updates, state, params, inputs)`` of scale_by_path_norm,
  shared by :func:`scale_by_path_norm` and :func:`path_sgd` (which bounds the step after
  momentum). ``directions_of`` returns the directions g/κ (κ refreshed every
  ``refresh_every`` steps), ``bound(step, learning_rate, limit)`` that scales a step like them
  into the trust region at this κ, and the new state."""
  p = check_p(p)
  refresh_every = _check_refresh(refresh_every)
  if not callable(apply_fn):
    raise ValueError(f"apply_fn must be callable as apply_fn(params, x), got {apply_fn!r}.")
  groups = {}  # static, from the trace: leaf -> group head (None for excluded leaves)

  def scales_of(params, inputs) -> list:
    net = PathNetwork(apply_fn, params, example_input, p, mask)
    scales = compute_scales(net, params, normalize=normalize, inputs=inputs)
    groups["heads"] = [g if inc else None for g, inc in zip(scales.groups, net.included)]
    return scales.kappa

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    if refresh_every == 1:
      return ScaleByPathNormState(count, kappa=None)
    # Shapes only: the first update refreshes κ (count 0), so init never runs the network
    # and works on abstract params.
    kappa = jax.tree.map(lambda x: jnp.zeros_like(x, dtype=_compute_dtype()), params)
    return ScaleByPathNormState(count, kappa)

  def directions_of(updates, state, params, inputs):
    if params is None:
      raise ValueError(_NO_PARAMS)
    if state.kappa is None:  # refresh_every == 1, decided when the state was made
      kappa = scales_of(params, inputs)
      cached = None
    else:
      cached_structure = jax.tree.structure(state.kappa)

      def refresh(params):
        kappa = map(_like, scales_of(params, inputs), jax.tree.leaves(state.kappa))
        return cached_structure.unflatten(list(kappa))

      cached = jax.lax.cond(state.count % refresh_every == 0, refresh, lambda _: state.kappa,
                            params)
      kappa = jax.tree.leaves(cached)
    treedef = jax.tree.structure(updates)
    directions = list(map(_safe_divide, treedef.flatten_up_to(updates), kappa))

    def bound(step, learning_rate, limit):
      return treedef.unflatten(_trust_region(treedef.flatten_up_to(step), kappa,
                                             treedef.flatten_up_to(params), groups["heads"],
                                             learning_rate, limit))

    count = optax.safe_int32_increment(state.count)
    return treedef.unflatten(directions), bound, ScaleByPathNormState(count, cached)

  return init_fn, directions_of


def scale_by_path_norm(
    apply_fn: ApplyFn,
    example_input: Any,
    *,
    p: float = 2.0,
    mask: Any = None,
    refresh_every: int = 1,
    normalize: bool = False,
    max_relative_step: float | None = None,
    learning_rate: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Divides each update by its path scale κ, computed from the current parameters.

  .. math::
     u_e \leftarrow \frac{u_e}{κ_e(w)}, \qquad
     κ_e(w) = \Big(\sum_{\text{paths } π \ni e}\ \prod_{e' \in π,\, e' \neq e} |w_{e'}|^p\Big)^{2/p},

  the diagonal of the path-regularizer's quadratic approximation (see :func:`path_scales`).
  Followed by a learning rate this is Path-SGD; with momentum after it, the momentum acts on
  the path-normalised direction, which keeps trajectories invariant under rescalings of hidden
  units. Edges with ``κ = 0`` (no live path) get a zero update.

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs``; ``params`` is exactly the tree this
      transformation receives.
    example_input: a batch with the real input shape; only its shape and dtype are used.
    p: exponent of the path regularizer, ``p >= 1``.
    mask: optional boolean tree like the params (or a callable returning one); ``False``
      leaves are not path weights and their updates pass through unscaled.
    refresh_every: recompute κ every this many steps and reuse the cached κ in between
      (1, the paper's rule, stores nothing).
    normalize: divide by κ/φ_p² instead of κ: the step is multiplied by φ_p², a rescaling-
      invariant scalar, which makes one learning rate fit networks of any depth and keeps κ
      representable where raw κ overflows float32 (deep networks).
    max_relative_step: the trust region for near-dead branches (see below), or None. Needs
      ``learning_rate``; :func:`path_sgd` sets both.
    learning_rate: the learning rate (or schedule) the update will be multiplied by, used only
      to measure the step for ``max_relative_step``.

  Near-dead branches. A branch whose every path is nearly 0 (a residual block whose last
  BatchNorm scale starts at 0, a dying unit) has κ ∝ s² and gradients ∝ s for its weights, so
  their Path-SGD steps grow like 1/s: exact steepest descent in the path geometry, but far
  outside the region where the first-order model holds, and in a few steps inf/NaN. With
  ``max_relative_step = r`` the step is limited, in the path metric, to r times the network:
  for each group G of leaves (those of the same affine neurons: a layer's kernel and bias, a
  BatchNorm's scale and shift folded into the layer before it; found in the path network)

  .. math::
     ρ_G = η\,\Big(\textstyle\sum_{e \in G} u_e^2 κ_e \big/ \sum_{e \in G} w_e^2 κ_e\Big)^{1/2},
     \qquad \textstyle\sum_G ρ_G \le r,

  and the whole update is scaled down by ``r / Σ_G ρ_G`` when it is exceeded. A path's
  product changes by about the sum of the ρ_G of the groups it crosses, so this bounds the
  relative change of every path. Each term ``u_e²κ_e`` and ``w_e²κ_e`` (the path mass through
  e) is invariant under node rescalings, so the clipped update is still rescaling invariant.
  Groups that are exactly 0 (a block behind a zero-initialised scale at the first step) are
  left out, so they can leave 0. On the paper's MLPs at their learning rates Σ_G ρ_G stays
  below 0.15: the limit is never reached. Here the bound acts on this transformation's output,
  before any momentum chained after it, which can make the step taken up to 1/(1 − β) larger;
  :func:`path_sgd` bounds the step after momentum, the one actually taken.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires ``params``;
    networks that normalise with batch statistics (train-mode BatchNorm) also need the batch:
    ``update(grads, state, params, inputs=x)``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, pathsgd_jax as psgd
    >>> mlp = lambda prm, x: jnp.maximum(x @ prm["w1"], 0.0) @ prm["w2"]
    >>> params = {"w1": jnp.array([[1.0, 2.0]]), "w2": jnp.array([[3.0], [4.0]])}
    >>> tx = optax.chain(psgd.scale_by_path_norm(mlp, jnp.zeros((1, 1))), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w1"]  # -0.1 * 1 / κ(w1) = -0.1 / [9, 16]
    Array([[-0.01111111, -0.00625   ]], dtype=float32)

  References:
    Neyshabur, Salakhutdinov & Srebro, `Path-SGD: Path-Normalized Optimization in Deep Neural
    Networks <https://arxiv.org/abs/1506.02617>`_, NIPS 2015.
  """
  if max_relative_step is not None:
    _check_number("max_relative_step", max_relative_step, low=0.0, low_open=True)
    if learning_rate is None:
      raise ValueError("max_relative_step needs the learning_rate the update is scaled by "
                       "(path_sgd passes it); pass learning_rate= too.")
  init_fn, directions_of = _path_directions(apply_fn, example_input, p=p, mask=mask,
                                            refresh_every=refresh_every, normalize=normalize)

  def update_fn(updates, state, params=None, *, inputs=None, **extra_args):
    del extra_args
    directions, bound, new_state = directions_of(updates, state, params, inputs)
    if max_relative_step is not None:
      directions = bound(directions, _rate_at(learning_rate, state.count), max_relative_step)
    return directions, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def path_sgd(
    learning_rate: optax.ScalarOrSchedule,
    apply_fn: ApplyFn,
    example_input: Any,
    *,
    p: float = 2.0,
    momentum: float | None = None,
    nesterov: bool = False,
    mask: Any = None,
    refresh_every: int = 1,
    normalize: bool = False,
    max_relative_step: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Path-SGD: stochastic gradient descent preconditioned by the path scales.

  .. math::
     w_e \leftarrow w_e - η\, \frac{∂L/∂w_e}{κ_e(w)},

  with κ recomputed from the current weights at every step (:func:`scale_by_path_norm`). The
  update is invariant under the rescalings of hidden units that leave a ReLU network's
  function unchanged: two rescaled-equivalent networks follow equivalent trajectories, while
  plain SGD's steps differ by the square of the rescaling factor.

  Args:
    learning_rate: a scalar or an :data:`optax.Schedule`.
    apply_fn: ``apply_fn(params, x) -> outputs``.
    example_input: a batch with the real input shape (only shape and dtype are used).
    p: exponent of the path regularizer, ``p >= 1`` (the paper uses 2).
    momentum: optional heavy-ball momentum applied to the path-normalised direction.
    nesterov: use Nesterov momentum.
    mask: leaves that are not path weights (their gradient passes through unscaled).
    refresh_every: recompute κ every this many steps (1 = the paper's rule).
    normalize: precondition by κ/φ_p² instead of κ (see :func:`scale_by_path_norm`): one
      learning rate then suits networks of any depth.
    max_relative_step: bound the relative size Σ_G ρ_G of the step taken (after momentum,
      :func:`relative_step`) by this, scaling the step down where it is exceeded: a
      rescaling-invariant trust region in the path metric that keeps near-dead branches, such
      as zero-initialised residual scales, from diverging (see :func:`scale_by_path_norm`).
      With :func:`suggest_learning_rate`'s η, 0.1 trains them (1.0, faster, where BatchNorm
      uses batch statistics) and rarely acts on healthy networks. The momentum buffer keeps
      the unclipped directions. None (default) is the paper's rule.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` requires ``params`` (and
    ``inputs=`` the batch, for networks with train-mode BatchNorm).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, pathsgd_jax as psgd
    >>> mlp = lambda prm, x: jnp.maximum(x @ prm["w1"], 0.0) @ prm["w2"]
    >>> params = {"w1": jnp.array([[1.0, 2.0]]), "w2": jnp.array([[3.0], [4.0]])}
    >>> x, y = jnp.ones((4, 1)), jnp.zeros((4, 1))
    >>> loss = lambda prm: jnp.mean((mlp(prm, x) - y) ** 2)
    >>> tx = psgd.path_sgd(0.01, mlp, x, momentum=0.9)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 121.0)
    True

  References:
    Neyshabur, Salakhutdinov & Srebro, `Path-SGD: Path-Normalized Optimization in Deep Neural
    Networks <https://arxiv.org/abs/1506.02617>`_, NIPS 2015.
  """
  if momentum is not None:
    _check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
  if not callable(learning_rate):
    _check_number("learning_rate", learning_rate, low=0.0, low_open=True)
  if max_relative_step is not None:
    _check_number("max_relative_step", max_relative_step, low=0.0, low_open=True)
  init_directions, directions_of = _path_directions(
      apply_fn, example_input, p=p, mask=mask, refresh_every=refresh_every, normalize=normalize)
  accumulate = (optax.trace(decay=momentum, nesterov=nesterov) if momentum is not None
                else optax.identity())
  scale = optax.scale_by_learning_rate(learning_rate)

  # The state is that of chain(scale_by_path_norm, trace, scale_by_learning_rate), so
  # checkpoints and code that index it by position keep working.
  def init_fn(params):
    return (init_directions(params), accumulate.init(params), scale.init(params))

  def update_fn(updates, state, params=None, *, inputs=None, **extra_args):
    del extra_args
    path_state, trace_state, scale_state = state
    directions, bound, new_path_state = directions_of(updates, path_state, params, inputs)
    moved, trace_state = accumulate.update(directions, trace_state)
    if max_relative_step is not None:
      # The bound acts on the step actually taken (after momentum); the momentum buffer
      # keeps the unclipped directions, as in chain(trace, clip).
      moved = bound(moved, _rate_at(learning_rate, path_state.count), max_relative_step)
    updates, scale_state = scale.update(moved, scale_state)
    return updates, (new_path_state, trace_state, scale_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
