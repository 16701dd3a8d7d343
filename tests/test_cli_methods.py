"""`keras-snapshot train --method ...` and `keras-snapshot distill`."""

import json
import os
import shutil

import keras
import numpy as np
import pytest

import keras_snapshot
from keras_snapshot import metrics
from keras_snapshot import selection
from keras_snapshot.app import cli
from keras_snapshot.app import methods
from keras_snapshot.app.datasets import load_dataset

SMALL = [
    "--dataset",
    "digits",
    "--epochs",
    "2",
    "--snapshots",
    "2",
    "--batch-size",
    "64",
    "--verbose",
    "0",
]
STEPS_PER_EPOCH = 18  # 1131 digits training images (90%), batch 64.


def train(tmp_path_factory, method):
    run_dir = str(tmp_path_factory.mktemp(method) / "run")
    assert (
        cli.main(["train", *SMALL, "--method", method, "--output-dir", run_dir])
        == 0
    )
    with open(os.path.join(run_dir, "report.json")) as f:
        report = json.load(f)
    return run_dir, report


@pytest.fixture(scope="module")
def swa_run(tmp_path_factory):
    return train(tmp_path_factory, "swa")


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, ends",
    [
        ("snapshot", [18, 36]),
        # t_mul=2: cycles of 12 and 24 steps (36 // 3 = 12).
        ("sgdr", [12, 36]),
        # Cycles of 36 // 3 = 12 steps after a normal phase of 18 steps.
        ("fge", [24, 36]),
    ],
)
def test_each_snapshot_method_trains_and_exports(
    tmp_path_factory, method, ends
):
    data = load_dataset("digits", validation_fraction=0.1, seed=0)
    assert -(-len(data.x_train) // 64) == STEPS_PER_EPOCH
    run_dir, report = train(tmp_path_factory, method)
    assert report["method"] == method
    assert report["config"]["method"] == method
    with open(os.path.join(run_dir, "run.json")) as f:
        assert json.load(f)["config"]["method"] == method
    assert report["cycle_end_steps"] == ends
    manifest = keras_snapshot.read_manifest(os.path.join(run_dir, "snapshots"))
    assert [e["step"] for e in manifest["snapshots"]] == ends
    ensemble = keras.saving.load_model(os.path.join(run_dir, "ensemble.keras"))
    probs = ensemble.predict(data.x_test, verbose=0)
    members = keras_snapshot.load_snapshots(os.path.join(run_dir, "snapshots"))
    np.testing.assert_allclose(
        probs,
        selection.predict_members(members, data.x_test).mean(axis=0),
        atol=1e-5,
    )
    assert os.path.isdir(os.path.join(run_dir, "saved_model"))
    with open(os.path.join(run_dir, "report.md")) as f:
        assert f"Method: `{method}`" in f.read()


@pytest.mark.slow
def test_swa_exports_one_recalibrated_averaged_model(swa_run):
    run_dir, report = swa_run
    data = load_dataset("digits", validation_fraction=0.1, seed=0)
    assert report["method"] == "swa"
    # Averaged at the ends of epochs 1 and 2 (the final 25%, at least 1).
    assert report["cycle_end_steps"] == [18, 36]
    ensemble = keras.saving.load_model(os.path.join(run_dir, "ensemble.keras"))
    assert report["exported"]["members"] == 1
    swa = keras.saving.load_model(os.path.join(run_dir, methods.SWA_FILE))
    # The exported predictor is the averaged model: 1x inference.
    np.testing.assert_allclose(
        ensemble.predict(data.x_test, verbose=0),
        swa.predict(data.x_test, verbose=0),
        atol=1e-5,
    )
    # Its weights are the mean of the two epoch-end snapshots' weights.
    averaged = keras_snapshot.average_weights(
        os.path.join(run_dir, "snapshots"),
        recalibration_data=data.x_train[:10000],
    )
    for a, b in zip(swa.trainable_weights, averaged.trainable_weights):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a),
            keras.ops.convert_to_numpy(b),
            atol=1e-5,
        )
    probs = swa.predict(data.x_test, verbose=0)
    assert report["test"]["swa"]["error"] == pytest.approx(
        metrics.evaluate_predictions(probs, data.y_test)["error"]
    )


@pytest.mark.slow
def test_distill_command_adds_the_student(swa_run, tmp_path):
    run_dir, _ = swa_run
    code = cli.main(["distill", run_dir, "--epochs", "1", "--temperature", "2"])
    assert code == 0
    student = keras.saving.load_model(os.path.join(run_dir, "student.keras"))
    data = load_dataset("digits", validation_fraction=0.1, seed=0)
    probs = student.predict(data.x_test, verbose=0)
    with open(os.path.join(run_dir, "report.json")) as f:
        report = json.load(f)
    scores = report["test"]["student"]
    assert scores["error"] == pytest.approx(
        metrics.evaluate_predictions(probs, data.y_test)["error"]
    )
    assert scores["nll"] == pytest.approx(
        metrics.evaluate_predictions(probs, data.y_test)["nll"], rel=1e-4
    )
    assert report["student"]["temperature"] == 2.0
    assert report["student"]["epochs"] == 1
    # A fresh copy of the snapshot architecture, not the ensemble.
    snapshot = keras_snapshot.load_snapshots(
        os.path.join(run_dir, "snapshots")
    )[0]
    assert [w.shape for w in student.weights] == [
        w.shape for w in snapshot.weights
    ]
    with open(os.path.join(run_dir, "report.md")) as f:
        assert "Distilled student" in f.read()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--method", "bagging"], "invalid choice"),
        (["distill", "RUN", "--temperature", "0"], "temperature"),
        (["distill", "RUN", "--alpha", "1.5"], "alpha"),
        (["distill", "RUN", "--epochs", "0"], "epochs"),
    ],
)
def test_bad_values_exit_2_before_writing(tmp_path, capsys, argv, message):
    run_dir = str(tmp_path / "run")
    argv = [run_dir if a == "RUN" else a for a in argv]
    if argv[0] == "train":
        argv += ["--output-dir", run_dir]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(run_dir)


def test_budget_too_small_for_the_method_exits_2(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    argv = ["train", *SMALL, "--output-dir", run_dir]
    argv[argv.index("--snapshots") + 1] = "8"
    assert cli.main([*argv, "--method", "sgdr"]) == 2
    assert "--method sgdr" in capsys.readouterr().err
    assert not os.path.exists(run_dir)


def test_distill_of_a_folder_without_a_run_exits_2(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert cli.main(["distill", str(folder)]) == 2
    assert "not a keras-snapshot run" in capsys.readouterr().err
    assert os.listdir(folder) == []


@pytest.mark.slow
def test_resuming_with_another_method_exits_2(swa_run, capsys):
    run_dir, _ = swa_run
    code = cli.main(
        ["train", *SMALL, "--method", "fge", "--output-dir", run_dir]
    )
    assert code == 2
    assert "--method swa" in capsys.readouterr().err


@pytest.mark.slow
def test_another_method_with_overwrite_starts_over(swa_run, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(swa_run[0], run_dir)
    argv = ["train", *SMALL, "--method", "fge", "--output-dir", run_dir]
    assert cli.main([*argv, "--overwrite"]) == 0
    with open(os.path.join(run_dir, "run.json")) as f:
        assert json.load(f)["config"]["method"] == "fge"
