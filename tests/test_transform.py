"""scale_by_path_norm / path_sgd as Optax transformations, and the Flax integrations."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import models_zoo as mz
import pathsgd_jax
import pathsgd_jax.linen as pj_linen
import pathsgd_jax.nnx as pj_nnx
import reference as ref

WIDTHS = [3, 5, 4, 2]
RTOL = 5e-5


def _problem(seed=0, widths=WIDTHS, n=8):
    params = mz.init_mlp(jax.random.key(seed), widths)
    x, y = mz.regression_batch(seed + 100, n, widths[0], widths[-1])
    return params, x, y


def _ref_kappa(params, p=2.0):
    _, kap, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), p)
    return mz.mlp_kappa_tree(kap)


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _close(a, b, rtol=RTOL, atol=1e-7):
    chex.assert_trees_all_close(_np(a), _np(b), rtol=rtol, atol=atol)


_grad = jax.jit(jax.grad(mz.mse(mz.mlp_apply)))


# ------------------------------------------------------------------------------------------
# Basic behaviour
# ------------------------------------------------------------------------------------------


def test_scale_by_path_norm_divides_by_kappa():
    params, x, y = _problem(0)
    g = _grad(params, x, y)
    tx = pathsgd_jax.scale_by_path_norm(mz.mlp_apply, x)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    updates, _ = jax.jit(tx.update)(g, tx.init(params), params)
    expected = jax.tree.map(lambda gg, k: np.asarray(gg, np.float64) / k, g, _ref_kappa(params))
    _close(updates, expected)


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_path_sgd_plain_step_matches_manual(p):
    params, x, y = _problem(1)
    lr = 0.03
    tx = pathsgd_jax.path_sgd(lr, mz.mlp_apply, x, p=p)
    g = _grad(params, x, y)
    updates, _ = jax.jit(tx.update)(g, tx.init(params), params)
    expected = jax.tree.map(lambda gg, k: -lr * np.asarray(gg, np.float64) / k, g,
                            _ref_kappa(params, p))
    _close(updates, expected)
    for u, prm in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
        assert u.dtype == prm.dtype


@pytest.mark.parametrize("tx_factory", [
    lambda x: pathsgd_jax.path_sgd(0.1, mz.mlp_apply, x),
    lambda x: pathsgd_jax.path_sgd(0.1, mz.mlp_apply, x, momentum=0.9),
    lambda x: pathsgd_jax.scale_by_path_norm(mz.mlp_apply, x),
    lambda x: pathsgd_jax.scale_by_path_norm(mz.mlp_apply, x, refresh_every=2),
], ids=["path_sgd", "momentum", "scale", "scale_refresh2"])
def test_update_without_params_raises(tx_factory):
    params, x, y = _problem(2)
    tx = tx_factory(x)
    state = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    needs_params = r"needs the current parameters.*tx\.update\(grads, opt_state, params\)"
    with pytest.raises(ValueError, match=needs_params):
        tx.update(g, state)
    with pytest.raises(ValueError, match=needs_params):
        tx.update(g, state, None)


@pytest.mark.parametrize("refresh_every,momentum", [(1, None), (3, 0.9)])
def test_jit_traces_once(refresh_every, momentum):
    params, x, y = _problem(3)
    tx = pathsgd_jax.path_sgd(optax.linear_schedule(0.05, 0.01, 5), mz.mlp_apply, x,
                              momentum=momentum, refresh_every=refresh_every)
    n_traces = 0
    loss = mz.mse(mz.mlp_apply)

    @jax.jit
    def step(prm, state, xb, yb):
        nonlocal n_traces
        n_traces += 1
        g = jax.grad(loss)(prm, xb, yb)
        updates, state = tx.update(g, state, prm)
        return optax.apply_updates(prm, updates), state

    state = tx.init(params)
    for i in range(7):
        xb, yb = mz.regression_batch(200 + i, 8, WIDTHS[0], WIDTHS[-1])
        params, state = step(params, state, xb, yb)
    assert n_traces == 1
    for leaf in jax.tree.leaves(params):
        assert bool(jnp.all(jnp.isfinite(leaf)))


def test_linear_schedule():
    params, x, y = _problem(4)
    schedule = optax.linear_schedule(0.1, 0.01, 4)
    tx = pathsgd_jax.path_sgd(schedule, mz.mlp_apply, x)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(6):
        g = _grad(params, x, y)
        updates, state = update(g, state, params)
        lr_t = float(schedule(t))
        expected = jax.tree.map(lambda gg, k: -lr_t * np.asarray(gg, np.float64) / k, g,
                                _ref_kappa(params))
        _close(updates, expected)
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_matches_manual(nesterov):
    params, x, y = _problem(5)
    lr, beta = 0.05, 0.9
    tx = pathsgd_jax.path_sgd(lr, mz.mlp_apply, x, momentum=beta, nesterov=nesterov)
    update = jax.jit(tx.update)
    state = tx.init(params)
    manual = _np(params)
    trace = jax.tree.map(np.zeros_like, manual)
    for _ in range(5):
        g = _grad(params, x, y)
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        # Manual step from the manual params, with reference kappa.
        g_m = _np(_grad(jax.tree.map(jnp.asarray, manual), x, y))
        d = jax.tree.map(lambda gg, k: gg / k, g_m, _ref_kappa(manual))
        trace = jax.tree.map(lambda m, dd: dd + beta * m, trace, d)
        direction = (jax.tree.map(lambda m, dd: dd + beta * m, trace, d) if nesterov
                     else trace)
        manual = jax.tree.map(lambda w, dd: w - lr * dd, manual, direction)
        _close(params, manual, rtol=1e-4, atol=1e-6)


def test_chain_with_clip_and_weight_decay():
    params, x, y = _problem(6)
    lr, wd, max_norm = 0.05, 1e-2, 0.1
    tx = optax.chain(optax.clip_by_global_norm(max_norm), optax.add_decayed_weights(wd),
                     pathsgd_jax.path_sgd(lr, mz.mlp_apply, x))
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(3):
        g = _grad(params, x, y)
        updates, state = update(g, state, params)
        gn = _np(g)
        norm = np.sqrt(sum(np.sum(a ** 2) for a in jax.tree.leaves(gn)))
        assert norm > max_norm  # clipping is active
        clipped = jax.tree.map(lambda a: a * max_norm / norm, gn)
        decayed = jax.tree.map(lambda a, w: a + wd * w, clipped, _np(params))
        expected = jax.tree.map(lambda a, k: -lr * a / k, decayed, _ref_kappa(params))
        _close(updates, expected)
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("refresh_every", [2, 3])
def test_refresh_every_keeps_kappa_between_refreshes(refresh_every):
    params, x, y = _problem(7)
    lr = 0.1
    tx = pathsgd_jax.path_sgd(lr, mz.mlp_apply, x, refresh_every=refresh_every)
    update = jax.jit(tx.update)
    state = tx.init(params)
    manual = _np(params)
    kappa = None
    lib_kappas = []
    for t in range(7):
        g = _grad(params, x, y)
        updates, state = update(g, state, params)
        with np.errstate(divide="ignore", invalid="ignore"):
            lib_kappas.append(jax.tree.map(lambda gg, u: -lr * np.asarray(gg, np.float64)
                                           / np.asarray(u, np.float64), g, updates))
        params = optax.apply_updates(params, updates)
        # Manual: kappa refreshed from the current params at t = 0, k, 2k, ...
        if t % refresh_every == 0:
            kappa = _ref_kappa(manual)
        g_m = _np(_grad(jax.tree.map(jnp.asarray, manual), x, y))
        manual = jax.tree.map(lambda w, gg, k: w - lr * gg / k, manual, g_m, kappa)
        _close(params, manual, rtol=1e-4, atol=1e-6)
    # Within a window the implied kappa (-lr g / u) is constant; it changes at refreshes.
    flat = [np.concatenate([np.ravel(a) for a in jax.tree.leaves(k)]) for k in lib_kappas]
    for t in range(1, 7):
        ok = np.isfinite(flat[t]) & np.isfinite(flat[t - 1])  # 0/0 where a gradient is 0
        assert ok.sum() > 0.5 * ok.size
        same = np.allclose(flat[t][ok], flat[t - 1][ok], rtol=1e-3)
        assert same == (t % refresh_every != 0), t


def test_refresh_every_differs_from_every_step():
    params, x, y = _problem(8)
    finals = []
    for k in (1, 4):
        tx = pathsgd_jax.path_sgd(0.1, mz.mlp_apply, x, refresh_every=k)
        update = jax.jit(tx.update)
        state = tx.init(params)
        prm = params
        for _ in range(4):
            u, state = update(_grad(prm, x, y), state, prm)
            prm = optax.apply_updates(prm, u)
        finals.append(_np(prm))
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])))
    assert diff > 1e-6


# ------------------------------------------------------------------------------------------
# Numerics: bf16, dead units
# ------------------------------------------------------------------------------------------


def test_bf16_params_give_bf16_updates():
    params32, x, y = _problem(9)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params32)
    lr = 0.1
    g = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _grad(params32, x, y))
    tx = pathsgd_jax.path_sgd(lr, mz.mlp_apply, x.astype(jnp.bfloat16))
    updates, _ = jax.jit(tx.update)(g, tx.init(params), params)
    for u in jax.tree.leaves(updates):
        assert u.dtype == jnp.bfloat16
    # kappa of the float32 cast of the bf16 params, loosely (bf16 rounding of g and u).
    kappa = pathsgd_jax.path_scales(mz.mlp_apply, jax.tree.map(lambda a: a.astype(jnp.float32),
                                                                 params), x)
    _, kap_ref, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), 2.0)
    chex.assert_trees_all_close(_np(kappa), mz.mlp_kappa_tree(kap_ref), rtol=RTOL)
    expected = jax.tree.map(lambda gg, k: -lr * np.asarray(gg, np.float64) / k, g,
                            mz.mlp_kappa_tree(kap_ref))
    _close(updates, expected, rtol=2e-2, atol=1e-6)


def test_bf16_kappa_computed_in_float32():
    params32, x, _ = _problem(10)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params32)
    kappa = pathsgd_jax.path_scales(mz.mlp_apply, params, x.astype(jnp.bfloat16))
    _, kap_ref, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), 2.0)
    # Whatever dtype kappa is returned in, it must be at least as accurate as a bf16 rounding
    # of the float32 result.
    chex.assert_trees_all_close(_np(kappa), mz.mlp_kappa_tree(kap_ref), rtol=8e-3)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_dead_unit_gives_finite_updates(momentum):
    params, x, y = _problem(11)
    params[0]["w"] = params[0]["w"].at[:, 2].set(0.0)
    params[0]["b"] = params[0]["b"].at[2].set(0.0)
    tx = pathsgd_jax.path_sgd(0.1, mz.mlp_apply, x, momentum=momentum)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(3):
        g = _grad(params, x, y)
        updates, state = update(g, state, params)
        for u in jax.tree.leaves(updates):
            assert bool(jnp.all(jnp.isfinite(u)))
        params = optax.apply_updates(params, updates)
    for leaf in jax.tree.leaves(params):
        assert bool(jnp.all(jnp.isfinite(leaf)))


# ------------------------------------------------------------------------------------------
# Flax: Linen TrainState, NNX Optimizer, Linen vs NNX
# ------------------------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(5, name="l1")(x))
        x = nn.relu(nn.Dense(4, name="l2")(x))
        return nn.Dense(2, name="l3")(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 5, rngs=rngs)
        self.l2 = nnx.Linear(5, 4, rngs=rngs)
        self.l3 = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


NAMES = ("l1", "l2", "l3")


def _dict_to_layers(d):
    return [(np.asarray(d[n]["kernel"], np.float64), np.asarray(d[n]["bias"], np.float64))
            for n in NAMES]


def _dict_ref_kappa(d, p=2.0):
    _, kap, _ = ref.mlp_bruteforce(_dict_to_layers(d), p)
    return {n: {"kernel": kw, "bias": kb} for n, (kw, kb) in zip(NAMES, kap)}


def _random_biases(d, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype)
        if "bias" in jax.tree_util.keystr(path) else a, d)


def test_linen_train_state():
    module = LinenMLP()
    _, x, y = _problem(12)
    params = _random_biases(module.init(jax.random.key(0), x)["params"], 0)
    lr = 0.05
    tx = pathsgd_jax.path_sgd(lr, pj_linen.apply_fn(module), x)
    state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)

    def loss(prm):
        return jnp.mean((state.apply_fn({"params": prm}, x) - y) ** 2)

    @jax.jit
    def train_step(st):
        return st.apply_gradients(grads=jax.grad(loss)(st.params))

    manual = _np(params)
    for _ in range(3):
        state = train_step(state)
        g = _np(jax.grad(loss)(jax.tree.map(jnp.asarray, manual)))
        manual = jax.tree.map(lambda w, gg, k: w - lr * gg / k, manual, g,
                              _dict_ref_kappa(manual))
        _close(state.params, manual, rtol=1e-4, atol=1e-6)
    assert int(state.step) == 3


def test_nnx_optimizer():
    model = NnxMLP(nnx.Rngs(0))
    _, x, y = _problem(13)
    pure = _random_biases(nnx.to_pure_dict(nnx.state(model, nnx.Param)), 1)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    lr = 0.05
    tx = pathsgd_jax.path_sgd(lr, pj_nnx.apply_fn(model), x)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def train_step(m, opt):
        grads = nnx.grad(loss_fn)(m)
        opt.update(m, grads)

    manual = _np(pure)
    linen = LinenMLP()

    def linen_loss(prm):
        return jnp.mean((linen.apply({"params": prm}, x) - y) ** 2)

    for _ in range(3):
        train_step(model, optimizer)
        g = _np(jax.grad(linen_loss)(jax.tree.map(jnp.asarray, manual)))
        manual = jax.tree.map(lambda w, gg, k: w - lr * gg / k, manual, g,
                              _dict_ref_kappa(manual))
        _close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), manual, rtol=1e-4, atol=1e-6)


def test_linen_and_nnx_kappa_identical():
    model = NnxMLP(nnx.Rngs(3))
    x = jnp.ones((2, 3))
    pure = _random_biases(nnx.to_pure_dict(nnx.state(model, nnx.Param)), 2)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    module = LinenMLP()
    linen_params = jax.tree.map(jnp.asarray, pure)
    np.testing.assert_array_equal(np.asarray(module.apply({"params": linen_params}, x)),
                                  np.asarray(model(x)))
    k_linen = pathsgd_jax.path_scales(pj_linen.apply_fn(module), linen_params, x)
    for params in (nnx.state(model, nnx.Param), nnx.as_pure(nnx.state(model, nnx.Param))):
        k_nnx = pathsgd_jax.path_scales(pj_nnx.apply_fn(model), params, x)
        k_nnx = nnx.to_pure_dict(k_nnx) if isinstance(k_nnx, nnx.State) else k_nnx
        chex.assert_trees_all_equal(jax.tree.map(np.asarray, k_nnx),
                                    jax.tree.map(np.asarray, k_linen))
    _close(k_linen, _dict_ref_kappa(pure), rtol=RTOL)
    # Model untouched by the adapter.
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model, nnx.Param)), pure)
