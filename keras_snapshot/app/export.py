"""The export step of `keras-snapshot`: the chosen ensemble, saved twice.

Writes `ensemble.keras` (reloads with `keras.saving.load_model`) and
`saved_model/` (TensorFlow SavedModel, for serving) into one folder.
`keras-snapshot train` exports into its run directory;
`keras-snapshot export RUN OUT` into a new folder `OUT`.
"""

import os
import shutil

from keras_snapshot import build_ensemble
from keras_snapshot import export_ensemble
from keras_snapshot import selection
from keras_snapshot import snapshot_paths
from keras_snapshot.app import run as run_lib
from keras_snapshot.app.evaluate import evaluate_run

ENSEMBLE_FILE = "ensemble.keras"
SAVED_MODEL_DIR = "saved_model"


def chosen_snapshots(run_dir: str, weights=None):
    """Paths of the run's snapshots and weights for `build_ensemble`.

    `weights` (one per snapshot, from `selection.choose_members`) may leave
    members out with a zero; `None` keeps all snapshots, unweighted.
    """
    paths = snapshot_paths(os.path.join(run_dir, run_lib.SNAPSHOT_DIR))
    if weights is None:
        return paths, None
    paths, weights = selection.members_and_weights(paths, weights)
    return paths, weights.tolist()


def check_output(output: str, overwrite: bool) -> None:
    """Refuses to write over an existing file or non-empty folder.

    With `overwrite`, a file at `output` is deleted and a folder keeps
    everything but the two exported entries, which are replaced.
    """
    exists = os.path.isfile(output) or (
        os.path.isdir(output) and os.listdir(output)
    )
    if exists and not overwrite:
        kind = "file" if os.path.isfile(output) else "folder"
        raise run_lib.UsageError(
            f"the output {output} is an existing {kind}; choose a new path, "
            "or pass --overwrite to replace it."
        )
    if os.path.isfile(output) or os.path.islink(output):
        os.remove(output)


def export_files(output: str, snapshots, weights=None, temperature=None):
    """Builds the ensemble and writes `ENSEMBLE_FILE` and `SAVED_MODEL_DIR`."""
    ensemble = build_ensemble(
        snapshots, weights=weights, temperature=temperature
    )
    os.makedirs(output, exist_ok=True)
    saved_model = os.path.join(output, SAVED_MODEL_DIR)
    if os.path.isdir(saved_model):
        shutil.rmtree(saved_model)
    ensemble.save(os.path.join(output, ENSEMBLE_FILE))
    export_ensemble(ensemble, saved_model)
    return ensemble


def export_command(args) -> int:
    """`keras-snapshot export RUN_DIR OUTPUT`: export a run's ensemble."""
    run = run_lib.read_run(args.run_dir)
    check_output(args.output, args.overwrite)
    weights = None
    if args.select != "all":
        data = run_lib.load_data(run["config"], args.data_dir)
        _, probs = evaluate_run(args.run_dir, data, splits=("val",))
        if "val" not in probs:
            raise run_lib.UsageError(
                "--select needs a validation split; this run has none."
            )
        weights = selection.choose_members(
            probs["val"], data.y_val, args.select
        )
    snapshots, weights = chosen_snapshots(args.run_dir, weights)
    if args.last is not None:
        if args.last > len(snapshots):
            raise run_lib.UsageError(
                f"--last must be at most the number of snapshots "
                f"({len(snapshots)}), received {args.last}."
            )
        snapshots = snapshots[-args.last :]
        weights = None if weights is None else weights[-args.last :]
    export_files(args.output, snapshots, weights)
    print(
        f"Exported an ensemble of {len(snapshots)} snapshots to "
        f"{os.path.join(args.output, ENSEMBLE_FILE)} and "
        f"{os.path.join(args.output, SAVED_MODEL_DIR)}"
    )
    return 0
