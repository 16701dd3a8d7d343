"""Loading snapshots: sources, `last`, verification and safe mode.

The first half of turning a snapshot run into an ensemble: this module turns
a snapshot directory (read through its manifest, every file checked against
its sha256), a list of `.keras` paths or a list of models into a list of
Keras models. `keras_snapshot.ensemble` combines them.
"""

import numbers
import os
import warnings

import keras

from keras_snapshot import manifest as manifest_lib


def _check_last(last, available: int):
    if last is None:
        return available
    if isinstance(last, bool) or not isinstance(last, numbers.Integral):
        raise ValueError(
            "`last` must be a positive integer (the number of most recent "
            f"snapshots to keep). Received: last={last!r}."
        )
    if not 1 <= last <= available:
        raise ValueError(
            f"`last` must be between 1 and the number of snapshots "
            f"({available}). Received: last={last}."
        )
    return int(last)


def snapshot_paths(
    directory: str, last: int | None = None, skip_invalid: bool = False
) -> list[str]:
    """Paths of the verified snapshots of a directory, oldest first.

    Every file is checked against the size and sha256 of the manifest.

    Args:
        directory: A folder written by `SnapshotCheckpoint`.
        last: Keep only the last `last` snapshots.
        skip_invalid: Skip missing or corrupted files with a warning instead
            of raising an error.

    Example:

    ```python
    paths = keras_snapshot.snapshot_paths("snapshots", last=3)
    ```
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"The snapshot directory {directory} does not exist."
        )
    try:
        manifest = manifest_lib.read_manifest(directory)
    except FileNotFoundError:
        found = sorted(
            name for name in os.listdir(directory) if name.endswith(".keras")
        )
        hint = (
            f"It holds {found[:5]}: pass their paths as a list to use them "
            "without a manifest."
            if found
            else "It holds no `.keras` files."
        )
        raise FileNotFoundError(
            f"{directory} has no {manifest_lib.MANIFEST_NAME}, so it was not "
            f"written by SnapshotCheckpoint. {hint}"
        ) from None
    paths = []
    for entry in manifest["snapshots"]:
        try:
            paths.append(manifest_lib.verify_snapshot_file(directory, entry))
        except (OSError, ValueError) as e:
            if not skip_invalid:
                raise
            warnings.warn(f"Skipping snapshot: {e}", stacklevel=2)
    if not paths:
        raise ValueError(
            f"The snapshot directory {directory} has no usable snapshots "
            f"(its manifest lists {len(manifest['snapshots'])}). Train with "
            "SnapshotCheckpoint first."
        )
    return paths[-_check_last(last, len(paths)) :]


def load_snapshots(
    snapshots,
    last: int | None = None,
    safe_mode: bool = True,
    skip_invalid: bool = False,
    custom_objects: dict | None = None,
) -> list:
    """Loads snapshot models from a directory, a list of paths or models.

    Args:
        snapshots: A directory written by `SnapshotCheckpoint` (read through
            its manifest, each file checked against its sha256), a list of
            `.keras` paths, or a list of Keras models.
        last: Keep only the last `last` snapshots.
        safe_mode: Passed to `keras.saving.load_model`; `True` refuses
            snapshots that would run arbitrary code (`Lambda` layers). Set
            `False` only for files you trust.
        skip_invalid: Skip missing or corrupted snapshots with a warning.
        custom_objects: Custom layers or functions needed to load.

    Returns:
        A list of Keras models, oldest snapshot first.

    Example:

    ```python
    members = keras_snapshot.load_snapshots("snapshots", last=3)
    ```
    """
    if isinstance(snapshots, (str, os.PathLike)):
        directory = os.fspath(snapshots)
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"`snapshots` must be a snapshot directory, a list of `.keras`"
                f" paths or a list of models. {directory} is not a directory."
            )
        items = snapshot_paths(directory, skip_invalid=skip_invalid)
    elif isinstance(snapshots, keras.Model):
        items = [snapshots]
    else:
        try:
            items = list(snapshots)
        except TypeError:
            raise TypeError(
                "`snapshots` must be a snapshot directory, a list of `.keras`"
                f" paths or a list of Keras models. Received: {snapshots!r}."
            ) from None
    if not items:
        raise ValueError(
            "`snapshots` is empty: pass at least one snapshot (a directory "
            "written by SnapshotCheckpoint, `.keras` paths or models)."
        )
    items = items[-_check_last(last, len(items)) :]
    models = []
    for item in items:
        if isinstance(item, keras.Model):
            models.append(item)
            continue
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(
                "Each snapshot must be a `.keras` path or a Keras model. "
                f"Received: {item!r} (type {type(item).__name__})."
            )
        models.append(_load_one(os.fspath(item), safe_mode, custom_objects))
    return models


def _load_one(path: str, safe_mode: bool, custom_objects):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Snapshot file {path} does not exist.")
    try:
        return keras.saving.load_model(
            path,
            compile=False,
            safe_mode=safe_mode,
            custom_objects=custom_objects,
        )
    except ValueError as e:
        if "safe_mode" in str(e) or "Lambda" in str(e):
            raise ValueError(
                f"Refusing to load snapshot {path}: it holds code (a Lambda "
                "layer) that would run when loaded. If you trust this file, "
                "pass `safe_mode=False`."
            ) from e
        raise ValueError(f"Could not load snapshot {path}: {e}") from e
    except Exception as e:
        raise ValueError(
            f"Could not load snapshot {path}: {type(e).__name__}: {e}. The "
            "file may be truncated or not a `.keras` model."
        ) from e
