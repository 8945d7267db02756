"""Errors that say what the operation is and what to do, all at once, cause first.

Each test marks the offending line with a `# @name` comment and asserts `file:line` of it.
"""

import jax
import jax.numpy as jnp
import pytest
from markers import Markers

import pathsgd_jax as psgd

MARKS = Markers(__file__)


def _message(fn, params, x=None, error=psgd.UnsupportedOperationError):
    with pytest.raises(error) as info:
        psgd.path_scales(fn, params, jnp.ones((2, 3)) if x is None else x)
    return str(info.value)


PARAMS = {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}


def _gelu_net(p, x):
    h = jax.nn.gelu(x @ p["w"])  # @gelu
    return h @ p["v"]


def _log_softmax_net(p, x):
    h = jax.nn.relu(x @ p["w"])
    return jax.nn.log_softmax(h @ p["v"])  # @log_softmax


def _three_problems(p, x):
    h = jnp.tanh(x @ p["w"])  # @tanh
    h = h / jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True))  # @rms
    return jax.nn.log_softmax(h @ p["v"])  # @softmax_again


def test_gelu_is_named_as_gelu_with_the_fix():
    """The cube of GELU's tanh approximation was reported as "a variance in LayerNorm"."""
    msg = _message(_gelu_net, PARAMS)
    assert msg.startswith("The path network cannot contain `integer_pow` (x³, the cube in the "
                          "tanh approximation of jax.nn.gelu)"), msg
    assert MARKS.pattern("gelu").search(msg), msg
    assert "use ReLU or leaky ReLU" in msg and "mask=" not in msg and "LayerNorm" not in msg


def test_log_softmax_says_to_move_it_into_the_loss():
    """Was: "max(x, c) with c != 0 is not positively homogeneous" and nothing else."""
    msg = _message(_log_softmax_net, PARAMS)
    assert "inside jax.nn.log_softmax" in msg and "put log_softmax in the loss" in msg, msg
    assert MARKS.pattern("log_softmax").search(msg), msg
    assert "mask=" not in msg


def test_every_unsupported_operation_in_one_error():
    """Three places, three entries in one error, each with its primitive, line and advice."""
    msg = _message(_three_problems, PARAMS)
    assert msg.startswith("The path network cannot contain 3 operations"), msg
    entries = msg.split("\n")[1:]
    assert len(entries) == 3, entries
    assert entries[0].startswith("1. The path network cannot contain `tanh`"), entries[0]
    assert MARKS.pattern("tanh").search(entries[0]) and "use ReLU" in entries[0]
    # The first operation of the RMS normalisation's line: the square of the activation.
    assert entries[1].startswith("2. The path network cannot contain `mul` (a product of two "
                                 "activations (attention, gating, a variance))"), entries[1]
    assert MARKS.pattern("rms").search(entries[1]), entries[1]
    assert MARKS.pattern("softmax_again").search(entries[2]) and "in the loss" in entries[2]
    assert all("mask=" not in entry for entry in entries), entries


def _weight_normalised(p, x):
    w = p["w"] / jnp.linalg.norm(p["w"], axis=0, keepdims=True)  # @weight_norm
    return jax.nn.relu(x @ w) @ p["v"]


def test_mask_advice_only_for_parameters():
    """`mask=` helps where a parameter is used non-monomially (weight normalisation), not for
    operations on activations (the tests above)."""
    msg = _message(_weight_normalised, PARAMS)
    assert "mask=" in msg and MARKS.pattern("weight_norm").search(msg), msg


def _padding_mask(p, x):
    tokens = x.astype(jnp.int32)
    mask = (tokens > 0).astype(jnp.float32)  # @padding_mask
    return jax.nn.relu((x * mask) @ p["w"]) @ p["v"]


def test_padding_mask_is_named_as_a_comparison_of_integers():
    """Was reported as "an embedding lookup"."""
    msg = _message(_padding_mask, PARAMS)
    msg = msg.split("\n")[1][3:] if msg.startswith("The path network cannot contain 2") else msg
    assert msg.startswith("The path network cannot contain `gt` (a comparison of input-derived "
                          "integers: a padding mask, or the index arithmetic of an embedding "
                          "lookup"), msg
    assert MARKS.pattern("padding_mask").search(msg), msg


def test_trace_failure_puts_the_cause_first_and_keeps_the_params_short():
    """A 200-leaf tree used to be dumped whole on one line after the cause."""
    params = {f"layer{i:03d}": jnp.ones((3, 3)) for i in range(200)}

    def broken(p, x):
        return x @ p["missing"]

    msg = _message(broken, params, error=psgd.PathNetworkError)
    assert msg.startswith("apply_fn(params, x) failed: KeyError: 'missing'"), msg
    assert "Params seen (200 leaves)" in msg and "(194 more)" in msg, msg
    assert len(msg) < 1500, len(msg)
