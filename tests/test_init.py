"""Tests for pathsgd_jax.init: layer discovery, balanced and unbalanced initialisations."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathsgd_jax import init as pinit
from pathsgd_jax.init import DenseLayer, LayerDiscoveryError

WIDTHS = (12, 48, 40, 5)


# ----------------------------------------------------------------------------- models


def plain_params(key, widths=WIDTHS):
  keys = jax.random.split(key, len(widths) - 1)
  return [(jax.random.normal(k, (a, b)), jnp.zeros((b,)))
          for k, a, b in zip(keys, widths[:-1], widths[1:])]


def plain_apply(params, x):
  for i, (w, b) in enumerate(params):
    x = x @ w + b[None, :]
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


class LinenMLP(nn.Module):
  widths: tuple[int, ...] = WIDTHS[1:]

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths):
      x = nn.Dense(w)(x)
      if i < len(self.widths) - 1:
        x = nn.relu(x)
    return x


class NNXMLP(nnx.Module):

  def __init__(self, widths, rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(widths[:-1], widths[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


class NNXNamed(nnx.Module):

  def __init__(self, rngs):
    self.linear1 = nnx.Linear(12, 48, rngs=rngs)
    self.linear2 = nnx.Linear(48, 40, rngs=rngs)
    self.linear3 = nnx.Linear(40, 5, use_bias=False, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.linear1(x))
    return self.linear3(jax.nn.relu(self.linear2(x)))


def _x(n=16):
  return jax.random.uniform(jax.random.key(99), (n, WIDTHS[0]), minval=-1.0, maxval=1.0)


def _assert_same_function(y_ref, y_new):
  y_ref, y_new = np.asarray(y_ref), np.asarray(y_new)
  scale = np.abs(y_ref).max()
  assert scale > 0
  np.testing.assert_allclose(y_new, y_ref, rtol=1e-4, atol=1e-4 * scale)


def _changed(a, b):
  return any(not np.allclose(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------- discovery


def test_discovery_plain_linen_nnx():
  plain = plain_params(jax.random.key(0))
  assert pinit.dense_layers(plain) == [DenseLayer((i, 0), (i, 1)) for i in range(3)]
  dicts = [{"w": w, "b": b} for w, b in plain]
  assert pinit.dense_layers(dicts)[2] == DenseLayer((2, "w"), (2, "b"))
  flat = [leaf for pair in plain for leaf in pair]  # [W0, b0, W1, b1, ...]
  assert pinit.dense_layers(flat)[1] == DenseLayer((2,), (3,))

  linen = LinenMLP().init(jax.random.key(0), _x())
  assert [l.kernel for l in pinit.dense_layers(linen)] == [
      ("params", f"Dense_{i}", "kernel") for i in range(3)]

  state = nnx.state(NNXMLP(WIDTHS, nnx.Rngs(0)), nnx.Param)
  assert pinit.dense_layers(state) == [
      DenseLayer(("layers", i, "kernel"), ("layers", i, "bias")) for i in range(3)]
  named = pinit.dense_layers(nnx.state(NNXNamed(nnx.Rngs(0)), nnx.Param))
  assert named[2] == DenseLayer(("linear3", "kernel"), None)
  assert pinit.hidden_sizes(state) == [48, 40]


def test_discovery_natural_sort():
  widths = list(range(3, 16))  # 12 layers with distinct shapes: Dense_0 .. Dense_11
  params = {f"Dense_{i}": {"kernel": jnp.zeros((a, b)), "bias": jnp.zeros((b,))}
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))}
  # JAX flattens dicts in lexicographic key order (Dense_10 before Dense_2).
  layers = pinit.dense_layers({"params": params})
  assert [l.kernel[1] for l in layers] == [f"Dense_{i}" for i in range(12)]
  long_list = [(jnp.zeros((a, b)), jnp.zeros((b,))) for a, b in zip(widths[:-1], widths[1:])]
  assert [l.kernel[0] for l in pinit.dense_layers(long_list)] == list(range(12))


def test_discovery_orders_by_shape_when_names_do_not():
  params = {"output": {"kernel": jnp.zeros((8, 2))}, "input": {"kernel": jnp.zeros((4, 6))},
            "hidden": {"kernel": jnp.zeros((6, 8))}}
  assert [l.kernel[0] for l in pinit.dense_layers(params)] == ["input", "hidden", "output"]


def test_discovery_errors():
  ambiguous = {"a": {"kernel": jnp.zeros((4, 3))}, "b": {"kernel": jnp.zeros((3, 4))},
               "c": {"kernel": jnp.zeros((3, 4))}}
  with pytest.raises(LayerDiscoveryError, match="several orders") as err:
    pinit.dense_layers(ambiguous)
  assert "layers=" in str(err.value) and "a/kernel: (4, 3)" in str(err.value)
  with pytest.raises(LayerDiscoveryError, match="no order connects"):
    pinit.dense_layers({"a": {"kernel": jnp.zeros((3, 4))}, "b": {"kernel": jnp.zeros((5, 6))}})
  with pytest.raises(LayerDiscoveryError, match="No dense kernel"):
    pinit.dense_layers({"emb": jnp.zeros((3, 4)), "scale": jnp.zeros((4,))})


def test_explicit_layers():
  params = {"a": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros((3,))},
            "b": {"kernel": jnp.zeros((3, 4))}, "c": {"kernel": jnp.zeros((3, 4))},
            "extra": jnp.zeros((4,))}
  layers = pinit.dense_layers(params, layers=["a/kernel", ("c", "kernel")])
  assert layers == [DenseLayer(("a", "kernel"), ("a", "bias")), DenseLayer(("c", "kernel"), None)]
  pairs = pinit.dense_layers(params, layers=[(("a", "kernel"), None), ("b/kernel", "extra")])
  assert pairs == [DenseLayer(("a", "kernel"), None), DenseLayer(("b", "kernel"), ("extra",))]
  with pytest.raises(LayerDiscoveryError, match="not a leaf"):
    pinit.dense_layers(params, layers=["a/kernel", "d/kernel"])
  with pytest.raises(LayerDiscoveryError, match="do not form a chain"):
    pinit.dense_layers(params, layers=["b/kernel", "c/kernel"])
  with pytest.raises(LayerDiscoveryError, match="fan-out 3"):
    pinit.dense_layers(params, layers=[("a/kernel", "extra")])


# ----------------------------------------------------------------------------- balanced


def test_balanced_statistics():
  params = {"l0": {"kernel": jnp.ones((1000, 800)), "bias": jnp.ones((800,))},
            "l1": {"kernel": jnp.ones((800, 10)), "bias": jnp.ones((10,))},
            "other": jnp.full((3,), 7.0)}
  out = pinit.balanced_init(jax.random.key(0), params)
  w0, w1 = np.asarray(out["l0"]["kernel"]), np.asarray(out["l1"]["kernel"])
  assert abs(w0.std() * np.sqrt(1000) - 1) < 0.01 and abs(w0.mean()) < 1e-3
  assert abs(w1.std() * np.sqrt(800) - 1) < 0.05
  assert np.all(np.asarray(out["l0"]["bias"]) == 0) and np.all(np.asarray(out["l1"]["bias"]) == 0)
  np.testing.assert_array_equal(out["other"], params["other"])
  assert jax.tree.structure(out) == jax.tree.structure(params)
  again = pinit.balanced_init(jax.random.key(0), params)
  np.testing.assert_array_equal(again["l0"]["kernel"], w0)
  assert not np.array_equal(pinit.balanced_init(jax.random.key(1), params)["l0"]["kernel"], w0)


def test_balanced_preserves_dtype_and_accepts_shapes():
  params = [(jnp.zeros((64, 32), jnp.bfloat16), jnp.ones((32,), jnp.bfloat16)),
            (jnp.zeros((32, 4), jnp.float16), jnp.ones((4,), jnp.float16))]
  out = pinit.balanced_init(jax.random.key(0), params)
  assert isinstance(out, list) and isinstance(out[0], tuple)
  assert [l.dtype for l in jax.tree.leaves(out)] == [jnp.bfloat16] * 2 + [jnp.float16] * 2
  shapes = jax.eval_shape(lambda: LinenMLP().init(jax.random.key(0), _x()))
  real = pinit.balanced_init(jax.random.key(0), shapes)
  assert jax.tree.map(jnp.shape, real) == jax.tree.map(lambda s: s.shape, shapes)


# ----------------------------------------------------------------------------- unbalanced


def test_sample_unbalanced_scales_distribution():
  h = 4000
  (scales,) = pinit.sample_unbalanced_scales(jax.random.key(0), [h])
  s = np.asarray(scales)
  touched = s != 1.0
  # h/4 draws with replacement touch h * (1 - (1 - 1/h)^(h/4)) ~= 0.221 h distinct units.
  assert 0.20 * h < touched.sum() < 0.24 * h
  assert np.all(s > 0) and np.all(s[touched] > 10.0 * np.exp(-5.0))
  # Each draw is 10 exp(z), z ~ N(0, 1). With few draws per unit almost no unit is drawn
  # twice, so log(s / 10) of the touched units is a standard normal sample.
  (sparse,) = pinit.sample_unbalanced_scales(jax.random.key(1), [100_000], fraction=0.01)
  z = np.log(np.asarray(sparse)[np.asarray(sparse) != 1.0] / 10.0)
  assert 980 < z.size <= 1000
  assert abs(z.mean()) < 0.15 and 0.85 < z.std() < 1.2
  # Deterministic, and no draws with fraction=0.
  np.testing.assert_array_equal(
      pinit.sample_unbalanced_scales(jax.random.key(0), [h])[0], scales)
  assert np.all(np.asarray(pinit.sample_unbalanced_scales(
      jax.random.key(0), [10], fraction=0.0)[0]) == 1.0)
  with pytest.raises(ValueError, match="factor"):
    pinit.sample_unbalanced_scales(jax.random.key(0), [10], factor=0.0)


def test_unbalanced_plain_same_function_and_touched_units():
  params = pinit.balanced_init(jax.random.key(1), plain_params(jax.random.key(0),
                                                               (12, 400, 400, 5)))
  out = pinit.unbalanced_init(jax.random.key(2), params)
  assert isinstance(out, list) and isinstance(out[0], tuple)
  _assert_same_function(plain_apply(params, _x()), plain_apply(out, _x()))
  factors = []
  for i in range(2):
    ratio = np.asarray(out[i][0] / params[i][0])  # per column: product of unit factors
    factors.append(ratio[0] if i == 0 else ratio[0] * factors[0][0])
  for i, col in enumerate(factors):
    assert 0.18 * 400 < (np.abs(col - 1) > 1e-5).sum() < 0.26 * 400
    assert col.max() > 10.0 and col.min() > 10.0 * np.exp(-5.0)  # 10 exp(z) may be < 1
    np.testing.assert_allclose(out[i][1], 0.0)  # zero biases stay zero
  c0, c1 = (jnp.asarray(f) for f in factors)
  # Incoming weights times the unit's factor, outgoing weights divided by it.
  np.testing.assert_allclose(out[0][0], params[0][0] * c0[None, :], rtol=1e-5)
  np.testing.assert_allclose(out[1][0], params[1][0] * c1[None, :] / c0[:, None], rtol=1e-4)
  np.testing.assert_allclose(out[2][0], params[2][0] / c1[:, None], rtol=1e-5)
  expected = pinit.rescale_units(
      params, pinit.sample_unbalanced_scales(jax.random.key(2), [400, 400]))
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(out)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_unbalanced_linen_same_function():
  model = LinenMLP()
  params = pinit.balanced_init(jax.random.key(0), model.init(jax.random.key(1), _x()))
  out = jax.jit(pinit.unbalanced_init)(jax.random.key(3), params)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  assert _changed(params, out)
  _assert_same_function(model.apply(params, _x()), model.apply(out, _x()))


@pytest.mark.parametrize("make", [lambda r: NNXMLP(WIDTHS, r), NNXNamed])
def test_unbalanced_nnx_same_function(make):
  model = make(nnx.Rngs(0))
  state = pinit.balanced_init(jax.random.key(0), nnx.state(model, nnx.Param))
  assert isinstance(state, nnx.State)
  nnx.update(model, state)
  y_ref = model(_x())
  new_state = pinit.unbalanced_init(jax.random.key(5), state)
  assert isinstance(new_state, nnx.State)
  assert _changed(state, new_state)
  nnx.update(model, new_state)
  _assert_same_function(y_ref, model(_x()))


def test_rescale_units_checks_and_invariance():
  params = plain_params(jax.random.key(0))
  scales = [jnp.full((48,), 3.0), jnp.linspace(0.5, 2.0, 40)]
  out = pinit.rescale_units(params, scales)
  _assert_same_function(plain_apply(params, _x()), plain_apply(out, _x()))
  np.testing.assert_allclose(out[0][0], params[0][0] * 3.0, rtol=1e-6)
  with pytest.raises(ValueError, match="2 hidden layers"):
    pinit.rescale_units(params, scales[:1])
  with pytest.raises(ValueError, match=r"expected \(40,\)"):
    pinit.rescale_units(params, [scales[0], jnp.ones((41,))])
  with pytest.raises(ValueError, match="non-positive"):
    pinit.rescale_units(params, [scales[0], -jnp.ones((40,))])
  # Under jit the factors are traced: no value check, but the maths is the same.
  jitted = jax.jit(pinit.rescale_units)(params, scales)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_single_layer_has_no_hidden_units():
  params = [(jnp.ones((3, 2)), jnp.ones((2,)))]
  assert pinit.hidden_sizes(params) == []
  out = pinit.unbalanced_init(jax.random.key(0), params)
  np.testing.assert_array_equal(out[0][0], params[0][0])


def test_power_of_two_unbalancing_is_exact_and_path_sgd_follows_bit_for_bit():
  import optax  # pylint: disable=g-import-not-at-top

  import pathsgd_jax as psgd  # pylint: disable=g-import-not-at-top

  params = pinit.balanced_init(jax.random.key(1), plain_params(jax.random.key(0),
                                                               (12, 64, 64, 5)))
  params = [(w, b + 0.01) for w, b in params]  # non-zero biases are rescaled too
  scales = pinit.sample_unbalanced_scales(jax.random.key(2), [64, 64], power_of_two=True)
  for s in scales:
    log2 = np.log2(np.asarray(s))
    np.testing.assert_array_equal(log2, np.round(log2))
    assert np.abs(log2).max() >= 3  # factors of ~10 exp(z) survive the rounding
  # Within a factor sqrt(2) of the continuous draw from the same key.
  for exact, drawn in zip(scales, pinit.sample_unbalanced_scales(jax.random.key(2), [64, 64])):
    ratio = np.asarray(exact) / np.asarray(drawn)
    assert np.all(ratio <= np.sqrt(2) * (1 + 1e-6)) and np.all(ratio >= 1 / np.sqrt(2) / (1 + 1e-6))
  unbalanced = pinit.unbalanced_init(jax.random.key(2), params, power_of_two=True)
  assert _changed(params, unbalanced)
  x = _x()
  np.testing.assert_array_equal(plain_apply(params, x), plain_apply(unbalanced, x))

  y = jax.nn.one_hot(jnp.arange(x.shape[0]) % 5, 5)
  loss = lambda p: optax.softmax_cross_entropy(plain_apply(p, x), y).mean()
  tx = psgd.path_sgd(0.05, plain_apply, x, momentum=0.9)

  @jax.jit
  def step(p, state):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  a, sa, b, sb = params, tx.init(params), unbalanced, tx.init(unbalanced)
  for _ in range(15):
    a, sa = step(a, sa)
    b, sb = step(b, sb)
  np.testing.assert_array_equal(plain_apply(a, x), plain_apply(b, x))
  assert not np.array_equal(np.asarray(plain_apply(a, x)), np.asarray(plain_apply(params, x)))
