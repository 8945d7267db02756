"""Checks of the NumPy references themselves (no pathsgd_jax involved)."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref

P_VALUES = (1.0, 2.0, 3.0)


def _random_mlp(rng, widths, bias=True):
    if isinstance(bias, bool):
        bias = [bias] * (len(widths) - 1)
    return [
        (rng.normal(size=(widths[k], widths[k + 1])),
         rng.normal(size=widths[k + 1]) if bias[k] else None)
        for k in range(len(widths) - 1)
    ]


def _assert_kappas_close(a, b, rtol=1e-11, atol=0.0):
    assert len(a) == len(b)
    for (wa, ba), (wb, bb) in zip(a, b):
        np.testing.assert_allclose(wa, wb, rtol=rtol, atol=atol)
        assert (ba is None) == (bb is None)
        if ba is not None:
            np.testing.assert_allclose(ba, bb, rtol=rtol, atol=atol)


def test_self_check():
    assert ref.self_check(seed=3)


def test_hand_computed_chain():
    # 1 -> 1 -> 1 with weights w1=2, b1=3, w2=5, b2=7.
    layers = [(np.array([[2.0]]), np.array([3.0])), (np.array([[5.0]]), np.array([7.0]))]
    # p = 2: paths x->h->o: 4*25, b1->h->o: 9*25, b2->o: 49.
    phi, kap, n_paths = ref.mlp_bruteforce(layers, 2.0)
    assert n_paths == 3
    np.testing.assert_allclose(phi, math.sqrt(100 + 225 + 49))
    (kw1, kb1), (kw2, kb2) = kap
    np.testing.assert_allclose(kw1, [[25.0]])
    np.testing.assert_allclose(kb1, [25.0])
    np.testing.assert_allclose(kw2, [[4.0 + 9.0]])
    np.testing.assert_allclose(kb2, [1.0])
    # p = 1: phi = 10 + 15 + 7; kappa = (sum of other products)^2.
    phi, kap, _ = ref.mlp_bruteforce(layers, 1.0)
    np.testing.assert_allclose(phi, 32.0)
    (kw1, kb1), (kw2, kb2) = kap
    np.testing.assert_allclose(kw1, [[25.0]])
    np.testing.assert_allclose(kb1, [25.0])
    np.testing.assert_allclose(kw2, [[25.0]])
    np.testing.assert_allclose(kb2, [1.0])
    # p = 3: kappa = (others)^(2/3).
    phi, kap, _ = ref.mlp_bruteforce(layers, 3.0)
    np.testing.assert_allclose(phi, (8 * 125 + 27 * 125 + 343) ** (1 / 3))
    np.testing.assert_allclose(kap[1][0], [[(8.0 + 27.0) ** (2 / 3)]])


def test_path_count():
    rng = np.random.default_rng(0)
    widths = [3, 4, 2, 2]
    layers = _random_mlp(rng, widths, bias=[True, False, True])
    _, _, n_paths = ref.mlp_bruteforce(layers, 2.0)
    expected = 3 * 4 * 2 * 2 + 4 * 2 * 2 + 2  # inputs, bias of layer 0, bias of layer 2
    assert n_paths == expected


@pytest.mark.parametrize("p", P_VALUES)
def test_phi_is_sum_over_output_of_powered_network(p):
    # phi_p^p = sum of outputs of the network with |w|^p on an all-ones input (no bias case
    # and bias case), computed here with plain matrix products.
    rng = np.random.default_rng(1)
    layers = _random_mlp(rng, [3, 5, 4, 2])
    powered = [(np.abs(w) ** p, np.abs(b) ** p) for w, b in layers]
    h = np.ones((1, 3))
    for w, b in powered:
        h = h @ w + b[None, :]
    phi, _, _ = ref.mlp_bruteforce(layers, p)
    np.testing.assert_allclose(phi ** p, h.sum(), rtol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    widths=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    p=st.sampled_from(P_VALUES),
    bias_bits=st.integers(0, 7),
)
def test_gamma_method_equals_bruteforce_mlp(seed, widths, p, bias_bits):
    rng = np.random.default_rng(seed)
    bias = [bool((bias_bits >> k) & 1) for k in range(len(widths) - 1)]
    layers = _random_mlp(rng, widths, bias)
    phi_b, kap_b, _ = ref.mlp_bruteforce(layers, p)
    phi_g, kap_g = ref.mlp_gamma(layers, p)
    np.testing.assert_allclose(phi_g, phi_b, rtol=1e-11)
    _assert_kappas_close(kap_g, kap_b)


@pytest.mark.parametrize("p", P_VALUES)
def test_dag_bruteforce_equals_itertools_bruteforce(p):
    rng = np.random.default_rng(2)
    layers = _random_mlp(rng, [2, 3, 3, 2], bias=[True, False, True])
    unrolled = [ref.dense_layer(w, b, name=f"W{k}", bias_name=f"b{k}")
                for k, (w, b) in enumerate(layers)]
    shapes = {f"W{k}": w.shape for k, (w, _) in enumerate(layers)}
    shapes.update({f"b{k}": b.shape for k, (_, b) in enumerate(layers) if b is not None})
    phi_d, kap_d, n_d = ref.unrolled_bruteforce(unrolled, shapes, p)
    phi_b, kap_b, n_b = ref.mlp_bruteforce(layers, p)
    assert n_d == n_b
    np.testing.assert_allclose(phi_d, phi_b, rtol=1e-12)
    for k, (kw, kb) in enumerate(kap_b):
        np.testing.assert_allclose(kap_d[f"W{k}"], kw, rtol=1e-12)
        if kb is not None:
            np.testing.assert_allclose(kap_d[f"b{k}"], kb, rtol=1e-12)


@pytest.mark.parametrize("p", P_VALUES)
def test_rescaling_invariance_and_kappa_transform(p):
    rng = np.random.default_rng(4)
    widths = [3, 4, 3, 2]
    layers = _random_mlp(rng, widths)
    x = rng.normal(size=(6, 3))
    phi, kap, _ = ref.mlp_bruteforce(layers, p)
    # Rescale a single unit j of hidden level 1 by c.
    j, c = 2, 3.7
    factors = np.ones(4)
    factors[j] = c
    scaled = ref.rescale_mlp_units(layers, 1, factors)
    np.testing.assert_allclose(ref.mlp_forward(scaled, x), ref.mlp_forward(layers, x),
                               rtol=1e-12, atol=1e-12)
    phi_s, kap_s, _ = ref.mlp_bruteforce(scaled, p)
    np.testing.assert_allclose(phi_s, phi, rtol=1e-12)
    # Incoming edges and bias of unit j: kappa * c^-2; outgoing edges: kappa * c^2.
    expect_w0 = kap[0][0].copy()
    expect_w0[:, j] *= c ** -2
    expect_b0 = kap[0][1].copy()
    expect_b0[j] *= c ** -2
    expect_w1 = kap[1][0].copy()
    expect_w1[j, :] *= c ** 2
    np.testing.assert_allclose(kap_s[0][0], expect_w0, rtol=1e-11)
    np.testing.assert_allclose(kap_s[0][1], expect_b0, rtol=1e-11)
    np.testing.assert_allclose(kap_s[1][0], expect_w1, rtol=1e-11)
    # Everything else is unchanged.
    np.testing.assert_allclose(kap_s[1][1], kap[1][1], rtol=1e-11)
    np.testing.assert_allclose(kap_s[2][0], kap[2][0], rtol=1e-11)
    np.testing.assert_allclose(kap_s[2][1], kap[2][1], rtol=1e-11)


@pytest.mark.parametrize("p", P_VALUES)
def test_random_rescaling_all_units(p):
    rng = np.random.default_rng(5)
    widths = [3, 5, 4, 2]
    layers = _random_mlp(rng, widths)
    x = rng.normal(size=(6, 3))
    cs = [np.exp(rng.normal(size=n)) for n in widths[1:-1]]
    scaled = layers
    for level, c in enumerate(cs, start=1):
        scaled = ref.rescale_mlp_units(scaled, level, c)
    np.testing.assert_allclose(ref.mlp_forward(scaled, x), ref.mlp_forward(layers, x),
                               rtol=1e-11, atol=1e-12)
    phi, kap = ref.mlp_gamma(layers, p)
    phi_s, kap_s = ref.mlp_gamma(scaled, p)
    np.testing.assert_allclose(phi_s, phi, rtol=1e-12)
    # Edge u -> v with factors c_u, c_v (1 at inputs/outputs/bias nodes): kappa * (c_u/c_v)^2.
    level_c = [np.ones(widths[0])] + cs + [np.ones(widths[-1])]
    for k in range(len(layers)):
        cu, cv = level_c[k], level_c[k + 1]
        np.testing.assert_allclose(kap_s[k][0], kap[k][0] * (cu[:, None] / cv[None, :]) ** 2,
                                   rtol=1e-11)
        np.testing.assert_allclose(kap_s[k][1], kap[k][1] * cv ** -2.0, rtol=1e-11)


def test_dead_unit_has_zero_outgoing_kappa():
    rng = np.random.default_rng(6)
    layers = _random_mlp(rng, [3, 4, 2])
    layers[0][0][:, 1] = 0.0
    layers[0][1][1] = 0.0
    _, kap, _ = ref.mlp_bruteforce(layers, 2.0)
    np.testing.assert_array_equal(kap[1][0][1, :], 0.0)
    assert np.all(kap[1][0][[0, 2, 3], :] > 0)
    assert np.all(kap[0][0] > 0)  # incoming edges of the dead unit still have paths


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_unrolled_conv_matches_direct_conv(padding):
    rng = np.random.default_rng(7)
    for kernel_hw in ((2, 2), (3, 3), (2, 3)):
        kernel = rng.normal(size=(*kernel_hw, 2, 3))
        bias = rng.normal(size=3)
        x = rng.normal(size=(2, 5, 4, 2))
        layer = ref.conv2d_layer((5, 4), kernel, bias, padding=padding, relu=False)
        y_direct = ref.conv2d_forward(x, kernel, bias, padding)
        y_unrolled = ref.unrolled_forward([layer], x.reshape(2, -1))
        assert y_direct.shape[1:] == layer.meta["out_hwc"]
        np.testing.assert_allclose(y_unrolled, y_direct.reshape(2, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_unrolled_cnn_matches_direct_cnn(padding):
    rng = np.random.default_rng(8)
    in_hwc, pool = (5, 4, 2), (2, 2)
    kernel = rng.normal(size=(3, 2, 2, 3))
    conv = ref.conv2d_layer(in_hwc[:2], kernel, padding=padding)
    n_flat = ref.pool2d_layer(conv.meta["out_hwc"], pool).shape[1]
    args = (in_hwc, kernel, rng.normal(size=3), pool, rng.normal(size=(n_flat, 2)),
            rng.normal(size=2))
    x = rng.normal(size=(3, *in_hwc))
    layers = ref.cnn_layers(*args, padding=padding)
    np.testing.assert_allclose(ref.unrolled_forward(layers, x.reshape(3, -1)),
                               ref.cnn_forward(x, *args[1:], padding=padding), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("p", P_VALUES)
def test_avg_pool_constant_is_powered(p):
    # 1x1 conv with weight w on a 2x2 single-channel input, 2x2 average pool, dense weight v:
    # four paths, each |w|^p (1/4)^p |v|^p.
    w, v = -1.5, 0.7
    args = ((2, 2, 1), np.full((1, 1, 1, 1), w), None, (2, 2), np.full((1, 1), v), None)
    phi, kap = ref.cnn_reference(*args, p=p)
    np.testing.assert_allclose(phi ** p, 4 * abs(w) ** p * 0.25 ** p * abs(v) ** p)
    np.testing.assert_allclose(kap["kernel"].ravel(), [(4 * 0.25 ** p * abs(v) ** p) ** (2 / p)])
    np.testing.assert_allclose(kap["dense_w"].ravel(), [(4 * abs(w) ** p * 0.25 ** p) ** (2 / p)])
    phi_b, kap_b = ref.cnn_reference(*args, p=p, method="brute")
    np.testing.assert_allclose(phi_b, phi)
    # Max pooling as a sum over the window: constants 1.
    phi_m, _ = ref.cnn_reference(*args, p=p, pool_kind="sum")
    np.testing.assert_allclose(phi_m ** p, 4 * abs(w) ** p * abs(v) ** p)


@pytest.mark.parametrize("p", P_VALUES)
def test_cnn_shared_kernel_sums_occurrences(p):
    # kappa of a kernel entry = (sum over its matrix occurrences of gamma_in * gamma_out)^(2/p),
    # checked against enumeration on a 4x4 SAME case with pooling.
    rng = np.random.default_rng(9)
    in_hwc, pool = (4, 4, 1), (2, 2)
    kernel = rng.normal(size=(2, 2, 1, 2))
    conv = ref.conv2d_layer(in_hwc[:2], kernel, padding="SAME")
    n_flat = ref.pool2d_layer(conv.meta["out_hwc"], pool).shape[1]
    args = (in_hwc, kernel, rng.normal(size=2), pool, rng.normal(size=(n_flat, 2)),
            rng.normal(size=2))
    phi_g, kap_g = ref.cnn_reference(*args, p=p, padding="SAME")
    phi_b, kap_b = ref.cnn_reference(*args, p=p, padding="SAME", method="brute")
    np.testing.assert_allclose(phi_g, phi_b, rtol=1e-12)
    for name in kap_g:
        np.testing.assert_allclose(kap_g[name], kap_b[name], rtol=1e-12)
    # Each kernel entry occurs at several positions: it is more than any single occurrence.
    assert (conv.tags == 0).sum() > 1


def _residual_params(rng, d_in=2, d_h=3, d_out=2):
    return {"W1": rng.normal(size=(d_in, d_h)), "b1": rng.normal(size=d_h),
            "W2": rng.normal(size=(d_h, d_h)), "b2": rng.normal(size=d_h),
            "W3": rng.normal(size=(d_h, d_out)), "b3": rng.normal(size=d_out)}


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("alpha", [1.0, -0.5])
def test_residual_reference_closed_form(p, alpha):
    rng = np.random.default_rng(10)
    prm = _residual_params(rng)
    phi, kap, n_paths = ref.residual_mlp_reference(prm, p, alpha)
    a = {k: np.abs(v) ** p for k, v in prm.items()}
    s = abs(alpha) ** p
    g1 = np.ones(2) @ a["W1"] + a["b1"]
    g2 = s * (g1 @ a["W2"] + a["b2"]) + g1
    g3 = g2 @ a["W3"] + a["b3"]
    np.testing.assert_allclose(phi ** p, g3.sum(), rtol=1e-12)
    o3 = np.ones(2)
    o2 = a["W3"] @ o3
    o_a2 = s * o2
    o1 = a["W2"] @ o_a2 + o2
    np.testing.assert_allclose(kap["W3"], np.outer(g2, o3) ** (2 / p), rtol=1e-12)
    np.testing.assert_allclose(kap["b3"], o3 ** (2 / p), rtol=1e-12)
    np.testing.assert_allclose(kap["W2"], np.outer(g1, o_a2) ** (2 / p), rtol=1e-12)
    np.testing.assert_allclose(kap["b2"], o_a2 ** (2 / p), rtol=1e-12)
    np.testing.assert_allclose(kap["W1"], np.outer(np.ones(2), o1) ** (2 / p), rtol=1e-12)
    np.testing.assert_allclose(kap["b1"], o1 ** (2 / p), rtol=1e-12)
    # Paths: from x (2) or b1 through either the branch (3 choices) or the skip (1), then out;
    # from b2 through the branch; from b3.
    assert n_paths == (2 * 3 + 3) * (3 + 1) * 2 + 3 * 2 + 2


def test_residual_forward_uses_skip():
    rng = np.random.default_rng(11)
    prm = _residual_params(rng)
    x = rng.normal(size=(4, 2))
    h1 = np.maximum(x @ prm["W1"] + prm["b1"], 0)
    h2 = np.maximum(h1 @ prm["W2"] + prm["b2"], 0) + h1
    np.testing.assert_allclose(ref.residual_mlp_forward(prm, x), h2 @ prm["W3"] + prm["b3"])


def test_parallel_edges_are_separate_paths():
    # out = h @ W2 - h @ W3: in the path network both are separate edges (|-1|^p = 1).
    edges = [("x", "h", 2.0, ("W1", (0,))), ("h", "o", 3.0, ("W2", (0,))),
             ("h", "o", -0.5, ("W3", (0,)))]
    for p in P_VALUES:
        phi, kap, n = ref.dag_bruteforce(edges, ["x"], ["o"], {k: (1,) for k in
                                                              ("W1", "W2", "W3")}, p)
        assert n == 2
        np.testing.assert_allclose(phi ** p, 2 ** p * (3 ** p + 0.5 ** p))
        np.testing.assert_allclose(kap["W1"], [(3 ** p + 0.5 ** p) ** (2 / p)])
        np.testing.assert_allclose(kap["W3"], [(2.0 ** p) ** (2 / p)])


def test_others_product_handles_zeros():
    others, prod = ref._others_products([2.0, 0.0, 3.0])
    assert prod == 0.0
    assert others == [0.0, 6.0, 0.0]
    for n in range(1, 5):
        f = list(np.arange(1.0, n + 1))
        others, prod = ref._others_products(f)
        for q in range(n):
            assert others[q] == pytest.approx(np.prod([f[r] for r in range(n) if r != q]))
        assert prod == pytest.approx(math.prod(f))
        assert list(itertools.accumulate(f, lambda a, b: a * b))[-1] == prod
