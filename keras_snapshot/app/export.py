"""The export step of `keras-snapshot`: the chosen ensemble, saved twice.

`ensemble.keras` and one serving format (`saved_model/`, or `saved_model/N/`
with `--serving-version N`, `ensemble.tflite`, `ensemble.onnx`), whose
output is `probabilities`; `classes.json` names output i's class.
"""

import importlib.util
import os
import shutil
import tempfile

import keras

from keras_snapshot import _fs
from keras_snapshot import build_ensemble
from keras_snapshot import export_ensemble
from keras_snapshot import selection
from keras_snapshot import snapshot_paths
from keras_snapshot.app import run as run_lib
from keras_snapshot.app.evaluate import evaluate_run
from keras_snapshot.app.pipeline import data_warning

ENSEMBLE_FILE = "ensemble.keras"
SAVED_MODEL_DIR = "saved_model"
# The class names, a JSON list: entry i names output i of `probabilities`.
CLASSES_FILE = "classes.json"
# `--format` -> the entry written next to ENSEMBLE_FILE.
FORMAT_ENTRIES = {
    "saved_model": SAVED_MODEL_DIR,
    "tflite": "ensemble.tflite",
    "onnx": "ensemble.onnx",
}


def chosen_snapshots(run_dir: str, weights=None):
    """Paths of the run's snapshots and weights for `build_ensemble`;
    a zero weight leaves a member out, `None` keeps all unweighted."""
    with run_lib.as_usage_error():
        paths = snapshot_paths(os.path.join(run_dir, run_lib.SNAPSHOT_DIR))
    if weights is None:
        return paths, None
    paths, weights = selection.members_and_weights(paths, weights)
    return paths, weights.tolist()


def check_output(
    output: str, overwrite: bool, format="saved_model", serving_version=None
) -> None:
    """Refuses an output an export must not write over, in one line.

    Overwrite safety: without `overwrite`, a non-empty folder or a dangling
    link is refused; even with it, a file at `output` or an entry of the
    wrong kind (`_check_entries`). With it, only exported entries are
    replaced, once the new export is complete.
    """
    if os.path.islink(output) and not os.path.exists(output):
        target = os.readlink(output)
        if not overwrite:
            raise run_lib.UsageError(
                f"the output {output} is a symbolic link to {target}, which "
                "does not exist: create that folder, or pass --overwrite to "
                "replace the link with a new folder."
            )
        print(
            f"Note: replacing the symbolic link {output} (to {target}, "
            "which does not exist) with the export folder."
        )
        return
    if os.path.lexists(output) and not os.path.isdir(output):
        raise run_lib.UsageError(
            f"the output {output} is an existing file, and --overwrite "
            "replaces an earlier export, never a file: choose a new path, or "
            "move the file away."
        )
    if not os.path.isdir(output):
        return
    _check_entries(output, format, serving_version)
    if os.listdir(output) and not overwrite:
        raise run_lib.UsageError(
            f"the output {output} is an existing folder; choose a new path, "
            "or pass --overwrite to replace the exported files in it."
        )


def _check_entries(output: str, format: str, serving_version) -> None:
    """Refuses an entry of `output` that is not what an export writes there.

    An entry of another kind, a link to a folder, or any link at
    `CLASSES_FILE` was not written by an export and is never replaced.
    """
    entry = format_entry(format, serving_version)
    wanted = {ENSEMBLE_FILE: "file", entry: "file", CLASSES_FILE: "file"}
    if format == "saved_model":
        wanted[SAVED_MODEL_DIR] = wanted[entry] = "folder"
    for name, want in wanted.items():
        path = os.path.join(output, name)
        if not os.path.lexists(path):
            continue
        if os.path.islink(path) and (
            want == "folder" or os.path.isdir(path) or name == CLASSES_FILE
        ):
            found = "symbolic link"
        elif os.path.isdir(path):
            found = "folder"
        else:
            found = "file"
        if found != want:
            raise run_lib.UsageError(
                f"{path} is a {found} where the export writes a {want}, so "
                "even --overwrite keeps it: move it away, or choose another "
                "output."
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
    classes=None,
):
    """Builds the ensemble; writes `ENSEMBLE_FILE` and the format's entry.

    With `classes` (the class names, label i first), `CLASSES_FILE` too.

    Written into a scratch folder, then moved into `output` once complete:
    a failed export leaves what was there. Other `saved_model/` versions
    are kept; a link to a folder is kept, a dangling link replaced.
    """
    ensemble = build_ensemble(
        snapshots, weights=weights, temperature=temperature
    )
    output = os.path.normpath(output)
    _check_entries(output, format, serving_version)
    # A folder (or a link to one) holds the scratch folder itself, so that
    # the entries move within one file system; the link is kept.
    parent = output if os.path.isdir(output) else os.path.dirname(output)
    os.makedirs(parent or ".", exist_ok=True)
    scratch = tempfile.mkdtemp(dir=parent or ".", prefix=".export-")
    try:
        entry = format_entry(format, serving_version)
        new_entry = os.path.join(scratch, entry)
        os.makedirs(os.path.dirname(new_entry), exist_ok=True)
        export_ensemble(
            ensemble, new_entry, format=format, quantization=quantization
        )
        ensemble.save(os.path.join(scratch, ENSEMBLE_FILE))
        if classes is not None:
            _fs.write_json(os.path.join(scratch, CLASSES_FILE), list(classes))
        if os.path.islink(output) and not os.path.exists(output):
            os.remove(output)  # A link to nothing, with --overwrite.
        os.makedirs(output, exist_ok=True)
        _move_into_place(new_entry, os.path.join(output, entry))
        _move_into_place(
            os.path.join(scratch, ENSEMBLE_FILE),
            os.path.join(output, ENSEMBLE_FILE),
        )
        if classes is not None:
            _move_into_place(
                os.path.join(scratch, CLASSES_FILE),
                os.path.join(output, CLASSES_FILE),
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
    check_output(args.output, args.overwrite, args.format, args.serving_version)
    weights = None
    if args.select != "all":
        data = run_lib.load_data(run["config"], args.data_dir)
        warning = data_warning(run, data, "--select chooses on it as it is")
        if warning:
            print(warning)
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
        classes=run.get("classes"),
    )
    entry = format_entry(args.format, args.serving_version)
    print(
        f"Exported an ensemble of {len(snapshots)} snapshots to "
        f"{os.path.join(args.output, ENSEMBLE_FILE)} and "
        f"{os.path.join(args.output, entry)} (output: probabilities)"
    )
    return 0
