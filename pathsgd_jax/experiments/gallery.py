"""The real-model gallery as functional training problems: Linen, NNX, Equinox and plain JAX.

Small versions, written here, of the models people train with Path-SGD (the same shapes as the
test suite's gallery): the paper's MLP from a balanced and an unbalanced start, the Flax MNIST
example CNN, a zero-initialised ResNet v1.5 with BatchNorm in train and in eval mode, an NNX
CNN with BatchNorm and dropout, and Equinox's MLP and a small Equinox CNN.

Each becomes a :class:`Problem`: the tree the optimizer sees, the extra state (batch
statistics, dropout keys), the ``apply_fn`` for Path-SGD, a training loss and a deterministic
evaluation loss, all pure functions that can be jitted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import pathsgd_jax as psgd
from pathsgd_jax import init as init_lib
from pathsgd_jax.experiments import models
from pathsgd_jax.experiments import training

MODELS = ("mlp-balanced", "mlp-unbalanced", "flax-mnist-cnn", "resnet-train-bn",
          "resnet-eval-bn", "nnx-bn-dropout-cnn", "equinox-mlp", "equinox-cnn")


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy with integer labels."""
  return jnp.mean(training.cross_entropy(logits, labels))


class Problem(NamedTuple):
  """A model as a training problem.

  Attributes:
    name: its name in :data:`MODELS`.
    description: one line for tables.
    params: the tree the optimizer updates.
    aux: the rest of the model's state (batch statistics, dropout keys), or None.
    path_fn: ``apply_fn(params, x)`` for Path-SGD (the path network's function).
    loss: ``loss(params, aux, x, y) -> (loss, new_aux)``, the training loss.
    eval_loss: ``eval_loss(params, aux, x, y) -> loss``, deterministic (no dropout; BatchNorm
      as in training: batch statistics for train-mode models).
    layout: "nhwc", "nchw" or "flat", the input layout.
  """

  name: str
  description: str
  params: Any
  aux: Any
  path_fn: Callable
  loss: Callable
  eval_loss: Callable
  layout: str


# ----------------------------------------------------------------------------- Linen models
class ResidualBlock(nn.Module):
  """ResNet v1.5 basic block, the last BatchNorm scale initialised to 0."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda **kw: nn.BatchNorm(use_running_average=not train, momentum=0.9, **kw)  # noqa: E731
    h = nn.Conv(self.features, (3, 3), (self.strides, self.strides), use_bias=False)(x)
    h = nn.relu(norm()(h))
    h = nn.Conv(self.features, (3, 3), use_bias=False)(h)
    h = norm(scale_init=nn.initializers.zeros)(h)
    if x.shape != h.shape:
      x = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False)(x)
      x = norm()(x)
    return nn.relu(h + x)


class SmallResNet(nn.Module):
  """Stem, residual stages (a stride-2 first block after the first stage), mean, dense."""

  stage_features: tuple = (8, 16)
  blocks_per_stage: int = 1
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Conv(self.stage_features[0], (3, 3), use_bias=False)(x)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(h))
    for i, features in enumerate(self.stage_features):
      for j in range(self.blocks_per_stage):
        h = ResidualBlock(features, strides=2 if i > 0 and j == 0 else 1)(h, train)
    return nn.Dense(self.num_classes)(jnp.mean(h, axis=(1, 2)))


class MnistCNN(nn.Module):
  """The shape of Flax's MNIST example: two conv + average-pool stages, two dense layers."""

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(64)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10)(x)


def _mlp(name, key, x, width, depth, unbalanced):
  sizes = models.mlp_sizes(x.shape[1], width, depth, 10)
  k_shape, k_bal, k_unbal = jax.random.split(key, 3)
  params = init_lib.balanced_init(k_bal, models.mlp_init(k_shape, sizes))
  if unbalanced:  # the paper's unbalanced start, factors rounded to powers of two
    params = init_lib.unbalanced_init(k_unbal, params, power_of_two=True)
  fn = models.mlp_forward
  loss = lambda prm, aux, xb, yb: (cross_entropy(fn(prm, xb), yb), aux)  # noqa: E731
  start = "unbalanced" if unbalanced else "balanced"
  return Problem(name, f"paper MLP {'-'.join(map(str, sizes))}, {start}", params, None, fn,
                 loss, lambda prm, aux, xb, yb: loss(prm, aux, xb, yb)[0], "flat")


def _linen_cnn(name, key, x):
  model = MnistCNN()
  params = model.init(key, x[:2])["params"]
  fn = psgd.linen.apply_fn(model)
  loss = lambda prm, aux, xb, yb: (cross_entropy(fn(prm, xb), yb), aux)  # noqa: E731
  return Problem(name, "Flax MNIST-example CNN (Linen)", params, None, fn, loss,
                 lambda prm, aux, xb, yb: loss(prm, aux, xb, yb)[0], "nhwc")


def _resnet(name, key, x, train, stages, blocks):
  model = SmallResNet(stage_features=stages, blocks_per_stage=blocks)
  variables = model.init(key, x[:2])
  params, stats = variables["params"], variables["batch_stats"]
  kwargs = dict(train=True, mutable=["batch_stats"]) if train else {}
  fn = psgd.linen.apply_fn(model, variables={"batch_stats": stats}, **kwargs)

  def loss(prm, aux, xb, yb):
    if train:
      logits, new = model.apply({"params": prm, "batch_stats": aux}, xb, train=True,
                                mutable=["batch_stats"])
      return cross_entropy(logits, yb), new["batch_stats"]
    return cross_entropy(model.apply({"params": prm, "batch_stats": aux}, xb), yb), aux

  mode = "train-mode (batch statistics)" if train else "eval-mode (frozen statistics)"
  return Problem(name, f"zero-init ResNet {stages}x{blocks}, {mode} BatchNorm (Linen)",
                 params, stats, fn, loss, lambda prm, aux, xb, yb: loss(prm, aux, xb, yb)[0],
                 "nhwc")


# ------------------------------------------------------------------------------ NNX model
def nnx_bn_cnn(rngs):
  """An NNX CNN with BatchNorm and dropout (train mode unless ``model.eval()``)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class NNXCNN(nnx.Module):
    def __init__(self, rngs):
      self.conv1 = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
      self.bn1 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
      self.conv2 = nnx.Conv(8, 16, (3, 3), strides=(2, 2), use_bias=False, rngs=rngs)
      self.bn2 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)
      self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.bn1(self.conv1(x)))
      x = nnx.relu(self.bn2(self.conv2(x)))
      return self.head(self.drop(jnp.mean(x, axis=(1, 2))))

  return NNXCNN(rngs)


def _nnx_cnn(name, key, x):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  model = nnx_bn_cnn(nnx.Rngs(int(jax.random.randint(key, (), 0, 2**31 - 1))))
  fn = psgd.nnx.apply_fn(model, batch_statistics=True)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def run(prm, aux, xb, deterministic):
    m = nnx.merge(graphdef, prm, aux, copy=True)
    m.set_attributes(deterministic=deterministic, use_running_average=False)
    out = m(xb)
    return out, nnx.split(m, nnx.Param, ...)[2]

  def loss(prm, aux, xb, yb):
    logits, new = run(prm, aux, xb, False)
    return cross_entropy(logits, yb), new

  return Problem(name, "NNX CNN, train-mode BatchNorm + dropout", params, rest, fn, loss,
                 lambda prm, aux, xb, yb: cross_entropy(run(prm, aux, xb, True)[0], yb),
                 "nhwc")


# -------------------------------------------------------------------------- Equinox models
def _equinox(name, key, x, kind):
  import equinox as eqx  # pylint: disable=g-import-not-at-top

  if kind == "mlp":
    model = eqx.nn.MLP(784, 10, width_size=64, depth=1, key=key)
    description = "Equinox eqx.nn.MLP 784-64-10"
  else:
    k1, k2 = jax.random.split(key)

    class SmallCNN(eqx.Module):
      conv: eqx.nn.Conv2d
      pool: eqx.nn.AvgPool2d
      dense: eqx.nn.Linear

      def __call__(self, x):
        return self.dense(jnp.ravel(self.pool(jax.nn.relu(self.conv(x)))))

    model = SmallCNN(eqx.nn.Conv2d(1, 4, 3, key=k1), eqx.nn.AvgPool2d(2, 2),
                     eqx.nn.Linear(4 * 13 * 13, 10, key=k2))
    description = "Equinox CNN: conv 3x3 (4) - avg pool - linear"
  params, static = eqx.partition(model, eqx.is_array)
  fn = psgd.equinox.apply_fn(model)

  def loss(prm, aux, xb, yb):
    return cross_entropy(jax.vmap(eqx.combine(prm, static))(xb), yb), aux

  return Problem(name, description, params, None, fn, loss,
                 lambda prm, aux, xb, yb: loss(prm, aux, xb, yb)[0],
                 "flat" if kind == "mlp" else "nchw")


def make(name: str, x_nhwc: np.ndarray, *, seed: int = 0, mlp_width: int = 1000,
         mlp_depth: int = 2, resnet_stages: tuple = (8, 16), resnet_blocks: int = 1) -> Problem:
  """The gallery model ``name`` (see :data:`MODELS`), initialised from ``seed``."""
  # Both MLP starts come from one balanced network (the unbalanced one is its rescaling).
  index = MODELS.index("mlp-balanced" if name.startswith("mlp-") else name)
  key = jax.random.fold_in(jax.random.key(seed), index)
  x = jnp.asarray(x_nhwc[:2])
  flat = x.reshape(x.shape[0], -1)
  if name.startswith("mlp-"):
    return _mlp(name, key, flat, mlp_width, mlp_depth, name == "mlp-unbalanced")
  if name == "flax-mnist-cnn":
    return _linen_cnn(name, key, x)
  if name.startswith("resnet-"):
    return _resnet(name, key, x, name == "resnet-train-bn", tuple(resnet_stages),
                   resnet_blocks)
  if name == "nnx-bn-dropout-cnn":
    return _nnx_cnn(name, key, x)
  if name.startswith("equinox-"):
    return _equinox(name, key, x, name.split("-")[1])
  raise ValueError(f"unknown gallery model {name!r}; choose from {', '.join(MODELS)}.")


def layout(x_nhwc: np.ndarray, kind: str) -> np.ndarray:
  """The NHWC images in a problem's input layout."""
  if kind == "flat":
    return x_nhwc.reshape(x_nhwc.shape[0], -1)
  if kind == "nchw":
    return np.transpose(x_nhwc, (0, 3, 1, 2))
  return x_nhwc


def count(params) -> int:
  return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))
