"""The snapshot directory on disk: its manifest, atomic writes and a lock.

One `.keras` file per snapshot and a `manifest.json` with each one's step,
size and sha256. Each file is written atomically (`_fs.atomic_write`)
before the manifest lists it, so an interrupted write never leaves a
snapshot that looks complete.
"""

import collections
import dataclasses
import json
import os
import time
import uuid

from keras_snapshot import _fs
from keras_snapshot._lock import LOCK_NAME  # noqa: F401 (re-exported)
from keras_snapshot._lock import DirectoryLockedError  # noqa: F401
from keras_snapshot._lock import FolderLock

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "keras_snapshot.manifest"
MANIFEST_VERSION = 1
PARTIAL_PREFIX = _fs.PARTIAL_PREFIX
SUPERSEDED_PREFIX = "superseded-"
# A manifest of 10,000 snapshots is about 5 MB; anything far larger is not
# one that SnapshotCheckpoint wrote.
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
MAX_MANIFEST_DEPTH = 8
# SnapshotCheckpoint numbers snapshots 1, 2, ... in cycle order, one per
# cycle end: an index beyond this (and beyond the manifest's own cycle
# ends) is not one it wrote.
MAX_SNAPSHOT_INDEX = 10**6

_REQUIRED = ("index", "file", "step", "size", "sha256")


def snapshot_filename(index: int) -> str:
    """File name of snapshot `index` (1-based): `snapshot-03.keras`."""
    return f"snapshot-{index:02d}.keras"


@dataclasses.dataclass
class SnapshotEntry:
    """One snapshot's record in the manifest.

    Attributes:
        index: 1-based snapshot number (cycle).
        file: File name inside the snapshot directory.
        step: Optimizer steps run when it was taken.
        size: File size in bytes.
        sha256: Hex digest of the file.
        epoch: 1-based epoch in which it was taken.
        batch: Batch index within the epoch, or None at an epoch's end.
        learning_rate: The optimizer's rate at the snapshot's last step.
        logs: Training logs available then (strings for NaN/inf).
        finite: False when a weight or a logged loss was NaN or infinite.
        batchnorm_recalibrated: Whether BatchNorm statistics were recomputed.
        saved_at: Local time of the write.
        planned_step: The cycle end this snapshot stands for when loss
            scaling skipped updates and it was taken earlier, at `step`;
            None when taken at its cycle end.
    """

    index: int
    file: str
    step: int
    size: int = 0
    sha256: str = ""
    epoch: int | None = None
    batch: int | None = None
    learning_rate: float | None = None
    logs: dict = dataclasses.field(default_factory=dict)
    finite: bool = True
    batchnorm_recalibrated: bool = False
    saved_at: str | None = None
    planned_step: int | None = None

    def to_json(self) -> dict:
        return _fs.finite_json(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: dict, where: str) -> "SnapshotEntry":
        if not isinstance(data, dict) or not set(_REQUIRED) <= set(data):
            raise ValueError(
                f"The snapshot manifest {where} has a malformed entry: "
                f"{_short(data)}. Each entry needs {', '.join(_REQUIRED)}."
            )
        if not all(
            isinstance(data[key], int) and not isinstance(data[key], bool)
            for key in ("index", "step", "size")
        ):
            raise ValueError(
                f"The snapshot manifest {where} has an entry whose index, "
                f"step or size is not an integer: {_short(data)}; restore "
                "the file written by SnapshotCheckpoint."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclasses.dataclass
class Manifest:
    """The manifest of a snapshot directory: the schedule and the entries."""

    cycle_end_steps: list
    entries: list = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "cycle_end_steps": [int(s) for s in self.cycle_end_steps],
            "snapshots": [e.to_json() for e in self.entries],
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def _depth(value) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_MANIFEST_DEPTH:
            return depth
        children = (
            item.values()
            if isinstance(item, dict)
            else item
            if isinstance(item, list)
            else ()
        )
        stack.extend((child, depth + 1) for child in children)
    return deepest


class SnapshotDirectory:
    """A folder of snapshots and its `manifest.json`.

    The one place that reads, writes, verifies and locks a snapshot folder.

    Args:
        path: The folder.

    Example:

    ```python
    directory = SnapshotDirectory("snapshots")
    paths = [directory.verified_path(e) for e in directory.read().entries]
    ```
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._lock = None

    @property
    def manifest_path(self) -> str:
        return _fs.join(self.path, MANIFEST_NAME)

    def has_manifest(self) -> bool:
        return _fs.isfile(self.manifest_path)

    # Reading ---------------------------------------------------------------

    def read(self) -> Manifest:
        """Reads and checks the manifest.

        Raises:
            FileNotFoundError: if there is no manifest.
            ValueError: if it is not a valid snapshot manifest.
        """
        where = self.manifest_path
        if not _fs.isfile(where):
            raise FileNotFoundError(
                f"No snapshot manifest at {where}: pass a directory written by "
                "SnapshotCheckpoint, or a list of `.keras` paths."
            )
        size = _fs.getsize(where)
        if size > MAX_MANIFEST_BYTES:
            raise ValueError(
                f"The snapshot manifest {where} is {size} bytes, larger than "
                f"SnapshotCheckpoint writes ({MAX_MANIFEST_BYTES}); restore "
                "the manifest it wrote."
            )
        try:
            data = json.loads(
                _fs.read_bytes(where), parse_constant=_refuse_constant
            )
        except RecursionError:
            data = None  # Refused as too deep below.
        except (OSError, ValueError) as e:
            raise ValueError(
                f"The snapshot manifest {where} is not valid JSON ({e})."
            ) from e
        if data is None or _depth(data) > MAX_MANIFEST_DEPTH:
            raise ValueError(
                f"The snapshot manifest {where} is nested deeper than a "
                "keras_snapshot manifest can be; restore the manifest written "
                "by SnapshotCheckpoint."
            )
        if (
            not isinstance(data, dict)
            or data.get("format") != MANIFEST_FORMAT
            or not isinstance(data.get("snapshots"), list)
        ):
            raise ValueError(
                f"{where} is not a keras_snapshot manifest: expected a JSON "
                f'object with "format": "{MANIFEST_FORMAT}" and a "snapshots" '
                "list."
            )
        ends = data.get("cycle_end_steps")
        if not isinstance(ends, list):
            ends = []
        entries = [SnapshotEntry.from_json(e, where) for e in data["snapshots"]]
        limit = max(MAX_SNAPSHOT_INDEX, len(ends))
        for entry in entries:
            if not 1 <= entry.index <= limit:
                raise ValueError(
                    f"The snapshot manifest {where} has a snapshot index out "
                    f"of range (indices run from 1 to {limit}); restore the "
                    "manifest written by SnapshotCheckpoint. Received: "
                    f"index={_short(entry.index)} in the entry for "
                    f"{_short(entry.file)}."
                )
            if entry.step < 0 or entry.size < 0:
                raise ValueError(
                    f"The snapshot manifest {where} has an entry with a "
                    "negative step or size; restore the manifest written by "
                    f"SnapshotCheckpoint. Received: step={entry.step}, "
                    f"size={entry.size} in the entry for {_short(entry.file)}."
                )
            self.path_of(entry)  # Refuses paths that leave the folder.
        for key in ("index", "file"):
            counts = collections.Counter(getattr(e, key) for e in entries)
            repeated = sorted(v for v, n in counts.items() if n > 1)
            if repeated:
                raise ValueError(
                    f"The snapshot manifest {where} lists the same {key} more "
                    f"than once: {_short(repeated)}; restore the manifest "
                    "written by SnapshotCheckpoint."
                )
        entries.sort(key=lambda e: e.index)
        return Manifest(cycle_end_steps=ends, entries=entries)

    def superseded(self) -> list:
        """`[(path, count)]` of the `superseded-*` folders that hold
        snapshots (readable manifests only), oldest first."""
        found = []
        for path in _fs.glob(self.path, f"{SUPERSEDED_PREFIX}*"):
            if not _fs.isdir(path):
                continue
            try:
                count = len(SnapshotDirectory(path).read().entries)
            except (OSError, ValueError):
                continue
            if count:
                found.append((path, count))
        return found

    def read_or_new(self, cycle_end_steps: list) -> Manifest:
        try:
            return self.read()
        except FileNotFoundError:
            return Manifest(cycle_end_steps=list(cycle_end_steps))

    def path_of(self, entry: SnapshotEntry) -> str:
        """The path of an entry's file, refusing paths that leave the folder
        (absolute paths, `..`, links that point elsewhere)."""
        name = entry.file
        if (
            not isinstance(name, str)
            or not name
            or os.path.isabs(name)
            or os.path.basename(name) != name
            or any(c in name for c in "/\\\0")
            or name in (".", "..")
        ):
            raise ValueError(
                f"The snapshot manifest {self.manifest_path} names a file "
                "that is not a plain file name inside its directory. "
                f"Received: file={_short(name)} for snapshot "
                f"{_short(entry.index)}."
            )
        if name.startswith(".") or not name.endswith(".keras"):
            raise ValueError(
                f"The snapshot manifest {self.manifest_path} names a file "
                f"which is not a snapshot (such as {snapshot_filename(1)}); "
                "restore the manifest written by SnapshotCheckpoint. "
                f"Received: file={_short(name)} for snapshot "
                f"{_short(entry.index)}."
            )
        path = _fs.join(self.path, name)
        if _fs.is_remote(path):
            return path
        if os.path.dirname(_fs.realpath(path)) != _fs.realpath(self.path):
            raise ValueError(
                f"The snapshot file {path} listed in {self.manifest_path} is "
                "a link that points outside the snapshot directory."
            )
        return path

    def verified_path(self, entry: SnapshotEntry) -> str:
        """Checks an entry's file against its size and sha256; its path.

        Raises:
            FileNotFoundError: if the file is missing.
            ValueError: if its size or sha256 differ from the manifest.
        """
        path = self.path_of(entry)
        if not _fs.isfile(path):
            raise FileNotFoundError(
                f"Snapshot {entry.index} is listed in {self.manifest_path} "
                f"but its file {path} is missing."
            )
        size = _fs.getsize(path)
        if size != entry.size:
            raise ValueError(
                f"Snapshot file {path} is {size} bytes but the manifest "
                f"recorded {entry.size}: it is truncated or was replaced."
            )
        digest = _fs.sha256(path)
        if digest != entry.sha256:
            raise ValueError(
                f"Snapshot file {path} does not match the sha256 recorded in "
                f"the manifest ({digest} != {entry.sha256}): it is corrupted "
                "or was replaced."
            )
        return path

    # Writing ---------------------------------------------------------------

    def write(self, manifest: Manifest) -> None:
        manifest.entries.sort(key=lambda e: e.index)
        _fs.write_json(self.manifest_path, manifest.to_json())

    def prepare(self) -> list:
        """Creates the folder, checks it is writable, removes leftovers.

        Returns the paths of incomplete writes that were removed.

        Raises:
            NotADirectoryError: if the path is a file.
            PermissionError / OSError: if the folder cannot be written, with
                the reason (read-only, name too long, ...).
        """
        if _fs.exists(self.path) and not _fs.isdir(self.path):
            raise NotADirectoryError(
                f"Snapshots are written into a folder, but {self.path} is a "
                "file: pass the path of a new or existing folder."
            )
        _fs.makedirs(self.path)
        removed = self._remove_partial_files()
        # A write-and-rename probe with the longest name a snapshot gets.
        remote = _fs.is_remote(self.path)
        probe = None
        try:
            if remote:
                probe = _fs.join(
                    self.path, f"{PARTIAL_PREFIX}probe-{uuid.uuid4().hex[:12]}"
                )
                _fs.makedirs(probe)
            else:
                probe = _fs.make_scratch_dir(self.path)
            name = _fs.join(probe, snapshot_filename(99999))
            _fs.write_bytes(name, b"probe")
            _fs.replace(name, name + ".probe")
        except OSError as e:
            reason = (
                e.strerror if remote else os.strerror(e.errno) if e.errno else e
            )
            raise type(e)(
                e.errno,
                f"The snapshot directory {self.path} is not writable "
                f"({reason}). Choose a writable folder with a shorter path",
            ) from e
        finally:
            if probe is not None:
                _fs.rmtree(probe, ignore_errors=True)
        return removed

    def _remove_partial_files(self) -> list:
        removed = []
        for name in sorted(_fs.listdir(self.path)):
            if not name.startswith(PARTIAL_PREFIX):
                continue
            path = _fs.join(self.path, name)
            if _fs.isdir(path) and not _fs.islink(path):
                _fs.rmtree(path, ignore_errors=True)
            elif _fs.lexists(path):
                _fs.remove(path)
            removed.append(path)
        return removed

    def unlisted_snapshot_files(self, manifest: Manifest) -> list:
        """`snapshot-NN.keras` files here that the manifest does not list."""
        listed = {e.file for e in manifest.entries}
        return sorted(
            name
            for name in _fs.listdir(self.path)
            if name.startswith("snapshot-")
            and name.endswith(".keras")
            and name not in listed
        )

    def add(self, manifest: Manifest, entry: SnapshotEntry) -> None:
        """Lists `entry`, whose file is complete, in `manifest`."""
        manifest.entries = [
            e for e in manifest.entries if e.index != entry.index
        ] + [entry]
        self.write(manifest)

    def set_aside(self, manifest: Manifest, entries: list) -> str:
        """Moves `entries` (files and records) to a `superseded-*` folder.

        The folder gets its own manifest and is returned. On remote storage
        files are copied and the originals removed only once both
        manifests are written.
        """
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = _fs.join(self.path, f"{SUPERSEDED_PREFIX}{stamp}")
        suffix = 1
        while _fs.exists(target):
            suffix += 1
            target = _fs.join(self.path, f"{SUPERSEDED_PREFIX}{stamp}-{suffix}")
        _fs.makedirs(target)
        aside = SnapshotDirectory(target)
        moved = Manifest(cycle_end_steps=manifest.cycle_end_steps)
        remote = _fs.is_remote(self.path)
        copied = []
        for entry in entries:
            source = self.path_of(entry)
            if _fs.exists(source):
                destination = _fs.join(target, entry.file)
                if remote:
                    _fs.copy(source, destination)
                    _fs.check_copy(destination, entry.size, entry.sha256)
                    copied.append(source)
                else:
                    _fs.replace(source, destination)
                moved.entries.append(entry)
        # The old folder's manifest stops listing them only once they are
        # in their new home, listed by its manifest.
        aside.write(moved)
        names = {e.file for e in entries}
        manifest.entries = [e for e in manifest.entries if e.file not in names]
        self.write(manifest)
        for source in copied:
            _fs.remove(source)
        return target

    # Locking ---------------------------------------------------------------

    def lock(self) -> None:
        """Takes the folder's `FolderLock`, which dies with this process.

        Raises:
            DirectoryLockedError: if another process holds it.
        """
        if self._lock is None:
            self._lock = FolderLock(self.path, what="snapshot directory")
        self._lock.acquire()

    def unlock(self) -> None:
        """Releases the lock that `lock()` took, if it still holds it."""
        if self._lock is not None:
            self._lock.release()


def _refuse_constant(name):
    raise ValueError(f"{name} is not valid in strict JSON")


def read_manifest(directory: str) -> dict:
    """Reads and checks `directory/manifest.json`; returns it as JSON data.

    Raises:
        FileNotFoundError: if there is no manifest.
        ValueError: if the manifest is not a valid snapshot manifest.

    Example:

    ```python
    for entry in keras_snapshot.read_manifest("snapshots")["snapshots"]:
        print(entry["index"], entry["step"], entry["file"])
    ```
    """
    return SnapshotDirectory(directory).read().to_json()
