"""Old home of `WeightAveraging` and `AveragedModelCheckpoint`.

Both live in `keras_snapshot.averaging` now; the old names here warn
(`DeprecationWarning`) until keras-snapshot 0.7.
"""

from keras_snapshot import averaging
from keras_snapshot._deprecation import module_getattr

OLD_NAMES = {
    "WeightAveraging": (
        "keras_snapshot.WeightAveraging",
        averaging.WeightAveraging,
    ),
    "AveragedModelCheckpoint": (
        "keras_snapshot.AveragedModelCheckpoint",
        averaging.AveragedModelCheckpoint,
    ),
}
__getattr__ = module_getattr(__name__, OLD_NAMES)
