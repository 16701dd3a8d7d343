"""Loading snapshots: sources, `last`, verification and safe mode.

A snapshot directory (every file checked against its manifest), a `.keras`
file, or a list of paths or models become a list of named Keras models.
"""

import collections
import dataclasses
import os
import re
import warnings
import zipfile

import keras
import numpy as np

from keras_snapshot import _fs
from keras_snapshot import manifest as manifest_lib
from keras_snapshot._checks import check_positive_int
from keras_snapshot._keras_compat import nested_layers

Member = collections.namedtuple(
    "Member", ["name", "model", "source"], defaults=[None]
)
"""A loaded member: `name` (`"snapshot_3"`), `model`, `source` (its path,
or None for a model passed in)."""


def describe(member: Member) -> str:
    """`snapshot_3 (path/snapshot-03.keras)` or `snapshot_1 (model 'm')`."""
    where = member.source or f"model {member.model.name!r}"
    return f"{member.name} ({where})"


_SNAPSHOT_FILE = re.compile(r"snapshot-(\d+)\.keras$")


def _check_last(last, available: int) -> int:
    if last is None:
        return available
    between = f"between 1 and the number of snapshots ({available})"
    last = check_positive_int(
        "last",
        last,
        f"It is the number of most recent snapshots to keep, {between}.",
    )
    if last > available:
        raise ValueError(f"`last` must be {between}. Received: last={last}.")
    return last


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
    sources = _directory_sources(directory, skip_invalid)
    return [path for _, path in sources[-_check_last(last, len(sources)) :]]


def _directory_sources(directory, skip_invalid: bool) -> list:
    """`[(name, path)]` of a snapshot directory's verified files."""
    directory = os.fspath(directory)
    if not _fs.isdir(directory):
        raise FileNotFoundError(
            f"The snapshot directory {directory} does not exist."
        )
    folder = manifest_lib.SnapshotDirectory(directory)
    if not folder.has_manifest():
        found = sorted(
            n for n in _fs.listdir(directory) if n.endswith(".keras")
        )
        hint = (
            f"it holds {found[:5]}: pass their paths as a list to use them."
            if found
            else "it holds no `.keras` files."
        )
        raise FileNotFoundError(
            f"{directory} has no {manifest_lib.MANIFEST_NAME} (not written by "
            f"SnapshotCheckpoint), and {hint}"
        )
    manifest = folder.read()
    sources = []
    for entry in manifest.entries:
        try:
            path = folder.verified_path(entry)
        except (OSError, ValueError) as e:
            if not skip_invalid:
                raise
            warnings.warn(f"Skipping snapshot: {e}", stacklevel=3)
            continue
        sources.append((f"snapshot_{entry.index}", path))
    if not sources:
        raise ValueError(
            f"The snapshot directory {directory} has no usable snapshots "
            f"(its manifest lists {len(manifest.entries)}). "
            + _superseded_hint(folder)
        )
    return sources


def _superseded_hint(folder) -> str:
    """How to use the snapshots an earlier run in `folder` set aside."""
    aside = folder.superseded()
    if not aside:
        return "Train with SnapshotCheckpoint first."
    listed = ", ".join(
        f"{path} ({count} snapshot{'s' if count > 1 else ''})"
        for path, count in aside[-5:]
    )
    more = f" and {len(aside) - 5} older" if len(aside) > 5 else ""
    return (
        f"A new run set the earlier run's snapshots aside in {listed}{more}: "
        f"pass that folder instead of {folder.path}, or train this run until "
        "its first snapshot."
    )


def _sources(snapshots, skip_invalid: bool) -> list:
    """`[(name, path or model)]` for any accepted form of `snapshots`."""
    if isinstance(snapshots, (str, os.PathLike)):
        path = os.fspath(snapshots)
        if _fs.isdir(path):
            return _directory_sources(path, skip_invalid)
        if not _fs.exists(path):
            raise FileNotFoundError(
                f"{path} does not exist: `snapshots` must be a snapshot "
                "directory, a `.keras` file, or a list of paths or models."
            )
        items = [path]
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
    names = []
    for position, item in enumerate(items, start=1):
        if isinstance(item, keras.Model):
            names.append(f"snapshot_{position}")
        elif isinstance(item, (str, os.PathLike)):
            match = _SNAPSHOT_FILE.search(os.fspath(item))
            names.append(
                f"snapshot_{int(match.group(1))}"
                if match
                else f"snapshot_{position}"
            )
        else:
            raise TypeError(
                "Each snapshot must be a `.keras` path or a Keras model. "
                f"Received: {item!r} (type {type(item).__name__})."
            )
    if len(set(names)) < len(names):
        names = [f"snapshot_{i}" for i in range(1, len(items) + 1)]
    return list(zip(names, items))


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How snapshots are loaded: the keyword arguments every loader shares.

    Every loader (`load_snapshots`, `build_ensemble`, `select_snapshots`,
    `average_weights`, `distill`) takes these keyword arguments; they are
    checked here, before anything is read.

    Attributes:
        safe_mode: Passed to `keras.saving.load_model`; `True` refuses
            snapshots that would run arbitrary code (`Lambda` layers). Set
            `False` only for files you trust.
        skip_invalid: Skip the missing or corrupted snapshots of a
            directory with a warning, instead of raising an error.
        custom_objects: Custom layers or functions needed to load the
            snapshots, `{name: class or function}`, as for
            `keras.saving.load_model`.
        allow_nonfinite: Accept members with NaN or infinite weights
            (refused by default: their training diverged).

    Example:

    ```python
    ensemble = keras_snapshot.build_ensemble(
        "snapshots", custom_objects={"MyLayer": MyLayer}
    )
    ```
    """

    safe_mode: bool = True
    skip_invalid: bool = False
    custom_objects: dict | None = None
    allow_nonfinite: bool = False

    def __post_init__(self):
        for name in ("safe_mode", "skip_invalid", "allow_nonfinite"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(
                    f"`{name}` must be True or False. Received: "
                    f"{name}={value!r} (type {type(value).__name__})."
                )
        if self.custom_objects is not None and not isinstance(
            self.custom_objects, dict
        ):
            raise TypeError(
                "`custom_objects` must be a dict `{name: class or function}`"
                f" or None. Received: custom_objects={self.custom_objects!r}."
            )


def load_members(
    snapshots,
    last: int | None = None,
    safe_mode: bool = True,
    skip_invalid: bool = False,
    custom_objects: dict | None = None,
    allow_nonfinite: bool = False,
) -> list:
    """Loads snapshots as `Member(name, model)` pairs, oldest first.

    Members are named after their snapshot index (`snapshot_3` for the
    third snapshot of a directory or for `snapshot-03.keras`).

    Args: as `load_snapshots`.

    Example:

    ```python
    for name, model in keras_snapshot.loading.load_members("snapshots"):
        print(name, model.count_params())
    ```
    """
    options = LoadOptions(
        safe_mode=safe_mode,
        skip_invalid=skip_invalid,
        custom_objects=custom_objects,
        allow_nonfinite=allow_nonfinite,
    )
    sources = _sources(snapshots, options.skip_invalid)
    sources = sources[-_check_last(last, len(sources)) :]
    members = []
    for name, item in sources:
        if isinstance(item, keras.Model):
            model = item
        else:
            model = _load_one(os.fspath(item), options)
        if not options.allow_nonfinite and not weights_are_finite(model):
            raise ValueError(
                f"Snapshot {_describe(name, item)} has NaN or infinite "
                "weights (its training diverged). Leave it out (e.g. "
                "`last=`), or pass `allow_nonfinite=True` to use it anyway."
            )
        source = None if isinstance(item, keras.Model) else os.fspath(item)
        members.append(Member(name, model, source))
    return members


def load_snapshots(
    snapshots,
    last: int | None = None,
    safe_mode: bool = True,
    skip_invalid: bool = False,
    custom_objects: dict | None = None,
    allow_nonfinite: bool = False,
) -> list:
    """Loads snapshot models from a directory, a list of paths or models.

    Args:
        snapshots: A directory written by `SnapshotCheckpoint` (read through
            its manifest, each file checked against its sha256), a `.keras`
            path, a list of `.keras` paths, or a list of Keras models.
        last: Keep only the last `last` snapshots.
        safe_mode, skip_invalid, custom_objects, allow_nonfinite: How the
            snapshots are loaded, the same for every loader: see
            `keras_snapshot.loading.LoadOptions`.

    Returns:
        A list of Keras models, oldest snapshot first.

    Example:

    ```python
    members = keras_snapshot.load_snapshots("snapshots", last=3)
    ```
    """
    return [
        member.model
        for member in load_members(
            snapshots,
            last=last,
            safe_mode=safe_mode,
            skip_invalid=skip_invalid,
            custom_objects=custom_objects,
            allow_nonfinite=allow_nonfinite,
        )
    ]


def clone_model(
    model, safe_mode: bool = True, custom_objects: dict | None = None
):
    """A fresh copy of `model`'s architecture, in the mode it was loaded in.

    `keras.models.clone_model(model)`, except with `safe_mode=False`: Keras
    re-creates a `Lambda` layer only outside safe mode, which `clone_model`
    does not leave, so the model is deserialized with `safe_mode=False`.

    Example:

    ```python
    (model,) = load_snapshots("trusted.keras", safe_mode=False)
    student = clone_model(model, safe_mode=False)
    ```
    """
    if safe_mode:
        return keras.models.clone_model(model)
    classes = {}

    def visit(layer):
        classes.setdefault(type(layer).__name__, type(layer))
        for child in getattr(layer, "layers", None) or []:
            visit(child)

    visit(model)
    return keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(model),
        custom_objects={**classes, **(custom_objects or {})},
        safe_mode=False,
    )


def model_with_weights(
    template, arrays: list, safe_mode=True, custom_objects=None
):
    """A new model of `template`'s architecture holding `arrays`.

    The one rebuild path of the package: `clone_model`, then
    `assign_weights`.
    """
    model = clone_model(template, safe_mode, custom_objects)
    if len(model.weights) != len(arrays):
        raise ValueError(
            f"Could not rebuild {template.name!r} with clone_model: the "
            f"clone has {len(model.weights)} variables instead of "
            f"{len(arrays)}; build subclassed models before averaging."
        )
    assign_weights(model, arrays)
    return model


def assign_weights(model, arrays: list) -> None:
    """Puts `arrays` into `model.weights` as loading a `.keras` file does.

    A layer with its own `load_own_variables` (an adapted `Normalization`)
    gets its variables through it, and a traced predict function, which
    would hold the old derived state as constants, is dropped.

    Example:

    ```python
    assign_weights(copy, original.get_weights())
    ```
    """
    for variable, array in zip(model.weights, arrays):
        variable.assign(np.asarray(array).astype(variable.dtype))
    own_loaders = [
        layer
        for layer in nested_layers(model)
        if type(layer).load_own_variables
        is not keras.layers.Layer.load_own_variables
    ]
    for layer in own_loaders:
        store = {}
        layer.save_own_variables(store)
        layer.load_own_variables(store)
    if own_loaders:
        for name in ("predict_function", "test_function"):
            if getattr(model, name, None) is not None:
                setattr(model, name, None)


def is_float(variable) -> bool:
    """Whether `variable` holds floats (the package's one such test)."""
    return "float" in str(variable.dtype)


def weights_are_finite(model) -> bool:
    """Whether every floating-point weight of `model` is finite."""
    return all(
        np.all(np.isfinite(keras.ops.convert_to_numpy(w)))
        for w in model.weights
        if is_float(w)
    )


def _describe(name, item) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return f"{name} (model {item.name!r})"


def _load_one(path: str, options: LoadOptions):
    if not _fs.isfile(path):
        raise FileNotFoundError(f"Snapshot file {path} does not exist.")
    # A remote file is copied to a local temporary file once (as
    # `keras.saving.load_model` would do itself), then checked and read.
    with _fs.local_copy(path) as local:
        if path.endswith(".keras") and not zipfile.is_zipfile(local):
            raise ValueError(
                f"Snapshot file {path} is not a `.keras` model (not a zip "
                "archive: truncated, or another kind of file)."
            )
        try:
            return keras.saving.load_model(
                local,
                compile=False,
                safe_mode=options.safe_mode,
                custom_objects=options.custom_objects,
            )
        except (ValueError, TypeError) as e:
            hint = (
                " If you trust this file, pass `safe_mode=False`."
                if options.safe_mode
                else ""
            )
            raise type(e)(f"Could not load snapshot {path}: {e}{hint}") from e
