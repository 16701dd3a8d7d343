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
        # Any TensorFlow 2.16+ (the first with Keras 3): a Colab runtime's
        # preinstalled TensorFlow satisfies this and is never reinstalled.
        # No upper pin below 3, for the same reason. See README, "Install".
        "tensorflow>=2.16,<3",
        "keras>=3.8,<4",
        "numpy>=1.26",
        # keras_snapshot.metrics (scipy.stats) and .selection
        # (scipy.optimize, scipy.special), imported with the package.
        "scipy>=1.10",
        "tensorflow-datasets>=4.9",
        # tensorflow-datasets 4.9.10 imports the `importlib_resources`
        # backport but declares it only for Python < 3.9; it came with
        # `etils[epath]` until etils 1.14 dropped it. Without it every
        # tfds dataset fails (tensorflow/datasets#11212).
        "importlib_resources",
        # The embedded default dataset (scikit-learn's bundled digits) and
        # the report's plots.
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "tensorboard",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel",
            # tests/test_backends.py runs the core tests on JAX too.
            "jax>=0.7.1",
            # tests/test_export.py runs the ONNX export in onnxruntime.
            "tf2onnx>=1.16.1",
            "onnxruntime>=1.17",
        ],
        # `keras-snapshot export --format onnx` / export_ensemble(...,
        # format="onnx"): Keras converts with tf2onnx (patched by Keras for
        # numpy 2); onnxruntime runs the file.
        "onnx": ["tf2onnx>=1.16.1", "onnx>=1.16", "onnxruntime>=1.17"],
        # 0.7.1 added `jax.set_mesh`, which Keras's JAX distribution uses.
        "jax": ["jax>=0.7.1"],
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
