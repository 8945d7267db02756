"""Path scales κ and path norms φ_p of a network, from its exact path network."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pathsgd_jax._pathnet import PathNetwork, check_p, power, power_leaf

ApplyFn = Callable[[Any, Any], Any]


def _split(net: PathNetwork, params):
  leaves = net.treedef.flatten_up_to(params)
  powered = [power_leaf(x, net.p, net.dtype) for x, inc in zip(leaves, net.included) if inc]
  constants = [x for x, inc in zip(leaves, net.included) if not inc]
  return leaves, powered, constants


def _gradient_of_path_sum(net: PathNetwork, params, interpreter=None):
  """(g(v), ∂g/∂v) at v = |θ|^p, and the flat leaves of params."""
  leaves, powered, constants = _split(net, params)
  value, grads = jax.value_and_grad(lambda v: net.path_sum(v, constants, interpreter))(powered)
  return value, grads, leaves


def _kappa_tree(net: PathNetwork, grads, leaves):
  grad_iter = iter(grads)
  kappas = []
  for x, inc in zip(leaves, net.included):
    if inc:
      g = next(grad_iter)
      # (∂g/∂v)^(2/p); for p = 2, the paper's setting, the power is the identity.
      kappas.append(power(g, 2.0 / net.p))
    else:
      kappas.append(jnp.ones(jnp.shape(x), net.dtype))
  return jax.tree_util.tree_unflatten(net.treedef, kappas)


def path_scales(apply_fn: ApplyFn, params, example_input, *, p: float = 2.0, mask=None):
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
  not grow with the batch size.

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs``, the network.
    params: the parameter tree ``apply_fn`` takes.
    example_input: a batch with the real input shape (array, ``jax.ShapeDtypeStruct`` or a
      pytree of them); only its shape and dtype are used.
    p: the exponent of the path norm, ``p >= 1`` (the paper uses 2).
    mask: optional tree of booleans like ``params``, or a callable returning one; leaves that
      are ``False`` are not path weights: they act as fixed constants in the path network and
      get ``κ = 1``.

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
  _, grads, leaves = _gradient_of_path_sum(net, params)
  return _kappa_tree(net, grads, leaves)


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
  _, powered, constants = _split(net, params)
  total = net.path_sum(powered, constants)
  return total ** (1.0 / net.p)
