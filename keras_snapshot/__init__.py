"""keras-snapshot: Snapshot Ensembles for Keras 3.

Train one network with a cyclic cosine learning rate, save a snapshot at the
end of every cycle, and average the snapshots' softmax outputs (Huang et al.
2017, "Snapshot Ensembles: Train 1, get M for free", arXiv:1704.00109).

Layers, bottom to top (imports only go down; `tests/test_layering.py`):

- core: `schedule`, `checkpoint`, `manifest`, `loading`, `ensemble`, `export`,
  `batchnorm`, `layers`, `averaging`, `fge`, `distill`,
  `freezeout`;
- analysis: `metrics`, `selection`;
- application: `keras_snapshot.app` (command line, report, data, models).

Importing the package is cheap and never imports Keras: the public names
are imported on first use (PEP 562 `__getattr__`), so that
`keras-snapshot --help` and `python -m keras_snapshot --help` answer without
paying for TensorFlow. Yet Keras loads a `.keras` file that uses a
serializable object of this package (`SnapshotSchedule`, registered with
`keras.saving.register_keras_serializable(package="keras_snapshot")`) only
once that object's module has run. So, after `import keras_snapshot`, the
objects are registered as soon as Keras is there: at once if `keras` is
already imported, else right after `import keras` (a one-shot import hook,
`_RegisterAfterKeras`, that removes itself when used). Either import may
come first. The hook imports only the modules whose objects `.keras` files
hold (`KERAS_OBJECT_MODULES`, which import no other module of the package
that imports Keras), so that a first import such as
`from keras_snapshot.checkpoint import SnapshotCheckpoint`, whose own
`import keras` fires the hook, never meets a half-imported module.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from keras_snapshot import _deprecation

__version__ = "0.6.0"

_EXPORTS = {
    "AveragedModelCheckpoint": "averaging",
    "FGESchedule": "fge",
    "FreezeOut": "freezeout",
    "SnapshotCheckpoint": "checkpoint",
    "SnapshotSchedule": "schedule",
    "WeightAveraging": "averaging",
    "average_weights": "averaging",
    "build_ensemble": "ensemble",
    "distill": "distill",
    "estimate_speedup": "freezeout",
    "export_ensemble": "export",
    "fit_temperature": "selection",
    "load_example_data": "example_data",
    "load_snapshots": "loading",
    "read_manifest": "manifest",
    "recalibrate_batchnorm": "batchnorm",
    "select_snapshots": "selection",
    "snapshot_paths": "loading",
}
_MODULES = ("metrics",)
# The modules that define the objects `.keras` files refer to by name.
KERAS_OBJECT_MODULES = ("schedule", "fge", "layers")
__all__ = sorted([*_EXPORTS, *_MODULES])


def require_tensorflow() -> None:
    """Refuses, in one line, an environment without TensorFlow.

    setup.py leaves TensorFlow to an extra (so that pip never adds a second
    build beside `tensorflow-cpu` or a vendor build), so say how to get it.
    """
    if importlib.util.find_spec("tensorflow") is None:
        raise ImportError(
            "keras-snapshot needs TensorFlow 2.18 or newer (tf.data, "
            "tf.io.gfile, SavedModel export, with either Keras backend), and "
            "it is not installed. Install it with `pip install -e "
            '".[tensorflow]"` in a checkout, or `pip install tensorflow` '
            "(or tensorflow-cpu)."
        )


def import_all() -> None:
    """Imports every public name (and registers the Keras objects)."""
    require_tensorflow()
    for name in _MODULES:
        globals()[name] = importlib.import_module(f"keras_snapshot.{name}")
    for name, module in _EXPORTS.items():
        module = importlib.import_module(f"keras_snapshot.{module}")
        globals()[name] = getattr(module, name)


# Public names of 0.5 that are not public any more (docs/api.md).
OLD_NAMES = {
    "combine_members": (
        "keras_snapshot.build_ensemble(models, weights=...)",
        "ensemble:combine_members",
    ),
    "SnapshotDirectory": (
        "keras_snapshot.read_manifest or keras_snapshot.snapshot_paths",
        "manifest:SnapshotDirectory",
    ),
    "SnapshotSelection": (
        "the result of keras_snapshot.select_snapshots",
        "selection:SnapshotSelection",
    ),
    "greedy_soup": (
        "keras_snapshot.average_weights(models, method='greedy', "
        "validation_data=...)",
        "averaging:greedy_soup",
    ),
    "StochasticWeightAveraging": (
        "keras_snapshot.WeightAveraging(mode='swa', average_batchnorm=True)",
        None,
    ),
}
_old_name = _deprecation.module_getattr(__name__, OLD_NAMES)


def __getattr__(name):
    if name in _EXPORTS or name in _MODULES:
        import_all()
        return globals()[name]
    return _old_name(name)


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """Runs `import_all` right after the first `import keras` has run.

    It finds `keras` with the other finders and wraps the `exec_module` of
    that spec's loader. Once Keras is loaded it takes itself off
    `sys.meta_path` and the wrapper off the loader; a mere probe
    (`importlib.util.find_spec("keras")`) leaves it in place.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "keras":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(name, path)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader

        def exec_then_register(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            del loader.exec_module  # The loader's own method again.
            loader.exec_module(module)
            register_keras_objects()

        loader.exec_module = exec_then_register
        return spec


def register_keras_objects() -> None:
    """Registers the objects `.keras` files use (imports their modules)."""
    for name in KERAS_OBJECT_MODULES:
        importlib.import_module(f"keras_snapshot.{name}")


if "keras" in sys.modules:
    register_keras_objects()
else:
    sys.meta_path.insert(0, _RegisterAfterKeras())
