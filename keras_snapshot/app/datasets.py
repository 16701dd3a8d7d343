"""Image-classification data for snapshot-ensemble experiments.

A front end: it loads images as numpy arrays split into train, validation
and test, and turns arrays into `tf.data` pipelines with the standard
augmentation of Huang et al. 2017, "Snapshot Ensembles: Train 1, get M for
free" (arXiv:1704.00109). The validation split is always carved from the
training data, never from the test data, so snapshots can be selected on
validation without touching the test set.
"""

import dataclasses
import gzip
import os
import struct

import numpy as np
import tensorflow as tf

from keras_snapshot._checks import check_positive_int

__all__ = [
    "EMBEDDED_DATASETS",
    "FASHION_MNIST_DIR",
    "Dataset",
    "load_dataset",
    "make_dataset",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's `dataset-fashion-mnist` package puts the IDX files."""

EMBEDDED_DATASETS = ("digits", "fashion_mnist_local", "fashion_mnist_small")
"""Names `load_dataset` serves without tensorflow-datasets."""

_DIGITS_TEST_FRACTION = 0.3
_DIGITS_TEST_SEED = 0
_PROBE_TIMEOUT = 10.0
"""Seconds to wait for a tensorflow-datasets download server to answer."""
_PAD = 4
_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train, validation and test arrays of one image-classification task.

    Images are float32 in `[0, 1]`, shaped `(N, height, width, channels)`;
    labels are int32 class indices in `[0, num_classes)`. The validation
    arrays are carved from the original training split.

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


def _split(labels, fraction, seed):
    """Random split stratified by class: indices `(keep, held_out)`, sorted.

    `round(fraction * len(labels))` examples are held out, shared among the
    classes in proportion to their sizes by scikit-learn's
    `train_test_split(stratify=...)`, with `seed` as its `random_state`.
    Where the data is too small to stratify (a class with a single example,
    or fewer held-out or kept examples than classes), the split is a plain
    seeded random split.
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
    name, x_train, y_train, x_test, y_test, num_classes, fraction, seed
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
    )


def _load_digits(fraction, seed):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0)[..., np.newaxis]
    labels = digits.target
    train, test = _split(labels, _DIGITS_TEST_FRACTION, _DIGITS_TEST_SEED)
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
            f"{path!r} is not an IDX file of {ndim}-D unsigned bytes: its "
            f"magic number is {found}, expected {magic}. Reinstall the data "
            "with `apt-get install --reinstall dataset-fashion-mnist`."
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    array = np.frombuffer(data, dtype=np.uint8, offset=header)
    if array.size != int(np.prod(shape)):
        raise ValueError(
            f"{path!r} is truncated: its header announces shape {shape} "
            f"({int(np.prod(shape))} bytes) but it holds {array.size} bytes. "
            "Reinstall it with "
            "`apt-get install --reinstall dataset-fashion-mnist`."
        )
    return array.reshape(shape)


def _load_fashion_mnist(data_dir, fraction, seed):
    folder = data_dir if data_dir is not None else FASHION_MNIST_DIR
    paths = {k: os.path.join(folder, f) for k, f in _FASHION_FILES.items()}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {missing}. Install them with "
            "`apt-get install -y dataset-fashion-mnist` (Debian), which puts "
            f"them in {FASHION_MNIST_DIR}, or pass `data_dir=` the folder "
            "holding the 4 original IDX gzip files."
        )
    arrays = {
        k: _read_idx(p, 2051, 3) if k.startswith("x") else _read_idx(p, 2049, 1)
        for k, p in paths.items()
    }
    return _finish(
        "fashion_mnist_local",
        arrays["x_train"][..., np.newaxis] / np.float32(255),
        arrays["y_train"],
        arrays["x_test"][..., np.newaxis] / np.float32(255),
        arrays["y_test"],
        10,
        fraction,
        seed,
    )


def _load_fashion_mnist_small(data_dir, fraction, seed):
    """The class-balanced Fashion-MNIST subset bundled with the package.

    `keras_snapshot/app/data/fashion_mnist_small.npz` (uint8, made by
    `benchmarks/make_fashion_subset.py`; MIT licence, see the README in that
    folder), or the file of that name in `data_dir`.
    """
    folder = data_dir
    if folder is None:
        folder = os.path.join(os.path.dirname(__file__), "data")
    path = os.path.join(folder, "fashion_mnist_small.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path!r} does not exist. It is installed with the package; "
            "reinstall keras-snapshot, or make it with `python "
            "benchmarks/make_fashion_subset.py --out PATH` and pass its folder "
            "as `data_dir`."
        )
    with np.load(path) as f:
        arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    return _finish(
        "fashion_mnist_small",
        arrays["x_train"][..., np.newaxis] / np.float32(255),
        arrays["y_train"],
        arrays["x_test"][..., np.newaxis] / np.float32(255),
        arrays["y_test"],
        10,
        fraction,
        seed,
    )


def _tfds_to_numpy(tfds, ds, keys):
    """Concatenates the `(image, label)` features of a `tf.data.Dataset`."""
    xs, ys = [], []
    for batch in tfds.as_numpy(ds.batch(1024)):
        xs.append(batch[keys[0]])
        ys.append(batch[keys[1]])
    return np.concatenate(xs), np.concatenate(ys)


def _image_label_keys(tfds, info, name):
    """The `(image, label)` feature names of an image-classification dataset.

    The dataset's supervised keys, or, where it declares none (e.g. a
    dataset read back from its prepared files), its only `Image` and only
    `ClassLabel` features.
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
            "classification dataset: its supervised keys are "
            f"{info.supervised_keys}. Pick one whose input is an image and "
            f"whose target is a class label. Received: name={name!r}"
        )
    if None in features[keys[0]].shape:
        raise ValueError(
            f"The images of {name!r} have variable sizes "
            f"{features[keys[0]].shape}; `load_dataset` needs fixed-size "
            f"images. Pick a dataset of fixed-size images. Received: "
            f"name={name!r}"
        )
    return tuple(keys)


def _unreachable_server(urls, timeout=_PROBE_TIMEOUT):
    """`(host, reason)` of the first server of `urls` that does not answer.

    One HEAD request per host, no retries, with the proxies of the
    environment (as tensorflow-datasets' own downloads use them). Any HTTP
    answer, even an error status, counts as reachable. Returns `None` when
    every server answers.
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

    Fails in one line, without tensorflow-datasets' minutes of retries,
    when the data is not there and cannot be downloaded.
    """
    if builder.is_prepared():
        return
    hint = (
        'Download it where there is network access (`python -c "import '
        f"tensorflow_datasets as tfds; tfds.builder('{name}')"
        '.download_and_prepare()"`) and pass the folder that holds its '
        f"`{name}/` folder with `--data-dir` (`data_dir=` in Python)."
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


def _load_tfds(name, data_dir, fraction, seed, download):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset {name!r}. Use one of the embedded datasets "
            f"{list(EMBEDDED_DATASETS)}, or the name of any "
            "tensorflow-datasets image-classification dataset (e.g. "
            '"mnist", "cifar10", "cifar100", "svhn_cropped"). '
            f"Received: name={name!r}"
        ) from None
    keys = _image_label_keys(tfds, builder.info, name)
    _prepare_tfds(builder, name, download)
    splits = set(builder.info.splits.keys())
    test_split = "test"
    if splits and "test" not in splits:
        if "validation" not in splits:
            raise ValueError(
                f"The dataset {name!r} has no 'test' or 'validation' split "
                f"to test on (splits: {sorted(splits)}). Pick another "
                f"dataset. Received: name={name!r}"
            )
        test_split = "validation"
    train, test = builder.as_dataset(
        split=["train", test_split], shuffle_files=False
    )
    x_train, y_train = _tfds_to_numpy(tfds, train, keys)
    x_test, y_test = _tfds_to_numpy(tfds, test, keys)
    return _finish(
        name,
        x_train / np.float32(255),
        y_train,
        x_test / np.float32(255),
        y_test,
        builder.info.features[keys[1]].num_classes,
        fraction,
        seed,
    )


def load_dataset(
    name: str = "digits",
    data_dir: str | os.PathLike | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
) -> Dataset:
    """Loads an image-classification dataset as numpy train/val/test arrays.

    Snapshot ensembles (Huang et al. 2017, arXiv:1704.00109) are evaluated
    on a held-out test set; choosing snapshots or ensemble sizes needs a
    separate validation set. This function carves `validation_fraction` of
    the training data (stratified by class, with `seed`) into validation and
    leaves the test split untouched.

    Names:
        - `"digits"`: scikit-learn's bundled 8x8 handwritten digits (1797
          images, 10 classes, no network). 30% of the images, stratified by
          class and always the same whatever `seed`, are the test split.
        - `"fashion_mnist_local"`: Fashion-MNIST (60000 + 10000 28x28
          images) read from the original IDX gzip files in `data_dir`,
          by default `/usr/share/datasets/fashion-mnist` where Debian's
          `dataset-fashion-mnist` package installs them.
        - `"fashion_mnist_small"`: a class-balanced subset of Fashion-MNIST
          bundled with the package (1000 training and 5000 test 28x28
          images, no network; MIT licence, (c) Zalando SE), read from
          `fashion_mnist_small.npz` in `data_dir` if given.
        - Any other name: a tensorflow-datasets image-classification
          dataset with fixed-size images (`"mnist"`, `"cifar10"`,
          `"cifar100"`, ...) in tensorflow-datasets' `data_dir`, or
          one prepared there by a `tfds` builder. It is downloaded and
          prepared on first use; where it is not there and its download
          server cannot be reached, a one-line `FileNotFoundError` says
          so at once (tensorflow-datasets itself would retry for
          minutes). Its `"test"` split (or `"validation"` where there is
          no test split) is the test set. The whole dataset is held in
          memory.

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
    if isinstance(validation_fraction, bool) or not (
        isinstance(validation_fraction, (int, float))
        and 0 <= validation_fraction < 1
    ):
        raise ValueError(
            "`validation_fraction` must be a number in [0, 1), e.g. 0.1. "
            f"Received: validation_fraction={validation_fraction!r}"
        )
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
    return _load_tfds(name, data_dir, validation_fraction, seed, download)


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

    Optionally shuffles (anew each epoch), then applies the standard CIFAR
    augmentation used by Huang et al. 2017 (arXiv:1704.00109) after He et
    al. 2016: zero-pad 4 pixels on each side, take a random crop of the
    original size, and flip horizontally with probability 1/2. Random
    choices change every epoch and are reproducible when `seed` is set. The
    dataset is batched (the last batch may be smaller) and prefetched.

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
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(
            max(len(x), 1), seed=seed, reshuffle_each_iteration=True
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
