"""Tests for `keras_snapshot.app.datasets`."""

import gzip
import os
import socket
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from keras_snapshot.app import datasets
from keras_snapshot.app.datasets import load_dataset
from keras_snapshot.app.datasets import make_dataset


def _rows(*arrays):
    """Multiset of images (as bytes) in `arrays`."""
    rows = np.concatenate([a.reshape(len(a), -1) for a in arrays])
    values, counts = np.unique(rows, axis=0, return_counts=True)
    return {v.tobytes(): c for v, c in zip(values, counts, strict=True)}


def _check_dataset(data, input_shape, num_classes):
    for x, y in [
        (data.x_train, data.y_train),
        (data.x_val, data.y_val),
        (data.x_test, data.y_test),
    ]:
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.shape == (len(y), *input_shape)
        assert x.min() >= 0 and x.max() <= 1
        assert y.min() >= 0 and y.max() < num_classes
    assert data.input_shape == input_shape
    assert data.num_classes == num_classes


def test_digits_shapes_and_ranges():
    data = load_dataset()
    assert data.name == "digits"
    _check_dataset(data, (8, 8, 1), 10)
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (
        1132,
        126,
        539,
    )
    assert data.x_train.max() == 1.0
    for y in (data.y_train, data.y_val, data.y_test):
        assert set(np.unique(y)) == set(range(10))  # stratified


def test_digits_splits_partition_the_data():
    data = load_dataset("digits", validation_fraction=0.2, seed=3)
    original = load_digits()
    images = (original.images / 16.0).astype(np.float32)[..., None]
    assert _rows(data.x_train, data.x_val, data.x_test) == _rows(images)
    labels = np.concatenate([data.y_train, data.y_val, data.y_test])
    np.testing.assert_array_equal(
        np.bincount(labels), np.bincount(original.target)
    )
    assert len(data.x_val) == round(0.2 * (len(data.x_train) + len(data.x_val)))


def test_digits_is_deterministic_and_test_split_fixed():
    a = load_dataset("digits", seed=1)
    b = load_dataset("digits", seed=1)
    c = load_dataset("digits", seed=2)
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(a.x_test, c.x_test)
    assert not np.array_equal(a.x_val, c.x_val)
    assert _rows(a.x_train, a.x_val) == _rows(c.x_train, c.x_val)


def test_zero_validation_fraction():
    data = load_dataset("digits", validation_fraction=0)
    assert data.x_val.shape == (0, 8, 8, 1) and data.y_val.shape == (0,)
    assert len(data.x_train) == 1258


@pytest.mark.parametrize("fraction", [-0.1, 1, 1.5, "0.1", True, None])
def test_bad_validation_fraction(fraction):
    with pytest.raises(ValueError, match="Received: validation_fraction="):
        load_dataset("digits", validation_fraction=fraction)


class TinyRgb(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A 32x32 RGB dataset with supervised keys and no "test" split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(30, 0),
            "validation": self._generate_examples(9, 1),
        }

    def _generate_examples(self, count, seed):
        rng = np.random.default_rng(seed)
        for i in range(count):
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            yield i, {"image": image, "label": i % 3}


def test_tfds_prepared_dummy_mnist_loads(tmp_path):
    # The real preparation path, offline: it needs tensorflow-datasets'
    # `importlib_resources` dependency (setup.py).
    tfds.testing.DummyMnist(data_dir=tmp_path).download_and_prepare()
    data = load_dataset("dummy_mnist", data_dir=tmp_path, seed=0)
    assert data.name == "dummy_mnist"
    _check_dataset(data, (28, 28, 1), 10)
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (18, 2, 20)
    np.testing.assert_allclose(data.x_test, 1 / 255)  # uint8 1, scaled
    np.testing.assert_array_equal(np.bincount(data.y_test), [2] * 10)


@pytest.mark.slow
def test_tfds_supervised_keys_and_validation_as_test(tmp_path):
    TinyRgb(data_dir=tmp_path).download_and_prepare()
    data = load_dataset("tiny_rgb", data_dir=tmp_path, validation_fraction=0.2)
    _check_dataset(data, (32, 32, 3), 3)
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (24, 6, 9)
    np.testing.assert_array_equal(np.bincount(data.y_val), [2, 2, 2])
    assert data.x_train.max() > 0.5  # scaled from uint8, not left at 0-255
    whole = load_dataset("tiny_rgb", data_dir=tmp_path, validation_fraction=0)
    assert (len(whole.x_train), len(whole.x_val)) == (30, 0)


def _assert_one_line_with_hint(error, name):
    message = str(error.value)
    assert "\n" not in message
    assert f"{name!r} is not downloaded in" in message
    assert "--data-dir" in message


def test_tfds_not_downloaded_without_download(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    _assert_one_line_with_hint(error, "mnist")
    assert list(tmp_path.iterdir()) == []


def _refusing_proxy(monkeypatch):
    """Routes HTTP(S) through a local port that refuses: no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{port}")


def test_tfds_unreachable_server_fails_in_one_line(tmp_path, monkeypatch):
    # Without the check, tensorflow-datasets retries for minutes and ends
    # in a ConnectionError.
    _refusing_proxy(monkeypatch)
    with pytest.raises(FileNotFoundError, match="cannot be reached") as error:
        load_dataset("mnist", data_dir=tmp_path)
    _assert_one_line_with_hint(error, "mnist")
    assert "storage.googleapis.com" in str(error.value)


def test_cli_says_dataset_is_missing_in_one_line(tmp_path, monkeypatch, capsys):
    from keras_snapshot.app import cli

    _refusing_proxy(monkeypatch)
    argv = ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path)]
    assert cli.main(argv + ["--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keras-snapshot train: error: The tensorflow-")
    assert "\n" not in err and "--data-dir" in err
    assert not (tmp_path / "run").exists()


def test_unknown_name_lists_embedded_names():
    with (
        tfds.testing.mock_data(num_examples=20),
        pytest.raises(ValueError, match="no_such_dataset") as error,
    ):
        load_dataset("no_such_dataset")
    for name in datasets.EMBEDDED_DATASETS:
        assert name in str(error.value)
    assert "tensorflow-datasets image-classification" in str(error.value)


def test_tfds_non_image_dataset_is_rejected():
    with (
        tfds.testing.mock_data(num_examples=20),
        pytest.raises(ValueError, match="not an image classification"),
    ):
        load_dataset("imdb_reviews")


@pytest.mark.skipif(
    not os.path.isdir(datasets.FASHION_MNIST_DIR),
    reason="needs `apt-get install dataset-fashion-mnist`",
)
def test_fashion_mnist_local():
    data = load_dataset("fashion_mnist_local", validation_fraction=0.1)
    _check_dataset(data, (28, 28, 1), 10)
    assert len(data.x_train) + len(data.x_val) == 60000
    assert (len(data.x_val), len(data.x_test)) == (6000, 10000)
    np.testing.assert_array_equal(np.bincount(data.y_val), [600] * 10)
    np.testing.assert_array_equal(np.bincount(data.y_test), [1000] * 10)


def _write_idx(path, array, magic):
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_fashion(folder, magic=2051):
    rng = np.random.default_rng(0)
    files = datasets._FASHION_FILES
    _write_idx(
        folder / files["x_train"], rng.integers(0, 256, (40, 4, 4)), magic
    )
    _write_idx(folder / files["y_train"], np.arange(40) % 10, 2049)
    _write_idx(folder / files["x_test"], np.full((10, 4, 4), 255), magic)
    _write_idx(folder / files["y_test"], np.arange(10), 2049)


def test_fashion_mnist_reader_on_small_files(tmp_path):
    _write_fashion(tmp_path)
    data = load_dataset("fashion_mnist_local", data_dir=tmp_path)
    _check_dataset(data, (4, 4, 1), 10)
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (36, 4, 10)
    np.testing.assert_array_equal(data.x_test, 1.0)


def test_fashion_mnist_bad_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        load_dataset("fashion_mnist_local", data_dir=tmp_path / "nowhere")
    _write_fashion(tmp_path, magic=1234)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*1234"):
        load_dataset("fashion_mnist_local", data_dir=tmp_path)


def _images(n=16, shape=(8, 8, 3)):
    rng = np.random.default_rng(0)
    return rng.uniform(0.1, 1, size=(n, *shape)).astype(np.float32)


def test_make_dataset_batches_in_order():
    x, y = _images(10), np.arange(10)
    batches = list(make_dataset(x, y, batch_size=4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)


def _epoch(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def test_make_dataset_shuffle_is_seeded_and_reshuffles():
    x, y = _images(32), np.arange(32)
    ds = make_dataset(x, y, batch_size=8, shuffle=True, seed=0)
    _, first = _epoch(ds)
    _, second = _epoch(ds)
    _, again = _epoch(make_dataset(x, y, batch_size=8, shuffle=True, seed=0))
    assert sorted(first) == list(range(32))
    assert not np.array_equal(first, np.arange(32))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, again)


def _is_crop_of_padded(image, original, pad=4):
    """Whether `image` is a (maybe flipped) crop of zero-padded `original`."""
    h, w, _ = original.shape
    padded = np.pad(original, ((pad, pad), (pad, pad), (0, 0)))
    for source in (padded, padded[:, ::-1]):
        for i in range(2 * pad + 1):
            for j in range(2 * pad + 1):
                if np.array_equal(source[i : i + h, j : j + w], image):
                    return True
    return False


def test_augment_is_crop_of_padded_image_and_flip():
    x, y = _images(16), np.arange(16)
    ds = make_dataset(x, y, batch_size=5, shuffle=True, augment=True, seed=1)
    images, labels = _epoch(ds)
    assert images.shape == x.shape and images.dtype == np.float32
    assert sorted(labels) == list(range(16))
    changed = 0
    for image, label in zip(images, labels, strict=True):
        assert _is_crop_of_padded(image, x[label])
        changed += not np.array_equal(image, x[label])
    assert changed > 0
    again, _ = _epoch(
        make_dataset(x, y, batch_size=5, shuffle=True, augment=True, seed=1)
    )
    np.testing.assert_array_equal(images, again)
    next_epoch, _ = _epoch(ds)
    assert not np.array_equal(images, next_epoch)


def test_augment_on_digits_shape():
    data = load_dataset("digits")
    ds = make_dataset(data.x_val, data.y_val, 32, augment=True, seed=0)
    images, labels = _epoch(ds)
    assert images.shape == data.x_val.shape
    np.testing.assert_array_equal(labels, data.y_val)


def test_make_dataset_bad_arguments():
    x, y = _images(4), np.arange(4)
    with pytest.raises(ValueError, match="Received: batch_size=0"):
        make_dataset(x, y, 0)
    with pytest.raises(ValueError, match=r"Received: batch_size=2\.5"):
        make_dataset(x, y, 2.5)
    with pytest.raises(ValueError, match=r"len\(x\)=4, len\(y\)=3"):
        make_dataset(x, y[:3], 2)
    with pytest.raises(ValueError, match="augment=True"):
        make_dataset(x.reshape(4, -1), y, 2, augment=True)


# A user's .npz file (`keras-snapshot train --data file.npz`) --------------


def _npz(tmp_path, **arrays):
    path = str(tmp_path / "data.npz")
    np.savez(path, **arrays)
    return path


def test_npz_with_x_and_y_holds_out_a_fixed_test_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 5, 4), dtype=np.uint8)
    y = np.arange(50) % 5
    path = _npz(tmp_path, x=x, y=y)
    data = datasets.open_dataset(path, validation_fraction=0.2, seed=3)
    assert data.name == path and data.num_classes == 5
    assert data.input_shape == (5, 4, 1)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (32, 8, 10)
    assert _rows(data.x_train, data.x_val, data.x_test) == _rows(
        x[..., None] / np.float32(255)
    )
    other = datasets.open_dataset(path, validation_fraction=0.2, seed=4)
    np.testing.assert_array_equal(other.x_test, data.x_test)
    assert not np.array_equal(other.x_val, data.x_val)


def test_npz_with_four_arrays_keeps_its_test_split(tmp_path):
    x = np.random.default_rng(0).random((20, 3, 3, 2)).astype(np.float64)
    y = np.arange(20) % 2
    path = _npz(
        tmp_path, x_train=x, y_train=y[:, None], x_test=x[:6], y_test=y[:6]
    )
    data = datasets.open_dataset(path, validation_fraction=0)
    np.testing.assert_allclose(data.x_test, x[:6])
    np.testing.assert_array_equal(data.y_train, y)
    assert data.input_shape == (3, 3, 2) and data.x_train.dtype == np.float32


@pytest.mark.parametrize(
    "arrays, message",
    [
        (
            {"images": np.zeros((4, 2, 2))},
            r"must hold arrays `x` and `y`.*\['images'\]",
        ),
        (
            {"x": np.zeros((4, 2, 2)), "y": np.zeros(3)},
            r"one class index per image, shape \(4,\)",
        ),
        ({"x": np.zeros((4, 2, 2)), "y": np.eye(4)}, "one-hot"),
        (
            {"x": np.zeros((4, 2, 2)), "y": [0, 1, -1, 1]},
            "class indices 0, 1, 2",
        ),
        ({"x": np.zeros((4, 2, 2)), "y": [0.5, 1, 0, 1]}, "class indices"),
        (
            {"x": np.zeros((4, 2, 2), np.int32), "y": [0, 1, 0, 1]},
            "uint8 .0-255. or float",
        ),
        ({"x": np.zeros((10, 2, 2)), "y": np.zeros(10, int)}, "hold one class"),
        (
            {
                "x_train": np.zeros((4, 2, 2)),
                "y_train": [0, 1, 0, 1],
                "x_test": np.zeros((2, 2, 2)),
                "y_test": [0, 2],
            },
            "test labels .* go up to 2, but the training labels only to 1",
        ),
        (
            {
                "x_train": np.zeros((4, 2, 2)),
                "y_train": [0, 1, 0, 1],
                "x_test": np.zeros((2, 3, 2)),
                "y_test": [0, 1],
            },
            "must be the same shape",
        ),
    ],
    ids=[
        "keys",
        "length",
        "one-hot",
        "negative",
        "fraction",
        "int-images",
        "one-class",
        "test-label-out-of-range",
        "test-shape",
    ],
)
def test_bad_npz_is_refused_in_one_line(tmp_path, arrays, message):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(ValueError, match=message) as error:
        datasets.open_dataset(path)
    assert "\n" not in str(error.value) and path in str(error.value)


def test_paths_that_are_not_data_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="is a file, .* an .npz"):
        datasets.open_dataset(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError, match="No file or folder at"):
        datasets.open_dataset(str(tmp_path / "missing.npz"))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        datasets.open_dataset(str(tmp_path / "broken.npz"))
    with pytest.raises(ValueError, match="apply to a folder of images"):
        datasets.open_dataset("digits", image_size=(8, 8))


# tensorflow-datasets, streamed ----------------------------------------------


def test_tfds_streams_the_same_splits_as_the_records(tmp_path):
    TinyRgb(data_dir=tmp_path).download_and_prepare()
    data = datasets.open_dataset(
        "tiny_rgb", data_dir=tmp_path, validation_fraction=0.2
    )
    assert isinstance(data, datasets.StreamedDataset)
    builder = tfds.builder("tiny_rgb", data_dir=tmp_path)
    records = list(
        tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False))
    )
    images = np.stack([r["image"] for r in records]) / np.float32(255)
    labels = np.array([r["label"] for r in records])
    keep, held = datasets._split(labels, 0.2, 0)
    for split, indices in (("train", keep), ("val", held)):
        x, y = data.arrays(split)
        np.testing.assert_array_equal(y, labels[indices])
        np.testing.assert_allclose(x, images[indices])
    assert data.count("test") == 9
    # A shuffled epoch holds each training record once, in a seeded order.
    batches = data.batches("train", 5, shuffle=True, seed=0)
    assert int(batches.cardinality()) == 5  # 24 records, known to Keras
    order = np.concatenate([y for _, y in batches.as_numpy_iterator()])
    assert sorted(order) == sorted(labels[keep])
