"""``normalize=True``: κ/φ_p² at p = 1, 2, 3 against brute-force path enumeration.

p = 2 takes its own (square-root-free) code branch, so p = 1 and p = 3 are what check the
general one. Mutation caught (on a scratch copy): dividing by φ_p^p instead of φ_p² in the
general branch (``_scales.compute_scales``: adding ``(2/p - 1)·log φ_p^p`` to log κ when
``normalize``) fails every p ≠ 2 case here (18x off at p = 1 on this network).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models_zoo as mz
import pathsgd_jax as psgd
import reference as ref

WIDTHS = [3, 4, 3, 2]
RTOL = 2e-5


def _case(seed=0):
    # Weights ×2: φ_p is then far from 1 at every p (φ_p² and φ_p^p differ clearly).
    params = jax.tree.map(lambda a: 2.0 * a, mz.init_mlp(jax.random.key(seed), WIDTHS))
    x, y = mz.regression_batch(seed + 1, 6, WIDTHS[0], WIDTHS[-1])
    grads = jax.grad(mz.mse(mz.mlp_apply))(params, x, y)
    return params, x, grads


def _reference(params, p):
    phi, kap, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), p)
    return phi, mz.mlp_kappa_tree(kap)


def _assert_tree_close(got, want, rtol=RTOL):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=0.0)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("jit", [False, True])
def test_normalized_scales_equal_kappa_over_phi_squared(p, jit):
    params, x, _ = _case()
    phi, kappa = _reference(params, p)
    fn = lambda prm: psgd.path_scales(mz.mlp_apply, prm, x, p=p, normalize=True)  # noqa: E731
    got = (jax.jit(fn) if jit else fn)(params)
    _assert_tree_close(got, jax.tree.map(lambda k: k / phi ** 2, kappa))
    # Not vacuous: raw κ is φ_p² times larger, and φ_p^p is not φ_p².
    assert phi ** 2 > 2.0 and (p == 2 or abs(phi ** p / phi ** 2 - 1.0) > 0.5)


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_normalized_transform_update_is_gradient_times_phi_squared_over_kappa(p):
    params, x, grads = _case(3)
    phi, kappa = _reference(params, p)
    tx = psgd.scale_by_path_norm(mz.mlp_apply, x, p=p, normalize=True)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    want = jax.tree.map(lambda g, k: np.asarray(g, np.float64) * phi ** 2 / k, grads, kappa)
    _assert_tree_close(updates, want)


@pytest.mark.parametrize("p,refresh_every", [(1.0, 1), (3.0, 1), (3.0, 2)])
def test_normalized_path_sgd_step_is_minus_lr_g_phi_squared_over_kappa(p, refresh_every):
    params, x, grads = _case(5)
    phi, kappa = _reference(params, p)
    lr = 0.03
    tx = psgd.path_sgd(lr, mz.mlp_apply, x, p=p, normalize=True, refresh_every=refresh_every)
    updates, _ = tx.update(grads, tx.init(params), params)
    want = jax.tree.map(lambda g, k: -lr * np.asarray(g, np.float64) * phi ** 2 / k, grads,
                        kappa)
    _assert_tree_close(updates, want)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_normalized_path_mass_of_the_last_layer_sums_to_one(p):
    """Every path ends through one edge of the last layer (a weight or the output bias), so
    Σ (κ_e/φ_p² · |w_e|²)^(p/2) over that layer is 1 — a reference-free identity, checked
    on a deeper network than brute force could enumerate."""
    params = mz.init_mlp(jax.random.key(9), [6, 16, 16, 16, 16, 3], bias=True)
    x = jnp.ones((1, 6))
    kappa = psgd.path_scales(mz.mlp_apply, params, x, p=p, normalize=True)
    last, k_last = params[-1], kappa[-1]
    mass = sum(float(np.sum((np.asarray(k_last[n], np.float64)
                             * np.asarray(last[n], np.float64) ** 2) ** (p / 2)))
               for n in ("w", "b"))
    np.testing.assert_allclose(mass, 1.0, rtol=1e-5)
    # Likewise every path starts at an input (first-layer weight) or at a bias.
    first = float(np.sum((np.asarray(kappa[0]["w"], np.float64)
                          * np.asarray(params[0]["w"], np.float64) ** 2) ** (p / 2)))
    biases = sum(float(np.sum((np.asarray(k["b"], np.float64)
                               * np.asarray(layer["b"], np.float64) ** 2) ** (p / 2)))
                 for k, layer in zip(kappa, params))
    np.testing.assert_allclose(first + biases, 1.0, rtol=1e-5)
