"""Linen and NNX adapters: the inference mode a model actually has, method=, errors with the fix.

κ is checked against the brute-force float64 path enumeration of tests/reference.py on the same
dense weights, so a wrong mode (dropout on, a mask drawn) or a wrong wiring shows as a mismatch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pathsgd_jax as psgd
from reference import mlp_bruteforce

X = jnp.ones((5, 3))


def _assert_kappa_matches(kappa_layers, layers):
    """kappa_layers: [(κ_W, κ_b)] from the library; layers: [(W, b)] in y = x @ W + b form."""
    _, ref, _ = mlp_bruteforce(layers, p=2.0)
    for (kw, kb), (rw, rb) in zip(kappa_layers, ref):
        np.testing.assert_allclose(np.asarray(kw, np.float64), rw, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(kb, np.float64), rb, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Linen
# ---------------------------------------------------------------------------------------------


class TrainFlag(nn.Module):
    """Flax-examples style: `train` switches dropout."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        h = nn.relu(nn.Dense(4)(x))
        h = nn.Dropout(0.5, deterministic=not train)(h)
        return nn.Dense(2)(h)


class DeterministicFlag(nn.Module):
    @nn.compact
    def __call__(self, x, *, deterministic: bool = False):
        h = nn.relu(nn.Dense(4)(x))
        return nn.Dense(2)(nn.Dropout(0.5)(h, deterministic=deterministic))


class TrainingFlag(nn.Module):
    @nn.compact
    def __call__(self, x, training: bool):
        h = nn.relu(nn.Dense(4)(x))
        return nn.Dense(2)(nn.Dropout(0.5, deterministic=not training)(h))


class NoFlag(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(4)(x))
        return nn.Dense(2)(h)


class AttributeDropout(nn.Module):
    """Dropout switched by an attribute, not by a keyword of __call__."""

    deterministic: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(4)(x))
        return nn.Dense(2)(nn.Dropout(0.5, deterministic=self.deterministic)(h))


class NeedsMask(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        h = nn.relu(nn.Dense(4)(x))
        return nn.Dense(2)(h * mask[None, :])


class Encoder(nn.Module):
    def setup(self):
        self.enc = nn.Dense(4)
        self.dec = nn.Dense(2)
        self.head = nn.Dense(3)

    def __call__(self, x):
        return self.head(nn.relu(self.dec(nn.relu(self.enc(x)))))

    def encode(self, x, train: bool = True):
        return self.dec(nn.relu(self.enc(x)))


def _linen_layers(params, names=("Dense_0", "Dense_1")):
    return [(np.asarray(params[n]["kernel"]), np.asarray(params[n]["bias"])) for n in names]


def _linen_params(module, **kwargs):
    params = module.init(jax.random.key(0), X, **kwargs)["params"]
    # Non-zero biases, so bias paths count in the reference.
    return jax.tree.map(lambda a: a + 0.3, params)


@pytest.mark.parametrize("module,expected", [
    (TrainFlag(), {"train": False}),
    (DeterministicFlag(), {"deterministic": True}),
    (TrainingFlag(), {"training": False}),
    (NoFlag(), {}),
])
def test_linen_finds_the_inference_keyword(module, expected):
    params = _linen_params(module, **{k: v for k, v in expected.items()})
    fn = psgd.linen.apply_fn(module)
    assert fn.apply_kwargs == expected
    kappa = psgd.path_scales(fn, params, X)
    _assert_kappa_matches([(kappa[n]["kernel"], kappa[n]["bias"]) for n in ("Dense_0", "Dense_1")],
                          _linen_layers(params))


def test_linen_explicit_keyword_overrides_and_train_mode_fails_with_the_fix():
    params = _linen_params(TrainFlag(), train=False)
    assert psgd.linen.apply_fn(TrainFlag(), train=False).apply_kwargs == {"train": False}
    with pytest.raises(Exception) as info:
        psgd.path_scales(psgd.linen.apply_fn(TrainFlag(), train=True), params, X)
    msg = str(info.value)
    assert "draws random numbers" in msg and "train=True" in msg
    assert "inference mode" in msg and "deterministic=True" in msg


def test_linen_attribute_dropout_names_the_fix():
    module = AttributeDropout()
    params = _linen_params(AttributeDropout(deterministic=True))
    with pytest.raises(Exception) as info:
        psgd.path_scales(psgd.linen.apply_fn(module), params, X)
    msg = str(info.value)
    assert "AttributeDropout.__call__(x)" in msg and "no keywords" in msg
    assert "apply_fn(model, deterministic=True)" in msg and "method=" in msg
    # The fix the message gives for an attribute: a deterministic copy of the module.
    kappa = psgd.path_scales(psgd.linen.apply_fn(module.clone(deterministic=True)), params, X)
    assert np.all(np.isfinite(np.asarray(kappa["Dense_0"]["kernel"])))


def test_linen_missing_argument_fails_at_once_with_the_keyword():
    with pytest.raises(TypeError) as info:
        psgd.linen.apply_fn(NeedsMask())
    msg = str(info.value)
    assert "NeedsMask.__call__(x, mask)" in msg and "`mask`" in msg
    assert "pathsgd_jax.linen.apply_fn(model, mask=...)" in msg
    params = NeedsMask().init(jax.random.key(0), X, jnp.ones(4))["params"]
    kappa = psgd.path_scales(psgd.linen.apply_fn(NeedsMask(), mask=jnp.ones(4)), params, X)
    assert kappa["Dense_0"]["kernel"].shape == (3, 4)


@pytest.mark.parametrize("method", ["encode", Encoder.encode, lambda m, x: m.encode(x, False)])
def test_linen_method(method):
    module = Encoder()
    params = jax.tree.map(lambda a: a + 0.3, module.init(jax.random.key(0), X)["params"])
    fn = psgd.linen.apply_fn(module, method=method)
    if not callable(method) or method is Encoder.encode:
        assert fn.apply_kwargs == {"train": False}
    kappa = psgd.path_scales(fn, params, X)
    _assert_kappa_matches([(kappa[n]["kernel"], kappa[n]["bias"]) for n in ("enc", "dec")],
                          _linen_layers(params, ("enc", "dec")))
    assert float(np.max(np.asarray(kappa["head"]["kernel"]))) == 0.0  # not on the encoder


def test_linen_bad_input():
    with pytest.raises(TypeError, match="has no method of that name"):
        psgd.linen.apply_fn(NoFlag(), method="decode")
    with pytest.raises(ValueError, match="must not contain 'params'"):
        psgd.linen.apply_fn(NoFlag(), variables={"params": {}})
    with pytest.raises(TypeError, match="pathsgd_jax.nnx.apply_fn"):
        psgd.linen.apply_fn(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_linen_batchnorm_train_flag_in_eval_mode():
    class BN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            h = nn.Dense(4)(x)
            h = nn.BatchNorm(use_running_average=not train)(h)
            return nn.Dense(2)(nn.Dropout(0.5, deterministic=not train)(nn.relu(h)))

    variables = BN().init(jax.random.key(0), X, train=False)
    fn = psgd.linen.apply_fn(BN(), variables={"batch_stats": variables["batch_stats"]})
    assert fn.apply_kwargs == {"train": False}
    kappa = psgd.path_scales(fn, variables["params"], X)
    assert all(np.all(np.isfinite(np.asarray(k))) for k in jax.tree.leaves(kappa))


# ---------------------------------------------------------------------------------------------
# NNX
# ---------------------------------------------------------------------------------------------


class NnxDropout(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, bias_init=nnx.initializers.constant(0.3), rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(4, 2, bias_init=nnx.initializers.constant(-0.2), rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x))))


class NnxRngsArg(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, bias_init=nnx.initializers.constant(0.3), rngs=rngs)
        self.drop = nnx.Dropout(0.5)
        self.l2 = nnx.Linear(4, 2, bias_init=nnx.initializers.constant(-0.2), rngs=rngs)

    def __call__(self, x, rngs):
        return self.l2(self.drop(nnx.relu(self.l1(x)), rngs=rngs))


class NnxRngsKeyword(NnxRngsArg):
    def __call__(self, x, *, rngs):
        return super().__call__(x, rngs)


class NnxTrainFlag(NnxDropout):
    def __call__(self, x, train: bool = True):
        return self.l2(self.drop(nnx.relu(self.l1(x)), deterministic=not train))


class NnxBatchNorm(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.l2 = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.bn(self.l1(x))))


def _nnx_kappa_vs_reference(model, fn):
    params = nnx.state(model, nnx.Param)
    kappa = psgd.path_scales(fn, params, X)
    layers = [(np.asarray(model.l1.kernel[...]), np.asarray(model.l1.bias[...])),
              (np.asarray(model.l2.kernel[...]), np.asarray(model.l2.bias[...]))]
    _assert_kappa_matches([(kappa["l1"]["kernel"], kappa["l1"]["bias"]),
                           (kappa["l2"]["kernel"], kappa["l2"]["bias"])], layers)


def test_nnx_eval_mode_on_a_copy():
    model = NnxDropout(nnx.Rngs(0))
    _nnx_kappa_vs_reference(model, psgd.nnx.apply_fn(model))
    assert model.drop.deterministic is False  # the user's model stays in train mode


def test_nnx_train_keyword():
    model = NnxTrainFlag(nnx.Rngs(0))
    fn = psgd.nnx.apply_fn(model)
    assert fn.apply_kwargs == {"train": False}
    _nnx_kappa_vs_reference(model, fn)
    assert psgd.nnx.apply_fn(model, train=True).apply_kwargs == {"train": True}


@pytest.mark.parametrize("cls,hint", [(NnxRngsArg, "method=lambda m, x: m(x, None)"),
                                      (NnxRngsKeyword, "method=lambda m, x: m(x, rngs=None)")])
def test_nnx_rngs_argument_names_the_method_fix(cls, hint):
    model = cls(nnx.Rngs(0))
    with pytest.raises(TypeError) as info:
        psgd.nnx.apply_fn(model)
    msg = str(info.value)
    assert f"{cls.__name__}.__call__" in msg and "`rngs`" in msg
    assert hint in msg and "eval mode" in msg
    method = eval(hint.removeprefix("method="))  # the fix, exactly as printed
    _nnx_kappa_vs_reference(model, psgd.nnx.apply_fn(model, method=method))


def test_nnx_whole_state_names_the_fix():
    model = NnxBatchNorm(nnx.Rngs(0))
    with pytest.raises(Exception) as info:
        psgd.path_scales(psgd.nnx.apply_fn(model), nnx.state(model), X)
    msg = str(info.value)
    assert "truth value" not in msg
    assert "params is not nnx.state(model, Param)" in msg and "bn/mean" in msg
    assert "nnx.state(model, nnx.Param)" in msg and "wrt=nnx.Param" in msg


def test_nnx_pure_dict_and_optimizer():
    model = NnxDropout(nnx.Rngs(0))
    fn = psgd.nnx.apply_fn(model)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    kappa = psgd.path_scales(fn, pure, X)
    _, ref, _ = mlp_bruteforce([(np.asarray(model.l1.kernel[...]), np.asarray(model.l1.bias[...])),
                                (np.asarray(model.l2.kernel[...]), np.asarray(model.l2.bias[...]))])
    np.testing.assert_allclose(np.asarray(kappa["l1"]["kernel"], np.float64), ref[0][0], rtol=1e-4)
    optimizer = nnx.Optimizer(model, psgd.path_sgd(0.1, fn, X), wrt=nnx.Param)
    before = np.asarray(model.l1.kernel[...])
    grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2))(model)
    optimizer.update(model, grads)
    assert not np.allclose(before, np.asarray(model.l1.kernel[...]))


def test_nnx_bad_input():
    with pytest.raises(TypeError, match="pathsgd_jax.linen.apply_fn"):
        psgd.nnx.apply_fn(NoFlag())
