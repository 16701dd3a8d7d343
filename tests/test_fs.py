"""`keras_snapshot._fs`: the one home of the core's file operations.

The rule test reads every core module with `ast`: a remote path (`gs://`,
`ram://`) works everywhere only if no module writes around `_fs`.
"""

import ast
import json
import os

import pytest
from test_layering import ANALYSIS
from test_layering import CORE
from test_layering import PACKAGE

from keras_snapshot import _fs

# The modules allowed to touch the file system directly: storage itself,
# and the folder lock (an `fcntl`/`msvcrt` lock needs a real file handle).
STORAGE_MODULES = {"_fs", "_lock"}
FORBIDDEN_MODULES = {"shutil", "glob"}
FORBIDDEN_CALLS = {
    ("os", "remove"),
    ("os", "unlink"),
    ("os", "makedirs"),
    ("os", "mkdir"),
    ("os", "rename"),
    ("os", "replace"),
    ("os", "rmdir"),
}


def storage_violations(source: str) -> list:
    """What in `source` writes around `_fs`, as readable strings."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module.split(".")[0]]
        else:
            names = []
        found += [f"import {n}" for n in names if n in FORBIDDEN_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and (func.value.id, func.attr) in FORBIDDEN_CALLS
        ):
            found.append(f"{func.value.id}.{func.attr}(...)")
        if isinstance(func, ast.Name) and func.id == "open":
            mode = node.args[1] if len(node.args) > 1 else None
            for keyword in node.keywords:
                if keyword.arg == "mode":
                    mode = keyword.value
            text = mode.value if isinstance(mode, ast.Constant) else "r"
            if not isinstance(mode, (ast.Constant, type(None))) or any(
                c in str(text) for c in "wax+"
            ):
                found.append(f"open(..., {ast.unparse(mode)})")
    return found


def test_core_modules_write_only_through_fs():
    problems = {}
    for name in sorted((CORE | ANALYSIS) - STORAGE_MODULES):
        path = os.path.join(PACKAGE, f"{name}.py")
        with open(path) as f:
            found = storage_violations(f.read())
        if found:
            problems[name] = found
    assert not problems, (
        "core modules must read and write files through keras_snapshot._fs "
        f"(remote paths): {problems}"
    )


def test_atomic_write_commits_only_a_complete_file(tmp_path):
    target = str(tmp_path / "new" / "data.bin")
    with pytest.raises(RuntimeError, match="interrupted"):
        with _fs.atomic_write(target) as local_path:
            with open(local_path, "wb") as f:
                f.write(b"half")
            raise RuntimeError("interrupted")
    assert not os.path.exists(target)
    assert os.listdir(tmp_path / "new") == []  # No scratch files left.
    _fs.write_bytes(target, b"whole")
    assert _fs.read_bytes(target) == b"whole"
    assert os.listdir(tmp_path / "new") == ["data.bin"]


def test_atomic_write_on_remote_storage_reads_back():
    target = "ram://test_fs/folder/data.json"
    _fs.write_json(target, {"loss": float("nan"), "steps": [1, 2]})
    assert json.loads(_fs.read_text(target)) == {
        "loss": "nan",
        "steps": [1, 2],
    }
    assert _fs.listdir("ram://test_fs/folder") == ["data.json"]


def test_write_json_is_strict_json(tmp_path):
    path = str(tmp_path / "run.json")
    _fs.write_json(path, {"a": float("inf"), "b": [float("-inf"), 1.5]})
    with open(path) as f:
        text = f.read()
    assert json.loads(text) == {"a": "inf", "b": ["-inf", 1.5]}
    assert "Infinity" not in text and text.endswith("\n")


def test_new_files_get_the_permissions_of_a_new_file(tmp_path):
    path = str(tmp_path / "report.md")
    _fs.write_text(path, "# report\n")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("folder_name", ["plain", "with[brackets]*?"])
def test_glob_matches_names_in_the_folder_only(tmp_path, folder_name):
    folder = tmp_path / folder_name
    folder.mkdir()
    for name in ["swa-state-0000000002.npz", "swa-state-x.txt", "other.npz"]:
        (folder / name).write_bytes(b"")
    assert _fs.glob(str(folder), "swa-state-*.npz") == [
        os.path.join(str(folder), "swa-state-0000000002.npz")
    ]
    assert _fs.glob(str(tmp_path / "missing"), "*") == []


def test_glob_on_remote_storage():
    folder = "ram://test_fs_glob/states"
    for name in ["swa-state-01.npz", "swa-state-02.npz", "notes.txt"]:
        _fs.write_bytes(_fs.join(folder, name), b"x")
    assert _fs.glob(folder, "*.npz") == [
        f"{folder}/swa-state-01.npz",
        f"{folder}/swa-state-02.npz",
    ]
