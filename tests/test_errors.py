"""Networks that are not path networks are rejected with a useful message; masks; MaskedNode.

Every operation below (unless it lives inside a Flax module) is written in this file, so the
error message must point at this file.
"""


import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import models_zoo as mz
import numpy as np
import optax
import pytest
import reference as ref
from markers import Markers, first_quoted

import pathsgd_jax
import pathsgd_jax.linen as pj_linen

MARKS = Markers(__file__)
assert_points_at = MARKS.assert_points_at


def _params(seed=0, d_in=3, d_h=4, d_out=2):
    k = jax.random.split(jax.random.key(seed), 4)
    return {"w1": jax.random.normal(k[0], (d_in, d_h)),
            "b1": 0.3 * jax.random.normal(k[1], (d_h,)),
            "w2": jax.random.normal(k[2], (d_h, d_out)),
            "w3": jax.random.normal(k[3], (d_in, d_h))}


def _pre(prm, x):
    return x @ prm["w1"] + prm["b1"][None, :]


def _tanh(prm, x):
    return jnp.tanh(_pre(prm, x)) @ prm["w2"]  # @tanh


def _sigmoid(prm, x):
    return jax.nn.sigmoid(_pre(prm, x)) @ prm["w2"]  # @sigmoid


def _gelu(prm, x):
    return jax.nn.gelu(_pre(prm, x)) @ prm["w2"]  # @gelu


def _gelu_exact(prm, x):
    return jax.nn.gelu(_pre(prm, x), approximate=False) @ prm["w2"]  # @gelu_exact


def _silu(prm, x):
    return jax.nn.silu(_pre(prm, x)) @ prm["w2"]  # @silu


def _softplus(prm, x):
    return jax.nn.softplus(_pre(prm, x)) @ prm["w2"]  # @softplus


def _exp(prm, x):
    return jnp.exp(_pre(prm, x)) @ prm["w2"]  # @exp


def _log(prm, x):
    return jnp.log(jax.nn.relu(_pre(prm, x)) + 1.0) @ prm["w2"]  # @log


def _softmax_inside(prm, x):
    return jax.nn.softmax(jax.nn.relu(_pre(prm, x)), axis=-1) @ prm["w2"]  # @softmax


def _act_product(prm, x):
    h = jax.nn.relu(_pre(prm, x))
    g = jax.nn.relu(x @ prm["w3"])
    return (h * g) @ prm["w2"]  # @act_product


def _weight_norm(prm, x):
    w1 = prm["w1"] / jnp.linalg.norm(prm["w1"])  # @weight_norm
    return jax.nn.relu(x @ w1 + prm["b1"][None, :]) @ prm["w2"]


def _take_input_indices(prm, x):
    # Integer input; its first two columns select hidden units (a gather of activations).
    h = jax.nn.relu(x.astype(jnp.float32) @ prm["w1"] + prm["b1"][None, :])
    picked = jnp.take_along_axis(h, x[:, :2], axis=1)  # @take_input_indices
    return picked @ prm["w2"][:2, :]


def _embedding_lookup(prm, x):
    # Integer token input: an embedding table indexed by the input.
    e = prm["w1"][x[:, 0]]  # @embedding_lookup
    return jax.nn.relu(e + prm["b1"][None, :]) @ prm["w2"]


FLOAT_X = jnp.ones((2, 3), jnp.float32)
INT_X = jnp.ones((2, 3), jnp.int32)

# name -> (apply_fn, example_input, the primitive the message must name first, other primitives
# it must quote). The offending line carries the marker comment `# @name`.
WRITTEN_HERE = {
    "tanh": (_tanh, FLOAT_X, "tanh", ()),
    "sigmoid": (_sigmoid, FLOAT_X, "logistic", ()),
    # tanh-approximated gelu starts with x**3.
    "gelu": (_gelu, FLOAT_X, "integer_pow", ()),
    "gelu_exact": (_gelu_exact, FLOAT_X, "erfc", ()),
    "silu": (_silu, FLOAT_X, "logistic", ()),
    # softplus = logaddexp(x, 0): its first non-path primitive compares two activations.
    "softplus": (_softplus, FLOAT_X, "ne", ()),
    "exp": (_exp, FLOAT_X, "exp", ()),
    "log": (_log, FLOAT_X, "log", ()),
    # softmax subtracts its max(x, c) stabiliser first.
    "softmax": (_softmax_inside, FLOAT_X, "max", ()),
    "act_product": (_act_product, FLOAT_X, "mul", ()),
    "weight_norm": (_weight_norm, FLOAT_X, "sqrt", ()),
    # Integer indices derived from the input: the bounds check `lt` of the gather comes first.
    "take_input_indices": (_take_input_indices, INT_X, "lt", ("gather",)),
    "embedding_lookup": (_embedding_lookup, INT_X, "lt", ("gather",)),
}


def _error_message(apply_fn, params, x, entry="path_scales"):
    if entry == "path_scales":
        call = lambda: pathsgd_jax.path_scales(apply_fn, params, x)  # noqa: E731
    elif entry == "path_norm":
        call = lambda: pathsgd_jax.path_norm(apply_fn, params, x)  # noqa: E731
    else:
        def call():
            tx = pathsgd_jax.path_sgd(0.1, apply_fn, x)
            g = jax.tree.map(jnp.ones_like, params)
            return tx.update(g, tx.init(params), params)
    with pytest.raises(pathsgd_jax.PathNetworkError) as info:
        call()
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_exception_hierarchy():
    assert issubclass(pathsgd_jax.PathNetworkError, ValueError)
    assert issubclass(pathsgd_jax.UnsupportedOperationError, pathsgd_jax.PathNetworkError)


@pytest.mark.parametrize("name", sorted(WRITTEN_HERE))
def test_rejected_ops_written_here(name):
    """Exact primitive, quoted, and `test_errors.py:<line>` of the operation.

    Mutations caught: the line number dropped from the location; the primitive's name
    dropped from the message (the old substring checks matched the advice text or the
    function names).
    """
    apply_fn, x, primitive, also_quoted = WRITTEN_HERE[name]
    params = _params()
    if name != "act_product":
        params = {k: v for k, v in params.items() if k != "w3"}
    apply_fn(params, x)  # the network itself runs fine
    msg = _error_message(apply_fn, params, x)
    assert first_quoted(msg) == primitive, msg
    for other in also_quoted:
        assert f"`{other}`" in msg, (other, msg)
    assert_points_at(msg, name)


def test_rejected_op_is_unsupported_operation_error():
    with pytest.raises(pathsgd_jax.UnsupportedOperationError) as info:
        pathsgd_jax.path_scales(_tanh, _params(), FLOAT_X)
    assert first_quoted(str(info.value)) == "tanh"


@pytest.mark.parametrize("entry", ["path_norm", "transform", "jit"])
def test_rejected_through_every_entry_point(entry):
    params = {k: v for k, v in _params().items() if k != "w3"}
    if entry == "jit":
        with pytest.raises(pathsgd_jax.PathNetworkError) as info:
            jax.jit(lambda prm: pathsgd_jax.path_scales(_exp, prm, FLOAT_X))(params)
        msg = str(info.value)
    else:
        msg = _error_message(_exp, params, FLOAT_X, entry)
    assert first_quoted(msg) == "exp", msg
    assert_points_at(msg, "exp")


# ------------------------------------------------------------------------------------------
# Flax normalisation layers
# ------------------------------------------------------------------------------------------


class _WithNorm(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        if self.kind == "layernorm":
            h = nn.LayerNorm()(h)
        elif self.kind == "rmsnorm":
            h = nn.RMSNorm()(h)
        elif self.kind == "batchnorm":
            h = nn.BatchNorm(use_running_average=False)(h)
        h = nn.relu(h)
        return nn.Dense(2)(h)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_flax_layer_and_rms_norm_rejected(kind):
    module = _WithNorm(kind)
    x = jnp.ones((2, 3))
    params = module.init(jax.random.key(0), x)["params"]
    msg = _error_message(pj_linen.apply_fn(module), params, x)
    assert first_quoted(msg) == "square", msg  # the variance
    # The module path names the layer: _WithNorm/LayerNorm_0 or _WithNorm/RMSNorm_0.
    layer = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}[kind]
    assert f"_WithNorm/{layer}_0" in msg, msg


def test_flax_train_mode_batchnorm_needs_the_batch():
    """Train-mode BatchNorm reads the batch's statistics: without a batch, the error says how
    to pass one (`inputs=`); with one, it is read (tests/test_batchnorm.py checks the values).

    Guards against: the statistics path silently using stale or zero statistics."""
    module = _WithNorm("batchnorm")
    x = jax.random.normal(jax.random.key(1), (4, 3))
    variables = module.init(jax.random.key(0), x)

    def apply_fn(params, xb):
        out, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, xb,
                              mutable=["batch_stats"])
        return out

    shape_only = jax.ShapeDtypeStruct(x.shape, x.dtype)
    with pytest.raises(pathsgd_jax.PathNetworkError, match=r"statistics of its batch.*inputs=x"):
        pathsgd_jax.path_scales(apply_fn, variables["params"], shape_only)
    tx = pathsgd_jax.path_sgd(0.1, apply_fn, x)
    state = tx.init(variables["params"])
    grads = jax.tree.map(jnp.ones_like, variables["params"])
    with pytest.raises(pathsgd_jax.PathNetworkError, match=r"tx\.update\(grads, opt_state, "
                       r"params, inputs=x\)"):
        tx.update(grads, state, variables["params"])
    kappa = pathsgd_jax.path_scales(apply_fn, variables["params"], x)
    assert all(bool(jnp.all(jnp.isfinite(k))) for k in jax.tree.leaves(kappa))


class _EvalBatchNormMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, name="d1")(x)
        h = nn.BatchNorm(use_running_average=True, name="bn")(h)
        return nn.Dense(2, name="d2")(nn.relu(h))


def test_eval_mode_batchnorm_is_accepted_as_affine():
    # Eval-mode BatchNorm is an affine map with constant statistics; it is a path network.
    # With zero running mean and zero BatchNorm bias the network is unambiguously
    # h_j = s_j * (x W1 + b1)_j, s_j = scale_j / sqrt(var_j + eps): the effective weight s_j is
    # an edge weight (powered), whichever way the library folds the normalisation.
    module = _EvalBatchNormMLP()
    x = jnp.ones((2, 3))
    variables = module.init(jax.random.key(0), x)
    rng = np.random.default_rng(0)
    stats = {"bn": {"mean": jnp.zeros((4,), jnp.float32),
                    "var": jnp.asarray(rng.uniform(0.2, 3.0, size=4), jnp.float32)}}
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype),
                          variables["params"])
    params["bn"]["bias"] = jnp.zeros((4,), jnp.float32)
    apply_fn = pj_linen.apply_fn(module, variables={"batch_stats": stats})
    p = 2.0
    kappa = pathsgd_jax.path_scales(apply_fn, params, x, p=p)
    for leaf in jax.tree.leaves(kappa):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    eps = 1e-5
    s = np.asarray(params["bn"]["scale"], np.float64) / np.sqrt(
        np.asarray(stats["bn"]["var"], np.float64) + eps)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    w1, b1 = f64(params["d1"]["kernel"]), f64(params["d1"]["bias"])
    layers = [(w1 * s[None, :], b1 * s), (f64(params["d2"]["kernel"]), f64(params["d2"]["bias"]))]
    _, kap, _ = ref.mlp_bruteforce(layers, p)
    # d2 sees the folded network directly.
    np.testing.assert_allclose(np.asarray(kappa["d2"]["kernel"]), kap[1][0], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(kappa["d2"]["bias"]), kap[1][1], rtol=1e-4)
    # d1's edges pass through the constant factor s_j: kappa = |s_j|^2 * kappa(folded edge).
    np.testing.assert_allclose(np.asarray(kappa["d1"]["kernel"]),
                               kap[0][0] * (s[None, :] ** 2), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(kappa["d1"]["bias"]), kap[0][1] * s ** 2, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# Max pooling: accepted, reported
# ------------------------------------------------------------------------------------------


def _maxpool_mlp(prm, x):
    h = jax.nn.relu(x @ prm["w1"] + prm["b1"][None, :])  # (B, 4)
    h = nn.max_pool(h[:, :, None], (2,), strides=(2,))[:, :, 0]  # (B, 2)
    return h @ prm["w2"]


def _maxpool_mlp_reduce(prm, x):
    h = jax.nn.relu(x @ prm["w1"] + prm["b1"][None, :])
    return h.reshape(h.shape[0], 2, 2).max(axis=2) @ prm["w2"]


@pytest.mark.parametrize("apply_fn", [_maxpool_mlp, _maxpool_mlp_reduce],
                         ids=["reduce_window_max", "reduce_max"])
def test_max_pool_accepted_and_reported(apply_fn):
    params = {"w1": _params()["w1"], "b1": _params()["b1"],
              "w2": jax.random.normal(jax.random.key(3), (2, 2))}
    x = jnp.ones((1, 3))
    kappa = pathsgd_jax.path_scales(apply_fn, params, x)
    # Max pooling = sum over the window: a dense layer with a 0/1 matrix in between.
    pool = np.zeros((4, 2))
    pool[[0, 1], 0] = 1.0
    pool[[2, 3], 1] = 1.0
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    layers = [ref.dense_layer(params["w1"], params["b1"], name="w1", bias_name="b1"),
              ref.UnrolledLayer(matrix=pool, tags=-np.ones((4, 2), np.int64), relu=False),
              ref.dense_layer(f64(params["w2"]), None, name="w2", relu=False)]
    _, kap_ref = ref.gamma_method(layers, {"w1": (3, 4), "b1": (4,), "w2": (2, 2)}, 2.0)
    chex.assert_trees_all_close(jax.tree.map(np.asarray, kappa), kap_ref, rtol=2e-5)
    report = str(pathsgd_jax.path_structure(apply_fn, params, x))
    assert "max" in report.lower()
    for leaf in ("w1", "b1", "w2"):
        assert leaf in report


def test_path_structure_names_leaves_and_exclusions():
    params = mz.init_mlp(jax.random.key(0), [3, 4, 2])
    mask = [{"w": True, "b": True}, {"w": True, "b": False}]
    report = pathsgd_jax.path_structure(mz.mlp_apply, params, jnp.ones((1, 3)), mask=mask)
    text = str(report)
    assert text.strip()
    for idx, name in ((0, "w"), (0, "b"), (1, "w"), (1, "b")):
        spellings = (f"[{idx}]['{name}']", f"{idx}/{name}", f"{idx}.{name}")
        assert any(sp in text for sp in spellings), (idx, name, text)
    assert "exclud" in text.lower()


# ------------------------------------------------------------------------------------------
# MaskedNode and masks
# ------------------------------------------------------------------------------------------


def _apply_ignoring_frozen(prm, x):
    return jax.nn.relu(x @ prm["w1"] + prm["b1"][None, :]) @ prm["w2"]


def test_masked_node_raises_in_path_scales():
    params = {k: v for k, v in _params().items() if k != "w3"}
    params["frozen"] = optax.MaskedNode()
    with pytest.raises(ValueError, match="MaskedNode"):
        pathsgd_jax.path_scales(_apply_ignoring_frozen, params, FLOAT_X)


def test_masked_node_raises_in_transform():
    params = {k: v for k, v in _params().items() if k != "w3"}
    params["frozen"] = optax.MaskedNode()
    tx = pathsgd_jax.scale_by_path_norm(_apply_ignoring_frozen, FLOAT_X)
    g = {k: (v if isinstance(v, optax.MaskedNode) else jnp.ones_like(v))
         for k, v in params.items()}
    with pytest.raises(ValueError, match="MaskedNode"):
        state = tx.init(params)
        tx.update(g, state, params)


def test_masked_node_from_optax_masked_raises():
    # optax.masked hands the inner transformation params with MaskedNode leaves.
    params = {k: v for k, v in _params().items() if k != "w3"}
    tx = optax.masked(pathsgd_jax.path_sgd(0.1, _apply_ignoring_frozen, FLOAT_X),
                      {"w1": True, "b1": True, "w2": False})
    g = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match="MaskedNode"):
        state = tx.init(params)
        tx.update(g, state, params)


@pytest.mark.parametrize("as_callable", [False, True])
def test_mask_excluded_leaf_passes_through(as_callable):
    params = mz.init_mlp(jax.random.key(5), [3, 4, 2])
    x, y = mz.regression_batch(6, 8, 3, 2)
    tree = [{"w": True, "b": False}, {"w": True, "b": True}]
    mask = (lambda prm: tree) if as_callable else tree
    g = jax.grad(mz.mse(mz.mlp_apply))(params, x, y)
    lr = 0.1
    for tx, factor in ((pathsgd_jax.path_sgd(lr, mz.mlp_apply, x, mask=mask), -lr),
                       (pathsgd_jax.scale_by_path_norm(mz.mlp_apply, x, mask=mask), 1.0)):
        updates, _ = tx.update(g, tx.init(params), params)
        np.testing.assert_allclose(np.asarray(updates[0]["b"]), factor * np.asarray(g[0]["b"]),
                                   rtol=1e-6)
        # The others are still path-scaled: not equal to the plain (scaled) gradient.
        assert not np.allclose(np.asarray(updates[0]["w"]), factor * np.asarray(g[0]["w"]),
                               rtol=1e-3)
        # How the excluded first bias enters the path network is the library's choice; only
        # check that every update is finite.
        for u in jax.tree.leaves(updates):
            assert bool(jnp.all(jnp.isfinite(u)))


def test_mask_allows_excluding_output_bias_with_exact_scales():
    params = mz.init_mlp(jax.random.key(7), [3, 4, 2])
    x, y = mz.regression_batch(8, 8, 3, 2)
    g = jax.grad(mz.mse(mz.mlp_apply))(params, x, y)
    mask = [{"w": True, "b": True}, {"w": True, "b": False}]
    lr = 0.1
    tx = pathsgd_jax.path_sgd(lr, mz.mlp_apply, x, mask=mask)
    updates, _ = tx.update(g, tx.init(params), params)
    _, kap, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), 2.0)
    kap = mz.mlp_kappa_tree(kap)
    np.testing.assert_allclose(np.asarray(updates[1]["b"]), -lr * np.asarray(g[1]["b"]),
                               rtol=1e-6)
    for k, name in ((0, "w"), (0, "b"), (1, "w")):
        np.testing.assert_allclose(np.asarray(updates[k][name]),
                                   -lr * np.asarray(g[k][name], np.float64) / kap[k][name],
                                   rtol=5e-5, atol=1e-9)
