"""Tests for the bundled Fashion-MNIST subset, `"fashion_mnist_small"`."""

import os
import socket

import numpy as np
import pytest

import keras_snapshot
from keras_snapshot.app import datasets
from keras_snapshot.app.datasets import load_dataset

BUNDLED = os.path.join(
    os.path.dirname(keras_snapshot.__file__), "data", "fashion_mnist_small.npz"
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("fashion_mnist_small must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_loads_offline_with_shapes_dtypes_and_balanced_classes(no_network):
    data = load_dataset("fashion_mnist_small", validation_fraction=0.1)
    assert data.name == "fashion_mnist_small"
    assert data.num_classes == 10 and data.input_shape == (28, 28, 1)
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (
        900,
        100,
        5000,
    )
    for x, y in [
        (data.x_train, data.y_train),
        (data.x_val, data.y_val),
        (data.x_test, data.y_test),
    ]:
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.shape == (len(y), 28, 28, 1)
        assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    # 100 training and 500 test images of each class, and the stratified
    # validation split keeps the balance: 90 + 10 per class.
    assert np.bincount(data.y_test, minlength=10).tolist() == [500] * 10
    assert np.bincount(data.y_train, minlength=10).tolist() == [90] * 10
    assert np.bincount(data.y_val, minlength=10).tolist() == [10] * 10


def test_file_is_small_uint8_and_matches_the_debian_originals():
    assert os.path.getsize(BUNDLED) < 4 * 2**20
    with np.load(BUNDLED) as f:
        arrays = dict(f)
    for split in ("train", "test"):
        assert arrays[f"x_{split}"].dtype == np.uint8
        assert arrays[f"y_{split}"].dtype == np.uint8
        index = arrays[f"index_{split}"]
        assert len(np.unique(index)) == len(index) == len(arrays[f"y_{split}"])
    assert len(arrays["y_train"]) == 1000 and len(arrays["y_test"]) == 5000
    if not os.path.isdir(datasets.FASHION_MNIST_DIR):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    full = load_dataset("fashion_mnist_local", validation_fraction=0)
    for split in ("train", "test"):
        index = arrays[f"index_{split}"]
        x_full = getattr(full, f"x_{split}")[index, ..., 0]
        np.testing.assert_array_equal(
            arrays[f"x_{split}"], np.round(x_full * 255).astype(np.uint8)
        )
        np.testing.assert_array_equal(
            arrays[f"y_{split}"], getattr(full, f"y_{split}")[index]
        )


def test_data_dir_reads_another_subset_file(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
        "y_train": np.repeat(np.arange(10, dtype=np.uint8), 4),
        "x_test": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "y_test": np.repeat(np.arange(10, dtype=np.uint8), 2),
    }
    np.savez(tmp_path / "fashion_mnist_small.npz", **arrays)
    data = load_dataset(
        "fashion_mnist_small", data_dir=tmp_path, validation_fraction=0.25
    )
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (
        30,
        10,
        20,
    )
    np.testing.assert_allclose(
        data.x_test[..., 0], arrays["x_test"] / np.float32(255)
    )


def test_missing_file_names_its_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="fashion_mnist_small.npz"):
        load_dataset("fashion_mnist_small", data_dir=tmp_path)
