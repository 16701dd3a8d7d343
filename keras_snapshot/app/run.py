"""The run directory of `keras-snapshot` and the settings of a run.

`run.json` (settings, training status), `snapshots/`, the ensemble and the
report. No TensorFlow or Keras import at module level: `--help` stays fast.
"""

import contextlib
import json
import math
import os
import shutil
import tempfile

RUN_FILE = "run.json"
SNAPSHOT_DIR = "snapshots"
BASELINE_FILE = "baseline.keras"
FREEZEOUT_FILE = "freezeout.keras"
BACKUP_DIR = "backup"
# Written by `keras-snapshot distill`; the report keeps it (`report.py`).
STUDENT_FILE = "student.keras"
# Everything a run writes into its folder: all that --overwrite may remove.
RUN_OUTPUTS = (
    RUN_FILE,
    SNAPSHOT_DIR,
    BACKUP_DIR,
    BASELINE_FILE,
    FREEZEOUT_FILE,
    "ensemble.keras",
    "saved_model",
    "classes.json",
    "report.json",
    "report.md",
    "learning_rate.png",
    "error_vs_snapshots.png",
    "reliability.png",
    "disagreement.png",
    "swa.keras",
    "swa_state",
    STUDENT_FILE,
    "ensemble.tflite",
    "ensemble.onnx",
    "evaluation_train.json",
    "evaluation_val.json",
    "evaluation_test.json",
)
# Settings that define a run: resuming with other values is refused.
RUN_KEYS = (
    "dataset",
    "data",
    "image_size",
    "channels",
    "test_fraction",
    "method",
    "model",
    "epochs",
    "num_snapshots",
    "learning_rate",
    "batch_size",
    "momentum",
    "weight_decay",
    "augment",
    "validation_fraction",
    "seed",
    "recalibrate_bn",
    "freezeout",
    "t0",
    "freezeout_scaling",
    "scale_lr",
)
# Values of run keys added later, for runs written before them.
RUN_KEY_DEFAULTS = {
    "data": None,
    "image_size": None,
    "channels": None,
    "test_fraction": 0.2,
    "method": "snapshot",
    "freezeout": False,
    "t0": 0.8,
    "freezeout_scaling": "cubic",
    "scale_lr": True,
}


class UsageError(Exception):
    """A mistake in the command line: reported in one line, exit code 2.

    Any other exception is a bug and keeps its traceback.
    """


@contextlib.contextmanager
def as_usage_error():
    """Reports the input errors of the block as a `UsageError`.

    Wrap only public-API calls on what the user typed: there a
    `ValueError`, `FileNotFoundError`, `PermissionError` or `ImportError`
    is the input's fault; elsewhere these errors are bugs.
    """
    try:
        yield
    except (ValueError, FileNotFoundError, PermissionError, ImportError) as e:
        raise UsageError(str(e)) from e


def check_has_ensemble(run: dict, run_dir: str, command: str) -> None:
    """Refuses a FreezeOut run (one model, no ensemble) for `command`."""
    if not run["config"].get("freezeout", False):
        return
    raise UsageError(
        f"{run_dir} is a FreezeOut run: it holds one model, {FREEZEOUT_FILE}, "
        f"and no snapshot ensemble to {command}. Its scores are in "
        "report.json; for an ensemble, train without --freezeout in "
        "another --output-dir."
    )


def check_finished(run: dict, run_dir: str, command: str, allow: bool):
    """Refuses a run whose training has not finished, unless `allow`:
    its snapshots are a partial ensemble."""
    if run.get("status") == "trained":
        return
    if not allow:
        raise UsageError(
            f"{run_dir} has not finished training (status: "
            f"{run.get('status')!r}): run the same `keras-snapshot train` "
            f"again to finish it, or pass --allow-unfinished to {command} "
            "the snapshots it has."
        )
    print(f"Note: {run_dir} has not finished training; using its snapshots.")


def read_run(run_dir: str) -> dict:
    """The contents of `run_dir/run.json`, or a `UsageError`."""
    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(path):
        raise UsageError(
            f"{run_dir} is not a keras-snapshot run directory (no {RUN_FILE});"
            " create one with `keras-snapshot train --output-dir ...`."
        )
    try:
        with open(path) as f:
            run = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not readable JSON ({e}).") from None
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
        raise UsageError(
            f'{path} has no run settings (a "config" object): it was not '
            "written by keras-snapshot train, or was edited by hand."
        )
    return run


def write_run(run_dir: str, run: dict) -> None:
    from keras_snapshot import _fs

    _fs.write_json(os.path.join(run_dir, RUN_FILE), run)


def _ensure_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UsageError(
            f"cannot write to the output directory {directory}: "
            f"{e.strerror or e}. Choose a writable --output-dir."
        ) from None


def _contents(run_dir: str) -> list:
    """The folder's entries, less the lock this process holds on it."""
    from keras_snapshot._lock import LOCK_NAME

    return [name for name in os.listdir(run_dir) if name != LOCK_NAME]


def lock_run_dir(run_dir: str):
    """Locks the run folder for this command, creating it if needed.

    A symbolic link is locked as its folder, so a second command is refused
    whichever it names. Returns the held `FolderLock`, or None for a path
    that is not a run folder (then `start_or_resume` says why).
    """
    from keras_snapshot._lock import DirectoryLockedError
    from keras_snapshot._lock import FolderLock

    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        return None  # A file, or a link to nothing.
    is_run = os.path.isfile(os.path.join(run_dir, RUN_FILE))
    if os.path.isdir(run_dir) and _contents(run_dir) and not is_run:
        return None  # Someone else's folder: touched by nobody.
    _ensure_writable(run_dir)
    lock = FolderLock(run_dir, what="run folder")
    try:
        lock.acquire()
    except DirectoryLockedError as e:
        raise UsageError(str(e)) from None
    _LOCKED.append(lock)
    return lock


_LOCKED = []


def release_run_dirs() -> None:
    """Unlocks the run folders this process locked (the command is over)."""
    while _LOCKED:
        _LOCKED.pop().release()


def _same_setting(key: str, recorded: dict, config: dict) -> bool:
    """Whether a run's recorded `key` is `config[key]`; a relative model
    path recorded by an older run equals its absolute path."""
    old = recorded.get(key, RUN_KEY_DEFAULTS.get(key))
    new = config[key]
    if old == new:
        return True
    return (
        key == "model"
        and isinstance(old, str)
        and not os.path.isabs(old)
        and os.path.isabs(new)
        and os.path.abspath(old) == new
    )


def start_or_resume(config: dict, overwrite: bool) -> dict:
    """The run in `config["output_dir"]`: a new one, or the one to resume.

    Resuming with other settings (`RUN_KEYS`) is refused; `overwrite` first
    deletes the run's own files (`remove_run`), then starts anew.
    """
    run_dir = config["output_dir"]
    removed = overwrite and os.path.lexists(run_dir)
    if removed:
        remove_run(run_dir)
    if os.path.isfile(os.path.join(run_dir, RUN_FILE)):
        run = read_run(run_dir)
        differ = [
            f"{key}: {run['config'].get(key)!r} != {config[key]!r}"
            for key in RUN_KEYS
            if not _same_setting(key, run["config"], config)
        ]
        if differ:
            raise UsageError(
                f"{run_dir} holds a run with other settings ("
                + "; ".join(differ)
                + "). Use another --output-dir, or --overwrite to start over."
            )
        return run
    if not removed and os.path.isdir(run_dir) and _contents(run_dir):
        raise UsageError(
            f"the output directory {run_dir} exists and is not a "
            "keras-snapshot run; choose another --output-dir."
        )
    _ensure_writable(run_dir)
    run = {"config": config, "status": "new"}
    write_run(run_dir, run)
    return run


def remove_run(run_dir: str) -> None:
    """Deletes a run's own files (`RUN_OUTPUTS`) and nothing else.

    Refuses a path that holds no run, so `--overwrite` never deletes
    someone's data; a link to a run folder is kept, its run files removed.
    """
    if not os.path.isdir(run_dir):
        raise UsageError(
            f"--overwrite replaces a keras-snapshot run folder, and {run_dir} "
            "is not a folder: choose another --output-dir."
        )
    if not os.path.isfile(os.path.join(run_dir, RUN_FILE)):
        if not _contents(run_dir):
            return
        raise UsageError(
            f"--overwrite only replaces a keras-snapshot run, and {run_dir} "
            f"holds no {RUN_FILE}: nothing was deleted. Choose another "
            "--output-dir."
        )
    for name in RUN_OUTPUTS:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def start_training(run: dict, run_dir: str) -> bool:
    """Records in `run.json` that training starts or resumes; False if it
    already ended."""
    if run["status"] == "trained":
        print("Training already finished; evaluating what it saved.")
        return False
    if run["status"] == "training":
        print("Resuming the interrupted run from its last backup.")
    run["status"] = "training"
    write_run(run_dir, run)
    return True


def load_data(config: dict, data_dir=None):
    """The run's data (`--data` or `--dataset`), split as for training;
    `open_dataset`'s errors as a `UsageError`."""
    from keras_snapshot.app.datasets import open_dataset

    size = config.get("image_size")
    with as_usage_error():
        return open_dataset(
            data_source(config),
            data_dir=data_dir,
            validation_fraction=config["validation_fraction"],
            seed=config["seed"],
            test_fraction=config.get("test_fraction", 0.2),
            image_size=None if size is None else tuple(size),
            channels=config.get("channels"),
            # 255 for a model that scales its own input (pipeline.py).
            pixel_max=config.get("pixel_max", 1),
        )


def data_source(config: dict) -> str:
    """The run's data as the user named it: `--data`'s path, or the name."""
    return config.get("data") or config["dataset"]


def check_split(data, name: str) -> None:
    """Refuses an empty `"train"`, `"val"` or `"test"` split."""
    if data.count(name) == 0:
        raise UsageError(
            f"the {name} split of {data.name} is empty; choose another split "
            "or a --validation-fraction above 0."
        )


def steps_per_epoch(config: dict, data) -> int:
    """Optimizer steps in one epoch over the training split (computed here
    only: the schedule, the baseline and the printed plan use it)."""
    return math.ceil(data.count("train") / config["batch_size"])
