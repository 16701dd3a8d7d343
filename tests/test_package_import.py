"""`import keras_snapshot`: lazy, yet Keras finds the registered objects.

The package never imports Keras by itself (so that `--help` does not pay
for TensorFlow), and registers its serializable objects as soon as Keras
is imported, whichever import comes first. Each case runs in a fresh
interpreter, since the test process has imported Keras already.
"""

import os
import subprocess
import sys

import keras
import pytest

import keras_snapshot
from keras_snapshot import SnapshotSchedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGISTERED = (
    'keras.saving.get_registered_object("keras_snapshot>SnapshotSchedule")'
)


def run_python(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def schedule_model(tmp_path_factory):
    """A `.keras` file whose optimizer holds a `SnapshotSchedule`."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    schedule = SnapshotSchedule(0.1, total_steps=20, num_snapshots=2)
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    model.optimizer.build(model.trainable_variables)
    path = str(tmp_path_factory.mktemp("import") / "model.keras")
    model.save(path)
    return path


LOAD = """
import sys
path = sys.argv[1]
{first}
{second}
assert {registered}
model = keras.saving.load_model(path)  # Refused if not registered.
print(model.optimizer.get_config()["learning_rate"]["registered_name"])
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "first, second",
    [
        (
            "import keras_snapshot\nassert 'keras' not in sys.modules",
            "import keras",
        ),
        ("import keras", "import keras_snapshot"),
    ],
    ids=["keras_snapshot_first", "keras_first"],
)
def test_keras_files_load_whichever_import_comes_first(
    schedule_model, first, second
):
    code = LOAD.format(first=first, second=second, registered=REGISTERED)
    result = run_python("-c", code, schedule_model)
    last = result.stdout.strip().splitlines()[-1]
    assert last == "keras_snapshot>SnapshotSchedule"


CHECK_ARGV = """
import sys
sys.argv = [sys.argv[1]]
import keras_snapshot
print(sorted(m for m in ("keras", "tensorflow", "jax") if m in sys.modules))
import keras
assert {registered}
print("registered")
"""


@pytest.mark.slow
@pytest.mark.parametrize("argv0", ["/usr/bin/keras-snapshot", "python", ""])
def test_import_does_not_depend_on_the_program_name(argv0):
    code = CHECK_ARGV.format(registered=REGISTERED)
    lines = run_python("-c", code, argv0).stdout.strip().splitlines()
    assert lines[-2:] == ["[]", "registered"]


def test_python_m_help_imports_neither_keras_nor_tensorflow():
    result = run_python("-X", "importtime", "-m", "keras_snapshot", "--help")
    assert "usage: keras-snapshot" in result.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "keras_snapshot" in imported
    assert not imported & {"keras", "tensorflow", "jax", "torch"}


@pytest.mark.slow
def test_the_import_hook_outlives_a_probe_and_is_gone_once_used():
    code = """
import importlib.util
import sys
import keras_snapshot
hooks = [f for f in sys.meta_path if type(f).__module__ == "keras_snapshot"]
assert len(hooks) == 1, hooks
# Libraries probe for Keras without importing it: the hook stays.
assert importlib.util.find_spec("keras") is not None
assert "keras" not in sys.modules and hooks[0] in sys.meta_path
import keras
assert {registered}
assert not [f for f in sys.meta_path if type(f).__module__ == "keras_snapshot"]
assert "exec_module" not in vars(keras.__spec__.loader)
print("removed")
"""
    code = code.format(registered=REGISTERED)
    assert run_python("-c", code).stdout.strip().endswith("removed")


@pytest.mark.slow
def test_a_public_name_is_the_first_use_of_keras():
    """`keras_snapshot.select_snapshots` before any `import keras`: the
    first submodule imports Keras, whose hook must not import the package
    again halfway (once: "partially initialized module")."""
    result = run_python(
        "-c",
        "import sys, keras_snapshot\n"
        "assert 'keras' not in sys.modules\n"
        "print(keras_snapshot.select_snapshots.__name__)\n"
        "import keras\n"
        "print(keras.saving.get_registered_object("
        "'keras_snapshot>SnapshotSchedule').__name__)\n",
    )
    assert result.stdout.split() == ["select_snapshots", "SnapshotSchedule"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "statement",
    [
        "from keras_snapshot.checkpoint import SnapshotCheckpoint",
        "from keras_snapshot.averaging import WeightAveraging",
        "from keras_snapshot.freezeout import FreezeOut",
        "from keras_snapshot.schedule import SnapshotSchedule",
        "from keras_snapshot import FreezeOut",
    ],
)
def test_a_submodule_can_be_the_first_import(statement):
    """Its own `import keras` fires the hook, which must not import a
    module of the package that needs the half-imported one."""
    result = run_python(
        "-c",
        f"import sys\n{statement}\nimport keras\n"
        "assert 'keras' in sys.modules\n"
        "for name in ('SnapshotSchedule', 'FGESchedule', "
        "'TemperatureScaling'):\n"
        "    assert keras.saving.get_registered_object("
        "f'keras_snapshot>{name}') is not None, name\n"
        "print('ok')\n",
    )
    assert result.stdout.split() == ["ok"]


def test_the_hook_imports_only_modules_that_import_no_keras_module():
    """`KERAS_OBJECT_MODULES` may use only `_checks` of the package."""
    from test_layering import PACKAGE
    from test_layering import imported_modules

    for name in keras_snapshot.KERAS_OBJECT_MODULES:
        path = os.path.join(PACKAGE, f"{name}.py")
        assert imported_modules(path) <= {"_checks"}, name


# The public API (docs/api.md) and the names of 0.5 ------------------------

PUBLIC = [
    "AveragedModelCheckpoint",
    "FGESchedule",
    "FreezeOut",
    "SnapshotCheckpoint",
    "SnapshotSchedule",
    "WeightAveraging",
    "average_weights",
    "build_ensemble",
    "distill",
    "estimate_speedup",
    "export_ensemble",
    "fit_temperature",
    "load_example_data",
    "load_snapshots",
    "metrics",
    "read_manifest",
    "recalibrate_batchnorm",
    "select_snapshots",
    "snapshot_paths",
]


def test_the_public_api_is_the_table_in_docs_api_md():
    assert keras_snapshot.__all__ == PUBLIC
    names = [f"`{n}`" for n in PUBLIC if n != "metrics"]
    names += [f"`metrics.{n}`" for n in keras_snapshot.metrics.__all__]
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        table = [line for line in f if line.startswith("| ")]
    in_table = {line.split("|")[2].strip() for line in table[1:]}
    assert set(names) <= in_table
    assert len(names) <= 25


@pytest.mark.parametrize(
    "old, new",
    [
        ("combine_members", "build_ensemble"),
        ("SnapshotDirectory", "read_manifest"),
        ("SnapshotSelection", "select_snapshots"),
        ("greedy_soup", "method='greedy'"),
    ],
)
def test_old_names_warn_and_name_the_new_one(old, new):
    with pytest.warns(DeprecationWarning, match=new):
        assert callable(getattr(keras_snapshot, old))


def test_a_removed_name_says_what_to_write():
    with pytest.raises(AttributeError, match="average_batchnorm=True"):
        keras_snapshot.StochasticWeightAveraging  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        keras_snapshot.nothing  # noqa: B018


def test_old_names_of_the_package_give_the_new_objects():
    with pytest.warns(DeprecationWarning):
        assert keras_snapshot.combine_members(
            [keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])]
        ).output_shape == (None, 2)
