"""Readers for the on-disk formats of the supported datasets.

Every reader checks the file against what its own header (or the format's fixed record size)
declares and raises :class:`MalformedDatasetError` naming the file on any mismatch, so a
truncated download never turns into a silently smaller dataset. No reader unpickles.

References:
  Y. LeCun, C. Cortes, C. J. C. Burges. The MNIST database (IDX file format).
  A. Krizhevsky. Learning Multiple Layers of Features from Tiny Images, 2009 (CIFAR binary
  version).
  Y. Netzer et al. Reading Digits in Natural Images with Unsupervised Feature Learning, 2011
  (SVHN format 2).
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Sequence

import numpy as np

from pathsgd_jax.data.errors import MalformedDatasetError

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type codes (third byte of the magic number) and their big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

CIFAR_IMAGE_BYTES = 3 * 32 * 32


def read_bytes(path: str | os.PathLike[str]) -> bytes:
  """Reads a file, transparently decompressing gzip (detected by content, not by name).

  Args:
    path: File to read.

  Returns:
    The (decompressed) content.

  Raises:
    MalformedDatasetError: if the file is a truncated or corrupt gzip stream.
  """
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] != _GZIP_MAGIC:
    return raw
  try:
    return gzip.decompress(raw)
  except (EOFError, OSError, zlib.error) as e:
    raise MalformedDatasetError(
        f"{path}: corrupt or truncated gzip file ({e}); delete it and fetch it again.") from e


def read_idx(path: str | os.PathLike[str], *, ndim: int | None = None) -> np.ndarray:
  """Reads an IDX file (the MNIST / Fashion-MNIST format), gzip-compressed or not.

  Args:
    path: The ``.gz`` or uncompressed IDX file.
    ndim: If given, the number of dimensions the file must declare (3 for images, 1 for
      labels).

  Returns:
    The array, with the shape and dtype declared by the header (native byte order).

  Raises:
    MalformedDatasetError: on a bad magic number, an unknown type code, an unexpected number
      of dimensions, or a payload whose length differs from the declared dimensions.
  """
  data = read_bytes(path)
  if len(data) < 4:
    raise MalformedDatasetError(
        f"{path}: only {len(data)} bytes, too short for an IDX header; the file is truncated.")
  if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
    raise MalformedDatasetError(
        f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000TTNN with type "
        f"code TT in {{{', '.join(f'{k:02x}' for k in _IDX_DTYPES)}}} and NN >= 1 "
        "dimensions); this is not an IDX file.")
  dtype, nd = _IDX_DTYPES[data[2]], data[3]
  if ndim is not None and nd != ndim:
    raise MalformedDatasetError(
        f"{path}: IDX header declares {nd} dimensions, expected {ndim}; images and label "
        "files may have been swapped.")
  header = 4 + 4 * nd
  if len(data) < header:
    raise MalformedDatasetError(
        f"{path}: truncated IDX header ({len(data)} bytes, {header} needed for {nd} dims).")
  dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=nd, offset=4))
  expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  if len(data) - header != expected:
    raise MalformedDatasetError(
        f"{path}: IDX header declares dims {dims} ({expected} payload bytes) but the file has "
        f"{len(data) - header} payload bytes; the file is truncated or corrupt.")
  arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
  return arr.astype(dtype.newbyteorder("="), copy=True)


def check_labels(path: str | os.PathLike[str], labels: np.ndarray, num_classes: int,
                 *, low: int = 0) -> None:
  """Raises :class:`MalformedDatasetError` if labels leave ``[low, low + num_classes)``."""
  if labels.size == 0:
    raise MalformedDatasetError(f"{path}: contains no examples.")
  lo, hi = int(labels.min()), int(labels.max())
  if lo < low or hi >= low + num_classes:
    raise MalformedDatasetError(
        f"{path}: labels range over [{lo}, {hi}] but must lie in "
        f"[{low}, {low + num_classes - 1}] for {num_classes} classes; the file is corrupt "
        "or belongs to another dataset.")


def check_counts(images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str],
                 n_images: int, n_labels: int) -> None:
  """Raises :class:`MalformedDatasetError` if an image file and its label file disagree."""
  if n_images != n_labels:
    raise MalformedDatasetError(
        f"{images_path} holds {n_images} images but {labels_path} holds {n_labels} labels; "
        "one of the two files is truncated or they come from different releases.")


def read_idx_pair(images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str],
                  num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """Reads matching IDX image and label files.

  Args:
    images_path: IDX file of ``uint8`` images, ``(n, H, W)``.
    labels_path: IDX file of ``uint8`` labels, ``(n,)``.
    num_classes: Labels must lie in ``[0, num_classes)``.

  Returns:
    ``(images, labels)``: ``uint8`` images ``(n, H, W, 1)`` and ``int32`` labels ``(n,)``.

  Raises:
    MalformedDatasetError: if either file is malformed, the counts differ or a label is out
      of range.
  """
  images = read_idx(images_path, ndim=3)
  labels = read_idx(labels_path, ndim=1)
  for path, arr in ((images_path, images), (labels_path, labels)):
    if arr.dtype != np.uint8:
      raise MalformedDatasetError(
          f"{path}: IDX type is {arr.dtype}, expected unsigned bytes (type code 0x08).")
  check_counts(images_path, labels_path, images.shape[0], labels.shape[0])
  check_labels(labels_path, labels, num_classes)
  return images[..., None], labels.astype(np.int32)


def read_cifar_binary(paths: Sequence[str | os.PathLike[str]], *, label_bytes: int,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Reads and concatenates files of the CIFAR *binary* release.

  Each record is ``label_bytes`` label bytes followed by 3,072 pixel bytes (1,024 red, then
  green, then blue, each row-major 32x32). CIFAR-10 has one label byte; CIFAR-100 has two
  (coarse, fine) and the last one, the fine label, is returned.

  Args:
    paths: The files to read, in order.
    label_bytes: 1 for CIFAR-10, 2 for CIFAR-100.
    num_classes: Range of the returned labels (10 or 100).

  Returns:
    ``(images, labels)``: ``uint8`` images ``(n, 32, 32, 3)`` and ``int32`` labels ``(n,)``.

  Raises:
    MalformedDatasetError: if a file is empty, its length is not a multiple of the record
      size, or a label is out of range.
  """
  record = label_bytes + CIFAR_IMAGE_BYTES
  images, labels = [], []
  for path in paths:
    data = read_bytes(path)
    if len(data) == 0 or len(data) % record:
      raise MalformedDatasetError(
          f"{path}: {len(data)} bytes is not a positive multiple of the {record}-byte record "
          f"({label_bytes} label byte(s) + {CIFAR_IMAGE_BYTES} pixels); the file is truncated "
          "or is not from the CIFAR binary release (the 'python' and 'matlab' versions are "
          "not supported).")
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    if label_bytes == 2:
      check_labels(path, rec[:, 0], 20)  # coarse labels
    lab = rec[:, label_bytes - 1].astype(np.int32)
    check_labels(path, lab, num_classes)
    images.append(rec[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(lab)
  return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def read_svhn_mat(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
  """Reads an SVHN "format 2" (cropped 32x32 digits) MATLAB file.

  The file holds ``X`` of shape ``(32, 32, 3, n)`` and ``y`` of shape ``(n, 1)`` with labels
  1..10, where 10 stands for the digit 0.

  Args:
    path: ``train_32x32.mat`` or ``test_32x32.mat``.

  Returns:
    ``(images, labels)``: ``uint8`` images ``(n, 32, 32, 3)`` and ``int32`` digit labels
    ``(n,)`` in ``0..9``.

  Raises:
    MalformedDatasetError: if the file cannot be parsed, lacks ``X`` or ``y``, has the wrong
      shapes, or holds labels outside 1..10.
  """
  import scipy.io  # pylint: disable=g-import-not-at-top

  try:
    mat = scipy.io.loadmat(path)
  except NotImplementedError as e:  # MATLAB v7.3 (HDF5) files
    raise MalformedDatasetError(
        f"{path}: MATLAB v7.3 (HDF5) files are not supported; use the official SVHN format 2 "
        "files, which are saved in the older format.") from e
  except Exception as e:  # scipy raises many types on truncated or non-MAT input.
    raise MalformedDatasetError(
        f"{path}: cannot be read as a MATLAB file ({type(e).__name__}: {e}); it is truncated "
        "or corrupt.") from e
  if "X" not in mat or "y" not in mat:
    found = sorted(k for k in mat if not k.startswith("__"))
    raise MalformedDatasetError(f"{path}: expected variables 'X' and 'y', found {found}.")
  x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
  if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
    raise MalformedDatasetError(
        f"{path}: 'X' has shape {x.shape}, expected (32, 32, 3, n) as in SVHN format 2.")
  if x.dtype != np.uint8:
    if np.issubdtype(x.dtype, np.number) and x.size and (x.min() < 0 or x.max() > 255):
      raise MalformedDatasetError(f"{path}: pixel values outside [0, 255] in 'X'.")
    x = x.astype(np.uint8)
  y = y.reshape(-1)
  if x.shape[3] != y.shape[0]:
    raise MalformedDatasetError(
        f"{path}: 'X' holds {x.shape[3]} images but 'y' holds {y.shape[0]} labels; the file "
        "is corrupt.")
  check_labels(path, y, 10, low=1)
  labels = (y.astype(np.int32) % 10).astype(np.int32)
  return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), labels
