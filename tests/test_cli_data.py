"""`keras-snapshot` on a user's own data and model (`--data`, `--model`)."""

import json
import os

import keras
import numpy as np
import pytest
from helpers import write_image_folder

from keras_snapshot.app import cli
from keras_snapshot.app import export as export_lib
from keras_snapshot.app import pipeline

FAST = [
    "--epochs",
    "2",
    "--snapshots",
    "2",
    "--batch-size",
    "16",
    "--verbose",
    "0",
]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A finished run on a folder of images, from the default run folder."""
    root = tmp_path_factory.mktemp("user")
    write_image_folder(root / "pets", count=12, size=(16, 12))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert cli.main(["train", "--data", "pets", *FAST]) == 0
    finally:
        os.chdir(cwd)
    return root, root / "runs" / "pets_flat_cnn_seed0"


def test_an_image_folder_trains_end_to_end_and_is_named_by_its_path(folder_run):
    root, run_dir = folder_run
    report = json.loads((run_dir / "report.json").read_text())
    assert report["config"]["data"] == str(root / "pets")
    assert report["config"]["dataset"] is None
    assert report["test"]["num_examples"] == 7  # 36 images, 0.2 held out
    assert str(root / "pets") in (run_dir / "report.md").read_text()
    assert sorted(os.listdir(run_dir / "snapshots")) == [
        "manifest.json",
        "snapshot-01.keras",
        "snapshot-02.keras",
    ]
    ensemble = keras.saving.load_model(run_dir / "ensemble.keras")
    assert ensemble.input_shape == (None, 16, 12, 3)
    assert ensemble.output_shape == (None, 3)


def test_the_same_command_resumes_and_other_image_settings_are_refused(
    folder_run, capsys
):
    root, run_dir = folder_run
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert cli.main(["train", "--data", "pets", *FAST]) == 0
        assert "Training already finished" in capsys.readouterr().out
        argv = ["train", "--data", "pets", "--image-size", "16x16", *FAST]
        assert cli.main(argv) == 2
        assert "image_size: None != [16, 16]" in capsys.readouterr().err
    finally:
        os.chdir(cwd)


def test_distill_works_on_a_streamed_run(folder_run):
    _, run_dir = folder_run
    assert cli.main(["distill", str(run_dir), "--epochs", "1"]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert 0 <= report["test"]["student"]["error"] <= 1
    student = keras.saving.load_model(run_dir / "student.keras")
    assert student.input_shape == (None, 16, 12, 3)


def test_evaluate_and_export_refuse_an_unfinished_run(
    folder_run, tmp_path, capsys
):
    _, run_dir = folder_run
    run_file = run_dir / "run.json"
    saved = run_file.read_text()
    run = json.loads(saved)
    run["status"] = "training"
    run_file.write_text(json.dumps(run))
    try:
        for argv in (
            ["evaluate", str(run_dir)],
            ["export", str(run_dir), str(tmp_path / "out")],
        ):
            assert cli.main(argv) == 2
            err = capsys.readouterr().err
            assert "has not finished training (status: 'training')" in err
            assert "--allow-unfinished" in err
        assert not (tmp_path / "out").exists()
        argv = [
            "export",
            str(run_dir),
            str(tmp_path / "out"),
            "--allow-unfinished",
        ]
        assert cli.main(argv) == 0
        assert "has not finished training" in capsys.readouterr().out
    finally:
        run_file.write_text(saved)


def _members(path):
    model = keras.saving.load_model(path)
    return sorted(
        layer.name
        for layer in model.layers
        if layer.name.startswith("snapshot_")
    )


def test_export_overwrite_keeps_the_old_output_until_the_new_one_is_complete(
    folder_run, tmp_path, monkeypatch
):
    _, run_dir = folder_run
    out = tmp_path / "out"
    assert cli.main(["export", str(run_dir), str(out), "--last", "1"]) == 0
    old = (out / "ensemble.keras").read_bytes()
    assert _members(out / "ensemble.keras") == ["snapshot_2"]
    old_model = sorted(os.listdir(out / "saved_model"))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_lib, "export_ensemble", full_disk)
    with pytest.raises(OSError, match="No space left"):
        cli.main(["export", str(run_dir), str(out), "--overwrite"])
    assert (out / "ensemble.keras").read_bytes() == old
    assert sorted(os.listdir(out / "saved_model")) == old_model
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no scratch folder left
    monkeypatch.undo()
    assert cli.main(["export", str(run_dir), str(out), "--overwrite"]) == 0
    assert _members(out / "ensemble.keras") == ["snapshot_1", "snapshot_2"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def _easy_npz(path, classes=3, per_class=30):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), per_class)
    x = rng.integers(0, 60, (len(y), 6, 6), dtype=np.uint8)
    for label in range(classes):
        x[y == label, label] = 255
    np.savez(path, x=x, y=y)


def _model_file(path, activation, outputs=1):
    inputs = keras.Input((6, 6, 1))
    hidden = keras.layers.Flatten()(inputs)
    heads = [
        keras.layers.Dense(3, activation=activation, name=f"head{i}")(hidden)
        for i in range(outputs)
    ]
    keras.Model(inputs, heads if outputs > 1 else heads[0]).save(path)


def test_a_logits_model_file_trains_with_from_logits_on_an_npz(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _easy_npz("blobs.npz")
    _model_file("linear_net.keras", None)
    argv = ["train", "--data", "blobs.npz", "--model", "linear_net.keras"]
    assert cli.main([*argv, *FAST, "--lr", "0.05"]) == 0
    run_dir = tmp_path / "runs" / "blobs_linear_net_seed0"
    report = json.loads((run_dir / "report.json").read_text())
    # Trained on the right loss: the easy classes are learnt.
    assert report["test"]["final_single"]["error"] < 0.1
    # The ensemble averages the snapshots' softmax of their logits.
    snapshots = [
        keras.saving.load_model(run_dir / "snapshots" / f"snapshot-0{i}.keras")
        for i in (1, 2)
    ]
    x = np.load("blobs.npz")["x"][:5, ..., None] / np.float32(255)
    expected = np.mean(
        [
            keras.ops.convert_to_numpy(keras.ops.softmax(s(x)))
            for s in snapshots
        ],
        axis=0,
    )
    ensemble = keras.saving.load_model(run_dir / "ensemble.keras")
    np.testing.assert_allclose(
        ensemble.predict(x, verbose=0), expected, atol=1e-5
    )


@pytest.mark.parametrize(
    "activation, outputs, message",
    [
        (
            "sigmoid",
            1,
            "the output layer 'head0' of the model .* has a sigmoid activation",
        ),
        ("softmax", 2, r"has 2 outputs \(head0, head1\)"),
    ],
)
def test_a_model_that_is_not_a_classifier_is_refused_before_training(
    tmp_path, monkeypatch, capsys, activation, outputs, message
):
    monkeypatch.chdir(tmp_path)
    _easy_npz("blobs.npz")
    _model_file("net.keras", activation, outputs)
    argv = ["train", "--data", "blobs.npz", "--model", "net.keras", *FAST]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "pets", "--dataset", "digits"], "give one"),
        (["--dataset", "pets"], "is a path; pass it with --data pets"),
        (["--data", "no_such.npz"], "No file or folder at"),
        (["--data", "broken"], r"broken/b/bad.png is not a readable image"),
        (
            ["--dataset", "digits", "--image-size", "4"],
            "apply to a folder of images",
        ),
    ],
    ids=[
        "both",
        "path-as-name",
        "missing",
        "corrupt-image",
        "image-size-on-a-name",
    ],
)
def test_bad_data_is_refused_in_one_line_before_anything_is_written(
    tmp_path, monkeypatch, capsys, argv, message
):
    monkeypatch.chdir(tmp_path)
    write_image_folder("pets", count=2)
    write_image_folder("broken", classes=("a", "b"), count=2)
    (tmp_path / "broken" / "b" / "bad.png").write_bytes(b"\x89PNG broken")
    assert cli.main(["train", *argv, *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and __import__("re").search(message, err), err
    assert not (tmp_path / "runs").exists()


def test_image_size_is_parsed_or_refused(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["train", "--image-size", "32x24"]).image_size == [
        32,
        24,
    ]
    assert parser.parse_args(["train", "--image-size", "28"]).image_size == [
        28,
        28,
    ]
    for bad in ("0x4", "ax4", "4x4x4"):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", "--image-size", bad])
        assert "HEIGHTxWIDTH" in capsys.readouterr().err


def test_each_method_and_model_file_has_its_own_default_run_folder():
    parser = cli.build_parser()

    def folder(*argv):
        return pipeline.default_run_dir(parser.parse_args(["train", *argv]))

    assert folder() == os.path.join(
        "runs", "fashion_mnist_small_flat_cnn_seed0"
    )
    assert (
        len(
            {folder(), *(folder("--method", m) for m in ("fge", "swa", "sgdr"))}
        )
        == 4
    )
    assert folder("--method", "fge").endswith("flat_cnn_fge_seed0")
    assert folder("--freezeout").endswith("flat_cnn_freezeout_seed0")
    assert folder(
        "--data", "/x/my_pics/", "--model", "nets/res.keras", "--seed", "2"
    ) == (os.path.join("runs", "my_pics_res_seed2"))


def test_the_cli_quiets_tensorflow_unless_the_user_set_a_level(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    cli.quiet_tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("2", "3")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    cli.quiet_tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
