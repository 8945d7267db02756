"""Tiny JAX models used across the pathsgd_jax tests, with converters to/from `reference`.

Everything here is written with plain ``jax.numpy``/``lax`` (plus a couple of Linen modules);
nothing uses ``pathsgd_jax``'s path code. The real-model gallery (a ResNet, the Flax MNIST
CNN, an NNX BatchNorm CNN) is imported from the experiments' gallery, so the tests and
``pathsgd-jax lr`` train the same plain Flax modules. The conftest sets
``jax_numpy_rank_promotion='raise'``, so every broadcast is explicit.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The gallery's models are those of `pathsgd-jax lr` (plain Flax modules, one definition).
from pathsgd_jax.experiments.gallery import (  # noqa: F401
    MnistCNN,
    ResidualBlock,
    SmallResNet,
    nnx_bn_cnn,
)

# ------------------------------------------------------------------------------------------
# MLP: params = [{"w": (n_in, n_out), "b": (n_out,)}, ...] ("b" optional per layer).
# ------------------------------------------------------------------------------------------


def init_mlp(key, widths, *, bias=True, dtype=jnp.float32, bias_scale=0.5):
    """``bias`` may be a bool or a per-layer list of bools."""
    n_layers = len(widths) - 1
    if isinstance(bias, bool):
        bias = [bias] * n_layers
    keys = jax.random.split(key, 2 * n_layers)
    params = []
    for k in range(n_layers):
        w = jax.random.normal(keys[2 * k], (widths[k], widths[k + 1]), jnp.float32)
        layer = {"w": (w / math.sqrt(widths[k])).astype(dtype)}
        if bias[k]:
            b = bias_scale * jax.random.normal(keys[2 * k + 1], (widths[k + 1],), jnp.float32)
            layer["b"] = b.astype(dtype)
        params.append(layer)
    return params


def mlp_apply(params, x):
    h = x
    for k, layer in enumerate(params):
        h = h @ layer["w"]
        if "b" in layer:
            h = h + layer["b"][None, :]
        if k < len(params) - 1:
            h = jax.nn.relu(h)
    return h


def named_mlp(params, x):
    """An MLP whose params are {'l0': {'w', 'b'}, 'l1': ...} (names shard more readably)."""
    return mlp_apply([params[f"l{i}"] for i in range(len(params))], x)


def mlp_apply_maximum(params, x):
    """Same network, ReLU written as ``jnp.maximum(h, 0)``."""
    h = x
    for k, layer in enumerate(params):
        h = jnp.dot(h, layer["w"])
        if "b" in layer:
            h = h + jnp.expand_dims(layer["b"], 0)
        if k < len(params) - 1:
            h = jnp.maximum(h, 0.0)
    return h


def mlp_to_layers(params):
    """-> list of (W, b or None) float64 numpy arrays, for `reference`."""
    return [
        (np.asarray(layer["w"], np.float64),
         None if "b" not in layer else np.asarray(layer["b"], np.float64))
        for layer in params
    ]


def layers_to_mlp(layers, dtype=jnp.float32):
    out = []
    for w, b in layers:
        layer = {"w": jnp.asarray(w, dtype)}
        if b is not None:
            layer["b"] = jnp.asarray(b, dtype)
        out.append(layer)
    return out


def mlp_kappa_tree(kappas):
    """Reference [(kW, kb)] -> tree shaped like the MLP params (numpy float64)."""
    out = []
    for kw, kb in kappas:
        layer = {"w": kw}
        if kb is not None:
            layer["b"] = kb
        out.append(layer)
    return out


def rescale_mlp_params(params, factors_per_level):
    """Apply a rescaling to every hidden level: ``factors_per_level[l-1]`` for level ``l``."""
    from reference import rescale_mlp_units

    layers = mlp_to_layers(params)
    for level, factors in enumerate(factors_per_level, start=1):
        layers = rescale_mlp_units(layers, level, factors)
    dtype = params[0]["w"].dtype
    return layers_to_mlp(layers, dtype)


def random_rescaling(seed, widths):
    """c = exp(N(0, 1)) for every hidden unit."""
    rng = np.random.default_rng(seed)
    return [np.exp(rng.normal(size=n)) for n in widths[1:-1]]


# ------------------------------------------------------------------------------------------
# Tiny CNN: conv (HWIO, stride 1) + bias -> relu -> avg pool -> flatten -> dense.
# params = {"conv": {"kernel", "bias"}, "dense": {"kernel", "bias"}}
# ------------------------------------------------------------------------------------------


def init_cnn(key, in_hwc, kernel_hw, cout, pool, n_out, *, padding="VALID",
             dtype=jnp.float32):
    from reference import conv2d_layer, pool2d_layer

    cin = in_hwc[2]
    k1, k2, k3, k4 = jax.random.split(key, 4)
    kernel = jax.random.normal(k1, (*kernel_hw, cin, cout), jnp.float32)
    kernel = kernel / math.sqrt(kernel_hw[0] * kernel_hw[1] * cin)
    conv = conv2d_layer(in_hwc[:2], np.zeros((*kernel_hw, cin, cout)), padding=padding)
    n_flat = pool2d_layer(conv.meta["out_hwc"], pool).shape[1]
    dense = jax.random.normal(k3, (n_flat, n_out), jnp.float32) / math.sqrt(n_flat)
    return {
        "conv": {"kernel": kernel.astype(dtype),
                 "bias": (0.3 * jax.random.normal(k2, (cout,), jnp.float32)).astype(dtype)},
        "dense": {"kernel": dense.astype(dtype),
                  "bias": (0.3 * jax.random.normal(k4, (n_out,), jnp.float32)).astype(dtype)},
    }


def make_cnn_apply(*, padding="VALID", pool=(2, 2), pool_impl="reshape"):
    """pool_impl: 'reshape' (jnp mean of a reshape), 'linen' (flax.linen.avg_pool),
    'max_reshape' / 'max_linen' (max pooling)."""

    def apply(params, x):
        y = jax.lax.conv_general_dilated(
            x, params["conv"]["kernel"], window_strides=(1, 1), padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + params["conv"]["bias"][None, None, None, :]
        y = jax.nn.relu(y)
        n, height, width, c = y.shape
        ph, pw = pool
        ho, wo = height // ph, width // pw
        if pool_impl in ("reshape", "max_reshape"):
            y = y[:, : ho * ph, : wo * pw, :].reshape(n, ho, ph, wo, pw, c)
            y = y.mean(axis=(2, 4)) if pool_impl == "reshape" else y.max(axis=(2, 4))
        elif pool_impl == "linen":
            y = nn.avg_pool(y, pool, strides=pool, padding="VALID")
        elif pool_impl == "max_linen":
            y = nn.max_pool(y, pool, strides=pool, padding="VALID")
        else:
            raise ValueError(pool_impl)
        y = y.reshape(n, -1)
        return y @ params["dense"]["kernel"] + params["dense"]["bias"][None, :]

    return apply


def cnn_reference_args(params, in_hwc, pool):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    return (in_hwc, f(params["conv"]["kernel"]), f(params["conv"]["bias"]), pool,
            f(params["dense"]["kernel"]), f(params["dense"]["bias"]))


def cnn_kappa_tree(kappa):
    return {"conv": {"kernel": kappa["kernel"], "bias": kappa["conv_bias"]},
            "dense": {"kernel": kappa["dense_w"], "bias": kappa["dense_b"]}}


class LinenCNN(nn.Module):
    cout: int = 2
    kernel_hw: tuple = (2, 2)
    padding: str = "VALID"
    pool: tuple = (2, 2)
    n_out: int = 2

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(self.cout, self.kernel_hw, padding=self.padding, name="conv")(x)
        y = nn.relu(y)
        y = nn.avg_pool(y, self.pool, strides=self.pool, padding="VALID")
        y = y.reshape((y.shape[0], -1))
        return nn.Dense(self.n_out, name="dense")(y)


# ------------------------------------------------------------------------------------------
# Residual MLP: h1 = relu(x W1 + b1); h2 = alpha * relu(h1 W2 + b2) + h1; out = h2 W3 + b3.
# ------------------------------------------------------------------------------------------


def init_residual(key, d_in, d_h, d_out, dtype=jnp.float32):
    ks = jax.random.split(key, 6)
    return {
        "W1": (jax.random.normal(ks[0], (d_in, d_h)) / math.sqrt(d_in)).astype(dtype),
        "b1": (0.3 * jax.random.normal(ks[1], (d_h,))).astype(dtype),
        "W2": (jax.random.normal(ks[2], (d_h, d_h)) / math.sqrt(d_h)).astype(dtype),
        "b2": (0.3 * jax.random.normal(ks[3], (d_h,))).astype(dtype),
        "W3": (jax.random.normal(ks[4], (d_h, d_out)) / math.sqrt(d_h)).astype(dtype),
        "b3": (0.3 * jax.random.normal(ks[5], (d_out,))).astype(dtype),
    }


def make_residual_apply(alpha=None):
    def apply(params, x):
        h1 = jax.nn.relu(x @ params["W1"] + params["b1"][None, :])
        branch = jax.nn.relu(h1 @ params["W2"] + params["b2"][None, :])
        if alpha is not None:
            branch = alpha * branch
        h2 = branch + h1
        return h2 @ params["W3"] + params["b3"][None, :]

    return apply


def to_numpy(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ------------------------------------------------------------------------------------------
# Small data
# ------------------------------------------------------------------------------------------


def regression_batch(seed, n, d_in, d_out, dtype=jnp.float32):
    key = jax.random.key(seed)
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (n, d_in), dtype),
            jax.random.normal(ky, (n, d_out), dtype))


def mse(apply_fn):
    def loss(params, x, y):
        return jnp.mean((apply_fn(params, x) - y) ** 2)

    return loss


# ------------------------------------------------------------------------------------------
# The real-model gallery: small versions, written here, of the models people train.
# ------------------------------------------------------------------------------------------


def digits(n, *, flat=False, seed=0):
    """``n`` of the embedded MNIST digits (NHWC, or flattened), with their labels."""
    from pathsgd_jax import data  # pylint: disable=g-import-not-at-top

    ds = data.load("mnist5k")
    order = np.random.default_rng(seed).permutation(len(ds.x_train))[:n]
    x, y = ds.x_train[order], ds.y_train[order]
    return jnp.asarray(x.reshape(n, -1) if flat else x), jnp.asarray(y)


def cross_entropy(logits, labels):
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))
