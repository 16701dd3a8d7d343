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
`.keras` files that use them load after `import keras_snapshot`.
"""

from keras_snapshot import metrics
from keras_snapshot import selection
from keras_snapshot.averaging import StochasticWeightAveraging
from keras_snapshot.averaging import average_weights
from keras_snapshot.batchnorm import recalibrate_batchnorm
from keras_snapshot.checkpoint import SnapshotCheckpoint
from keras_snapshot.distill import distill
from keras_snapshot.ensemble import build_ensemble
from keras_snapshot.ensemble import combine_members
from keras_snapshot.ensemble import export_ensemble
from keras_snapshot.fge import FGESchedule
from keras_snapshot.freezeout import FreezeOut
from keras_snapshot.freezeout import estimate_speedup
from keras_snapshot.loading import load_snapshots
from keras_snapshot.loading import snapshot_paths
from keras_snapshot.manifest import SnapshotDirectory
from keras_snapshot.manifest import read_manifest
from keras_snapshot.schedule import SnapshotSchedule
from keras_snapshot.selection import SnapshotSelection
from keras_snapshot.selection import select_snapshots

__version__ = "0.2.0"

__all__ = [
    "FGESchedule",
    "FreezeOut",
    "SnapshotCheckpoint",
    "SnapshotDirectory",
    "SnapshotSchedule",
    "SnapshotSelection",
    "StochasticWeightAveraging",
    "average_weights",
    "build_ensemble",
    "combine_members",
    "distill",
    "estimate_speedup",
    "export_ensemble",
    "load_snapshots",
    "metrics",
    "read_manifest",
    "recalibrate_batchnorm",
    "select_snapshots",
    "selection",
    "snapshot_paths",
]
