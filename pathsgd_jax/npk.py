"""Neural path features, the neural path kernel and deep gated networks, for any ReLU network.

A ReLU network's output is a sum over its paths (Lakshminarayanan & Singh, 2020). A path
starts at an input entry ``s`` or at a bias (a constant input 1), passes through units and
ends at an output. For an input ``x``:

* its **neural path feature** (NPF) is ``φ_path(x) = x_s · Π_{units u on the path} g_u(x)``
  with the 0/1 gates ``g_u(x) = 1[pre-activation of u > 0]`` of a real forward pass (``x_s``
  is 1 for a bias path);
* its **neural path value** (NPV) is ``v_path = Π_{edges e of the path} w_e``: the product of
  the effective edge weights of the network, parameters *and* fixed constants (average
  pooling's 1/k, a residual scale, the sign of a subtraction, BatchNorm's folded scale
  ``s/σ`` and folded bias ``β − μ·s/σ``);
* ``output_o(x) = Σ_{paths ending at o} φ_path(x) · v_path`` (= ``⟨NPF, NPV⟩`` per output).

The **neural path kernel** is the Gram matrix of the NPFs over all paths (to every output):

    NPK(x, x') = Σ_paths φ_path(x) φ_path(x') = Σ_paths x_s x'_s Π_u g_u(x) g_u(x').

It depends on the gates and on the graph only, not on the weights. For a bias-free fully
connected network with hidden layers 1..L and ``k`` outputs it is
``k · ⟨x, x'⟩ · Π_l overlap_l(x, x')`` with ``overlap_l`` the number of layer-l units on for
both inputs. Max pooling is a gate too: a path enters a pooled unit only through the entry
the pooling selects (the one JAX's max pooling differentiates through), for both inputs.

`neural_path_kernel` computes it with the path network (`_pathnet`): the network's own jaxpr
re-evaluated with every edge weight set to 1, on the input ``x ⊙ x'``, with each ReLU
multiplied by ``g(x)·g(x')`` (gates recorded at the same equations in a real forward pass,
see `_recorder`): one gated path-network evaluation per pair, no enumeration of paths.

`gated` builds the deep gated network of the paper from any ReLU ``apply_fn``: the value
network's ReLUs are replaced by the gates of a gate network of the same architecture.

References:
  Lakshminarayanan & Singh, *Neural Path Features and Neural Path Kernel: Understanding the
  role of gates in deep learning*, NeurIPS 2020.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pathsgd_jax import _recorder
from pathsgd_jax._errors import PathNetworkError
from pathsgd_jax._interpreter import PathInterpreter
from pathsgd_jax._numerics import times_pow2
from pathsgd_jax._pathnet import PathNetwork
from pathsgd_jax._values import Kind, _Val

__all__ = ["SoftGates", "gated", "neural_path_features", "neural_path_kernel",
           "neural_path_value"]

MAX_PATHS = 100_000


class SoftGates(NamedTuple):
  """Soft gates ``(1 + epsilon) · sigmoid(beta · pre-activation)`` of a gated network.

  Attributes:
    beta: the sharpness β (hard 0/1 gates as β → ∞).
    epsilon: the gates' headroom ε above 1.
  """

  beta: Any = 4.0
  epsilon: Any = 0.1


class _GatedPathInterpreter(PathInterpreter):
  """The path network with every edge weight 1, gated ReLUs and max poolings.

  ``units`` maps a site key to the gate product ``g(x)·g(x')`` of a ReLU, or to the pair of
  selected entries ``(sel(x), sel(x'))`` of a max pooling. With ``inject`` (a key → value
  map), each ReLU instead outputs the injected value and its input is kept in ``pre``: the
  network is then affine in (input, injected values), which `_enumerate` differentiates.
  """

  def __init__(self, dtype, leaf_names, units, inputs, inject=None):
    super().__init__(1.0, dtype, leaf_names, kappa_rule=False)
    self.units, self.inputs, self.inject = units, inputs, inject
    self.pre: dict = {}
    self.top_outputs = None

  def power(self, c):  # a constant edge weight counts as 1 (it is part of the NPV)
    return (jnp.asarray(c) != 0).astype(self.dtype)

  def param_value(self, val):  # a parameter edge (a folded bias too) counts as 1
    return val.value if val.exact else jnp.ones_like(val.value)

  def run(self, jaxpr, consts, args):
    top = self.inputs is not None
    if top:
      inputs, self.inputs = self.inputs, None
      args = list(args[:len(args) - len(inputs)]) + [
          _Val(Kind.ACT, jnp.asarray(v, self.dtype)) for v in inputs]
    outs = super().run(jaxpr, consts, args)
    if top:
      self.top_outputs = outs
    return outs

  def activation(self, eqn, val, role):
    key = _recorder.site_key(self, eqn)
    if self.inject is not None:
      self.pre[key] = times_pow2(val.value, val.log_scale)
      return _Val(Kind.ACT, self.inject[key])
    return dataclasses.replace(val, value=val.value * self.units[key])

  def _eqn(self, eqn, invals):
    if eqn.primitive.name in _recorder.POOLS and invals[0].kind == Kind.ACT:
      if self.inject is not None:
        raise PathNetworkError(
            "neural_path_features/neural_path_value do not enumerate the paths of networks "
            "with max pooling (its gates sit on edges); neural_path_kernel supports them. Use "
            "average pooling for enumeration.")
      sel_a, sel_b = self.units[_recorder.site_key(self, eqn)]
      index = sel_a.astype(jnp.int32)
      value = invals[0].value
      taken = jnp.take(value.reshape(-1), jnp.maximum(index - 1, 0).reshape(-1))
      keep = ((sel_a == sel_b) & (index > 0)).astype(self.dtype)
      return [_Val(Kind.ACT, taken.reshape(sel_a.shape) * keep,
                   log_scale=invals[0].log_scale)]
    return super()._eqn(eqn, invals)


@dataclasses.dataclass
class _Prepared:
  net: PathNetwork
  sites: list
  leaves: list  # real parameter leaves
  ones: list  # included leaves set to 1
  constants: list  # excluded leaves


def _prepare(apply_fn, params, x, mask) -> _Prepared:
  net = PathNetwork(apply_fn, params, x, p=1.0, mask=mask)
  leaves = net.treedef.flatten_up_to(params)
  weights = [w for w, inc in zip(leaves, net.included) if inc]
  constants = [w for w, inc in zip(leaves, net.included) if not inc]
  net._shiftable_leaves(weights, constants)  # pylint: disable=protected-access  # errors
  if net._statistics_plan is not None:  # pylint: disable=protected-access
    raise PathNetworkError(
        "The network normalises with the statistics of its batch (BatchNorm in train mode): "
        "its gates and paths would depend on the other examples. Trace apply_fn in eval mode "
        "(train=False / use_running_average=True).")
  ones = [jnp.ones(np.shape(w), net.dtype) for w in weights]
  finder = _recorder._SiteFinder(net.dtype, net.leaf_names, False)  # pylint: disable=protected-access
  jax.eval_shape(lambda w: net._evaluate(w, constants, finder),  # pylint: disable=protected-access
                 [jax.ShapeDtypeStruct(o.shape, o.dtype) for o in ones])
  return _Prepared(net, list(finder.sites.values()), leaves, ones, constants)


def _examples(prep: _Prepared, x, name: str):
  """The input leaves of ``x`` as (n, 1, ...) arrays, checked against the traced example."""
  xs = jax.tree.leaves(x)
  structs = jax.tree.leaves(prep.net.input_struct)
  if len(xs) != len(structs) or any(np.shape(a)[1:] != s.shape[1:] for a, s in zip(xs, structs)):
    raise PathNetworkError(
        f"{name} must have the structure and per-example shape of the first batch "
        f"({[s.shape[1:] for s in structs]}), got {[np.shape(a)[1:] for a in xs]}.")
  return [jnp.asarray(a, s.dtype)[:, None] for a, s in zip(xs, structs)]


def _units(prep: _Prepared, xs):
  """Per example, the gates (ReLU) and selected entries + 1 (max pooling) at every site."""
  dtype = prep.net.dtype

  def one(example):
    found = {}

    def hook(site, invals):
      v = invals[site.operand]
      if site.kind == "relu":
        found[site.key] = (v > 0).astype(dtype)
      else:
        index = jnp.arange(1, v.size + 1, dtype=jnp.float32).reshape(v.shape).astype(v.dtype)
        _, found[site.key] = jax.jvp(
            lambda z: _recorder._bind(site.eqn, [z] + list(invals[1:]))[0],  # pylint: disable=protected-access
            (v,), (index,))
      return None

    _recorder.evaluate(prep.net.closed_jaxpr, list(prep.leaves) + list(example), prep.sites, hook)
    return found

  return jax.vmap(one)(xs)


def _compiled(fn, *args):
  """``fn(*args)`` as one compiled program (many small eager operations compile slowly)."""
  return jax.jit(fn)(*args)


def neural_path_kernel(apply_fn: Callable[[Any, Any], Any], params, x1, x2=None, *,
                       mask=None) -> jax.Array:
  """The neural path kernel ``NPK(x, x')`` of every pair of examples of ``x1`` and ``x2``.

  ``NPK(x, x') = Σ_paths x_s x'_s Π_{units u on the path} g_u(x) g_u(x')`` over every path of
  the network (input or bias to any output; a bias path has ``x_s = 1``), with the 0/1 gates
  of real forward passes on ``x`` and ``x'``. Every fixed constant on a path (average
  pooling's ``1/k``, residual scales) belongs to the path's value, not its feature, so the
  kernel counts paths with weight 1; max pooling gates the path through the entry it
  selects. Exact for every network the path network reads (dense, conv, sum/avg/max pooling,
  residual sums, concatenation, eval-mode BatchNorm); batched over pairs, jit-compatible.

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs`` of a ReLU network.
    params: its parameters (the gates are those of the network at these parameters).
    x1: a batch of ``n1`` inputs (array or pytree of arrays with a leading batch axis).
    x2: a batch of ``n2`` inputs of the same structure; ``x1`` by default.
    mask: as for `path_norm`: ``False`` leaves are fixed constants of the network (their
      entries are edge weights too, so they only matter where they are zero).

  Returns:
    The ``(n1, n2)`` kernel matrix, in float32 (float64 with ``jax_enable_x64``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import pathsgd_jax as psgd
    >>> w1, w2 = jnp.array([[1., -1.], [1., 1.]]), jnp.ones((2, 1))
    >>> apply_fn = lambda p, x: jax.nn.relu(x @ p[0]) @ p[1]
    >>> x = jnp.array([[1., 2.], [3., -1.]])  # gates (1, 1) and (1, 0)
    >>> psgd.neural_path_kernel(apply_fn, (w1, w2), x)  # <x, x'> * overlap
    Array([[10.,  1.],
           [ 1., 10.]], dtype=float32)
  """
  x2 = x1 if x2 is None else x2
  prep = _prepare(apply_fn, params, x1, mask)
  xs1, xs2 = _examples(prep, x1, "x1"), _examples(prep, x2, "x2")
  net = prep.net

  def pair(xa, ua, xb, ub):
    units = {s.key: ua[s.key] * ub[s.key] if s.kind == "relu" else (ua[s.key], ub[s.key])
             for s in prep.sites}
    interp = _GatedPathInterpreter(net.dtype, net.leaf_names, units,
                                   [a * b for a, b in zip(xa, xb)])
    mantissa, exponent = net._evaluate(prep.ones, prep.constants, interp)  # pylint: disable=protected-access
    return times_pow2(mantissa, exponent)

  def kernel(xs1, xs2):
    u1, u2 = _units(prep, xs1), _units(prep, xs2)

    def row(args):
      xa, ua = args
      return jax.vmap(lambda xb, ub: pair(xa, ua, xb, ub))(xs2, u2)

    return lax.map(row, (xs1, u1))

  return _compiled(kernel, xs1, xs2)


# ------------------------------------------------------------------ paths, for small networks
class _Paths(NamedTuple):
  source: np.ndarray  # (P,) input entry, or -1 for a bias
  units: np.ndarray  # (P, L) gated units on the path, padded with U
  multiplicity: np.ndarray  # (P,) how many paths of the network the row stands for
  output: np.ndarray  # (P,) output entry
  edges: list  # per path: ((row, kind, column), ...), kind 0 input, 1 unit, 2 bias


def _flat(values):
  return jnp.concatenate([jnp.ravel(v) for v in values]) if values else jnp.zeros((0,))


def _affine_maps(prep: _Prepared, real: bool):
  """(constant, d/d input, d/d units) of [unit pre-activations; outputs], ReLUs injected."""
  net, dtype = prep.net, prep.net.dtype
  relu = [s for s in prep.sites if s.kind == "relu"]
  if len(relu) != len(prep.sites) and real:
    raise PathNetworkError(
        "neural_path_features/neural_path_value do not enumerate the paths of networks with "
        "max pooling (its gates sit on edges); neural_path_kernel supports them.")
  structs = jax.tree.leaves(net.input_struct)

  def site_shapes():
    found = {}

    def hook(site, invals):
      found[site.key] = invals[site.operand].shape
      return None

    jax.eval_shape(lambda ex: _recorder.evaluate(net.closed_jaxpr, list(prep.leaves) + ex,
                                                 prep.sites, hook), structs)
    return found

  shapes = site_shapes()
  sizes = [math.prod(shapes[s.key]) for s in relu]
  in_sizes = [math.prod(s.shape) for s in structs]

  def split(flat, parts, shape_of):
    out, start = [], 0
    for size, shape in zip(parts, shape_of):
      out.append(flat[start:start + size].reshape(shape))
      start += size
    return out

  def fn(x_flat, t_flat):
    inputs = split(x_flat, in_sizes, [s.shape for s in structs])
    inject = {s.key: v for s, v in zip(relu, split(t_flat, sizes, [shapes[s.key] for s in relu]))}
    if real:
      pre = {}

      def hook(site, invals):
        pre[site.key] = invals[site.operand]
        return [inject[site.key].astype(site.eqn.outvars[0].aval.dtype)]

      outs = _recorder.evaluate(net.closed_jaxpr, list(prep.leaves) + inputs, prep.sites, hook)
      outs = [o for o in outs if jnp.issubdtype(jnp.result_type(o), jnp.inexact)]
    else:
      interp = _GatedPathInterpreter(dtype, net.leaf_names, {}, inputs, inject)
      net._evaluate(prep.ones, prep.constants, interp)  # pylint: disable=protected-access
      pre, outs = interp.pre, []
      for out in interp.top_outputs:
        if out.kind == Kind.ACT:
          out = interp.flush(out)
          outs.append(times_pow2(out.value, out.log_scale))
        elif jnp.issubdtype(jnp.result_type(out.value), jnp.inexact):
          outs.append(interp.lift(out, Kind.ACT) if out.kind == Kind.PARAM
                      else jnp.zeros(np.shape(out.value), dtype))
    return jnp.concatenate([_flat([pre[s.key] for s in relu]).astype(dtype),
                            _flat(outs).astype(dtype)])

  x0 = jnp.zeros((sum(in_sizes),), dtype)
  t0 = jnp.zeros((sum(sizes),), dtype)
  c, (jx, jt) = _compiled(lambda x, t: (fn(x, t), jax.jacfwd(fn, argnums=(0, 1))(x, t)), x0, t0)
  return np.asarray(c), np.asarray(jx), np.asarray(jt), sum(sizes)


_STRUCTURES: dict = {}  # the path-counting maps of recently enumerated networks


def _structure_key(prep: _Prepared):
  """The traced program and the zero pattern of its fixed leaves, or None if not concrete."""
  try:
    zeros = tuple(np.asarray(c == 0).tobytes()
                  for c in list(prep.constants) + list(prep.net.closed_jaxpr.consts))
  except jax.errors.ConcretizationTypeError:
    return None
  return (str(prep.net.closed_jaxpr), tuple(prep.net.included), zeros)


def _enumerate(prep: _Prepared, max_paths: int) -> _Paths:
  """Every path, grouped by (source, gated units, output): paths of a group share the NPF."""
  key = _structure_key(prep)
  if key is None or key not in _STRUCTURES:
    maps = _affine_maps(prep, real=False)
    if key is not None:
      if len(_STRUCTURES) >= 16:
        _STRUCTURES.pop(next(iter(_STRUCTURES)))
      _STRUCTURES[key] = maps
  else:
    maps = _STRUCTURES[key]
  mb, mx, mt, n_units = maps
  rows = mb.shape[0]
  on_x, on_t, on_b = mx > 0.5, mt > 0.5, mb > 0.5
  counts = np.zeros(rows)
  for r in range(rows):
    counts[r] = on_x[r].sum() + on_b[r] + (counts[:n_units] * on_t[r]).sum()
  total = counts[n_units:].sum()
  if total > max_paths:
    raise PathNetworkError(
        f"The network has {total:.3g} groups of paths (paths that share their source, gated "
        f"units and output), more than max_paths={max_paths}: neural_path_features/value "
        "enumerate them, which is for small networks. Use neural_path_kernel (no "
        "enumeration), or raise max_paths.")
  ending: list[list] = [[] for _ in range(rows)]
  for r in range(rows):
    found = [(int(i), (), mx[r, i], ((r, 0, int(i)),)) for i in np.flatnonzero(on_x[r])]
    if on_b[r]:
      found.append((-1, (), mb[r], ((r, 2, 0),)))
    for u in np.flatnonzero(on_t[r]):
      found += [(s, us + (int(u),), m * mt[r, u], e + ((r, 1, int(u)),))
                for s, us, m, e in ending[u]]
    ending[r] = found
  paths = [(s, us, m, r - n_units, e) for r in range(n_units, rows) for s, us, m, e in ending[r]]
  width = max([len(p[1]) for p in paths] + [1])
  units = np.full((len(paths), width), n_units, np.int64)
  for i, p in enumerate(paths):
    units[i, :len(p[1])] = p[1]
  return _Paths(np.array([p[0] for p in paths], np.int64), units,
                np.array([p[2] for p in paths]), np.array([p[3] for p in paths], np.int64),
                [p[4] for p in paths])


def neural_path_value(apply_fn: Callable[[Any, Any], Any], params, example_input, *,
                      mask=None, max_paths: int = MAX_PATHS) -> np.ndarray:
  """The neural path values of a small network, as a ``(paths, outputs)`` matrix.

  Paths that share their source, their gated units and their output (they differ only in
  the linear, ungated nodes between gates: pooled units, a linear bottleneck) have the same
  feature and are one row: its value is the sum of their weight products divided by
  ``√m`` and its feature carries ``√m`` (m paths), which keeps ``⟨NPF, NPV⟩`` and the kernel
  exact. Row ``i`` is non-zero only in the column of the output the path ends at, so
  ``apply_fn(params, x).reshape(n, -1) == neural_path_features(...) @ neural_path_value(...)``.
  Not jit-compatible (the paths are enumerated on the host); max pooling is not supported.

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs`` of a ReLU network.
    params: its parameters.
    example_input: a batch with the real input shape (only its shape is used).
    mask: leaves that are fixed constants of the network (see `neural_path_kernel`).
    max_paths: the most rows to enumerate; above it a `PathNetworkError` says so.

  Returns:
    A float64 NumPy array of shape ``(P, n_outputs)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import pathsgd_jax as psgd
    >>> apply_fn = lambda p, x: jax.nn.relu(x @ p[0]) @ p[1]
    >>> params = (jnp.array([[1., -1.], [1., 1.]]), jnp.array([[2.], [3.]]))
    >>> psgd.neural_path_value(apply_fn, params, jnp.ones((1, 2)))[:, 0]  # (x_i, unit j)
    array([ 2.,  2., -3.,  3.])
  """
  prep = _prepare(apply_fn, params, example_input, mask)
  paths = _enumerate(prep, max_paths)
  cb, ax, at, _ = _affine_maps(prep, real=True)
  first = {0: ax, 1: at}
  values = np.zeros((len(paths.source), cb.shape[0] - at.shape[1]))
  for i, edges in enumerate(paths.edges):
    w = 1.0
    for r, kind, col in edges:
      w *= cb[r] if kind == 2 else first[kind][r, col]
    values[i, paths.output[i]] = w / math.sqrt(paths.multiplicity[i])
  return values


def neural_path_features(apply_fn: Callable[[Any, Any], Any], params, x, *, mask=None,
                         max_paths: int = MAX_PATHS) -> jax.Array:
  """The neural path features of a batch, as an ``(n, paths)`` matrix (small networks).

  ``φ_path(x) = √m · x_s · Π_{gated units u on the path} g_u(x)`` with the gates of a real
  forward pass; rows of paths as in `neural_path_value` (same order), so the Gram matrix
  ``φ φᵀ`` is `neural_path_kernel`. Not jit-compatible; max pooling is not supported.

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs`` of a ReLU network.
    params: its parameters (they set the gates).
    x: a batch of inputs.
    mask: leaves that are fixed constants of the network.
    max_paths: the most paths to enumerate.

  Returns:
    The ``(n, P)`` features.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import pathsgd_jax as psgd
    >>> apply_fn = lambda p, x: jax.nn.relu(x @ p[0]) @ p[1]
    >>> params = (jnp.array([[1., -1.], [1., 1.]]), jnp.array([[2.], [3.]]))
    >>> psgd.neural_path_features(apply_fn, params, jnp.array([[3., -1.]]))
    Array([[ 3., -1.,  0., -0.]], dtype=float32)
  """
  prep = _prepare(apply_fn, params, x, mask)
  paths = _enumerate(prep, max_paths)
  xs = _examples(prep, x, "x")
  n, dtype = xs[0].shape[0], prep.net.dtype
  n_inputs = sum(math.prod(v.shape[1:]) for v in xs)
  source = np.where(paths.source < 0, n_inputs, paths.source)
  scale = np.sqrt(paths.multiplicity)

  def features(xs):
    units = _units(prep, xs)
    gates = jnp.concatenate([units[s.key].reshape(n, -1) for s in prep.sites]
                            + [jnp.ones((n, 1), dtype)], axis=1)
    inputs = jnp.concatenate([v.reshape(n, -1) for v in xs] + [jnp.ones((n, 1), dtype)], axis=1)
    return (inputs[:, source] * jnp.prod(gates[:, paths.units], axis=-1)
            * jnp.asarray(scale, dtype)[None, :])

  return _compiled(features, xs)


# ------------------------------------------------------------------------ deep gated networks
def gated(apply_fn: Callable[[Any, Any], Any]) -> Callable[..., Any]:
  """The deep gated network of ``apply_fn``: its ReLUs gated by a second copy of the network.

  ``gated_apply(value_params, gate_params, x, *, soft=None)`` runs the gate network
  (``apply_fn`` at ``gate_params``) and reads the pre-activation ``q_u`` of every ReLU; it then
  runs the value network (``apply_fn`` at ``value_params``) with each ReLU ``relu(z_u)``
  replaced by ``G_u · z_u``, with ``G_u = 1[q_u > 0]`` (hard gates, no gradient to
  ``gate_params``) or, with ``soft=SoftGates(beta, epsilon)``,
  ``G_u = (1 + ε) · sigmoid(β · q_u)`` (decoupled learning: both networks train). The value
  network is then linear in its input given the gates: its output is ``⟨NPF, NPV⟩`` with the
  gate network's features. With hard gates and ``gate_params = value_params`` it is
  ``apply_fn`` itself. Max pooling, where present, stays the value network's own.

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs`` of a ReLU network.

  Returns:
    ``gated_apply(value_params, gate_params, x, *, soft=None) -> outputs``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import pathsgd_jax as psgd
    >>> apply_fn = lambda p, x: jax.nn.relu(x @ p[0]) @ p[1]
    >>> value = (jnp.array([[1., -1.]]), jnp.array([[2.], [3.]]))
    >>> gate = (jnp.array([[-1., 1.]]), value[1])
    >>> gated_apply = psgd.gated(apply_fn)
    >>> x = jnp.array([[2.]])
    >>> gated_apply(value, value, x), gated_apply(value, gate, x)
    (Array([[4.]], dtype=float32), Array([[-6.]], dtype=float32))
  """
  cache: dict = {}

  def prepared(params, x):
    structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)),
                           (params, x))
    key = (jax.tree.structure(structs), tuple((s.shape, str(s.dtype))
                                              for s in jax.tree.leaves(structs)))
    if key not in cache:
      jaxpr, out_shapes = jax.make_jaxpr(apply_fn, return_shape=True)(*structs)
      kinds = ([Kind.PARAM] * len(jax.tree.leaves(params)) + [Kind.ACT] * len(jax.tree.leaves(x)))
      sites = [s for s in _recorder.find_sites(jaxpr, kinds, collect_errors=True)
               if s.kind == "relu"]
      if not sites:
        raise PathNetworkError("gated(apply_fn): the network has no ReLU to gate.")
      cache[key] = (jaxpr, sites, jax.tree.structure(out_shapes))
    return cache[key]

  def gated_apply(value_params, gate_params, x, *, soft: SoftGates | None = None):
    if jax.tree.structure(value_params) != jax.tree.structure(gate_params):
      raise PathNetworkError("gated_apply: value_params and gate_params must have the same "
                             "tree structure (two copies of the same network).")
    if soft is not None:
      soft = SoftGates(*soft)
    return compiled(value_params, gate_params, x, soft)

  def run(value_params, gate_params, x, soft):
    jaxpr, sites, out_tree = prepared(value_params, x)
    inputs = jax.tree.leaves(x)
    gates = {}

    def read(site, invals):
      q = invals[site.operand]
      if soft is None:
        gates[site.key] = lax.stop_gradient((q > 0).astype(q.dtype))
      else:
        beta, epsilon = soft
        gates[site.key] = (1 + epsilon) * jax.nn.sigmoid(beta * q)
      return None

    _recorder.evaluate(jaxpr, jax.tree.leaves(gate_params) + inputs, sites, read)

    def apply_gate(site, invals):
      z = invals[site.operand]
      return [(gates[site.key] * z).astype(site.eqn.outvars[0].aval.dtype)]

    outs = _recorder.evaluate(jaxpr, jax.tree.leaves(value_params) + inputs, sites, apply_gate)
    return jax.tree.unflatten(out_tree, outs)

  compiled = jax.jit(run)
  return gated_apply
