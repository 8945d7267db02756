"""ResNet v1.5 (He et al., 2016; the stride on the 3×3 convolution) in Flax Linen, for benchmarks.

ResNet18/34 are built from basic blocks (two 3×3 convolutions), ResNet50/101/152 from
bottleneck blocks (1×1, 3×3, 1×1 with 4× expansion). Every convolution is followed by
BatchNorm; the last BatchNorm scale of every residual branch starts at zero, and projection
shortcuts (1×1 convolution + BatchNorm) are used where the shape changes. The stem is a 3×3
convolution without pooling when the images are small (CIFAR-style, ``small_images=True``),
and the ImageNet 7×7 stride-2 convolution with 3×3 max pooling otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
          152: ("bottleneck", (3, 8, 36, 3))}


class Block(nn.Module):
  """A residual block: ``relu(branch(x) + shortcut(x))``."""

  features: int
  strides: int
  kind: str
  train: bool

  @nn.compact
  def __call__(self, x):
    norm = functools.partial(nn.BatchNorm, use_running_average=not self.train, momentum=0.9)
    conv = functools.partial(nn.Conv, use_bias=False)
    if self.kind == "basic":
      h = nn.relu(norm()(conv(self.features, (3, 3), self.strides)(x)))
      h = norm(scale_init=nn.initializers.zeros)(conv(self.features, (3, 3))(h))
      out_features = self.features
    else:
      h = nn.relu(norm()(conv(self.features, (1, 1))(x)))
      h = nn.relu(norm()(conv(self.features, (3, 3), self.strides)(h)))
      out_features = 4 * self.features
      h = norm(scale_init=nn.initializers.zeros)(conv(out_features, (1, 1))(h))
    if x.shape[-1] != out_features or self.strides != 1:
      x = norm()(conv(out_features, (1, 1), self.strides)(x))
    return nn.relu(h + x)


class ResNet(nn.Module):
  """ResNet-``depth`` v1.5 with ``classes`` outputs (logits)."""

  depth: int = 18
  classes: int = 10
  width: int = 64
  small_images: bool = True
  train: bool = False

  @nn.compact
  def __call__(self, x):
    kind, stages = STAGES[self.depth]
    norm = functools.partial(nn.BatchNorm, use_running_average=not self.train, momentum=0.9)
    if self.small_images:
      x = nn.relu(norm()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
    else:
      x = nn.relu(norm()(nn.Conv(self.width, (7, 7), 2, use_bias=False)(x)))
      x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    for stage, blocks in enumerate(stages):
      for b in range(blocks):
        x = Block(self.width * 2**stage, 2 if stage and not b else 1, kind, self.train)(x)
    return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


def init(depth: int, image_size: int, key: jax.Array, *, classes: int = 10, width: int = 64,
         channels: int = 3):
  """``(model, variables)`` of an eval-mode ResNet-``depth`` for ``image_size`` images."""
  model = ResNet(depth, classes, width, small_images=image_size <= 64)
  variables = model.init(key, jnp.zeros((1, image_size, image_size, channels)))
  return model, variables


def names(depths: Sequence[int] = tuple(STAGES)) -> list[str]:
  return [f"resnet{d}" for d in depths]
