"""Bad input gets a clear, specific exception whose message names the problem.

Complements tests/test_errors.py (which covers the common non-path operations written at top
level, Flax LayerNorm/RMSNorm/train-mode BatchNorm, and MaskedNode through optax.masked):
here, mismatched trees, failing apply_fns, wrong example shapes, hyperparameter validation,
integer/complex/bool params, optax.partition, and unsupported operations hidden inside
scan/remat/custom_jvp/nested jit, hand-written normalisations, attention, ReLU6, maxout,
thresholds, data-dependent control flow and stochastic layers.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from markers import Markers, first_quoted

import pathsgd_jax as psgd
from pathsgd_jax import PathNetworkError, UnsupportedOperationError

MARKS = Markers(__file__)
assert_points_at = MARKS.assert_points_at
X = jnp.ones((4, 3), jnp.float32)


def params3(seed=0, d_in=3, d_h=4, d_out=2):
    k = jax.random.split(jax.random.key(seed), 3)
    return {"w1": jax.random.normal(k[0], (d_in, d_h)) / math.sqrt(d_in),
            "b1": 0.1 * jax.random.normal(k[1], (d_h,)),
            "w2": jax.random.normal(k[2], (d_h, d_out)) / math.sqrt(d_h)}


def net(prm, x):
    return jax.nn.relu(x @ prm["w1"] + prm["b1"][None, :]) @ prm["w2"]


def entry_points(apply_fn, params, x):
    """Every public way the network gets traced, as zero-argument callables."""
    grads = jax.tree.map(jnp.ones_like, params)

    def transform(refresh_every):
        def call():
            tx = psgd.path_sgd(0.1, apply_fn, x, refresh_every=refresh_every)
            state = tx.init(params)
            return tx.update(grads, state, params)
        return call

    return {
        "path_scales": lambda: psgd.path_scales(apply_fn, params, x),
        "path_norm": lambda: psgd.path_norm(apply_fn, params, x),
        "path_structure": lambda: psgd.path_structure(apply_fn, params, x),
        "path_sgd": transform(1),
        "path_sgd_refresh": transform(3),
        "jit": lambda: jax.jit(lambda prm: psgd.path_scales(apply_fn, prm, x))(params),
    }


# ------------------------------------------------------------------------------------------
# apply_fn and params that do not fit together.
# ------------------------------------------------------------------------------------------


def net_needs_w3(prm, x):
    return jax.nn.relu(x @ prm["w1"] + prm["b1"][None, :]) @ prm["w3"]


@pytest.mark.parametrize("entry", ["path_scales", "path_norm", "path_structure", "path_sgd",
                                   "path_sgd_refresh", "jit"])
def test_apply_fn_indexes_a_missing_key(entry):
    with pytest.raises(PathNetworkError) as info:
        entry_points(net_needs_w3, params3(), X)[entry]()
    msg = str(info.value)
    assert "apply_fn" in msg and "w3" in msg and "KeyError" in msg, msg
    # The params it was given are listed, so the mismatch is visible.
    assert "w1" in msg and "b1" in msg and "w2" in msg, msg
    assert isinstance(info.value.__cause__, KeyError)


def test_apply_fn_with_params_of_the_wrong_shape():
    params = params3()
    params["w2"] = jnp.ones((5, 2))  # the hidden layer has 4 units
    with pytest.raises(PathNetworkError) as info:
        psgd.path_scales(net, params, X)
    msg = str(info.value)
    assert "apply_fn" in msg and "w2" in msg and "(5, 2)" in msg, msg


def test_apply_fn_that_raises_on_the_example_input():
    def picky(prm, x):
        if x.shape[0] != 4:
            raise RuntimeError("this network only accepts batches of exactly 4 examples")
        return net(prm, x)

    picky(params3(), X)  # fine on the real batch
    with pytest.raises(PathNetworkError) as info:
        psgd.path_scales(picky, params3(), X)
    msg = str(info.value)
    assert "RuntimeError" in msg and "batches of exactly 4 examples" in msg, msg
    assert "single example" in msg and "(1, 3)" in msg, msg
    assert isinstance(info.value.__cause__, RuntimeError)


def test_apply_fn_that_needs_concrete_values():
    def python_branch(prm, x):
        if jnp.sum(x) > 0:  # a Python `if` on a traced value
            return net(prm, x)
        return -net(prm, x)

    with pytest.raises(PathNetworkError) as info:
        psgd.path_scales(python_branch, params3(), X)
    assert "apply_fn" in str(info.value)
    assert "Tracer" in str(info.value) or "Concretization" in str(info.value)


@pytest.mark.parametrize("bad_x, fragment", [
    (jnp.ones((1, 5)), "(1, 5)"),
    (jnp.ones((4, 3, 1)), "(1, 3, 1)"),
    (jnp.ones((4,)), "(1,)"),
])
def test_wrong_example_input_shape(bad_x, fragment):
    with pytest.raises(PathNetworkError) as info:
        psgd.path_scales(net, params3(), bad_x)
    msg = str(info.value)
    assert fragment in msg and "example_input" in msg, msg


def test_wrong_example_input_shape_through_the_optimizer():
    tx = psgd.path_sgd(0.1, net, jnp.ones((1, 5)))
    params = params3()
    with pytest.raises(PathNetworkError, match=r"\(1, 5\)"):
        tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)


@pytest.mark.parametrize("bad_x", [jnp.float32(1.0), 3.0])
def test_scalar_example_input(bad_x):
    with pytest.raises(PathNetworkError, match="leading batch axis"):
        psgd.path_scales(net, params3(), bad_x)


def test_apply_fn_not_callable():
    with pytest.raises(ValueError, match="apply_fn must be callable"):
        psgd.path_sgd(0.1, {"not": "a function"}, X)
    with pytest.raises(ValueError, match="apply_fn must be callable"):
        psgd.scale_by_path_norm(None, X)


def test_mask_of_the_wrong_structure():
    mask = {"w1": True, "w2": True}  # b1 missing
    with pytest.raises(PathNetworkError, match="mask") as info:
        psgd.path_scales(net, params3(), X, mask=mask)
    assert "b1" in str(info.value) or "structure" in str(info.value)


# ------------------------------------------------------------------------------------------
# Hyperparameters.
# ------------------------------------------------------------------------------------------

BAD_P = [0.5, 0.0, -2.0, 0.999, float("nan"), float("inf"), -float("inf"), "2", None, [2.0],
         True, 1 + 0j, np.array([2.0, 3.0])]


@pytest.mark.parametrize("p", BAD_P, ids=repr)
@pytest.mark.parametrize("factory", ["path_sgd", "scale_by_path_norm", "path_scales",
                                     "path_norm"])
def test_bad_p(factory, p):
    calls = {
        "path_sgd": lambda: psgd.path_sgd(0.1, net, X, p=p),
        "scale_by_path_norm": lambda: psgd.scale_by_path_norm(net, X, p=p),
        "path_scales": lambda: psgd.path_scales(net, params3(), X, p=p),
        "path_norm": lambda: psgd.path_norm(net, params3(), X, p=p),
    }
    with pytest.raises(ValueError, match=r"\bp must be") as info:
        calls[factory]()
    assert ">= 1" in str(info.value)


@pytest.mark.parametrize("p", [1, 1.0, 2, 3.5, np.float32(2.0), np.int64(3), jnp.float32(1.5)],
                         ids=repr)
def test_good_p_accepted(p):
    psgd.scale_by_path_norm(net, X, p=p)


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf"), "0.1", None, True,
                                np.array([0.1, 0.2])], ids=repr)
def test_bad_learning_rate(lr):
    with pytest.raises(ValueError, match="learning_rate") as info:
        psgd.path_sgd(lr, net, X)
    assert repr(lr)[:8] in str(info.value) or type(lr).__name__ in str(info.value)


@pytest.mark.parametrize("momentum", [1.0, 1.5, -0.1, -1e-9, float("nan"), float("inf"), "0.9",
                                      True], ids=repr)
def test_bad_momentum(momentum):
    with pytest.raises(ValueError, match="momentum"):
        psgd.path_sgd(0.1, net, X, momentum=momentum)


@pytest.mark.parametrize("momentum", [0, 0.0, 0.5, 0.999999, np.float32(0.9)], ids=repr)
def test_good_momentum_accepted(momentum):
    psgd.path_sgd(0.1, net, X, momentum=momentum)


def test_schedule_learning_rate_is_not_validated_as_a_number():
    psgd.path_sgd(optax.constant_schedule(0.1), net, X)


@pytest.mark.parametrize("refresh_every", [0, -1, 1.5, 2.0, "2", True, None, np.float32(3.0)],
                         ids=repr)
@pytest.mark.parametrize("factory", ["path_sgd", "scale_by_path_norm"])
def test_bad_refresh_every(factory, refresh_every):
    make = psgd.path_sgd if factory == "path_sgd" else (
        lambda lr, *a, **k: psgd.scale_by_path_norm(*a, **k))
    with pytest.raises(ValueError, match="refresh_every must be a positive integer"):
        make(0.1, net, X, refresh_every=refresh_every)


@pytest.mark.parametrize("refresh_every", [
    1, 2, jnp.int32(4), np.int32(3),
], ids=repr)
def test_good_refresh_every_accepted(refresh_every):
    psgd.path_sgd(0.1, net, X, refresh_every=refresh_every)


# ------------------------------------------------------------------------------------------
# Parameter dtypes and MaskedNode.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_, jnp.complex64],
                         ids=lambda d: jnp.dtype(d).name)
def test_non_real_float_params_named(dtype):
    params = {"layer": params3(), "extra": {"table": jnp.ones((3,), dtype)}}

    def apply_fn(prm, x):
        return net(prm["layer"], x)

    for call in (lambda: psgd.path_scales(apply_fn, params, X),
                 lambda: psgd.path_norm(apply_fn, params, X)):
        with pytest.raises(PathNetworkError) as info:
            call()
        msg = str(info.value)
        assert "extra/table" in msg and jnp.dtype(dtype).name in msg, msg
        assert "mask" in msg  # says what to do
    tx = psgd.path_sgd(0.1, apply_fn, X, refresh_every=2)
    with pytest.raises(PathNetworkError, match="extra/table"):
        state = tx.init(params)
        grads = jax.tree.map(jnp.zeros_like, params)
        tx.update(grads, state, params)


def test_complex_kernel_named():
    params = params3()
    params["w2"] = params["w2"].astype(jnp.complex64)
    with pytest.raises(PathNetworkError, match="'w2'.*complex64"):
        psgd.path_scales(lambda prm, x: net(prm, x.astype(jnp.complex64)), params, X)


def test_masked_node_from_optax_partition():
    params = params3()
    labels = {"w1": "path", "b1": "path", "w2": "frozen"}
    tx = optax.partition({"path": psgd.path_sgd(0.1, net, X, momentum=0.9),
                          "frozen": optax.set_to_zero()}, labels)
    grads = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(PathNetworkError) as info:
        state = tx.init(params)
        tx.update(grads, state, params)
    msg = str(info.value)
    assert "MaskedNode" in msg and "optax.partition" in msg and "mask=" in msg, msg


@pytest.mark.parametrize("refresh_every", [1, 3])
def test_masked_node_from_optax_masked_in_a_chain(refresh_every):
    params = params3()
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.masked(psgd.scale_by_path_norm(net, X, refresh_every=refresh_every),
                     {"w1": True, "b1": False, "w2": True}),
        optax.sgd(0.1))
    grads = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(PathNetworkError, match="MaskedNode"):
        state = tx.init(params)
        tx.update(grads, state, params)


def test_masked_node_in_path_norm():
    params = dict(params3(), skipped=optax.MaskedNode())
    with pytest.raises(PathNetworkError, match="MaskedNode"):
        psgd.path_norm(net, params, X)


# ------------------------------------------------------------------------------------------
# Operations that are not path-network operations, in places test_errors.py does not reach.
# Each entry: (apply_fn, acceptable primitive names in the message, example input).
# ------------------------------------------------------------------------------------------


def _pre(prm, x):
    return x @ prm["w1"] + prm["b1"][None, :]


def op_layernorm_by_hand(prm, x):
    h = _pre(prm, x)
    mu = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean((h - mu) ** 2, axis=-1, keepdims=True)  # @layernorm_by_hand
    return jax.nn.relu((h - mu) * jax.lax.rsqrt(var + 1e-5)) @ prm["w2"]


def op_rmsnorm_by_hand(prm, x):
    h = _pre(prm, x)
    rms = jnp.sqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + 1e-6)  # @rmsnorm_by_hand
    return jax.nn.relu(h / rms) @ prm["w2"]


def op_weight_norm_columns(prm, x):
    w = prm["w1"] / jnp.sqrt(jnp.sum(prm["w1"] ** 2, axis=0, keepdims=True))  # @weight_norm_columns
    return jax.nn.relu(x @ w + prm["b1"][None, :]) @ prm["w2"]


def op_weight_norm_rsqrt(prm, x):
    w = prm["w1"] * jax.lax.rsqrt(jnp.sum(prm["w1"] * prm["w1"]))  # @weight_norm_rsqrt
    return jax.nn.relu(x @ w) @ prm["w2"]


def op_attention(prm, x):
    h = jax.nn.relu(_pre(prm, x))  # (B, 4)
    q = h[:, :, None]
    scores = jnp.einsum("bid,bjd->bij", q, q)  # @attention
    return jnp.einsum("bij,bjd->bid", scores, q)[:, :, 0] @ prm["w2"]


def op_gating(prm, x):
    h = _pre(prm, x)
    return (jax.nn.relu(h) * jax.nn.sigmoid(h)) @ prm["w2"]  # @gating


def op_squared_relu(prm, x):
    return jnp.square(jax.nn.relu(_pre(prm, x))) @ prm["w2"]  # @squared_relu


def op_relu6(prm, x):
    return jax.nn.relu6(_pre(prm, x)) @ prm["w2"]  # @relu6


def op_clip(prm, x):
    return jnp.clip(_pre(prm, x), 0.0, 1.0) @ prm["w2"]  # @clip


def op_maxout(prm, x):
    h = _pre(prm, x)
    return jnp.maximum(h[:, :2], h[:, 2:]) @ prm["w2"][:2, :]  # @maxout


def op_shifted_relu(prm, x):
    return jnp.maximum(_pre(prm, x), 0.5) @ prm["w2"]  # @shifted_relu


def op_threshold_where(prm, x):
    h = _pre(prm, x)
    return jnp.where(h > 0.5, h, 0.0) @ prm["w2"]  # @threshold_where


def op_abs(prm, x):
    return jnp.abs(_pre(prm, x)) @ prm["w2"]  # @abs


def op_elu(prm, x):
    return jax.nn.elu(_pre(prm, x)) @ prm["w2"]  # @elu


def op_divide_by_activation(prm, x):
    h = jax.nn.relu(_pre(prm, x))
    return (h / (jnp.sum(h, axis=-1, keepdims=True) + 1.0)) @ prm["w2"]  # @divide_by_activation


def op_log_softmax(prm, x):
    return jax.nn.log_softmax(net(prm, x), axis=-1)  # @log_softmax


def op_tanh_in_scan(prm, x):
    def cell(h, _):
        return jnp.tanh(h @ prm["w1"][:, :3].T[:3, :3] + x), None  # @tanh_in_scan
    h, _ = jax.lax.scan(cell, x, None, length=3)
    return h @ prm["w1"] @ prm["w2"]


def op_tanh_in_remat(prm, x):
    return jax.checkpoint(lambda h: jnp.tanh(h))(_pre(prm, x)) @ prm["w2"]  # @tanh_in_remat


def op_tanh_in_nested_jit(prm, x):
    return jax.jit(lambda h: jnp.tanh(h) * 2.0)(_pre(prm, x)) @ prm["w2"]  # @tanh_in_nested_jit


@jax.custom_jvp
def _my_softplus(h):
    return jnp.logaddexp(h, 0.0)  # @custom_jvp_softplus


_my_softplus.defjvp(lambda primals, tangents: (
    _my_softplus(primals[0]), jax.nn.sigmoid(primals[0]) * tangents[0]))


def op_custom_jvp_softplus(prm, x):
    return _my_softplus(_pre(prm, x)) @ prm["w2"]


def op_cond_on_input(prm, x):
    h = jax.nn.relu(_pre(prm, x))
    return jax.lax.cond(jnp.sum(x) > 0, lambda a: a, lambda a: 2.0 * a, h) @ prm["w2"]  # @cond_on_input


def op_while_loop(prm, x):
    h = jax.nn.relu(_pre(prm, x))
    _, h = jax.lax.while_loop(lambda c: c[0] < jnp.sum(x).astype(jnp.int32),  # @while_loop
                              lambda c: (c[0] + 1, 0.5 * c[1]), (0, h))
    return h @ prm["w2"]


def op_dropout_random(prm, x):
    h = jax.nn.relu(_pre(prm, x))
    keep = jax.random.bernoulli(jax.random.key(0), 0.9, h.shape)  # @dropout_random
    return jnp.where(keep, h / 0.9, 0.0) @ prm["w2"]


def op_sort(prm, x):
    return jnp.sort(jax.nn.relu(_pre(prm, x)), axis=-1) @ prm["w2"]  # @sort


def op_argmax_onehot(prm, x):
    h = jax.nn.relu(_pre(prm, x))
    return jax.nn.one_hot(jnp.argmax(h, axis=-1), 4) @ prm["w2"]  # @argmax_onehot


def op_dynamic_slice_by_input(prm, x):
    h = jax.nn.relu(_pre(prm, x))
    start = jnp.argmax(x[0]).astype(jnp.int32)  # @dynamic_slice_by_input
    return jax.lax.dynamic_slice_in_dim(h, start, 2, axis=1) @ prm["w2"][:2, :]


def op_where_positive_else_one(prm, x):
    h = _pre(prm, x)
    # Not positively homogeneous:
    return jnp.where(h > 0, h, 1.0) @ prm["w2"]  # @where_positive_else_one


def op_gate_by_other_activation_sign(prm, x):
    g = x @ prm["w1"][:, ::-1]
    # Gating by another activation's sign:
    return jnp.where(g > 0, _pre(prm, x), 0.0) @ prm["w2"]  # @gate_by_other_activation_sign


def op_mask_by_input_sign(prm, x):
    return (_pre(prm, x) * (x[:, :1] > 0).astype(jnp.float32)) @ prm["w2"]  # @mask_by_input_sign


def op_step_function(prm, x):
    # A Heaviside activation:
    return (_pre(prm, x) > 0).astype(jnp.float32) @ prm["w2"]  # @step_function


# name -> (apply_fn, the primitive the message must name first, other primitives it must quote).
# The offending line carries the marker comment `# @name`; the message must point at it.
UNSUPPORTED = {
    "layernorm_by_hand": (op_layernorm_by_hand, "integer_pow", ()),
    "rmsnorm_by_hand": (op_rmsnorm_by_hand, "square", ()),
    "weight_norm_columns": (op_weight_norm_columns, "sqrt", ()),
    "weight_norm_rsqrt": (op_weight_norm_rsqrt, "rsqrt", ()),
    "attention": (op_attention, "dot_general", ()),
    "gating": (op_gating, "logistic", ()),
    "squared_relu": (op_squared_relu, "square", ()),
    "relu6": (op_relu6, "min", ()),
    "clip": (op_clip, "min", ()),
    "maxout": (op_maxout, "max", ()),
    "shifted_relu": (op_shifted_relu, "max", ()),
    "threshold_where": (op_threshold_where, "gt", ()),
    "abs": (op_abs, "abs", ()),
    "elu": (op_elu, "expm1", ()),
    "divide_by_activation": (op_divide_by_activation, "div", ()),
    # log_softmax's first non-path primitive is its max(x, c) stabiliser.
    "log_softmax": (op_log_softmax, "max", ()),
    "tanh_in_scan": (op_tanh_in_scan, "tanh", ()),
    "tanh_in_remat": (op_tanh_in_remat, "tanh", ()),
    "tanh_in_nested_jit": (op_tanh_in_nested_jit, "tanh", ()),
    # logaddexp's first non-path primitive is a comparison of two activations (`ne`).
    "custom_jvp_softplus": (op_custom_jvp_softplus, "ne", ()),
    "cond_on_input": (op_cond_on_input, "cond", ("gt",)),
    "where_positive_else_one": (op_where_positive_else_one, "select_n", ()),
    "gate_by_other_activation_sign": (op_gate_by_other_activation_sign, "select_n", ()),
    "mask_by_input_sign": (op_mask_by_input_sign, "mul", ()),
    # The 0/1 step output is consumed by the next matmul; the comparison is quoted too.
    "step_function": (op_step_function, "dot_general", ("gt",)),
    "while_loop": (op_while_loop, "while", ()),
    "dropout_random": (op_dropout_random, "random_bits", ()),
    "sort": (op_sort, "sort", ()),
    "argmax_onehot": (op_argmax_onehot, "argmax", ()),
    "dynamic_slice_by_input": (op_dynamic_slice_by_input, "argmax", ()),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_operation(name):
    """The message names the exact primitive (quoted) and the `file:line` of the operation.

    Mutations caught: the line number dropped from the source location (`file` without
    `:line`), and the primitive's name dropped from the message; the old `prim in msg`
    check survived both through the test's own name and the advice text.
    """
    apply_fn, primitive, also_quoted = UNSUPPORTED[name]
    params = params3()
    out = apply_fn(params, X)  # the network itself runs
    assert out.shape[0] == X.shape[0]
    with pytest.raises(UnsupportedOperationError) as info:
        psgd.path_scales(apply_fn, params, X)
    msg = str(info.value)
    assert first_quoted(msg) == primitive, msg
    for other in also_quoted:
        assert f"`{other}`" in msg, (other, msg)
    assert_points_at(msg, name)
    assert "path network" in msg.lower()


@pytest.mark.parametrize("name", ["attention", "tanh_in_scan", "dropout_random"])
def test_unsupported_operation_through_the_jitted_optimizer(name):
    apply_fn, primitive, _ = UNSUPPORTED[name]
    params = params3()
    tx = psgd.path_sgd(0.1, apply_fn, X, momentum=0.9)
    grads = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(UnsupportedOperationError) as info:
        jax.jit(tx.update)(grads, tx.init(params), params)
    assert first_quoted(str(info.value)) == primitive
    assert_points_at(str(info.value), name)


def test_sign_tests_of_relu_and_leaky_relu_are_accepted():
    """The legitimate uses of a comparison with 0 (positive controls for the list above)."""
    params = params3()
    reference = psgd.path_scales(net, params, X)
    # The sign must be tested on the very value selected (one traced computation of it).
    def where_relu(prm, x):
        h = _pre(prm, x)
        return jnp.where(h > 0, h, 0.0) @ prm["w2"]

    def mask_relu(prm, x):
        h = _pre(prm, x)
        return (h * (h > 0)) @ prm["w2"]

    def mirrored_where_relu(prm, x):
        h = _pre(prm, x)
        return jnp.where(0 < h, h, 0.0) @ prm["w2"]

    variants = [where_relu, mask_relu, mirrored_where_relu,
                lambda prm, x: jax.nn.leaky_relu(_pre(prm, x), 0.1) @ prm["w2"]]
    for i, variant in enumerate(variants):
        kappa = psgd.path_scales(variant, params, X)
        for a, b in zip(jax.tree.leaves(kappa), jax.tree.leaves(reference)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, err_msg=str(i))


# Flax modules with non-path operations: the message names the module and the user's line.


class LinenGelu(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="out")(nn.gelu(nn.Dense(4, name="hidden")(x)))  # @linen_gelu


class LinenDropout(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        h = nn.relu(nn.Dense(4)(x))
        return nn.Dense(2)(nn.Dropout(0.5, deterministic=not train)(h))


def test_linen_gelu_module_named():
    module = LinenGelu()
    params = module.init(jax.random.key(0), X)["params"]
    with pytest.raises(UnsupportedOperationError) as info:
        psgd.path_scales(psgd.linen.apply_fn(module), params, X)
    msg = str(info.value)
    # nn.gelu's tanh approximation starts with x**3.
    assert first_quoted(msg) == "integer_pow", msg
    assert_points_at(msg, "linen_gelu")
    assert "LinenGelu" in msg, msg  # the module path


def test_linen_dropout_in_train_mode_rejected_and_eval_mode_accepted():
    module = LinenDropout()
    params = module.init(jax.random.key(0), X, train=False)["params"]

    def train_apply(prm, x):
        return module.apply({"params": prm}, x, train=True, rngs={"dropout": jax.random.key(1)})

    with pytest.raises(UnsupportedOperationError, match="random|deterministic"):
        psgd.path_scales(train_apply, params, X)
    kappa = psgd.path_scales(psgd.linen.apply_fn(module, train=False), params, X)
    assert all(bool(jnp.all(jnp.isfinite(k))) for k in jax.tree.leaves(kappa))


class NnxLayerNormMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.l2 = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.norm(self.l1(x))))  # @nnx_layernorm


def test_nnx_layernorm_rejected():
    model = NnxLayerNormMLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    with pytest.raises(UnsupportedOperationError) as info:
        psgd.path_scales(psgd.nnx.apply_fn(model), params, X)
    msg = str(info.value)
    assert first_quoted(msg) == "square", msg  # LayerNorm's variance


def test_nnx_layernorm_message_points_at_the_users_line():
    """README: errors name "your source line". Linen modules get the module path; NNX
    modules get neither, so a user cannot tell which LayerNorm of the model is meant."""
    model = NnxLayerNormMLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    with pytest.raises(UnsupportedOperationError) as info:
        psgd.path_scales(psgd.nnx.apply_fn(model), params, X)
    assert_points_at(str(info.value), "nnx_layernorm")
