"""The contract optax checks for its own optimizers, applied to Path-SGD.

Extra keyword arguments, `inject_hyperparams`, `MultiSteps`, schedules, dtypes, state
stability under `lax.cond` (types and shardings), abstract initialisation,
`tree_map_params`, non-finite gradients and `apply_if_finite`.

The reference step everywhere is the definition, ``u = -lr * trace(g / κ)`` with κ from
``psgd.path_scales`` at the current params (κ itself is checked against brute force elsewhere).
Everything runs under ``jit`` with module-level jitted functions, so compilations are shared.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import pathsgd_jax as psgd
from models_zoo import named_mlp

WIDTHS = (3, 6, 4, 2)


mlp = named_mlp


def init_params(seed=0, widths=WIDTHS, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 2 * (len(widths) - 1))
    params = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        w = jax.random.normal(keys[2 * i], (a, b)) / math.sqrt(a)
        bias = 0.3 * jax.random.normal(keys[2 * i + 1], (b,))
        params[f"l{i}"] = {"w": w.astype(dtype), "b": bias.astype(dtype)}
    return params


def batch(seed, n=8, widths=WIDTHS, dtype=jnp.float32):
    kx, ky = jax.random.split(jax.random.key(100 + seed))
    x = jax.random.normal(kx, (n, widths[0])).astype(dtype)
    y = jax.random.normal(ky, (n, widths[-1])).astype(dtype)
    return x, y


def loss(params, x, y):
    out = mlp(params, x).astype(jnp.float32)
    return jnp.mean((out - y.astype(jnp.float32)) ** 2)


grad_fn = jax.jit(jax.grad(loss))
X0, _ = batch(0)


@functools.cache
def kappa_fn(p):
    return jax.jit(lambda prm: psgd.path_scales(mlp, prm, X0, p=p))


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
    chex.assert_trees_all_equal_structs(a, b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(
        np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol, atol=atol), a, b)


def manual_step(params, grads, trace, lr, momentum, p=2.0):
    """The definition of one Path-SGD step (heavy-ball momentum on g/κ)."""
    kappa = kappa_fn(p)(params)
    direction = jax.tree.map(lambda g, k: g / k, grads, kappa)
    if momentum is not None:
        trace = jax.tree.map(lambda d, t: d + momentum * t, direction, trace)
        direction = trace
    updates = jax.tree.map(lambda d: -lr * d, direction)
    return optax.apply_updates(params, updates), trace


# ------------------------------------------------------------------------------------------
# Extra keyword arguments.
# ------------------------------------------------------------------------------------------


def test_extra_kwargs_are_ignored_without_retracing():
    params = init_params()
    grads = grad_fn(params, *batch(1))
    tx = optax.chain(optax.clip_by_global_norm(10.0),
                     psgd.path_sgd(0.1, mlp, X0, momentum=0.9, refresh_every=3))
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    traces = []

    @jax.jit
    def step_with_extra(grads, state, params, value):
        traces.append(None)
        return tx.update(grads, state, params, value=value, rng=jax.random.key(0))

    plain_step = jax.jit(tx.update)
    state = tx.init(params)
    for i in range(4):
        updates, new_state = step_with_extra(grads, state, params, jnp.float32(i))
        ref_updates, ref_state = plain_step(grads, state, params)
        chex.assert_trees_all_equal(updates, ref_updates)
        chex.assert_trees_all_equal(new_state, ref_state)
        state = new_state
    assert len(traces) == 1
    # optax's state utilities find Path-SGD's step counter.
    counts = optax.tree_utils.tree_get_all_with_path(state, "count")
    assert [int(v) for _, v in counts] == [4]


# ------------------------------------------------------------------------------------------
# inject_hyperparams.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p, refresh_every", [(2.0, 1), (3.0, 2)])
def test_inject_hyperparams_matches_plain_factory(p, refresh_every):
    params = init_params()
    plain = psgd.path_sgd(0.05, mlp, X0, p=p, momentum=0.9, refresh_every=refresh_every)
    injected = optax.inject_hyperparams(psgd.path_sgd, static_args=("apply_fn",))(
        learning_rate=0.05, apply_fn=mlp, example_input=X0, momentum=0.9, p=p,
        refresh_every=refresh_every)
    s_plain, s_inj = plain.init(params), injected.init(params)
    assert float(s_inj.hyperparams["learning_rate"]) == pytest.approx(0.05)
    assert float(s_inj.hyperparams["momentum"]) == pytest.approx(0.9)
    chex.assert_trees_all_equal_shapes_and_dtypes(s_inj.inner_state, s_plain)
    up_plain, up_inj = jax.jit(plain.update), jax.jit(injected.update)
    p_plain = p_inj = params
    for i in range(5):
        x, y = batch(i)
        u_plain, s_plain = up_plain(grad_fn(p_plain, x, y), s_plain, p_plain)
        u_inj, s_inj = up_inj(grad_fn(p_inj, x, y), s_inj, p_inj)
        assert_trees_close(u_inj, u_plain, rtol=2e-5, atol=1e-7)
        p_plain = optax.apply_updates(p_plain, u_plain)
        p_inj = optax.apply_updates(p_inj, u_inj)
    assert_trees_close(p_inj, p_plain, rtol=2e-5, atol=1e-6)
    chex.assert_trees_all_equal_shapes_and_dtypes(s_inj.inner_state, s_plain)
    # A learning rate changed in the state takes effect at the next step.
    s_inj.hyperparams["learning_rate"] = jnp.asarray(0.0125, jnp.float32)
    x, y = batch(9)
    u_inj, _ = up_inj(grad_fn(p_inj, x, y), s_inj, p_inj)
    u_plain, _ = up_plain(grad_fn(p_plain, x, y), s_plain, p_plain)
    assert_trees_close(u_inj, jax.tree.map(lambda u: u / 4, u_plain), rtol=2e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------
# MultiSteps (gradient accumulation).
# ------------------------------------------------------------------------------------------


def test_multisteps_equals_mean_of_k_then_one_step():
    k = 3
    params = init_params()
    tx = optax.MultiSteps(psgd.path_sgd(0.1, mlp, X0, momentum=0.9, refresh_every=2),
                          every_k_schedule=k)
    inner = psgd.path_sgd(0.1, mlp, X0, momentum=0.9, refresh_every=2)
    state, inner_state = tx.init(params), inner.init(params)
    update, inner_update = jax.jit(tx.update), jax.jit(inner.update)
    ref_params = params
    for cycle in range(3):
        grads = [grad_fn(params, *batch(10 * cycle + j)) for j in range(k)]
        for j, g in enumerate(grads):
            updates, state = update(g, state, params)
            if j < k - 1:
                for leaf in jax.tree.leaves(updates):
                    assert not np.any(np.asarray(leaf)), "MultiSteps must hold updates at zero"
            params = optax.apply_updates(params, updates)
        mean = jax.tree.map(lambda *gs: sum(gs) / k, *grads)
        ref_updates, inner_state = inner_update(mean, inner_state, ref_params)
        ref_params = optax.apply_updates(ref_params, ref_updates)
        assert_trees_close(params, ref_params, rtol=1e-5, atol=1e-6)
    assert int(state.inner_opt_state[0].count) == 3


# ------------------------------------------------------------------------------------------
# Schedules.
# ------------------------------------------------------------------------------------------


def test_exponential_decay_schedule_with_momentum():
    schedule = optax.exponential_decay(0.1, transition_steps=2, decay_rate=0.5)
    momentum = 0.9
    tx = psgd.path_sgd(schedule, mlp, X0, momentum=momentum)
    params = ref = init_params()
    trace = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(5):
        x, y = batch(t)
        updates, state = update(grad_fn(params, x, y), state, params)
        params = optax.apply_updates(params, updates)
        ref, trace = manual_step(ref, grad_fn(ref, x, y), trace, float(schedule(t)), momentum)
        assert_trees_close(params, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# dtypes.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, momentum, lr, refresh_every", [
    (jnp.float32, 0.9, "schedule", 2),
    (jnp.bfloat16, 0.9, "schedule", 2),
    (jnp.bfloat16, None, "constant", 1),
    (jnp.float16, 0.9, "constant", 1),
])
def test_updates_keep_params_dtype(dtype, momentum, lr, refresh_every):
    learning_rate = 0.05 if lr == "constant" else optax.exponential_decay(0.05, 1, 0.9)
    params = init_params(dtype=dtype)
    x, y = batch(0, dtype=dtype)
    tx = psgd.path_sgd(learning_rate, mlp, x, momentum=momentum, refresh_every=refresh_every)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return grads, updates, state

    for _ in range(3):
        grads, updates, state = step(params, state)
        chex.assert_trees_all_equal_dtypes(grads, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
        params = optax.apply_updates(params, updates)
        chex.assert_trees_all_equal_shapes_and_dtypes(params, init_params(dtype=dtype))
        for leaf in jax.tree.leaves(updates):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
            assert np.any(np.asarray(leaf, np.float32) != 0)
    if momentum is not None:
        chex.assert_trees_all_equal_dtypes(state[1].trace, params)
    if refresh_every > 1:
        # κ is kept in the compute dtype, not in the params' dtype.
        assert all(k.dtype == jnp.float32 for k in jax.tree.leaves(state[0].kappa))


# ------------------------------------------------------------------------------------------
# State stable across lax.cond (as optax.apply_if_finite and MultiSteps require).
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, momentum, refresh_every", [
    (jnp.float32, None, 1),
    (jnp.bfloat16, 0.9, 3),
])
def test_state_type_stable_across_cond(dtype, momentum, refresh_every):
    params = init_params(dtype=dtype)
    x, y = batch(0, dtype=dtype)
    tx = psgd.path_sgd(optax.linear_schedule(0.1, 0.01, 10), mlp, x, momentum=momentum,
                       refresh_every=refresh_every)
    state = tx.init(params)

    @jax.jit
    def maybe_step(pred, state, params):
        grads = jax.grad(loss)(params, x, y)
        return jax.lax.cond(pred, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)

    for pred in (True, False, True, True):
        new_state = maybe_step(pred, state, params)
        chex.assert_trees_all_equal_structs(state, new_state)
        chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
        assert int(new_state[0].count) == int(state[0].count) + int(pred)
        state = new_state


def explicit_mlp(params, x):
    """The MLP written for explicit sharding: activations are gathered after every layer."""
    h = x
    n = len(params)
    for i in range(n):
        layer = params[f"l{i}"]
        h = h @ layer["w"] + layer["b"][None, :]
        h = jax.sharding.reshard(h, P(None, None))
        if i < n - 1:
            h = jax.nn.relu(h)
    return h


@pytest.mark.parametrize("refresh_every", [1, 3])
def test_state_sharding_stable_across_cond_explicit_mesh(refresh_every):
    """With explicit sharding the sharding is part of the type: a state whose sharding changes
    in an update cannot pass through lax.cond at all."""
    widths = (4, 8, 6, 2)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    specs = {"l0": {"w": P(None, "model"), "b": P("model")},
             "l1": {"w": P("data", None), "b": P()},
             "l2": {"w": P(), "b": P()}}
    with jax.set_mesh(mesh):
        params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                              init_params(widths=widths), specs,
                              is_leaf=lambda s: isinstance(s, P))
        x, y = jax.device_put(batch(0, widths=widths), NamedSharding(mesh, P()))
        tx = psgd.path_sgd(0.1, explicit_mlp, x, momentum=0.9, refresh_every=refresh_every)
        state = jax.jit(tx.init)(params)

        @jax.jit
        def maybe_step(pred, state, params):
            grads = jax.grad(lambda prm: jnp.mean((explicit_mlp(prm, x) - y) ** 2))(params)
            return jax.lax.cond(pred, lambda s: tx.update(grads, s, params)[1], lambda s: s,
                                state)

        for pred in (True, False, True):
            new_state = maybe_step(pred, state, params)
            chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
            for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
                assert after.sharding.spec == before.sharding.spec
            for t, prm in zip(jax.tree.leaves(new_state[1].trace), jax.tree.leaves(params)):
                assert t.sharding.is_equivalent_to(prm.sharding, prm.ndim)
            state = new_state


# ------------------------------------------------------------------------------------------
# Abstract initialisation and tree_map_params.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum, refresh_every", [(None, 1), (0.9, 3)])
def test_init_and_update_on_shape_dtype_structs(momentum, refresh_every):
    params = init_params()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    tx = psgd.path_sgd(0.1, mlp, jax.ShapeDtypeStruct(X0.shape, X0.dtype), momentum=momentum,
                       refresh_every=refresh_every)
    shapes = jax.eval_shape(tx.init, abstract)
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, tx.init(params))
    out = jax.eval_shape(tx.update, abstract, shapes, abstract)
    chex.assert_trees_all_equal_shapes_and_dtypes(out[0], params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out[1], shapes)
    # init computes nothing from the params' values: plain ShapeDtypeStructs do.
    chex.assert_trees_all_equal_shapes_and_dtypes(tx.init(abstract), tx.init(params))


@pytest.mark.parametrize("refresh_every", [1, 3])
def test_tree_map_params(refresh_every):
    params = init_params()
    tx = psgd.path_sgd(0.1, mlp, X0, momentum=0.9, refresh_every=refresh_every)
    state = tx.init(params)
    mapped = optax.tree_map_params(tx, lambda v: v.astype(jnp.bfloat16), state,
                                   transform_non_params=lambda v: v)
    chex.assert_trees_all_equal_dtypes(
        mapped[1].trace, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
    assert mapped[0].count.dtype == jnp.int32
    # Mapping the params' partition specs over the state, the use tree_map_params exists for.
    specs = jax.tree.map(lambda a: P(), params)
    spec_state = optax.tree_map_params(tx, lambda _, s: s, state, specs,
                                       transform_non_params=lambda _: P())
    is_spec = lambda s: isinstance(s, P)  # noqa: E731
    assert jax.tree.structure(spec_state[1].trace, is_leaf=is_spec) == jax.tree.structure(
        specs, is_leaf=is_spec)


# ------------------------------------------------------------------------------------------
# Non-finite gradients.
# ------------------------------------------------------------------------------------------

_PLAIN = psgd.path_sgd(0.1, mlp, X0)
_PLAIN_UPDATE = jax.jit(_PLAIN.update)
_SGD_UPDATE = jax.jit(optax.sgd(0.1).update)


def _poison(grads, value):
    leaves, treedef = jax.tree.flatten(grads)
    leaves[1] = leaves[1].at[(0,) * leaves[1].ndim].set(value)
    return treedef.unflatten(leaves)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_propagates_like_optax_sgd(value):
    params = init_params()
    grads = _poison(grad_fn(params, *batch(0)), value)
    ours, _ = _PLAIN_UPDATE(grads, _PLAIN.init(params), params)
    sgd, _ = _SGD_UPDATE(grads, optax.sgd(0.1).init(params), params)
    # Exactly the entries optax.sgd makes non-finite, with the same non-finite values (κ > 0
    # depends on the params only, so a bad gradient entry stays where it is).
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(sgd)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
        np.testing.assert_array_equal(a[~np.isfinite(a)], b[~np.isfinite(b)])


def test_apply_if_finite_skips_non_finite_steps():
    params = init_params()
    tx = optax.apply_if_finite(psgd.path_sgd(0.1, mlp, X0, momentum=0.9, refresh_every=3),
                               max_consecutive_errors=2)
    inner = psgd.path_sgd(0.1, mlp, X0, momentum=0.9, refresh_every=3)
    state, inner_state = tx.init(params), inner.init(params)
    step, inner_step = jax.jit(tx.update), jax.jit(inner.update)
    ref = params
    # finite, nan, finite, inf, -inf, nan (third in a row: accepted by apply_if_finite)
    poisons = [None, np.nan, None, np.inf, -np.inf, np.nan]
    for t, poison in enumerate(poisons):
        grads = grad_fn(params, *batch(t))
        if poison is not None:
            grads = _poison(grads, poison)
        updates, state = step(grads, state, params)
        if poison is None:
            ref_updates, inner_state = inner_step(grad_fn(ref, *batch(t)), inner_state, ref)
            ref = optax.apply_updates(ref, ref_updates)
            assert_trees_close(updates, ref_updates, rtol=1e-6, atol=1e-8)
        elif t < 5:
            for leaf in jax.tree.leaves(updates):
                np.testing.assert_array_equal(np.asarray(leaf), 0.0)
            assert not bool(state.last_finite)
        else:  # max_consecutive_errors exceeded: the update goes through, NaN included
            assert any(np.isnan(np.asarray(leaf)).any() for leaf in jax.tree.leaves(updates))
        params = optax.apply_updates(params, updates)
        if t < 5:
            assert_trees_close(params, ref, rtol=1e-6, atol=1e-7)
            # Skipped steps leave the inner state (count, cached κ, momentum) untouched.
            chex.assert_trees_all_close(state.inner_state, inner_state, rtol=1e-6, atol=1e-7)
    assert int(state.total_notfinite) == 4
    assert int(state.notfinite_count) == 3
