"""The `keras-snapshot` command line, end to end on small settings."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import LockProcess

import keras_snapshot
from keras_snapshot import metrics
from keras_snapshot.app import cli
from keras_snapshot.app.datasets import load_dataset

# The quick settings these tests were written for (the CLI's defaults are
# the longer Fashion-MNIST job).
QUICK = ["--dataset", "digits", "--model", "small_cnn", "--lr", "0.2"]
QUICK += ["--batch-size", "32", "--weight-decay", "0"]
SMALL = [*QUICK, "--epochs", "2", "--snapshots", "2", "--verbose", "0"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("cli") / "run")
    code = cli.main(["train", *SMALL, "--baseline", "--output-dir", run_dir])
    assert code == 0
    return run_dir


def test_train_writes_a_complete_run_directory(cli_run):
    names = set(os.listdir(cli_run))
    for expected in (
        "run.json",
        "snapshots",
        "ensemble.keras",
        "saved_model",
        "baseline.keras",
        "report.json",
        "report.md",
        "learning_rate.png",
        "error_vs_snapshots.png",
        "reliability.png",
        "disagreement.png",
    ):
        assert expected in names
    snapshots = os.path.join(cli_run, "snapshots")
    assert sorted(os.listdir(snapshots)) == [
        "manifest.json",
        "snapshot-01.keras",
        "snapshot-02.keras",
    ]
    for name in names:
        if name.endswith(".png"):
            with open(os.path.join(cli_run, name), "rb") as f:
                assert f.read(8) == PNG_SIGNATURE
    import matplotlib.image

    image = matplotlib.image.imread(os.path.join(cli_run, "learning_rate.png"))
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_report_numbers_match_the_snapshots(cli_run):
    with open(os.path.join(cli_run, "report.json")) as f:
        report = json.load(f)
    data = load_dataset("digits", validation_fraction=0.1, seed=0)
    members = keras_snapshot.load_snapshots(os.path.join(cli_run, "snapshots"))
    probs = np.stack([m.predict(data.x_test, verbose=0) for m in members])
    for i, entry in enumerate(report["test"]["snapshots"]):
        assert entry["error"] == pytest.approx(
            metrics.evaluate_predictions(probs[i], data.y_test)["error"]
        )
    for entry in report["test"]["last_m"]:
        m = entry["m"]
        assert entry["error"] == pytest.approx(
            metrics.evaluate_predictions(probs[-m:].mean(0), data.y_test)[
                "error"
            ]
        )
    ensemble = keras.saving.load_model(os.path.join(cli_run, "ensemble.keras"))
    np.testing.assert_allclose(
        ensemble.predict(data.x_test, verbose=0), probs.mean(0), atol=1e-5
    )
    assert report["exported"] == {
        "choice": "all",
        "members": 2,
        "temperature": None,
    }
    assert "baseline" in report["test"]
    markdown = open(os.path.join(cli_run, "report.md")).read()
    assert "ensemble of last m" in markdown
    assert "Baseline single model" in markdown


@pytest.mark.slow
def test_running_again_resumes_instead_of_retraining(cli_run, capsys):
    before = os.path.getmtime(
        os.path.join(cli_run, "snapshots", "snapshot-01.keras")
    )
    code = cli.main(["train", *SMALL, "--baseline", "--output-dir", cli_run])
    assert code == 0
    assert "already finished" in capsys.readouterr().out
    after = os.path.getmtime(
        os.path.join(cli_run, "snapshots", "snapshot-01.keras")
    )
    assert before == after


def test_other_settings_on_an_existing_run_are_refused(cli_run, capsys):
    code = cli.main(
        ["train", *QUICK, "--epochs", "3", "--snapshots", "2"]
        + ["--output-dir", cli_run]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "epochs: 2 != 3" in err and "--overwrite" in err


@pytest.mark.slow
def test_evaluate_and_export(cli_run, tmp_path, capsys):
    assert cli.main(["evaluate", cli_run, "--split", "val"]) == 0
    assert os.path.isfile(os.path.join(cli_run, "evaluation_val.json"))
    assert "val error" in capsys.readouterr().out
    out = str(tmp_path / "exported")
    assert cli.main(["export", cli_run, out, "--last", "1"]) == 0
    assert sorted(os.listdir(out)) == [
        "classes.json",
        "ensemble.keras",
        "saved_model",
    ]
    data = load_dataset("digits")
    last = keras_snapshot.load_snapshots(
        os.path.join(cli_run, "snapshots"), last=1
    )[0]
    exported = keras.saving.load_model(os.path.join(out, "ensemble.keras"))
    np.testing.assert_allclose(
        exported.predict(data.x_test[:20], verbose=0),
        last.predict(data.x_test[:20], verbose=0),
        atol=1e-6,
    )
    out2 = str(tmp_path / "greedy")
    assert cli.main(["export", cli_run, out2, "--select", "greedy"]) == 0


BAD_COMMANDS = [
    (["train", "--dataset", "no_such_dataset_xyz"], "no_such_dataset_xyz"),
    (["train", "--model", "resnet7"], "unknown model"),
    (
        ["train", "--model", "/no/such/file.keras"],
        "the model file /no/such/file.keras does not exist",
    ),
    (["train", "--epochs", "1", "--snapshots", "1000"], "num_snapshots"),
    (["evaluate", "/nonexistent/run"], "not a keras-snapshot run"),
    (["export", "/nonexistent/run", "/tmp/x"], "not a keras-snapshot run"),
]


@pytest.mark.parametrize("argv,message", BAD_COMMANDS)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = cli.main(["train", *SMALL, "--output-dir", str(blocker / "run")])
    assert code == 2
    assert "cannot write to the output directory" in capsys.readouterr().err


@pytest.mark.slow  # A second process.
def test_symlinked_output_dir_shares_the_run_folder_lock(tmp_path, capsys):
    """A link to a live run folder is that folder: a second train is refused.

    The first writer holds the lock through the link, as `keras-snapshot
    train --output-dir link` does; the second is refused under either name,
    in one line, before it writes anything.
    """
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    link = tmp_path / "link"
    link.symlink_to(run_dir, target_is_directory=True)
    with LockProcess() as other:
        assert other.acquire(link, "run folder") == ["locked"]
        for output in (link, run_dir):
            argv = ["train", *SMALL, "--output-dir", str(output)]
            assert cli.main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert f"The run folder {output}" in err
            assert f"is being written by process {other.pid} since" in err
            assert len(err.splitlines()) == 1
        assert os.listdir(run_dir) == [".lock"]  # No run.json written.


def test_run_directory_without_snapshots(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(
        json.dumps({"config": {"dataset": "digits"}, "status": "trained"})
    )
    assert cli.main(["export", str(run_dir), str(tmp_path / "out")]) == 2
    assert "snapshot directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error", [TypeError("a bug"), ValueError("a bug"), FileNotFoundError()]
)
def test_a_bug_is_not_reported_as_bad_input(error, monkeypatch, capsys):
    """Only `UsageError` exits 2; anything else keeps its traceback."""
    from keras_snapshot.app import evaluate

    def broken(args):
        raise error

    monkeypatch.setattr(evaluate, "evaluate_command", broken)
    with pytest.raises(type(error)):
        cli.main(["evaluate", "/no/such/run"])
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["train", "--epochs", "0"], ["train", "--lr", "nan"], ["bogus"]]
)
def test_argparse_errors_exit_2_without_traceback(argv):
    result = subprocess.run(
        [sys.executable, "-m", "keras_snapshot", *argv],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error" in result.stderr


@pytest.mark.slow
def test_export_onto_an_existing_file_or_folder(cli_run, tmp_path, capsys):
    blocker = tmp_path / "taken.keras"
    blocker.write_text("keep me")
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for output, kind in ((blocker, "file"), (folder, "folder")):
        assert cli.main(["export", cli_run, str(output)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{output} is an existing {kind}" in err
        assert "--overwrite" in err and len(err.splitlines()) == 1
    assert blocker.read_text() == "keep me"
    assert sorted(os.listdir(folder)) == ["notes.txt"]
    # A file is not an earlier export: even --overwrite keeps it.
    assert cli.main(["export", cli_run, str(blocker), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "never a file" in err and len(err.splitlines()) == 1
    assert blocker.read_text() == "keep me"
    assert cli.main(["export", cli_run, str(folder), "--overwrite"]) == 0
    assert {"ensemble.keras", "saved_model"} <= set(os.listdir(folder))
    # --overwrite replaces the exported entries only.
    assert (folder / "notes.txt").read_text() == "keep me"


def _option_entries(help_text):
    """The help text of each `--option`, one string per option."""
    entries, current = [], None
    for line in help_text.splitlines():
        if line.startswith("  -"):
            current = [line]
            entries.append(current)
        elif current is not None and line.startswith("    "):
            current.append(line)
        else:
            current = None
    return [" ".join(" ".join(e).split()) for e in entries]


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["export"]])
def test_every_option_shows_its_default(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--help"])
    assert info.value.code == 0
    entries = _option_entries(capsys.readouterr().out)
    assert any(e.startswith("-h, --help") for e in entries)
    for entry in entries:
        if entry.startswith(("-h, --help", "--version")):
            continue
        assert "default" in entry, entry


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"keras-snapshot {keras_snapshot.__version__}"
    )


def test_weight_decay_is_the_optimizers_and_applied_once(tmp_path):
    from keras_snapshot.app import pipeline

    args = cli.build_parser().parse_args(
        ["train", "--weight-decay", "0.001", "--output-dir", str(tmp_path)]
    )
    config = pipeline.run_config(args)
    data = load_dataset("digits")
    strategy = pipeline.get_strategy("default")
    model = pipeline.compiled_model(config, data, 0.1, strategy)
    assert model.optimizer.weight_decay == pytest.approx(0.001)
    assert not model.losses  # no L2 penalty on top


@pytest.mark.slow
def test_tfds_dataset_path_on_prepared_data(tmp_path):
    # Real tensorflow-datasets files, prepared offline. (Under
    # `tfds.testing.mock_data` a dataset is never prepared, so the loader
    # would check its download server, which CI cannot reach.)
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path / "tfds")
    tfds.testing.DummyMnist(data_dir=data_dir).download_and_prepare()
    run_dir = str(tmp_path / "dummy_mnist")
    code = cli.main(
        ["train", *SMALL, "--dataset", "dummy_mnist", "--data-dir", data_dir]
        + ["--batch-size", "6", "--output-dir", run_dir]
    )
    assert code == 0
    with open(os.path.join(run_dir, "report.json")) as f:
        report = json.load(f)
    assert report["config"]["dataset"] == "dummy_mnist"
    assert len(report["test"]["snapshots"]) == 2


@pytest.mark.slow
def test_killed_cli_run_resumes_with_the_same_command(tmp_path):
    """SIGKILL right after the first snapshot, then the same command again."""
    import signal

    run_dir = str(tmp_path / "run")
    command = [
        sys.executable,
        "-m",
        "keras_snapshot",
        "train",
        *QUICK,
        "--epochs",
        "6",
        "--snapshots",
        "3",
        "--verbose",
        "2",
        "--output-dir",
        run_dir,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    for line in process.stdout:
        if line.startswith("Snapshot 1/3 saved"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL
    with open(os.path.join(run_dir, "run.json")) as f:
        assert json.load(f)["status"] == "training"

    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resuming the interrupted run" in result.stdout
    snapshots = os.path.join(run_dir, "snapshots")
    manifest = keras_snapshot.read_manifest(snapshots)
    schedule = keras_snapshot.SnapshotSchedule.from_epochs(0.2, 6, 36, 3)
    assert [e["step"] for e in manifest["snapshots"]] == (
        schedule.cycle_end_steps
    )
    assert [e["index"] for e in manifest["snapshots"]] == [1, 2, 3]
    for path in keras_snapshot.snapshot_paths(snapshots):
        model = keras.saving.load_model(path)
        step = int(model.optimizer.iterations.numpy())
        assert step in schedule.cycle_end_steps
    assert os.path.isfile(os.path.join(run_dir, "report.json"))


@pytest.mark.slow
def test_temperature_scaling_is_fitted_on_validation(cli_run, tmp_path):
    import shutil

    from keras_snapshot import selection

    run_dir = str(tmp_path / "copy")
    shutil.copytree(cli_run, run_dir)
    argv = ["train", *SMALL, "--baseline", "--temperature-scaling"]
    assert cli.main([*argv, "--output-dir", run_dir]) == 0
    with open(os.path.join(run_dir, "report.json")) as f:
        report = json.load(f)
    temperature = report["exported"]["temperature"]
    assert temperature == report["choices"]["uniform"]["temperature"]
    data = load_dataset("digits")
    members = keras_snapshot.load_snapshots(os.path.join(run_dir, "snapshots"))
    val = np.stack([m.predict(data.x_val, verbose=0) for m in members])
    assert temperature == pytest.approx(
        selection.fit_temperature(val.mean(0), data.y_val), rel=1e-3
    )
    test = np.stack([m.predict(data.x_test, verbose=0) for m in members])
    ensemble = keras.saving.load_model(os.path.join(run_dir, "ensemble.keras"))
    np.testing.assert_allclose(
        ensemble.predict(data.x_test, verbose=0),
        selection.apply_temperature(test.mean(0), temperature),
        atol=1e-3,
    )


HELP_WITHOUT_TENSORFLOW = """
import sys
from keras_snapshot.app import cli
for argv in (["--help"], ["train", "--help"], ["--version"]):
    try:
        cli.main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
print(sorted(m for m in ("tensorflow", "keras", "jax") if m in sys.modules))
"""


def test_help_and_version_do_not_import_tensorflow():
    result = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TENSORFLOW],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "keras-snapshot " + keras_snapshot.__version__ in result.stdout


@pytest.mark.slow
def test_the_program_registers_keras_objects_when_it_runs_a_command():
    code = """
import sys
import keras_snapshot
assert "SnapshotSchedule" not in vars(keras_snapshot)
from keras_snapshot.app import cli
cli.main(["evaluate", "/no/such/run"])
import keras
assert keras.saving.get_registered_object("keras_snapshot>SnapshotSchedule")
print("registered")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    )
    assert "registered" in result.stdout, result.stderr[-2000:]


# Issue 31, item 14: a --model file that does not load or does not fit is
# refused in one line naming the file; the command line recompiles anyway.


class _Doubler(keras.layers.Layer):
    """A custom layer that is not registered as serializable."""

    def call(self, x):
        return 2.0 * x


def _custom_loss(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


def _digits_model(path, custom_layer=False, output=(10,), loss=None):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    if custom_layer:
        x = _Doubler(name="doubler")(x)
    x = keras.layers.Dense(int(np.prod(output)))(x)
    if len(output) > 1:
        x = keras.layers.Reshape(output)(x)
    model = keras.Model(inputs, keras.layers.Softmax()(x))
    if loss is not None:
        model.compile("sgd", loss)
    model.save(path)
    return str(path)


def test_model_file_with_a_custom_loss_trains(tmp_path):
    path = _digits_model(tmp_path / "custom_loss.keras", loss=_custom_loss)
    run_dir = str(tmp_path / "run")
    argv = ["train", *SMALL, "--model", path, "--output-dir", run_dir]
    assert cli.main(argv) == 0
    assert os.path.isfile(os.path.join(run_dir, "ensemble.keras"))


def test_model_files_that_cannot_be_trained_are_one_line(tmp_path, capsys):
    custom = _digits_model(tmp_path / "custom.keras", custom_layer=True)
    cube = _digits_model(tmp_path / "cube.keras", output=(4, 10))
    text = tmp_path / "notes.keras"
    text.write_text("not a model")
    other = tmp_path / "notes.txt"
    other.write_text("not a model")
    cases = [
        (custom, ["_Doubler", "register_keras_serializable"]),
        (cube, ["(None, 4, 10)", "(batch, classes)"]),
        (str(text), ["is not a Keras model file (.keras)"]),
        (str(other), ["is not a Keras model file (.keras)"]),
    ]
    for path, words in cases:
        run_dir = tmp_path / ("run_" + os.path.basename(path))
        argv = ["train", *SMALL, "--model", path, "--output-dir", str(run_dir)]
        assert cli.main(argv) == 2, path
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert path in err and "Traceback" not in err, err
        for word in words:
            assert word in err, err
        assert not run_dir.exists()


# Issue 32: what a newcomer sees. Without --verbose, a command that trains
# prints one line per snapshot and one progress bar for the whole command,
# not Keras's bar for every epoch, and none of TensorFlow's start-up lines.

TENSORFLOW_STARTUP = ("absl::InitializeLog", "oneDNN", "cpu_feature_guard")
TENSORFLOW_STARTUP += ("cuInit",)


@pytest.mark.slow
def test_default_output_is_a_line_per_snapshot_and_one_bar(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TF_CPP", "ABSL"))
    }
    argv = ["train", *QUICK, "--epochs", "4", "--snapshots", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "keras_snapshot", *argv]
        + ["--output-dir", str(tmp_path / "run")],
        capture_output=True,  # As bytes: text=True would turn "\r" to "\n".
        env=env,
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err[-2000:]
    assert "Epoch 1/" not in out
    assert "36/36" not in out  # Keras's bar over an epoch's 36 steps.
    lines = out.split("\n")  # A bar's line holds its updates after "\r"s.
    saved = [line for line in lines if " saved at step " in line]
    assert [line.split(" saved")[0] for line in saved] == [
        "Snapshot 1/2",
        "Snapshot 2/2",
    ]
    # One bar over the 4 epochs; its line is ended for each snapshot line.
    bars = [line for line in lines if "━" in line]
    assert 1 <= len(bars) <= 3, bars
    assert "4/4" in bars[-1].split("\r")[-1]
    for name in TENSORFLOW_STARTUP:
        assert name not in err, err


@pytest.mark.slow
def test_verbose_shows_kerass_bar_for_every_epoch(tmp_path, capsys):
    argv = ["train", *QUICK, "--epochs", "2", "--snapshots", "2"]
    argv += ["--verbose", "--output-dir", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out
    assert "36/36" in out
    assert out.count("Snapshot 1/2 saved at step") == 1


@pytest.mark.parametrize(
    "argv,verbose",
    [
        (["train"], 0),
        (["train", "--verbose"], 1),
        (["train", "--verbose", "--verbose"], 2),
        (["train", "--verbose", "0"], 0),  # The old integer option.
        (["train", "--verbose", "1"], 1),
        (["train", "--verbose=2"], 2),
        (["distill", "--verbose", "runs/a"], 1),
        (["distill", "runs/a", "--verbose", "2"], 2),
    ],
)
def test_verbose_is_a_count_and_takes_the_old_integers(argv, verbose):
    args = cli.build_parser().parse_args(cli._verbose_counts(argv))
    assert args.verbose == verbose
    if args.command == "distill":
        assert args.run_dir == "runs/a"
