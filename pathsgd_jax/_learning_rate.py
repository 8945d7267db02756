"""A Path-SGD learning rate from the size of the first step, the same on rescaled networks."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pathsgd_jax._pathnet import PathNetwork, check_p
from pathsgd_jax._scales import ApplyFn, compute_scales
from pathsgd_jax._transform import _check_number

DEFAULT_TARGET = 0.3


def relative_step(apply_fn: ApplyFn, params, updates, x, *, p: float = 2.0, mask=None) -> float:
  r"""The relative size of a step in the path metric: Σ_G ρ_G of the trust region.

  For each group G of leaves (the leaves of the same affine neurons: a layer's kernel and bias,
  a BatchNorm's scale and shift folded into the layer before it),

  .. math::
     ρ_G = \Big(\textstyle\sum_{e \in G} Δ_e^2 κ_e \big/ \sum_{e \in G} w_e^2 κ_e\Big)^{1/2},

  the step's share of the path mass ``w_e²κ_e`` through the group; a path's product changes
  by about the sum of the ρ_G of the groups it crosses. Groups whose mass is 0 and leaves
  excluded by ``mask`` are left out. This is the quantity that ``max_relative_step`` of
  :func:`path_sgd` bounds (there with Δ = η·u). Each term is invariant under node rescalings
  (Δ and w scale alike, κ against their square), so the result is too.

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs``.
    params: the parameters w.
    updates: a step Δ, a tree like ``params`` (``optax.apply_updates(params, updates)``).
    x: a batch with the real input shape; for networks that normalise with batch statistics
      (train-mode BatchNorm) the batch whose statistics fold the network.
    p: exponent of the path norm, ``p >= 1``.
    mask: leaves that are not path weights (see :func:`path_scales`).

  Returns:
    Σ_G ρ_G as a Python float (computed in float32, or float64 with x64). Call it outside
    ``jit``.

  Examples:
    >>> import jax.numpy as jnp, pathsgd_jax as psgd
    >>> mlp = lambda prm, x: jnp.maximum(x @ prm["w1"], 0.0) @ prm["w2"]
    >>> params = {"w1": jnp.array([[1.0, 2.0]]), "w2": jnp.array([[3.0], [4.0]])}
    >>> step = {"w1": jnp.array([[0.1, 0.2]]), "w2": jnp.zeros((2, 1))}  # w1 grows by 10%
    >>> round(psgd.relative_step(mlp, params, step, jnp.ones((1, 1))), 6)
    0.1
  """
  p = check_p(p)
  _check_callable(apply_fn)
  sizes = _group_sizes(apply_fn, params, {"updates": updates}, x, p, mask, what="updates")
  return float(sum(math.sqrt(s) for s in sizes))


def suggest_learning_rate(apply_fn: ApplyFn, params, grads, x, *,
                          target: float = DEFAULT_TARGET, momentum: float | None = None,
                          p: float = 2.0, mask=None, normalize: bool = False) -> float:
  r"""A Path-SGD learning rate from the first step: it changes the network by ``target``.

  The first Path-SGD step is Δ = −η·u with u_e = g_e/κ_e (g the loss gradient; u_e = 0 where
  κ_e = 0). Its relative size in the path metric (:func:`relative_step`) is linear in η,

  .. math::
     \sum_G ρ_G = η\, S, \qquad
     S = \sum_G \Big(\textstyle\sum_{e \in G,\,κ_e > 0} g_e^2/κ_e
                     \big/ \sum_{e \in G} w_e^2 κ_e\Big)^{1/2},

  and the suggestion is ``η = target · (1 − β) / S``: with momentum β a constant gradient's
  step grows to η/(1 − β), so the factor (1 − β) keeps that step at ``target``. Under a node
  rescaling g scales like 1/w and κ like 1/w², so g²/κ and w²κ, hence S and η, do not change:
  a network and any rescaled copy of it get the same η (and then the same trajectory).
  ``normalize=True`` returns the η of ``path_sgd(..., normalize=True)``, which multiplies the
  step by φ_p²: the same first step, with η divided by φ_p².

  One path-scale computation on top of the gradient you pass; deterministic (the traced path
  network is reused for the same ``apply_fn`` and shapes). The target is a fraction: 0.3 (the
  default) lets the momentum-accumulated step move path products by about 30%, the first step
  by 0.3·(1 − β). On the README's gallery ("How to choose a learning rate": MLPs, CNNs,
  BatchNorm ResNets and CNNs in Linen, NNX and Equinox) this one default, with momentum 0.9
  and ``max_relative_step=0.1``, trains every model in 300 steps, a ResNet with frozen
  (eval-mode) BatchNorm statistics and zero-initialised residual scales included; with
  ``max_relative_step=1.0`` it trains the others, the train-mode BatchNorm ResNet faster, but
  not that one. Its η is within a factor 10 of a decade grid's best on seven of eight models
  and 41x below it on the small Equinox MLP (which it still trains).

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs``, the function given to :func:`path_sgd`.
    params: the parameters at the start of training.
    grads: the gradient of the training loss at ``params`` on one batch, a tree like
      ``params``.
    x: that batch (its shape is the input shape; a network with train-mode BatchNorm is
      folded at its statistics).
    target: the relative change of the network per step, in (0, ∞); 0.3 by default.
    momentum: the momentum β given to :func:`path_sgd`, in [0, 1), or None.
    p: exponent of the path norm (as given to :func:`path_sgd`).
    mask: leaves that are not path weights (as given to :func:`path_sgd`); they are left out
      of the measure.
    normalize: as given to :func:`path_sgd`.

  Returns:
    η as a Python float. Call it outside ``jit``.

  Raises:
    ValueError: for a target or momentum out of range, or a gradient that gives no step to
      measure (zero on every path weight, or not finite).

  Examples:
    >>> import jax, jax.numpy as jnp, pathsgd_jax as psgd
    >>> mlp = lambda prm, x: jnp.maximum(x @ prm["w1"], 0.0) @ prm["w2"]
    >>> params = {"w1": jnp.array([[1.0, 2.0]]), "w2": jnp.array([[3.0], [4.0]])}
    >>> x, y = jnp.ones((4, 1)), jnp.zeros((4, 1))
    >>> grads = jax.grad(lambda prm: jnp.mean((mlp(prm, x) - y) ** 2))(params)
    >>> lr = psgd.suggest_learning_rate(mlp, params, grads, x, target=0.1)
    >>> tx = psgd.path_sgd(lr, mlp, x)
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> round(psgd.relative_step(mlp, params, updates, x), 6)  # the first step, as asked
    0.1

  References:
    Neyshabur, Salakhutdinov & Srebro, `Path-SGD: Path-Normalized Optimization in Deep Neural
    Networks <https://arxiv.org/abs/1506.02617>`_, NIPS 2015.
  """
  p = check_p(p)
  _check_callable(apply_fn)
  _check_number("target", target, low=0.0, low_open=True)
  if momentum is not None:
    _check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
  if isinstance(normalize, (jax.Array, np.ndarray)) or not isinstance(normalize, bool):
    raise ValueError(f"normalize must be True or False (as given to path_sgd), got "
                     f"{normalize!r}.")
  sizes, log_phi_sq = _group_sizes(apply_fn, params, {"grads": grads}, x, p, mask,
                                   what="grads", with_log_phi_sq=True)
  s = sum(math.sqrt(v) for v in sizes)
  if not math.isfinite(s):
    raise ValueError("The gradient is not finite (inf or NaN in some path weight's gradient): "
                     "there is no first step to measure. Check the loss and the batch.")
  if s == 0:
    raise ValueError(
        "The gradient is zero on every path weight with a live path: the first Path-SGD step "
        "would not move the network, so no learning rate follows from it. Check that `grads` "
        "is the loss gradient at `params` on this batch (and that the network is not dead).")
  # S of κ/φ² is φ² times S of raw κ; logs keep φ² of deep networks out of the float range.
  log_lr = math.log(target) + math.log1p(-(momentum or 0.0)) - math.log(s)
  if not normalize:
    log_lr += log_phi_sq
  return math.exp(log_lr)


def _check_callable(apply_fn):
  if not callable(apply_fn):
    raise ValueError(f"apply_fn must be callable as apply_fn(params, x), got {apply_fn!r}.")


def _group_sizes(apply_fn, params, tree: dict[str, Any], x, p, mask, *, what: str,
                 with_log_phi_sq: bool = False):
  """Per group, Σ_G Δ²κ / Σ_G w²κ for Δ = the updates, or Δ = g/κ for the gradient (κ/φ²)."""
  if params is None:
    raise ValueError("params is None: pass the parameter tree apply_fn takes.")
  [(kind, given)] = tree.items()
  normalized = kind == "grads"  # g²/κ needs κ/φ², finite at any depth; Δ²κ needs raw κ
  net, measure = _compiled(apply_fn, params, x, p, mask, normalized)
  try:
    given_leaves = net.treedef.flatten_up_to(given)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{what} must be a tree like params (the same structure, as jax.grad "
                     f"returns for them); they differ: {e}") from None
  for leaf, w, name in zip(given_leaves, net.treedef.flatten_up_to(params), net.leaf_names):
    if np.shape(leaf) != np.shape(w):
      raise ValueError(f"{what} leaf '{name}' has shape {np.shape(leaf)}, its parameter "
                       f"{np.shape(w)}: pass a tree like params.")
  sizes = measure(params, given_leaves, x)
  sizes = [float(v) for v in jax.device_get(sizes[0])], float(sizes[1])
  return sizes if with_log_phi_sq else sizes[0]


_CACHE: dict = {}  # (apply_fn, shapes, p, normalized) -> (PathNetwork, jitted measure)


def _compiled(apply_fn, params, x, p, mask, normalized):
  """The path network and the jitted measure, reused for the same function and shapes (a
  mask, which may be any tree or callable, is never cached)."""
  shapes = lambda tree: (jax.tree.structure(tree),  # noqa: E731
                         tuple((np.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(tree)))
  key = None
  if mask is None:
    try:
      key = (apply_fn, shapes(params), shapes(x), p, normalized)
      hash(key)
    except TypeError:
      key = None
  if key is not None and key in _CACHE:
    return _CACHE[key]
  net = PathNetwork(apply_fn, params, x, p, mask)
  measure = jax.jit(lambda prm, leaves, batch: _sizes(net, prm, leaves, batch, normalized))
  if key is not None:
    if len(_CACHE) >= 8:
      _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = net, measure
  return net, measure


def _sizes(net, params, given_leaves, x, normalized):
  scales = compute_scales(net, params, normalize=normalized, inputs=x)
  heads = [g if inc else None for g, inc in zip(scales.groups, net.included)]
  leaves = net.treedef.flatten_up_to(params)
  step, mass = {}, {}
  for d, k, w, head in zip(given_leaves, scales.kappa, leaves, heads):
    if head is None:
      continue
    d, w = jnp.asarray(d, k.dtype), jnp.asarray(w, k.dtype)
    live = k > 0
    if normalized:  # Δ = g/κ: Δ²κ = g²/κ
      term = jnp.where(live, jnp.square(d) / jnp.where(live, k, 1), 0)
    else:
      term = jnp.square(d) * k
    step[head] = step.get(head, 0.0) + jnp.sum(term)
    mass[head] = mass.get(head, 0.0) + jnp.sum(jnp.square(w) * k)
  ratios = jnp.stack([jnp.where(mass[h] > 0, step[h] / jnp.where(mass[h] > 0, mass[h], 1), 0.0)
                      for h in step]) if step else jnp.zeros((0,))
  log_phi_sq = (2.0 / net.p) * scales.log_path_sum
  return ratios, log_phi_sq
