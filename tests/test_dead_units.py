"""The dead-unit guard: κ = 0 gives a 0 update; any κ > 0, however small, is divided by.

A hidden unit rescaled by 2^-60 (incoming ×2^-60, outgoing ×2^60: the same function) puts
κ ≈ 1e-36 on its outgoing edges, close to float32's smallest normal number; a second unit
with zero outgoing weights is dead (κ = 0 exactly on its incoming edges and bias).

Mutation caught (on a scratch copy): a guard at ``kappa > 1e-20`` instead of ``kappa > 0``
(``_transform._safe_divide``) zeroes the tiny-κ updates and fails every test here; a guard
that returns the raw update instead of 0 where κ = 0 fails the dead-edge checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models_zoo as mz
import pathsgd_jax as psgd
import reference as ref

WIDTHS = [3, 4, 3, 2]
TINY = 2.0 ** -60


def _network():
    layers = mz.mlp_to_layers(mz.init_mlp(jax.random.key(2), WIDTHS, bias=True))
    layers = ref.rescale_mlp_units(layers, 1, np.array([TINY, 1.0, 1.0, 1.0]))
    layers[1][0][1, :] = 0.0  # unit 1 of the first hidden layer is dead
    return mz.layers_to_mlp(layers), layers


def test_reference_premises():
    """κ of the tiny unit's outgoing edges is ~1e-36 (normal in float32); the dead unit's
    incoming edges have κ = 0."""
    _, layers = _network()
    _, kap, _ = ref.mlp_bruteforce(layers, 2.0)
    tiny = kap[1][0][0, :]
    assert np.all((tiny > np.finfo(np.float32).tiny * 10) & (tiny < 1e-33)), tiny
    assert np.all(kap[0][0][:, 1] == 0.0) and kap[0][1][1] == 0.0


@pytest.mark.parametrize("jit", [False, True])
def test_tiny_kappa_is_divided_by_and_dead_edges_get_exact_zeros(jit):
    params, layers = _network()
    _, kap, _ = ref.mlp_bruteforce(layers, 2.0)
    kap = mz.mlp_kappa_tree(kap)
    x = jnp.ones((2, WIDTHS[0]))
    kappa = psgd.path_scales(mz.mlp_apply, params, x)
    ones = jax.tree.map(jnp.ones_like, params)
    tx = psgd.scale_by_path_norm(mz.mlp_apply, x)
    update = jax.jit(tx.update) if jit else tx.update
    updates, _ = update(ones, tx.init(params), params)
    # κ itself against brute force, including the tiny entries.
    tiny_kappa = np.asarray(kappa[1]["w"])[0, :]
    np.testing.assert_allclose(tiny_kappa, kap[1]["w"][0, :], rtol=1e-5)
    # The update is exactly 1/κ there (the guard does not touch it), about 1e36.
    got = np.asarray(updates[1]["w"])[0, :]
    np.testing.assert_array_equal(got, np.float32(1.0) / tiny_kappa)
    np.testing.assert_allclose(got, 1.0 / kap[1]["w"][0, :], rtol=1e-5)
    # Dead edges: exact zeros (not 0/0, not the raw update).
    assert np.all(np.asarray(kappa[0]["w"])[:, 1] == 0.0)
    np.testing.assert_array_equal(np.asarray(updates[0]["w"])[:, 1], 0.0)
    assert float(updates[0]["b"][1]) == 0.0
    # Everything else is 1/κ to rounding.
    for u, k in zip(jax.tree.leaves(updates), jax.tree.leaves(kap)):
        live = k > 0
        np.testing.assert_allclose(np.asarray(u, np.float64)[live], 1.0 / k[live], rtol=1e-5)


def test_path_sgd_step_on_tiny_and_dead_edges():
    params, layers = _network()
    _, kap, _ = ref.mlp_bruteforce(layers, 2.0)
    kap = mz.mlp_kappa_tree(kap)
    x, y = mz.regression_batch(3, 5, WIDTHS[0], WIDTHS[-1])
    grads = jax.grad(mz.mse(mz.mlp_apply))(params, x, y)
    lr = 0.1
    tx = psgd.path_sgd(lr, mz.mlp_apply, x)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    g = np.asarray(grads[1]["w"], np.float64)[0, :]  # ~1e-18: scaled by 2^-60 too
    assert np.count_nonzero(g) >= 2  # (a unit of the next layer may be inactive)
    np.testing.assert_allclose(np.asarray(updates[1]["w"], np.float64)[0, :],
                               -lr * g / kap[1]["w"][0, :], rtol=1e-5)
    assert np.abs(np.asarray(updates[1]["w"])[0, :]).max() > 1e10
    np.testing.assert_array_equal(np.asarray(updates[0]["w"])[:, 1], 0.0)
    assert float(updates[0]["b"][1]) == 0.0
