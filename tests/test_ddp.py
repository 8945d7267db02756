"""DDP-SGD (pathsgd_jax.ddp) against independent references.

References: a NumPy float64 re-implementation of κ(α) for MLPs (forward recursion of γ², the
backward β, the per-example squared-path recursion S), the Hessian diagonal of the complexity
γ_net²(w) itself (autodiff of a direct float64 formula with the real network inside), the
hand closed form at α = 1 on one hidden layer, per-example Jacobians (Gauss–Newton), and
rescaled copies of a network.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import models_zoo as mz
import pathsgd_jax as psgd


# Tiny networks: XLA's backend optimisation costs more than it saves (compile time dominates).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_JITTED = {}  # one jitted function per (function, apply_fn, alpha), shared by the tests


def _jitted(fn, apply_fn, **kwargs):
    key = (fn, apply_fn, tuple(sorted(kwargs.items())))
    if key not in _JITTED:
        _JITTED[key] = _jit(functools.partial(fn, apply_fn, **kwargs))
    return _JITTED[key]


def _ddp(apply_fn, params, x, alpha):
    """ddp_scales under one jit (one compilation, reused for equal shapes across tests)."""
    return _jitted(psgd.ddp_scales, apply_fn, alpha=alpha)(params, x)


def _path(apply_fn, params, x):
    return _jitted(psgd.path_scales, apply_fn)(params, x)


def _mlp(key, widths, bias=True, dtype=jnp.float64):
    return mz.init_mlp(key, widths, bias=bias, dtype=dtype)


def _batch(seed, n, d, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)), dtype)


def numpy_ddp_kappa(params, x, alpha):
    """κ(α) of an MLP in NumPy float64, from the module docstring's formula."""
    layers = mz.mlp_to_layers(params)
    x = np.asarray(x, np.float64)
    hs, gs, gamma2 = [x], [], [np.ones(x.shape[1])]
    h = x
    for k, (w, b) in enumerate(layers):
        z = h @ w + (0 if b is None else b)
        path = gamma2[-1] @ (w ** 2) + (0 if b is None else b ** 2)
        gamma2.append(alpha * np.mean(z ** 2, 0) + (1 - alpha) * path)
        if k < len(layers) - 1:
            gs.append((z > 0).astype(np.float64))
            h = np.maximum(z, 0)
            hs.append(h)
    n_layers = len(layers)
    beta = [None] * (n_layers + 1)  # beta[l]: units of level l (1..L)
    beta[n_layers] = np.ones(layers[-1][0].shape[1])
    for level in range(n_layers - 1, 0, -1):
        beta[level] = (1 - alpha) * (layers[level][0] ** 2) @ beta[level + 1]
    s = [None] * (n_layers + 1)  # per example
    s[n_layers] = np.ones((x.shape[0], layers[-1][0].shape[1]))
    for level in range(n_layers - 1, 0, -1):
        s[level] = beta[level][None] + gs[level - 1] * (s[level + 1] @ (layers[level][0] ** 2).T)
    out = []
    for k, (w, b) in enumerate(layers):
        level = k + 1
        kw = ((1 - alpha) * np.outer(gamma2[k], beta[level])
              + alpha * (hs[k] ** 2).T @ s[level] / len(x))
        kb = None if b is None else (1 - alpha) * beta[level] + alpha * s[level].mean(0)
        out.append((kw, kb))
    return mz.mlp_kappa_tree(out)


def complexity(params, x, alpha):
    """γ_net²(w) with the real network inside (the quantity whose Hessian κ is half of)."""
    gamma2 = jnp.ones(x.shape[1], x.dtype)
    h = x
    for k, layer in enumerate(params):
        b = layer.get("b", jnp.zeros(layer["w"].shape[1], x.dtype))
        z = h @ layer["w"] + b[None]
        gamma2 = alpha * jnp.mean(z ** 2, 0) + (1 - alpha) * (gamma2 @ layer["w"] ** 2 + b ** 2)
        h = jax.nn.relu(z)
    return jnp.sum(gamma2)


def half_hessian_diagonal(params, x, alpha):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    def f(v):
        return complexity(unravel(v), x, alpha)
    grad = jax.grad(f)
    eye = jnp.eye(flat.size, dtype=flat.dtype)
    diag = _jit(jax.vmap(lambda e: jnp.vdot(e, jax.jvp(grad, (flat,), (e,))[1])))(eye)
    return unravel(0.5 * diag)


def _close(a, b, rtol=1e-9, atol=1e-12):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v),
                                                         rtol=rtol, atol=atol), a, b)


_MIXED_BIAS = [True, False, True]  # layers with and without a bias in one network


@pytest.fixture(scope="module")
def deep_mlp():
    """Two hidden layers, mixed biases, float64: (params, x, κ(0.3)), shared by two tests."""
    with jax.enable_x64(True):
        params = _mlp(jax.random.key(1), [4, 6, 5, 3], bias=_MIXED_BIAS)
        x = _batch(0, 16, 4)
        return params, x, _ddp(mz.mlp_apply, params, x, 0.3)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_mlp_matches_numpy_reference(alpha, deep_mlp):
    params, x, kappa = deep_mlp
    with jax.enable_x64(True):
        got = kappa if alpha == 0.3 else _ddp(mz.mlp_apply, params, x, alpha)
        _close(got, numpy_ddp_kappa(params, x, alpha))


@pytest.mark.parametrize("alpha", [0.4])  # α = 1: the closed-form test below
def test_one_hidden_layer_is_the_exact_hessian_diagonal(alpha):
    with jax.enable_x64(True):
        params = _mlp(jax.random.key(2), [3, 5, 2])
        x = _batch(1, 12, 3)
        _close(_ddp(mz.mlp_apply, params, x, alpha), half_hessian_diagonal(params, x, alpha))


def test_alpha_one_closed_form_and_gauss_newton():
    """α = 1, one hidden layer: the hand closed form, and exactly E[Σ_o (∂f_o/∂w)²]."""
    with jax.enable_x64(True):
        params = _mlp(jax.random.key(3), [3, 4, 2])
        x = _batch(2, 10, 3)
        got = _ddp(mz.mlp_apply, params, x, 1.0)
        w1, b1 = np.asarray(params[0]["w"]), np.asarray(params[0]["b"])
        w2 = np.asarray(params[1]["w"])
        xn = np.asarray(x)
        z = xn @ w1 + b1
        g2, h2 = (z > 0).astype(float), np.maximum(z, 0) ** 2
        out2 = (w2 ** 2).sum(1)  # Σ_o W2[j, o]²
        hand = [{"w": (xn ** 2).T @ g2 / 10 * out2[None], "b": g2.mean(0) * out2},
                {"w": np.repeat(h2.mean(0)[:, None], 2, 1), "b": np.ones(2)}]
        _close(got, hand)
        jac = _jit(jax.vmap(lambda xi: jax.jacrev(lambda p: mz.mlp_apply(p, xi[None])[0])(
            params)))(x)
        gauss_newton = jax.tree.map(lambda j: jnp.mean(jnp.sum(j ** 2, axis=1), axis=0), jac)
        _close(got, gauss_newton)


def test_deeper_nets_exact_on_last_two_layers_path_diagonal_on_the_first(deep_mlp):
    """Two hidden layers: the Hessian diagonal holds where one path joins a unit to each later
    one; on the first layer the squared-Jacobian cross terms are dropped (stated, measured)."""
    params, x, got = deep_mlp
    with jax.enable_x64(True):
        exact = half_hessian_diagonal(params, x, 0.3)
        _close(got[1:], exact[1:])
        gap = np.abs(np.asarray(got[0]["w"]) - np.asarray(exact[0]["w"])).max()
        assert gap > 1e-6 * np.abs(np.asarray(exact[0]["w"])).max()  # approximation is real


def _f32_mlp():
    """A float32 MLP with and without biases, and its batch (shared shapes: one compile)."""
    params = _mlp(jax.random.key(5), [5, 7, 6, 3], bias=_MIXED_BIAS, dtype=jnp.float32)
    return params, _batch(0, 8, 5, jnp.float32)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_alpha_zero_is_path_sgd(net):
    key = jax.random.key(5)
    if net == "cnn":
        params = mz.init_cnn(key, (6, 6, 2), (3, 3), 3, (2, 2), 4)
        apply_fn = mz.make_cnn_apply()
        x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6, 6, 2)), jnp.float32)
    else:
        (params, x), apply_fn = _f32_mlp(), mz.mlp_apply
    _close(_ddp(apply_fn, params, x, 0.0), _path(apply_fn, params, x), rtol=1e-6, atol=0)


def _trajectories(tx, starts, xs, ys, apply_fn, use_inputs=True):
    """Outputs on xs[0] after each step, from each start (one compiled step for all)."""
    def loss(p, x, y):
        return jnp.mean((apply_fn(p, x) - y) ** 2)

    @_jit
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        kwargs = {"inputs": x} if use_inputs else {}
        updates, state = tx.update(grads, state, params, **kwargs)
        return optax.apply_updates(params, updates), state

    result = []
    for params in starts:
        state, outs = tx.init(params), []
        for x, y in zip(xs, ys):
            params, state = step(params, state, x, y)
            outs.append(apply_fn(params, xs[0]))
        result.append(np.stack(outs))
    return result


# α = 0 is Path-SGD's κ exactly (test_alpha_zero_is_path_sgd), whose invariance
# test_invariance covers; here the data-dependent α.
@pytest.mark.parametrize("momentum,alpha", [(None, 0.5), (0.9, 1.0)])
def test_rescaling_invariance_of_trajectories(momentum, alpha):
    with jax.enable_x64(True):
        widths = [4, 6, 5, 2]
        params = _mlp(jax.random.key(7), widths)
        rescaled = mz.rescale_mlp_params(params, mz.random_rescaling(0, widths))
        xs = [_batch(10 + i, 16, 4) for i in range(6)]
        ys = [_batch(30 + i, 16, 2) for i in range(6)]
        tx = psgd.ddp_sgd(0.02, mz.mlp_apply, xs[0], alpha=alpha, momentum=momentum)
        a, b = _trajectories(tx, [params, rescaled], xs, ys, mz.mlp_apply)
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
        assert np.abs(a[-1] - a[0]).max() > 1e-3  # it trains
        if momentum is None:  # the control: plain SGD on the same starts is not invariant
            sgd = optax.sgd(0.02)
            a, b = _trajectories(sgd, [params, rescaled], xs, ys, mz.mlp_apply,
                                 use_inputs=False)
            assert np.abs(a - b).max() > 1e-2


def test_scales_depend_on_the_batch_only_when_alpha_positive():
    params, x1 = _f32_mlp()  # α = 0 shares its compilation with test_alpha_zero_is_path_sgd
    x2 = _batch(2, 8, 5, jnp.float32)
    for alpha, same in ((0.0, True), (0.5, False)):
        k1 = jax.tree.leaves(_ddp(mz.mlp_apply, params, x1, alpha))
        k2 = jax.tree.leaves(_ddp(mz.mlp_apply, params, x2, alpha))
        equal = all(np.array_equal(a, b) for a, b in zip(k1, k2))
        assert equal == same, alpha


def test_update_differs_from_the_gradient_and_needs_inputs():
    params = _mlp(jax.random.key(9), [4, 6, 3], dtype=jnp.float32)
    x = _batch(1, 8, 4, jnp.float32)
    tx = psgd.scale_by_ddp(mz.mlp_apply, x, alpha=0.5)
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    with pytest.raises(ValueError, match="inputs=x"):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match="current parameters"):
        tx.update(grads, state, inputs=x)
    updates, _ = _jit(lambda g, s, p, b: tx.update(g, s, p, inputs=b))(grads, state,
                                                                           params, x)
    with jax.enable_x64(True):
        kappa = numpy_ddp_kappa(params, np.asarray(x, np.float64), 0.5)
    _close(updates, jax.tree.map(lambda k: 1 / k, kappa), rtol=2e-5)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "1", jnp.float32(0.5)])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        psgd.ddp_sgd(0.1, mz.mlp_apply, jnp.zeros((1, 3)), alpha=alpha)


def test_relu_inside_scan_is_rejected_clearly():
    def rnn(params, x):
        def body(h, xt):
            h = jax.nn.relu(h @ params["w"] + xt @ params["u"])
            return h, None
        h, _ = jax.lax.scan(body, jnp.zeros((x.shape[0], 3)), jnp.swapaxes(x, 0, 1))
        return h @ params["v"]

    params = {"w": jnp.eye(3), "u": jnp.ones((2, 3)), "v": jnp.ones((3, 1))}
    with pytest.raises(psgd.UnsupportedOperationError, match="lax.scan"):
        psgd.ddp_scales(rnn, params, jnp.ones((4, 5, 2)), alpha=0.5)


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(10)(x)


def test_linen_loop_by_hand_and_chain():
    x, y = mz.digits(64, flat=True)
    model = _LinenMLP()
    params = model.init(jax.random.key(0), x[:2])["params"]
    fn = psgd.linen.apply_fn(model)
    tx = optax.chain(psgd.scale_by_ddp(fn, x[:2], alpha=0.5), optax.trace(0.9),
                     optax.scale(-0.05))
    state = tx.init(params)

    @_jit
    def step(params, state, xb, yb):
        loss, grads = jax.value_and_grad(lambda p: mz.cross_entropy(fn(p, xb), yb))(params)
        updates, state = tx.update(grads, state, params, inputs=xb)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(15):
        params, state, loss = step(params, state, x[(i % 4) * 16:(i % 4 + 1) * 16],
                                   y[(i % 4) * 16:(i % 4 + 1) * 16])
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and np.mean(losses[-4:]) < losses[0], losses


class _NNXBatchNormMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1, self.bn = nnx.Linear(784, 12, rngs=rngs), nnx.BatchNorm(12, rngs=rngs)
        self.l2 = nnx.Linear(12, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.bn(self.l1(x))))


def test_nnx_optimizer_with_inputs_and_train_mode_batchnorm():
    """nnx.Optimizer.update(model, grads, inputs=x); BatchNorm folded at the batch's statistics
    (α = 0 is then Path-SGD's κ of the folded network)."""
    x, y = mz.digits(64, flat=True)
    model = _NNXBatchNormMLP(nnx.Rngs(0))
    model.train()
    path_fn = psgd.nnx.apply_fn(model, batch_statistics=True)
    params = nnx.state(model, nnx.Param)
    _close(_ddp(path_fn, params, x[:16], 0.0), _path(path_fn, params, x[:16]), rtol=1e-6,
           atol=0)
    optimizer = nnx.Optimizer(model, psgd.ddp_sgd(0.01, path_fn, x[:2], alpha=0.5,
                                                  momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, xb, yb):
        loss, grads = nnx.value_and_grad(lambda m: mz.cross_entropy(m(xb), yb))(model)
        optimizer.update(model, grads, inputs=xb)
        return loss

    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    losses = [float(step(model, optimizer, x[j:j + 16], y[j:j + 16])) for j in (0, 16)]
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert np.all(np.isfinite(losses)), losses
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                        jax.tree.leaves(after)))


def test_ddp_normalization_linen_nnx_batchnorm_and_invariance():
    x = _batch(4, 32, 3, jnp.float32)
    layer = psgd.ddp.DDPDense(5, alpha=1.0, centered=True, epsilon=1e-5)
    variables = layer.init(jax.random.key(0), x, use_running_average=False)
    params = jax.tree.map(lambda p: p + 0.3, variables["params"])  # a non-zero bias
    y, _ = layer.apply({**variables, "params": params}, x, use_running_average=False,
                       mutable=["batch_stats"])
    z = x @ params["kernel"] + params["bias"][None]
    bn = nn.BatchNorm(use_scale=False, use_bias=False, epsilon=1e-5)
    reference, _ = bn.apply(bn.init(jax.random.key(1), z, use_running_average=False), z,
                            use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-5)
    for alpha in (0.0, 0.5, 1.0):
        layer = psgd.ddp.DDPDense(5, alpha=alpha, epsilon=0.0)
        def run(p):
            return layer.apply({**variables, "params": p}, x, use_running_average=False,
                                            mutable=["batch_stats"])[0]
        c = jnp.asarray([0.1, 1.0, 7.0, 2.0, 0.5])
        scaled = {"kernel": params["kernel"] * c[None], "bias": params["bias"] * c}
        np.testing.assert_allclose(run(params), run(scaled), rtol=1e-5, atol=1e-6)
        if alpha == 0.0:
            norm = jnp.sqrt(jnp.sum(params["kernel"] ** 2, 0) + params["bias"] ** 2)
            np.testing.assert_allclose(run(params), z / norm[None], rtol=1e-5)
    linear = psgd.ddp.DDPLinear(3, 5, alpha=0.5, rngs=nnx.Rngs(0))
    linear.kernel.value, linear.bias.value = params["kernel"], params["bias"]
    layer = psgd.ddp.DDPDense(5, alpha=0.5)
    expected = layer.apply({**variables, "params": params}, x, use_running_average=False,
                           mutable=["batch_stats"])[0]
    np.testing.assert_allclose(linear(x), expected, rtol=1e-5, atol=1e-6)
    linear.eval()
    assert linear.use_running_average
    np.testing.assert_allclose(linear(x), _ddp_frozen(linear, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        psgd.ddp.DDPLinear(3, 5, alpha=2.0, rngs=nnx.Rngs(0))


def _ddp_frozen(linear, x):
    z = x @ linear.kernel.value + linear.bias.value[None]
    path = jnp.sum(linear.kernel.value ** 2, 0) + linear.bias.value ** 2
    gamma2 = linear.alpha * linear.second_moment.value + (1 - linear.alpha) * path
    return z / jnp.sqrt(gamma2 + linear.epsilon)[None]
