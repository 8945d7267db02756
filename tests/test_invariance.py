"""Rescaling invariance: the property Path-SGD is built on (NIPS 2015, section 3).

Two rescaled-equivalent ReLU networks (hidden unit v: incoming weights and bias x c, outgoing
weights / c) compute the same function and have the same path norm; Path-SGD maps them to
equivalent networks at every step (A(rho(w)) = rho(A(w))), SGD does not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import models_zoo as mz
import pathsgd_jax
import reference as ref

WIDTHS = [3, 5, 4, 2]


def _setup(seed=0, widths=WIDTHS):
    params = mz.init_mlp(jax.random.key(seed), widths)
    cs = mz.random_rescaling(seed, widths)
    return params, cs, mz.rescale_mlp_params(params, cs)


def _unrescale(params, cs):
    return mz.rescale_mlp_params(params, [1.0 / c for c in cs])


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_rescaling_keeps_function_and_path_norm(p):
    params, cs, scaled = _setup(1)
    x = jax.random.normal(jax.random.key(2), (7, WIDTHS[0]))
    np.testing.assert_allclose(np.asarray(mz.mlp_apply(scaled, x)),
                               np.asarray(mz.mlp_apply(params, x)), rtol=1e-4, atol=1e-5)
    phi = float(pathsgd_jax.path_norm(mz.mlp_apply, params, x, p=p))
    phi_s = float(pathsgd_jax.path_norm(mz.mlp_apply, scaled, x, p=p))
    np.testing.assert_allclose(phi_s, phi, rtol=2e-5)
    # Not a trivial statement: the parameter norm itself changes.
    sq = lambda t: sum(float(jnp.sum(a ** 2)) for a in jax.tree.leaves(t))  # noqa: E731
    assert abs(sq(scaled) - sq(params)) > 0.1 * sq(params)


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_kappa_transforms_with_rescaling(p):
    params, cs, scaled = _setup(3)
    x = jnp.ones((1, WIDTHS[0]))
    kap = pathsgd_jax.path_scales(mz.mlp_apply, params, x, p=p)
    kap_s = pathsgd_jax.path_scales(mz.mlp_apply, scaled, x, p=p)
    # Edge u -> v with unit factors c_u, c_v (1 for inputs, outputs and bias nodes):
    # kappa' = kappa * (c_u / c_v)^2.
    level_c = [np.ones(WIDTHS[0])] + list(cs) + [np.ones(WIDTHS[-1])]
    for k in range(len(WIDTHS) - 1):
        cu, cv = level_c[k], level_c[k + 1]
        np.testing.assert_allclose(np.asarray(kap_s[k]["w"]),
                                   np.asarray(kap[k]["w"]) * (cu[:, None] / cv[None, :]) ** 2,
                                   rtol=5e-5)
        np.testing.assert_allclose(np.asarray(kap_s[k]["b"]),
                                   np.asarray(kap[k]["b"]) * cv ** -2.0, rtol=5e-5)


def _make_step(tx, x, y):
    loss = mz.mse(mz.mlp_apply)

    @jax.jit
    def step(prm, state):
        g = jax.grad(loss)(prm, x, y)
        updates, state = tx.update(g, state, prm)
        return optax.apply_updates(prm, updates), state

    return step


def _trajectory(tx, params, x, y, n_steps, step=None):
    """``step`` (jitted, shared by both networks: same shapes, one compilation)."""
    loss = mz.mse(mz.mlp_apply)
    step = step or _make_step(tx, x, y)
    state = tx.init(params)
    losses = [float(loss(params, x, y))]
    for _ in range(n_steps):
        params, state = step(params, state)
        losses.append(float(loss(params, x, y)))
    return params, losses


N_STEPS = 15


@pytest.mark.parametrize("p,momentum,nesterov", [
    (2.0, None, False),
    (2.0, 0.9, False),
    (1.0, None, False),
    (3.0, 0.9, True),
])
def test_path_sgd_trajectories_are_rescaling_invariant(p, momentum, nesterov):
    params, cs, scaled = _setup(0)
    x, y = mz.regression_batch(1, 16, WIDTHS[0], WIDTHS[-1])
    x_test = jax.random.normal(jax.random.key(5), (9, WIDTHS[0]))
    tx = pathsgd_jax.path_sgd(0.05, mz.mlp_apply, x, p=p, momentum=momentum,
                              nesterov=nesterov)
    step = _make_step(tx, x, y)
    a, losses_a = _trajectory(tx, params, x, y, N_STEPS, step)
    b, losses_b = _trajectory(tx, scaled, x, y, N_STEPS, step)
    # Training does something.
    assert losses_a[-1] < 0.95 * losses_a[0]
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(mz.mlp_apply(b, x_test)),
                               np.asarray(mz.mlp_apply(a, x_test)), rtol=1e-4, atol=1e-5)
    # Undoing the rescaling on the second trajectory gives the first one.
    b_back = _unrescale(b, cs)
    for la, lb in zip(a, b_back):
        for name in la:
            np.testing.assert_allclose(np.asarray(lb[name]), np.asarray(la[name]),
                                       rtol=1e-4, atol=1e-5)
    # And the two trajectories did move away from the start, differently per coordinate.
    assert max(float(jnp.max(jnp.abs(la["w"] - l0["w"]))) for la, l0 in zip(a, params)) > 1e-2


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_sgd_trajectories_diverge_under_rescaling(momentum):
    params, cs, scaled = _setup(0)
    x, y = mz.regression_batch(1, 16, WIDTHS[0], WIDTHS[-1])
    x_test = jax.random.normal(jax.random.key(5), (9, WIDTHS[0]))
    tx = optax.sgd(0.05, momentum=momentum)
    step = _make_step(tx, x, y)
    a, _ = _trajectory(tx, params, x, y, N_STEPS, step)
    b, _ = _trajectory(tx, scaled, x, y, N_STEPS, step)
    out_a, out_b = np.asarray(mz.mlp_apply(a, x_test)), np.asarray(mz.mlp_apply(b, x_test))
    # Visibly different functions (allclose is False for NaN/inf too).
    assert not np.allclose(out_a, out_b, rtol=0.05, atol=0.05)
    diff = np.abs(out_a - out_b)
    assert (not np.all(np.isfinite(diff))) or diff.max() > 0.1


def _unbalanced_mlp(seed=7):
    """Balanced init, then a few hidden units rescaled by 10 exp(z) as in the paper."""
    widths = [4, 8, 8, 2]
    params = mz.init_mlp(jax.random.key(seed), widths, bias=True, bias_scale=0.0)
    rng = np.random.default_rng(seed)
    cs = []
    for n in widths[1:-1]:
        c = np.ones(n)
        for unit in rng.integers(0, n, size=n // 4):
            c[unit] *= 10.0 * np.exp(rng.normal())
        cs.append(c)
    return widths, mz.rescale_mlp_params(params, cs)


def test_update_is_not_the_gradient_and_is_grad_over_kappa():
    widths, params = _unbalanced_mlp()
    x, y = mz.regression_batch(2, 8, widths[0], widths[-1])
    lr = 0.1
    g = jax.grad(mz.mse(mz.mlp_apply))(params, x, y)
    tx = pathsgd_jax.path_sgd(lr, mz.mlp_apply, x)
    updates, _ = jax.jit(tx.update)(g, tx.init(params), params)
    _, kap_ref, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), 2.0)
    kap_ref = mz.mlp_kappa_tree(kap_ref)
    for k in range(len(params)):
        for name in params[k]:
            u = np.asarray(updates[k][name], np.float64)
            gg = np.asarray(g[k][name], np.float64)
            # Equals -lr * g / kappa_reference.
            np.testing.assert_allclose(u, -lr * gg / kap_ref[k][name], rtol=5e-5, atol=1e-12)
    # ... and is not -lr * g (the bug of the authors' PyTorch code): overall far apart.
    flat_u = np.concatenate([np.ravel(a) for a in jax.tree.leaves(updates)])
    flat_g = np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])
    rel = np.linalg.norm(flat_u + lr * flat_g) / np.linalg.norm(lr * flat_g)
    assert rel > 0.5
    # Not even a rescaled gradient: the ratio update / gradient varies across coordinates.
    nz = np.abs(flat_g) > 1e-6
    ratio = flat_u[nz] / (-lr * flat_g[nz])
    assert ratio.max() / ratio.min() > 10.0
