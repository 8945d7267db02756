"""Networks of the experiments, as plain JAX parameter trees and ``apply(params, x)`` functions.

* :func:`mlp_init` / :func:`mlp_apply`: the fully connected ReLU network of the Path-SGD paper,
  parameters a list of ``{'w': (fan_in, fan_out), 'b': (fan_out,)}`` dicts (a layer computes
  ``x @ w + b``), ReLU between layers, logits out. Optional inverted dropout on the hidden
  activations (training loss only; the path network and evaluation are deterministic).
* :func:`cnn_init` / :func:`cnn_apply`: a small CIFAR-style convolutional network used by the
  benchmark: conv 3x3 (32) -> ReLU -> 2x2 average pool -> conv 3x3 (64) -> ReLU -> 2x2 average
  pool -> dense (10), NHWC inputs, written with :func:`jax.lax.conv_general_dilated`.

Everything is written so it also runs under ``jax_numpy_rank_promotion="raise"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Params = Any


def mlp_sizes(input_dim: int, width: int, depth: int, num_classes: int) -> list[int]:
  """Layer sizes ``[input_dim, width, ..., width, num_classes]`` with ``depth`` hidden layers."""
  if depth < 1 or width < 1:
    raise ValueError(f"depth and width must be positive, got depth={depth}, width={width}.")
  return [input_dim] + [width] * depth + [num_classes]


def mlp_init(key: jax.Array, sizes: Sequence[int], dtype=jnp.float32) -> list[dict]:
  """Balanced initialisation of an MLP: ``w ~ N(0, 1/fan_in)``, ``b = 0``.

  (The same distribution as :func:`pathsgd_jax.init.balanced_init`; the experiments call that
  function on the tree built here, so this one only provides the structure.)
  """
  keys = jax.random.split(key, len(sizes) - 1)
  params = []
  for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:]):
    w = jax.random.normal(k, (fan_in, fan_out), dtype) / math.sqrt(fan_in)
    params.append({"w": w.astype(dtype), "b": jnp.zeros((fan_out,), dtype)})
  return params


def mlp_apply(params: list[dict], x: jax.Array, *, dropout_rate: float = 0.0,
              dropout_key: jax.Array | None = None) -> jax.Array:
  """Logits of the ReLU MLP; dropout (inverted) on hidden activations when a key is given."""
  h = x.reshape(x.shape[0], -1)
  n = len(params)
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"][None, :]
    if i < n - 1:
      h = jax.nn.relu(h)
      if dropout_rate > 0.0 and dropout_key is not None:
        dropout_key, sub = jax.random.split(dropout_key)
        keep = jax.random.bernoulli(sub, 1.0 - dropout_rate, h.shape)
        h = jnp.where(keep, h / (1.0 - dropout_rate), 0.0).astype(h.dtype)
  return h


def mlp_forward(params: list[dict], x: jax.Array) -> jax.Array:
  """Deterministic forward pass (no dropout): the ``apply_fn`` given to Path-SGD."""
  return mlp_apply(params, x)


def cnn_init(key: jax.Array, input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
             channels: Sequence[int] = (32, 64), dtype=jnp.float32) -> dict:
  """He-style ``N(0, 1/fan_in)`` initialisation of :func:`cnn_apply`'s parameters."""
  h, w, c = input_shape
  params = {}
  keys = jax.random.split(key, len(channels) + 1)
  for i, (k, out_c) in enumerate(zip(keys, channels)):
    fan_in = 9 * c
    params[f"conv{i}"] = {
        "w": (jax.random.normal(k, (3, 3, c, out_c), dtype) / math.sqrt(fan_in)).astype(dtype),
        "b": jnp.zeros((out_c,), dtype)}
    c = out_c
    h, w = h // 2, w // 2
  fan_in = h * w * c
  params["dense"] = {
      "w": (jax.random.normal(keys[-1], (fan_in, num_classes), dtype)
            / math.sqrt(fan_in)).astype(dtype),
      "b": jnp.zeros((num_classes,), dtype)}
  return params


def _avg_pool2(x: jax.Array) -> jax.Array:
  # A Python-scalar zero init lets JAX lower this to the ``reduce_window_sum`` primitive
  # (a traced zero would give a generic ``reduce_window``, which no path network accepts).
  summed = lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  return summed * jnp.asarray(0.25, x.dtype)


def cnn_apply(params: dict, x: jax.Array) -> jax.Array:
  """Logits of the small CNN on NHWC images."""
  h = x
  i = 0
  while f"conv{i}" in params:
    layer = params[f"conv{i}"]
    h = lax.conv_general_dilated(h, layer["w"], (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + layer["b"][None, None, None, :])
    h = _avg_pool2(h)
    i += 1
  h = h.reshape(h.shape[0], -1)
  return h @ params["dense"]["w"] + params["dense"]["b"][None, :]


# ---------------------------------------------------------------------------------------------
# A small BatchNorm ResNet (the ``resnet`` experiment).
# ---------------------------------------------------------------------------------------------


def _resnet_modules():
  """The Linen classes of :func:`resnet` (Flax is imported only when a ResNet is built)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class ResNetBlock(nn.Module):
    """Basic residual block, ResNet v1.5 style: conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the
    shortcut (a 1x1 strided conv + BN when the shape changes), then ReLU. The scale of the
    branch's last BatchNorm starts at 0, as in Flax's ResNet, so every block starts as its
    shortcut."""

    features: int
    strides: int = 1
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool = False):
      norm = lambda name, **kw: nn.BatchNorm(use_running_average=not train,  # noqa: E731
                                             momentum=self.bn_momentum,
                                             epsilon=self.bn_epsilon, name=name, **kw)
      s = (self.strides, self.strides)
      h = nn.Conv(self.features, (3, 3), s, use_bias=False, name="conv1")(x)
      h = nn.relu(norm("bn1")(h))
      h = nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(h)
      h = norm("bn2", scale_init=nn.initializers.zeros)(h)
      if x.shape != h.shape:
        x = nn.Conv(self.features, (1, 1), s, use_bias=False, name="proj_conv")(x)
        x = norm("proj_bn")(x)
      return nn.relu(h + x)

  class ResNet(nn.Module):
    """Stem conv3x3-BN-ReLU, stages of :class:`ResNetBlock` (stride 2 at the first block of
    every stage after the first), global average pooling, a dense head."""

    stage_features: tuple = (8, 16, 32)
    blocks_per_stage: int = 1
    num_classes: int = 10
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool = False):
      h = nn.Conv(self.stage_features[0], (3, 3), use_bias=False, name="stem_conv")(x)
      h = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                       epsilon=self.bn_epsilon, name="stem_bn")(h)
      h = nn.relu(h)
      for i, features in enumerate(self.stage_features):
        for j in range(self.blocks_per_stage):
          h = ResNetBlock(features, strides=2 if i > 0 and j == 0 else 1,
                          bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                          name=f"stage{i}_block{j}")(h, train)
      h = jnp.mean(h, axis=(1, 2))
      return nn.Dense(self.num_classes, name="head")(h)

  return ResNetBlock, ResNet


def resnet(stage_features: Sequence[int] = (8, 16, 32), blocks_per_stage: int = 1,
           num_classes: int = 10, *, bn_momentum: float = 0.9, bn_epsilon: float = 1e-5):
  """A small BatchNorm ResNet (Linen module) on NHWC images.

  Convolutions have no bias (BatchNorm follows each); the last BatchNorm scale of every
  residual branch is initialised to 0; ``train=True`` normalises with the batch's
  statistics (``mutable=['batch_stats']`` returns the updated running averages),
  ``train=False`` with the running averages. Parameter names: ``stem_conv``, ``stem_bn``,
  ``stage{i}_block{j}/{conv1,bn1,conv2,bn2[,proj_conv,proj_bn]}``, ``head``.
  """
  if not stage_features or min(stage_features) < 1 or blocks_per_stage < 1:
    raise ValueError(f"stage_features must be positive and blocks_per_stage >= 1, got "
                     f"{tuple(stage_features)} and {blocks_per_stage}.")
  _, net = _resnet_modules()
  return net(tuple(int(f) for f in stage_features), int(blocks_per_stage), int(num_classes),
             bn_momentum, bn_epsilon)
