"""A folder of images in class subfolders: listed, checked, then streamed.

The layout `keras.utils.image_dataset_from_directory` reads:

    data/cat/001.png  data/cat/002.jpg  data/dog/003.png ...

or, with a test split of its own, `data/train/<class>/...` and
`data/test/<class>/...`. Only the file names and labels are held in memory;
the images are decoded batch by batch while training (`read_image`).

Before any training, `scan_images` decodes every image once, in parallel,
so that what would stop training half-way is refused in one line first: a
file that does not decode, images of several sizes without an
`image_size`. It also infers the image size and channels.

Example:

```python
folder = list_image_folder("data")
shapes = scan_images(folder.paths)
size, channels = image_format(folder, shapes, image_size=None)
```
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
"""What `tf.io.decode_image` reads (the suffixes Keras's loader lists)."""


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The images of a folder: paths, labels and, if given, a test split.

    Attributes:
        path: The folder.
        class_names: The class subfolders, sorted; label i is
            `class_names[i]`.
        paths: Training image paths (the whole folder when there is no
            `test/`), sorted by class then name.
        labels: Their int32 labels.
        test_paths: The `test/` images, or None.
        test_labels: Their labels, or None.
    """

    path: str
    class_names: tuple
    paths: np.ndarray
    labels: np.ndarray
    test_paths: np.ndarray | None
    test_labels: np.ndarray | None


def _subfolders(folder: str) -> list:
    return sorted(
        name
        for name in os.listdir(folder)
        if not name.startswith(".")
        and os.path.isdir(os.path.join(folder, name))
    )


def _class_images(folder: str, class_names) -> tuple:
    """Paths and labels of the images in each class subfolder (recursive)."""
    paths, labels = [], []
    for label, name in enumerate(class_names):
        found = []
        for root, dirs, files in os.walk(os.path.join(folder, name)):
            dirs.sort()
            found += [
                os.path.join(root, f)
                for f in sorted(files)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        if not found:
            raise ValueError(
                f"The class folder {os.path.join(folder, name)} holds no "
                f"images ({', '.join(IMAGE_EXTENSIONS)}). Remove it, or put "
                "the images of that class in it."
            )
        paths += found
        labels += [label] * len(found)
    return np.array(paths), np.array(labels, dtype=np.int32)


def _check_classes(folder: str, class_names) -> None:
    if not class_names:
        raise ValueError(
            f"{folder} has no class subfolders. Put the images of each class "
            f"in a subfolder named after it ({os.path.join(folder, 'cat')}"
            f"/1.png, {os.path.join(folder, 'dog')}/2.png, ...), or, with "
            "a test split of your own, in train/<class>/ and test/<class>/."
        )
    if len(class_names) == 1:
        raise ValueError(
            f"{folder} has one class subfolder ({class_names[0]!r}): a "
            "classifier needs at least 2 classes, each in its own subfolder."
        )


def list_image_folder(folder: str) -> ImageFolder:
    """Lists the images of `folder` and their labels (no image is read).

    A folder whose only subfolders are `train` and `test` (each holding
    the class subfolders) has its own test split; any other folder is
    one pool of class subfolders, and the caller holds out a test split.

    Raises:
        ValueError: for a folder with fewer than 2 classes, an empty class,
            or `test/` classes that `train/` does not have.
    """
    names = _subfolders(folder)
    if {"train", "test"} <= set(names) and names != ["test", "train"]:
        others = [n for n in names if n not in ("train", "test")]
        raise ValueError(
            f"{folder} has train/ and test/ subfolders, and also {others}: "
            "with a test split of its own, the folder holds only train/ "
            "and test/ (validation is carved from train/ by "
            "--validation-fraction). Move the others out."
        )
    if names != ["test", "train"]:
        _check_classes(folder, names)
        paths, labels = _class_images(folder, names)
        return ImageFolder(folder, tuple(names), paths, labels, None, None)
    train, test = (os.path.join(folder, n) for n in ("train", "test"))
    class_names = _subfolders(train)
    _check_classes(train, class_names)
    unknown = sorted(set(_subfolders(test)) - set(class_names))
    if unknown:
        raise ValueError(
            f"{test} has classes that {train} does not have: {unknown}. "
            "The test classes must be training classes."
        )
    paths, labels = _class_images(train, class_names)
    test_names = [n for n in class_names if n in _subfolders(test)]
    test_paths, test_labels = _class_images(test, test_names)
    # Labels follow the training classes, also where test lacks one.
    test_labels = np.array(
        [class_names.index(test_names[i]) for i in test_labels], np.int32
    )
    return ImageFolder(
        folder, tuple(class_names), paths, labels, test_paths, test_labels
    )


def _decoded(path, channels: int = 0):
    image = tf.io.decode_image(
        tf.io.read_file(path), channels=channels, expand_animations=False
    )
    return image


def scan_images(paths) -> np.ndarray:
    """`(N, 3)` height, width and channels of each image, decoded once.

    The images are decoded in parallel and dropped at once: memory stays
    that of a few images whatever N.

    Raises:
        ValueError: naming the first file that does not decode, and how
            many do not.
    """
    paths = np.asarray(paths)
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
    ds = ds.map(
        lambda i, p: (i, tf.shape(_decoded(p))),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    ).ignore_errors()
    shapes = np.full((len(paths), 3), -1, dtype=np.int64)
    for index, shape in ds.batch(1024).as_numpy_iterator():
        shapes[index] = shape
    broken = np.flatnonzero(shapes[:, 0] < 0)
    if broken.size:
        raise ValueError(
            f"{paths[broken[0]]} is not a readable image ({broken.size} of "
            f"{len(paths)} files do not decode as BMP, GIF, JPEG or PNG). "
            "Remove or replace the broken files."
        )
    return shapes


def image_format(paths, shapes, image_size=None, channels=None) -> tuple:
    """`((height, width), channels)` to train on.

    Args:
        paths: The scanned paths, to name files in errors.
        shapes: `scan_images(paths)`.
        image_size: `(height, width)` to resize every image to, or None to
            use the images' own size (then they must all have it).
        channels: 1 or 3, or None: 1 when every image is grayscale, else 3
            (an alpha channel is dropped).

    Raises:
        ValueError: for images of several sizes and no `image_size`.
    """
    if channels is None:
        channels = 1 if np.all(shapes[:, 2] <= 2) else 3
    if image_size is not None:
        return tuple(image_size), channels
    sizes, first = np.unique(shapes[:, :2], axis=0, return_index=True)
    if len(sizes) > 1:
        a, b = first[:2]
        raise ValueError(
            f"The images have {len(sizes)} different sizes: {paths[a]} is "
            f"{shapes[a, 0]}x{shapes[a, 1]} and {paths[b]} is "
            f"{shapes[b, 0]}x{shapes[b, 1]}. Pass --image-size HEIGHTxWIDTH "
            "(image_size=(height, width) in Python) to resize them all."
        )
    return (int(sizes[0, 0]), int(sizes[0, 1])), channels


def image_reader(size, channels: int, resize: bool):
    """`(path, label) -> (float32 image in [0, 1], label)`, for `tf.data`."""
    height, width = size

    def read(path, label):
        image = _decoded(path, channels)
        if resize:
            image = tf.image.resize(image, (height, width))
        image = tf.ensure_shape(image, (height, width, channels))
        return tf.cast(image, tf.float32) / 255.0, label

    return read
