"""What the package requires, and what it does without its optional parts.

tensorflow-datasets is optional (the `tensorflow`, `tensorflow-cpu` and
`datasets` extras): it pulls a protobuf that TensorFlow 2.18-2.19 refuse,
so `pip install -e .` next to an installed TensorFlow must not bring it.
"""

import os
import re
import sys
from unittest import mock

import pytest

from keras_snapshot.app import cli
from keras_snapshot.app.datasets import load_dataset
from keras_snapshot.app.datasets import open_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_arguments():
    """The keyword arguments setup.py passes to `setuptools.setup`."""
    import setuptools

    with open(os.path.join(ROOT, "setup.py")) as f:
        code = compile(f.read(), "setup.py", "exec")
    with mock.patch.object(setuptools, "setup") as setup:
        exec(code, {"__file__": os.path.join(ROOT, "setup.py")})
    return setup.call_args.kwargs


def _names(requirements):
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in requirements}


def test_a_plain_install_leaves_tensorflow_and_protobuf_alone():
    arguments = _setup_arguments()
    required = _names(arguments["install_requires"])
    assert "keras" in required
    assert not required & {
        "tensorflow",
        "tensorflow-cpu",
        "tensorflow-datasets",
        "protobuf",
    }
    extras = arguments["extras_require"]
    for extra in ("tensorflow", "tensorflow-cpu", "datasets"):
        assert {
            "tensorflow-datasets",
            "importlib_resources",
            "tensorflow-metadata",
        } <= _names(extras[extra]), extra
    assert "tensorflow" in _names(extras["tensorflow"])
    assert "tensorflow-cpu" in _names(extras["tensorflow-cpu"])


@pytest.fixture
def without_tfds(monkeypatch):
    # `import tensorflow_datasets` raises ImportError, as where it is not
    # installed.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)


@pytest.mark.parametrize("function", [open_dataset, load_dataset])
def test_a_tfds_name_without_tfds_says_how_to_install_it(
    function, without_tfds
):
    with pytest.raises(ImportError) as info:
        function("cifar10", download=False)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "dataset 'cifar10' needs tensorflow-datasets" in message
    assert "pip install tensorflow-datasets importlib_resources" in message
    assert "Received: name='cifar10'" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_the_install_command_keeps_the_installed_tensorflow(without_tfds):
    # Named with its version, pip keeps it and resolves protobuf against
    # it, instead of upgrading protobuf under TensorFlow 2.18-2.19.
    import importlib.metadata as metadata

    (dist,) = metadata.packages_distributions()["tensorflow"]
    with pytest.raises(ImportError) as info:
        open_dataset("cifar10", download=False)
    name = re.sub(r"[-_.]+", "-", dist).lower()
    assert f'"{name}=={metadata.version(dist)}"' in str(info.value)


def test_the_bundled_data_needs_no_tfds(without_tfds):
    data = open_dataset("fashion_mnist_small")
    assert data.count("test") == 5000
    assert load_dataset("digits").num_classes == 10


def test_the_command_line_says_it_in_one_line(without_tfds, tmp_path, capsys):
    argv = ["train", "--dataset", "cifar10", "--output-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pip install tensorflow-datasets" in err


def test_without_tensorflow_the_package_says_how_to_install_it(
    monkeypatch, tmp_path, capsys
):
    import importlib.util

    import keras_snapshot

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorflow" else real(name, *a),
    )
    with pytest.raises(ImportError, match=r"needs TensorFlow 2\.18") as info:
        keras_snapshot.require_tensorflow()
    assert len(str(info.value).splitlines()) == 1
    assert cli.main(["train", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and 'pip install -e ".[tensorflow]"' in err
    )
    assert not (tmp_path / "run").exists()
