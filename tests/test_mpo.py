"""Matrix product operator layers (pathsgd_jax.mpo) against independent NumPy references.

References used here: a brute-force contraction of the cores by explicit index loops (row-major
splitting of the row and column indices), NumPy SVDs of the kernel's unfoldings (Eckart-Young
and the sequential-SVD bounds), and a brute-force enumeration of the paths of an MPO network
through its bond units (input -> bond units -> output of each core chain).
"""

import itertools
import math

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pathsgd_jax as psgd
from pathsgd_jax import mpo


def _np_contract(cores):
    """W[i, j] = sum_d prod_k c_k[d_k, i_k, j_k, d_{k+1}], by explicit loops (row-major)."""
    cores = [np.asarray(c, np.float64) for c in cores]
    in_modes = [c.shape[1] for c in cores]
    out_modes = [c.shape[2] for c in cores]
    bonds = [c.shape[0] for c in cores] + [1]
    w = np.zeros((math.prod(in_modes), math.prod(out_modes)))
    for i in range(w.shape[0]):
        ii = np.unravel_index(i, in_modes)
        for j in range(w.shape[1]):
            jj = np.unravel_index(j, out_modes)
            for d in itertools.product(*[range(b) for b in bonds[1:-1]]):
                dd = (0,) + d + (0,)
                w[i, j] += np.prod([c[dd[k], ii[k], jj[k], dd[k + 1]]
                                    for k, c in enumerate(cores)])
    return w


def _unfolding(w, in_modes, out_modes, k):
    """W[(i_1 j_1 .. i_k j_k), (i_{k+1} j_{k+1} ..)] in NumPy."""
    n = len(in_modes)
    t = np.asarray(w, np.float64).reshape(tuple(in_modes) + tuple(out_modes))
    t = t.transpose([a for m in range(n) for a in (m, n + m)])
    return t.reshape(math.prod(in_modes[:k]) * math.prod(out_modes[:k]), -1)


def _rand(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- decompose / contract


def test_contract_matches_bruteforce_index_loops():
    shapes = [(1, 2, 3, 2), (2, 3, 1, 3), (3, 2, 2, 1)]
    cores = [_rand(k, s) for k, s in enumerate(shapes)]
    np.testing.assert_allclose(np.asarray(mpo.contract(cores)), _np_contract(cores),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_modes,out_modes", [
    ((12,), (6,)), ((3, 4), (2, 3)), ((2, 3, 2), (2, 1, 4)), ((4, 7, 7, 4), (1, 10, 1, 1))])
def test_full_bond_decomposition_is_exact(in_modes, out_modes):
    w = _rand(1, (math.prod(in_modes), math.prod(out_modes)))
    full = math.prod(in_modes) * math.prod(out_modes)
    cores = mpo.decompose(jnp.asarray(w), in_modes, out_modes, full)
    assert [c.shape for c in cores] == list(mpo.core_shapes(in_modes, out_modes, full))
    np.testing.assert_allclose(np.asarray(mpo.contract(cores)), w, rtol=1e-4, atol=2e-5)
    if math.prod(in_modes) * math.prod(out_modes) <= 200:
        np.testing.assert_allclose(_np_contract(cores), w, rtol=1e-4, atol=2e-5)
    # Cores 0..n-2 are left-orthonormal, as documented.
    for c in cores[:-1]:
        u = np.asarray(c, np.float64).reshape(-1, c.shape[3])
        np.testing.assert_allclose(u.T @ u, np.eye(c.shape[3]), atol=1e-5)


def test_two_core_truncation_error_is_discarded_singular_values():
    in_modes, out_modes = (4, 3), (3, 5)
    w = _rand(2, (12, 15))
    sigma = np.linalg.svd(_unfolding(w, in_modes, out_modes, 1), compute_uv=False)
    errors = []
    for bond in (1, 2, 4, 7, 12):
        approx = np.asarray(mpo.contract(mpo.decompose(w, in_modes, out_modes, bond)))
        err = np.linalg.norm(approx - w)
        np.testing.assert_allclose(err, np.sqrt(np.sum(sigma[bond:] ** 2)), rtol=1e-4,
                                   atol=1e-4)
        errors.append(err)
    assert len(sigma) == 12 and np.all(np.diff(errors) < 0) and errors[-1] < 1e-4


@pytest.mark.parametrize("seed", [3, 4])
def test_sequential_svd_error_between_unfolding_bounds(seed):
    # n cores: with delta_k the norm of the singular values beyond D_k of unfolding k of W,
    # max_k delta_k <= ||W - W_D||_F (every unfolding of W_D has rank <= D_k, Eckart-Young)
    # and ||W - W_D||_F <= sqrt(sum_k delta_k^2) (Oseledets 2011, Theorem 2.2).
    in_modes, out_modes = (2, 3, 2, 2), (2, 2, 3, 1)
    w = _rand(seed, (24, 12))
    errors = []
    for bond in (1, 2, 4, 8, 24):
        dims = mpo.bond_dims(in_modes, out_modes, bond)
        approx = np.asarray(mpo.contract(mpo.decompose(w, in_modes, out_modes, bond)))
        err = np.linalg.norm(approx - w)
        deltas = []
        for k in range(1, len(in_modes)):
            s = np.linalg.svd(_unfolding(w, in_modes, out_modes, k), compute_uv=False)
            deltas.append(np.sqrt(np.sum(s[dims[k]:] ** 2)))
        tol = 1e-5 * np.linalg.norm(w)  # float32 rounding
        assert max(deltas) - tol <= err <= np.sqrt(np.sum(np.square(deltas))) + tol
        errors.append(err)
    assert np.all(np.diff(errors) <= 1e-5) and errors[0] > 0.3 * np.linalg.norm(w)
    assert errors[-1] < 1e-4 * np.linalg.norm(w)


def test_bond_dims_parameters_and_compression():
    # FC2's first layer, 784 x 256 as (4,7,7,4) x (4,4,4,4): bonds 16, counted by hand.
    assert mpo.bond_dims((4, 7, 7, 4), (4, 4, 4, 4), 16) == (1, 16, 16, 16, 1)
    expected = 4 * 4 * 16 + 16 * 7 * 4 * 16 + 16 * 7 * 4 * 16 + 16 * 4 * 4
    assert mpo.num_params((4, 7, 7, 4), (4, 4, 4, 4), 16) == expected
    assert mpo.compression_ratio((4, 7, 7, 4), (4, 4, 4, 4), 16) == expected / (784 * 256)
    assert mpo.compression_ratio((4, 7, 7, 4), (4, 4, 4, 4), 16, use_bias=True) == (
        (expected + 256) / (784 * 256 + 256))
    # Caps at the rank of each cut: (2*1) | (2*3) has rank at most 2.
    assert mpo.bond_dims((2, 2), (1, 3), 100) == (1, 2, 1)
    assert mpo.bond_dims((3, 3, 3), (3, 3, 3), 100) == (1, 9, 9, 1)
    # flops: two rank-1 cores on 16 x 16, 4 * 16 + 4 * 16 multiply-adds.
    assert mpo.flops((4, 4), (4, 4), 1) == 2 * (4 * 16 + 4 * 16)


# ---------------------------------------------------------------- layers


def _linen_params(seed, in_modes, out_modes, bond, features):
    shapes = mpo.core_shapes(in_modes, out_modes, bond)
    params = {f"core_{k}": jnp.asarray(_rand(seed + k, s)) for k, s in enumerate(shapes)}
    params["bias"] = jnp.asarray(_rand(seed + 99, (features,)))
    return params


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_linen_mpodense_equals_dense_with_contracted_kernel(lead):
    in_modes, out_modes = (2, 3, 2), (3, 1, 2)
    layer = mpo.MPODense(6, in_modes, out_modes, bond_dim=3)
    params = _linen_params(0, in_modes, out_modes, 3, 6)
    x = _rand(7, lead + (12,))
    kernel = _np_contract([params[f"core_{k}"] for k in range(3)])
    expected = x.astype(np.float64) @ kernel + np.asarray(params["bias"], np.float64)
    got = layer.apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)
    dense = nn.Dense(6).apply({"params": {"kernel": mpo.contract([params[f"core_{k}"]
                                                                  for k in range(3)]),
                                          "bias": params["bias"]}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense), rtol=1e-4, atol=1e-4)


def test_nnx_mpolinear_equals_dense_with_contracted_kernel():
    in_modes, out_modes = (2, 3, 2), (3, 1, 2)
    layer = mpo.MPOLinear(12, 6, in_modes, out_modes, 3, rngs=nnx.Rngs(0))
    params = _linen_params(10, in_modes, out_modes, 3, 6)
    for k in range(3):
        getattr(layer, f"core_{k}")[...] = params[f"core_{k}"]
    layer.bias[...] = params["bias"]
    x = _rand(8, (4, 12))
    kernel = _np_contract([params[f"core_{k}"] for k in range(3)])
    expected = x.astype(np.float64) @ kernel + np.asarray(params["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), expected, rtol=1e-4,
                               atol=1e-4)
    no_bias = mpo.MPOLinear(12, 6, in_modes, out_modes, 3, use_bias=False, rngs=nnx.Rngs(0))
    assert no_bias.bias is None and len(nnx.state(no_bias, nnx.Param)) == 3


def test_init_from_dense_kernel_linen_and_nnx():
    w = _rand(5, (12, 6))
    layer = mpo.MPODense(6, (3, 4), (2, 3), bond_dim=6, kernel_init=lambda *_: jnp.asarray(w))
    params = layer.init(jax.random.key(0), jnp.ones((1, 12)))["params"]
    np.testing.assert_allclose(_np_contract([params["core_0"], params["core_1"]]), w,
                               rtol=1e-4, atol=1e-5)
    nlayer = mpo.MPOLinear(12, 6, (3, 4), (2, 3), 6, kernel_init=lambda *_: jnp.asarray(w),
                           rngs=nnx.Rngs(0))
    np.testing.assert_allclose(_np_contract([nlayer.core_0[...], nlayer.core_1[...]]), w,
                               rtol=1e-4, atol=1e-5)
    # Truncated: the best rank-2 cut of the unfolding (two cores, Eckart-Young).
    small = mpo.MPODense(6, (3, 4), (2, 3), bond_dim=2, kernel_init=lambda *_: jnp.asarray(w))
    p2 = small.init(jax.random.key(0), jnp.ones((1, 12)))["params"]
    s = np.linalg.svd(_unfolding(w, (3, 4), (2, 3), 1), compute_uv=False)
    err = np.linalg.norm(_np_contract([p2["core_0"], p2["core_1"]]) - w)
    np.testing.assert_allclose(err, np.sqrt(np.sum(s[2:] ** 2)), rtol=1e-4)


@pytest.mark.parametrize("scale", [1.0, pytest.param(2.0, marks=pytest.mark.slow)])
def test_random_init_variance_matches_dense_rule(scale):
    # Var W_ij = scale / fan_in (LeCun normal for scale 1, the rule of nn.Dense's default),
    # estimated over 1024 initialisations of a 64 x 16 kernel with four cores; E W_ij = 0.
    in_modes, out_modes, bond = (4, 2, 2, 4), (2, 2, 2, 2), 4
    layer = mpo.MPODense(16, in_modes, out_modes, bond, init_scale=scale, use_bias=False)
    x = jnp.ones((1, 64))

    @jax.jit
    @jax.vmap
    def kernel(key):
        p = layer.init(key, x)["params"]
        return mpo.contract([p[f"core_{k}"] for k in range(4)])

    w = np.asarray(kernel(jax.random.split(jax.random.key(0), 1024)), np.float64)
    np.testing.assert_allclose(np.mean(w ** 2), scale / 64, rtol=0.1)
    assert abs(np.mean(w)) < 0.05 * np.sqrt(scale / 64)
    # The output variance for a fixed input: ||x||^2 Var W_ij.
    xs = _rand(3, (64,))
    y = w.transpose(0, 2, 1) @ xs
    np.testing.assert_allclose(np.mean(y ** 2), np.sum(xs ** 2) * scale / 64, rtol=0.1)
    # The dense layer it stands in for, same statistic.
    dense = nn.Dense(16, use_bias=False)
    wd = jax.vmap(lambda k: dense.init(k, x)["params"]["kernel"])(
        jax.random.split(jax.random.key(1), 64))
    np.testing.assert_allclose(np.mean(np.asarray(wd, np.float64) ** 2), 1 / 64, rtol=0.1)


def _all_avals(jaxpr):
    """Inputs, constants and every equation's outputs, nested jaxprs included."""
    for v in list(jaxpr.invars) + list(jaxpr.constvars):
        yield v.aval
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield v.aval
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_avals(sub)


def test_no_array_of_the_kernel_size_is_formed():
    in_modes, out_modes, bond = (4, 4, 4, 4), (4, 4, 4, 4), 4
    layer = mpo.MPODense(256, in_modes, out_modes, bond)
    x = jnp.ones((2, 256))
    params = layer.init(jax.random.key(0), x)["params"]
    kernel_size = 256 * 256

    def largest(fn, *args):
        jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
        return max(math.prod(a.shape) for a in _all_avals(jaxpr) if hasattr(a, "shape"))

    assert largest(lambda p, x: layer.apply({"params": p}, x), params, x) < kernel_size // 8
    # The path network (kappa: forward and backward on one example) does not form it either.
    apply_fn = psgd.linen.apply_fn(layer)
    assert largest(lambda p: psgd.path_scales(apply_fn, p, x), params) < kernel_size // 8
    # The check can fail: the contracted kernel or a dense layer holds one.
    dense = nn.Dense(256)
    dparams = dense.init(jax.random.key(0), x)["params"]
    assert largest(lambda p, x: dense.apply({"params": p}, x), dparams, x) >= kernel_size
    assert largest(lambda p: mpo.contract([p[f"core_{k}"] for k in range(4)]),
                   params) >= kernel_size


# ---------------------------------------------------------------- path network


class _Net(nn.Module):
    """MPO(4 -> 6, bias) -> relu -> MPO(6 -> 2, no bias)."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(mpo.MPODense(6, (2, 2), (2, 3), 2, name="l1")(x))
        return mpo.MPODense(2, (3, 2), (1, 2), 2, use_bias=False, name="l2")(h)


def _bruteforce_paths(params):
    """Every path as a list of (leaf, index) edges: input or bias -> bond units -> output."""
    l1, l2 = params["l1"], params["l2"]
    a, b = np.asarray(l1["core_0"]), np.asarray(l1["core_1"])
    c, e = np.asarray(l2["core_0"]), np.asarray(l2["core_1"])
    bias = np.asarray(l1["bias"])
    paths = []
    # Into each hidden unit h = (j1, j2) of layer 1: from input i = (i1, i2) through bond
    # unit d of layer 1, or from the bias node.
    into_hidden = {h: [] for h in range(6)}
    for i1, i2, j1, j2, d in itertools.product(range(2), range(2), range(2), range(3),
                                               range(2)):
        into_hidden[j1 * 3 + j2].append(
            [(("l1", "core_0"), (0, i1, j1, d), a[0, i1, j1, d]),
             (("l1", "core_1"), (d, i2, j2, 0), b[d, i2, j2, 0])])
    for h in range(6):
        into_hidden[h].append([(("l1", "bias"), (h,), bias[h])])
    # Out of hidden unit h = (h1, h2) to output o = (o1, o2) through bond unit d of layer 2.
    for h1, h2, o2, d in itertools.product(range(3), range(2), range(2), range(2)):
        out = [(("l2", "core_0"), (0, h1, 0, d), c[0, h1, 0, d]),
               (("l2", "core_1"), (d, h2, o2, 0), e[d, h2, o2, 0])]
        for head in into_hidden[h1 * 2 + h2]:
            paths.append(head + out)
    return paths


def _bruteforce_phi_kappa(params, p):
    paths = _bruteforce_paths(params)
    phi = sum(np.prod([abs(float(w)) ** p for *_, w in path]) for path in paths) ** (1 / p)
    kappa = {(layer, leaf): np.zeros(np.shape(v))
             for layer, leaves in params.items() for leaf, v in leaves.items()}
    for path in paths:
        for n, (leaf, idx, _) in enumerate(path):
            rest = np.prod([abs(float(w)) ** p for m, (*_, w) in enumerate(path) if m != n])
            kappa[leaf][idx] += rest
    return phi, {k: v ** (2 / p) for k, v in kappa.items()}


def _net_params(seed):
    x = jnp.ones((1, 4))
    params = _Net().init(jax.random.key(seed), x)["params"]
    params = jax.tree.map(lambda v: v, params)
    params["l1"]["bias"] = jnp.asarray(_rand(seed, (6,)))
    return params


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_kappa_and_path_norm_against_bruteforce_through_bonds(p):
    params = _net_params(0)
    x = jnp.ones((3, 4))
    apply_fn = psgd.linen.apply_fn(_Net())
    phi_ref, kappa_ref = _bruteforce_phi_kappa(params, p)
    np.testing.assert_allclose(float(psgd.path_norm(apply_fn, params, x, p=p)), phi_ref,
                               rtol=1e-5)
    kappa = psgd.path_scales(apply_fn, params, x, p=p)
    for (layer, leaf), ref in kappa_ref.items():
        np.testing.assert_allclose(np.asarray(kappa[layer][leaf]), ref, rtol=1e-4,
                                   err_msg=f"{layer}/{leaf}")
    # The contracted kernels alone are a different path network (|sum_d|^p != sum_d |.|^p).
    dense = {k: {"kernel": mpo.contract([v["core_0"], v["core_1"]]), **(
        {"bias": v["bias"]} if "bias" in v else {})} for k, v in params.items()}

    def dense_fn(prm, x):
        h = jax.nn.relu(x @ prm["l1"]["kernel"] + prm["l1"]["bias"][None])
        return h @ prm["l2"]["kernel"]

    assert abs(float(psgd.path_norm(dense_fn, dense, x, p=p)) - phi_ref) > 1e-3 * phi_ref


def test_nnx_path_norm_and_structure_show_cores_and_bonds():
    model = nnx.Sequential(mpo.MPOLinear(4, 6, (2, 2), (2, 3), 2, rngs=nnx.Rngs(0)), nnx.relu,
                           mpo.MPOLinear(6, 2, (3, 2), (1, 2), 2, use_bias=False,
                                         rngs=nnx.Rngs(1)))
    x = jnp.ones((3, 4))
    state = nnx.state(model, nnx.Param)
    l1, l2 = model.layers[0], model.layers[2]
    params = {"l1": {"core_0": l1.core_0[...], "core_1": l1.core_1[...], "bias": l1.bias[...]},
              "l2": {"core_0": l2.core_0[...], "core_1": l2.core_1[...]}}
    phi_ref, kappa_ref = _bruteforce_phi_kappa(params, 2.0)
    apply_fn = psgd.nnx.apply_fn(model)
    np.testing.assert_allclose(float(psgd.path_norm(apply_fn, state, x)), phi_ref, rtol=1e-5)
    kappa = psgd.path_scales(apply_fn, state, x)
    np.testing.assert_allclose(np.asarray(kappa["layers"][2]["core_1"][...]),
                               kappa_ref[("l2", "core_1")], rtol=1e-4)
    report = psgd.path_structure(apply_fn, state, x)
    roles = {leaf.name: leaf.role for leaf in report.leaves}
    assert roles == {"layers/0/bias": "bias", "layers/0/core_0": "weight",
                     "layers/0/core_1": "weight", "layers/2/core_0": "weight",
                     "layers/2/core_1": "weight"}
    # One dense step per core; the last axis of each step's output is its right bond.
    dense_shapes = [op.shape for op in report.operations if op.role == "dense"]
    assert [s[-1] for s in dense_shapes] == [2, 1, 2, 1]


# ---------------------------------------------------------------- gauge invariance


def _np_gauge(params, rng, sigma):
    """core_k[..., d] * g[d], core_{k+1}[d, ...] / g[d] on every inner bond, in NumPy."""
    out = {}
    for layer, leaves in params.items():
        leaves = {k: np.asarray(v, np.float64) for k, v in leaves.items()}
        cores = sorted(k for k in leaves if k.startswith("core_"))
        for left, right in zip(cores[:-1], cores[1:]):
            g = np.exp(sigma * rng.standard_normal(leaves[left].shape[3]))
            leaves[left] = leaves[left] * g
            leaves[right] = leaves[right] / g[:, None, None, None]
        out[layer] = {k: jnp.asarray(v, jnp.float32) for k, v in leaves.items()}
    return out


def _trajectory(tx, params, x, y, steps):
    apply = _Net().apply
    loss = lambda prm: jnp.mean((apply({"params": prm}, x) - y) ** 2)  # noqa: E731

    @jax.jit
    def step(prm, state):
        updates, state = tx.update(jax.grad(loss)(prm), state, prm)
        return optax.apply_updates(prm, updates), state

    state, outputs = tx.init(params), []
    for _ in range(steps):
        params, state = step(params, state)
        outputs.append(np.asarray(apply({"params": params}, x)))
    return np.stack(outputs), params


def test_path_sgd_trajectory_invariant_under_bond_gauge_sgd_not():
    params = _net_params(4)
    gauged = _np_gauge(params, np.random.default_rng(0), sigma=1.0)
    x, y = jnp.asarray(_rand(1, (16, 4))), jnp.asarray(_rand(2, (16, 2)))
    apply = _Net().apply
    f0 = np.asarray(apply({"params": params}, x))
    np.testing.assert_allclose(np.asarray(apply({"params": gauged}, x)), f0, rtol=1e-4,
                               atol=1e-5)
    apply_fn = psgd.linen.apply_fn(_Net())
    for momentum in (None, 0.9):
        tx = psgd.path_sgd(0.01, apply_fn, x, momentum=momentum)
        out, final = _trajectory(tx, params, x, y, 20)
        out_g, final_g = _trajectory(tx, gauged, x, y, 20)
        assert np.max(np.abs(out[-1] - f0)) > 0.05  # it trained
        np.testing.assert_allclose(out_g, out, rtol=2e-3, atol=2e-4)
        # Equivariance at the level of the cores: A(rho(w)) = rho(A(w)), rho the same gauge.
        regauged = _np_gauge(final, np.random.default_rng(0), sigma=1.0)
        for layer in final:
            for leaf in final[layer]:
                np.testing.assert_allclose(np.asarray(final_g[layer][leaf]),
                                           np.asarray(regauged[layer][leaf]), rtol=3e-3,
                                           atol=3e-4, err_msg=f"{layer}/{leaf}")
    out, _ = _trajectory(optax.sgd(0.01), params, x, y, 20)
    out_g, _ = _trajectory(optax.sgd(0.01), gauged, x, y, 20)
    assert np.max(np.abs(out_g - out)) > 0.05


# ---------------------------------------------------------------- bad input


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"features = 10 .*out_modes \(2, 4\)"):
        mpo.MPODense(10, (3, 4), (2, 4), 2).init(jax.random.key(0), jnp.ones((1, 12)))
    with pytest.raises(ValueError, match="last axis 10.*in_modes"):
        mpo.MPODense(8, (3, 4), (2, 4), 2).init(jax.random.key(0), jnp.ones((1, 10)))
    with pytest.raises(ValueError, match="bond_dim must be >= 1"):
        mpo.MPODense(8, (3, 4), (2, 4), 0).init(jax.random.key(0), jnp.ones((1, 12)))
    with pytest.raises(ValueError, match="in_features = 13"):
        mpo.MPOLinear(13, 8, (3, 4), (2, 4), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="same length"):
        mpo.decompose(jnp.ones((12, 8)), (3, 4), (8,), 2)
    with pytest.raises(ValueError, match=r"kernel has shape \(12, 8\).*\(12, 6\)"):
        mpo.decompose(jnp.ones((12, 8)), (3, 4), (2, 3), 2)
    with pytest.raises(ValueError, match="positive integers"):
        mpo.bond_dims((3, 0), (2, 2), 2)
    with pytest.raises(ValueError, match="bond_dim must be an integer"):
        mpo.compression_ratio((3, 4), (2, 2), 2.5)
    with pytest.raises(ValueError, match="bond 1 does not match"):
        mpo.contract([jnp.ones((1, 2, 2, 3)), jnp.ones((2, 2, 2, 1))])
    with pytest.raises(ValueError, match="one scale vector per inner bond"):
        mpo.gauge([jnp.ones((1, 2, 2, 3)), jnp.ones((3, 2, 2, 1))], [])
    with pytest.raises(ValueError, match="init_scale must be > 0"):
        mpo.MPOLinear(12, 8, (3, 4), (2, 4), 2, init_scale=0.0, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- CLI smoke test


def test_cli_mpo_smoke(tmp_path):
    import json

    from pathsgd_jax.experiments import cli

    code = cli.main(["mpo", "--models", "fc2", "--bond-dims", "2", "--no-dense",
                     "--optimizers", "path-sgd-momentum", "--epochs", "1",
                     "--train-subset", "200", "--lr-grids", "path-sgd-momentum=0.001",
                     "--out", str(tmp_path), "--quiet"])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "mpo.png").stat().st_size > 5_000
    (arch,) = results["architectures"]
    # Cores by hand: 784x256 at D=2 is 32+112+112+32, 256x10 is 8+160+16+8; biases 256+10.
    assert arch["params"] == 288 + 192 + 266
    runs = {r["init"]: r for r in results["runs"]}
    assert set(runs) == {"random", "unbalanced"}
    # Path-SGD is gauge invariant: the same test error from both starts.
    assert runs["random"]["test_error"] == pytest.approx(runs["unbalanced"]["test_error"],
                                                         abs=2e-3)
