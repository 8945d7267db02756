"""Neural path features, the neural path kernel and gated networks (pathsgd_jax.npk).

References are independent of the code under test: every path of an explicit float64 DAG
(`reference.unrolled_dag`, `reference.residual_mlp_dag`) is enumerated by depth-first search,
with the gates of a NumPy forward pass (ReLU units on iff their pre-activation is > 0; a max
pooling passes a path only through the window's arg-max); the closed form
``k·<x, x'>·Π_l overlap_l`` for bias-free MLPs; a NumPy re-implementation of gated networks.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pathsgd_jax as psgd
from models_zoo import (make_cnn_apply, make_residual_apply, mlp_apply, mlp_to_layers,
                        rescale_mlp_params, to_numpy)
from reference import cnn_layers, dense_layer, residual_mlp_dag, unrolled_dag

RTOL = 2e-5


# --------------------------------------------------------------------------- the reference
def enumerate_paths(edges, sources, sinks):
  """Every source-to-sink path of a DAG: (source, nodes after it, edges)."""
  out_edges = {}
  for u, v, value, _ in edges:
    out_edges.setdefault(u, []).append((v, float(value)))
  sinks, found = set(sinks), []

  def dfs(node, nodes, path_edges, source):
    if node in sinks:
      found.append((source, list(nodes), list(path_edges)))
    for v, value in out_edges.get(node, ()):
      dfs(v, nodes + [v], path_edges + [(node, v, value)], source)

  for s in sources:
    dfs(s, [], [], s)
  return found


def path_objects(paths, inputs, node_gate, edge_gate=lambda e: 1.0):
  """(NPF of each path for every example, NPV of each path, its sink)."""
  features, values, ends = [], [], []
  for source, nodes, path_edges in paths:
    phi = inputs[source] if source in inputs else np.ones_like(next(iter(inputs.values())))
    for node in nodes:
      phi = phi * node_gate(node)
    for e in path_edges:
      phi = phi * edge_gate(e)
    features.append(phi)
    values.append(np.prod([value for _, _, value in path_edges]))
    ends.append(nodes[-1])
  return np.stack(features, axis=1), np.array(values), ends


def layered_gates(layers, x, max_pools=()):
  """Forward pass of an unrolled network: gates of its ReLU nodes and max-pool edges."""
  h = np.asarray(x, np.float64).reshape(len(x), -1)
  node_gates, edge_gates = {}, {}
  for k, layer in enumerate(layers):
    if k in max_pools:
      out = np.zeros((len(h), layer.shape[1]))
      for o in range(layer.shape[1]):
        rows = np.flatnonzero(layer.matrix[:, o])
        choice = rows[np.argmax(h[:, rows], axis=1)]
        for i in rows:
          edge_gates[(("n", k, i), ("n", k + 1, o))] = (choice == i).astype(float)
        out[:, o] = h[np.arange(len(h)), choice]
      h = out
      continue
    z = h @ layer.matrix + (0.0 if layer.bias is None else layer.bias[None, :])
    if layer.relu:
      for j in range(z.shape[1]):
        node_gates[("n", k + 1, j)] = (z[:, j] > 0).astype(float)
      z = np.maximum(z, 0.0)
    h = z
  return node_gates, edge_gates, h


def layered_objects(layers, x, max_pools=()):
  edges, sources, sinks = unrolled_dag(layers)
  node_gates, edge_gates, out = layered_gates(layers, x, max_pools)
  flat = np.asarray(x, np.float64).reshape(len(x), -1)
  inputs = {("n", 0, i): flat[:, i] for i in range(flat.shape[1])}
  phi, v, ends = path_objects(
      enumerate_paths(edges, sources, sinks), inputs,
      lambda n: node_gates.get(n, 1.0), lambda e: edge_gates.get((e[0], e[1]), 1.0))
  return phi, v, ends, out


def mlp_unrolled(params):
  return [dense_layer(w, b, relu=k < len(params) - 1)
          for k, (w, b) in enumerate(mlp_to_layers(params))]


# NumPy draws: no compilation per shape (the suite's CPU budget).
def batch(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def init_mlp(seed, widths, bias=True):
  rng = np.random.default_rng(seed)
  params = []
  for k in range(len(widths) - 1):
    layer = {"w": jnp.asarray(rng.normal(size=widths[k:k + 2]) / np.sqrt(widths[k]), jnp.float32)}
    if bias:
      layer["b"] = jnp.asarray(0.3 * rng.normal(size=widths[k + 1]), jnp.float32)
    params.append(layer)
  return params


def init_cnn(seed, in_hwc, kernel_hw, cout, n_flat, n_out):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])),  # noqa: E731
                                 jnp.float32)
  return {"conv": {"kernel": f(*kernel_hw, in_hwc[2], cout), "bias": 0.3 * f(1, cout)[0]},
          "dense": {"kernel": f(n_flat, n_out), "bias": 0.3 * f(1, n_out)[0]}}


def init_residual(seed, d_in, d_h, d_out):
  rng = np.random.default_rng(seed)
  shapes = {"W1": (d_in, d_h), "b1": (d_h,), "W2": (d_h, d_h), "b2": (d_h,), "W3": (d_h, d_out),
            "b3": (d_out,)}
  return {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0] if len(s) == 2 else 9), jnp.float32)
          for k, s in shapes.items()}


# ---------------------------------------------------------------------- the kernel, exact
def test_kernel_mlp_matches_bruteforce():
  params = init_mlp(0, (3, 4, 3, 2))
  x1, x2 = batch(1, (5, 3)), batch(2, (4, 3))
  phi1, *_ = layered_objects(mlp_unrolled(params), x1)
  phi2, *_ = layered_objects(mlp_unrolled(params), x2)
  kernel = jax.jit(lambda p, a, b: psgd.neural_path_kernel(mlp_apply, p, a, b))(params, x1, x2)
  assert kernel.shape == (5, 4)
  np.testing.assert_allclose(kernel, phi1 @ phi2.T, rtol=RTOL, atol=1e-5)


def test_kernel_bias_free_mlp_closed_form():
  params = init_mlp(3, (6, 8, 7, 5, 3), bias=False)
  x = batch(4, (7, 6))
  on = []
  h = np.asarray(x, np.float64)
  for layer in to_numpy(params)[:-1]:
    z = h @ layer["w"]
    on.append(z > 0)
    h = np.maximum(z, 0)
  overlap = np.prod([g.astype(float) @ g.T.astype(float) for g in on], axis=0)
  expected = 3 * (np.asarray(x, np.float64) @ np.asarray(x, np.float64).T) * overlap
  kernel = psgd.neural_path_kernel(mlp_apply, params, x)
  np.testing.assert_allclose(kernel, expected, rtol=RTOL, atol=1e-4)
  np.testing.assert_array_equal(kernel, kernel.T)
  assert len(np.unique(overlap)) > 3  # the gates do matter


@pytest.mark.parametrize("pool_impl", ["reshape", "max_linen"])
def test_kernel_cnn_with_pooling_matches_bruteforce(pool_impl):
  in_hwc, pool = (4, 4, 1), (2, 2)
  params = init_cnn(5, in_hwc, (2, 2), 2, 2 * 2 * 2, 2)
  apply_fn = make_cnn_apply(padding="SAME", pool=pool, pool_impl=pool_impl)
  x = batch(6, (4, *in_hwc))
  p = to_numpy(params)
  kind = "avg" if pool_impl == "reshape" else "sum"
  layers = cnn_layers(in_hwc, p["conv"]["kernel"], p["conv"]["bias"], pool,
                      p["dense"]["kernel"], p["dense"]["bias"], padding="SAME", pool_kind=kind)
  phi, _, _, out = layered_objects(layers, x, max_pools=() if kind == "avg" else (1,))
  np.testing.assert_allclose(out, apply_fn(params, x), rtol=1e-5, atol=1e-5)  # reference ok
  kernel = psgd.neural_path_kernel(apply_fn, params, x)
  np.testing.assert_allclose(kernel, phi @ phi.T, rtol=RTOL, atol=1e-5)


def residual_objects(params, x, alpha):
  edges, sources, sinks, _ = residual_mlp_dag(to_numpy(params), alpha)
  p = to_numpy(params)
  xn = np.asarray(x, np.float64)
  a1 = xn @ p["W1"] + p["b1"]
  a2 = np.maximum(a1, 0) @ p["W2"] + p["b2"]
  gates = {("h1", j): (a1[:, j] > 0).astype(float) for j in range(a1.shape[1])}
  gates.update({("a2", j): (a2[:, j] > 0).astype(float) for j in range(a2.shape[1])})
  inputs = {("x", i): xn[:, i] for i in range(xn.shape[1])}
  return path_objects(enumerate_paths(edges, sources, sinks), inputs,
                      lambda n: gates.get(n, 1.0))


def test_kernel_residual_block_matches_bruteforce():
  params = init_residual(7, 3, 4, 2)
  apply_fn = make_residual_apply(alpha=0.5)
  x = batch(8, (5, 3))
  phi, v, ends = residual_objects(params, x, 0.5)
  kernel = psgd.neural_path_kernel(apply_fn, params, x)
  np.testing.assert_allclose(kernel, phi @ phi.T, rtol=RTOL, atol=1e-5)
  # and the reference's own decomposition reproduces the network
  out = np.stack([(phi * (v * np.array([e == ("out", m) for e in ends]))[None]).sum(1)
                  for m in range(2)], 1)
  np.testing.assert_allclose(out, apply_fn(params, x), rtol=1e-5, atol=1e-5)


def test_kernel_eval_batchnorm_is_the_folded_network():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(4, use_bias=False)(x)
      h = nn.relu(nn.BatchNorm(use_running_average=True)(h))
      return nn.Dense(2)(h)

  x = batch(9, (5, 3))
  rng = np.random.default_rng(0)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  params = {"Dense_0": {"kernel": f(3, 4)}, "BatchNorm_0": {"scale": f(4), "bias": f(4)},
            "Dense_1": {"kernel": f(4, 2), "bias": f(2)}}
  stats = {"BatchNorm_0": {"mean": f(4), "var": jnp.exp(f(4))}}
  apply_fn = lambda p, x: Net().apply({"params": p, "batch_stats": stats}, x)  # noqa: E731
  # the same function as one dense layer with bias (BatchNorm folded by hand)
  bn = params["BatchNorm_0"]
  s = bn["scale"] / jnp.sqrt(stats["BatchNorm_0"]["var"] + 1e-5)
  folded = [{"w": params["Dense_0"]["kernel"] * s[None, :],
             "b": bn["bias"] - stats["BatchNorm_0"]["mean"] * s},
            {"w": params["Dense_1"]["kernel"], "b": params["Dense_1"]["bias"]}]
  np.testing.assert_allclose(mlp_apply(folded, x), apply_fn(params, x), rtol=1e-5, atol=1e-6)
  phi, *_ = layered_objects(mlp_unrolled(folded), x)
  np.testing.assert_allclose(psgd.neural_path_kernel(apply_fn, params, x), phi @ phi.T,
                             rtol=RTOL, atol=1e-5)


# ------------------------------------------------------------- features and values, exact
def npf_npv_cases():
  mlp = init_mlp(12, (3, 4, 3, 2))
  cnn = init_cnn(13, (3, 3, 1), (2, 2), 2, 1 * 1 * 2, 2)
  res = init_residual(14, 3, 3, 2)
  return [("mlp", mlp_apply, mlp, (6, 3)),
          ("cnn", make_cnn_apply(padding="SAME", pool=(2, 2)), cnn, (6, 3, 3, 1)),
          ("residual", make_residual_apply(alpha=2.0), res, (6, 3))]


@pytest.mark.parametrize("name,apply_fn,params,shape", npf_npv_cases(),
                         ids=[c[0] for c in npf_npv_cases()])
def test_output_is_features_dot_values(name, apply_fn, params, shape):
  x = batch(15, shape)
  phi = psgd.neural_path_features(apply_fn, params, x)
  v = psgd.neural_path_value(apply_fn, params, x)
  assert phi.shape[1] == v.shape[0] and v.shape[1] == 2
  assert np.all(np.count_nonzero(v, axis=1) <= 1)  # one output per path
  np.testing.assert_allclose(np.asarray(phi, np.float64) @ v, apply_fn(params, x),
                             rtol=1e-5, atol=1e-5)
  if name == "cnn":  # paths through the pooled units are grouped: the Gram matrix is still exact
    np.testing.assert_allclose(phi @ phi.T, psgd.neural_path_kernel(apply_fn, params, x),
                               rtol=RTOL, atol=1e-5)


def test_values_are_the_path_products():
  params = init_mlp(12, (3, 4, 3, 2))  # the "mlp" case above
  x = batch(17, (4, 3))
  _, v_ref, _, _ = layered_objects(mlp_unrolled(params), x)
  v = psgd.neural_path_value(mlp_apply, params, x)
  assert v.shape[0] == len(v_ref) == 3 * 4 * 3 * 2 + 4 * 3 * 2 + 3 * 2 + 2  # inputs, biases
  np.testing.assert_allclose(np.sort(v.sum(axis=1)), np.sort(v_ref), rtol=1e-5, atol=1e-7)
  with pytest.raises(psgd.PathNetworkError, match="max_paths"):
    psgd.neural_path_features(mlp_apply, params, x, max_paths=50)


def test_rescaling_leaves_kernel_and_values_unchanged():
  widths = (3, 4, 3, 2)
  params = init_mlp(18, widths)
  factors = [2.0 ** np.array([3, -2, 1, 0]), 2.0 ** np.array([-4, 2, 5])]
  rescaled = rescale_mlp_params(params, factors)
  x = batch(19, (6, 3))
  np.testing.assert_array_equal(psgd.neural_path_kernel(mlp_apply, rescaled, x),
                                psgd.neural_path_kernel(mlp_apply, params, x))
  v, v_rescaled = (psgd.neural_path_value(mlp_apply, p, x) for p in (params, rescaled))
  np.testing.assert_allclose(v_rescaled, v, rtol=1e-6, atol=1e-7)
  assert not np.allclose(rescaled[0]["w"], params[0]["w"])


# ----------------------------------------------------------------------------- gated networks
def test_gated_with_its_own_gates_is_the_network():
  params = init_mlp(20, (3, 5, 4, 2))
  x = batch(21, (8, 3))
  gated_apply = psgd.gated(mlp_apply)
  np.testing.assert_array_equal(gated_apply(params, params, x), mlp_apply(params, x))
  cnn = init_cnn(22, (4, 4, 1), (2, 2), 3, 1 * 1 * 3, 2)
  apply_fn = make_cnn_apply(pool_impl="max_linen")
  xc = batch(23, (3, 4, 4, 1))
  np.testing.assert_array_equal(psgd.gated(apply_fn)(cnn, cnn, xc), apply_fn(cnn, xc))


def numpy_gated(value, gate, x, soft=None):
  hv, hg = np.asarray(x, np.float64), np.asarray(x, np.float64)
  value, gate = to_numpy(value), to_numpy(gate)
  for k, (lv, lg) in enumerate(zip(value, gate)):
    zv, zg = hv @ lv["w"] + lv["b"], hg @ lg["w"] + lg["b"]
    if k == len(value) - 1:
      return zv
    g = (zg > 0).astype(float) if soft is None else (1 + soft[1]) / (1 + np.exp(-soft[0] * zg))
    hv, hg = g * zv, np.maximum(zg, 0)


@pytest.mark.parametrize("soft", [None, (4.0, 0.1)])
def test_gated_network_against_numpy(soft):
  value = init_mlp(24, (3, 5, 4, 2))
  gate = init_mlp(25, (3, 5, 4, 2))
  x = batch(26, (8, 3))
  gated_apply = psgd.gated(mlp_apply)
  out = gated_apply(value, gate, x, soft=None if soft is None else psgd.SoftGates(*soft))
  np.testing.assert_allclose(out, numpy_gated(value, gate, x, soft), rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, mlp_apply(value, x), atol=1e-3)


def test_gated_gradients_reach_gate_params_only_when_soft():
  value = init_mlp(27, (3, 4, 2))
  gate = init_mlp(28, (3, 4, 2))
  x = batch(29, (5, 3))
  gated_apply = jax.jit(psgd.gated(mlp_apply))

  def loss(v, g, soft):
    return jnp.sum(psgd.gated(mlp_apply)(v, g, x, soft=soft) ** 2)

  _, hard = jax.grad(loss, argnums=(0, 1))(value, gate, None)
  _, soft = jax.grad(loss, argnums=(0, 1))(value, gate, psgd.SoftGates(4.0, 0.1))
  assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(hard))
  assert any(np.any(np.asarray(a) != 0) for a in jax.tree.leaves(soft))
  np.testing.assert_allclose(gated_apply(value, gate, x), psgd.gated(mlp_apply)(value, gate, x),
                             rtol=1e-6)


# ------------------------------------------------------------------------------- bad input
def test_errors_name_the_problem():
  params = init_mlp(30, (3, 4, 2))
  x = batch(31, (2, 3))
  with pytest.raises(psgd.PathNetworkError, match="per-example shape"):
    psgd.neural_path_kernel(mlp_apply, params, x, batch(32, (2, 4)))
  leaky = lambda p, x: jax.nn.leaky_relu(x @ p[0]["w"]) @ p[1]["w"]  # noqa: E731
  with pytest.raises(psgd.PathNetworkError, match="leaky ReLU"):
    psgd.neural_path_kernel(leaky, params, x)
  with pytest.raises(psgd.UnsupportedOperationError, match="tanh"):
    psgd.neural_path_kernel(lambda p, x: jnp.tanh(x @ p[0]["w"]) @ p[1]["w"], params, x)
  cnn = init_cnn(33, (4, 4, 1), (2, 2), 2, 1 * 1 * 2, 2)
  with pytest.raises(psgd.PathNetworkError, match="max pooling"):
    psgd.neural_path_value(make_cnn_apply(pool_impl="max_linen"), cnn, batch(34, (1, 4, 4, 1)))
  with pytest.raises(psgd.PathNetworkError, match="no ReLU"):
    psgd.gated(lambda p, x: x @ p[0]["w"])(params, params, x)
  with pytest.raises(psgd.PathNetworkError, match="same tree structure"):
    psgd.gated(mlp_apply)(params, params[:1], x)
