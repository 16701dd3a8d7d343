"""The Fashion-MNIST subset bundled with keras-snapshot, for examples.

`load_example_data()` returns it the way `keras.datasets` returns a
dataset, with no network access: 1,000 training and 5,000 test 28x28
grayscale images of 10 classes, class-balanced, uint8 (MIT licence,
(c) Zalando SE; see `keras_snapshot/data/README.md`). It is the data of
`keras-snapshot train` with no options.
"""

import os

import numpy as np

FASHION_MNIST_SMALL = os.path.join(
    os.path.dirname(__file__), "data", "fashion_mnist_small.npz"
)
"""Where the package keeps the bundled subset."""

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Fashion-MNIST's class names, by label."""


def load_example_data():
    """The bundled Fashion-MNIST subset, as `keras.datasets` returns data.

    Returns:
        `(x_train, y_train), (x_test, y_test)`: uint8 images shaped
        `(N, 28, 28)` (1,000 train, 5,000 test) and uint8 labels 0-9.

    Raises:
        FileNotFoundError: if the file is missing from the installation.

    Example:

    ```python
    (x_train, y_train), (x_test, y_test) = keras_snapshot.load_example_data()
    x_train = x_train[..., None] / 255.0  # (1000, 28, 28, 1) in [0, 1]
    ```
    """
    if not os.path.isfile(FASHION_MNIST_SMALL):
        raise FileNotFoundError(
            f"{FASHION_MNIST_SMALL!r} does not exist. It is installed with "
            "the package; reinstall keras-snapshot."
        )
    with np.load(FASHION_MNIST_SMALL) as f:
        return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])
