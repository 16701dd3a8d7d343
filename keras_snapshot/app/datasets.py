"""Image-classification data: train, validation and test splits.

Opens an image folder, an `.npz`, the bundled datasets or a
tensorflow-datasets dataset, and makes `tf.data` pipelines with the
augmentation of Huang et al. 2017 (arXiv:1704.00109). Validation is
always carved from training data, never from test. A `Dataset` holds
arrays in memory; a `StreamedDataset` decodes images batch by batch.
"""

import dataclasses
import gzip
import hashlib
import os
import struct

import numpy as np
import tensorflow as tf

from keras_snapshot import example_data
from keras_snapshot._checks import check_positive_int

__all__ = [
    "EMBEDDED_DATASETS",
    "FASHION_MNIST_DIR",
    "Dataset",
    "StreamedDataset",
    "fingerprint_changes",
    "load_dataset",
    "make_dataset",
    "open_dataset",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's `dataset-fashion-mnist` package puts the IDX files."""

EMBEDDED_DATASETS = ("digits", "fashion_mnist_local", "fashion_mnist_small")
"""Names `load_dataset` serves without tensorflow-datasets."""

_DIGITS_TEST_FRACTION = 0.3
_TEST_SEED = 0
"""Seed of every held-out test split: the same test images whatever `seed`."""
_SHUFFLE_BUFFER = 10000
"""Most elements a streamed tensorflow-datasets split shuffles at once."""
SPLITS = ("train", "val", "test")
_PROBE_TIMEOUT = 10.0
"""Seconds to wait for a tensorflow-datasets download server to answer."""
_PAD = 4
_REINSTALL = "apt-get install --reinstall dataset-fashion-mnist"
_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


def _check_pixel_max(pixel_max) -> float:
    if isinstance(pixel_max, bool) or pixel_max not in (1, 255):
        raise ValueError(
            "`pixel_max` must be 1 (images in [0, 1]) or 255 (raw pixel "
            f"values). Received: pixel_max={pixel_max!r}"
        )
    return float(pixel_max)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(
            f"`split` must be one of {SPLITS}. Received: split={split!r}"
        )
    return split


class _Splits:
    """What a job asks of its data, in memory or streamed.

    A subclass provides `labels(split)`, and `_stream(split)`: the
    undecoded elements, their decode function (or None), a shuffle buffer.
    """

    @property
    def classes(self) -> tuple:
        """The class names, label i first: `class_names`, or "0", "1", ..."""
        names = tuple(self.class_names)
        return names or tuple(str(i) for i in range(self.num_classes))

    def with_pixel_max(self, pixel_max: float):
        """The same data, its images reaching the model in `[0, pixel_max]`.

        255 gives raw pixel values, for a model that scales its own input.
        """
        pixel_max = _check_pixel_max(pixel_max)
        return dataclasses.replace(self, pixel_max=pixel_max)

    def fingerprint(self) -> dict:
        """What identifies the data a run was trained on, for `run.json`.

        Split counts, a sha256 of the labels and, where known, of the
        images (`.npz`) or of the file list and file sizes/mtimes (folder).
        """
        digest = hashlib.sha256()
        for split in SPLITS:
            labels = np.asarray(self.labels(split), dtype="<i4")
            digest.update(f"{split}:{len(labels)}:".encode())
            digest.update(labels.tobytes())
        result = {
            "counts": {split: self.count(split) for split in SPLITS},
            "labels_sha256": digest.hexdigest(),
        }
        for key in ("files_sha256", "file_stats_sha256", "images_sha256"):
            value = getattr(self, key, None)
            if value is not None:
                result[key] = value
        return result

    def count(self, split: str) -> int:
        """Number of examples in `split` ("train", "val" or "test")."""
        return len(self.labels(split))

    def batches(
        self,
        split: str,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        seed: int | None = None,
    ) -> tf.data.Dataset:
        """`(images, labels)` batches of `split`, as `make_dataset` makes.

        Example:

        ```python
        train = data.batches("train", 64, shuffle=True, seed=0)
        ```
        """
        elements, decode, buffer = self._stream(_check_split(split))
        return _pipeline(
            elements,
            batch_size,
            shuffle,
            augment,
            seed,
            decode,
            buffer,
            self.pixel_max,
        )

    def inputs(
        self, split: str, batch_size: int, limit: int | None = None
    ) -> tf.data.Dataset:
        """Batches of the first `limit` images of `split`, in order."""
        elements, decode, _ = self._stream(_check_split(split))
        if limit is not None:
            elements = elements.take(limit)
        ds = _pipeline(
            elements, batch_size, decode=decode, scale=self.pixel_max
        )
        return ds.map(lambda x, y: x)

    def describe(self) -> str:
        """One line: the data's name, split sizes, image shape, classes."""
        height, width, channels = self.input_shape
        return (
            f"{self.name}, {self.count('train')} train / "
            f"{self.count('val')} validation / {self.count('test')} test "
            f"images of {height}x{width}x{channels}, {self.num_classes} "
            "classes"
        )

    def arrays(self, split: str) -> tuple:
        """`(x, y)` of `split` as numpy arrays: the whole split in memory."""
        xs = [x for x, _ in self.batches(split, 1024).as_numpy_iterator()]
        shape = (0, *self.input_shape)
        x = np.concatenate(xs) if xs else np.zeros(shape, np.float32)
        return x, self.labels(split)


@dataclasses.dataclass(frozen=True)
class Dataset(_Splits):
    """Train, validation and test arrays of one image-classification task.

    Images are float32 in `[0, 1]`, shaped `(N, height, width, channels)`;
    labels are int32 class indices in `[0, num_classes)`. The validation
    arrays are carved from the original training split. `batches`,
    `inputs` and `arrays` give the images in `[0, pixel_max]`.

    Attributes:
        x_train: Training images.
        y_train: Training labels.
        x_val: Validation images (may hold 0 images).
        y_val: Validation labels.
        x_test: Test images.
        y_test: Test labels.
        num_classes: Number of classes.
        input_shape: `(height, width, channels)` of one image.
        name: The name the data was loaded with.
        class_names: The name of each class, label i first; empty for
            "0", "1", ... (`classes`).
        pixel_max: 1, or 255 for raw pixel values (`with_pixel_max`).
        images_sha256: For an `.npz`, a sha256 of the images of each
            split (`fingerprint`), else None.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str
    class_names: tuple = ()
    pixel_max: float = 1.0
    images_sha256: str | None = None

    def labels(self, split: str) -> np.ndarray:
        """The int32 labels of `split` ("train", "val" or "test")."""
        return getattr(self, f"y_{_check_split(split)}")

    def _stream(self, split: str):
        x = getattr(self, f"x_{split}")
        elements = tf.data.Dataset.from_tensor_slices((x, self.labels(split)))
        return elements, None, max(len(x), 1)


@dataclasses.dataclass(frozen=True)
class StreamedDataset(_Splits):
    """Train, validation and test splits decoded batch by batch.

    Holds the labels of each split and, per split, how to stream it:
    memory does not grow with the number of images. Images are float32
    in `[0, pixel_max]`, labels int32, as in `Dataset`.

    Attributes:
        name: The folder's path, or the tensorflow-datasets name.
        num_classes: Number of classes.
        input_shape: `(height, width, channels)` of one image.
        split_labels: `{split: int32 labels}`.
        streams: `{split: () -> (elements, decode, shuffle_buffer)}`.
        class_names: The name of each class, label i first.
        files_sha256: For a folder of images, a sha256 of its sorted
            file list (`fingerprint`), else None.
        file_stats_sha256: For a folder of images, a sha256 of each
            file's size and modification time (`fingerprint`), else None.
        pixel_max: 1, or 255 for raw pixel values (`with_pixel_max`).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    split_labels: dict
    streams: dict
    class_names: tuple = ()
    files_sha256: str | None = None
    pixel_max: float = 1.0
    file_stats_sha256: str | None = None

    def labels(self, split: str) -> np.ndarray:
        """The int32 labels of `split` ("train", "val" or "test")."""
        return self.split_labels[_check_split(split)]

    def _stream(self, split: str):
        return self.streams[split]()


def _split(labels, fraction, seed):
    """Seeded split stratified by class: sorted indices `(keep, held_out)`.

    Holds out `round(fraction * len(labels))`; a plain random split where
    the data is too small to stratify.
    """
    from sklearn.model_selection import train_test_split

    indices = np.arange(labels.size)
    held_count = round(fraction * labels.size)
    if held_count == 0:
        return indices, indices[:0]
    _, sizes = np.unique(labels, return_counts=True)
    stratify = sizes.min() >= 2 and sizes.size <= min(
        held_count, labels.size - held_count
    )
    keep, held = train_test_split(
        indices,
        test_size=held_count,
        random_state=seed,
        stratify=labels if stratify else None,
    )
    return np.sort(keep), np.sort(held)


def _finish(
    name,
    x_train,
    y_train,
    x_test,
    y_test,
    num_classes,
    fraction,
    seed,
    class_names=(),
):
    """Carves validation from train, casts, and returns the `Dataset`."""
    keep, held = _split(y_train, fraction, seed)
    x_test = np.asarray(x_test, dtype=np.float32)
    y_test = np.asarray(y_test, dtype=np.int32)
    return Dataset(
        x_train=np.asarray(x_train[keep], dtype=np.float32),
        y_train=np.asarray(y_train[keep], dtype=np.int32),
        x_val=np.asarray(x_train[held], dtype=np.float32),
        y_val=np.asarray(y_train[held], dtype=np.int32),
        x_test=x_test,
        y_test=y_test,
        num_classes=int(num_classes),
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
        name=name,
        class_names=tuple(class_names),
    )


def _load_digits(fraction, seed):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0)[..., np.newaxis]
    labels = digits.target
    train, test = _split(labels, _DIGITS_TEST_FRACTION, _TEST_SEED)
    return _finish(
        "digits",
        images[train],
        labels[train],
        images[test],
        labels[test],
        10,
        fraction,
        seed,
    )


def _read_idx(path, magic, ndim):
    """Reads one gzipped IDX file of unsigned bytes as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = 4 + 4 * ndim
    found = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
    if found != magic:
        raise ValueError(
            f"{path!r} is not an IDX file: reinstall it with `{_REINSTALL}`. "
            f"Received: magic number {found}, expected {magic}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    array = np.frombuffer(data, dtype=np.uint8, offset=header)
    if array.size != int(np.prod(shape)):
        raise ValueError(
            f"{path!r} is truncated: reinstall it with `{_REINSTALL}`. "
            f"Received: {array.size} bytes for shape {shape}"
        )
    return array.reshape(shape)


def _finish_fashion(name, arrays, fraction, seed):
    """The `Dataset` of Fashion-MNIST uint8 arrays, scaled to [0, 1]."""
    return _finish(
        name,
        arrays["x_train"][..., np.newaxis] / np.float32(255),
        arrays["y_train"],
        arrays["x_test"][..., np.newaxis] / np.float32(255),
        arrays["y_test"],
        10,
        fraction,
        seed,
        example_data.CLASS_NAMES,
    )


def _load_fashion_mnist(data_dir, fraction, seed):
    folder = data_dir if data_dir is not None else FASHION_MNIST_DIR
    paths = {k: os.path.join(folder, f) for k, f in _FASHION_FILES.items()}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            "Fashion-MNIST files not found: `apt-get install "
            f"dataset-fashion-mnist` puts them in {FASHION_MNIST_DIR}, or "
            f"pass `data_dir=` their folder. Received: missing {missing}"
        )
    arrays = {
        k: _read_idx(p, 2051, 3) if k.startswith("x") else _read_idx(p, 2049, 1)
        for k, p in paths.items()
    }
    return _finish_fashion("fashion_mnist_local", arrays, fraction, seed)


def _load_fashion_mnist_small(data_dir, fraction, seed):
    """The bundled class-balanced Fashion-MNIST subset (or `data_dir`'s)."""
    folder = data_dir
    if folder is None:
        folder = os.path.dirname(example_data.FASHION_MNIST_SMALL)
    path = os.path.join(folder, "fashion_mnist_small.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            "fashion_mnist_small.npz is missing: reinstall keras-snapshot, or "
            "make it with `python benchmarks/make_fashion_subset.py --out "
            f"PATH` and pass its folder as `data_dir`. Received: {path!r}"
        )
    with np.load(path) as f:
        arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    return _finish_fashion("fashion_mnist_small", arrays, fraction, seed)


def _image_label_keys(tfds, info, name):
    """The `(image, label)` feature names of an image-classification dataset.

    Its supervised keys, or else its only `Image` and `ClassLabel` features.
    """
    features = info.features
    image_type, label_type = tfds.features.Image, tfds.features.ClassLabel
    names = (
        list(features.keys())
        if isinstance(features, tfds.features.FeaturesDict)
        else []
    )

    keys = info.supervised_keys
    if not keys:
        images = [k for k in names if isinstance(features[k], image_type)]
        labels = [k for k in names if isinstance(features[k], label_type)]
        if len(images) == 1 and len(labels) == 1:
            keys = (images[0], labels[0])
    if not (
        isinstance(keys, (tuple, list))
        and len(keys) == 2
        and all(isinstance(k, str) and k in names for k in keys)
        and isinstance(features[keys[0]], image_type)
        and isinstance(features[keys[1]], label_type)
    ):
        raise ValueError(
            f"The tensorflow-datasets dataset {name!r} is not an image "
            "classification dataset: pick one of images and class labels. "
            f"Received: name={name!r}, supervised keys {info.supervised_keys}"
        )
    if None in features[keys[0]].shape:
        raise ValueError(
            f"The images of {name!r} vary in size: pick a dataset of "
            f"fixed-size images. Received: name={name!r}, image shape "
            f"{features[keys[0]].shape}"
        )
    return tuple(keys)


def _unreachable_server(urls, timeout=_PROBE_TIMEOUT):
    """`(host, reason)` of the first server of `urls` that does not answer.

    One HEAD request per host, no retries; any HTTP answer, even an error,
    counts as reachable. None when every server answers.
    """
    import urllib.error
    import urllib.parse
    import urllib.request

    hosts = set()
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.netloc in hosts:
            continue
        hosts.add(parts.netloc)
        request = urllib.request.Request(url, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # The server answered.
        except OSError as e:  # URLError, timeouts, refused connections.
            return parts.netloc, getattr(e, "reason", e)
    return None


def _prepare_tfds(builder, name, download):
    """Downloads and prepares `builder` unless it is prepared already.

    Fails at once, not after tensorflow-datasets' minutes of retries.
    """
    if builder.is_prepared():
        return
    hint = (
        "Download it where there is network (`tfds.builder("
        f"'{name}').download_and_prepare()`) and pass the folder holding "
        f"its `{name}/` with `--data-dir` (`data_dir=` in Python)."
    )
    where = f"{name!r} is not downloaded in {builder.data_dir}"
    if not download:
        raise FileNotFoundError(
            f"The tensorflow-datasets dataset {where} and download=False. "
            f"{hint}"
        )
    unreachable = _unreachable_server(builder.url_infos or {})
    if unreachable is not None:
        host, reason = unreachable
        raise FileNotFoundError(
            f"The tensorflow-datasets dataset {where} and its download "
            f"server {host} cannot be reached ({reason}). {hint}"
        )
    builder.download_and_prepare()


def _import_tfds(name):
    """tensorflow_datasets, or a one-line ImportError naming the dataset.

    The command suggested pins the installed TensorFlow: tensorflow-datasets
    pulls a protobuf that pip would otherwise upgrade under TensorFlow 2.18.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        command = (
            "pip install tensorflow-datasets importlib_resources "
            '"tensorflow-metadata<1.21"'
        )
        extra = "tensorflow"
        try:
            import importlib.metadata as metadata
            import re

            (dist,) = metadata.packages_distributions()["tensorflow"]
            version = metadata.version(dist)
            dist = re.sub(r"[-_.]+", "-", dist).lower()
            command += f' "{dist}=={version}"'
            extra = dist if dist in ("tensorflow", "tensorflow-cpu") else None
        except Exception:  # No TensorFlow, or several: name none.
            pass
        checkout = f' (or, in a checkout, `pip install -e ".[{extra}]"`)'
        raise ImportError(
            f"The dataset {name!r} needs tensorflow-datasets: install it "
            f"with `{command}`{checkout if extra else ''}. "
            f"Received: name={name!r}."
        ) from None
    return tfds


def _tfds_builder(name, data_dir):
    tfds = _import_tfds(name)

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset: use one of {list(EMBEDDED_DATASETS)}, an "
            "image folder or .npz path, or a tensorflow-datasets "
            'image-classification dataset (e.g. "mnist", "cifar10"). '
            f"Received: name={name!r}"
        ) from None


def _open_tfds(name, data_dir, fraction, seed, download):
    """A tensorflow-datasets dataset, streamed from its prepared files.

    Labels are read once, images decoded batch by batch; validation is
    carved from "train" by record index, as for arrays.
    """
    tfds = _import_tfds(name)
    builder = _tfds_builder(name, data_dir)
    keys = _image_label_keys(tfds, builder.info, name)
    _prepare_tfds(builder, name, download)
    splits = set(builder.info.splits.keys())
    test_split = "test"
    if splits and "test" not in splits:
        if "validation" not in splits:
            raise ValueError(
                f"The dataset {name!r} has no 'test' or 'validation' split: "
                f"pick another. Received: splits {sorted(splits)}"
            )
        test_split = "validation"
    image_feature = builder.info.features[keys[0]]

    def records(split):
        ds = builder.as_dataset(
            split=split,
            shuffle_files=False,
            decoders={keys[0]: tfds.decode.SkipDecoding()},
        )
        return ds.map(lambda e: (e[keys[0]], tf.cast(e[keys[1]], tf.int32)))

    def labels_of(split):
        batches = records(split).map(lambda x, y: y).batch(4096)
        found = [b for b in batches.as_numpy_iterator()]
        return np.concatenate(found) if found else np.zeros(0, np.int32)

    def decode(encoded, label):
        image = image_feature.decode_example(encoded)
        return tf.cast(image, tf.float32) / 255.0, label

    train_labels = labels_of("train")
    keep, held = _split(train_labels, fraction, seed)

    def stream(split, indices):
        count = len(indices)
        take = np.zeros(len(train_labels), dtype=bool)
        take[indices] = True

        def make():
            chosen = tf.constant(take)
            ds = records("train").enumerate()
            ds = ds.filter(lambda i, xy: chosen[i]).map(lambda i, xy: xy)
            ds = ds.apply(tf.data.experimental.assert_cardinality(count))
            return ds, decode, max(1, min(count, _SHUFFLE_BUFFER))

        return make

    test_labels = labels_of(test_split)

    def test_stream():
        return (
            records(test_split),
            decode,
            max(1, min(len(test_labels), _SHUFFLE_BUFFER)),
        )

    label_feature = builder.info.features[keys[1]]
    return StreamedDataset(
        name=name,
        num_classes=int(label_feature.num_classes),
        class_names=tuple(label_feature.names),
        input_shape=tuple(int(d) for d in image_feature.shape),
        split_labels={
            "train": train_labels[keep],
            "val": train_labels[held],
            "test": test_labels,
        },
        streams={
            "train": stream("train", keep),
            "val": stream("val", held),
            "test": test_stream,
        },
    )


def _in_memory(data) -> Dataset:
    """The `Dataset` of arrays holding every split of `data`."""
    arrays = {split: data.arrays(split) for split in SPLITS}
    return Dataset(
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_val=arrays["val"][0],
        y_val=arrays["val"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        name=data.name,
        class_names=data.class_names,
        pixel_max=data.pixel_max,
    )


def _open_image_folder(
    folder, fraction, seed, test_fraction, image_size, channels
):
    """A folder of images in class subfolders, streamed from its files."""
    from keras_snapshot.app import image_folder

    listed = image_folder.list_image_folder(folder)
    all_paths = np.concatenate(
        [
            p
            for p in (listed.paths, listed.val_paths, listed.test_paths)
            if p is not None
        ]
    )
    shapes = image_folder.scan_images(all_paths)
    size, channels = image_folder.image_format(
        all_paths, shapes, image_size, channels
    )
    read = image_folder.image_reader(size, channels, image_size is not None)
    paths, labels = listed.paths, listed.labels
    if listed.test_paths is None:
        if not 0 < test_fraction < 1:
            raise ValueError(
                f"{folder} has no test/ folder, so `test_fraction` must be "
                f"in (0, 1). Received: test_fraction={test_fraction!r}"
            )
        pool, test = _split(labels, test_fraction, _TEST_SEED)
        test_paths, test_labels = paths[test], labels[test]
        paths, labels = paths[pool], labels[pool]
    else:
        test_paths, test_labels = listed.test_paths, listed.test_labels
    if listed.val_paths is None:
        keep, held = _split(labels, fraction, seed)
        chosen = {
            "train": (paths[keep], labels[keep]),
            "val": (paths[held], labels[held]),
        }
    else:
        chosen = {
            "train": (paths, labels),
            "val": (listed.val_paths, listed.val_labels),
        }
    chosen["test"] = (test_paths, test_labels)
    _check_counts(
        folder,
        {split: len(y) for split, (_, y) in chosen.items()},
        held_out_test=listed.test_paths is None,
        held_out_val=listed.val_paths is None,
        fraction=fraction,
        test_fraction=test_fraction,
    )

    def stream(split):
        files, split_labels = chosen[split]

        def make():
            elements = tf.data.Dataset.from_tensor_slices(
                (files.astype(str), split_labels)
            )
            return elements, read, max(len(files), 1)

        return make

    names = sorted(os.path.relpath(p, folder) for p in all_paths)
    stats = hashlib.sha256()
    for name in names:
        info = os.stat(os.path.join(folder, name))
        stats.update(f"{name}\t{info.st_size}\t{info.st_mtime_ns}\n".encode())
    return StreamedDataset(
        name=folder,
        num_classes=len(listed.class_names),
        input_shape=(*size, channels),
        split_labels={split: y for split, (_, y) in chosen.items()},
        streams={split: stream(split) for split in SPLITS},
        class_names=listed.class_names,
        files_sha256=hashlib.sha256("\n".join(names).encode()).hexdigest(),
        file_stats_sha256=stats.hexdigest(),
    )


def _check_counts(
    name, counts, held_out_test, held_out_val, fraction, test_fraction
):
    """Refuses, before training, a split with no image where one is needed."""
    total = sum(counts.values())
    if counts["test"] == 0 and held_out_test:
        raise ValueError(
            f"{name} has {total} images, which leaves no test images: add "
            "images, or raise `test_fraction` (--test-fraction). "
            f"Received: test_fraction={test_fraction}"
        )
    if counts["test"] == 0:
        raise ValueError(
            f"The test split of {name} holds no images: put the test images "
            "in the class subfolders of its test folder."
        )
    if counts["val"] == 0 and held_out_val and fraction > 0:
        pool = counts["train"] + counts["val"]
        raise ValueError(
            f"{name} has {pool} images to train on, which leaves no "
            "validation images: add images, raise `validation_fraction` "
            "(--validation-fraction), or pass 0 for no validation. "
            f"Received: validation_fraction={fraction}"
        )
    if counts["val"] == 0 and not held_out_val:
        raise ValueError(
            f"The validation folder of {name} holds no images: put the "
            "validation images in its class subfolders, or remove it."
        )
    if counts["train"] == 0:
        raise ValueError(
            f"{name} has no training images left: add images, or lower "
            f"--test-fraction and --validation-fraction. Received: {counts}"
        )


def _npz_images(x, path, key):
    """The images of `key`, checked: uint8, or float32 (not yet scaled)."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(
            f"`{key}` in {path} must hold N > 0 images shaped (N, height, "
            f"width[, channels]). Received: shape {x.shape}"
        )
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"`{key}` in {path} must be uint8 (0-255) or float images. "
            f"Received: dtype {x.dtype}"
        )
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"`{key}` in {path} holds NaN or infinite pixels.")
    return x


def _npz_scale(images: dict, path) -> np.float32:
    """255 when any split holds a value above 1, else 1, for every split.

    A float split in [0, 1] beside one above 1 is refused: one of them was
    scaled and the other not.
    """
    low = {key: float(x.min()) for key, x in images.items()}
    high = {key: float(x.max()) for key, x in images.items()}
    for key in images:
        if low[key] < 0 or high[key] > 255:
            raise ValueError(
                f"The images in {path} must hold pixel values in [0, 1] or "
                f"[0, 255]. Received: {low[key]:g} to {high[key]:g} in `{key}`"
            )
    large = [key for key in images if high[key] > 1]
    if not large:
        return np.float32(1)
    small = [
        key
        for key, x in images.items()
        if x.dtype != np.uint8 and 0 < high[key] <= 1
    ]
    if small:
        raise ValueError(
            f"In {path}, {small[0]} holds values in [0, 1] and {large[0]} "
            f"values up to {high[large[0]]:g}: scale every split the same "
            "way (all 0-255 or all in [0, 1])."
        )
    return np.float32(255)


def _npz_labels(y, path, key, count):
    """The labels of `key`, checked to be integers (not yet their values)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != count:
        raise ValueError(
            f"`{key}` in {path} must hold one class index per image, shape "
            f"({count},); for one-hot labels save y.argmax(axis=1). "
            f"Received: shape {y.shape}"
        )
    if y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        found = np.unique(y)
        examples = [repr(v.item()) for v in found[:3]]
        examples += ["..."] if len(found) > 3 else []
        raise ValueError(
            f"`{key}` in {path} must hold class indices 0, 1, 2, ...: "
            f"integers. Received: labels of dtype {y.dtype} "
            f"({', '.join(examples)})."
        )
    return y.astype(np.int64)


def _label_words(values, counts, first: int) -> str:
    """Labels in words, e.g. "0..9 and 255 (1 sample)".

    `values[:first]` are 0..first-1; the others are listed in runs.
    """
    runs = []
    for value, count in zip(values[first:], counts[first:], strict=True):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1:] = [value, runs[-1][2] + count]
        else:
            runs.append([value, value, count])
    words = [
        (f"{a}..{b}" if a != b else f"{a}")
        + f" ({n} sample{'s' if n > 1 else ''})"
        for a, b, n in runs[:5]
    ] + (["..."] if len(runs) > 5 else [])
    good = f"0..{first - 1}" if first > 1 else "0"
    return ", ".join(words) if not first else f"{good} and {', '.join(words)}"


def _check_labels(y, y_test, path, key):
    """The number of classes: `y` holds each of 0..K-1, `y_test` no other."""
    values, counts = np.unique(y, return_counts=True)
    present = values[values >= 0]
    # 0, 1, ... up to the first gap are classes; any other label offends.
    first = next((i for i, v in enumerate(present) if v != i), len(present))
    good = (values >= 0) & (values < first)
    values = np.r_[values[good], values[~good]]
    counts = np.r_[counts[good], counts[~good]]
    if len(values) > first:
        raise ValueError(
            f"`{key}` in {path} must hold class indices 0, 1, 2, ...: the "
            "integers 0..K-1 for K classes, each at least once. Received: "
            f"labels {_label_words(values, counts, first)}."
        )
    if first < 2:
        raise ValueError(
            f"The training labels of {path} hold one class; a classifier "
            f"needs at least 2. Received: class {int(y[0])}"
        )
    if y_test is not None:
        outside = (y_test < 0) | (y_test >= first)
        if np.any(outside):
            found, many = np.unique(y_test[outside], return_counts=True)
            received = f"Received: test labels {_label_words(found, many, 0)}."
            if y_test.max() >= first:
                raise ValueError(
                    f"The test labels of {path} go up to "
                    f"{int(y_test.max())}, but the training labels only to "
                    f"{first - 1}. {received}"
                )
            raise ValueError(
                f"The test labels of {path} must be class indices "
                f"0..{first - 1}, as in training. {received}"
            )
    return first


def _load_npz(path, fraction, seed, test_fraction):
    """An `.npz` of `x`, `y` (test held out) or of `x_train`, `y_train`,
    `x_test`, `y_test`."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .npz file ({e}).") from None
    four = ("x_train", "y_train", "x_test", "y_test")
    if all(k in arrays for k in four):
        x = _npz_images(arrays["x_train"], path, "x_train")
        y = _npz_labels(arrays["y_train"], path, "y_train", len(x))
        x_test = _npz_images(arrays["x_test"], path, "x_test")
        y_test = _npz_labels(arrays["y_test"], path, "y_test", len(x_test))
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"In {path}, x_test and x_train must be the same shape. "
                f"Received: {x_test.shape[1:]} and {x.shape[1:]}"
            )
        num_classes = _check_labels(y, y_test, path, "y_train")
        scale = _npz_scale({"x_train": x, "x_test": x_test}, path)
        x, x_test = x / scale, x_test / scale
        held_out_test = False
    elif "x" in arrays and "y" in arrays:
        if not 0 < test_fraction < 1:
            raise ValueError(
                f"{path} holds x and y only, so `test_fraction` must be in "
                f"(0, 1). Received: test_fraction={test_fraction!r}"
            )
        images = _npz_images(arrays["x"], path, "x")
        labels = _npz_labels(arrays["y"], path, "y", len(images))
        num_classes = _check_labels(labels, None, path, "y")
        images = images / _npz_scale({"x": images}, path)
        train, test = _split(labels, test_fraction, _TEST_SEED)
        x, y, x_test, y_test = (
            images[train],
            labels[train],
            images[test],
            labels[test],
        )
        held_out_test = True
    else:
        raise ValueError(
            f"{path} must hold arrays `x` and `y`, or `x_train`, `y_train`, "
            f"`x_test` and `y_test`. Received: {sorted(arrays)}"
        )
    data = _finish(path, x, y, x_test, y_test, num_classes, fraction, seed)
    images = hashlib.sha256()
    for split in SPLITS:
        images.update(f"{split}:".encode())
        images.update(np.ascontiguousarray(getattr(data, f"x_{split}")).data)
    data = dataclasses.replace(data, images_sha256=images.hexdigest())
    _check_counts(
        path,
        {split: data.count(split) for split in SPLITS},
        held_out_test=held_out_test,
        held_out_val=True,
        fraction=fraction,
        test_fraction=test_fraction,
    )
    return data


def open_dataset(
    source: str | os.PathLike = "fashion_mnist_small",
    data_dir: str | os.PathLike | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
    test_fraction: float = 0.2,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    pixel_max: float = 1,
):
    """Opens a user's data or a named dataset, streamed where it can be.

    `source` is one of:

    - a folder of images in class subfolders (`folder/<class>/*.png`), or
      of split folders (`train/<class>/` with `test/` and/or `val/`): a
      `StreamedDataset`, every image checked once before training;
    - an `.npz` with `x` and `y` (or `x_train`, `y_train`, `x_test`,
      `y_test`): uint8 or float images, divided by 255 in every split
      when any split holds a value above 1; labels 0..K-1; a `Dataset`;
    - a name: an embedded dataset (`load_dataset`) or a
      tensorflow-datasets name (a `StreamedDataset`).

    Where the data has no test split, `test_fraction` of it (stratified,
    the same images whatever `seed`) is the test split; `validation_fraction`
    of the rest is carved into validation with `seed`.

    Args:
        source: A path or a name, see above.
        data_dir: tensorflow-datasets' `data_dir` (or the Fashion-MNIST
            files' folder for `"fashion_mnist_local"`).
        validation_fraction: Fraction of training data held out for
            validation, in `[0, 1)`.
        seed: Seed of the validation split.
        download: Whether a tensorflow-datasets dataset may be downloaded.
        test_fraction: Fraction held out for test where the data has no
            test split, in `(0, 1)`.
        image_size: `(height, width)` to resize an image folder's images
            to; needed when they differ in size.
        channels: 1 or 3 for an image folder; None infers it (1 when every
            image is grayscale).
        pixel_max: 1 for images in `[0, 1]`, 255 for raw pixel values
            (for a model that scales its own input).

    Returns:
        A `Dataset` or a `StreamedDataset`: both have `count(split)`,
        `labels(split)`, `batches(split, batch_size, ...)` and
        `inputs(split, batch_size)`.

    Raises:
        ValueError: for data that cannot be trained on, naming the file.
        FileNotFoundError: for a path that does not exist.

    Example:

    ```python
    data = open_dataset("my_images/", image_size=(64, 64))
    train = data.batches("train", 64, shuffle=True, seed=0)
    data.count("test"), data.num_classes
    ```
    """
    _check_fraction("validation_fraction", validation_fraction, 0)
    source = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(source, str) or not source:
        raise ValueError(
            "`source` must be the path of an image folder or .npz file, or "
            f"a dataset name. Received: source={source!r}"
        )
    is_folder = os.path.isdir(source)
    if (image_size is not None or channels is not None) and not is_folder:
        raise ValueError(
            f"`image_size` and `channels` apply to a folder of images. "
            f"Received: source={source!r}, image_size={image_size}, "
            f"channels={channels}"
        )
    if channels not in (None, 1, 3):
        raise ValueError(f"`channels` must be 1 or 3. Received: {channels!r}")
    pixel_max = _check_pixel_max(pixel_max)
    fraction = validation_fraction
    if is_folder:
        data = _open_image_folder(
            source, fraction, seed, test_fraction, image_size, channels
        )
    elif os.path.isfile(source):
        if not source.endswith(".npz"):
            raise ValueError(
                f"{source} is a file, not an .npz of arrays: pass an .npz or "
                "a folder of images in class subfolders."
            )
        data = _load_npz(source, fraction, seed, test_fraction)
    elif source.endswith(".npz") or os.sep in source:
        raise FileNotFoundError(
            f"No file or folder at {source}: pass an image folder or .npz."
        )
    elif source in EMBEDDED_DATASETS:
        data = load_dataset(source, data_dir, fraction, seed)
    else:
        if data_dir is not None:
            data_dir = os.fspath(data_dir)
        data = _open_tfds(source, data_dir, fraction, seed, download)
    return data if pixel_max == 1 else data.with_pixel_max(pixel_max)


def fingerprint_changes(recorded: dict, current: dict) -> list:
    """What differs between two `fingerprint()`s, in words; [] if nothing.

    Example:

    ```python
    fingerprint_changes(run["data_fingerprint"], data.fingerprint())
    # ["test: 18 -> 24 images", "the labels differ"]
    ```
    """
    changes = [
        f"{split}: {recorded.get('counts', {}).get(split)} -> {count} images"
        for split, count in current["counts"].items()
        if recorded.get("counts", {}).get(split) != count
    ]

    def differ(key):
        # Only keys both have: an older run.json lacks the newer ones.
        both = key in recorded and key in current
        return both and recorded[key] != current[key]

    if differ("labels_sha256"):
        changes.append("the labels differ")
    if differ("images_sha256"):
        changes.append("the images differ")
    if differ("files_sha256") or differ("file_stats_sha256"):
        changes.append("the files differ")
    return changes


def _check_fraction(name, value, low):
    if isinstance(value, bool) or not (
        isinstance(value, (int, float)) and low <= value < 1
    ):
        raise ValueError(
            f"`{name}` must be a number in [{low}, 1), e.g. 0.1. "
            f"Received: {name}={value!r}"
        )


def load_dataset(
    name: str = "digits",
    data_dir: str | os.PathLike | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
) -> Dataset:
    """Loads an image-classification dataset as numpy train/val/test arrays.

    `validation_fraction` of the training data (stratified by class, with
    `seed`) becomes validation; the test split is left untouched.

    Names:
        - `"digits"`: scikit-learn's 8x8 digits (1797 images, 10 classes);
          a fixed stratified 30% is the test split.
        - `"fashion_mnist_local"`: Fashion-MNIST from the IDX gzip files
          in `data_dir`, by default where Debian's `dataset-fashion-mnist`
          puts them.
        - `"fashion_mnist_small"`: a class-balanced Fashion-MNIST subset
          bundled with the package (1000 train, 5000 test images; MIT
          licence, (c) Zalando SE).
        - Any other name: a tensorflow-datasets image-classification
          dataset of fixed-size images (`"mnist"`, `"cifar10"`, ...),
          downloaded on first use; its `"test"` split (or `"validation"`)
          is the test set. `open_dataset` streams it instead of holding it
          in memory.

    Args:
        name: Dataset name, see above. Defaults to `"digits"`.
        data_dir: Folder of the data: the IDX files for
            `"fashion_mnist_local"`, tensorflow-datasets' `data_dir`
            otherwise. Ignored for `"digits"`. Defaults to `None`.
        validation_fraction: Fraction of the training split held out for
            validation, in `[0, 1)`; `0` trains on the whole training
            split (as the paper does on CIFAR). Defaults to `0.1`.
        seed: Seed of the validation split. Defaults to `0`.
        download: Whether a tensorflow-datasets dataset that is not in
            `data_dir` may be downloaded. Defaults to `True`.

    Returns:
        A `Dataset` of float32 NHWC images in `[0, 1]` and int32 labels.

    Raises:
        ValueError: If `name` is unknown or not an image-classification
            dataset, or `validation_fraction` is out of range.
        FileNotFoundError: If the Fashion-MNIST files are missing, or a
            tensorflow-datasets dataset is not in `data_dir` and cannot be
            downloaded.

    Example:

    ```python
    data = load_dataset("digits", validation_fraction=0.1, seed=0)
    data.x_train.shape  # (1132, 8, 8, 1)
    data.x_val.shape, data.x_test.shape  # (126, 8, 8, 1), (539, 8, 8, 1)
    ```
    """
    _check_fraction("validation_fraction", validation_fraction, 0)
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"`name` must be a non-empty string: one of "
            f"{list(EMBEDDED_DATASETS)} or a tensorflow-datasets name. "
            f"Received: name={name!r}"
        )
    if data_dir is not None:
        data_dir = os.fspath(data_dir)
    if name == "digits":
        return _load_digits(validation_fraction, seed)
    if name == "fashion_mnist_local":
        return _load_fashion_mnist(data_dir, validation_fraction, seed)
    if name == "fashion_mnist_small":
        return _load_fashion_mnist_small(data_dir, validation_fraction, seed)
    return _in_memory(
        _open_tfds(name, data_dir, validation_fraction, seed, download)
    )


def _augment(image, label, seeds):
    """Pads 4 zero pixels per side, random-crops back, random h-flip."""
    height, width, channels = image.shape
    padded = tf.pad(image, [[_PAD, _PAD], [_PAD, _PAD], [0, 0]])
    image = tf.image.stateless_random_crop(
        padded, [height, width, channels], seed=seeds[0]
    )
    image = tf.image.stateless_random_flip_left_right(image, seed=seeds[1])
    return image, label


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    augment: bool = False,
    seed: int | None = None,
) -> tf.data.Dataset:
    """Turns image and label arrays into a batched `tf.data.Dataset`.

    Optionally shuffles each epoch and applies the CIFAR augmentation of
    Huang et al. 2017: zero-pad 4 pixels per side, random crop back, random
    horizontal flip, new each epoch and reproducible with `seed`.

    Args:
        x: Images, shaped `(N, height, width, channels)`.
        y: Labels, shaped `(N,)` (or `(N, ...)`).
        batch_size: Number of examples per batch, >= 1.
        shuffle: Whether to shuffle the examples each epoch. Defaults to
            `False`.
        augment: Whether to apply the pad-crop-flip augmentation. Use it on
            training data only, and on images where a mirror image is the
            same class (not digits). Defaults to `False`.
        seed: Seed of the shuffle and the augmentation; `None` gives
            different orders and crops on every run. Defaults to `None`.

    Returns:
        A `tf.data.Dataset` of `(images, labels)` batches.

    Example:

    ```python
    data = load_dataset("digits")
    train = make_dataset(
        data.x_train, data.y_train, 128, shuffle=True, augment=True, seed=0
    )
    ```
    """
    batch_size = check_positive_int("batch_size", batch_size)
    if len(x) != len(y):
        raise ValueError(
            "`x` and `y` must hold the same number of examples. Received: "
            f"len(x)={len(x)}, len(y)={len(y)}"
        )
    if augment and np.ndim(x) != 4:
        raise ValueError(
            "`augment=True` needs images shaped (N, height, width, channels)."
            f" Received: x with shape {np.shape(x)}"
        )
    elements = tf.data.Dataset.from_tensor_slices((x, y))
    return _pipeline(
        elements, batch_size, shuffle, augment, seed, None, max(len(x), 1)
    )


def _pipeline(
    elements,
    batch_size,
    shuffle=False,
    augment=False,
    seed=None,
    decode=None,
    shuffle_buffer=1,
    scale=1.0,
):
    """Shuffles, decodes, scales by `scale`, augments, batches, prefetches.

    Shuffling comes before decoding: a streamed split shuffles file names.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    ds = elements
    if shuffle:
        ds = ds.shuffle(
            shuffle_buffer, seed=seed, reshuffle_each_iteration=True
        )
    if decode is not None:
        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    if scale != 1:
        ds = ds.map(
            lambda x, y: (x * scale, y), num_parallel_calls=tf.data.AUTOTUNE
        )
    if augment:
        # Two stateless seeds (crop, flip) per example, new each epoch.
        seeds = tf.data.Dataset.random(
            seed=seed, rerandomize_each_iteration=True
        ).batch(4, drop_remainder=True)
        seeds = seeds.map(lambda s: tf.reshape(s, [2, 2]))
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda xy, s: _augment(xy[0], xy[1], s),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
