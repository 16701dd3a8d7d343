"""A folder of images in class subfolders: listed, checked, then streamed.

`data/<class>/*.png`, or split folders `data/train/<class>/` beside
`data/test/<class>/` and/or `data/val/<class>/`; hidden names are skipped.
`scan_images` decodes every image once before training, so a broken file
or mixed sizes are refused first; `image_reader` decodes batch by batch.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
"""What `tf.io.decode_image` reads (the suffixes Keras's loader lists)."""

SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "test": "test",
    "testing": "test",
    "val": "val",
    "valid": "val",
    "validation": "val",
}
"""Top-level folder names (compared in lower case) -> the split they hold."""

LAYOUTS = (
    "train/ + test/ (validation carved from train/), "
    "train/ + val/ (val/ is the test split, validation carved from "
    "train/), train/ + val/ + test/ (val/ is the validation split)"
)
"""The split-folder layouts `list_image_folder` understands, in words."""


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The images of a folder: paths, labels and the splits it gives.

    Attributes:
        path: The folder.
        class_names: The class subfolders, sorted; label i is
            `class_names[i]`.
        paths: Training image paths (the whole folder when it has no
            split folders), sorted by class then name.
        labels: Their int32 labels.
        test_paths: The test images (`test/`, or `val/` without `test/`),
            or None.
        test_labels: Their labels, or None.
        val_paths: The `val/` images beside `test/`, or None.
        val_labels: Their labels, or None.
    """

    path: str
    class_names: tuple
    paths: np.ndarray
    labels: np.ndarray
    test_paths: np.ndarray | None
    test_labels: np.ndarray | None
    val_paths: np.ndarray | None = None
    val_labels: np.ndarray | None = None


def _subfolders(folder: str) -> list:
    return sorted(
        name
        for name in os.listdir(folder)
        if not name.startswith(".")
        and os.path.isdir(os.path.join(folder, name))
    )


def _class_images(folder: str, class_names) -> tuple:
    """Paths and labels of the images in each class subfolder (recursive).

    Hidden names are skipped; symlinked folders are followed, each real
    folder once (a link back up is no cycle).
    """
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(folder, name)
        _check_no_split_inside(folder, name)
        found, visited = [], set()
        for root, dirs, files in os.walk(class_dir, followlinks=True):
            real = os.path.realpath(root)
            if real in visited:
                dirs[:] = []
                continue
            visited.add(real)
            dirs[:] = sorted(
                d
                for d in dirs
                if not d.startswith(".")
                and os.path.realpath(os.path.join(root, d)) not in visited
            )
            found += [
                os.path.join(root, f)
                for f in sorted(files)
                if not f.startswith(".")
                and f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        if not found:
            raise ValueError(
                f"The class folder {class_dir} holds no images: remove it, "
                "or put that class's images in it. Received: no "
                f"{', '.join(IMAGE_EXTENSIONS)} file"
            )
        paths += found
        labels += [label] * len(found)
    return np.array(paths, dtype=str), np.array(labels, dtype=np.int32)


def _check_no_split_inside(folder: str, name: str) -> None:
    """Refuses a class folder of split folders (`cat/train/`, `cat/test/`)."""
    inside = [
        d
        for d in _subfolders(os.path.join(folder, name))
        if d.lower() in SPLIT_FOLDERS
    ]
    if inside:
        raise ValueError(
            f"The class folder {os.path.join(folder, name)} holds split "
            "folders: put splits above the classes (train/<class>/, "
            f"test/<class>/). Received: {inside}."
        )


def _check_classes(folder: str, class_names) -> None:
    if not class_names:
        raise ValueError(
            f"{folder} has no class subfolders: put each class's images in "
            "a subfolder named after it (cat/1.png, dog/2.png), or in "
            "train/<class>/ and test/<class>/."
        )
    if len(class_names) == 1:
        raise ValueError(
            f"{folder} has one class subfolder; a classifier needs at least "
            f"2. Received: {class_names[0]!r}"
        )


def _split_folders(folder: str, names) -> dict | None:
    """`{split: folder name}` of a folder laid out in splits, else None.

    Split folders: a train folder, or two or more split names; a lone
    `test/` beside other folders is a class. Other layouts are refused.
    """
    splits = {}
    for name in names:
        split = SPLIT_FOLDERS.get(name.lower())
        if split is not None:
            splits.setdefault(split, []).append(name)
    found = [name for folders in splits.values() for name in folders]
    if "train" not in splits and len(found) < 2:
        if found:
            _check_lone_split(folder, found[0], names)
        return None
    others = [name for name in names if name not in found]
    twice = [(s, folders) for s, folders in splits.items() if len(folders) > 1]
    problem = None
    if others:
        problem = f"has split folders {found} and also {others}"
    elif twice:
        problem = f"has {twice[0][1]}, which are both the {twice[0][0]} split"
    elif "train" not in splits:
        problem = f"has split folders {found} but no train folder"
    elif len(splits) < 2:
        problem = f"has a {found[0]} folder but no test or val folder"
    if problem is not None:
        raise ValueError(
            f"{folder} {problem}: use one folder per split, each with the "
            f"class subfolders, as in {LAYOUTS} (any case)."
        )
    return {split: folders[0] for split, folders in splits.items()}


def _check_lone_split(folder: str, name: str, names) -> None:
    """Refuses a lone `test/` (or val) whose subfolders are its siblings:
    a test split beside the classes, not a class named "test"."""
    inside = _subfolders(os.path.join(folder, name))
    if inside and set(inside) <= set(names) - {name}:
        raise ValueError(
            f"{os.path.join(folder, name)} holds the class folders "
            f"({', '.join(inside)}), so it is a split: put the training "
            f"images in a train folder, as in {LAYOUTS}. Received: "
            f"{sorted(names)}."
        )


def list_image_folder(folder: str) -> ImageFolder:
    """Lists the images of `folder` and their labels (no image is read).

    With split folders (`LAYOUTS`), `test/` (or `val/` without `test/`) is
    the test split and `val/` beside `test/` validation; otherwise the
    caller holds out a test split.
    """
    names = _subfolders(folder)
    splits = _split_folders(folder, names)
    if splits is None:
        _check_classes(folder, names)
        paths, labels = _class_images(folder, names)
        return ImageFolder(folder, tuple(names), paths, labels, None, None)
    train = os.path.join(folder, splits["train"])
    class_names = _subfolders(train)
    _check_classes(train, class_names)
    paths, labels = _class_images(train, class_names)
    held = {}
    for split in ("test", "val"):
        if split in splits:
            held[split] = _held_out(
                os.path.join(folder, splits[split]), train, class_names
            )
    if "test" not in held:
        held["test"] = held.pop("val")
    val_paths, val_labels = held.get("val", (None, None))
    return ImageFolder(
        folder,
        tuple(class_names),
        paths,
        labels,
        *held["test"],
        val_paths,
        val_labels,
    )


def _held_out(split_dir: str, train: str, class_names) -> tuple:
    """Paths and labels (those of the training classes) of a held-out split."""
    names = _subfolders(split_dir)
    unknown = sorted(set(names) - set(class_names))
    if unknown:
        raise ValueError(
            f"{split_dir} has classes that {train} does not have: {unknown}."
        )
    found = [n for n in class_names if n in names]
    paths, labels = _class_images(split_dir, found)
    # Labels follow the training classes, also where the split lacks one.
    labels = np.array([class_names.index(found[i]) for i in labels], np.int32)
    return paths, labels


def _decoded(path, channels: int = 0):
    image = tf.io.decode_image(
        tf.io.read_file(path), channels=channels, expand_animations=False
    )
    return image


def scan_images(paths) -> np.ndarray:
    """`(N, 3)` height, width and channels of each image, decoded once.

    Decoded in parallel and dropped at once: memory stays a few images.
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
            f"{len(paths)} files do not decode): remove or replace them."
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
            "(`image_size=` in Python) to resize them."
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
