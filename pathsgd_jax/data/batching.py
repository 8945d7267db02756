"""Deterministic mini-batch iteration over numpy arrays."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

Seed = int | Sequence[int] | np.random.Generator | Any


def _generator(seed: Seed) -> np.random.Generator:
  """A numpy Generator from an int, a sequence of ints, a Generator or a JAX PRNG key."""
  if isinstance(seed, np.random.Generator):
    return seed
  if isinstance(seed, (int, np.integer)) or (
      isinstance(seed, (list, tuple)) and all(isinstance(s, (int, np.integer)) for s in seed)):
    return np.random.default_rng(seed)
  try:  # A JAX PRNG key, typed or raw uint32.
    import jax  # pylint: disable=g-import-not-at-top
    if isinstance(seed, jax.Array):
      data = jax.random.key_data(seed) if jax.dtypes.issubdtype(
          seed.dtype, jax.dtypes.prng_key) else seed
      return np.random.default_rng(np.asarray(data, dtype=np.uint32).ravel().tolist())
  except ImportError:  # pragma: no cover
    pass
  raise TypeError(
      f"seed must be an int, a sequence of ints, a numpy Generator or a JAX PRNG key, got "
      f"{type(seed).__name__}.")


def num_batches(n: int, batch_size: int, *, drop_last: bool = True) -> int:
  """Number of batches :func:`batches` yields for ``n`` examples.

  Args:
    n: Number of examples.
    batch_size: Examples per batch.
    drop_last: Whether the last, incomplete batch is dropped.

  Returns:
    ``n // batch_size`` if ``drop_last`` else ``ceil(n / batch_size)``.
  """
  return n // batch_size if drop_last else -(-n // batch_size)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: Seed,
            shuffle: bool = True, drop_last: bool = True
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields one epoch of ``(x_batch, y_batch)`` mini-batches.

  The order is a permutation drawn from a ``numpy.random.Generator``, so the same seed gives
  the same batches. For a different order each epoch pass ``seed=(base_seed, epoch)`` or one
  Generator that is reused across epochs.

  Args:
    x: Inputs, ``(n, ...)``.
    y: Labels, ``(n,)``.
    batch_size: Examples per batch (the Path-SGD paper uses 100).
    seed: An int, a sequence of ints, a ``numpy.random.Generator`` or a JAX PRNG key.
    shuffle: Whether to permute the examples; ``False`` keeps the stored order.
    drop_last: Drop the last batch if it has fewer than ``batch_size`` examples, so every
      batch has the same shape (and a jitted step compiles once).

  Yields:
    ``(x[idx], y[idx])`` for consecutive index blocks of the (permuted) order.

  Raises:
    ValueError: if ``x`` and ``y`` differ in length or ``batch_size`` is not positive.
  """
  n = len(x)
  if len(y) != n:
    raise ValueError(f"batches: x has {n} examples but y has {len(y)}; they must match.")
  if batch_size < 1:
    raise ValueError(f"batches: batch_size must be a positive integer, got {batch_size}.")
  order = _generator(seed).permutation(n) if shuffle else np.arange(n)
  for b in range(num_batches(n, batch_size, drop_last=drop_last)):
    idx = order[b * batch_size:(b + 1) * batch_size]
    yield x[idx], y[idx]
