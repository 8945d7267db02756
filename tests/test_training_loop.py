"""The experiments' compiled training chunks: the unrolled chunk (convolutional networks on
the CPU) is the scanned one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from pathsgd_jax.experiments import training


def _conv_net(params, x):
  h = x.reshape(x.shape[0], 6, 6, 1)
  h = lax.conv_general_dilated(h, params["w"], (1, 1), "VALID",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.nn.relu(h).reshape(x.shape[0], -1) @ params["v"]


def test_unrolled_chunk_equals_scanned_chunk():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(k1, (3, 3, 1, 4)) / 3.0,
            "v": jax.random.normal(k2, (64, 3)) / 8.0}
  x_all = jax.random.normal(k3, (24, 36))
  y_all = jnp.arange(24, dtype=jnp.int32) % 3
  idx = np.arange(24, dtype=np.int32).reshape(3, 8)[::-1].copy()
  steps = np.arange(3, dtype=np.int32)
  out = {}
  assert jax.default_backend() == "cpu"  # where convolutional chunks are unrolled
  for unroll in (False, True):
    tx = optax.sgd(1.0, momentum=0.9)
    chunk = training.make_train_chunk(lambda p, x, _: _conv_net(p, x), tx, convolutional=unroll)
    start = jax.tree.map(jnp.copy, params)
    out[unroll] = chunk(start, tx.init(start), jnp.float32(0.1), jax.random.key(1), x_all,
                        y_all, idx, steps)
  (p_scan, _, loss_scan), (p_unrolled, _, loss_unrolled) = out[False], out[True]
  assert loss_unrolled.shape == (3,)
  np.testing.assert_allclose(loss_unrolled, loss_scan, rtol=1e-5)
  assert not np.allclose(loss_scan[0], loss_scan[-1])  # the steps did move the network
  for a, b in zip(jax.tree.leaves(p_unrolled), jax.tree.leaves(p_scan)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunk_steps_divide_the_epoch_and_stay_short_when_unrolled():
  assert training.chunk_steps(14, 50) == 14
  assert training.chunk_steps(15, 10) == 5
  assert training.chunk_steps(14, 50, convolutional=True) == 2  # on the CPU
  assert training.chunk_steps(15, 50, convolutional=True) == 1
  assert training.chunk_steps(0, 50) == 1
