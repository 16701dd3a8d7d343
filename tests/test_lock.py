"""`keras_snapshot._lock`: one writing process per folder, links included.

The second writer is a real second process (`helpers.LockProcess`), as a
second `keras-snapshot train` or `fit` would be.
"""

import ast
import os
import pickle
import re

import pytest
from helpers import LockProcess

from keras_snapshot import _lock
from keras_snapshot import manifest as manifest_lib
from keras_snapshot._lock import DirectoryLockedError
from keras_snapshot._lock import FolderLock


@pytest.fixture
def other():
    with LockProcess() as process:
        yield process


@pytest.mark.slow  # A second process.
def test_second_process_is_refused_until_the_lock_is_released(tmp_path, other):
    folder = str(tmp_path / "run")
    os.mkdir(folder)
    assert other.acquire(folder, "run folder") == ["locked"]
    lock_file = os.path.join(folder, _lock.LOCK_NAME)
    with pytest.raises(DirectoryLockedError) as info:
        FolderLock(folder, what="run folder").acquire()
    error = info.value
    assert (error.path, error.what) == (folder, "run folder")
    assert re.fullmatch(rf"process {other.pid} since .+", error.holder)
    assert str(error).startswith(
        f"The run folder {folder} is being written by process {other.pid} "
    )

    assert other.release(folder) == ["released"]
    assert not os.path.exists(lock_file)
    with FolderLock(folder, what="run folder") as lock:
        assert lock.locked
        # Now the other process is the second writer, refused by name.
        refused = other.acquire(folder, "run folder")
        assert refused[:2] == ["refused", folder]
        assert refused[2].startswith(f"process {os.getpid()} since ")
        assert refused[3] == "run folder"
    assert not lock.locked and not os.path.exists(lock_file)
    assert other.acquire(folder, "run folder") == ["locked"]


@pytest.mark.slow  # A second process.
@pytest.mark.parametrize("holder_uses", ["link", "target"])
def test_a_link_and_its_target_are_one_lock(tmp_path, other, holder_uses):
    target = tmp_path / "run"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    names = {"link": str(link), "target": str(target)}
    assert other.acquire(names[holder_uses]) == ["locked"]
    # The lock file is in the real folder, whichever name took the lock.
    assert os.listdir(target) == [_lock.LOCK_NAME]
    real = os.path.realpath(target)
    for name in (str(link), str(target)):
        with pytest.raises(DirectoryLockedError) as info:
            FolderLock(name).acquire()
        assert (info.value.path, info.value.real_path) == (name, real)
        assert f"is being written by process {other.pid} since" in str(
            info.value
        )
        named_as_link = f"{link} (a link to {real})" in str(info.value)
        assert named_as_link == (name == str(link))


@pytest.mark.slow  # A second process.
def test_one_process_takes_its_own_lock_over(tmp_path, other):
    """A notebook cell run again: the newest lock in a process wins."""
    folder = str(tmp_path / "snaps")
    os.mkdir(folder)
    first = FolderLock(folder).acquire()
    second = FolderLock(folder).acquire()
    assert second.locked and not first.locked
    first.release()  # Not the holder any more: releases nothing.
    assert other.acquire(folder)[0] == "refused"
    second.release()
    assert other.acquire(folder) == ["locked"]


@pytest.mark.slow  # A second process.
def test_snapshot_directory_locks_through_the_folder_lock(tmp_path, other):
    folder = str(tmp_path / "snaps")
    os.mkdir(folder)
    directory = manifest_lib.SnapshotDirectory(folder)
    directory.lock()
    try:
        refused = other.acquire(folder)
        assert refused[0] == "refused" and refused[3] == "snapshot directory"
        assert refused[4].startswith(
            f"The snapshot directory {folder} is being written by process "
            f"{os.getpid()}"
        )
    finally:
        directory.unlock()
    assert other.acquire(folder) == ["locked"]
    with pytest.raises(manifest_lib.DirectoryLockedError):
        directory.lock()


def test_locked_error_keeps_its_attributes_when_pickled(tmp_path):
    error = DirectoryLockedError(
        str(tmp_path), "process 7 since now", what="run folder"
    )
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.holder, copy.what) == (
        str(tmp_path),
        "process 7 since now",
        "run folder",
    )
    assert str(copy) == str(error)
    assert isinstance(copy, RuntimeError)


def test_module_imports_on_every_os():
    """`fcntl` (POSIX) and `msvcrt` (Windows) are imported where used."""
    with open(_lock.__file__) as f:
        tree = ast.parse(f.read())
    top_level = {
        alias.name
        for node in tree.body
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert not top_level & {"fcntl", "msvcrt"}
    nested = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert {"fcntl", "msvcrt"} <= nested
