"""The export step of `keras-snapshot`: the chosen ensemble, saved twice.

Writes `ensemble.keras` (reloads with `keras.saving.load_model`) and one
serving format into one folder: `saved_model/` (TensorFlow SavedModel; with
`--serving-version N`, `saved_model/N/` as TensorFlow Serving expects),
`ensemble.tflite` or `ensemble.onnx`. Every format names its output
`probabilities` (`keras_snapshot.export_ensemble`). `keras-snapshot train`
exports a SavedModel into its run directory; `keras-snapshot export RUN OUT`
into a new folder `OUT`.
"""

import importlib.util
import os
import shutil
import tempfile

import keras

from keras_snapshot import build_ensemble
from keras_snapshot import export_ensemble
from keras_snapshot import selection
from keras_snapshot import snapshot_paths
from keras_snapshot.app import run as run_lib
from keras_snapshot.app.evaluate import evaluate_run

ENSEMBLE_FILE = "ensemble.keras"
SAVED_MODEL_DIR = "saved_model"
# `--format` -> the entry written next to ENSEMBLE_FILE.
FORMAT_ENTRIES = {
    "saved_model": SAVED_MODEL_DIR,
    "tflite": "ensemble.tflite",
    "onnx": "ensemble.onnx",
}


def chosen_snapshots(run_dir: str, weights=None):
    """Paths of the run's snapshots and weights for `build_ensemble`.

    `weights` (one per snapshot, from `selection.choose_members`) may leave
    members out with a zero; `None` keeps all snapshots, unweighted.

    Raises:
        UsageError: when the run's snapshot folder is missing or unusable.
    """
    with run_lib.as_usage_error():
        paths = snapshot_paths(os.path.join(run_dir, run_lib.SNAPSHOT_DIR))
    if weights is None:
        return paths, None
    paths, weights = selection.members_and_weights(paths, weights)
    return paths, weights.tolist()


def check_output(output: str, overwrite: bool) -> None:
    """Refuses to write over an existing file or non-empty folder.

    With `overwrite`, a file at `output` is replaced by the output folder
    and a folder keeps everything but the two exported entries, which are
    replaced; in both cases only once the new export is complete
    (`export_files`).
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


def _move_into_place(new: str, path: str) -> None:
    """Puts `new` at `path`, replacing what is there once `new` is moved.

    A file is replaced atomically (`os.replace`); a folder is renamed
    aside, the new one renamed in, then the old one deleted, so that a
    failure leaves the old or the new entry, never neither.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.isdir(path) and not os.path.islink(path):
        old = tempfile.mkdtemp(dir=os.path.dirname(path) or ".", prefix=".old-")
        os.rename(path, os.path.join(old, "entry"))
        os.rename(new, path)
        shutil.rmtree(old)
    else:
        os.replace(new, path)


def format_entry(format: str = "saved_model", serving_version=None) -> str:
    """The path, relative to the output folder, of the exported format."""
    entry = FORMAT_ENTRIES[format]
    if serving_version is not None:
        entry = os.path.join(entry, str(serving_version))
    return entry


def check_format(format: str, quantization=None, serving_version=None):
    """Refuses options of another format, or a missing ONNX converter."""
    if quantization is not None and format != "tflite":
        raise run_lib.UsageError(
            f"--quantization applies to --format tflite, received "
            f"--format {format}."
        )
    if serving_version is not None and format != "saved_model":
        raise run_lib.UsageError(
            "--serving-version writes a TensorFlow Serving folder and "
            f"applies to --format saved_model, received --format {format}."
        )
    backend = keras.backend.backend()
    if format == "tflite" and backend != "tensorflow":
        raise run_lib.UsageError(
            "--format tflite needs the TensorFlow backend, received "
            f"KERAS_BACKEND={backend}; run with KERAS_BACKEND=tensorflow."
        )
    if (
        format == "onnx"
        and backend == "tensorflow"
        and importlib.util.find_spec("tf2onnx") is None
    ):
        raise run_lib.UsageError(
            "--format onnx needs tf2onnx, which is not installed: "
            'pip install "keras-snapshot[onnx]".'
        )


def export_files(
    output: str,
    snapshots,
    weights=None,
    temperature=None,
    format: str = "saved_model",
    quantization=None,
    serving_version=None,
):
    """Builds the ensemble; writes `ENSEMBLE_FILE` and the format's entry.

    Both are written into a scratch folder next to `output` first, and
    moved into `output` only once both are complete: a failed export
    (a full disk, a converter error) leaves what was there before. The
    entry (`format_entry`) replaces an existing one; with a
    `serving_version`, other versions in `saved_model/` are kept. A file
    at `output` is replaced by the folder.
    """
    ensemble = build_ensemble(
        snapshots, weights=weights, temperature=temperature
    )
    output = os.path.normpath(output)
    parent = os.path.dirname(output) or "."
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=parent, prefix=".export-")
    try:
        entry = format_entry(format, serving_version)
        new_entry = os.path.join(scratch, entry)
        os.makedirs(os.path.dirname(new_entry), exist_ok=True)
        export_ensemble(
            ensemble, new_entry, format=format, quantization=quantization
        )
        ensemble.save(os.path.join(scratch, ENSEMBLE_FILE))
        if os.path.isfile(output) or os.path.islink(output):
            os.remove(output)
        os.makedirs(output, exist_ok=True)
        _move_into_place(new_entry, os.path.join(output, entry))
        _move_into_place(
            os.path.join(scratch, ENSEMBLE_FILE),
            os.path.join(output, ENSEMBLE_FILE),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ensemble


def export_command(args) -> int:
    """`keras-snapshot export RUN_DIR OUTPUT`: export a run's ensemble."""
    run = run_lib.read_run(args.run_dir)
    run_lib.check_has_ensemble(run, args.run_dir, "export")
    run_lib.check_finished(run, args.run_dir, "export", args.allow_unfinished)
    check_format(args.format, args.quantization, args.serving_version)
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
            probs["val"], data.labels("val"), args.select
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
    export_files(
        args.output,
        snapshots,
        weights,
        format=args.format,
        quantization=args.quantization,
        serving_version=args.serving_version,
    )
    entry = format_entry(args.format, args.serving_version)
    print(
        f"Exported an ensemble of {len(snapshots)} snapshots to "
        f"{os.path.join(args.output, ENSEMBLE_FILE)} and "
        f"{os.path.join(args.output, entry)} (output: probabilities)"
    )
    return 0
