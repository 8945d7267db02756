"""The in-memory container returned by :func:`pathsgd_jax.data.load`."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
  """Inputs and labels of one part of a dataset; unpacks as ``x, y``."""

  x: np.ndarray
  y: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A classification dataset held as numpy arrays.

  Inputs are ``float32`` in ``[0, 1]`` with shape ``(n, *input_shape)``; images keep their
  ``(n, H, W, C)`` layout until :meth:`flat` is called. Labels are ``int32`` in
  ``[0, num_classes)``.

  Attributes:
    x_train: Training inputs, ``(n_train, *input_shape)``, ``float32``.
    y_train: Training labels, ``(n_train,)``, ``int32``.
    x_test: Test inputs, ``(n_test, *input_shape)``, ``float32``.
    y_test: Test labels, ``(n_test,)``, ``int32``.
    name: Canonical dataset name, e.g. ``"fashion_mnist"``.
    num_classes: Number of classes.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  name: str
  num_classes: int

  def __post_init__(self) -> None:
    for part in ("train", "test"):
      x = getattr(self, f"x_{part}")
      y = getattr(self, f"y_{part}")
      if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise TypeError(
            f"Dataset {self.name!r}: x_{part} and y_{part} must be numpy arrays, got "
            f"{type(x).__name__} and {type(y).__name__}; convert them with np.asarray.")
      if x.dtype != np.float32:
        raise TypeError(
            f"Dataset {self.name!r}: x_{part} must be float32 scaled to [0, 1], got dtype "
            f"{x.dtype}; divide integer pixels by their maximum and cast to float32.")
      if y.dtype != np.int32 or y.ndim != 1:
        raise TypeError(
            f"Dataset {self.name!r}: y_{part} must be a 1-D int32 array, got dtype {y.dtype} "
            f"and shape {y.shape}.")
      if x.ndim < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Dataset {self.name!r}: x_{part} has shape {x.shape} but y_{part} has "
            f"{y.shape[0]} labels; inputs need shape (n, ...features) with n equal to the "
            "number of labels.")
      if y.size and (y.min() < 0 or y.max() >= self.num_classes):
        raise ValueError(
            f"Dataset {self.name!r}: y_{part} has labels in [{y.min()}, {y.max()}], outside "
            f"[0, {self.num_classes}).")
    if self.x_train.shape[1:] != self.x_test.shape[1:]:
      raise ValueError(
          f"Dataset {self.name!r}: train inputs have feature shape {self.x_train.shape[1:]} "
          f"but test inputs have {self.x_test.shape[1:]}.")

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one input example, e.g. ``(28, 28, 1)`` or ``(784,)`` after :meth:`flat`."""
    return tuple(self.x_train.shape[1:])

  @property
  def input_dim(self) -> int:
    """Number of input features of one flattened example."""
    return int(np.prod(self.input_shape))

  @property
  def train(self) -> Split:
    """The training part as a ``(x, y)`` named tuple."""
    return Split(self.x_train, self.y_train)

  @property
  def test(self) -> Split:
    """The test part as a ``(x, y)`` named tuple."""
    return Split(self.x_test, self.y_test)

  def flat(self) -> Dataset:
    """Returns a copy whose inputs are flattened to ``(n, d)``, as a dense network needs.

    Returns:
      A new :class:`Dataset` with ``x_train`` of shape ``(n_train, d)`` and ``x_test`` of
      shape ``(n_test, d)``, ``d = prod(input_shape)``; labels are shared, not copied.
    """
    return dataclasses.replace(
        self,
        x_train=self.x_train.reshape(self.x_train.shape[0], -1),
        x_test=self.x_test.reshape(self.x_test.shape[0], -1))

  def split_validation(
      self, fraction: float = 0.1, seed: int = 0) -> tuple[Split, Split]:
    """Holds out a random part of the *training* set for model selection.

    The test set is not touched, so hyper-parameters (for instance the learning rate, chosen
    by validation error as in the Path-SGD paper) can be selected without looking at it.

    Args:
      fraction: Fraction of the training examples to hold out, in ``(0, 1)``.
      seed: Seed of the ``numpy.random.Generator`` that draws the held-out examples; the
        same seed gives the same split.

    Returns:
      ``(train_part, validation_part)``, two :class:`Split` named tuples ``(x, y)`` whose
      sizes add up to ``len(y_train)``. The validation part has ``round(fraction * n)``
      examples.

    Raises:
      ValueError: if ``fraction`` leaves either part empty.
    """
    n = self.y_train.shape[0]
    n_val = int(round(fraction * n))
    if not 0.0 < fraction < 1.0 or n_val < 1 or n_val > n - 1:
      raise ValueError(
          f"split_validation(fraction={fraction}) on {n} training examples would leave an "
          "empty part; use a fraction in (0, 1) that keeps at least one example on each side.")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return (Split(self.x_train[train_idx], self.y_train[train_idx]),
            Split(self.x_train[val_idx], self.y_train[val_idx]))

  def __repr__(self) -> str:
    return (f"Dataset(name={self.name!r}, num_classes={self.num_classes}, "
            f"input_shape={self.input_shape}, n_train={self.y_train.shape[0]}, "
            f"n_test={self.y_test.shape[0]})")
