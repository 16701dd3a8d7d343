"""Makes the Fashion-MNIST subset bundled with the package.

Reads the original IDX files that Debian's `dataset-fashion-mnist` package
installs in /usr/share/datasets/fashion-mnist/ and writes a class-balanced
random subset of the training and test splits, as uint8, to
keras_snapshot/data/fashion_mnist_small.npz (what
`load_dataset("fashion_mnist_small")` reads). The same arguments give the
same file, byte for byte.

    python benchmarks/make_fashion_subset.py
    python benchmarks/make_fashion_subset.py --train 2000 --test 2000 \
        --out /tmp/fm2000/fashion_mnist_small.npz   # for exploring sizes

Then `keras-snapshot train --dataset fashion_mnist_small --data-dir
/tmp/fm2000` trains on the other file.
"""

import argparse
import io
import os
import zipfile

import common
import numpy as np

from keras_snapshot.app.datasets import FASHION_MNIST_DIR
from keras_snapshot.app.datasets import load_dataset

DEFAULT_OUT = os.path.join(
    common.ROOT, "keras_snapshot", "data", "fashion_mnist_small.npz"
)


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` examples, `size / classes` of each class."""
    classes = np.unique(labels)
    if size % len(classes):
        raise ValueError(
            f"The subset size must be a multiple of the number of classes "
            f"({len(classes)}). Received: size={size}"
        )
    rng = np.random.default_rng(seed)
    per_class = size // len(classes)
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:per_class]
        for c in classes
    ]
    return np.sort(np.concatenate(picked))


def make_subset(train: int, test: int, seed: int, data_dir: str) -> dict:
    # The full set, read and checked by the package's own IDX reader.
    data = load_dataset(
        "fashion_mnist_local", data_dir=data_dir, validation_fraction=0
    )
    out = {}
    for split, size in (("train", train), ("test", test)):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        keep = balanced_subset(y, size, seed)
        out[f"x_{split}"] = np.round(x[keep, ..., 0] * 255).astype(np.uint8)
        out[f"y_{split}"] = y[keep].astype(np.uint8)
        out[f"index_{split}"] = keep.astype(np.int32)  # rows of the original
    return out


def write_npz(path: str, arrays: dict) -> None:
    """A compressed `.npz` with fixed timestamps (reproducible), atomically.

    `np.savez_compressed` stamps each member with the current time, so two
    runs would differ; this writes the same format with a fixed date.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(
                f"{name}.npy", date_time=(2017, 4, 3, 0, 0, 0)
            )
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as f:
                np.lib.format.write_array(f, np.asarray(array))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=1000, help="training images")
    p.add_argument("--test", type=int, default=5000, help="test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=FASHION_MNIST_DIR)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    arrays = make_subset(args.train, args.test, args.seed, args.data_dir)
    write_npz(args.out, arrays)
    print(
        f"Wrote {args.out}: {args.train} training and {args.test} test "
        f"images ({os.path.getsize(args.out) / 2**20:.2f} MiB)."
    )


if __name__ == "__main__":
    main()
