"""Global Sparse Momentum (GSM) and Path-GSM.

References used here are independent of the code under test: the active set is a NumPy
stable argsort of |w * g| over the concatenated prunable leaves (ties by position), the rule
Z <- beta Z + eta W + B * g, dW = -lr Z is re-implemented in float64 NumPy, and node
rescalings are applied by hand with `pathsgd_jax.init.rescale_units`' documented semantics
(checked against the network function).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pathsgd_jax as psgd
from models_zoo import init_mlp, mlp_apply

WIDTHS = (5, 8, 6, 3)


def params_of(seed=0, widths=WIDTHS, dtype=jnp.float32):
    return init_mlp(jax.random.key(seed), widths, dtype=dtype, bias_scale=0.3)


def batch(seed, n=16, widths=WIDTHS, dtype=jnp.float32):
    kx, ky = jax.random.split(jax.random.key(1000 + seed))
    return (jax.random.normal(kx, (n, widths[0])).astype(dtype),
            jax.random.normal(ky, (n, widths[-1])).astype(dtype))


def loss(params, x, y):
    return jnp.mean((mlp_apply(params, x).astype(jnp.float32) - y.astype(jnp.float32)) ** 2)


grad_fn = jax.jit(jax.grad(loss))
mask_fn = jax.jit(psgd.saliency_mask, static_argnums=2)
kappa_fn = jax.jit(lambda prm, x: psgd.path_scales(mlp_apply, prm, x))
X0, _ = batch(0)


def n_prunable(params):
    return sum(layer["w"].size for layer in params)


def reference_q(n, compression):
    return max(1, math.floor(n / compression))


def reference_masks(params, grads, compression):
    """NumPy: top-Q of |w g| (of |w| when grads is None) over the kernels, ties broken by
    flat position (leaves in order, row-major)."""
    ws = [np.asarray(layer["w"], np.float64) for layer in params]
    gs = [1.0] * len(ws) if grads is None else [np.asarray(g["w"], np.float64) for g in grads]
    scores = np.concatenate([np.abs(w * g).ravel() for w, g in zip(ws, gs)])
    q = reference_q(scores.size, compression)
    keep = np.zeros(scores.size, bool)
    keep[np.argsort(-scores, kind="stable")[:q]] = True
    out, start = [], 0
    for w in ws:
        out.append(keep[start:start + w.size].reshape(w.shape))
        start += w.size
    return out


# ------------------------------------------------------------------------------------------
# The active set.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [1, 2.5, 7, 60, 1e9])
def test_exactly_q_prunable_coordinates_receive_gradient(compression):
    params = params_of()
    # Random gradients: no entry is exactly 0 (a dead ReLU's loss gradient would be).
    keys = iter(jax.random.split(jax.random.key(7), 2 * len(params)))
    grads = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape), params)
    tx = psgd.global_sparse_momentum(1.0, compression=compression, momentum=0.0,
                                     weight_decay=0.0)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    q = reference_q(n_prunable(params), compression)
    assert psgd.active_count(params, compression) == q
    moved = [np.asarray(u["w"]) != 0 for u in updates]
    assert sum(int(m.sum()) for m in moved) == q
    for m, ref, s in zip(moved, reference_masks(params, grads, compression), state.mask):
        np.testing.assert_array_equal(m, ref)
        np.testing.assert_array_equal(np.asarray(s["w"]), ref)
        assert s["b"] is None
    # Biases are never masked: the full gradient, no decay.
    for u, g in zip(updates, grads):
        np.testing.assert_allclose(np.asarray(u["b"]), -np.asarray(g["b"]), rtol=1e-6)


@pytest.mark.parametrize("compression", [2, 3, 7])
def test_ties_at_the_threshold_are_broken_by_position(compression):
    """Integer weights and gradients: many equal saliencies, still exactly Q, lowest index."""
    rng = np.random.default_rng(0)
    params = [{"w": jnp.asarray(rng.integers(-2, 3, (4, 6)), jnp.float32)},
              {"w": jnp.asarray(rng.integers(-2, 3, (6, 5)), jnp.float32)}]
    grads = [{"w": jnp.asarray(rng.integers(-2, 3, (4, 6)), jnp.float32)},
             {"w": jnp.asarray(rng.integers(-2, 3, (6, 5)), jnp.float32)}]
    mask = mask_fn(params, grads, compression)
    refs = reference_masks(params, grads, compression)
    assert sum(int(np.sum(m["w"])) for m in mask) == reference_q(54, compression)
    for m, ref in zip(mask, refs):
        np.testing.assert_array_equal(np.asarray(m["w"]), ref)


def test_saliency_of_inf_and_zero_gradients():
    params = {"w": jnp.array([[1.0, 2.0, 3.0, 4.0]])}
    grads = {"w": jnp.array([[0.0, jnp.inf, 0.0, 0.0]])}
    mask = psgd.saliency_mask(params, grads, 2)["w"]
    # inf ranks first, then the three zeros tie: the first one by position.
    np.testing.assert_array_equal(np.asarray(mask), [[True, True, False, False]])


def test_update_equals_numpy_reference_with_momentum():
    momentum, wd, compression = 0.9, 0.05, 3
    schedule = optax.exponential_decay(0.05, transition_steps=2, decay_rate=0.5,
                                         staircase=True)
    tx = psgd.global_sparse_momentum(schedule, compression=compression, momentum=momentum,
                                     weight_decay=wd)
    params = params_of(1)
    state = tx.init(params)
    update = jax.jit(tx.update)
    ref = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in params]
    z = [{k: np.zeros_like(v) for k, v in layer.items()} for layer in ref]
    for t in range(6):
        x, y = batch(t)
        grads = grad_fn(params, x, y)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        # The reference takes its gradient at its own float64 iterate (cast for jax.grad).
        g_ref = grad_fn([{k: jnp.asarray(v, jnp.float32) for k, v in l.items()} for l in ref],
                        x, y)
        masks = reference_masks(ref, g_ref, compression)
        lr = 0.05 * 0.5 ** (t // 2)
        for layer, zl, gl, m in zip(ref, z, g_ref, masks):
            gw, gb = np.asarray(gl["w"], np.float64), np.asarray(gl["b"], np.float64)
            zl["w"] = momentum * zl["w"] + wd * layer["w"] + np.where(m, gw, 0.0)
            zl["b"] = momentum * zl["b"] + gb
            layer["w"] = layer["w"] - lr * zl["w"]
            layer["b"] = layer["b"] - lr * zl["b"]
        for got, want in zip(params, ref):
            for k in ("w", "b"):
                np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k],
                                           rtol=2e-5, atol=1e-6)
    assert int(state.count) == 6


def test_prunable_tree_and_callable_select_leaves():
    params = params_of()
    only_first = [{"w": i == 0, "b": False} for i in range(len(params))]
    grads = grad_fn(params, *batch(2))
    for prunable in (only_first, lambda p: [{"w": i == 0, "b": False} for i in range(len(p))]):
        tx = psgd.global_sparse_momentum(1.0, compression=4, momentum=0.0, weight_decay=0.0,
                                         prunable=prunable)
        updates, _ = tx.update(grads, tx.init(params), params)
        assert int(np.sum(np.asarray(updates[0]["w"]) != 0)) == params[0]["w"].size // 4
        for u, g in zip(updates[1:], grads[1:]):
            np.testing.assert_allclose(np.asarray(u["w"]), -np.asarray(g["w"]), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Rescaling invariance.
# ------------------------------------------------------------------------------------------


def rescale(params, scales):
    return psgd.init.rescale_units(params, scales)


def unit_scales(seed, widths=WIDTHS, power_of_two=True):
    rng = np.random.default_rng(seed)
    out = []
    for h in widths[1:-1]:
        e = rng.uniform(-4, 4, h)
        out.append(jnp.asarray(2.0 ** np.round(e) if power_of_two else 2.0 ** e, jnp.float32))
    return out


def test_rescaling_keeps_the_function():
    params = params_of(3)
    other = rescale(params, unit_scales(3, power_of_two=False))
    np.testing.assert_allclose(mlp_apply(other, X0), mlp_apply(params, X0), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_saliency_ranking_invariant_under_node_rescalings(seed):
    params = params_of(seed)
    scales = unit_scales(seed, power_of_two=False)
    other = rescale(params, scales)
    x, y = batch(seed)
    g, g_other = grad_fn(params, x, y), grad_fn(other, x, y)
    for a, b, ga, gb in zip(params, other, g, g_other):
        np.testing.assert_allclose(np.abs(b["w"] * gb["w"]), np.abs(a["w"] * ga["w"]),
                                   rtol=1e-4, atol=1e-9)
    for c in (2, 5, 20):
        for m, n in zip(mask_fn(params, g, c), mask_fn(other, g_other, c)):
            np.testing.assert_array_equal(np.asarray(m["w"]), np.asarray(n["w"]))
    # The naive chain ranks |w g / kappa|, which does move under rescalings.
    kappa, kappa_o = kappa_fn(params, x), kappa_fn(other, x)
    pre = jax.tree.map(lambda a, b: a / b, g, kappa)
    pre_o = jax.tree.map(lambda a, b: a / b, g_other, kappa_o)
    differs = [not np.array_equal(np.asarray(m["w"]), np.asarray(n["w"]))
               for m, n in zip(mask_fn(params, pre, 5), mask_fn(other, pre_o, 5))]
    assert any(differs), "ranking by the preconditioned gradient should not be invariant"


def run_trajectories(tx, starts, steps):
    """One compiled step, run from every start; per step the params and the active sets."""

    @jax.jit
    def step(params, state, x, y):
        updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    histories = []
    for params in starts:
        state, history = tx.init(params), []
        for t in range(steps):
            params, state = step(params, state, *batch(t))
            history.append((params, [np.asarray(m["w"]) for m in state.mask]))
        histories.append(history)
    return histories


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_path_gsm_trajectories_are_rescaling_invariant(weight_decay):
    """Path-GSM from a network and from its rescaled copy: the same active sets at every step
    and the same function; plain GSM's functions separate. (The weight decay acts on Z in
    parameter coordinates and commutes with the diagonal rescaling, so it is invariant too.)"""
    params = params_of(4)
    scales = unit_scales(4)
    other = rescale(params, scales)
    steps, kw = 20, dict(compression=3, momentum=0.9, weight_decay=weight_decay)
    path_a, path_b = run_trajectories(psgd.path_gsm(0.02, mlp_apply, X0, **kw),
                                      (params, other), steps)
    x_test = batch(99, n=64)[0]
    for (pa, ma), (pb, mb) in zip(path_a, path_b):
        for m, n in zip(ma, mb):
            np.testing.assert_array_equal(m, n)
        np.testing.assert_allclose(mlp_apply(pb, x_test), mlp_apply(pa, x_test), rtol=1e-4,
                                   atol=1e-4)
    # The rescaled run is the rescaled image of the first, weight by weight.
    for a, b in zip(rescale(path_a[-1][0], scales), path_b[-1][0]):
        np.testing.assert_allclose(b["w"], a["w"], rtol=1e-4, atol=1e-5)
    # Path-GSM really moved and really pruned (not a trivially equal trajectory).
    assert float(loss(path_a[-1][0], *batch(0))) < 0.9 * float(loss(params, *batch(0)))
    gsm_a, gsm_b = run_trajectories(psgd.global_sparse_momentum(0.02, **kw), (params, other),
                                    steps)
    gap = np.max(np.abs(mlp_apply(gsm_a[-1][0], x_test) - mlp_apply(gsm_b[-1][0], x_test)))
    assert gap > 1e-2, f"plain GSM should not be rescaling invariant (gap {gap})"


# ------------------------------------------------------------------------------------------
# Final pruning and the report.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [1, 4, 33.3, 500])
def test_prune_to_compression_keeps_exactly_q_largest(compression):
    params = params_of(5)
    pruned = jax.jit(lambda p: psgd.prune_to_compression(p, compression))(params)
    q = reference_q(n_prunable(params), compression)
    assert sum(int(np.count_nonzero(layer["w"])) for layer in pruned) == q
    for got, orig, keep in zip(pruned, params, reference_masks(params, None, compression)):
        np.testing.assert_array_equal(np.asarray(got["w"]), np.where(keep, orig["w"], 0))
        np.testing.assert_array_equal(np.asarray(got["b"]), np.asarray(orig["b"]))
    report = psgd.sparsity_report(pruned)
    assert report.prunable_nonzero == q
    assert report.compression == pytest.approx(n_prunable(params) / q)


def test_path_magnitude_pruning_is_rescaling_invariant():
    """Ranked by |w| sqrt(kappa) (path mass), the pruned rescaled network is the rescaled
    pruned network; ranked by |w| it is not."""
    params = params_of(6)
    scales = unit_scales(6)
    other = rescale(params, scales)

    def path_scores(prm):
        kappa = kappa_fn(prm, X0)
        return jax.tree.map(lambda w, k: jnp.abs(w) * jnp.sqrt(k), prm, kappa)

    prune = jax.jit(psgd.prune_to_compression, static_argnums=1)
    a = prune(params, 4, scores=path_scores(params))
    b = prune(other, 4, scores=path_scores(other))
    for la, lb in zip(rescale(a, scales), b):
        np.testing.assert_allclose(lb["w"], la["w"], rtol=1e-6)
    plain_a, plain_b = prune(params, 4), prune(other, 4)
    assert any(not np.array_equal(np.asarray(x["w"]) != 0, np.asarray(y["w"]) != 0)
               for x, y in zip(plain_a, plain_b))


def test_sparsity_report_counts_per_leaf():
    params = {"dense": {"kernel": jnp.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]),
                        "bias": jnp.array([0.0, 0.5, 0.0])},
              "conv": {"kernel": jnp.zeros((3, 3, 1, 2)).at[0, 0, 0, 1].set(1.0)}}
    report = psgd.sparsity_report(params)
    by_path = {leaf.path: leaf for leaf in report.leaves}
    assert by_path["dense/kernel"].nonzero == 2 and by_path["dense/kernel"].size == 6
    assert by_path["conv/kernel"].nonzero == 1 and by_path["conv/kernel"].size == 18
    assert not by_path["dense/bias"].prunable and by_path["dense/bias"].nonzero == 1
    assert report.prunable_size == 24 and report.prunable_nonzero == 3
    assert report.compression == 8.0
    text = str(report)
    assert "dense/kernel" in text and "not prunable" in text and "8x" in text


# ------------------------------------------------------------------------------------------
# The optax contract.
# ------------------------------------------------------------------------------------------


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
    chex.assert_trees_all_equal_structs(a, b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(
        np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol, atol=atol), a, b)


def test_jit_equals_eager_and_extra_args_are_ignored():
    params = params_of()
    tx = psgd.global_sparse_momentum(0.1, compression=4)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    state = tx.init(params)
    grads = grad_fn(params, *batch(0))
    eager = tx.update(grads, state, params, value=jnp.float32(1.0))
    jitted = jax.jit(tx.update)(grads, state, params)
    assert_trees_close(eager[0], jitted[0])
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(grads, state)


def test_inject_hyperparams_matches_plain_factory():
    params = params_of()
    kw = dict(compression=3.0, momentum=0.9, weight_decay=0.01)
    plain = psgd.global_sparse_momentum(0.05, **kw)
    injected = optax.inject_hyperparams(psgd.global_sparse_momentum)(learning_rate=0.05, **kw)
    s_plain, s_inj = plain.init(params), injected.init(params)
    assert float(s_inj.hyperparams["compression"]) == 3.0
    up_plain, up_inj = jax.jit(plain.update), jax.jit(injected.update)
    for t in range(4):
        grads = grad_fn(params, *batch(t))
        u_plain, s_plain = up_plain(grads, s_plain, params)
        u_inj, s_inj = up_inj(grads, s_inj, params)
        assert_trees_close(u_inj, u_plain)
        params = optax.apply_updates(params, u_plain)
    # Hyperparameters changed in the state take effect: lr / 4, and a new compression.
    s_inj.hyperparams["learning_rate"] = jnp.asarray(0.0125)
    s_inj.hyperparams["compression"] = jnp.asarray(12.0)
    grads = grad_fn(params, *batch(9))
    u_inj, s_inj = up_inj(grads, s_inj, params)
    assert sum(int(np.sum(m["w"])) for m in s_inj.inner_state.mask) == reference_q(
        n_prunable(params), 12.0)
    ref = psgd.global_sparse_momentum(0.0125, **dict(kw, compression=12.0))
    u_ref, _ = ref.update(grads, s_plain, params)
    assert_trees_close(u_inj, u_ref)


def test_multisteps_equals_mean_of_k_then_one_step():
    k = 3
    params = params_of()
    inner = psgd.global_sparse_momentum(0.05, compression=4, momentum=0.9)
    tx = optax.MultiSteps(inner, every_k_schedule=k)
    state, inner_state = tx.init(params), inner.init(params)
    update, inner_update = jax.jit(tx.update), jax.jit(inner.update)
    ref = params
    for cycle in range(2):
        grads = [grad_fn(params, *batch(10 * cycle + j)) for j in range(k)]
        for j, g in enumerate(grads):
            updates, state = update(g, state, params)
            if j < k - 1:
                assert not any(np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
            params = optax.apply_updates(params, updates)
        mean = jax.tree.map(lambda *gs: sum(gs) / k, *grads)
        ref_updates, inner_state = inner_update(mean, inner_state, ref)
        ref = optax.apply_updates(ref, ref_updates)
        assert_trees_close(params, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("path", [False, True])
def test_params_keep_their_dtype_and_state_is_cond_stable(dtype, path):
    params = params_of(dtype=dtype)
    x, y = batch(0, dtype=dtype)
    schedule = optax.linear_schedule(0.05, 0.01, 10)
    tx = (psgd.path_gsm(schedule, mlp_apply, x, compression=4) if path else
          psgd.global_sparse_momentum(schedule, compression=4))
    state = tx.init(params)

    @jax.jit
    def maybe_step(pred, params, state):
        grads = jax.grad(loss)(params, x, y)
        updates, new_state = tx.update(grads, state, params)
        return updates, jax.lax.cond(pred, lambda: new_state, lambda: state)

    for pred in (True, False, True):
        updates, new_state = maybe_step(pred, params, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        chex.assert_trees_all_equal_dtypes(new_state.momentum, params)
        assert all(np.all(np.isfinite(np.asarray(u, np.float32)))
                   for u in jax.tree.leaves(updates))
        params = optax.apply_updates(params, updates)
        chex.assert_trees_all_equal_dtypes(params, params_of(dtype=dtype))
        state = new_state
    assert int(state.count) == 2


# ------------------------------------------------------------------------------------------
# Bad arguments.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(compression=0.5), r"compression must be a finite number in \[1"),
    (dict(compression=float("nan")), "compression must be a finite number"),
    (dict(compression=float("inf")), "compression must be a finite number"),
    (dict(compression="10"), "compression must be a number"),
    (dict(compression=True), "compression must be a number"),
    (dict(compression=10, momentum=1.0), r"momentum must be a finite number in \[0, 1\)"),
    (dict(compression=10, weight_decay=-1e-4), "weight_decay must be a finite number"),
    (dict(compression=10, prunable={}), "prunable is an empty tree"),
])
def test_bad_hyperparameters_raise_eagerly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        psgd.global_sparse_momentum(0.1, **kwargs)


def test_bad_learning_rate_and_missing_compression():
    with pytest.raises(ValueError, match="learning_rate must be a finite number"):
        psgd.global_sparse_momentum(-0.1, compression=2)
    with pytest.raises(TypeError, match="compression"):
        psgd.global_sparse_momentum(0.1)  # pylint: disable=missing-kwoa


def test_bad_prunable_trees_raise_at_init():
    params = params_of()
    wrong = {"w": True}
    with pytest.raises(ValueError, match="exactly the structure of the params"):
        psgd.global_sparse_momentum(0.1, compression=2, prunable=wrong).init(params)
    not_bool = [{"w": 1.0, "b": False} for _ in params]
    with pytest.raises(ValueError, match="one Python bool per parameter leaf"):
        psgd.global_sparse_momentum(0.1, compression=2, prunable=not_bool).init(params)
    nothing = [{"w": False, "b": False} for _ in params]
    with pytest.raises(ValueError, match="No prunable leaf"):
        psgd.global_sparse_momentum(0.1, compression=2, prunable=nothing).init(params)
    with pytest.raises(ValueError, match="No prunable leaf"):
        psgd.global_sparse_momentum(0.1, compression=2).init({"b": jnp.zeros(3)})
    with pytest.raises(ValueError, match="cannot be pruned"):
        psgd.prune_to_compression({"w": jnp.zeros((2, 2), jnp.int32)}, 2)
    with pytest.raises(ValueError, match="compression must be"):
        psgd.prune_to_compression(params, 0.0)
