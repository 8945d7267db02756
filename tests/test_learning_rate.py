"""suggest_learning_rate / relative_step: the definition against a float64 NumPy re-computation
from brute-force path enumeration, rescaling invariance, the first step it promises, the
errors, and a smoke test that the suggested η trains two gallery models a little.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import models_zoo as mz
import pathsgd_jax as psgd
from reference import mlp_bruteforce

WIDTHS = (3, 4, 3, 2)


def _mlp(seed=0, dead_unit=True):
    params = mz.init_mlp(jax.random.key(seed), WIDTHS)
    if dead_unit:  # hidden unit 1 of layer 1 has no input: κ of its outgoing edges is 0
        params[0]["w"] = params[0]["w"].at[:, 1].set(0.0)
        params[0]["b"] = params[0]["b"].at[1].set(0.0)
    return params


def _random_tree(params, seed):
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params))))
    return jax.tree.map(lambda w: jax.random.normal(next(keys), w.shape, w.dtype), params)


def _numpy_sizes(params, tree, *, gradient):
    """Per layer (kernel + bias = one group) Σ Δ²κ / Σ w²κ in float64, κ by brute force;
    for a gradient Δ = g/κ (0 where κ = 0)."""
    layers = mz.mlp_to_layers(params)
    phi, kappas, _ = mlp_bruteforce(layers, p=2.0)
    sizes = []
    for (w, b), (kw, kb), t in zip(layers, kappas, tree):
        step = mass = 0.0
        for x, k, d in ((w, kw, t["w"]), (b, kb, t["b"])):
            d = np.asarray(d, np.float64)
            if gradient:
                step += np.sum(np.where(k > 0, d * d / np.where(k > 0, k, 1), 0))
            else:
                step += np.sum(d * d * k)
            mass += np.sum(x * x * k)
        sizes.append(step / mass)
    return np.array(sizes), phi


def test_definition_matches_float64_bruteforce():
    params = _mlp()
    x = jnp.ones((2, WIDTHS[0]))
    grads = _random_tree(params, 1)
    sizes, phi = _numpy_sizes(params, grads, gradient=True)
    s_raw = np.sum(np.sqrt(sizes))
    assert np.all(sizes > 0)
    got = psgd.suggest_learning_rate(mz.mlp_apply, params, grads, x, target=0.3, momentum=0.9)
    np.testing.assert_allclose(got, 0.3 * (1 - 0.9) / s_raw, rtol=2e-5)
    # normalize=True: the η of κ/φ², i.e. divided by φ².
    got = psgd.suggest_learning_rate(mz.mlp_apply, params, grads, x, target=0.1, normalize=True)
    np.testing.assert_allclose(got, 0.1 / s_raw / phi**2, rtol=2e-5)
    step = _random_tree(params, 2)
    sizes, _ = _numpy_sizes(params, step, gradient=False)
    np.testing.assert_allclose(psgd.relative_step(mz.mlp_apply, params, step, x),
                               np.sum(np.sqrt(sizes)), rtol=2e-5)


def test_first_path_sgd_step_has_the_target_size():
    """The promise: the first update of path_sgd(η) has relative_step target·(1 − β)."""
    x, y = mz.regression_batch(0, 16, WIDTHS[0], WIDTHS[-1])
    params = _mlp(dead_unit=False)
    grads = jax.grad(mz.mse(mz.mlp_apply))(params, x, y)
    lr = psgd.suggest_learning_rate(mz.mlp_apply, params, grads, x, target=0.2, momentum=0.5)
    tx = psgd.path_sgd(lr, mz.mlp_apply, x, momentum=0.5)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(psgd.relative_step(mz.mlp_apply, params, updates, x), 0.1,
                               rtol=1e-5)


def test_invariant_under_node_rescalings():
    """A network and its rescaled copy (same function) get the same η and step size; SGD's
    gradient norm, the usual yardstick, does not survive the rescaling."""
    x, y = mz.regression_batch(3, 16, WIDTHS[0], WIDTHS[-1])
    params = _mlp(dead_unit=False)
    rescaled = mz.rescale_mlp_params(params, [2.0 ** (np.arange(n) - n // 2)
                                              for n in WIDTHS[1:-1]])
    np.testing.assert_allclose(mz.mlp_apply(rescaled, x), mz.mlp_apply(params, x), rtol=1e-5)
    loss = mz.mse(mz.mlp_apply)
    g, g_rescaled = jax.grad(loss)(params, x, y), jax.grad(loss)(rescaled, x, y)
    a, b = (psgd.suggest_learning_rate(mz.mlp_apply, prm, grads, x)
            for prm, grads in ((params, g), (rescaled, g_rescaled)))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    norm = lambda t: float(optax.tree.norm(t))  # noqa: E731
    assert abs(norm(g) / norm(g_rescaled) - 1) > 0.1  # the test has teeth
    # relative_step of corresponding steps (Δ scales like w) agrees too.
    step = _random_tree(params, 4)
    factors = [jnp.asarray(r["w"] / p["w"]) for r, p in zip(rescaled, params)]
    step_rescaled = [{"w": s["w"] * f, "b": s["b"] * (r["b"] / p["b"])}
                     for s, f, r, p in zip(step, factors, rescaled, params)]
    np.testing.assert_allclose(psgd.relative_step(mz.mlp_apply, params, step, x),
                               psgd.relative_step(mz.mlp_apply, rescaled, step_rescaled, x),
                               rtol=1e-5)


def test_bad_arguments_raise_with_the_fix():
    params = _mlp(dead_unit=False)
    x = jnp.ones((2, WIDTHS[0]))
    grads = _random_tree(params, 0)
    suggest = lambda **kw: psgd.suggest_learning_rate(  # noqa: E731
        kw.pop("fn", mz.mlp_apply), kw.pop("params", params), kw.pop("grads", grads), x, **kw)
    for target in (0.0, -1.0, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="target"):
            suggest(target=target)
    for momentum in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match="momentum"):
            suggest(momentum=momentum)
    with pytest.raises(ValueError, match="normalize must be True or False"):
        suggest(normalize="yes")
    with pytest.raises(ValueError, match="apply_fn must be callable"):
        suggest(fn="mlp")
    with pytest.raises(ValueError, match="params is None"):
        suggest(params=None)
    with pytest.raises(ValueError, match="grads must be a tree like params"):
        suggest(grads=grads[:2])
    with pytest.raises(ValueError,
                       match=r"grads leaf '1/w' has shape \(3, 4\), its parameter \(4, 3\)"):
        suggest(grads=[grads[0], {"w": grads[1]["w"].T, "b": grads[1]["b"]}, grads[2]])
    with pytest.raises(ValueError, match="zero on every path weight"):
        suggest(grads=jax.tree.map(jnp.zeros_like, grads))
    with pytest.raises(ValueError, match="not finite"):
        suggest(grads=jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads))
    with pytest.raises(ValueError, match="updates must be a tree like params"):
        psgd.relative_step(mz.mlp_apply, params, grads[0], x)


def test_suggested_rate_trains_two_gallery_models():
    """One setting (the default target, momentum 0.9, max_relative_step 0.1) on Equinox's MLP
    and the paper's MLP from an unbalanced start: a few steps lower the loss."""
    eqx = pytest.importorskip("equinox")
    x, y = mz.digits(96, flat=True)
    model = eqx.nn.MLP(784, 10, width_size=32, depth=1, key=jax.random.key(3))
    eqx_params, static = eqx.partition(model, eqx.is_array)
    mlp = psgd.unbalanced_init(jax.random.key(1), psgd.balanced_init(
        jax.random.key(0), mz.init_mlp(jax.random.key(2), (784, 32, 32, 10))),
        power_of_two=True)
    cases = ((psgd.equinox.apply_fn(model), eqx_params,
              lambda prm, xb: jax.vmap(eqx.combine(prm, static))(xb)),
             (mz.mlp_apply, mlp, mz.mlp_apply))
    for fn, params, forward in cases:
        loss = jax.jit(lambda prm, xb, yb, forward=forward: mz.cross_entropy(forward(prm, xb), yb))
        grad = jax.jit(jax.grad(loss))
        lr = psgd.suggest_learning_rate(fn, params, grad(params, x[:32], y[:32]), x[:32],
                                        momentum=0.9)
        tx = psgd.path_sgd(lr, fn, x[:2], momentum=0.9, max_relative_step=0.1)
        opt_state = tx.init(params)
        update = jax.jit(tx.update)
        start = float(loss(params, x, y))
        for i in range(9):
            j = (i * 32) % 96
            updates, opt_state = update(grad(params, x[j:j + 32], y[j:j + 32]), opt_state,
                                        params)
            params = optax.apply_updates(params, updates)
        end = float(loss(params, x, y))
        assert np.isfinite(end) and end < 0.97 * start, (lr, start, end)
