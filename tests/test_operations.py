"""Positive controls for the README's operation table, against an independent reference.

Each network is written with JAX/lax operations (strided, dilated and grouped convolutions,
concatenation, padding, gathers with constant indices, sum and average pooling, a
``custom_vjp`` function) and also unrolled by hand, in NumPy loops, into a chain of sparse
linear layers whose entries are tagged with the parameter entry they come from (or are
constants). κ and φ_p of the unrolled chain come from a γ_in/γ_out sweep in float64; a
small case of each is cross-checked against brute-force path enumeration
(``reference.dag_bruteforce``). The forward pass of every unrolled chain is checked against
the real network, so the unrolling itself cannot drift.

Mutations caught (on a scratch copy): a convolution rule that drops the feature grouping
(kernel tiled over all input channels, divided by the group count: invisible on a first
layer's all-ones input, hence the 1x1 convolution in front), and average pooling's 1/k left
unpowered (``_rules._div``), each fail the corresponding cases here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import pathsgd_jax as psgd
import reference as ref


# ------------------------------------------------------------------------------------------
# The reference: chains of sparse linear layers with tagged entries (NumPy only).
# ------------------------------------------------------------------------------------------


@dataclass
class Lin:
    """y = x @ M + c; entries (i, j, value, tag) with tag (name, flat index) or None."""

    n_in: int
    n_out: int
    entries: list = field(default_factory=list)
    bias: list = field(default_factory=list)  # (j, value, tag)
    relu: bool = False

    def dense(self):
        m = np.zeros((self.n_in, self.n_out))
        for i, j, v, _ in self.entries:
            m[i, j] += v
        c = np.zeros(self.n_out)
        for j, v, _ in self.bias:
            c[j] += v
        return m, c


def chain_forward(layers, x):
    h = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    for layer in layers:
        m, c = layer.dense()
        h = h @ m + c[None, :]
        if layer.relu:
            h = np.maximum(h, 0.0)
    return h


def chain_reference(layers, shapes, p):
    """(φ_p, {name: κ}) by γ_in forward / γ_out backward through |entries|^p."""
    mats, cs = [], []
    for layer in layers:
        m = np.zeros((layer.n_in, layer.n_out))
        for i, j, v, _ in layer.entries:
            m[i, j] += abs(v) ** p
        c = np.zeros(layer.n_out)
        for j, v, _ in layer.bias:
            c[j] += abs(v) ** p
        mats.append(m)
        cs.append(c)
    g_in = [np.ones(layers[0].n_in)]
    for m, c in zip(mats, cs):
        g_in.append(g_in[-1] @ m + c)
    g_out = [np.ones(layers[-1].n_out)]
    for m in reversed(mats):
        g_out.insert(0, m @ g_out[0])
    acc = {name: np.zeros(int(np.prod(s))) for name, s in shapes.items()}
    for k, layer in enumerate(layers):
        for i, j, v, tag in layer.entries:
            if tag is not None:
                acc[tag[0]][tag[1]] += g_in[k][i] * g_out[k + 1][j]
        for j, v, tag in layer.bias:
            if tag is not None:
                acc[tag[0]][tag[1]] += g_out[k + 1][j]
    kappa = {n: (a ** (2.0 / p)).reshape(shapes[n]) for n, a in acc.items()}
    return float(g_in[-1].sum()) ** (1.0 / p), kappa


def chain_bruteforce(layers, shapes, p):
    edges, sources = [], [("n", 0, i) for i in range(layers[0].n_in)]
    for k, layer in enumerate(layers):
        for i, j, v, tag in layer.entries:
            edges.append((("n", k, i), ("n", k + 1, j), v, tag and (tag[0], (tag[1],))))
        if layer.bias:
            sources.append(("bias", k))
        for j, v, tag in layer.bias:
            edges.append((("bias", k), ("n", k + 1, j), v, tag and (tag[0], (tag[1],))))
    sinks = [("n", len(layers), j) for j in range(layers[-1].n_out)]
    flat = {n: (int(np.prod(s)),) for n, s in shapes.items()}
    phi, kappa, _ = ref.dag_bruteforce(edges, sources, sinks, flat, p)
    return phi, {n: k.reshape(shapes[n]) for n, k in kappa.items()}


def dense(w, b=None, *, name, bias_name=None, relu=False, offset_in=0, n_in=None, into=None):
    """A dense block ``x[offset_in:offset_in+w.shape[0]] @ w``; adds into ``into`` if given."""
    w = np.asarray(w, np.float64)
    layer = into or Lin(n_in or w.shape[0], w.shape[1], relu=relu)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            layer.entries.append((offset_in + i, j, w[i, j], (name, i * w.shape[1] + j)))
    if b is not None:
        for j, v in enumerate(np.asarray(b, np.float64)):
            layer.bias.append((j, v, (bias_name, j)))
    return layer


def conv(in_hwc, kernel, bias=None, *, stride=(1, 1), dilation=(1, 1), pads=((0, 0), (0, 0)),
         groups=1, name="k", bias_name="kb", relu=True):
    """NHWC / HWIO convolution with strides, kernel dilation, padding and feature groups."""
    kernel = np.asarray(kernel, np.float64)
    height, width, cin = in_hwc
    kh, kw, cin_g, cout = kernel.shape
    assert cin_g * groups == cin and cout % groups == 0
    cout_g = cout // groups
    (pt, pb), (pl, pr) = pads
    ho = (height + pt + pb - (kh - 1) * dilation[0] - 1) // stride[0] + 1
    wo = (width + pl + pr - (kw - 1) * dilation[1] - 1) // stride[1] + 1
    layer = Lin(height * width * cin, ho * wo * cout, relu=relu)
    for oi in range(ho):
        for oj in range(wo):
            for co in range(cout):
                g = co // cout_g
                col = (oi * wo + oj) * cout + co
                for di in range(kh):
                    for dj in range(kw):
                        ii = oi * stride[0] + di * dilation[0] - pt
                        ij = oj * stride[1] + dj * dilation[1] - pl
                        if not (0 <= ii < height and 0 <= ij < width):
                            continue  # reads padding: no edge
                        for cl in range(cin_g):
                            row = (ii * width + ij) * cin + g * cin_g + cl
                            tag = (name, ((di * kw + dj) * cin_g + cl) * cout + co)
                            layer.entries.append((row, col, kernel[di, dj, cl, co], tag))
                if bias is not None:
                    layer.bias.append((col, float(bias[co]), (bias_name, co)))
    return layer, (ho, wo, cout)


def pool(in_hwc, window, stride, *, value):
    """VALID pooling as constant entries ``value`` (1 for sum, 1/k for average)."""
    height, width, c = in_hwc
    ho = (height - window[0]) // stride[0] + 1
    wo = (width - window[1]) // stride[1] + 1
    layer = Lin(height * width * c, ho * wo * c)
    for oi in range(ho):
        for oj in range(wo):
            for di in range(window[0]):
                for dj in range(window[1]):
                    ii, ij = oi * stride[0] + di, oj * stride[1] + dj
                    for ch in range(c):
                        layer.entries.append(((ii * width + ij) * c + ch,
                                              (oi * wo + oj) * c + ch, value, None))
    return layer, (ho, wo, c)


# ------------------------------------------------------------------------------------------
# Helpers to compare.
# ------------------------------------------------------------------------------------------


def _params(shapes, seed):
    rng = np.random.default_rng(seed)
    return {n: jnp.asarray(rng.normal(size=s) / math.sqrt(max(1, np.prod(s[:-1]))), jnp.float32)
            for n, s in shapes.items()}


def _f64(params):
    return {n: np.asarray(v, np.float64) for n, v in params.items()}


def _check(apply_fn, params, x, layers, p, brute=False, rtol=2e-5):
    shapes = {n: v.shape for n, v in params.items()}
    np.testing.assert_allclose(np.asarray(apply_fn(params, x), np.float64).reshape(x.shape[0], -1),
                               chain_forward(layers, np.asarray(x)), rtol=1e-4, atol=1e-5)
    phi_ref, kap_ref = chain_reference(layers, shapes, p)
    if brute:
        phi_b, kap_b = chain_bruteforce(layers, shapes, p)
        np.testing.assert_allclose(phi_ref, phi_b, rtol=1e-12)
        for n in shapes:
            np.testing.assert_allclose(kap_ref[n], kap_b[n], rtol=1e-12)
    kappa = psgd.path_scales(apply_fn, params, x[:1], p=p)
    for n in shapes:
        np.testing.assert_allclose(np.asarray(kappa[n], np.float64), kap_ref[n], rtol=rtol,
                                   atol=1e-30, err_msg=n)
    np.testing.assert_allclose(float(psgd.path_norm(apply_fn, params, x[:1], p=p)), phi_ref,
                               rtol=rtol)


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(2, *shape)), jnp.float32)


# ------------------------------------------------------------------------------------------
# Convolutions: strides, dilation, padding, feature groups.
# ------------------------------------------------------------------------------------------

CONV_CASES = {
    "stride2": dict(hw=(5, 5), cin=2, cout=2, k=(3, 3), stride=(2, 2), dilation=(1, 1),
                    pads=((0, 0), (0, 0)), groups=1),
    "stride_1x2_padded": dict(hw=(4, 5), cin=1, cout=3, k=(2, 3), stride=(1, 2),
                              dilation=(1, 1), pads=((1, 0), (1, 1)), groups=1),
    "dilation2": dict(hw=(5, 5), cin=2, cout=2, k=(2, 2), stride=(1, 1), dilation=(2, 2),
                      pads=((0, 0), (0, 0)), groups=1),
    "groups2": dict(hw=(4, 4), cin=4, cout=4, k=(2, 2), stride=(1, 1), dilation=(1, 1),
                    pads=((0, 0), (0, 0)), groups=2),
    "depthwise_dilated_strided": dict(hw=(6, 6), cin=3, cout=3, k=(2, 2), stride=(2, 2),
                                      dilation=(2, 2), pads=((1, 1), (0, 1)), groups=3),
}


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_convolution(case, p):
    c = CONV_CASES[case]
    kshape = (*c["k"], c["cin"] // c["groups"], c["cout"])
    _, out_hwc = conv((*c["hw"], c["cin"]), np.ones(kshape), stride=c["stride"],
                      dilation=c["dilation"], pads=c["pads"], groups=c["groups"])
    n_flat = int(np.prod(out_hwc))
    params = _params({"k0": (1, 1, c["cin"], c["cin"]), "k": kshape, "kb": (c["cout"],),
                      "w": (n_flat, 2), "b": (2,)}, seed=1)
    params["kb"] = params["kb"] + 0.2

    def apply_fn(prm, x):
        # A 1x1 convolution first, so the tested one sees unequal path sums per channel (on
        # the all-ones input of a first layer, a wrong channel grouping can cancel out).
        h = jax.nn.relu(lax.conv_general_dilated(x, prm["k0"], (1, 1), "VALID",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))
        h = lax.conv_general_dilated(h, prm["k"], c["stride"], c["pads"],
                                     rhs_dilation=c["dilation"],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=c["groups"])
        h = jax.nn.relu(h + prm["kb"][None, None, None, :])
        return h.reshape(h.shape[0], -1) @ prm["w"] + prm["b"][None, :]

    f = _f64(params)
    layer, _ = conv((*c["hw"], c["cin"]), f["k"], f["kb"], stride=c["stride"],
                    dilation=c["dilation"], pads=c["pads"], groups=c["groups"])
    first, _ = conv((*c["hw"], c["cin"]), f["k0"], name="k0")
    layers = [first, layer, dense(f["w"], f["b"], name="w", bias_name="b")]
    _check(apply_fn, params, _x((*c["hw"], c["cin"])), layers, p, brute=(p == 2.0))


# ------------------------------------------------------------------------------------------
# Concatenation, padding, constant-index gathers, pooling, custom_vjp.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_concatenation_of_branches_and_of_a_skip(p):
    params = _params({"w1": (3, 2), "b1": (2,), "w2": (3, 3), "w3": (8, 2), "b3": (2,)}, 2)

    def apply_fn(prm, x):
        h1 = jax.nn.relu(x @ prm["w1"] + prm["b1"][None, :])
        h2 = jax.nn.relu(x @ prm["w2"])
        h = jnp.concatenate([h1, x, h2], axis=1)  # a skip of the input in the middle
        return h @ prm["w3"] + prm["b3"][None, :]

    f = _f64(params)
    first = Lin(3, 8, relu=True)
    dense(f["w1"], f["b1"], name="w1", bias_name="b1", into=first)
    for i in range(3):  # the skip: constant identity edges into positions 2..4
        first.entries.append((i, 2 + i, 1.0, None))
    for i in range(3):
        for j in range(3):
            first.entries.append((i, 5 + j, f["w2"][i, j], ("w2", i * 3 + j)))
    layers = [first, dense(f["w3"], f["b3"], name="w3", bias_name="b3")]
    # A non-negative input, so the chain's ReLU on the skip positions is the identity there.
    _check(apply_fn, params, jnp.abs(_x((3,))), layers, p, brute=True)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_padding_and_gather_with_constant_indices(p):
    idx = np.array([4, 0, 0, 2, 5, 1])  # repeated and reordered; 0 and 5 read the padding
    params = _params({"w1": (3, 4), "b1": (4,), "w2": (6, 2)}, 3)

    def apply_fn(prm, x):
        h = jax.nn.relu(x @ prm["w1"] + prm["b1"][None, :])
        h = jnp.pad(h, ((0, 0), (1, 1)))  # (B, 6): zero columns 0 and 5
        h = h[:, idx]  # gather, constant indices
        return h @ prm["w2"]

    f = _f64(params)
    first = dense(f["w1"], f["b1"], name="w1", bias_name="b1", relu=True)
    padding = Lin(4, 6, entries=[(i, i + 1, 1.0, None) for i in range(4)])
    gather = Lin(6, 6, entries=[(int(src), j, 1.0, None) for j, src in enumerate(idx)])
    layers = [first, padding, gather, dense(f["w2"], name="w2")]
    _check(apply_fn, params, _x((3,)), layers, p, brute=True)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("kind", ["sum", "avg", "sum_strided_overlapping"])
def test_sum_and_average_pooling(kind, p):
    window, stride = ((2, 2), (2, 2)) if kind != "sum_strided_overlapping" else ((3, 2), (1, 2))
    kshape, hw = (2, 2, 1, 2), (5, 5)
    conv_out = (4, 4, 2)
    pooled = ((conv_out[0] - window[0]) // stride[0] + 1) * (
        (conv_out[1] - window[1]) // stride[1] + 1) * 2
    params = _params({"k": kshape, "kb": (2,), "w": (pooled, 2)}, 4)
    params["kb"] = params["kb"] + 0.3
    k = window[0] * window[1]

    def apply_fn(prm, x):
        h = lax.conv_general_dilated(x, prm["k"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + prm["kb"][None, None, None, :])
        h = lax.reduce_window(h, 0.0, lax.add, (1, *window, 1), (1, *stride, 1), "VALID")
        if kind == "avg":
            h = h / k
        return h.reshape(h.shape[0], -1) @ prm["w"]

    f = _f64(params)
    c_layer, c_out = conv((*hw, 1), f["k"], f["kb"])
    p_layer, _ = pool(c_out, window, stride, value=1.0 / k if kind == "avg" else 1.0)
    layers = [c_layer, p_layer, dense(f["w"], name="w")]
    _check(apply_fn, params, _x((*hw, 1)), layers, p)


@jax.custom_vjp
def _relu_cv(h):
    return jnp.maximum(h, 0.0)


_relu_cv.defvjp(lambda h: (_relu_cv(h), h), lambda h, g: (jnp.where(h > 0, g, 0.0),))


@jax.custom_vjp
def _halve(h):
    return 0.5 * h


_halve.defvjp(lambda h: (0.5 * h, None), lambda _, g: (0.5 * g,))


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_custom_vjp_functions(p):
    params = _params({"w1": (3, 4), "b1": (4,), "w2": (4, 2), "b2": (2,)}, 5)

    def apply_fn(prm, x):
        h = _relu_cv(x @ prm["w1"] + prm["b1"][None, :])
        return _halve(h) @ prm["w2"] + prm["b2"][None, :]

    f = _f64(params)
    half = Lin(4, 4, entries=[(i, i, 0.5, None) for i in range(4)])  # constant 1/2: (1/2)^p
    layers = [dense(f["w1"], f["b1"], name="w1", bias_name="b1", relu=True), half,
              dense(f["w2"], f["b2"], name="w2", bias_name="b2")]
    _check(apply_fn, params, _x((3,)), layers, p, brute=True)
    # And the optimizer runs through it, with the plain network's gradients.
    tx = psgd.path_sgd(0.1, apply_fn, _x((3,)))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
