"""DDP-SGD's κ(α) on a small CNN against a closed form in NumPy float64.

The CNN of `models_zoo.make_cnn_apply`: conv 3×3 (VALID) + bias -> ReLU -> 2×2 average
pooling -> dense + bias. Its κ, from the module docstring of `pathsgd_jax.ddp`: an average
pooling is an edge of weight 1/4 (1/16 powered), so a conv unit v reaches output o through
one path of squared weight W[p(v), o]²/16 (p(v) its pooled unit), and with
T_v = Σ_o W[p(v), o]²/16, β_v = (1 − α)·T_v and S_v = β_v + g_v²·T_v. The shared kernel and
bias sum over positions. This checks the data term's backward-only gated pass (the S
recursion through a convolution and a pooling) without running any path network.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models_zoo as mz
import pathsgd_jax as psgd

_IN, _KERNEL, _COUT, _POOL, _OUT = (6, 6, 2), (3, 3), 3, (2, 2), 4


def numpy_cnn_kappa(params, x, alpha):
    k, c = (np.asarray(params["conv"][n], np.float64) for n in ("kernel", "bias"))
    w, b = (np.asarray(params["dense"][n], np.float64) for n in ("kernel", "bias"))
    x = np.asarray(x, np.float64)
    n, (kh, kw) = len(x), _KERNEL
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    patches = {(i, j): x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)}
    z = sum(patches[i, j] @ k[i, j] for i, j in patches) + c
    h2, g2 = np.maximum(z, 0) ** 2, (z > 0).astype(np.float64)

    def pooled_sum(t):  # (..., ho, wo, C) -> (..., ho/2, wo/2, C): sums over 2x2 windows
        return t.reshape(*t.shape[:-3], ho // 2, 2, wo // 2, 2, t.shape[-1]).sum((-4, -2))

    def upsampled(t):  # each pooled unit's value at its four conv units
        return np.repeat(np.repeat(t, 2, axis=-3), 2, axis=-2)

    gamma2 = alpha * np.mean(z ** 2, 0) + (1 - alpha) * ((k ** 2).sum((0, 1, 2)) + c ** 2)
    t = upsampled(((w ** 2).sum(1) / 16).reshape(ho // 2, wo // 2, _COUT))
    beta = (1 - alpha) * t
    s = beta + g2 * t  # per example
    kappa_w = ((1 - alpha) * pooled_sum(gamma2).reshape(-1, 1) / 16
               + alpha * pooled_sum(h2).reshape(n, -1).mean(0)[:, None] / 16)
    kappa_w = np.repeat(kappa_w, w.shape[1], axis=1)
    kappa_k = np.zeros_like(k)
    for (i, j), patch in patches.items():
        kappa_k[i, j] = ((1 - alpha) * np.ones(k.shape[2])[:, None] * beta.sum((0, 1))
                         + alpha * np.einsum("bxyi,bxyo->io", patch ** 2, s) / n)
    kappa_c = (1 - alpha) * beta.sum((0, 1)) + alpha * s.sum((1, 2)).mean(0)
    return {"conv": {"kernel": kappa_k, "bias": kappa_c},
            "dense": {"kernel": kappa_w, "bias": np.ones_like(b)}}


@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0])
def test_cnn_matches_numpy_closed_form(alpha):
    with jax.enable_x64(True):
        params = mz.init_cnn(jax.random.key(5), _IN, _KERNEL, _COUT, _POOL, _OUT,
                             dtype=jnp.float64)
        x = jnp.asarray(np.random.default_rng(0).normal(size=(8, *_IN)), jnp.float64)
        got = jax.jit(functools.partial(psgd.ddp_scales, mz.make_cnn_apply(), alpha=alpha))(
            params, x)
        want = numpy_cnn_kappa(params, x, alpha)
        jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), v, rtol=1e-9,
                                                             atol=1e-12), got, want)
