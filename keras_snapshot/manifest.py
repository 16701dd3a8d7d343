"""The snapshot directory on disk: atomic writes and the JSON manifest.

A snapshot directory holds one `.keras` file per snapshot and a
`manifest.json` that records, for each snapshot, when it was taken and the
size and sha256 of its file. Files are written to a hidden temporary name and
renamed into place only once complete, and the manifest is replaced
atomically after its file, so an interrupted write never leaves a snapshot
that looks complete.
"""

import hashlib
import json
import os
import shutil
import tempfile
import time

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "keras_snapshot.manifest"
MANIFEST_VERSION = 1
PARTIAL_PREFIX = ".partial-"


def snapshot_filename(index: int) -> str:
    """File name of snapshot `index` (1-based): `snapshot-03.keras`."""
    return f"snapshot-{index:02d}.keras"


def sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_partial_dir(directory: str) -> str:
    """A hidden scratch folder inside `directory` for one write.

    It lives in the same file system as the final file, so that the final
    `os.replace` is atomic; `remove_partial_files` cleans up what an
    interrupted write leaves behind.
    """
    return tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=directory)


def remove_partial_files(directory: str) -> list[str]:
    """Deletes what interrupted writes left in `directory`; returns them."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        if name.startswith(PARTIAL_PREFIX):
            path = os.path.join(directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass
            removed.append(path)
    return removed


def commit_file(temporary_path: str, final_path: str) -> None:
    """Flushes `temporary_path` to disk and renames it to `final_path`."""
    with open(temporary_path, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary_path, final_path)
    _fsync_directory(os.path.dirname(os.path.abspath(final_path)))


def write_json_atomic(path: str, data: dict) -> None:
    """Writes `data` as JSON to `path` through a temporary file and rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(
        prefix=PARTIAL_PREFIX, suffix=".json", dir=directory
    )
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        commit_file(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def new_manifest(cycle_length: int, cycle_end_steps: list[int]) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "cycle_length": int(cycle_length),
        "cycle_end_steps": [int(s) for s in cycle_end_steps],
        "snapshots": [],
    }


def manifest_path(directory: str) -> str:
    return os.path.join(directory, MANIFEST_NAME)


def read_manifest(directory: str) -> dict:
    """Reads and checks `directory/manifest.json`.

    Raises:
        FileNotFoundError: if there is no manifest.
        ValueError: if the manifest is not a valid snapshot manifest.
    """
    path = manifest_path(directory)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No snapshot manifest at {path}. Expected a directory written "
            "by `keras_snapshot.SnapshotCheckpoint`; to use other files, "
            "pass a list of `.keras` paths instead."
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"The snapshot manifest {path} is not valid JSON ({e})."
        ) from e
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(manifest.get("snapshots"), list)
    ):
        raise ValueError(
            f"{path} is not a keras_snapshot manifest: expected a JSON object "
            f'with "format": "{MANIFEST_FORMAT}" and a "snapshots" list.'
        )
    for entry in manifest["snapshots"]:
        if not isinstance(entry, dict) or not {
            "index",
            "file",
            "step",
            "sha256",
            "size",
        } <= set(entry):
            raise ValueError(
                f"The snapshot manifest {path} has a malformed entry: "
                f"{entry!r}. Each entry needs index, file, step, size and "
                "sha256."
            )
        if not all(
            isinstance(entry[key], int) and not isinstance(entry[key], bool)
            for key in ("index", "step", "size")
        ):
            raise ValueError(
                f"The snapshot manifest {path} has an entry whose index, step "
                f"or size is not an integer: {entry!r}. Delete the manifest "
                "and the snapshots, or restore the file written by "
                "SnapshotCheckpoint."
            )
        snapshot_path(directory, entry)  # Checks the path stays inside.
    for key in ("index", "file"):
        values = [entry[key] for entry in manifest["snapshots"]]
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(
                f"The snapshot manifest {path} lists the same {key} more "
                f"than once: {repeated}. Each snapshot may appear only once; "
                "restore the manifest written by SnapshotCheckpoint."
            )
    manifest["snapshots"].sort(key=lambda e: e["index"])
    return manifest


def write_manifest(directory: str, manifest: dict) -> None:
    manifest["snapshots"].sort(key=lambda e: e["index"])
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_atomic(manifest_path(directory), manifest)


def snapshot_path(directory: str, entry: dict) -> str:
    """The path of a manifest entry's file, refusing paths that leave it.

    A manifest may only name plain file names inside its own directory:
    absolute paths, `..` and symbolic links that point elsewhere are refused.
    """
    name = entry.get("file")
    where = manifest_path(directory)
    if (
        not isinstance(name, str)
        or not name
        or os.path.isabs(name)
        or os.path.basename(name) != name
        or name in (".", "..")
    ):
        raise ValueError(
            f"The snapshot manifest {where} names the file {name!r}, which is "
            "not a plain file name inside its directory. Manifest entries "
            "may not point outside the snapshot directory."
        )
    path = os.path.join(directory, name)
    real_directory = os.path.realpath(directory)
    if os.path.dirname(os.path.realpath(path)) != real_directory:
        raise ValueError(
            f"The snapshot file {path} listed in {where} is a link that "
            "points outside the snapshot directory; refusing to load it."
        )
    return path


def verify_snapshot_file(directory: str, entry: dict) -> str:
    """Checks a snapshot file against its manifest entry; returns its path.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if its size or sha256 differ from the manifest.
    """
    path = snapshot_path(directory, entry)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Snapshot {entry['index']} is listed in "
            f"{manifest_path(directory)} but its file {path} is missing."
        )
    size = os.path.getsize(path)
    if size != entry["size"]:
        raise ValueError(
            f"Snapshot file {path} is {size} bytes but the manifest recorded "
            f"{entry['size']}: it is truncated or was replaced."
        )
    digest = sha256_of_file(path)
    if digest != entry["sha256"]:
        raise ValueError(
            f"Snapshot file {path} does not match the sha256 recorded in the "
            f"manifest ({digest} != {entry['sha256']}): it is corrupted or "
            "was replaced."
        )
    return path
