"""Packaging for keras-snapshot (Snapshot Ensembles for Keras 3)."""

import pathlib
import re

from setuptools import find_packages
from setuptools import setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"',
    (HERE / "keras_snapshot" / "__init__.py").read_text(),
).group(1)

# The tensorflow-datasets names of `--dataset` (`app/datasets.py` imports it
# only for them, and says how to install it where it is missing).
DATASETS = [
    "tensorflow-datasets>=4.9",
    # tensorflow-datasets 4.9.10 imports the `importlib_resources` backport
    # but declares it only for Python < 3.9; it came with `etils[epath]`
    # until etils 1.14 dropped it. Without it every tfds dataset fails
    # (tensorflow/datasets#11212).
    "importlib_resources",
]

setup(
    name="keras-snapshot",
    version=VERSION,
    description=(
        "Snapshot Ensembles for Keras 3: M models for the training cost of one"
    ),
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["keras_snapshot", "keras_snapshot.*"]),
    # The bundled Fashion-MNIST subset of `--dataset fashion_mnist_small`,
    # with its licence (MIT, Zalando SE) and README.
    package_data={
        "keras_snapshot": [
            "data/fashion_mnist_small.npz",
            "data/LICENSE-fashion-mnist",
            "data/README.md",
        ]
    },
    python_requires=">=3.10",
    install_requires=[
        # Keras 3.8 (TF 2.18-2.20 and Colab bring 3.8-3.10) to 3.x: a Keras
        # already installed in that range is kept. CI tests 3.8 and the
        # newest (docs/api.md, "Supported versions").
        "keras>=3.8,<4",
        # TensorFlow is needed (tf.io.gfile, tf.data, SavedModel export)
        # but not required here: pip cannot tell that `tensorflow-cpu`,
        # `tensorflow[and-cuda]` or a vendor build already provides it, and
        # would add a second TensorFlow beside it. A new environment gets
        # it from the `tensorflow` extra (README: `pip install -e
        # ".[tensorflow]"`); importing keras_snapshot without any
        # TensorFlow says so in one line (keras_snapshot/_keras_compat.py).
        "numpy>=1.26",
        # keras_snapshot.metrics (scipy.stats) and .selection
        # (scipy.optimize, scipy.special), imported with the package.
        "scipy>=1.10",
        # tensorflow-datasets is in the extras below, not here: through
        # tensorflow-metadata it pulls googleapis-common-protos 1.76+,
        # which needs protobuf>=6.33.5, and pip's resolver ignores the
        # `protobuf<6` of an installed TensorFlow 2.18/2.19 that is not part
        # of the request: it would upgrade protobuf and break that
        # TensorFlow. So plain `pip install -e .` touches neither
        # TensorFlow, Keras nor protobuf; naming the installed build in the
        # brackets (`pip install -e ".[tensorflow-cpu]"`) puts it in the
        # request, so pip keeps it and resolves protobuf against it.
        # The embedded default dataset (scikit-learn's bundled digits) and
        # the report's plots.
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
    ],
    extras_require={
        # 2.18 is the oldest TensorFlow CI runs (with Keras 3.8). Each
        # TensorFlow extra brings tensorflow-datasets (see above).
        "tensorflow": ["tensorflow>=2.18,<3", *DATASETS],
        "tensorflow-cpu": ["tensorflow-cpu>=2.18,<3", *DATASETS],
        # tensorflow-datasets alone, beside a TensorFlow installed otherwise.
        "datasets": DATASETS,
        "test": [
            "pytest>=8",
            "tensorboard",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel",
        ],
        # `keras-snapshot export --format onnx` / export_ensemble(...,
        # format="onnx"): Keras converts with tf2onnx (patched by Keras for
        # numpy 2); onnxruntime runs the file (tests/test_export.py skips the
        # ONNX tests without it). onnx 1.18+ needs protobuf 6, which
        # TensorFlow before 2.20 refuses: there, `pip install "onnx<1.18"`.
        "onnx": ["tf2onnx>=1.16.1", "onnx>=1.16", "onnxruntime>=1.17"],
        # The JAX backend (tests/test_backends.py, CI's JAX run). 0.7.1 added
        # `jax.set_mesh`, which Keras's JAX distribution uses; Keras before
        # 3.11 cannot import JAX 0.7 (`jax.spmd_mode` is gone), so JAX needs
        # Keras 3.11+ (docs/api.md, "Supported versions").
        "jax": ["jax>=0.7.1", "keras>=3.11,<4"],
    },
    entry_points={
        "console_scripts": ["keras-snapshot=keras_snapshot.app.cli:main"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Keras",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
