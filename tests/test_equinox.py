"""Equinox adapter: κ of eqx.nn.MLP against brute force, of a small Equinox CNN against the same
network written in plain JAX, 30 jitted Path-SGD steps on the embedded digits, and errors.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pathsgd_jax as psgd
from reference import mlp_bruteforce

eqx = pytest.importorskip("equinox")


class SmallCNN(eqx.Module):
    """conv 3x3 (1 -> 4) -> relu -> 2x2 average pool -> flatten -> linear; one CHW example."""

    conv: eqx.nn.Conv2d
    pool: eqx.nn.AvgPool2d
    dense: eqx.nn.Linear

    def __init__(self, hw, n_out, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 4, 3, key=k1)
        self.pool = eqx.nn.AvgPool2d(2, 2)
        side = (hw - 2) // 2
        self.dense = eqx.nn.Linear(4 * side * side, n_out, key=k2)

    def __call__(self, x):
        return self.dense(jnp.ravel(self.pool(jax.nn.relu(self.conv(x)))))


def plain_cnn(params, x):
    """The same network in plain JAX on an NCHW batch."""
    h = jax.lax.conv_general_dilated(x, params["w"], (1, 1), "VALID",
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    h = jax.nn.relu(h + params["b"][None])
    n, c, hh, ww = h.shape
    h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).mean(axis=(3, 5))
    return h.reshape(n, -1) @ params["dw"].T + params["db"][None, :]


def plain_params(cnn):
    return {"w": cnn.conv.weight, "b": cnn.conv.bias, "dw": cnn.dense.weight, "db": cnn.dense.bias}


def test_mlp_kappa_matches_bruteforce():
    model = eqx.nn.MLP(3, 2, width_size=4, depth=2, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_array)
    kappa = psgd.path_scales(psgd.equinox.apply_fn(model), params, jnp.ones((5, 3)))
    layers = [(np.asarray(lin.weight).T, np.asarray(lin.bias)) for lin in model.layers]
    phi, ref, _ = mlp_bruteforce(layers, p=2.0)
    for lin, (rw, rb) in zip(kappa.layers, ref):
        np.testing.assert_allclose(np.asarray(lin.weight, np.float64).T, rw, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(lin.bias, np.float64), rb, rtol=1e-4)
    phi_lib = psgd.path_norm(psgd.equinox.apply_fn(model), params, jnp.ones((5, 3)))
    np.testing.assert_allclose(float(phi_lib), phi, rtol=1e-5)
    # The first half of eqx.partition is the same tree.
    first, _ = eqx.partition(model, eqx.is_array)
    assert jax.tree.structure(first) == jax.tree.structure(params)


def test_cnn_kappa_matches_plain_jax():
    cnn = SmallCNN(8, 3, jax.random.key(1))
    x = jnp.ones((2, 1, 8, 8))
    fn = psgd.equinox.apply_fn(cnn)
    np.testing.assert_allclose(fn(eqx.filter(cnn, eqx.is_array), x),
                               plain_cnn(plain_params(cnn), x), rtol=1e-5, atol=1e-6)
    kappa = psgd.path_scales(fn, eqx.filter(cnn, eqx.is_array), x)
    ref = psgd.path_scales(plain_cnn, plain_params(cnn), x)
    for got, want in [(kappa.conv.weight, ref["w"]), (kappa.conv.bias, ref["b"]),
                      (kappa.dense.weight, ref["dw"]), (kappa.dense.bias, ref["db"])]:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)


def test_dropout_off_and_batched_model():
    class Batched(eqx.Module):
        mlp: eqx.nn.MLP
        drop: eqx.nn.Dropout

        def __call__(self, x, *, key=None):
            return jax.vmap(self.mlp)(self.drop(x, key=key))

    mlp = eqx.nn.MLP(3, 2, width_size=4, depth=1, key=jax.random.key(2))
    model = Batched(mlp, eqx.nn.Dropout(0.5))
    x = jnp.ones((5, 3))
    kappa = psgd.path_scales(psgd.equinox.apply_fn(model, batch_axis=None),
                             eqx.filter(model, eqx.is_array), x)
    ref = psgd.path_scales(psgd.equinox.apply_fn(mlp), eqx.filter(mlp, eqx.is_array), x)
    for got, want in zip(jax.tree.leaves(kappa.mlp), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert model.drop.inference is False  # the user's model is not switched


def _digits(n, flat):
    ds = psgd.data.load("mnist5k")
    x, y = ds.x_train[:n], ds.y_train[:n]
    x = x.reshape(n, -1) if flat else np.transpose(x, (0, 3, 1, 2))  # NHWC -> NCHW
    return jnp.asarray(x), jnp.asarray(y)


def _train(model, x, y, learning_rate, steps=30, batch=64):
    fn = psgd.equinox.apply_fn(model)
    tx = psgd.path_sgd(learning_rate, fn, x[:1], momentum=0.9)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    def loss_fn(m, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(m)(xb), yb).mean()

    @eqx.filter_jit
    def step(m, opt_state, xb, yb):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(m, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(m, eqx.is_array))
        return eqx.apply_updates(m, updates), opt_state, loss

    full = eqx.filter_jit(loss_fn)
    start = float(full(model, x, y))
    for i in range(steps):
        lo = (i * batch) % (x.shape[0] - batch + 1)
        model, opt_state, loss = step(model, opt_state, x[lo:lo + batch], y[lo:lo + batch])
        assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(a)))
               for a in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    return start, float(full(model, x, y))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_trains_on_digits_with_filter_jit(kind):
    key = jax.random.key(3)
    if kind == "mlp":
        x, y = _digits(512, flat=True)
        model = eqx.nn.MLP(784, 10, width_size=32, depth=1, key=key)
    else:
        x, y = _digits(512, flat=False)
        model = SmallCNN(28, 10, key)
    start, end = _train(model, x, y, learning_rate=0.01)
    assert end < 0.8 * start, (start, end)


def test_errors_name_the_fix():
    class NeedsKey(eqx.Module):
        lin: eqx.nn.Linear
        drop: eqx.nn.Dropout

        def __call__(self, x, key):
            return self.lin(self.drop(x, key=key))

    model = NeedsKey(eqx.nn.Linear(3, 2, key=jax.random.key(0)), eqx.nn.Dropout(0.5))
    with pytest.raises(TypeError) as info:
        psgd.equinox.apply_fn(model)
    msg = str(info.value)
    assert "NeedsKey.__call__(x, key)" in msg and "`key`" in msg
    assert "method=lambda m, x: m(x, None)" in msg
    fn = psgd.equinox.apply_fn(model, method=lambda m, x: m(x, None))
    kappa = psgd.path_scales(fn, eqx.filter(model, eqx.is_array), jnp.ones((4, 3)))
    np.testing.assert_allclose(np.asarray(kappa.lin.weight), np.ones((2, 3)))  # κ = 1: one layer

    mlp = eqx.nn.MLP(3, 2, width_size=4, depth=1, key=jax.random.key(0))
    wrong = eqx.filter(mlp, eqx.is_array).layers  # not the whole filtered model
    with pytest.raises(Exception) as info:
        psgd.path_scales(psgd.equinox.apply_fn(mlp), wrong, jnp.ones((4, 3)))
    assert "eqx.filter(model, eqx.is_array)" in str(info.value)
    with pytest.raises(TypeError, match="equinox.Module"):
        psgd.equinox.apply_fn(functools.partial(jnp.dot))
    with pytest.raises(ValueError, match="batch_axis"):
        psgd.equinox.apply_fn(mlp, batch_axis="0")
