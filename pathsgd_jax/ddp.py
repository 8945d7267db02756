r"""Data-dependent path normalisation: DDP-SGD and DDP-Normalization.

A reconstruction of Neyshabur, Tomioka, Salakhutdinov & Srebro, *Data-Dependent Path
Normalization in Neural Networks* (ICLR 2016) from its stated framework; the paper's own
equations were not available when this was written. What is the paper's: every node ``v``
has a complexity :math:`γ_v^2 = w_{→v}^\top R_v\, w_{→v}`, a diagonal :math:`R_v` of the
incoming nodes' :math:`γ^2` gives the path norm (Path-SGD), the second-moment matrix of the
incoming activations gives BatchNorm's per-unit scale, a parameter α ∈ [0, 1] interpolates;
DDP-Normalization divides each unit by its γ; DDP-SGD is an approximate steepest descent
for the network's complexity, invariant to node rescalings for every α, a diagonal natural
gradient at full data dependence. What is ours (hypotheses and derivation):

**Complexity.** :math:`R_v = α\,C_v + (1-α)\,\mathrm{diag}(γ_u^2)` with
:math:`C_v = \mathbb E_B[h h^\top]` the *uncentred* second moment over the current batch B
of v's incoming activations h (a bias is an edge from a constant node, h = 1, γ = 1; the
inputs have γ = 1). Since :math:`w^\top C_v w = \mathbb E_B[z_v^2]`, with z_v v's real
pre-activation,

.. math::
   γ_v^2 = α\,\mathbb E_B[z_v^2] + (1-α) \sum_u w_{uv}^2 γ_u^2, \qquad
   γ_{net}^2 = \sum_{\text{outputs } o} γ_o^2,

where the units are the ReLU inputs and the outputs. α = 0 is the squared ℓ2 path norm
:math:`φ_2^2`; under a node rescaling every :math:`γ_v` is covariant (C_v scales with h).

**DDP-SGD.** As in Path-SGD with p = 2 (κ = ½ ∂²φ₂²/∂w_e²), each gradient is divided by
:math:`κ_e(α) = ½\,∂^2 γ_{net}^2/∂w_e^2`. Let :math:`β_v = ∂γ_{net}^2/∂γ_v^2` with the data
terms held fixed (a backward pass: :math:`β_o = 1`,
:math:`β_v = (1-α)\sum_c w_{vc}^2 β_c`). In a feed-forward ReLU net a weight ``e = u→v``
occurs once on every path and every pre-activation is piecewise linear in it, so the
diagonal of the Hessian is exactly (almost everywhere)

.. math::
   κ_e = (1-α)\, γ_u^2\, β_v + α\, \mathbb E_B\Big[h_u^2 \sum_{v' \succeq v} β_{v'}
         \big(∂z_{v'}/∂z_v\big)^2\Big].

The second factor needs, per example, squared Jacobians of later pre-activations: that is
K or more backward passes. **The approximation**: the squared Jacobian is replaced by the
sum over paths of the squared products, the backward recursion
:math:`S_v(x) = β_v + g_v(x)^2 \sum_c w_{vc}^2 S_c(x)` (g the ReLU's slope at z_v(x)); the
cross terms between different paths from v to v' are dropped (the Becker–LeCun diagonal).
It is exact wherever only one path joins v to each later unit (all weights of a net with
one hidden layer, and the last two layers of any MLP) and rescaling invariant always.

**Relation to the Fisher.** At α = 1, β vanishes except at the outputs and
:math:`κ_e = \mathbb E_B[h_u^2 \sum_o (∂f_o/∂z_v)^2] = \mathbb E_B[\sum_o (∂f_o/∂w_e)^2]`
(exact on one hidden layer, path-diagonal beyond): the diagonal of the Gauss–Newton matrix
of the squared loss, i.e. the diagonal Fisher of a unit-variance Gaussian output model.
For softmax cross-entropy the Fisher weighs the outputs by diag(p) − ppᵀ instead of the
identity: there DDP-SGD at α = 1 is a data-dependent diagonal metric, not the Fisher.

**Cost and implementation.** One batch-1 forward/backward pass of the path network (with
γ² mixed at every ReLU through a `PathInterpreter` subclass: the first term and β), one
forward pass of the real network on the batch that records each ReLU's input and output
(:math:`\mathbb E_B[z_v^2]`, h², g²), and the backward pass of the path network on the batch
(the second term): its ReLUs output the real h², so XLA drops its forward products and runs
only the recursion S_v and the products :math:`\mathbb E_B[h_u^2 S_v]`, one more backward
pass of the network. Inside a jitted train step the recording is the step's own forward
pass (XLA merges the two). The gated pass is not renormalised by powers of two (that would
read its forward values): its values are real, h² and :math:`S_v \le (d+1)\,β_v/(1-α)^d`
(d layers between v and the outputs; :math:`S_v ≈ \sum_o (∂f_o/∂z_v)^2` at α = 1), plain
floats like the h² and β they come from. Measured on the CPU (``pathsgd-jax bench
--ddp-alphas``, README): a DDP-SGD step costs 1.5–1.6× SGD's on an MLP and 1.5–1.8× on a
small CNN. α = 0 skips the last two passes; α = 1 skips the first. Train-mode BatchNorm is
folded at the batch's statistics as in Path-SGD (`inputs=`). Networks with a ReLU inside a
``lax.scan`` or ``lax.cond`` (RNNs) are not supported.

**DDP-Normalization** is :class:`DDPDense` (Linen) / :class:`DDPLinear` (NNX): a dense layer
whose units are divided by their γ, computed with normalised inputs (γ_u = 1):
:math:`γ_v^2 = α\,\mathbb E_B[z_v^2] + (1-α)(\lVert w_{→v}\rVert^2 + b_v^2)`; at α = 1
with ``centered=True`` it is BatchNorm without its affine part.

References:
  Neyshabur, Tomioka, Salakhutdinov & Srebro, `Data-Dependent Path Normalization in Neural
  Networks <https://arxiv.org/abs/1511.06747>`_, ICLR 2016.
  Neyshabur, Salakhutdinov & Srebro, `Path-SGD <https://arxiv.org/abs/1506.02617>`_, 2015.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from pathsgd_jax import _recorder
from pathsgd_jax._errors import PathNetworkError, UnsupportedOperationError
from pathsgd_jax._interpreter import PathInterpreter
from pathsgd_jax._numerics import times_pow2
from pathsgd_jax._pathnet import PathNetwork
from pathsgd_jax._scales import ApplyFn, _log_mantissa
from pathsgd_jax._transform import _check_number, _safe_divide

__all__ = ["DDPDense", "DDPLinear", "ScaleByDDPState", "ddp_scales", "ddp_sgd",
           "scale_by_ddp"]

_NO_INPUTS = (
    "DDP-SGD's preconditioner depends on the current batch (second moments of the "
    "pre-activations): pass it to the update, `tx.update(grads, opt_state, params, inputs=x)` "
    "(nnx: `optimizer.update(model, grads, inputs=x)`).")


class _DDPSiteFinder(_recorder._SiteFinder):  # pylint: disable=protected-access
  """The ReLU sites of a DDP network (leaky ReLUs included: DDP reads their slope).

  A ReLU inside ``lax.scan`` or a ``lax.cond`` branch is rejected: its data statistics are
  not those of one unit of a feed-forward network.
  """

  def __init__(self, dtype, leaf_names, p):
    super().__init__(dtype, leaf_names, False, p=p, gates_only=False)
    self._cond_depth = 0

  def _cond(self, eqn, invals):
    self._cond_depth += 1
    try:
      return super()._cond(eqn, invals)
    finally:
      self._cond_depth -= 1

  def activation(self, eqn, val, role):
    if self.loop_depth:
      raise UnsupportedOperationError(
          f"DDP-SGD does not support a ReLU inside a lax.scan (at {self.where(eqn)}): its "
          "data statistics are per unit of a feed-forward network. Use path_sgd for RNNs.")
    if self._cond_depth:
      raise UnsupportedOperationError(
          f"DDP-SGD cannot locate the ReLU at {self.where(eqn)} in the real network (it is "
          "inside a lax.cond branch): keep ReLUs of a DDP network outside control flow.")
    return super().activation(eqn, val, role)


class _ComplexityInterpreter(PathInterpreter):
  """The batch-1 path network with γ² mixed in at every ReLU (see the module docstring).

  ``keys`` maps the `_recorder.site_key` of each ReLU to the key of ``data`` and ``eps``:
  a unit's path value P_v becomes (1−α)·P_v + α·E_B[z_v²] + ε_v (ε = 0, differentiated
  for β).
  """

  def __init__(self, *args, keys, alpha, data, eps, **kwargs):
    super().__init__(*args, **kwargs)
    self.keys, self.alpha, self.data, self.eps = keys, alpha, data, eps

  def activation(self, eqn, val, role):
    key = _site(self, eqn)
    self.note(eqn, "relu (ddp)", val.value, [])
    val = self.flush(val)
    source = self.eps[key]
    if self.alpha:  # at α = 0 no batch was recorded
      source = source + self.alpha * self.data[key]["second_moment"]
    value = (1 - self.alpha) * val.value + times_pow2(source, -val.log_scale)
    value, log_scale = self.normalise(value, val.log_scale)
    return dataclasses.replace(val, value=value, log_scale=log_scale)


class _GatedInterpreter(PathInterpreter):
  """The path network on the batch, run for its backward pass only (the data term).

  Every ReLU's output is the real h² of the batch (`_gate`), so the path values that feed a
  ReLU are never used and XLA drops the forward products that make them: what is left is
  the backward recursion S_v = β_v + g_v² Σ_c w_vc² S_c and the products E_B[h_u² S_v] of
  κ's data term, about one backward pass of the network.
  """

  def __init__(self, *args, keys, data, beta, **kwargs):
    super().__init__(*args, **kwargs)
    self.keys, self.data, self.beta = keys, data, beta

  def normalise(self, value, log_scale):
    # Renormalising would read the path values, i.e. compute the forward pass. The values
    # used are real ones, h² and S (bounded by β, see the module docstring).
    return value, log_scale

  def activation(self, eqn, val, role):
    key = _site(self, eqn)
    self.note(eqn, "relu (ddp, gated)", val.value, [])
    val = self.flush(val)
    data = self.data[key]
    value = _gate(val.value, data["h2"], data["g2"], self.beta[key],
                  jnp.asarray(val.log_scale, self.dtype))
    return dataclasses.replace(val, value=value, log_scale=0.0)


def _site(interp, eqn):
  key = interp.keys.get(_recorder.site_key(interp, eqn))
  if key is None:
    raise PathNetworkError("apply_fn traces to a different program at the batch size of "
                           "`inputs`; DDP-SGD cannot match its ReLUs.")
  return key


@jax.custom_vjp
def _gate(path_value, h2, g2, beta, log_scale):
  """A ReLU of the gated pass: the real h² forward, without reading the path value; its
  backward is the recursion's S_v = β_v + g_v² S_out, in the path value's units 2^log_scale."""
  del path_value, g2, beta, log_scale
  return h2


def _gate_fwd(path_value, h2, g2, beta, log_scale):
  del path_value
  return h2, (g2, beta, log_scale)


def _gate_bwd(residuals, cotangent):
  g2, beta, log_scale = residuals
  return (times_pow2(g2 * cotangent + beta, log_scale), None, None, None, None)


_gate.defvjp(_gate_fwd, _gate_bwd)


def _record(batched, args, sites, batched_sites):
  """Runs the batched trace on real ``args``: {site key: (pre-activation, output)}, keyed
  by the batch-1 ``sites`` whose positions ``batched_sites`` hold."""
  source_key = {b.key: s.key for s, b in zip(sites, batched_sites)}
  found = {}

  def hook(site, invals):
    outs = _recorder._bind(site.eqn, invals)  # pylint: disable=protected-access
    found[source_key[site.key]] = (invals[site.operand], outs[0])
    return outs

  _recorder.evaluate(batched, args, batched_sites, hook)
  return found


def _statistics(found, dtype):
  """Per ReLU site: E_B[z²] (batch axis kept, size 1), h² and the squared slope g²."""
  data = {}
  for key, (z, a) in found.items():
    z, a = (lax.stop_gradient(jnp.asarray(t, dtype)) for t in (z, a))
    slope = jnp.where(z != 0, a / jnp.where(z != 0, z, 1), 0)
    data[key] = {"second_moment": _batch_mean(z * z), "h2": a * a, "g2": slope * slope}
  return data


def _batch_mean(t):
  """The mean over the leading (batch) axis, kept, as a (1 × B)·(B × rest) product:
  XLA:CPU reduces a leading axis column by column (strided); κ(0.5) of the benchmark's CNN
  took 52 ms with that reduction, 46 ms with this."""
  n = t.shape[0]
  # HIGHEST: TPUs (and TF32 GPUs) would otherwise round the products of this f32 sum.
  total = jnp.matmul(jnp.ones((1, n), t.dtype), t.reshape(n, -1),
                     precision=lax.Precision.HIGHEST)
  return total.reshape((1,) + t.shape[1:]) / n


def _check_alpha(alpha):
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
    raise ValueError(f"alpha must be a Python number in [0, 1] (static: it decides which "
                     f"passes run), got {alpha!r}.")
  _check_number("alpha", alpha, low=0.0, high=1.0)
  return float(alpha)


def _check_inputs(inputs):
  if inputs is None:
    raise ValueError(_NO_INPUTS)
  leaves = jax.tree.leaves(inputs)
  if not leaves or any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
    raise ValueError("DDP-SGD needs the real batch as `inputs` (arrays, not shapes). "
                     + _NO_INPUTS)
  return leaves


def compute_ddp_scales(net: PathNetwork, params, inputs, alpha: float) -> list[jax.Array]:
  """κ(α) per leaf of ``net`` (ones for excluded leaves), see the module docstring."""
  input_leaves = _check_inputs(inputs)
  leaves = net.treedef.flatten_up_to(params)
  weights = [x for x, inc in zip(leaves, net.included) if inc]
  constants = [x for x, inc in zip(leaves, net.included) if not inc]
  dtype = net.dtype
  kwargs = dict(p=net.p, dtype=dtype, leaf_names=net.leaf_names)
  finder = _DDPSiteFinder(dtype, net.leaf_names, net.p)
  jax.eval_shape(lambda w: net.path_sum(w, constants, finder, inputs=inputs)[0], weights)
  sites = [s for s in finder.sites.values() if s.kind == "relu"]
  # α = 0 reads nothing of the batch: no recording (0·E_B[z²] would still be computed).
  batch = _Batch(net, sites, leaves + input_leaves, inputs) if alpha > 0 else None
  kappa = [jnp.zeros(jnp.shape(w), dtype) for w in weights]
  zeros = {s.key: jnp.zeros(s.eqn.invars[s.operand].aval.shape, dtype) for s in sites}
  beta = zeros  # α = 1: no path term
  if alpha < 1:

    def log_mantissa(deltas, eps):
      interp = _ComplexityInterpreter(keys={s.key: s.key for s in sites}, alpha=alpha,
                                      data=batch.data if batch else None, eps=eps, **kwargs)
      return _log_mantissa(*net.path_sum(weights, constants, interp, deltas=deltas,
                                         inputs=inputs))

    deltas = [jnp.zeros_like(w, dtype=dtype) for w in weights]
    (_, (mantissa, exponent, gradient_exponents)), (d_weights, d_eps) = jax.value_and_grad(
        log_mantissa, argnums=(0, 1), has_aux=True)(deltas, zeros)
    kappa = [(1 - alpha) * times_pow2(g * mantissa, ge + exponent)
             for g, ge in zip(d_weights, gradient_exponents)]
    beta = {key: (1 - alpha) * times_pow2(g * mantissa, exponent) for key, g in d_eps.items()}
  if alpha > 0:
    data_term = batch.data_term(weights, constants, beta, kwargs)
    kappa = [k + (alpha / batch.size) * g for k, g in zip(kappa, data_term)]
  out, it = [], iter(kappa)
  for x, inc in zip(leaves, net.included):
    out.append(next(it) if inc else jnp.ones(jnp.shape(x), dtype))
  return out


class _Batch:
  """The network traced at the batch's shape, its ReLUs' statistics on the batch (``data``)
  and the gated pass that gives κ's data term."""

  def __init__(self, net, sites, args, inputs):
    struct = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)),
                          inputs)
    batched = net._batched_trace(struct)  # pylint: disable=protected-access
    batched_sites = _recorder.translate(sites, net.closed_jaxpr, batched)
    if (len(batched.jaxpr.eqns) != len(net.closed_jaxpr.jaxpr.eqns)
        or batched_sites is None):
      raise PathNetworkError("apply_fn traces to a different program at the batch size of "
                             "`inputs`; DDP-SGD cannot match its ReLUs.")
    self.data = _statistics(_record(batched, args, sites, batched_sites), net.dtype)
    self.keys = {b.key: s.key for s, b in zip(sites, batched_sites)}
    self.net = copy.copy(net)
    self.net.closed_jaxpr, self.net.input_struct = batched, struct
    self.net._shiftable = frozenset()  # pylint: disable=protected-access
    self.inputs = inputs
    self.size = np.shape(jax.tree.leaves(inputs)[0])[0]

  def data_term(self, weights, constants, beta, kwargs):
    """Σ_B h_u² S_v per edge: the gradient of the gated pass (`_GatedInterpreter`)."""
    dtype = self.net.dtype
    sources = [jnp.square(jnp.asarray(x, dtype)) for x in jax.tree.leaves(self.inputs)]

    def gated_sum(deltas):
      interp = _GatedInterpreter(keys=self.keys, data=self.data, beta=beta, **kwargs)
      mantissa, exponent, _ = self.net.path_sum(weights, constants, interp, deltas=deltas,
                                                inputs=self.inputs, sources=sources)
      return times_pow2(mantissa, exponent)

    return jax.grad(gated_sum)([jnp.zeros_like(w, dtype=dtype) for w in weights])


def ddp_scales(apply_fn: ApplyFn, params, inputs, *, alpha: float, mask=None):
  r"""Per-parameter DDP-SGD scales κ(α) of a ReLU network on the batch ``inputs``.

  :math:`κ_e(α) = (1-α)\,γ_u^2 β_v + α\,\mathbb E_B[h_u^2 S_v]` for an edge ``u→v``: half the
  diagonal of the Hessian of the data-dependent complexity :math:`γ_{net}^2` (the module
  docstring gives the derivation and its one approximation). α = 0 is :func:`path_scales`
  at p = 2; α = 1 the path-diagonal Gauss–Newton :math:`\mathbb E_B[\sum_o (∂f_o/∂w_e)^2]`.

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs``, a feed-forward ReLU network.
    params: its parameter tree.
    inputs: the batch (real arrays): its pre-activation statistics enter κ for α > 0.
    alpha: data dependence in [0, 1] (a static Python number).
    mask: leaves that are not path weights (κ = 1), as in :func:`path_scales`.

  Returns:
    A tree like ``params`` of κ, in float32 (float64 with x64).

  Examples:
    >>> import jax.numpy as jnp, pathsgd_jax as psgd
    >>> mlp = lambda prm, x: jnp.maximum(x @ prm["w1"], 0.0) @ prm["w2"]
    >>> params = {"w1": jnp.array([[1.0, -2.0]]), "w2": jnp.array([[3.0], [4.0]])}
    >>> x = jnp.array([[1.0], [-1.0]])  # unit 0 is on for x = 1, unit 1 for x = -1
    >>> psgd.ddp_scales(mlp, params, x, alpha=1.0)["w2"]  # E[h_j^2] = [0.5, 2]
    Array([[0.5],
           [2. ]], dtype=float32)
    >>> psgd.ddp_scales(mlp, params, x, alpha=0.0)["w1"]  # w2**2, as path_scales
    Array([[ 9., 16.]], dtype=float32)

  References:
    Neyshabur, Tomioka, Salakhutdinov & Srebro, `Data-Dependent Path Normalization in
    Neural Networks <https://arxiv.org/abs/1511.06747>`_, ICLR 2016 (reconstructed).
  """
  alpha = _check_alpha(alpha)
  _check_inputs(inputs)
  net = PathNetwork(apply_fn, params, inputs, 2.0, mask)
  return net.treedef.unflatten(compute_ddp_scales(net, params, inputs, alpha))


class ScaleByDDPState(NamedTuple):
  """State of :func:`scale_by_ddp`.

  Attributes:
    count: number of updates made so far (int32 scalar). κ is recomputed from the params and
      the batch at every step, so nothing else is kept.
  """

  count: chex.Array


def scale_by_ddp(apply_fn: ApplyFn, example_input: Any, *, alpha: float,
                 mask: Any = None) -> optax.GradientTransformationExtraArgs:
  r"""Divides each update by its DDP scale κ(α), from the current params and batch.

  .. math:: u_e \leftarrow u_e / κ_e(α; w, B)

  (see :func:`ddp_scales`); entries with κ = 0 (no live path) get 0. Followed by a learning
  rate this is DDP-SGD; momentum after it keeps trajectories rescaling invariant.

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs``; ``params`` is the tree this receives.
    example_input: a batch with the real input shape (shape and dtype only, for tracing).
    alpha: data dependence in [0, 1]: 0 is Path-SGD (p = 2), 1 a diagonal Gauss–Newton.
    mask: leaves that are not path weights (their updates pass through unscaled).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update(grads, state, params, *,
    inputs)`` needs ``params`` and the current batch ``inputs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, pathsgd_jax as psgd
    >>> mlp = lambda prm, x: jnp.maximum(x @ prm["w1"], 0.0) @ prm["w2"]
    >>> params = {"w1": jnp.array([[1.0, -2.0]]), "w2": jnp.array([[3.0], [4.0]])}
    >>> x = jnp.array([[1.0], [-1.0]])
    >>> tx = optax.chain(psgd.scale_by_ddp(mlp, x, alpha=1.0), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params,
    ...                            inputs=x)
    >>> updates["w2"]  # -0.1 / E[h^2]
    Array([[-0.2 ],
           [-0.05]], dtype=float32)
  """
  alpha = _check_alpha(alpha)
  if not callable(apply_fn):
    raise ValueError(f"apply_fn must be callable as apply_fn(params, x), got {apply_fn!r}.")

  def init_fn(params):
    del params
    return ScaleByDDPState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, inputs=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("scale_by_ddp needs the current parameters: call "
                       "`tx.update(grads, opt_state, params, inputs=x)`.")
    _check_inputs(inputs)
    net = PathNetwork(apply_fn, params, example_input, 2.0, mask)
    kappa = compute_ddp_scales(net, params, inputs, alpha)
    treedef = jax.tree.structure(updates)
    directions = list(map(_safe_divide, treedef.flatten_up_to(updates), kappa))
    return treedef.unflatten(directions), ScaleByDDPState(
        optax.safe_int32_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ddp_sgd(learning_rate: optax.ScalarOrSchedule, apply_fn: ApplyFn, example_input: Any, *,
            alpha: float, momentum: float | None = None, nesterov: bool = False,
            mask: Any = None) -> optax.GradientTransformationExtraArgs:
  r"""DDP-SGD: SGD preconditioned by the data-dependent path scales κ(α).

  .. math:: w_e \leftarrow w_e - η\, \frac{∂L/∂w_e}{κ_e(α; w, B)}

  with κ recomputed from the current weights and batch B at every step (:func:`ddp_scales`).
  Invariant under node rescalings of a ReLU network for every α; α = 0 is Path-SGD.

  Args:
    learning_rate: a scalar or an :data:`optax.Schedule`.
    apply_fn: ``apply_fn(params, x) -> outputs``.
    example_input: a batch with the real input shape (shape and dtype only).
    alpha: data dependence in [0, 1] (static).
    momentum: optional heavy-ball momentum on the preconditioned direction.
    nesterov: use Nesterov momentum.
    mask: leaves that are not path weights (their gradient passes through unscaled).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` requires ``params`` and
    ``inputs=`` the batch.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, pathsgd_jax as psgd
    >>> mlp = lambda prm, x: jnp.maximum(x @ prm["w1"], 0.0) @ prm["w2"]
    >>> params = {"w1": jnp.array([[1.0, -2.0]]), "w2": jnp.array([[3.0], [4.0]])}
    >>> x, y = jnp.array([[1.0], [-1.0]]), jnp.zeros((2, 1))
    >>> loss = lambda prm: jnp.mean((mlp(prm, x) - y) ** 2)
    >>> tx = psgd.ddp_sgd(0.1, mlp, x, alpha=0.5, momentum=0.9)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params, inputs=x)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 36.5)
    True

  References:
    Neyshabur, Tomioka, Salakhutdinov & Srebro, `Data-Dependent Path Normalization in
    Neural Networks <https://arxiv.org/abs/1511.06747>`_, ICLR 2016 (reconstructed).
  """
  if momentum is not None:
    _check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
  if not callable(learning_rate):
    _check_number("learning_rate", learning_rate, low=0.0, low_open=True)
  return optax.chain(
      scale_by_ddp(apply_fn, example_input, alpha=alpha, mask=mask),
      optax.trace(decay=momentum, nesterov=nesterov) if momentum is not None
      else optax.identity(),
      optax.scale_by_learning_rate(learning_rate))



# ---------------------------------------------------------------------- DDP-Normalization
def _ddp_normalize(z, kernel, bias, stats, *, alpha, centered, epsilon):
  """z / γ with γ² = α·(second moment or variance) + (1−α)·(‖w_→v‖² + b_v²); z centred
  first when ``centered``. ``stats`` = (mean, second moment) per unit."""
  mean, second = stats
  data = second - mean * mean if centered else second
  path = jnp.sum(jnp.square(kernel), axis=tuple(range(kernel.ndim - 1)))
  if bias is not None:
    path = path + jnp.square(bias)
  gamma2 = alpha * data + (1 - alpha) * path
  def row(v):
    return jnp.reshape(v, (1,) * (z.ndim - 1) + (-1,))
  return ((z - row(mean)) if centered else z) * row(lax.rsqrt(gamma2 + epsilon))


def _affine(x, kernel, bias):
  z = x @ kernel
  return z if bias is None else z + jnp.reshape(bias, (1,) * (z.ndim - 1) + (-1,))


def _moments(z):
  axes = tuple(range(z.ndim - 1))
  return jnp.mean(z, axes), jnp.mean(jnp.square(z), axes)


def _check_norm(alpha, momentum, epsilon):
  _check_alpha(alpha)
  _check_number("momentum", momentum, low=0.0, high=1.0)
  _check_number("epsilon", epsilon, low=0.0)


import flax.linen as _nn  # noqa: E402  pylint: disable=wrong-import-position
from flax import nnx as _nnx  # noqa: E402  pylint: disable=wrong-import-position


class DDPDense(_nn.Module):
  r"""DDP-Normalization (Linen): a dense layer whose units are divided by their complexity γ.

  .. math::
     z = x W + b, \quad γ_v^2 = α\,\mathbb E_B[z_v^2] + (1-α)\big(\lVert W_{:,v}\rVert^2
     + b_v^2\big), \quad y_v = z_v / \sqrt{γ_v^2 + ε},

  the layer-wise form of the DDP complexity when the layer's inputs are themselves
  normalised units (γ_u = 1) or the network's inputs. α = 0 divides each unit by its path
  norm, α = 1 by the root mean square of its batch pre-activation; ``centered=True`` uses
  the variance and subtracts the mean, so α = 1 is BatchNorm without scale and shift. The
  output is invariant under any positive rescaling of the layer's incoming weights and bias.
  Apply the ReLU after it. Batch statistics live in the ``batch_stats`` collection (running
  averages for ``use_running_average=True``, as :class:`flax.linen.BatchNorm`).

  Attributes:
    features: number of units.
    alpha: data dependence in [0, 1].
    use_bias: whether the layer has a bias.
    centered: use the variance (and centre z) instead of the second moment.
    use_running_average: read the running statistics instead of the batch's.
    momentum: decay of the running statistics.
    epsilon: added to γ² before the square root.

  Examples:
    >>> import jax, jax.numpy as jnp, pathsgd_jax as psgd
    >>> layer = psgd.ddp.DDPDense(4, alpha=1.0)
    >>> x = jax.random.normal(jax.random.key(0), (32, 3))
    >>> variables = layer.init(jax.random.key(1), x, use_running_average=False)
    >>> y, _ = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    >>> bool(jnp.allclose(jnp.mean(y ** 2, axis=0), 1.0, atol=1e-4))
    True
  """

  features: int
  alpha: float
  use_bias: bool = True
  centered: bool = False
  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  kernel_init: Any = _nn.initializers.lecun_normal()

  @_nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    _check_norm(self.alpha, self.momentum, self.epsilon)
    frozen = _nn.merge_param("use_running_average", self.use_running_average,
                             use_running_average)
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    bias = self.param("bias", _nn.initializers.zeros, (self.features,)) if self.use_bias else None
    z = _affine(x, kernel, bias)
    mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,), z.dtype)
    second = self.variable("batch_stats", "second_moment", jnp.ones, (self.features,), z.dtype)
    if frozen:
      stats = (mean.value, second.value)
    else:
      stats = _moments(z)
      if not self.is_initializing():
        mean.value = self.momentum * mean.value + (1 - self.momentum) * stats[0]
        second.value = self.momentum * second.value + (1 - self.momentum) * stats[1]
    return _ddp_normalize(z, kernel, bias, stats, alpha=self.alpha, centered=self.centered,
                          epsilon=self.epsilon)


class DDPLinear(_nnx.Module):
  r"""DDP-Normalization (NNX): :class:`DDPDense` as an ``nnx.Module``.

  Running statistics are ``nnx.BatchStat`` variables; ``model.train()`` / ``model.eval()``
  switch ``use_running_average`` as for ``nnx.BatchNorm``.

  Args:
    in_features: input size.
    out_features: number of units.
    alpha: data dependence in [0, 1].
    use_bias, centered, use_running_average, momentum, epsilon: as in :class:`DDPDense`.
    rngs: ``nnx.Rngs`` for the kernel's initialisation (LeCun normal).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import pathsgd_jax as psgd
    >>> layer = psgd.ddp.DDPLinear(3, 4, alpha=0.0, rngs=nnx.Rngs(0))
    >>> y = layer(jnp.ones((8, 3)))  # z / ‖w_→v‖ (zero bias)
    >>> bool(jnp.allclose(y[0], jnp.sum(layer.kernel.value, 0)
    ...                   / jnp.linalg.norm(layer.kernel.value, axis=0), atol=1e-4))
    True
  """

  def __init__(self, in_features: int, out_features: int, *, alpha: float,
               use_bias: bool = True, centered: bool = False,
               use_running_average: bool = False, momentum: float = 0.99,
               epsilon: float = 1e-5, rngs: _nnx.Rngs):
    _check_norm(alpha, momentum, epsilon)
    self.alpha, self.centered, self.epsilon, self.momentum = alpha, centered, epsilon, momentum
    self.use_running_average = use_running_average
    self.kernel = _nnx.Param(_nn.initializers.lecun_normal()(rngs.params(),
                                                             (in_features, out_features)))
    self.bias = _nnx.Param(jnp.zeros((out_features,))) if use_bias else None
    self.mean = _nnx.BatchStat(jnp.zeros((out_features,)))
    self.second_moment = _nnx.BatchStat(jnp.ones((out_features,)))

  def __call__(self, x, use_running_average: bool | None = None):
    frozen = self.use_running_average if use_running_average is None else use_running_average
    kernel = self.kernel.value
    bias = self.bias.value if self.bias is not None else None
    z = _affine(x, kernel, bias)
    if frozen:
      stats = (self.mean.value, self.second_moment.value)
    else:
      stats = _moments(z)
      self.mean.value = self.momentum * self.mean.value + (1 - self.momentum) * stats[0]
      self.second_moment.value = (self.momentum * self.second_moment.value
                                  + (1 - self.momentum) * stats[1])
    return _ddp_normalize(z, kernel, bias, stats, alpha=self.alpha, centered=self.centered,
                          epsilon=self.epsilon)
