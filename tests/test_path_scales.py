"""path_scales / path_norm against the independent NumPy references in `reference.py`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import models_zoo as mz
import pathsgd_jax
import pathsgd_jax.linen as pj_linen
import reference as ref

P_VALUES = (1.0, 2.0, 3.0)
RTOL32 = 2e-5
RTOL64 = 1e-10


def _scales(apply_fn, params, x, p, jit):
    if jit:
        return jax.jit(lambda prm: pathsgd_jax.path_scales(apply_fn, prm, x, p=p))(params)
    return pathsgd_jax.path_scales(apply_fn, params, x, p=p)


def _norm(apply_fn, params, x, p, jit):
    if jit:
        return jax.jit(lambda prm: pathsgd_jax.path_norm(apply_fn, prm, x, p=p))(params)
    return pathsgd_jax.path_norm(apply_fn, params, x, p=p)


# ------------------------------------------------------------------------------------------
# MLPs
# ------------------------------------------------------------------------------------------

MLP_WIDTHS = [3, 5, 4, 2]


@pytest.mark.parametrize("p,bias,jit", [
    (p, bias, False) for p in P_VALUES for bias in (True, False, [True, False, True])
] + [(2.0, [True, False, True], True), (3.0, True, True), (1.0, False, True)])
def test_mlp_matches_bruteforce(p, bias, jit):
    params = mz.init_mlp(jax.random.key(0), MLP_WIDTHS, bias=bias)
    x = jnp.zeros((5, MLP_WIDTHS[0]))
    phi_ref, kap_ref, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), p)
    kappa = _scales(mz.mlp_apply, params, x, p, jit)
    chex.assert_trees_all_equal_structs(kappa, params)
    chex.assert_trees_all_close(kappa, mz.mlp_kappa_tree(kap_ref), rtol=RTOL32, atol=1e-7)
    phi = _norm(mz.mlp_apply, params, x, p, jit)
    assert jnp.shape(phi) == ()
    np.testing.assert_allclose(float(phi), phi_ref, rtol=RTOL32)


@pytest.mark.parametrize("p,jit", [(1.0, False), (2.0, True), (3.0, False)])
def test_large_dense_layers_match_gamma_reference(p, jit):
    # Layers of >= 2^16 weights take the streamed matrix-vector path; row counts that are
    # not multiples of its 16-row step exercise the tail.
    widths = [301, 260, 300, 3]
    params = mz.init_mlp(jax.random.key(4), widths, bias=True)
    phi_ref, kap_ref = ref.mlp_gamma(mz.mlp_to_layers(params), p)
    kappa = _scales(mz.mlp_apply, params, jnp.zeros((2, widths[0])), p, jit)
    chex.assert_trees_all_close(kappa, mz.mlp_kappa_tree(kap_ref), rtol=1e-4, atol=0)
    np.testing.assert_allclose(float(_norm(mz.mlp_apply, params, jnp.zeros((2, widths[0])),
                                           p, jit)), phi_ref, rtol=1e-4)


def test_streamed_and_fused_powered_products_agree_with_float64():
    # The CPU streams rows for vector @ |W|^p, GPUs and TPUs reduce in one fused kernel: check
    # both here (301 rows: not a multiple of the streamed loop's step).
    from pathsgd_jax import _kernels as pn  # pylint: disable=g-import-not-at-top
    w = jax.random.normal(jax.random.key(0), (301, 260))
    v_in = jax.random.uniform(jax.random.key(1), (301,))
    v_out = jax.random.uniform(jax.random.key(2), (260,))
    w64, in64, out64 = (np.asarray(a, np.float64) for a in (w, v_in, v_out))
    for p in (1.0, 2.0, 3.0):
        powered = np.abs(w64) ** p
        for fn in (pn._fused_vector_matrix, pn._streamed_vector_matrix):
            np.testing.assert_allclose(fn(v_in, w, p), in64 @ powered, rtol=1e-5)
        np.testing.assert_allclose(pn._fused_matrix_vector(w, v_out, p), powered @ out64,
                                   rtol=1e-5)


# No shrinking: every example traces the library afresh (slow); failures print the example.
@settings(max_examples=3, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(widths=st.lists(st.integers(1, 4), min_size=2, max_size=4),
       p=st.sampled_from([1.0, 1.5, 2.0, 3.0]), seed=st.integers(0, 2**16),
       bias_bits=st.integers(0, 7))
def test_mlp_random_architectures(widths, p, seed, bias_bits):
    bias = [bool((bias_bits >> k) & 1) for k in range(len(widths) - 1)]
    params = mz.init_mlp(jax.random.key(seed), widths, bias=bias)
    x = jnp.ones((2, widths[0]))
    phi_ref, kap_ref, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), p)
    kappa = pathsgd_jax.path_scales(mz.mlp_apply, params, x, p=p)
    chex.assert_trees_all_close(kappa, mz.mlp_kappa_tree(kap_ref), rtol=RTOL32, atol=1e-7)
    np.testing.assert_allclose(float(pathsgd_jax.path_norm(mz.mlp_apply, params, x, p=p)),
                               phi_ref, rtol=RTOL32)


def test_mlp_kappa_dtype_and_shapes_float32():
    params = mz.init_mlp(jax.random.key(1), MLP_WIDTHS)
    kappa = pathsgd_jax.path_scales(mz.mlp_apply, params, jnp.ones((2, 3)))
    chex.assert_trees_all_equal_shapes(kappa, params)
    for leaf in jax.tree.leaves(kappa):
        assert leaf.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(leaf)))
        assert bool(jnp.all(leaf > 0))


@pytest.mark.parametrize("p", [3.0])
def test_mlp_relu_as_maximum(p):
    params = mz.init_mlp(jax.random.key(2), MLP_WIDTHS)
    _, kap_ref, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), p)
    kappa = pathsgd_jax.path_scales(mz.mlp_apply_maximum, params, jnp.ones((1, 3)), p=p)
    chex.assert_trees_all_close(kappa, mz.mlp_kappa_tree(kap_ref), rtol=RTOL32, atol=1e-7)


def test_example_input_values_and_batch_size_do_not_matter():
    params = mz.init_mlp(jax.random.key(3), MLP_WIDTHS)
    k1 = pathsgd_jax.path_scales(mz.mlp_apply, params, jnp.zeros((1, 3)))
    k2 = pathsgd_jax.path_scales(mz.mlp_apply, params,
                                 -7.0 * jax.random.normal(jax.random.key(9), (13, 3)))
    chex.assert_trees_all_close(k1, k2, rtol=1e-6)


def test_negative_weights_use_absolute_values():
    params = mz.init_mlp(jax.random.key(4), MLP_WIDTHS)
    flipped = jax.tree.map(lambda a: -a, params)
    x = jnp.ones((1, 3))
    chex.assert_trees_all_close(pathsgd_jax.path_scales(mz.mlp_apply, params, x),
                                pathsgd_jax.path_scales(mz.mlp_apply, flipped, x), rtol=1e-6)
    np.testing.assert_allclose(float(pathsgd_jax.path_norm(mz.mlp_apply, params, x, p=3.0)),
                               float(pathsgd_jax.path_norm(mz.mlp_apply, flipped, x, p=3.0)),
                               rtol=1e-6)


# ------------------------------------------------------------------------------------------
# CNN: conv + avg pool + dense
# ------------------------------------------------------------------------------------------

CNN_CASES = [
    # (in_hwc, kernel_hw, cout, pool, padding)
    ((4, 4, 1), (2, 2), 2, (2, 2), "VALID"),  # 3x3 conv output, pool drops a row/column
    ((4, 4, 2), (3, 3), 2, (2, 2), "SAME"),
    ((5, 4, 1), (2, 3), 3, (2, 1), "SAME"),
]


def _cnn_case(idx, seed=0, dtype=jnp.float32):
    in_hwc, kernel_hw, cout, pool, padding = CNN_CASES[idx]
    params = mz.init_cnn(jax.random.key(seed), in_hwc, kernel_hw, cout, pool, 2,
                         padding=padding, dtype=dtype)
    return in_hwc, pool, padding, params


@pytest.mark.parametrize("case,pool_impl", [(0, "reshape"), (1, "linen"), (2, "reshape")])
def test_cnn_model_matches_reference_forward(case, pool_impl):
    # Sanity: our jax model and the reference describe the same function.
    in_hwc, pool, padding, params = _cnn_case(case)
    apply = mz.make_cnn_apply(padding=padding, pool=pool, pool_impl=pool_impl)
    x = jax.random.normal(jax.random.key(1), (3, *in_hwc))
    np.testing.assert_allclose(
        np.asarray(jax.jit(apply)(params, x)),
        ref.cnn_forward(np.asarray(x), *mz.cnn_reference_args(params, in_hwc, pool)[1:],
                        padding=padding), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p,case,pool_impl", [
    (1.0, 0, "reshape"), (2.0, 0, "linen"), (3.0, 1, "reshape"), (2.0, 1, "linen"),
    (1.0, 2, "linen"), (3.0, 2, "reshape")])
def test_cnn_matches_unrolled_reference(p, case, pool_impl):
    in_hwc, pool, padding, params = _cnn_case(case)
    apply = mz.make_cnn_apply(padding=padding, pool=pool, pool_impl=pool_impl)
    x = jnp.ones((2, *in_hwc))
    phi_ref, kap_ref = ref.cnn_reference(*mz.cnn_reference_args(params, in_hwc, pool), p=p,
                                         padding=padding)
    kappa = pathsgd_jax.path_scales(apply, params, x, p=p)
    chex.assert_trees_all_close(kappa, mz.cnn_kappa_tree(kap_ref), rtol=RTOL32, atol=1e-7)
    np.testing.assert_allclose(float(pathsgd_jax.path_norm(apply, params, x, p=p)), phi_ref,
                               rtol=RTOL32)


@pytest.mark.parametrize("p", [3.0])
def test_cnn_jit(p):
    in_hwc, pool, padding, params = _cnn_case(1, seed=3)
    apply = mz.make_cnn_apply(padding=padding, pool=pool)
    x = jnp.ones((1, *in_hwc))
    phi_ref, kap_ref = ref.cnn_reference(*mz.cnn_reference_args(params, in_hwc, pool), p=p,
                                         padding=padding)
    kappa = _scales(apply, params, x, p, jit=True)
    chex.assert_trees_all_close(kappa, mz.cnn_kappa_tree(kap_ref), rtol=RTOL32, atol=1e-7)
    np.testing.assert_allclose(float(_norm(apply, params, x, p, jit=True)), phi_ref,
                               rtol=RTOL32)


def test_cnn_avg_pool_constant_powered_not_naive():
    # For p = 2 the path network must use (1/k)^2: the naive evaluation of the user's network
    # on |theta|^2 (keeping 1/k) is off. Make sure the reference sees a real difference, and
    # that the library follows the reference.
    in_hwc, pool, padding, params = _cnn_case(0, seed=4)
    apply = mz.make_cnn_apply(padding=padding, pool=pool)
    powered = jax.tree.map(lambda a: jnp.abs(a) ** 2, params)
    naive = jax.grad(lambda v: jnp.sum(apply(v, jnp.ones((1, *in_hwc)))))(powered)
    _, kap_ref = ref.cnn_reference(*mz.cnn_reference_args(params, in_hwc, pool), p=2.0,
                                   padding=padding)
    kappa = pathsgd_jax.path_scales(apply, params, jnp.ones((1, *in_hwc)), p=2.0)
    ratio = np.asarray(naive["conv"]["kernel"]) / kap_ref["kernel"]
    assert np.all(np.abs(ratio - 1.0) > 0.5)  # naive is visibly wrong (here by a factor k=4)
    chex.assert_trees_all_close(kappa, mz.cnn_kappa_tree(kap_ref), rtol=RTOL32, atol=1e-7)


def test_cnn_linen_adapter():
    module = mz.LinenCNN(cout=2, kernel_hw=(3, 3), padding="SAME", pool=(2, 2), n_out=2)
    in_hwc = (4, 4, 2)
    x = jnp.ones((3, *in_hwc))
    variables = module.init(jax.random.key(5), x)
    params = variables["params"]
    # Make the biases non-zero so that bias paths matter.
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 if "bias" in jax.tree_util.keystr(path) else a, params)
    apply = pj_linen.apply_fn(module)
    np.testing.assert_allclose(np.asarray(apply(params, x)),
                               np.asarray(module.apply({"params": params}, x)), rtol=1e-6)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    args = (in_hwc, f64(params["conv"]["kernel"]), f64(params["conv"]["bias"]), (2, 2),
            f64(params["dense"]["kernel"]), f64(params["dense"]["bias"]))
    for p in (1.0, 2.0):
        phi_ref, kap_ref = ref.cnn_reference(*args, p=p, padding="SAME")
        kappa = pathsgd_jax.path_scales(apply, params, x, p=p)
        chex.assert_trees_all_close(jax.tree.map(np.asarray, kappa),
                                    mz.cnn_kappa_tree(kap_ref), rtol=RTOL32, atol=1e-7)


@pytest.mark.parametrize("pool_impl", ["max_reshape", "max_linen"])
def test_cnn_max_pool_is_sum_over_window(pool_impl):
    in_hwc, pool, padding, params = _cnn_case(1, seed=6)
    apply = mz.make_cnn_apply(padding=padding, pool=pool, pool_impl=pool_impl)
    x = jnp.ones((1, *in_hwc))
    for p in (1.0, 2.0):
        phi_ref, kap_ref = ref.cnn_reference(*mz.cnn_reference_args(params, in_hwc, pool),
                                             p=p, padding=padding, pool_kind="sum")
        kappa = pathsgd_jax.path_scales(apply, params, x, p=p)
        chex.assert_trees_all_close(kappa, mz.cnn_kappa_tree(kap_ref), rtol=RTOL32, atol=1e-7)
        np.testing.assert_allclose(float(pathsgd_jax.path_norm(apply, params, x, p=p)),
                                   phi_ref, rtol=RTOL32)


def test_float64_mlp_and_cnn():
    # Under x64, float64 params give float64 scales that match the float64 references tightly.
    with jax.enable_x64(True):
        p = 3.0
        params = mz.init_mlp(jax.random.key(5), MLP_WIDTHS, dtype=jnp.float64)
        x = jnp.ones((2, 3), jnp.float64)
        phi_ref, kap_ref, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), p)
        kappa = _scales(mz.mlp_apply, params, x, p, jit=True)
        for leaf in jax.tree.leaves(kappa):
            assert leaf.dtype == jnp.float64
        chex.assert_trees_all_close(kappa, mz.mlp_kappa_tree(kap_ref), rtol=RTOL64)
        phi = _norm(mz.mlp_apply, params, x, p, jit=True)
        np.testing.assert_allclose(float(phi), phi_ref, rtol=RTOL64)

        in_hwc, pool, padding, params = _cnn_case(2, seed=7, dtype=jnp.float64)
        apply = mz.make_cnn_apply(padding=padding, pool=pool)
        x = jnp.ones((1, *in_hwc), jnp.float64)
        p = 2.0
        phi_ref, kap_ref = ref.cnn_reference(*mz.cnn_reference_args(params, in_hwc, pool),
                                             p=p, padding=padding)
        kappa = _scales(apply, params, x, p, jit=True)
        chex.assert_trees_all_close(kappa, mz.cnn_kappa_tree(kap_ref), rtol=RTOL64)


# ------------------------------------------------------------------------------------------
# Residual MLP, constant scalings, subtraction
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p,jit", [(1.0, False), (2.0, False), (3.0, False), (2.0, True)])
def test_residual_mlp(p, jit):
    params = mz.init_residual(jax.random.key(8), 3, 4, 2)
    apply = mz.make_residual_apply()
    x = jnp.ones((4, 3))
    np.testing.assert_allclose(np.asarray(apply(params, x)),
                               ref.residual_mlp_forward(mz.to_numpy(params), np.asarray(x)),
                               rtol=1e-5, atol=1e-6)
    phi_ref, kap_ref, _ = ref.residual_mlp_reference(mz.to_numpy(params), p)
    kappa = _scales(apply, params, x, p, jit)
    chex.assert_trees_all_close(kappa, kap_ref, rtol=RTOL32, atol=1e-7)
    np.testing.assert_allclose(float(_norm(apply, params, x, p, jit)), phi_ref, rtol=RTOL32)


@pytest.mark.parametrize("p,alpha", [(2.0, 0.5), (3.0, -0.25), (1.0, 3.0)])
def test_residual_branch_constant_is_powered(p, alpha):
    params = mz.init_residual(jax.random.key(9), 3, 4, 2)
    apply = mz.make_residual_apply(alpha)
    x = jnp.ones((1, 3))
    phi_ref, kap_ref, _ = ref.residual_mlp_reference(mz.to_numpy(params), p, alpha)
    kappa = pathsgd_jax.path_scales(apply, params, x, p=p)
    chex.assert_trees_all_close(kappa, kap_ref, rtol=RTOL32, atol=1e-7)
    np.testing.assert_allclose(float(pathsgd_jax.path_norm(apply, params, x, p=p)), phi_ref,
                               rtol=RTOL32)


@pytest.mark.parametrize("p", P_VALUES)
def test_subtraction_acts_as_addition(p):
    # out = relu(x W1 + b1) W2 - relu(x W1 + b1) W3: two parallel edge sets, |-1|^p = 1.
    key = jax.random.split(jax.random.key(10), 4)
    params = {"W1": jax.random.normal(key[0], (3, 4)), "b1": jax.random.normal(key[1], (4,)),
              "W2": jax.random.normal(key[2], (4, 2)), "W3": jax.random.normal(key[3], (4, 2))}

    def apply(prm, x):
        h = jax.nn.relu(x @ prm["W1"] + prm["b1"][None, :])
        return h @ prm["W2"] - h @ prm["W3"]

    a = mz.to_numpy(params)
    edges = []
    for i in range(3):
        for j in range(4):
            edges.append((("x", i), ("h", j), a["W1"][i, j], ("W1", (i, j))))
    for j in range(4):
        edges.append((("b", 1), ("h", j), a["b1"][j], ("b1", (j,))))
        for m in range(2):
            edges.append((("h", j), ("o", m), a["W2"][j, m], ("W2", (j, m))))
            edges.append((("h", j), ("o", m), -a["W3"][j, m], ("W3", (j, m))))
    shapes = {k: v.shape for k, v in a.items()}
    phi_ref, kap_ref, _ = ref.dag_bruteforce(edges, [("x", i) for i in range(3)] + [("b", 1)],
                                             [("o", 0), ("o", 1)], shapes, p)
    kappa = pathsgd_jax.path_scales(apply, params, jnp.ones((1, 3)), p=p)
    chex.assert_trees_all_close(kappa, kap_ref, rtol=RTOL32, atol=1e-7)
    np.testing.assert_allclose(float(pathsgd_jax.path_norm(apply, params, jnp.ones((1, 3)),
                                                           p=p)), phi_ref, rtol=RTOL32)


def test_dead_unit_kappa_zero():
    params = mz.init_mlp(jax.random.key(11), [3, 4, 2])
    params[0]["w"] = params[0]["w"].at[:, 1].set(0.0)
    params[0]["b"] = params[0]["b"].at[1].set(0.0)
    _, kap_ref, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), 2.0)
    kappa = pathsgd_jax.path_scales(mz.mlp_apply, params, jnp.ones((1, 3)))
    chex.assert_trees_all_close(kappa, mz.mlp_kappa_tree(kap_ref), rtol=RTOL32, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(kappa[1]["w"][1, :]), 0.0)


def test_mask_callable_and_tree_agree_on_scaled_leaves():
    params = mz.init_mlp(jax.random.key(12), MLP_WIDTHS)
    _, kap_ref, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), 2.0)
    kap_ref = mz.mlp_kappa_tree(kap_ref)
    # Exclude the output bias: it lies on no path through any other edge, so every other
    # leaf keeps its reference scale whatever the excluded leaf is replaced by.
    mask_tree = jax.tree.map(lambda _: True, params)
    mask_tree[-1]["b"] = False

    def mask_fn(prm):
        m = jax.tree.map(lambda _: True, prm)
        m[-1]["b"] = False
        return m

    x = jnp.ones((1, 3))
    for mask in (mask_tree, mask_fn):
        kappa = pathsgd_jax.path_scales(mz.mlp_apply, params, x, mask=mask)
        for k in range(3):
            np.testing.assert_allclose(np.asarray(kappa[k]["w"]), kap_ref[k]["w"], rtol=RTOL32)
        for k in range(2):
            np.testing.assert_allclose(np.asarray(kappa[k]["b"]), kap_ref[k]["b"], rtol=RTOL32)
