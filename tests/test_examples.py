"""The examples and the Colab notebook run, so they cannot rot.

Each runs this checkout's package (`PYTHONPATH`), not whichever copy the
environment has installed.
"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "colab_snapshot_ensemble.ipynb")


def _env(**extra):
    """This process's environment, importing this checkout first."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p
    )
    return env


def _run(args, cwd, **kwargs):
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


@pytest.mark.slow
def test_colab_notebook_executes(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    monkeypatch.setenv("KERAS_SNAPSHOT_NOTEBOOK_SMOKE", "1")
    # The kernel imports this checkout, so the install cell installs nothing.
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    run_dir = tmp_path / "notebook_run"
    assert (run_dir / "ensemble.keras").exists()
    assert (run_dir / "saved_model").exists()
    outputs = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert "Installing keras-snapshot" not in outputs
    assert "SavedModel serves the same probabilities." in outputs


@pytest.mark.slow
def test_colab_notebook_offline_stops_with_the_one_line_reason(
    tmp_path, monkeypatch
):
    nbclient = pytest.importorskip("nbclient")
    import socket

    import nbformat

    with socket.socket() as s:  # A local port that refuses: no network.
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{port}")
    for var in ("NO_PROXY", "no_proxy", "KERAS_SNAPSHOT_NOTEBOOK_SMOKE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
        client.execute()
    assert error.value.ename == "SystemExit"
    reason = error.value.evalue
    assert reason.startswith("keras-snapshot train: error: The tensorflow-")
    assert "cifar10" in reason and "cannot be reached" in reason


def _install_cell():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [
        c.source
        for c in notebook.cells
        if c.cell_type == "code" and "def keras_snapshot_source" in c.source
    ]
    return cell


def _run_install_cell(cwd, target, repo_url=""):
    """Runs the notebook's install cell as a fresh Colab runtime would.

    `python -S` leaves site-packages out, so `keras_snapshot` is not
    importable, as before the install. The cell's `pip install` goes into
    `target`, offline, without dependencies.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PIP_") and k != "PYTHONPATH"
    }
    env.update(
        PIP_TARGET=str(target),
        PIP_NO_DEPS="1",
        PIP_NO_INDEX="1",
        PIP_NO_BUILD_ISOLATION="0",  # pip's spelling of --no-build-isolation
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        KERAS_SNAPSHOT_REPO_URL=repo_url,
    )
    return _run(["-S", "-c", _install_cell()], cwd, env=env)


def _copy_checkout(folder):
    shutil.copytree(
        ROOT,
        folder,
        ignore=shutil.ignore_patterns(
            ".git", "build", "*.egg-info", "__pycache__", "runs", ".*venv"
        ),
    )
    return folder


def _assert_installed(result, target, source):
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Installing keras-snapshot from {source}" in result.stdout
    with open(os.path.join(ROOT, "keras_snapshot", "schedule.py")) as f:
        assert (target / "keras_snapshot" / "schedule.py").read_text() == (
            f.read()
        )
    (metadata,) = target.glob("keras_snapshot-*.dist-info/METADATA")
    requires = metadata.read_text().replace("_", "-")
    assert "Requires-Dist: importlib-resources" in requires


def test_install_cell_without_a_source_says_what_to_do(tmp_path):
    result = _run_install_cell(tmp_path, tmp_path / "target")
    assert result.returncode != 0
    assert "keras-snapshot is not on PyPI" in result.stderr
    assert "set REPO_URL" in result.stderr
    assert not (tmp_path / "target").exists()


@pytest.mark.slow
def test_install_cell_installs_an_uploaded_wheel(tmp_path):
    source = _copy_checkout(tmp_path / "checkout")
    content = tmp_path / "content"  # Colab's working folder
    built = _run(
        ["-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(content), str(source)],
        tmp_path,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = content.glob("keras_snapshot-*.whl")
    target = tmp_path / "target"
    result = _run_install_cell(content, target)
    _assert_installed(result, target, wheel)
    imported = _run(
        ["-c", "import keras_snapshot; print(keras_snapshot.__file__)"],
        tmp_path,
        env=dict(os.environ, PYTHONPATH=str(target)),
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.strip().startswith(str(target))


@pytest.mark.slow
def test_install_cell_installs_the_checkout_or_the_git_repository(tmp_path):
    checkout = _copy_checkout(tmp_path / "checkout")
    result = _run_install_cell(checkout / "examples", tmp_path / "target1")
    _assert_installed(result, tmp_path / "target1", checkout)

    if shutil.which("git") is None:
        pytest.skip("needs git")
    repo_url = "file://" + ROOT  # stands in for the repository's URL
    result = _run_install_cell(tmp_path, tmp_path / "target2", repo_url)
    _assert_installed(result, tmp_path / "target2", "git+" + repo_url)


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    result = _run(
        [os.path.join(ROOT, "examples", "quickstart.py")], tmp_path, env=_env()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ensemble of 4 snapshots:  test error" in result.stdout
    assert "single model (final snapshot): test error" in result.stdout
    assert "test images right" in result.stdout
    assert (tmp_path / "quickstart_ensemble.keras").exists()


@pytest.mark.slow
def test_cifar_example_trains_on_the_whole_training_split(tmp_path):
    import tensorflow_datasets as tfds

    data_dir = tmp_path / "tfds"
    tfds.testing.DummyMnist(data_dir=data_dir).download_and_prepare()
    args = ["--dataset", "dummy_mnist", "--data-dir", str(data_dir)]
    args += ["--depth", "8", "--epochs", "2", "--snapshots", "2"]
    args += ["--batch-size", "10", "--output-dir", str(tmp_path / "run")]
    result = _run(
        [os.path.join(ROOT, "examples", "cifar_resnet.py"), *args],
        tmp_path,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # All 20 training images, as the paper trains on all 50k of CIFAR.
    assert "Training on 20 images, validating on 0" in result.stdout
    assert "ensemble of the last 2 snapshots" in result.stdout
    assert (tmp_path / "run" / "ensemble.keras").exists()


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


@pytest.mark.slow
def test_readme_python_quickstart_runs_as_written(tmp_path):
    import re

    section = _readme().split("## In Python", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)[:1]
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    result = _run([str(script)], tmp_path, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.split("snapshot ensemble test error:")[1]
    error = float(printed.strip().rstrip("%"))
    assert error < 50  # Percent; 10 classes: far better than chance.
    assert sorted(os.listdir(tmp_path / "snapshots")) == [
        "manifest.json",
        "snapshot-01.keras",
        "snapshot-02.keras",
        "snapshot-03.keras",
    ]
    assert (tmp_path / "ensemble.keras").exists()


def test_readme_commands_name_the_run_folders_train_makes():
    # .ci/run runs them; here: the folders they name are the defaults.
    sys.path.insert(0, os.path.join(ROOT, ".ci"))
    try:
        from readme_commands import readme_commands
    finally:
        sys.path.pop(0)
    from keras_snapshot.app import cli
    from keras_snapshot.app import pipeline

    commands = [c.split("#")[0].split() for c in readme_commands()]
    assert commands and all(c[0] == "keras-snapshot" for c in commands)
    made = set()
    for argv in commands:
        args = cli.build_parser().parse_args(argv[1:])
        if args.command == "train":
            folder = pipeline.default_run_dir(args)
            assert folder not in made, f"{argv} reuses {folder}"
            made.add(folder)
        else:
            assert os.path.normpath(args.run_dir) in made, argv


@pytest.mark.slow
def test_fine_tuning_example_runs(tmp_path):
    result = _run(
        [os.path.join(ROOT, "examples", "fine_tuning.py"), "--quick"],
        tmp_path,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for row in (
        "plain fine-tuning (1 model)",
        "snapshot ensemble (2 models)",
        "uniform soup of the snapshots (1 model)",
        "greedy soup, snapshots [",
    ):
        assert row in result.stdout, result.stdout
