"""Rematerialised networks (``jax.checkpoint``, Linen ``nn.remat``, NNX ``nnx.remat``).

``jax.checkpoint`` wraps its body in the ``remat2`` call primitive; the path network must open
it like ``jit``. Each test compares κ, φ_p and a few ``path_sgd`` steps of a rematerialised
network with the same network written without remat, and κ with the brute-force path
enumeration of ``reference.py``.

Mutation caught (on a scratch copy): dropping ``"remat2"`` from the call primitives the path
network opens (``_CALLS`` in ``pathsgd_jax/_pathnet.py``) makes every test here fail with
"cannot contain `remat2`".
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import models_zoo as mz
import pathsgd_jax as psgd
import reference as ref

WIDTHS = [3, 5, 4, 2]
POLICIES = {
    "default": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat_mlp(policy, prevent_cse):
    """The MLP of models_zoo with each hidden layer inside its own ``jax.checkpoint``."""

    def layer(h, w, b):
        return jax.nn.relu(h @ w + b[None, :])

    block = jax.checkpoint(layer, policy=policy, prevent_cse=prevent_cse)

    def apply_fn(params, x):
        h = x
        for k in params[:-1]:
            h = block(h, k["w"], k["b"])
        return h @ params[-1]["w"] + params[-1]["b"][None, :]

    return apply_fn


def _assert_remat(fn, params, x):
    """The premise of each test: the traced network really holds a ``remat2`` call."""
    assert "remat2" in str(jax.make_jaxpr(fn)(params, x))


def _assert_same_tree(a, b, rtol=0.0):
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=rtol, atol=0.0)


def _steps(tx, apply_fn, params, x, y, n=3):
    loss = mz.mse(apply_fn)
    state = tx.init(params)

    @jax.jit
    def step(prm, st):
        g = jax.grad(loss)(prm, x, y)
        upd, st = tx.update(g, st, prm)
        return optax.apply_updates(prm, upd), st

    for _ in range(n):
        params, state = step(params, state)
    return params


@pytest.mark.parametrize("policy,prevent_cse,p", [
    ("default", True, 2.0), ("default", False, 1.0), ("nothing_saveable", True, 3.0),
    ("everything_saveable", False, 2.0), ("dots_saveable", True, 1.0),
    ("dots_saveable", False, 2.0)])
def test_jax_checkpoint_equals_plain_network(policy, prevent_cse, p):
    params = mz.init_mlp(jax.random.key(1), WIDTHS)
    x, y = mz.regression_batch(2, 6, WIDTHS[0], WIDTHS[-1])
    remat_fn = _remat_mlp(POLICIES[policy], prevent_cse)
    _assert_remat(remat_fn, params, x)
    np.testing.assert_allclose(remat_fn(params, x), mz.mlp_apply(params, x), rtol=1e-6)
    kappa = psgd.path_scales(remat_fn, params, x, p=p)
    _assert_same_tree(kappa, psgd.path_scales(mz.mlp_apply, params, x, p=p))
    phi_ref, kap_ref, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), p)
    _assert_same_tree(kappa, mz.mlp_kappa_tree(kap_ref), rtol=2e-5)
    np.testing.assert_allclose(float(psgd.path_norm(remat_fn, params, x, p=p)), phi_ref,
                               rtol=2e-5)


@pytest.mark.parametrize("policy", ["default", "dots_saveable"])
def test_jax_checkpoint_path_sgd_steps_equal_plain_network(policy):
    params = mz.init_mlp(jax.random.key(3), WIDTHS)
    x, y = mz.regression_batch(4, 8, WIDTHS[0], WIDTHS[-1])
    remat_fn = _remat_mlp(POLICIES[policy], True)
    tx_remat = psgd.path_sgd(0.05, remat_fn, x, momentum=0.9)
    tx_plain = psgd.path_sgd(0.05, mz.mlp_apply, x, momentum=0.9)
    after_remat = _steps(tx_remat, remat_fn, params, x, y)
    after_plain = _steps(tx_plain, mz.mlp_apply, params, x, y)
    _assert_same_tree(after_remat, after_plain, rtol=1e-6)
    # The steps moved the parameters (the comparison is not between two no-ops).
    assert not np.allclose(np.asarray(after_plain[0]["w"]), np.asarray(params[0]["w"]))


def test_checkpoint_of_the_whole_network_and_nested_remat():
    params = mz.init_mlp(jax.random.key(5), WIDTHS)
    x = jnp.ones((2, WIDTHS[0]))
    inner = _remat_mlp(None, True)
    whole = jax.checkpoint(inner, policy=jax.checkpoint_policies.nothing_saveable)
    _assert_remat(whole, params, x)
    _, kap_ref, _ = ref.mlp_bruteforce(mz.mlp_to_layers(params), 2.0)
    _assert_same_tree(psgd.path_scales(whole, params, x), mz.mlp_kappa_tree(kap_ref), rtol=2e-5)


class _Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(self.features)(x))


class _LinenMLP(nn.Module):
    remat: bool

    @nn.compact
    def __call__(self, x):
        block = nn.remat(_Block, prevent_cse=True) if self.remat else _Block
        h = block(5, name="b0")(x)
        h = block(4, name="b1")(h)
        return nn.Dense(2, name="out")(h)


def _linen_layers(params):
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    return [(f64(params[n]["Dense_0"]["kernel"]), f64(params[n]["Dense_0"]["bias"]))
            for n in ("b0", "b1")] + [(f64(params["out"]["kernel"]), f64(params["out"]["bias"]))]


def test_linen_remat_equals_plain_module():
    x, y = mz.regression_batch(6, 6, 3, 2)
    plain, remat = _LinenMLP(remat=False), _LinenMLP(remat=True)
    params = plain.init(jax.random.key(0), x)["params"]
    # Give the biases non-zero values so bias paths count.
    params = jax.tree.map(lambda a: a + 0.3 if a.ndim == 1 else a, params)
    fn_plain = psgd.linen.apply_fn(plain)
    fn_remat = psgd.linen.apply_fn(remat)
    _assert_remat(fn_remat, params, x)
    np.testing.assert_allclose(fn_remat(params, x), fn_plain(params, x), rtol=1e-6)
    kappa = psgd.path_scales(fn_remat, params, x)
    _assert_same_tree(kappa, psgd.path_scales(fn_plain, params, x))
    phi_ref, kap_ref, _ = ref.mlp_bruteforce(_linen_layers(params), 2.0)
    np.testing.assert_allclose(np.asarray(kappa["b1"]["Dense_0"]["kernel"]), kap_ref[1][0],
                               rtol=2e-5)
    np.testing.assert_allclose(np.asarray(kappa["b0"]["Dense_0"]["bias"]), kap_ref[0][1],
                               rtol=2e-5)
    np.testing.assert_allclose(float(psgd.path_norm(fn_remat, params, x)), phi_ref, rtol=2e-5)
    after_remat = _steps(psgd.path_sgd(0.05, fn_remat, x), fn_remat, params, x, y)
    after_plain = _steps(psgd.path_sgd(0.05, fn_plain, x), fn_plain, params, x, y)
    _assert_same_tree(after_remat, after_plain, rtol=1e-6)


class _NnxBlock(nnx.Module):
    def __init__(self, d_in, d_out, rngs):
        self.lin = nnx.Linear(d_in, d_out, rngs=rngs,
                              bias_init=nnx.initializers.constant(0.3))

    def __call__(self, x):
        return nnx.relu(self.lin(x))


class _NnxMLP(nnx.Module):
    def __init__(self, remat, rngs):
        self.remat = remat
        self.b0 = _NnxBlock(3, 5, rngs)
        self.b1 = _NnxBlock(5, 4, rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs, bias_init=nnx.initializers.constant(0.3))

    def __call__(self, x):
        if self.remat:
            h = nnx.remat(lambda blk, a: blk(a))(self.b0, x)
            h = nnx.remat(lambda blk, a: blk(a), prevent_cse=False)(self.b1, h)
        else:
            h = self.b1(self.b0(x))
        return self.out(h)


def _val(v):
    return v[...] if isinstance(v, nnx.Variable) else v


def test_nnx_remat_equals_plain_model():
    x, y = mz.regression_batch(7, 6, 3, 2)
    plain, remat = _NnxMLP(False, nnx.Rngs(0)), _NnxMLP(True, nnx.Rngs(0))
    params = nnx.state(plain, nnx.Param)
    fn_plain, fn_remat = psgd.nnx.apply_fn(plain), psgd.nnx.apply_fn(remat)
    _assert_remat(fn_remat, params, x)
    np.testing.assert_allclose(fn_remat(params, x), fn_plain(params, x), rtol=1e-6)
    kappa = psgd.path_scales(fn_remat, params, x)
    _assert_same_tree(kappa, psgd.path_scales(fn_plain, params, x))
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    layers = [(f64(_val(params[n]["lin"]["kernel"])), f64(_val(params[n]["lin"]["bias"])))
              for n in ("b0", "b1")]
    layers.append((f64(_val(params["out"]["kernel"])), f64(_val(params["out"]["bias"]))))
    phi_ref, kap_ref, _ = ref.mlp_bruteforce(layers, 2.0)
    np.testing.assert_allclose(np.asarray(_val(kappa["b0"]["lin"]["kernel"])), kap_ref[0][0],
                               rtol=2e-5)
    np.testing.assert_allclose(float(psgd.path_norm(fn_remat, params, x)), phi_ref, rtol=2e-5)
    grads = jax.grad(lambda prm: mz.mse(fn_plain)(prm, x, y))(params)
    tx = psgd.path_sgd(0.05, fn_remat, x)
    upd_remat, _ = tx.update(grads, tx.init(params), params)
    tx = psgd.path_sgd(0.05, fn_plain, x)
    upd_plain, _ = tx.update(grads, tx.init(params), params)
    _assert_same_tree(upd_remat, upd_plain, rtol=1e-6)
