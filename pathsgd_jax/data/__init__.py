"""Datasets for the Path-SGD experiments, loaded into numpy without any download.

``load("mnist5k")`` and ``load("digits")`` work offline out of the box; Fashion-MNIST is
found where Debian's ``dataset-fashion-mnist`` package installs it; MNIST, CIFAR-10/100 and
SVHN are read from the official files a user provides (IDX, CIFAR *binary* batches, SVHN
``.mat``). Nothing is ever unpickled.

Examples:
  >>> import pathsgd_jax as psgd
  >>> ds = psgd.data.load("mnist5k")
  >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
  ((4000, 28, 28, 1), (1000, 28, 28, 1), 10)
  >>> x, y = next(psgd.data.batches(ds.x_train, ds.y_train, 100, seed=0))
  >>> x.shape, y.shape
  ((100, 28, 28, 1), (100,))
"""

from pathsgd_jax.data.batching import batches, num_batches
from pathsgd_jax.data.dataset import Dataset, Split
from pathsgd_jax.data.errors import DatasetNotFoundError, MalformedDatasetError
from pathsgd_jax.data.formats import read_cifar_binary, read_idx, read_svhn_mat
from pathsgd_jax.data.loaders import DATASETS, load
from pathsgd_jax.data.locate import DATA_DIR_ENV

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "Dataset",
    "DatasetNotFoundError",
    "MalformedDatasetError",
    "Split",
    "batches",
    "load",
    "num_batches",
    "read_cifar_binary",
    "read_idx",
    "read_svhn_mat",
]
