r"""Matrix product operator (MPO) layers: a dense kernel as a chain of small cores.

A kernel ``W`` of shape ``(∏ I_k, ∏ J_k)`` (Flax convention ``y = x @ W``) is read as a tensor
``W[(i_1..i_n), (j_1..j_n)]`` and written as a product of cores

.. math::
   W[(i_1..i_n), (j_1..j_n)] = \sum_{d_1..d_{n-1}}
       \prod_{k=1}^{n} c_k[d_{k-1}, i_k, j_k, d_k], \qquad d_0 = d_n = 0.

**Core layout.** Core ``k`` (``k = 0..n-1`` in Python) has shape ``(D_k, I_k, J_k, D_{k+1})``
with ``D_0 = D_n = 1``: left bond, input mode, output mode, right bond.

**Index ordering.** Row and column indices are split row-major (C order): the input index is
``i = ((i_1 I_2 + i_2) I_3 + i_3) ...``, so ``x.reshape(..., I_1, ..., I_n)`` exposes the modes
of an input vector, and the same holds for the output index with ``J_k``.

**Bond dimensions.** Bond ``k`` (between cores ``k-1`` and ``k``) has dimension
``D_k = min(bond_dim, ∏_{l<k} I_l J_l, ∏_{l≥k} I_l J_l)``: the rank of that cut of a generic
kernel, so no parameter is wasted (:func:`bond_dims`). Parameters: ``Σ_k D_k I_k J_k D_{k+1}``
instead of ``∏ I_k ∏ J_k`` (:func:`compression_ratio`).

**Paths.** An MPO layer is a linear network whose bond indices are hidden units: contracting
the input with one core at a time (:func:`linear`) goes through intermediate nodes
``(j_1..j_k, d_k, i_{k+1}..i_n)``, and a path from input ``i`` to output ``j`` is fixed by its
bond indices ``d``. Its product is ``∏_k c_k[d_{k-1}, i_k, j_k, d_k]``, so the path network of
Path-SGD (``|c|^p`` in every core) is exact, every core entry lies at most once on each path,
and the gauge ``c_k ← c_k G``, ``c_{k+1} ← G^{-1} c_{k+1}`` with ``G`` diagonal positive is a
rescaling of hidden units, to which :func:`pathsgd_jax.path_sgd` is invariant
(:func:`gauge`). The contracted kernel is *not* that path network: its path sum adds the
products over ``d`` before taking ``|·|^p``.

References:
  Gao, Cheng, He, Xie, Zhao, Lu & Xiang, `Compressing deep neural networks by matrix product
  operators <https://arxiv.org/abs/1904.06194>`_, Phys. Rev. Research 2, 023300 (2020).

  Oseledets, *Tensor-Train Decomposition*, SIAM J. Sci. Comput. 33(5), 2011 (sequential SVD
  and its error bound).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

__all__ = (
    "MPODense",
    "MPOLinear",
    "bond_dims",
    "compression_ratio",
    "contract",
    "core_shapes",
    "decompose",
    "flops",
    "gauge",
    "linear",
    "num_params",
)

Initializer = Callable[..., jax.Array]


def _check_modes(in_modes, out_modes) -> tuple[tuple[int, ...], tuple[int, ...]]:
  modes = []
  for name, value in (("in_modes", in_modes), ("out_modes", out_modes)):
    try:
      value = tuple(operator.index(m) for m in value)
    except TypeError:
      raise ValueError(f"{name} must be a sequence of positive integers (the factors of the "
                       f"layer's size), got {value!r}.") from None
    if not value or any(m < 1 for m in value):
      raise ValueError(f"{name} must be a non-empty sequence of positive integers, got "
                       f"{value!r}.")
    modes.append(value)
  if len(modes[0]) != len(modes[1]):
    raise ValueError(f"in_modes {modes[0]} and out_modes {modes[1]} must have the same length "
                     "(one core per pair of modes); pad the shorter one with 1s.")
  return modes[0], modes[1]


def _check_bond(bond_dim) -> int:
  try:
    bond = operator.index(bond_dim)
  except TypeError:
    raise ValueError(f"bond_dim must be an integer >= 1, got {bond_dim!r}.") from None
  if bond < 1:
    raise ValueError(f"bond_dim must be >= 1, got {bond}.")
  return bond


def bond_dims(in_modes: Sequence[int], out_modes: Sequence[int],
              bond_dim: int) -> tuple[int, ...]:
  """The bond dimensions ``(D_0, ..., D_n)`` of an MPO, capped at the rank of each cut.

  Args:
    in_modes: ``(I_1, ..., I_n)``, the factors of the input size.
    out_modes: ``(J_1, ..., J_n)``, the factors of the output size.
    bond_dim: the largest bond dimension ``D``.

  Returns:
    ``(1, D_1, ..., D_{n-1}, 1)`` with ``D_k = min(D, ∏_{l<k} I_l J_l, ∏_{l≥k} I_l J_l)``.

  Examples:
    >>> from pathsgd_jax import mpo
    >>> mpo.bond_dims((4, 7, 7, 4), (4, 4, 4, 4), 16)
    (1, 16, 16, 16, 1)
    >>> mpo.bond_dims((2, 2), (1, 3), 100)  # capped at the rank of the cut
    (1, 2, 1)
  """
  in_modes, out_modes = _check_modes(in_modes, out_modes)
  bond = _check_bond(bond_dim)
  sizes = [i * j for i, j in zip(in_modes, out_modes)]
  dims = [1]
  for k in range(1, len(sizes)):
    dims.append(min(bond, math.prod(sizes[:k]), math.prod(sizes[k:])))
  return tuple(dims + [1])


def core_shapes(in_modes: Sequence[int], out_modes: Sequence[int],
                bond_dim: int) -> tuple[tuple[int, int, int, int], ...]:
  """The shapes ``(D_k, I_k, J_k, D_{k+1})`` of the cores (see :func:`bond_dims`).

  Examples:
    >>> from pathsgd_jax import mpo
    >>> mpo.core_shapes((4, 4), (2, 5), 3)
    ((1, 4, 2, 3), (3, 4, 5, 1))
  """
  dims = bond_dims(in_modes, out_modes, bond_dim)
  return tuple((dims[k], i, j, dims[k + 1])
               for k, (i, j) in enumerate(zip(in_modes, out_modes)))


def num_params(in_modes: Sequence[int], out_modes: Sequence[int], bond_dim: int) -> int:
  """Number of core entries, ``Σ_k D_k I_k J_k D_{k+1}`` (no bias)."""
  return sum(math.prod(s) for s in core_shapes(in_modes, out_modes, bond_dim))


def compression_ratio(in_modes: Sequence[int], out_modes: Sequence[int], bond_dim: int, *,
                      use_bias: bool = False) -> float:
  """Parameters of the MPO layer as a fraction of the dense layer's (the paper's ρ).

  Args:
    in_modes: ``(I_1, ..., I_n)``, the factors of the input size.
    out_modes: ``(J_1, ..., J_n)``, the factors of the output size.
    bond_dim: the largest bond dimension ``D`` (bonds are capped as in :func:`bond_dims`).
    use_bias: count a bias of ``∏ J_k`` entries in both layers.

  Returns:
    ``(Σ_k D_k I_k J_k D_{k+1} [+ ∏J]) / (∏ I_k ∏ J_k [+ ∏J])``; below 1 means compression.

  Examples:
    >>> from pathsgd_jax import mpo
    >>> round(mpo.compression_ratio((4, 7, 7, 4), (4, 4, 4, 4), 4), 5)  # 784 x 256, D = 4
    0.0051
  """
  rows, cols = math.prod(_check_modes(in_modes, out_modes)[0]), math.prod(out_modes)
  bias = cols if use_bias else 0
  return (num_params(in_modes, out_modes, bond_dim) + bias) / (rows * cols + bias)


def flops(in_modes: Sequence[int], out_modes: Sequence[int], bond_dim: int) -> int:
  r"""Floating-point operations of :func:`linear` per example (2 per multiply-add).

  .. math::
     2 \sum_k \Big(\prod_{l>k} I_l\Big) \Big(\prod_{l<k} J_l\Big) D_k I_k J_k D_{k+1},

  against ``2 ∏ I_k ∏ J_k`` for the dense layer: step ``k`` is a matrix product of the
  ``(∏_{l>k} I_l ∏_{l<k} J_l) × (D_k I_k)`` activation block with the ``(D_k I_k) × (J_k
  D_{k+1})`` core.

  Examples:
    >>> from pathsgd_jax import mpo
    >>> mpo.flops((4, 4), (4, 4), 1), 2 * 16 * 16  # rank-1 MPO vs dense
    (256, 512)
  """
  in_modes, out_modes = _check_modes(in_modes, out_modes)
  total = 0
  for k, shape in enumerate(core_shapes(in_modes, out_modes, bond_dim)):
    total += math.prod(in_modes[k + 1:]) * math.prod(out_modes[:k]) * math.prod(shape)
  return 2 * total


def decompose(kernel: jax.Array, in_modes: Sequence[int], out_modes: Sequence[int],
              bond_dim: int) -> list[jax.Array]:
  r"""Cores of an MPO approximating ``kernel``, by sequential truncated SVD.

  ``kernel`` (shape ``(∏ I_k, ∏ J_k)``) is reshaped to ``(I_1, ..., I_n, J_1, ..., J_n)``,
  permuted to ``(I_1, J_1, ..., I_n, J_n)``, and split from the left: at step ``k`` the
  remainder, reshaped to ``(D_k I_k J_k) × rest``, has its SVD truncated to ``D_{k+1}``
  singular values; ``U`` becomes core ``k`` and ``S Vᵀ`` the next remainder. Cores
  ``0..n-2`` are therefore left-orthonormal and the last core carries the norm.

  Exact (up to rounding) when no bond is truncated, e.g. ``bond_dim ≥ ∏ I_k J_k``. With
  truncation, the error is ``‖W - contract(cores)‖_F² = Σ_k ε_k²``, where ``ε_k`` is the norm
  of the singular values discarded at step ``k`` (the errors of the steps are orthogonal).
  In terms of ``W`` alone, with ``δ_k`` the norm of the singular values beyond ``D_k`` of the
  unfolding ``W[(i_1 j_1 .. i_{k-1} j_{k-1}), (i_k j_k ..)]``:
  ``max_k δ_k ≤ ‖W - contract(cores)‖_F ≤ (Σ_k δ_k²)^{1/2}``, with equality for two cores
  (Eckart–Young) .

  Args:
    kernel: a ``(∏ in_modes, ∏ out_modes)`` matrix.
    in_modes: ``(I_1, ..., I_n)``.
    out_modes: ``(J_1, ..., J_n)``.
    bond_dim: the largest bond dimension (capped as in :func:`bond_dims`).

  Returns:
    A list of ``n`` cores of shapes :func:`core_shapes`, in ``kernel``'s dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from pathsgd_jax import mpo
    >>> w = jax.random.normal(jax.random.key(0), (12, 6))
    >>> cores = mpo.decompose(w, (3, 4), (2, 3), bond_dim=6)
    >>> [c.shape for c in cores]
    [(1, 3, 2, 6), (6, 4, 3, 1)]
    >>> bool(jnp.allclose(mpo.contract(cores), w, atol=1e-5))
    True
  """
  in_modes, out_modes = _check_modes(in_modes, out_modes)
  shapes = core_shapes(in_modes, out_modes, bond_dim)
  kernel = jnp.asarray(kernel)
  expected = (math.prod(in_modes), math.prod(out_modes))
  if kernel.shape != expected:
    raise ValueError(f"kernel has shape {kernel.shape}, but in_modes {in_modes} and out_modes "
                     f"{out_modes} need {expected} (∏ in_modes, ∏ out_modes).")
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"kernel must be a floating-point array, got {kernel.dtype}.")
  n = len(in_modes)
  order = [a for k in range(n) for a in (k, n + k)]
  rest = jnp.transpose(kernel.reshape(in_modes + out_modes), order)
  cores = []
  for shape in shapes[:-1]:
    rows = math.prod(shape[:3])
    u, s, vt = jnp.linalg.svd(rest.reshape(rows, -1), full_matrices=False)
    r = shape[3]
    cores.append(u[:, :r].reshape(shape))
    rest = s[:r, None] * vt[:r]
  cores.append(rest.reshape(shapes[-1]))
  return cores


def _check_cores(cores) -> list[jax.Array]:
  cores = [jnp.asarray(c) for c in cores]
  if not cores:
    raise ValueError("cores must be a non-empty sequence of 4-d arrays.")
  for k, c in enumerate(cores):
    if c.ndim != 4:
      raise ValueError(f"core {k} has shape {c.shape}; every core must be 4-d "
                       "(left bond, input mode, output mode, right bond).")
  if cores[0].shape[0] != 1 or cores[-1].shape[3] != 1:
    raise ValueError(f"the outer bonds must have dimension 1, got {cores[0].shape[0]} (first "
                     f"core) and {cores[-1].shape[3]} (last core).")
  for k in range(1, len(cores)):
    if cores[k - 1].shape[3] != cores[k].shape[0]:
      raise ValueError(f"bond {k} does not match: core {k - 1} has right bond "
                       f"{cores[k - 1].shape[3]}, core {k} has left bond {cores[k].shape[0]}.")
  return cores


def contract(cores: Sequence[jax.Array]) -> jax.Array:
  """The dense kernel ``(∏ I_k, ∏ J_k)`` of an MPO (forms it: for tests and inspection).

  Examples:
    >>> import jax.numpy as jnp
    >>> from pathsgd_jax import mpo
    >>> a = jnp.arange(4.0).reshape(1, 2, 2, 1)  # two 1-bond cores: a Kronecker product
    >>> mpo.contract([a, jnp.ones((1, 1, 3, 1))]).shape
    (2, 6)
  """
  cores = _check_cores(cores)
  out = jnp.ones((1, 1, 1), jnp.result_type(*cores))
  for c in cores:
    rows, cols, _ = out.shape
    _, i, j, d = c.shape
    out = jnp.einsum("abx,xijy->aibjy", out, c).reshape(rows * i, cols * j, d)
  return out[:, :, 0]


def linear(x: jax.Array, cores: Sequence[jax.Array]) -> jax.Array:
  r"""``x @ contract(cores)`` computed one core at a time, never forming the kernel.

  The input ``(..., ∏ I_k)`` is reshaped to ``(B, I_1, ∏_{l>1} I_l, 1, D_0)``; step ``k``
  contracts the current block ``(B, I_k, ∏_{l>k} I_l, ∏_{l<k} J_l, D_k)`` with core ``k`` over
  ``(I_k, D_k)`` (one ``dot_general``) and reshapes the result to the next block. The largest
  intermediate holds ``B ∏_{l>k} I_l ∏_{l≤k} J_l D_{k+1}`` numbers; the cost is
  :func:`flops` per example.

  Args:
    x: inputs ``(..., ∏ I_k)``.
    cores: the cores (layout in the module docstring).

  Returns:
    ``(..., ∏ J_k)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from pathsgd_jax import mpo
    >>> w = jax.random.normal(jax.random.key(0), (12, 6))
    >>> cores = mpo.decompose(w, (3, 4), (2, 3), bond_dim=2)
    >>> x = jnp.ones((5, 12))
    >>> bool(jnp.allclose(mpo.linear(x, cores), x @ mpo.contract(cores), atol=1e-4))
    True
  """
  cores = _check_cores(cores)
  in_modes = tuple(c.shape[1] for c in cores)
  fan_in = math.prod(in_modes)
  if x.shape[-1] != fan_in:
    raise ValueError(f"the input's last axis has size {x.shape[-1]}, but the cores take "
                     f"{fan_in} = ∏ in_modes {in_modes} inputs.")
  lead = x.shape[:-1]
  batch = math.prod(lead)
  h = x.reshape(batch, in_modes[0], fan_in // in_modes[0], 1, 1)
  for k, c in enumerate(cores):
    # (B, I_k, R, L, D_k) . (D_k, I_k, J_k, D_{k+1}) -> (B, R, L, J_k, D_{k+1})
    h = lax.dot_general(h, c, (((1, 4), (1, 0)), ((), ())))
    _, rest, left, j, d = h.shape
    nxt = in_modes[k + 1] if k + 1 < len(cores) else 1
    h = h.reshape(batch, nxt, rest // nxt, left * j, d)
  return h.reshape(lead + (h.shape[3],))


def gauge(cores: Sequence[jax.Array], scales: Sequence[jax.Array]) -> list[jax.Array]:
  r"""Applies a diagonal gauge to the bonds: the same kernel, different cores.

  For each inner bond ``k = 1..n-1`` with positive factors ``g_k`` (length ``D_k``):
  ``c_{k-1}[..., d] ← c_{k-1}[..., d] g_k[d]`` and ``c_k[d, ...] ← c_k[d, ...] / g_k[d]``.
  This is a rescaling of the hidden units of the MPO's linear network (every unit with bond
  index ``d`` is scaled by ``g_k[d]``): ``contract`` and the path norm are unchanged.

  Args:
    cores: the cores.
    scales: ``n - 1`` positive vectors, one per inner bond.

  Returns:
    The gauged cores.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from pathsgd_jax import mpo
    >>> cores = mpo.decompose(jax.random.normal(jax.random.key(0), (4, 4)), (2, 2), (2, 2), 4)
    >>> moved = mpo.gauge(cores, [jnp.array([1.0, 10.0, 0.1, 2.0])])
    >>> bool(jnp.allclose(mpo.contract(moved), mpo.contract(cores), atol=1e-5))
    True
  """
  cores = _check_cores(cores)
  if len(scales) != len(cores) - 1:
    raise ValueError(f"gauge needs one scale vector per inner bond ({len(cores) - 1}), got "
                     f"{len(scales)}.")
  out = list(cores)
  for k, g in enumerate(scales, start=1):
    g = jnp.asarray(g, out[k].dtype)
    if g.shape != (out[k].shape[0],):
      raise ValueError(f"scale {k - 1} has shape {g.shape}; bond {k} has dimension "
                       f"{out[k].shape[0]}.")
    out[k - 1] = out[k - 1] * g[None, None, None, :]
    out[k] = out[k] / g[:, None, None, None]
  return out


def _broadcast(bias, y):
  return bias.reshape((1,) * (y.ndim - 1) + bias.shape)


def _core_std(shape, n, init_scale) -> float:
  # Var c_k = init_scale^(1/n) / (D_k I_k): Var W_ij = init_scale / ∏ I_k (see MPODense).
  return math.sqrt(init_scale ** (1.0 / n) / (shape[0] * shape[1]))


def _initial_cores(key, kernel_init, in_modes, out_modes, bond_dim, init_scale, dtype):
  shapes = core_shapes(in_modes, out_modes, bond_dim)
  if kernel_init is not None:
    kernel = kernel_init(key, (math.prod(in_modes), math.prod(out_modes)), dtype)
    return [c.astype(dtype) for c in decompose(kernel, in_modes, out_modes, bond_dim)]
  keys = jax.random.split(key, len(shapes))
  return [_core_std(s, len(shapes), init_scale) * jax.random.normal(k, s, dtype)
          for k, s in zip(keys, shapes)]


def _check_layer(in_modes, out_modes, bond_dim, in_features, out_features, init_scale):
  in_modes, out_modes = _check_modes(in_modes, out_modes)
  _check_bond(bond_dim)
  for name, size, modes in (("in_features", in_features, in_modes),
                            ("features", out_features, out_modes)):
    if size is not None and size != math.prod(modes):
      which = "in_modes" if name == "in_features" else "out_modes"
      raise ValueError(f"{name} = {size} but the product of {which} {modes} is "
                       f"{math.prod(modes)}; choose modes whose product is {size}.")
  if not init_scale > 0:
    raise ValueError(f"init_scale must be > 0, got {init_scale!r}.")
  return in_modes, out_modes


_LAYER_DOC = r"""
  The kernel ``W`` of shape ``(∏ in_modes, ∏ out_modes)`` is held as cores ``core_0 ..
  core_{n-1}`` (layout and bonds in :mod:`pathsgd_jax.mpo`) and never formed: the input is
  contracted with one core at a time (:func:`linear`), ``flops(in_modes, out_modes, bond_dim)``
  operations per example instead of ``2 ∏ I_k ∏ J_k``.

  **Initialisation.** Core ``k`` is drawn from ``N(0, s^{1/n} / (D_k I_k))`` (its fan-in,
  ``s = init_scale``). The products for different bond indices are uncorrelated, so
  ``Var W_ij = (∏_{k=1}^{n-1} D_k) ∏_k s^{1/n}/(D_k I_k) = s / ∏ I_k``: with ``s = 1`` the
  output variance ``‖x‖² / fan_in`` of Flax's default (LeCun normal) dense layer, ``s = 2`` He's
  rule. Each contraction step is then a variance-preserving dense map. With ``kernel_init``,
  a dense kernel ``kernel_init(key, (fan_in, features), param_dtype)`` is drawn instead and
  decomposed (:func:`decompose`, truncated to ``bond_dim``); pass ``lambda *_: w`` to start from
  a given kernel ``w``. The bias (``use_bias``) starts at ``bias_init``.
"""


class MPODense(nn.Module):
  __doc__ = ("""A Flax Linen dense layer whose kernel is a matrix product operator.
""" + _LAYER_DOC + r"""
  Attributes:
    features: output size, ``∏ out_modes``.
    in_modes: factors ``(I_1, ..., I_n)`` of the input size.
    out_modes: factors ``(J_1, ..., J_n)`` of ``features`` (use 1s to pad, e.g. ``(1, 10, 1, 1)``).
    bond_dim: the largest bond dimension ``D``.
    use_bias: add a bias of ``features`` entries (parameter ``bias``).
    init_scale: ``Var W_ij = init_scale / fan_in`` at random initialisation.
    kernel_init: optional dense-kernel initializer to decompose instead.
    bias_init: the bias initializer.
    dtype: computation dtype (default: from the inputs and parameters).
    param_dtype: parameter dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from pathsgd_jax import mpo
    >>> layer = mpo.MPODense(6, in_modes=(3, 4), out_modes=(2, 3), bond_dim=2)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 12)))["params"]
    >>> {k: v.shape for k, v in params.items()}
    {'core_0': (1, 3, 2, 2), 'core_1': (2, 4, 3, 1), 'bias': (6,)}
    >>> layer.apply({"params": params}, jnp.ones((5, 12))).shape
    (5, 6)

  References:
    Gao et al., `Compressing deep neural networks by matrix product operators
    <https://arxiv.org/abs/1904.06194>`_, Phys. Rev. Research 2, 023300 (2020).
  """)

  features: int
  in_modes: Sequence[int]
  out_modes: Sequence[int]
  bond_dim: int
  use_bias: bool = True
  init_scale: float = 1.0
  kernel_init: Initializer | None = None
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_modes, out_modes = _check_layer(self.in_modes, self.out_modes, self.bond_dim, None,
                                       self.features, self.init_scale)
    shapes = core_shapes(in_modes, out_modes, self.bond_dim)
    if jnp.shape(x)[-1] != math.prod(in_modes):
      raise ValueError(f"MPODense got inputs with last axis {jnp.shape(x)[-1]}, but in_modes "
                       f"{in_modes} multiply to {math.prod(in_modes)}.")
    if self.is_initializing():
      initial = _initial_cores(self.make_rng("params"), self.kernel_init, in_modes, out_modes,
                               self.bond_dim, self.init_scale, self.param_dtype)
    else:
      initial = [None] * len(shapes)
    cores = [self.param(f"core_{k}", lambda _key, c=c: c) for k, c in enumerate(initial)]
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    dtype = self.dtype or jnp.result_type(x, *cores)
    y = linear(jnp.asarray(x, dtype), [c.astype(dtype) for c in cores])
    return y if bias is None else y + _broadcast(bias.astype(dtype), y)


class MPOLinear(nnx.Module):
  __doc__ = ("""A Flax NNX linear layer whose kernel is a matrix product operator.

  The NNX counterpart of :class:`MPODense` (named after ``nnx.Linear`` as ``MPODense`` is after
  ``nn.Dense``); parameters ``core_0 .. core_{n-1}`` and ``bias`` are ``nnx.Param``.
""" + _LAYER_DOC + r"""
  Args:
    in_features: input size, ``∏ in_modes``.
    out_features: output size, ``∏ out_modes``.
    in_modes: factors ``(I_1, ..., I_n)`` of ``in_features``.
    out_modes: factors ``(J_1, ..., J_n)`` of ``out_features``.
    bond_dim: the largest bond dimension ``D``.
    use_bias: add a bias.
    init_scale: ``Var W_ij = init_scale / in_features`` at random initialisation.
    kernel_init: optional dense-kernel initializer to decompose instead.
    bias_init: the bias initializer.
    dtype: computation dtype (default: from the inputs and parameters).
    param_dtype: parameter dtype.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from pathsgd_jax import mpo
    >>> layer = mpo.MPOLinear(12, 6, (3, 4), (2, 3), bond_dim=2, rngs=nnx.Rngs(0))
    >>> layer.core_1[...].shape, layer(jnp.ones((5, 12))).shape
    ((2, 4, 3, 1), (5, 6))
  """)

  def __init__(self, in_features: int, out_features: int, in_modes: Sequence[int],
               out_modes: Sequence[int], bond_dim: int, *, use_bias: bool = True,
               init_scale: float = 1.0, kernel_init: Initializer | None = None,
               bias_init: Initializer = nn.initializers.zeros_init(), dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    in_modes, out_modes = _check_layer(in_modes, out_modes, bond_dim, in_features,
                                       out_features, init_scale)
    self.in_modes, self.out_modes, self.bond_dim = in_modes, out_modes, bond_dim
    self.num_cores = len(in_modes)
    self.dtype = dtype
    cores = _initial_cores(rngs.params(), kernel_init, in_modes, out_modes, bond_dim,
                           init_scale, param_dtype)
    for k, c in enumerate(cores):
      setattr(self, f"core_{k}", nnx.Param(c))
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    cores = [getattr(self, f"core_{k}")[...] for k in range(self.num_cores)]
    dtype = self.dtype or jnp.result_type(x, *cores)
    y = linear(jnp.asarray(x, dtype), [c.astype(dtype) for c in cores])
    return y if self.bias is None else y + _broadcast(self.bias[...].astype(dtype), y)
