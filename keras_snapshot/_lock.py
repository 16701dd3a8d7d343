"""The folder lock: one writing process per folder.

An advisory lock that dies with its process (`fcntl.flock` on POSIX,
`msvcrt.locking` on Windows, on a `.lock` file in the folder), keyed on
the folder's real path. Remote storage has no lock: only a second writer
in the same process is kept out.
"""

import errno
import os
import time

from keras_snapshot import _fs

LOCK_NAME = ".lock"
# Windows locks are mandatory: the byte locked lies far past the line that
# names the holder, so that a refused process can still read that line.
_WINDOWS_LOCK_OFFSET = 1 << 30
# What a lock taken elsewhere raises: EWOULDBLOCK (= EAGAIN) for `flock`,
# EACCES or EDEADLOCK for `msvcrt.locking`.
_BUSY = {errno.EAGAIN, errno.EACCES, getattr(errno, "EDEADLK", errno.EAGAIN)}


class DirectoryLockedError(RuntimeError):
    """Another live process is writing into the same folder.

    Attributes:
        path: The folder, as it was given.
        holder: Who holds the lock, as its lock file says
            (`"process 123 since Mon Jan  1 12:00:00 2024"`), or
            `"another process"`.
        what: What the folder is: `"snapshot directory"`, `"run folder"`.
        real_path: The folder the lock is on, links resolved.
    """

    def __init__(self, path, holder, what="snapshot directory", real_path=None):
        self.path = os.fspath(path)
        self.holder = holder
        self.what = what
        self.real_path = real_path or self.path
        link = os.path.islink(self.path.rstrip("/" + os.sep) or self.path)
        target = f" (a link to {self.real_path})" if link else ""
        super().__init__(
            f"The {what} {self.path}{target} is being written by {holder}: "
            "wait for that run to finish, or use another folder."
        )

    def __reduce__(self):
        return type(self), (self.path, self.holder, self.what, self.real_path)


class FolderLock:
    """An advisory lock on a folder, held by one process at a time.

    The `.lock` file names the holder for the refused process's error.
    Within one process a new `FolderLock` on the same folder (a notebook
    cell run again) takes the lock over, and only the newest holder's
    `release()` releases it.

    Args:
        path: The folder, which must exist. A symbolic link locks its
            target.
        what: What the folder is, for the error message
            (`"snapshot directory"`, `"run folder"`).

    Example:

    ```python
    lock = FolderLock("runs/cifar10", what="run folder")
    lock.acquire()  # DirectoryLockedError if another process holds it.
    try:
        ...
    finally:
        lock.release()
    ```
    """

    # `{real path: [open lock file or None, holding FolderLock]}`.
    _held = {}

    def __init__(self, path, what: str = "snapshot directory"):
        self.path = os.fspath(path)
        self.what = what
        self._key = None

    @property
    def locked(self) -> bool:
        """Whether this lock holds its folder now."""
        held = FolderLock._held.get(self._key)
        return held is not None and held[1] is self

    def acquire(self) -> "FolderLock":
        """Takes the lock; returns `self`.

        Raises:
            DirectoryLockedError: if another process holds it.
            OSError: if the lock file cannot be opened (no such folder,
                not writable).
        """
        key = _fs.realpath(self.path)
        held = FolderLock._held.get(key)
        if held is not None:
            held[1] = self  # Taken over within this process.
        else:
            handle = None
            if not _fs.is_remote(key):
                handle = self._take(os.path.join(key, LOCK_NAME), key)
            FolderLock._held[key] = [handle, self]
        self._key = key
        return self

    def release(self) -> None:
        """Releases the lock, if this `FolderLock` holds it."""
        if not self.locked:
            return
        handle, _ = FolderLock._held.pop(self._key)
        if handle is not None:
            _release(handle, os.path.join(self._key, LOCK_NAME))

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _take(self, path: str, real_path: str):
        """The open lock file at `path`, locked, naming this process."""
        while True:
            handle = open(path, "a+b")
            try:
                _lock(handle)
            except OSError as e:
                handle.seek(0)
                holder = handle.read(200).decode("utf-8", "replace").strip()
                handle.close()
                if e.errno not in _BUSY:
                    raise
                raise DirectoryLockedError(
                    self.path,
                    holder or "another process",
                    what=self.what,
                    real_path=real_path,
                ) from None
            # The holder before us removes the file when it is done: our
            # lock counts only if it is on the file that is there now.
            try:
                same = os.path.samestat(
                    os.fstat(handle.fileno()), os.stat(path)
                )
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()  # Closing releases the lock.
        handle.seek(0)
        handle.truncate()
        line = f"process {os.getpid()} since {time.ctime()}\n"
        handle.write(line.encode("utf-8"))
        handle.flush()
        return handle


def _lock(handle) -> None:
    """Locks the open file `handle` without waiting (OSError if taken)."""
    if os.name == "nt":
        import msvcrt

        handle.seek(_WINDOWS_LOCK_OFFSET)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _release(handle, path: str) -> None:
    """Unlocks and closes `handle`, and removes its file at `path`."""
    if os.name == "nt":
        import msvcrt

        # Windows cannot remove an open file: unlock and close first. A
        # process that opened it meanwhile keeps it (the removal fails).
        try:
            handle.seek(_WINDOWS_LOCK_OFFSET)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        finally:
            handle.close()
        try:
            os.remove(path)
        except OSError:
            pass
        return
    # Removed while still held, then released: a process that opened the
    # old file sees that it is gone and tries again.
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    handle.close()  # Closing releases the flock.
