"""Property tests: random conv/pool/residual/concatenation networks against the reference.

Hypothesis draws a network from the README's operation table: a convolution with random
kernel size, strides, kernel dilation, padding and feature groups (after a 1x1 convolution,
so channels carry unequal path sums); optionally sum, average or max pooling with random
window and strides (max pooling is a sum over the window in the path network); then a dense
layer followed by an optional ResNet-style residual block ``relu(h W + h)`` or a
concatenation ``[h, relu(h W)]``; then the output layer, at p in {1, 2, 3}. κ and φ_p are
compared with the hand-unrolled float64 reference of ``test_operations.py``.

Examples per run: ``PATHSGD_HYPOTHESIS_EXAMPLES`` (default 6, about 30 s on two busy
cores); the ``slow`` test runs 40 (about 150 s). Mutations caught (on a scratch copy): the
feature-grouping and unpowered-1/k mutations listed in test_operations.py; run together,
hypothesis found and shrank a failing network within the default examples.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

import test_operations as ops

DEFAULT_EXAMPLES = int(os.environ.get("PATHSGD_HYPOTHESIS_EXAMPLES", "6"))


@st.composite
def networks(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = ((draw(st.integers(0, 1)), draw(st.integers(0, 1))),
            (draw(st.integers(0, 1)), draw(st.integers(0, 1))))
    hw = (draw(st.integers(kh + (kh - 1) * (dilation[0] - 1), 6)),
          draw(st.integers(kw + (kw - 1) * (dilation[1] - 1), 6)))
    pool = draw(st.sampled_from([None, "sum", "avg", "max"]))
    window = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pool_stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    block = draw(st.sampled_from([None, "residual", "concat"]))
    width = draw(st.integers(2, 4))
    p = draw(st.sampled_from([1.0, 2.0, 3.0]))
    seed = draw(st.integers(0, 2**16))
    return dict(groups=groups, cin=cin, cout=cout, k=(kh, kw), stride=stride,
                dilation=dilation, pads=pads, hw=hw, pool=pool, window=window,
                pool_stride=pool_stride, block=block, width=width, p=p, seed=seed)


def _build(c):
    kshape = (*c["k"], c["cin"] // c["groups"], c["cout"])
    conv_layer, conv_out = ops.conv((*c["hw"], c["cin"]), np.ones(kshape), stride=c["stride"],
                                    dilation=c["dilation"], pads=c["pads"], groups=c["groups"])
    del conv_layer
    pooled = conv_out
    if c["pool"] is not None:
        window = tuple(min(w, s) for w, s in zip(c["window"], conv_out[:2]))
        c = dict(c, window=window)
        _, pooled = ops.pool(conv_out, window, c["pool_stride"], value=1.0)
    n_flat = int(np.prod(pooled))
    width = c["width"]
    shapes = {"k0": (1, 1, c["cin"], c["cin"]), "k": kshape, "kb": (c["cout"],),
              "w1": (n_flat, width), "b1": (width,), "w3": (2 * width if c["block"] == "concat"
                                                          else width, 2), "b3": (2,)}
    if c["block"] is not None:
        shapes["w2"] = (width, width)
    params = ops._params(shapes, c["seed"])
    params["kb"] = params["kb"] + 0.2
    return c, params


def _apply_fn(c):
    def apply_fn(prm, x):
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.nn.relu(lax.conv_general_dilated(x, prm["k0"], (1, 1), "VALID",
                                                 dimension_numbers=dn))
        h = lax.conv_general_dilated(h, prm["k"], c["stride"], c["pads"],
                                     rhs_dilation=c["dilation"], dimension_numbers=dn,
                                     feature_group_count=c["groups"])
        h = jax.nn.relu(h + prm["kb"][None, None, None, :])
        dims, strides = (1, *c["window"], 1), (1, *c["pool_stride"], 1)
        if c["pool"] in ("sum", "avg"):
            h = lax.reduce_window(h, 0.0, lax.add, dims, strides, "VALID")
            if c["pool"] == "avg":
                h = h / (c["window"][0] * c["window"][1])
        elif c["pool"] == "max":
            h = lax.reduce_window(h, -jnp.inf, lax.max, dims, strides, "VALID")
        h = jax.nn.relu(h.reshape(h.shape[0], -1) @ prm["w1"] + prm["b1"][None, :])
        if c["block"] == "residual":
            h = jax.nn.relu(h @ prm["w2"] + h)
        elif c["block"] == "concat":
            h = jnp.concatenate([h, jax.nn.relu(h @ prm["w2"])], axis=1)
        return h @ prm["w3"] + prm["b3"][None, :]

    return apply_fn


def _layers(c, params):
    f = ops._f64(params)
    first, _ = ops.conv((*c["hw"], c["cin"]), f["k0"], name="k0")
    layer, out = ops.conv((*c["hw"], c["cin"]), f["k"], f["kb"], stride=c["stride"],
                          dilation=c["dilation"], pads=c["pads"], groups=c["groups"])
    layers = [first, layer]
    if c["pool"] is not None:
        k = c["window"][0] * c["window"][1]
        pool_layer, _ = ops.pool(out, c["window"], c["pool_stride"],
                                 value=1.0 / k if c["pool"] == "avg" else 1.0)
        layers.append(pool_layer)
    layers.append(ops.dense(f["w1"], f["b1"], name="w1", bias_name="b1", relu=True))
    width = c["width"]
    if c["block"] == "residual":
        block = ops.dense(f["w2"], name="w2", relu=True)
        block.entries += [(i, i, 1.0, None) for i in range(width)]  # the skip
        layers.append(block)
    elif c["block"] == "concat":
        block = ops.Lin(width, 2 * width, relu=True)
        block.entries += [(i, i, 1.0, None) for i in range(width)]
        for i in range(width):
            for j in range(width):
                block.entries.append((i, width + j, f["w2"][i, j], ("w2", i * width + j)))
        layers.append(block)
    layers.append(ops.dense(f["w3"], f["b3"], name="w3", bias_name="b3"))
    return layers


def _check_network(c):
    c, params = _build(c)
    x = jnp.abs(ops._x((*c["hw"], c["cin"]), c["seed"]))
    layers = _layers(c, params)
    if c["pool"] == "max":
        # The real network takes maxima; the path network (and the reference) sums.
        shapes = {n: v.shape for n, v in params.items()}
        phi_ref, kap_ref = ops.chain_reference(layers, shapes, c["p"])
        kappa = ops.psgd.path_scales(_apply_fn(c), params, x[:1], p=c["p"])
        for n in shapes:
            np.testing.assert_allclose(np.asarray(kappa[n], np.float64), kap_ref[n],
                                       rtol=2e-5, atol=1e-30, err_msg=n)
        return
    ops._check(_apply_fn(c), params, x, layers, c["p"])


@settings(max_examples=DEFAULT_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_random_networks_match_the_reference(c):
    _check_network(c)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_random_networks_match_the_reference_many(c):
    _check_network(c)
