"""Deep and unbalanced networks: κ against a float64 reference, overflow, normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pathsgd_jax as psgd

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)


def mlp(params, x):
  for i, layer in enumerate(params):
    x = x @ layer["w"] + layer["b"][None, :]
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def make_mlp(depth, width, *, init="he", seed=0, n_in=8, n_out=4):
  rng = np.random.default_rng(seed)
  sizes = [n_in] + [width] * (depth - 1) + [n_out]
  params = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    std = np.sqrt((2.0 if init == "he" else 1.0) / fan_in)
    params.append({"w": rng.normal(0, std, (fan_in, fan_out)),
                   "b": rng.normal(0, 0.1, fan_out)})
  return params


def reference_kappa(params, p=2.0):
  """γ_in forward / γ_out backward through |w|^p in float64 logs, written independently.

  Returns (log κ per leaf, log φ_p^p); logs keep depth-128 values finite.
  """
  def logsumexp_matvec(log_x, log_w):  # log Σ_i exp(log_x_i + log_w_ij)
    z = log_x[:, None] + log_w
    m = np.max(z, axis=0)
    return m + np.log(np.sum(np.exp(z - m), axis=0))

  log_v = [{"w": p * np.log(np.abs(l["w"])), "b": p * np.log(np.abs(l["b"]))} for l in params]
  log_in = [np.zeros(params[0]["w"].shape[0])]  # γ_in of the input nodes: 1
  for lv in log_v:
    h = logsumexp_matvec(log_in[-1], lv["w"])
    log_in.append(np.logaddexp(h, lv["b"]))
  log_out = [np.zeros(params[-1]["w"].shape[1])]  # γ_out of the outputs: 1
  for lv in reversed(log_v):
    log_out.insert(0, logsumexp_matvec(log_out[0], lv["w"].T))
  log_total = np.logaddexp.reduce(log_in[-1])
  kappas = []
  for layer, lv in enumerate(log_v):
    g_w = log_in[layer][:, None] + log_out[layer + 1][None, :]
    g_b = log_out[layer + 1]
    kappas.append({"w": 2.0 / p * g_w, "b": 2.0 / p * g_b})
  return kappas, log_total


def as_dtype(params, dtype):
  return [{k: jnp.asarray(v, dtype) for k, v in layer.items()} for layer in params]


CASES = [(16, 256, init, dtype) for init in ["he", "balanced"]
         for dtype in [jnp.float32, jnp.bfloat16, jnp.float16]]
# Deeper networks compile slowly on 2 cores: each dtype once at depth 64, float32 at 128.
CASES += [(64, 64, "he", jnp.float32), (64, 64, "balanced", jnp.bfloat16),
          (64, 64, "he", jnp.float16), (128, 32, "he", jnp.float32)]


@pytest.mark.parametrize("depth,width,init,dtype", CASES)
def test_kappa_matches_float64_where_representable(depth, width, init, dtype):
  params64 = make_mlp(depth, width, init=init, seed=depth + width)
  params = as_dtype(params64, dtype)
  # The reference sees the weights as rounded to the params' dtype.
  rounded = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in params]
  log_kappa, log_total = reference_kappa(rounded)
  x = jnp.zeros((2, 8), dtype)
  kappa, normalised = jax.jit(lambda prm: (psgd.path_scales(mlp, prm, x),
                                           psgd.path_scales(mlp, prm, x, normalize=True)))(params)
  for got, got_norm, ref in zip(kappa, normalised, log_kappa):
    for key in ("w", "b"):
      g, gn, r = np.asarray(got[key]), np.asarray(got_norm[key]), ref[key]
      assert g.dtype == np.float32 and not np.isnan(g).any() and not np.isnan(gn).any()
      fits = (r < np.log(F32_MAX) - 1e-3) & (r > np.log(F32_TINY) + 1e-3)
      np.testing.assert_allclose(g[fits], np.exp(r[fits]), rtol=1e-3)
      # Normalised κ = κ/φ_p², wherever it is a normal float32 (nearly everywhere).
      rn = r - log_total
      fits_normalised = (rn < np.log(F32_MAX) - 1e-3) & (rn > np.log(F32_TINY) + 1e-3)
      np.testing.assert_allclose(gn[fits_normalised], np.exp(rn[fits_normalised]), rtol=1e-3)


def test_raw_kappa_overflow_is_defined_and_counted():
  # He init doubles path sums per layer: at depth 128 φ² (~2^130) overflows float32 while
  # κ (~2^123) still fits; by depth 160 most κ (~2^155) overflow too.
  params = as_dtype(make_mlp(160, 16, init="he", seed=3), jnp.float32)
  log_kappa, _ = reference_kappa([{k: np.asarray(v, np.float64) for k, v in l.items()}
                                  for l in params])
  def count(condition):
    return sum(int(condition(r[k]).sum()) for r in log_kappa for k in r)

  # Entries within 0.1% of the float32 limits may round either way.
  surely_lost = count(lambda r: (r > np.log(F32_MAX) + 1e-3) | (r < np.log(F32_TINY) - 1e-3))
  maybe_lost = count(lambda r: (r > np.log(F32_MAX) - 1e-3) | (r < np.log(F32_TINY) + 1e-3))
  total = count(lambda r: np.ones_like(r, bool))
  assert surely_lost > total / 2
  x = jnp.zeros((2, 8))
  report = psgd.path_structure(mlp, params, x)
  counted = sum(leaf.unrepresentable for leaf in report.leaves)
  assert surely_lost <= counted <= maybe_lost
  assert "out of range" in str(report)
  tx = psgd.scale_by_path_norm(mlp, x)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  leaves = jax.tree.leaves(updates)
  assert all(np.isfinite(np.asarray(u)).all() for u in leaves)
  # Their updates are 0 (a few more underflow: 1/κ for κ near the float32 maximum).
  zero = sum(int((np.asarray(u) == 0).sum()) for u in leaves)
  assert counted <= zero <= maybe_lost + total // 1000


@pytest.mark.parametrize("depth", [8, 32, 64])
def test_normalized_kappa_is_rescaling_equivariant_and_depth_free(depth):
  """κ/φ² under a real rescaling, and a depth-free identity.

  * Rescaling every hidden unit v by a power of two c_v (incoming ×c_v, outgoing ÷c_v) maps
    κ/φ² of an edge u→v to κ/φ² · (c_u/c_v)²: (κ/φ²)·w² is unchanged (exact, the factors
    are powers of two).
  * Every path ends through one edge of the last layer, so Σ (κ_e/φ²)·w_e² over the last
    layer (weights and output bias) is 1 at any depth, where raw κ is ~2^depth.

  Mutations caught: the old version rescaled nothing and allowed a 2^20 spread; normalising
  by 2^(exponent) only (dropping the mantissa m ∈ [1, 2) of φ², `_scales.compute_scales`)
  breaks the identity here.
  """
  rng = np.random.default_rng(depth)
  base = make_mlp(depth, 32, init="he", seed=depth)
  scaled = [dict(layer) for layer in base]
  for layer in range(depth - 1):
    c = 2.0 ** rng.integers(-6, 7, 32)
    scaled[layer]["w"] = scaled[layer]["w"] * c[None, :]
    scaled[layer]["b"] = scaled[layer]["b"] * c
    scaled[layer + 1]["w"] = scaled[layer + 1]["w"] / c[:, None]
  x = jnp.zeros((1, 8))
  fn = jax.jit(lambda prm: psgd.path_scales(mlp, prm, x, normalize=True))
  results = []
  for params in (base, scaled):
    params = as_dtype(params, jnp.float32)
    kappa = fn(params)
    assert all(np.isfinite(np.asarray(k)).all() for k in jax.tree.leaves(kappa))
    results.append([{n: np.asarray(k[n], np.float64) * np.asarray(l[n], np.float64) ** 2
                     for n in ("w", "b")} for k, l in zip(kappa, params)])
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-30)
  # The rescaling really changed κ/φ² itself (else the first check would be vacuous).
  raw = [np.asarray(k["w"]) for k in (fn(as_dtype(base, jnp.float32))[1],
                                      fn(as_dtype(scaled, jnp.float32))[1])]
  assert not np.allclose(raw[0], raw[1], rtol=0.1)
  mass = results[0][-1]["w"].sum() + results[0][-1]["b"].sum()
  np.testing.assert_allclose(mass, 1.0, rtol=1e-4)


def test_unbalanced_deep_network_keeps_invariance_in_float32():
  """Per-unit factors up to 10^3 compounding over depth 8: trajectories stay equivalent."""
  rng = np.random.default_rng(7)
  depth, width = 8, 16
  base = make_mlp(depth, width, init="balanced", seed=11)
  scaled = [dict(layer) for layer in base]
  factors = []
  for layer in range(depth - 1):
    c = 10.0 ** rng.uniform(-3, 3, width)
    factors.append(c)
    scaled[layer]["w"] = scaled[layer]["w"] * c[None, :]
    scaled[layer]["b"] = scaled[layer]["b"] * c
    scaled[layer + 1]["w"] = scaled[layer + 1]["w"] / c[:, None]
  x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)

  def run(params):
    params = as_dtype(params, jnp.float32)
    tx = psgd.path_sgd(1e-3, mlp, x, momentum=0.9)
    state = tx.init(params)
    loss = lambda prm: jnp.mean((mlp(prm, x) - y) ** 2)

    @jax.jit
    def step(prm, st):
      updates, st = tx.update(jax.grad(loss)(prm), st, prm)
      return optax.apply_updates(prm, updates), st

    outputs = []
    for _ in range(12):
      params, state = step(params, state)
      outputs.append(np.asarray(mlp(params, x)))
    return outputs

  for a, b in zip(run(base), run(scaled)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * np.abs(a).max())


def test_nan_gradients_propagate_and_apply_if_finite_skips_them():
  params = as_dtype(make_mlp(3, 8), jnp.float32)
  x = jnp.zeros((1, 8))
  tx = psgd.path_sgd(0.1, mlp, x)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), jax.tree.map(jnp.ones_like,
                                                                                params))
  updates, _ = tx.update(bad, tx.init(params), params)
  assert all(np.isnan(np.asarray(u)).any() for u in jax.tree.leaves(updates))
  guarded = optax.apply_if_finite(tx, max_consecutive_errors=3)
  updates, state = guarded.update(bad, guarded.init(params), params)
  assert all((np.asarray(u) == 0).all() for u in jax.tree.leaves(updates))
  assert int(state.notfinite_count) == 1


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_large_dense_layers_match_reference(p):
  """Layers of >= 2^16 weights take the blocked |W|^p matvec path: same κ and φ_p."""
  params64 = make_mlp(3, 320, init="he", seed=5, n_in=300, n_out=10)
  params = as_dtype(params64, jnp.float32)
  rounded = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in params]
  log_kappa, log_total = reference_kappa(rounded, p=p)
  x = jnp.zeros((4, 300))
  kappa, norm = jax.jit(lambda prm: (psgd.path_scales(mlp, prm, x, p=p),
                                     psgd.path_norm(mlp, prm, x, p=p)))(params)
  np.testing.assert_allclose(float(norm), np.exp(log_total / p), rtol=1e-4)
  for got, ref in zip(kappa, log_kappa):
    for key in ("w", "b"):
      np.testing.assert_allclose(np.asarray(got[key]), np.exp(ref[key]), rtol=1e-4)
  # And the gradient path through it: one Path-SGD step equals -lr * g / κ.
  grads = jax.tree.map(jnp.ones_like, params)
  tx = psgd.path_sgd(0.5, mlp, x, p=p)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for u, ref in zip(updates, log_kappa):
    np.testing.assert_allclose(np.asarray(u["w"]), -0.5 / np.exp(ref["w"]), rtol=1e-4)


@pytest.mark.parametrize("normalize", [False, True])
def test_nan_parameter_gives_nan_path_norm_and_scales_not_zero(normalize):
  params = as_dtype(make_mlp(3, 8), jnp.float32)
  x = jnp.zeros((1, 8))
  leaves, treedef = jax.tree.flatten(params)
  leaves[1] = leaves[1].at[(0,) * leaves[1].ndim].set(jnp.nan)
  bad = jax.tree.unflatten(treedef, leaves)
  assert np.isfinite(float(psgd.path_norm(mlp, params, x)))
  assert np.isnan(float(psgd.path_norm(mlp, bad, x)))
  kappa = psgd.path_scales(mlp, bad, x, normalize=normalize)
  assert any(np.isnan(np.asarray(k)).any() for k in jax.tree.leaves(kappa))


# ------------------------------------------------------------------------------------------
# Deep CNNs: 3x3 SAME convolutions with biases and ReLU, then a dense read-out.
# ------------------------------------------------------------------------------------------


def cnn(params, x):
  for layer in params[:-1]:
    x = jax.lax.conv_general_dilated(x, layer["w"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.nn.relu(x + layer["b"][None, None, None, :])
  return x.reshape(x.shape[0], -1) @ params[-1]["w"] + params[-1]["b"][None, :]


def make_cnn(depth, channels, *, init="he", seed=0, image=(4, 4, 3), n_out=4):
  rng = np.random.default_rng(seed)
  gain = 2.0 if init == "he" else 1.0
  sizes = [image[2]] + [channels] * (depth - 1)
  params = [{"w": rng.normal(0, np.sqrt(gain / (9 * c_in)), (3, 3, c_in, c_out)),
             "b": rng.normal(0, 0.1, c_out)} for c_in, c_out in zip(sizes[:-1], sizes[1:])]
  fan_in = image[0] * image[1] * channels
  params.append({"w": rng.normal(0, np.sqrt(1.0 / fan_in), (fan_in, n_out)),
                 "b": rng.normal(0, 0.1, n_out)})
  return params


def reference_cnn_kappa(params, image, p=2.0):
  """Float64 κ of a conv/ReLU/dense network, the plain way, written independently.

  Such a network has no constant factors and no operation other than ReLU on activations,
  so its path network is the network itself with weights |w|^p and ReLU acting as the
  identity on non-negative values: Σ N(|w|^p, 1) differentiated in float64 (no overflow below
  depth ~1000 here).
  """
  with jax.enable_x64(True):
    powered = jax.tree.map(lambda w: jnp.abs(jnp.asarray(w, jnp.float64)) ** p, params)
    ones = jnp.ones((1,) + tuple(image), jnp.float64)
    total, grads = jax.value_and_grad(lambda v: jnp.sum(cnn(v, ones)))(powered)
    kappa = jax.tree.map(lambda g: np.asarray(g) ** (2.0 / p), grads)
    return kappa, float(total)


CNN_CASES = [(16, 64, "he", dtype) for dtype in [jnp.float32, jnp.bfloat16, jnp.float16]]
CNN_CASES += [(64, 32, "balanced", jnp.bfloat16), (128, 32, "he", jnp.float32)]


@pytest.mark.parametrize("depth,channels,init,dtype", CNN_CASES)
def test_deep_cnn_kappa_matches_float64_where_representable(depth, channels, init, dtype):
  image = (4, 4, 3)
  params = jax.tree.map(lambda w: jnp.asarray(w, dtype),
                        make_cnn(depth, channels, init=init, seed=depth + channels))
  rounded = jax.tree.map(lambda w: np.asarray(w, np.float64), params)
  kappa_ref, total = reference_cnn_kappa(rounded, image)
  x = jnp.zeros((2,) + image, dtype)
  tx = psgd.path_sgd(0.1, cnn, x, normalize=True)
  grads = jax.tree.map(jnp.ones_like, params)

  @jax.jit
  def compute(prm):
    updates, _ = tx.update(grads, tx.init(prm), prm)
    return (psgd.path_scales(cnn, prm, x), psgd.path_scales(cnn, prm, x, normalize=True),
            updates)

  kappa, normalised, updates = compute(params)
  fitted = 0
  for got, got_norm, ref in zip(jax.tree.leaves(kappa), jax.tree.leaves(normalised),
                                jax.tree.leaves(kappa_ref)):
    g, gn = np.asarray(got), np.asarray(got_norm)
    assert g.dtype == np.float32 and not np.isnan(g).any() and not np.isnan(gn).any()
    fits = (ref < F32_MAX * (1 - 1e-3)) & (ref > F32_TINY * (1 + 1e-3))
    np.testing.assert_allclose(g[fits], ref[fits], rtol=1e-3)
    normalised_ref = ref / total
    fits_normalised = (normalised_ref < F32_MAX * 0.999) & (normalised_ref > F32_TINY * 1.001)
    np.testing.assert_allclose(gn[fits_normalised], normalised_ref[fits_normalised], rtol=1e-3)
    fitted += int(fits_normalised.sum())
  assert fitted > 0.99 * sum(np.size(r) for r in jax.tree.leaves(kappa_ref))
  for u, prm in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == prm.dtype and np.isfinite(np.asarray(u, np.float32)).all()
