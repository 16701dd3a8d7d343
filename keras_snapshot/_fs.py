"""Every file-system access of the core, local disk or `tf.io.gfile`.

Remote paths (`gs://`, ... as Keras's `file_utils.is_remote_path` decides)
go through `tf.io.gfile`, imported only then; its errors become `OSError`s
naming the path. `commit` renames atomically on local disk, and on remote
storage uploads under a hidden name, renames, and checks the read-back
size and sha256.
"""

import builtins
import contextlib
import errno
import fnmatch
import hashlib
import json
import math
import os
import posixpath
import re
import shutil
import tempfile
import uuid

PARTIAL_PREFIX = ".partial-"

# The paths Keras writes through `tf.io.gfile` (`file_utils.is_remote_path`).
_REMOTE = re.compile(r"^(/cns|/cfs|/gcs|/hdfs|/readahead|/placer|/tfhub|.*://)")
_BLOCK = 1 << 20


def is_remote(path) -> bool:
    """Whether `path` goes through `tf.io.gfile` (as Keras decides it)."""
    return bool(_REMOTE.match(os.fspath(path)))


def _tensorflow():
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ImportError(
            "Remote paths (gs://, s3://, ...) need TensorFlow's `tf.io.gfile`:"
            " `pip install tensorflow`, or use a local folder."
        ) from e
    return tf


def _gfile():
    return _tensorflow().io.gfile


def _errors(path):
    """Turns `tf.errors` for a remote `path` into the matching `OSError`."""
    return _remote_errors(path) if is_remote(path) else contextlib.nullcontext()


@contextlib.contextmanager
def _remote_errors(path):
    tf = _tensorflow()
    try:
        yield
    except tf.errors.NotFoundError as e:
        raise FileNotFoundError(errno.ENOENT, e.message, path) from e
    except tf.errors.PermissionDeniedError as e:
        raise PermissionError(errno.EACCES, e.message, path) from e
    except tf.errors.OpError as e:
        raise OSError(errno.EIO, e.message, path) from e


# Paths --------------------------------------------------------------------


def join(path, *names) -> str:
    path = os.fspath(path)
    if is_remote(path):
        return posixpath.join(path, *names)
    return os.path.join(path, *names)


def absolute(path) -> str:
    """`os.path.abspath` for a local path; a remote one as it is."""
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/") if not path.endswith("://") else path
    return os.path.abspath(path)


def parent(path) -> str | None:
    """The folder that holds `path`, or None at the root (`gs://bucket`)."""
    path = absolute(path)
    scheme, separator, rest = path.partition("://")
    if separator:
        rest = rest.rstrip("/")
        if "/" not in rest:
            return None
        return f"{scheme}://{rest.rsplit('/', 1)[0]}"
    folder = (posixpath if is_remote(path) else os.path).dirname(path)
    return None if folder == path else folder


def basename(path) -> str:
    path = os.fspath(path)
    if is_remote(path):
        return posixpath.basename(path.rstrip("/"))
    return os.path.basename(path)


def realpath(path) -> str:
    """Links resolved on local disk; a remote path has none."""
    return absolute(path) if is_remote(path) else os.path.realpath(path)


# Queries ------------------------------------------------------------------


def exists(path) -> bool:
    if is_remote(path):
        with _remote_errors(path):
            return _gfile().exists(path)
    return os.path.exists(path)


def isdir(path) -> bool:
    if is_remote(path):
        with _remote_errors(path):
            return _gfile().isdir(path)
    return os.path.isdir(path)


def isfile(path) -> bool:
    if is_remote(path):
        with _remote_errors(path):
            gfile = _gfile()
            return gfile.exists(path) and not gfile.isdir(path)
    return os.path.isfile(path)


def islink(path) -> bool:
    return False if is_remote(path) else os.path.islink(path)


def lexists(path) -> bool:
    """Whether `path` exists, a broken local link included."""
    return exists(path) if is_remote(path) else os.path.lexists(path)


def listdir(path) -> list:
    """Names in the folder `path` (sub-folders without a trailing `/`)."""
    if is_remote(path):
        with _remote_errors(path):
            return [name.rstrip("/") for name in _gfile().listdir(path)]
    return os.listdir(path)


def glob(folder, pattern: str) -> list:
    """Sorted paths in `folder` whose names match the `fnmatch` `pattern`.

    Only the names are matched, so `[` in the folder's path means nothing.
    """
    if not isdir(folder):
        return []
    names = fnmatch.filter(listdir(folder), pattern)
    return [join(folder, name) for name in sorted(names)]


def getsize(path) -> int:
    if is_remote(path):
        with _remote_errors(path):
            return _gfile().stat(path).length
    return os.path.getsize(path)


def open(path, mode: str = "rb"):  # noqa: A001 (the module's `open`)
    """A file object: the built-in `open` or a `tf.io.gfile.GFile`."""
    if is_remote(path):
        with _remote_errors(path):
            return _gfile().GFile(path, mode)
    return builtins.open(path, mode)


def read_bytes(path) -> bytes:
    with _errors(path):
        with open(path, "rb") as f:
            return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def sha256(path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with _errors(path):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()


# Changes ------------------------------------------------------------------


def makedirs(path) -> None:
    """Creates `path` and its parents; an existing folder is fine."""
    if is_remote(path):
        with _remote_errors(path):
            _gfile().makedirs(path)
        return
    os.makedirs(path, exist_ok=True)


def remove(path) -> None:
    if is_remote(path):
        with _remote_errors(path):
            _gfile().remove(path)
        return
    os.remove(path)


def rmtree(path, ignore_errors: bool = False) -> None:
    if is_remote(path):
        try:
            with _remote_errors(path):
                _gfile().rmtree(path)
        except OSError:
            if not ignore_errors:
                raise
        return
    shutil.rmtree(path, ignore_errors=ignore_errors)


def copy(source, target) -> None:
    """Copies a file, replacing `target`; either side may be remote."""
    if is_remote(source) or is_remote(target):
        with _remote_errors(target):
            _gfile().copy(source, target, overwrite=True)
        return
    shutil.copyfile(source, target)


def replace(source, target) -> None:
    """Renames `source` to `target`, replacing it (atomic on local disk)."""
    if is_remote(target):
        with _remote_errors(target):
            _gfile().rename(source, target, overwrite=True)
        return
    os.replace(source, target)


def _apply_umask(path) -> None:
    """Gives a local scratch file the permissions of a new file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # Some file systems cannot sync a directory; the data is.
    finally:
        os.close(fd)


def scratch_folder(directory) -> str:
    """Where to write a file bound for `directory` before `commit`: the
    folder itself on local disk (atomic rename), else the temporary folder."""
    if is_remote(directory):
        return tempfile.gettempdir()
    return os.path.abspath(directory)


def make_scratch_dir(directory) -> str:
    """A new hidden `.partial-*` folder in `scratch_folder(directory)`."""
    return tempfile.mkdtemp(
        prefix=PARTIAL_PREFIX, dir=scratch_folder(directory)
    )


@contextlib.contextmanager
def atomic_write(final_path):
    """Yields a local scratch path; commits it to `final_path` on success.

    If the block raises, nothing appears at `final_path`.

    Example:

    ```python
    with atomic_write("gs://bucket/run/model.keras") as local_path:
        model.save(local_path)
    ```
    """
    folder = parent(final_path)
    if folder is not None:
        makedirs(folder)
    scratch = make_scratch_dir(folder if folder is not None else final_path)
    try:
        local_path = os.path.join(scratch, basename(final_path))
        yield local_path
        _apply_umask(local_path)
        commit(local_path, final_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_bytes(path, data: bytes) -> None:
    """Writes `data` to `path` atomically (see `atomic_write`)."""
    with atomic_write(path) as local_path:
        with builtins.open(local_path, "wb") as f:
            f.write(data)


def write_text(path, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def finite_json(value):
    """`value` with NaN and infinities turned into strings, for strict JSON.

    Example:

    ```python
    finite_json({"loss": float("nan")})  # {"loss": "nan"}
    ```
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(path, data) -> None:
    """Writes `data` as strict JSON to `path` atomically (`finite_json`).

    Example:

    ```python
    write_json("runs/digits/run.json", {"status": "trained"})
    ```
    """
    text = json.dumps(finite_json(data), indent=2, allow_nan=False)
    write_text(path, text + "\n")


def commit(temporary_path: str, final_path: str) -> None:
    """Moves the complete local file `temporary_path` to `final_path`.

    Local disk: flush, atomic rename, flush the folder. Remote: upload to a
    hidden name, rename, and check the read-back size and sha256 (OSError
    if they differ).
    """
    if not is_remote(final_path):
        with builtins.open(temporary_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary_path, final_path)
        fsync_directory(os.path.dirname(os.path.abspath(final_path)))
        return
    size, digest = os.path.getsize(temporary_path), sha256(temporary_path)
    folder, name = posixpath.split(final_path)
    hidden = join(folder, f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:12]}-{name}")
    try:
        copy(temporary_path, hidden)
        replace(hidden, final_path)
    except BaseException:
        with contextlib.suppress(Exception):
            if exists(hidden):
                remove(hidden)
        raise
    check_copy(final_path, size, digest)
    os.remove(temporary_path)


def check_copy(path, size: int, digest: str) -> None:
    """Reads `path` back; `OSError` unless it has this size and sha256."""
    found = getsize(path)
    if found == size:
        found_digest = sha256(path)
        if found_digest == digest:
            return
        problem = f"sha256 {found_digest}, expected {digest}"
    else:
        problem = f"{found} bytes, expected {size}"
    raise OSError(
        errno.EIO,
        f"the file read back from {path} does not match what was written "
        f"({problem})",
        path,
    )


@contextlib.contextmanager
def local_copy(path):
    """A local path with the content of `path` (a temporary copy if remote).

    Example:

    ```python
    with local_copy("gs://bucket/model.keras") as local:
        model = keras.saving.load_model(local)
    ```
    """
    if not is_remote(path):
        yield os.fspath(path)
        return
    folder = tempfile.mkdtemp(prefix="keras_snapshot_")
    try:
        local = os.path.join(folder, posixpath.basename(os.fspath(path)))
        copy(path, local)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)
