"""keras-snapshot: Snapshot Ensembles for Keras 3.

Train one network with a cyclic cosine learning rate, save a snapshot at the
end of every cycle, and average the snapshots' softmax outputs (Huang et al.
2017, "Snapshot Ensembles: Train 1, get M for free", arXiv:1704.00109).
"""

from keras_snapshot.batchnorm import recalibrate_batchnorm
from keras_snapshot.checkpoint import SnapshotCheckpoint
from keras_snapshot.ensemble import build_ensemble
from keras_snapshot.ensemble import export_ensemble
from keras_snapshot.ensemble import load_snapshots
from keras_snapshot.ensemble import snapshot_paths
from keras_snapshot.manifest import read_manifest
from keras_snapshot.schedule import SnapshotSchedule

__version__ = "0.1.0"

__all__ = [
    "SnapshotCheckpoint",
    "SnapshotSchedule",
    "build_ensemble",
    "export_ensemble",
    "load_snapshots",
    "read_manifest",
    "recalibrate_batchnorm",
    "snapshot_paths",
]
