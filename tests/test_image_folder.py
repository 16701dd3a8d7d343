"""A user's folder of images: listed, checked and streamed (`--data`)."""

import os

import numpy as np
import pytest
import tensorflow as tf
from helpers import write_image_folder

from keras_snapshot.app import image_folder
from keras_snapshot.app.datasets import SPLITS
from keras_snapshot.app.datasets import StreamedDataset
from keras_snapshot.app.datasets import open_dataset


def test_list_sorts_classes_and_reads_subfolders_recursively(tmp_path):
    write_image_folder(tmp_path, classes=("b", "a"), count=2)
    nested = tmp_path / "a" / "more"
    nested.mkdir()
    tf.io.write_file(
        str(nested / "x.png"), tf.io.encode_png(np.zeros((8, 6, 3), np.uint8))
    )
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    listed = image_folder.list_image_folder(str(tmp_path))
    assert listed.class_names == ("a", "b")
    assert [os.path.relpath(p, tmp_path) for p in listed.paths] == [
        "a/000.png",
        "a/001.png",
        "a/more/x.png",
        "b/000.png",
        "b/001.png",
    ]
    np.testing.assert_array_equal(listed.labels, [0, 0, 0, 1, 1])
    assert listed.test_paths is None


def test_open_streams_images_and_labels_exactly(tmp_path):
    written = write_image_folder(tmp_path, count=10)
    data = open_dataset(str(tmp_path), validation_fraction=0.2, seed=1)
    assert isinstance(data, StreamedDataset)
    assert data.input_shape == (8, 6, 3) and data.num_classes == 3
    # 30 images: 6 held out for test (0.2), 5 of the other 24 for validation.
    assert [data.count(s) for s in SPLITS] == [19, 5, 6]
    seen = []
    for split in SPLITS:
        x, y = data.arrays(split)
        np.testing.assert_array_equal(y, data.labels(split))
        for image, label in zip(x, y, strict=True):
            matches = [
                p
                for p, (img, lab) in written.items()
                if lab == label and np.array_equal(img / np.float32(255), image)
            ]
            assert len(matches) == 1
            seen += matches
    assert sorted(seen) == sorted(written)  # The splits partition the folder.
    for split in SPLITS:  # Every class in every split (stratified).
        assert set(data.labels(split)) == {0, 1, 2}


def test_test_split_is_fixed_and_validation_follows_the_seed(tmp_path):
    write_image_folder(tmp_path, count=10)

    def files(seed, split):
        data = open_dataset(str(tmp_path), validation_fraction=0.2, seed=seed)
        elements = data.streams[split]()[0]
        return sorted(p for p, _ in elements.as_numpy_iterator())

    assert files(0, "test") == files(1, "test")
    assert files(0, "val") != files(1, "val")


def test_train_and_test_subfolders_are_the_given_split(tmp_path):
    write_image_folder(tmp_path / "train", classes=("a", "b"), count=6)
    write_image_folder(tmp_path / "test", classes=("b",), count=3, seed=1)
    data = open_dataset(str(tmp_path), validation_fraction=0)
    assert [data.count(s) for s in SPLITS] == [12, 0, 3]
    np.testing.assert_array_equal(data.labels("test"), [1, 1, 1])


def test_shuffled_batches_are_seeded_and_bounded_by_the_split(tmp_path):
    write_image_folder(tmp_path, count=10)
    data = open_dataset(str(tmp_path), validation_fraction=0)

    def order(seed):
        batches = data.batches("train", 8, shuffle=True, seed=seed)
        return np.concatenate([y for _, y in batches.as_numpy_iterator()])

    first = order(0)
    assert len(first) == data.count("train")
    np.testing.assert_array_equal(first, order(0))
    assert sorted(first) == sorted(data.labels("train"))
    assert not np.array_equal(first, data.labels("train"))
    x = next(data.inputs("test", 4).as_numpy_iterator())
    assert x.shape == (4, 8, 6, 3) and x.dtype == np.float32


def test_image_size_resizes_and_grayscale_is_one_channel(tmp_path):
    write_image_folder(tmp_path, classes=("a",), count=4, channels=1)
    write_image_folder(
        tmp_path, classes=("x", "b"), count=4, size=(10, 10), channels=1
    )
    with pytest.raises(
        ValueError, match=r"2 different sizes: .*8x6 .*10x10.*--image-size"
    ):
        open_dataset(str(tmp_path))
    data = open_dataset(str(tmp_path), image_size=(5, 4))
    assert data.input_shape == (5, 4, 1)
    x, _ = data.arrays("train")
    assert x.shape[1:] == (5, 4, 1) and 0 <= x.min() and x.max() <= 1
    rgb = open_dataset(str(tmp_path), image_size=(5, 4), channels=3)
    assert rgb.input_shape == (5, 4, 3)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: None, "has no class subfolders"),
        (
            lambda root: write_image_folder(root, classes=("only",)),
            "one class subfolder",
        ),
        (
            lambda root: (
                write_image_folder(root),
                os.makedirs(os.path.join(root, "empty")),
            ),
            r"class folder .*empty holds no images",
        ),
        (
            lambda root: (
                write_image_folder(root),
                open(os.path.join(root, "dog", "bad.png"), "wb").write(b"oops"),
            ),
            r"dog/bad.png is not a readable image \(1 of 31 files",
        ),
        (
            lambda root: (
                write_image_folder(
                    os.path.join(root, "train"), classes=("a", "b")
                ),
                write_image_folder(os.path.join(root, "test"), classes=("c",)),
            ),
            r"test has classes that .*train does not have: \['c'\]",
        ),
        (
            lambda root: (
                write_image_folder(os.path.join(root, "train")),
                write_image_folder(os.path.join(root, "test")),
                write_image_folder(os.path.join(root, "extra")),
            ),
            r"split folders .*and also \['extra'\].*train/ \+ test/",
        ),
        (
            lambda root: (
                write_image_folder(os.path.join(root, "train")),
                write_image_folder(os.path.join(root, "dev")),
            ),
            r"split folders .*and also \['dev'\].*train/ \+ val/",
        ),
        (
            lambda root: (
                write_image_folder(os.path.join(root, "Train")),
                write_image_folder(os.path.join(root, "training")),
            ),
            r"\['Train', 'training'\], which are both the train split",
        ),
    ],
    ids=[
        "empty",
        "one-class",
        "empty-class",
        "corrupt",
        "unknown-test-class",
        "extra-split-folder",
        "unknown-split-folder",
        "two-train-folders",
    ],
)
def test_bad_folders_are_refused_in_one_line(tmp_path, make, message):
    make(str(tmp_path))
    with pytest.raises(ValueError, match=message) as error:
        open_dataset(str(tmp_path))
    assert "\n" not in str(error.value)


def test_scan_reads_the_shape_of_every_file(tmp_path):
    # The scan keeps one (height, width, channels) row per file.
    write_image_folder(tmp_path, count=5)
    listed = image_folder.list_image_folder(str(tmp_path))
    shapes = image_folder.scan_images(listed.paths)
    assert shapes.shape == (15, 3) and (shapes == [8, 6, 3]).all()


def _png(path, shape=(8, 6, 3)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(str(path), tf.io.encode_png(np.zeros(shape, np.uint8)))


def test_hidden_files_and_folders_in_a_class_folder_are_skipped(tmp_path):
    write_image_folder(tmp_path, classes=("cat", "dog"), count=2)
    _png(tmp_path / "cat" / ".thumbnails" / "000.png")
    (tmp_path / "dog" / "._000.png").write_bytes(b"macOS AppleDouble")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    listed = image_folder.list_image_folder(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in listed.paths] == [
        "cat/000.png",
        "cat/001.png",
        "dog/000.png",
        "dog/001.png",
    ]
    data = open_dataset(str(tmp_path), validation_fraction=0)
    assert sum(data.count(s) for s in SPLITS) == 4


def test_class_names_are_kept_in_label_order(tmp_path):
    # Sorted as strings: folder "10" is label 1, folder "2" label 2.
    write_image_folder(tmp_path, classes=("1", "2", "10"), count=4)
    data = open_dataset(str(tmp_path), validation_fraction=0)
    assert data.class_names == ("1", "10", "2")


@pytest.mark.parametrize(
    "folders, counts",
    [
        ({"Training": 5, "Testing": 2}, (10, 0, 4)),
        ({"train": 5, "test": 2}, (10, 0, 4)),
        ({"train": 5, "val": 2}, (10, 0, 4)),
        ({"TRAIN": 5, "Valid": 2}, (10, 0, 4)),
        ({"train": 5, "validation": 3, "test": 2}, (10, 6, 4)),
    ],
    ids=["Training-Testing", "train-test", "train-val", "TRAIN-Valid", "3"],
)
def test_split_folders_are_the_splits_whatever_their_case(
    tmp_path, folders, counts
):
    for seed, (name, count) in enumerate(folders.items()):
        write_image_folder(
            tmp_path / name, classes=("a", "b"), count=count, seed=seed
        )
    data = open_dataset(str(tmp_path), validation_fraction=0)
    assert data.class_names == ("a", "b")
    assert tuple(data.count(s) for s in SPLITS) == counts
    for split in SPLITS:
        assert set(data.labels(split)) <= {0, 1}


def test_the_fingerprint_names_what_changed_in_a_folder(tmp_path):
    from keras_snapshot.app.datasets import fingerprint_changes

    write_image_folder(tmp_path, count=5)
    before = open_dataset(str(tmp_path), validation_fraction=0).fingerprint()
    again = open_dataset(str(tmp_path), validation_fraction=0).fingerprint()
    assert before == again and fingerprint_changes(before, again) == []
    _png(tmp_path / "cat" / "new.png")
    after = open_dataset(str(tmp_path), validation_fraction=0).fingerprint()
    changes = fingerprint_changes(before, after)
    assert "train: 12 -> 13 images" in changes
    assert "the files differ" in changes


def test_the_fingerprint_sees_a_file_whose_contents_changed(tmp_path):
    from keras_snapshot.app.datasets import fingerprint_changes

    write_image_folder(tmp_path, count=5)
    before = open_dataset(str(tmp_path), validation_fraction=0).fingerprint()
    # Same names, same labels: only the contents of cat/000.png change.
    _png(tmp_path / "cat" / "000.png", shape=(8, 6, 3))
    os.utime(tmp_path / "cat" / "000.png", ns=(1, 1))
    after = open_dataset(str(tmp_path), validation_fraction=0).fingerprint()
    assert fingerprint_changes(before, after) == ["the files differ"]
    # A run.json written before the file sizes and times were recorded.
    old = {k: v for k, v in before.items() if k != "file_stats_sha256"}
    assert fingerprint_changes(old, after) == []


def test_the_fingerprint_sees_changed_npz_images(tmp_path):
    from keras_snapshot.app.datasets import fingerprint_changes

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 8, 8), dtype=np.uint8)
    y = np.repeat(np.arange(2), 20)
    path = str(tmp_path / "d.npz")
    np.savez(path, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    before = open_dataset(path).fingerprint()
    assert open_dataset(path).fingerprint() == before
    np.savez(path, x_train=x, y_train=y, x_test=255 - x[:10], y_test=y[:10])
    after = open_dataset(path).fingerprint()
    assert fingerprint_changes(before, after) == ["the images differ"]
    old = {k: v for k, v in before.items() if k != "images_sha256"}
    assert fingerprint_changes(old, after) == []


@pytest.mark.parametrize("name", ["train", "Test", "VALIDATION"])
def test_split_folders_inside_class_folders_are_refused(tmp_path, name):
    write_image_folder(tmp_path / "cat" / name, classes=("a",), count=2)
    write_image_folder(tmp_path, classes=("dog",), count=2)
    message = rf"cat holds split folders.*train/<class>/.*\['{name}'\]"
    with pytest.raises(ValueError, match=message) as e:
        open_dataset(str(tmp_path))
    assert "\n" not in str(e.value)


def test_a_test_folder_of_the_class_names_is_a_split_not_a_class(tmp_path):
    write_image_folder(tmp_path, classes=("cat", "dog"), count=4)
    write_image_folder(tmp_path / "test", classes=("cat", "dog"), count=2)
    with pytest.raises(ValueError, match=r"test.*cat.*train/ \+ test/") as e:
        open_dataset(str(tmp_path))
    assert "\n" not in str(e.value)
    # A test/ folder of other subfolders stays a class.
    other = tmp_path / "other"
    write_image_folder(other, classes=("cat", "dog"), count=4)
    write_image_folder(other / "test", classes=("misc",), count=4)
    listed = image_folder.list_image_folder(str(other))
    assert listed.class_names == ("cat", "dog", "test")


def test_symlinked_subfolders_of_a_class_are_followed_once(tmp_path):
    write_image_folder(tmp_path / "data", classes=("cat", "dog"), count=2)
    write_image_folder(tmp_path / "elsewhere", classes=("more",), count=3)
    os.symlink(tmp_path / "elsewhere" / "more", tmp_path / "data" / "cat" / "m")
    # A cycle: a link back to the class folder itself.
    os.symlink(tmp_path / "data" / "cat", tmp_path / "data" / "cat" / "loop")
    listed = image_folder.list_image_folder(str(tmp_path / "data"))
    names = [os.path.relpath(p, tmp_path / "data") for p in listed.paths]
    assert names == [
        "cat/000.png",
        "cat/001.png",
        "cat/m/000.png",
        "cat/m/001.png",
        "cat/m/002.png",
        "dog/000.png",
        "dog/001.png",
    ]
