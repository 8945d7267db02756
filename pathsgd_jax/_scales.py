"""Path scales κ and path norms φ_p of a network, from its exact path network."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pathsgd_jax._numerics import pow2_factors, times_factors
from pathsgd_jax._pathnet import PathInterpreter, PathNetwork, check_p, power, times_pow2

try:
  from jax.experimental.shard_alike import shard_alike
  HAS_SHARD_ALIKE = True
except ImportError:  # JAX >= 0.12: no layout hint; a standalone jit picks κ's layout itself
  HAS_SHARD_ALIKE = False

  def shard_alike(x, y):
    return x, y

ApplyFn = Callable[[Any, Any], Any]


class Scales(NamedTuple):
  """κ of one evaluation of the path network, with what a user may want to check.

  Attributes:
    log_path_sum: log φ_p^p (finite whenever some path is live, however large).
    kappa: the κ leaves in the params' flattening order (ones for excluded leaves).
    unrepresentable: per κ leaf, a boolean mask of the entries whose κ does not fit the
      compute dtype (inf, or 0 although a live path runs through them); their update is 0.
      Lazy: nothing is computed unless it is used (the optimizer does not use it).
    groups: per leaf, the index of the leaf heading its group: leaves that form the same
      affine neurons (a layer's kernel and bias, a folded BatchNorm's scale and shift).
  """

  log_path_sum: jax.Array
  kappa: list[jax.Array]
  unrepresentable: list[jax.Array]
  groups: list[int]


def compute_scales(net: PathNetwork, params, *, normalize: bool, interpreter=None,
                   inputs=None) -> Scales:
  """κ (or κ/φ_p² when ``normalize``) at v = |θ|^p, without overflow on the way.

  The path network gives g = m·2^e with m of order one and ∂(log m)/∂v = (∂g/∂v)/g, free
  of overflow (a leaf's gradient may come with a power-of-two exponent of its own, see
  `PathInterpreter.operand`). Then κ/φ_p² = (∂ log m/∂v)^(2/p) and κ = φ_p²·(κ/φ_p²), with
  the powers of two and, for p ≠ 2, the logs combined before anything is rounded to the
  float range: an entry is inf or 0 only when its own κ does not fit.
  """
  leaves = net.treedef.flatten_up_to(params)
  weights = [x for x, inc in zip(leaves, net.included) if inc]
  constants = [x for x, inc in zip(leaves, net.included) if not inc]

  def log_mantissa(deltas):
    # Differentiated through δ = 0 added to v = |θ|^p: same gradient, and dense layers can
    # then skip forming |θ|^p at full size (`_powered_matvec`).
    return _log_mantissa(*net.path_sum(weights, constants, interpreter, deltas=deltas,
                                       inputs=inputs))

  interpreter = interpreter or PathInterpreter(net.p, net.dtype, net.leaf_names)
  deltas = [jnp.zeros_like(w, dtype=net.dtype) for w in weights]  # with w's sharding
  (_, (mantissa, exponent, gradient_exponents)), dlog = jax.value_and_grad(
      log_mantissa, has_aux=True)(deltas)
  ratio = 2.0 / net.p
  ln2 = jnp.log(2.0).astype(net.dtype)
  log_g = _log(mantissa, exponent, net.dtype)
  square_root_free = isinstance(net.p, float) and net.p == 2

  # Most leaves' gradients come without an exponent of their own: their κ shares one factor.
  shared = None if normalize else pow2_factors(exponent)
  included = [i for i, inc in enumerate(net.included) if inc]
  plain = [not isinstance(interpreter.gradient_exponents.get(i, 0.0), jax.Array)
           for i in included]

  def kappa_of(gradient, gradient_exponent, plain):
    total_exponent = gradient_exponent + (0.0 if normalize else exponent)
    if square_root_free:  # κ = gradient · (m if raw) · 2^(exponents): exact
      if normalize and plain:
        return gradient
      if plain:
        return times_factors(gradient * mantissa, shared)
      return times_pow2(gradient if normalize else gradient * mantissa, total_exponent)
    positive = gradient > 0
    log_kappa = ratio * (jnp.log(jnp.where(positive, gradient, 1)) + gradient_exponent * ln2
                         + (0.0 if normalize else log_g))
    return jnp.where(positive, jnp.exp(log_kappa), 0.0)

  grads = iter(zip(dlog, gradient_exponents, plain))
  kappas, unrepresentable = [], []
  for x, inc in zip(leaves, net.included):
    if not inc:
      kappas.append(jnp.ones(jnp.shape(x), net.dtype))
      unrepresentable.append(jnp.zeros(jnp.shape(x), bool))
      continue
    gradient, gradient_exponent, plain_leaf = next(grads)
    kappa = kappa_of(gradient, gradient_exponent, plain_leaf)
    unrepresentable.append(~jnp.isfinite(kappa) | ((kappa == 0) & (gradient > 0)))
    kappas.append(kappa)
  # Without a hint, GSPMD may lay κ out unlike its parameter (replicated, or sharded like
  # the row sums it comes from) when the caller does not constrain it.
  kappas = [shard_alike(kappa, x)[0] for kappa, x in zip(kappas, leaves)]
  return Scales(log_g, kappas, unrepresentable, list(net.leaf_groups))


def _log_mantissa(mantissa, exponent, gradient_exponents=()):
  """log m, with log 0 = -inf and a zero gradient there (no live path); the rest as aux.

  A NaN mantissa (a NaN parameter) stays NaN rather than reading as "no path".
  """
  live = mantissa > 0
  log_m = jnp.where(live, jnp.log(jnp.where(live, mantissa, 1)), -jnp.inf)
  log_m = jnp.where(jnp.isnan(mantissa), mantissa, log_m)
  return log_m, (lax.stop_gradient(mantissa), exponent, gradient_exponents)


def _log(mantissa, exponent, dtype):
  """log(m · 2^e)."""
  log_m, _ = _log_mantissa(mantissa, exponent)
  return log_m + exponent * jnp.log(2.0).astype(dtype)


def path_scales(apply_fn: ApplyFn, params, example_input, *, p: float = 2.0, mask=None,
                normalize: bool = False):
  r"""Per-parameter Path-SGD scales κ of a ReLU network.

  For an edge ``e`` of the network,

  .. math::
     κ_e(w) = \Big(\sum_{\text{paths } π \ni e} \prod_{e' \in π,\, e' \neq e} |w_{e'}|^p\Big)^{2/p}
            = \Big(\frac{∂}{∂ v_e} \sum_{\text{outputs}} N(v, \mathbf 1)\Big)^{2/p}
              \Big|_{v = |w|^p},

  where ``N(v, 1)`` is the *path network*: the network's own computation graph with every
  weight replaced by ``|w|^p``, every non-parameter constant ``c`` by ``|c|^p`` (so average
  pooling over ``k`` entries weighs ``(1/k)^p`` and subtraction acts as addition), every ReLU
  acting as the identity and max pooling summing its window, on one all-ones example. A
  parameter shared by many edges (a convolution kernel, a recurrent matrix) gets the sum over
  its occurrences. The graph is read from the jaxpr of ``apply_fn``; operations that are not
  linear and positively homogeneous on activations raise
  :class:`~pathsgd_jax.UnsupportedOperationError`.

  κ is computed in float32 (float64 when ``jax_enable_x64`` is on) whatever the params' dtype.
  One forward and one backward pass of the path network on a single example: the cost does
  not grow with the batch size. The path network renormalises its values as it goes and keeps
  the scale in log space, so path sums that leave the floating-point range on the way (deep
  or unbalanced networks) do not spoil a κ that is itself representable. Raw κ grows like
  φ_p², though: where it does not fit the dtype it comes back as ``inf`` (or 0) and the
  Path-SGD update of that entry is 0. ``normalize=True`` returns κ/φ_p² instead, which fits
  at any depth and is still rescaling invariant (φ_p is).

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs``, the network.
    params: the parameter tree ``apply_fn`` takes.
    example_input: a batch with the real input shape (array, ``jax.ShapeDtypeStruct`` or a
      pytree of them); only its shape and dtype are used.
    p: the exponent of the path norm, ``p >= 1`` (the paper uses 2).
    mask: optional tree of booleans like ``params``, or a callable returning one; leaves that
      are ``False`` are not path weights: they act as fixed constants in the path network and
      get ``κ = 1``.
    normalize: return κ/φ_p² (scale-free, finite at any depth) instead of κ.

  Returns:
    A tree like ``params`` (same structure and shapes) of κ in the compute dtype.

  Examples:
    >>> import jax.numpy as jnp, pathsgd_jax as psgd
    >>> def mlp(params, x):
    ...   h = jnp.maximum(x @ params["w1"], 0.0)
    ...   return h @ params["w2"]
    >>> params = {"w1": jnp.array([[1.0, 2.0]]), "w2": jnp.array([[3.0], [4.0]])}
    >>> kappa = psgd.path_scales(mlp, params, jnp.zeros((8, 1)))
    >>> kappa["w1"]  # κ(w1[0, j]) = w2[j]**2
    Array([[ 9., 16.]], dtype=float32)
    >>> kappa["w2"]  # κ(w2[j, 0]) = w1[0, j]**2
    Array([[1.],
           [4.]], dtype=float32)

  References:
    Neyshabur, Salakhutdinov & Srebro, `Path-SGD: Path-Normalized Optimization in Deep Neural
    Networks <https://arxiv.org/abs/1506.02617>`_, NIPS 2015.
  """
  net = PathNetwork(apply_fn, params, example_input, check_p(p), mask)
  scales = compute_scales(net, params, normalize=normalize, inputs=example_input)
  return net.treedef.unflatten(scales.kappa)


def path_norm(apply_fn: ApplyFn, params, example_input, *, p: float = 2.0, mask=None):
  r"""The ℓp path norm φ_p of a ReLU network.

  .. math::
     φ_p(w) = \Big(\sum_{\text{paths } π} \prod_{e \in π} |w_e|^p\Big)^{1/p},

  summed over every path from an input or a bias (a constant-1 node) to an output. It is
  invariant under the rescalings of hidden units that leave the network function unchanged.

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs``.
    params: the parameter tree.
    example_input: a batch with the real input shape (only shape and dtype are used).
    p: the exponent, ``p >= 1``.
    mask: leaves that are not path weights (see :func:`path_scales`).

  Returns:
    A scalar in the compute dtype (float32, or float64 with x64 enabled).

  Examples:
    >>> import jax.numpy as jnp, pathsgd_jax as psgd
    >>> params = {"w1": jnp.array([[1.0, 2.0]]), "w2": jnp.array([[3.0], [4.0]])}
    >>> mlp = lambda prm, x: jnp.maximum(x @ prm["w1"], 0.0) @ prm["w2"]
    >>> psgd.path_norm(mlp, params, jnp.zeros((1, 1)))  # sqrt(1*9 + 4*16)
    Array(8.5440035, dtype=float32)

  References:
    Neyshabur, Tomioka & Srebro, `Norm-Based Capacity Control in Neural Networks
    <https://arxiv.org/abs/1503.00036>`_, COLT 2015.
  """
  net = PathNetwork(apply_fn, params, example_input, check_p(p), mask)
  leaves = net.treedef.flatten_up_to(params)
  weights = [x for x, inc in zip(leaves, net.included) if inc]
  constants = [x for x, inc in zip(leaves, net.included) if not inc]
  # The true gradient of φ_p (a regulariser), not the κ rule's, for folded biases.
  interpreter = PathInterpreter(net.p, net.dtype, net.leaf_names, kappa_rule=False)
  mantissa, exponent, _ = net.path_sum(weights, constants, interpreter, inputs=example_input)
  total = times_pow2(mantissa, exponent)
  fits = jnp.isfinite(total) & (total > 0)
  # Outside the float range the root is taken in logs: φ_p itself may still fit.
  return jnp.where(fits, power(total, 1.0 / net.p),
                   jnp.exp(_log(mantissa, exponent, net.dtype) / net.p))
