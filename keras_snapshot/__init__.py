"""keras-snapshot: Snapshot Ensembles for Keras 3.

Train one network with a cyclic cosine learning rate, save a snapshot at the
end of every cycle, and average the snapshots' softmax outputs (Huang et al.
2017, "Snapshot Ensembles: Train 1, get M for free", arXiv:1704.00109).

Layers, bottom to top (imports only go down; `tests/test_layering.py`):

- core: `schedule`, `checkpoint`, `manifest`, `loading`, `ensemble`,
  `batchnorm`, `layers`, `averaging`, `fge`, `distill`, `freezeout`;
- analysis: `metrics`, `selection`;
- application: `keras_snapshot.app` (command line, report, data, models).

Importing the package registers its serializable objects with Keras, so
`.keras` files that use them load after `import keras_snapshot`. The one
exception is the `keras-snapshot` program itself, so that `--help` and
`--version` answer without importing TensorFlow: it imports the rest as soon
as it runs a command.
"""

import importlib
import os
import sys

__version__ = "0.2.0"

_EXPORTS = {
    "FGESchedule": "fge",
    "FreezeOut": "freezeout",
    "SnapshotCheckpoint": "checkpoint",
    "SnapshotDirectory": "manifest",
    "SnapshotSchedule": "schedule",
    "SnapshotSelection": "selection",
    "StochasticWeightAveraging": "averaging",
    "average_weights": "averaging",
    "build_ensemble": "ensemble",
    "combine_members": "ensemble",
    "distill": "distill",
    "estimate_speedup": "freezeout",
    "export_ensemble": "ensemble",
    "load_snapshots": "loading",
    "read_manifest": "manifest",
    "recalibrate_batchnorm": "batchnorm",
    "select_snapshots": "selection",
    "snapshot_paths": "loading",
}
_MODULES = ("metrics", "selection")
__all__ = sorted([*_EXPORTS, *_MODULES])


def import_all() -> None:
    """Imports every public name (and registers the Keras objects)."""
    for name in _MODULES:
        globals()[name] = importlib.import_module(f"keras_snapshot.{name}")
    for name, module in _EXPORTS.items():
        module = importlib.import_module(f"keras_snapshot.{module}")
        globals()[name] = getattr(module, name)


def __getattr__(name):
    if name in _EXPORTS or name in _MODULES:
        import_all()
        return globals()[name]
    raise AttributeError(f"module 'keras_snapshot' has no attribute {name!r}")


if os.path.basename(sys.argv[0] if sys.argv else "") != "keras-snapshot":
    import_all()
