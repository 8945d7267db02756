"""Datasets for the Path-SGD experiments, loaded into numpy without any download.

``load("mnist5k")`` and ``load("digits")`` work offline out of the box; Fashion-MNIST is
found where Debian's ``dataset-fashion-mnist`` package installs it; MNIST, CIFAR-10/100 and
SVHN are read from the official files a user provides (IDX, CIFAR *binary* batches, SVHN
``.mat``). Nothing is ever unpickled.
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
