"""Masked leaves act as fixed constants in the path network (README, ``mask``).

A masked *hidden* bias or scale lies on paths to the output: the other leaves' κ must be
those of the network that keeps it as a constant edge (|c|^p like any constant), while the
masked leaf's own update passes through unscaled (κ = 1). Tests elsewhere only masked the
output bias, which lies on no other leaf's path, so they could not tell.

Mutations caught (on a scratch copy): masked leaves entering the path network as zeros
(``constants`` replaced by ``zeros_like`` in ``_scales.compute_scales``) fails every test
here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models_zoo as mz
import pathsgd_jax as psgd
import reference as ref

WIDTHS = [3, 4, 3, 2]


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("hidden", [0, 1])
def test_masked_hidden_bias_is_a_constant_edge(p, hidden):
    params = mz.init_mlp(jax.random.key(5), WIDTHS)
    x, y = mz.regression_batch(6, 5, WIDTHS[0], WIDTHS[-1])
    mask = [{"w": True, "b": k != hidden} for k in range(len(params))]
    kappa = psgd.path_scales(mz.mlp_apply, params, x, p=p, mask=mask)
    # Reference: the full network, the masked bias an ordinary (constant) edge.
    _, kap, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), p)
    kap = mz.mlp_kappa_tree(kap)
    np.testing.assert_array_equal(np.asarray(kappa[hidden]["b"]), 1.0)
    for k in range(len(params)):
        for name in ("w", "b"):
            if (k, name) != (hidden, "b"):
                np.testing.assert_allclose(np.asarray(kappa[k][name]), kap[k][name],
                                           rtol=2e-5, err_msg=f"{k}/{name}")
    # Not vacuous: without that edge, the downstream κ would differ.
    layers = mz.mlp_to_layers(params)
    layers[hidden] = (layers[hidden][0], None)
    _, kap_without, _ = ref.mlp_bruteforce(layers, p)
    assert not np.allclose(kap_without[-1][0], kap[-1]["w"], rtol=1e-2)
    # And the optimizer: g passes through on the masked leaf, g/κ elsewhere.
    grads = jax.grad(mz.mse(mz.mlp_apply))(params, x, y)
    lr = 0.1
    tx = psgd.path_sgd(lr, mz.mlp_apply, x, p=p, mask=mask)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates[hidden]["b"]),
                               -lr * np.asarray(grads[hidden]["b"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates[-1]["w"], np.float64),
                               -lr * np.asarray(grads[-1]["w"], np.float64) / kap[-1]["w"],
                               rtol=5e-5)


def _scaled_mlp(params, x):
    """h = relu((x W1 + b1) · s); out = h W2 + b2 (s a per-unit scale, e.g. a frozen gain)."""
    h = jax.nn.relu((x @ params["w1"] + params["b1"][None, :]) * params["s"][None, :])
    return h @ params["w2"] + params["b2"][None, :]


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_masked_scale_is_a_constant_edge_weight(p):
    rng = np.random.default_rng(1)
    params = {"w1": rng.normal(size=(3, 4)), "b1": rng.normal(size=4),
              "s": rng.uniform(0.3, 3.0, size=4) * np.array([1, -1, 1, -1]),
              "w2": rng.normal(size=(4, 2)), "b2": rng.normal(size=2)}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    mask = {"w1": True, "b1": True, "s": False, "w2": True, "b2": True}
    x = jnp.ones((2, 3))
    kappa = psgd.path_scales(_scaled_mlp, params, x, p=p, mask=mask)
    f64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    s = f64["s"]
    # Folded network: s multiplies the edges into each hidden unit (a constant factor).
    layers = [(f64["w1"] * s[None, :], f64["b1"] * s), (f64["w2"], f64["b2"])]
    phi, kap, _ = ref.mlp_bruteforce(layers, p)
    np.testing.assert_array_equal(np.asarray(kappa["s"]), 1.0)
    np.testing.assert_allclose(np.asarray(kappa["w2"]), kap[1][0], rtol=2e-5)
    np.testing.assert_allclose(np.asarray(kappa["b2"]), kap[1][1], rtol=2e-5)
    # w1's edge carries w1·s; κ excludes w1 but keeps the constant |s|^p: κ_folded · |s|².
    np.testing.assert_allclose(np.asarray(kappa["w1"]), kap[0][0] * s[None, :] ** 2, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(kappa["b1"]), kap[0][1] * s ** 2, rtol=2e-5)
    np.testing.assert_allclose(float(psgd.path_norm(_scaled_mlp, params, x, p=p, mask=mask)),
                               phi, rtol=2e-5)
