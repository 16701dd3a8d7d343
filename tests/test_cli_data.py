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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_distill_works_on_a_streamed_run(folder_run):
    _, run_dir = folder_run
    assert cli.main(["distill", str(run_dir), "--epochs", "1"]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert 0 <= report["test"]["student"]["error"] <= 1
    student = keras.saving.load_model(run_dir / "student.keras")
    assert student.input_shape == (None, 16, 12, 3)


@pytest.mark.slow
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


@pytest.mark.slow
def test_export_overwrite_keeps_a_classes_json_folder_or_link(
    folder_run, tmp_path, capsys
):
    _, run_dir = folder_run
    precious = tmp_path / "precious.json"
    precious.write_text("[]")
    for kind, make in (
        ("folder", lambda p: (p.mkdir(), (p / "keep.txt").write_text("x"))),
        ("symbolic link", lambda p: p.symlink_to(precious)),
    ):
        out = tmp_path / f"out_{kind[0]}"
        out.mkdir()
        make(out / "classes.json")
        argv = ["export", str(run_dir), str(out), "--overwrite"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert f"classes.json is a {kind}" in err and "\n" not in err, err
        assert sorted(os.listdir(out)) == ["classes.json"]
    assert (tmp_path / "out_f" / "classes.json" / "keep.txt").exists()
    assert os.path.islink(tmp_path / "out_s" / "classes.json")
    assert precious.read_text() == "[]"


def _members(path):
    model = keras.saving.load_model(path)
    return sorted(
        layer.name
        for layer in model.layers
        if layer.name.startswith("snapshot_")
    )


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_model_file_is_recorded_by_its_absolute_path(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    _easy_npz("blobs.npz")
    _model_file("net.keras", "softmax")
    run_dir = tmp_path / "runs" / "blobs_net_seed0"
    argv = ["train", "--data", "blobs.npz", "--model", "net.keras", *FAST]
    assert cli.main(argv) == 0
    run_file = run_dir / "run.json"
    run = json.loads(run_file.read_text())
    assert run["config"]["model"] == str(tmp_path / "net.keras")
    # The same run, named from another folder, resumes.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = ["train", "--data", "../blobs.npz", "--model", "../net.keras"]
    assert cli.main([*again, "--output-dir", str(run_dir), *FAST]) == 0
    assert "Training already finished" in capsys.readouterr().out
    # A run.json of an earlier version, with the path as typed, too.
    run["config"]["model"] = "net.keras"
    run_file.write_text(json.dumps(run))
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 0
    assert "Training already finished" in capsys.readouterr().out


@pytest.mark.slow
def test_a_model_file_that_now_scales_its_input_is_refused_on_resume(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    _easy_npz("blobs.npz")
    _input_model_file("swap.keras")
    argv = ["train", "--data", "blobs.npz", "--model", "swap.keras", *FAST]
    assert cli.main(argv) == 0
    capsys.readouterr()
    _input_model_file("swap.keras", [keras.layers.Rescaling(1 / 255)])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert (
        "runs/blobs_swap_seed0 was trained with pixel values in [0, 1], but "
        f"the model file {tmp_path / 'swap.keras'} now takes [0, 255]"
    ) in err, err


@pytest.mark.slow
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


# Issue 31, "Nothing silent" ------------------------------------------------


def _input_model_file(path, first_layers=(), channels=1):
    inputs = keras.Input((6, 6, channels))
    x = inputs
    for layer in first_layers:
        x = layer(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    keras.Model(inputs, outputs).save(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "first_layers, pixel_max, words",
    [
        (lambda: [keras.layers.Rescaling(1 / 255)], 255, "raw pixel values"),
        (
            lambda: [keras.layers.Normalization(mean=127.5, variance=5000.0)],
            255,
            "raw pixel values",
        ),
        (lambda: [], 1, "scaled to [0, 1]"),
    ],
    ids=["rescaling", "normalization", "plain"],
)
def test_a_model_that_scales_its_own_input_gets_raw_pixel_values(
    tmp_path, monkeypatch, capsys, first_layers, pixel_max, words
):
    monkeypatch.chdir(tmp_path)
    _easy_npz("blobs.npz")
    _input_model_file("net.keras", first_layers())
    argv = ["train", "--data", "blobs.npz", "--model", "net.keras"]
    assert cli.main([*argv, *FAST, "--lr", "0.05"]) == 0
    lines = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("Inputs:")
    ]
    assert len(lines) == 1 and words in lines[0], lines
    run_dir = tmp_path / "runs" / "blobs_net_seed0"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["config"]["pixel_max"] == pixel_max
    assert report["test"]["ensemble"]["error"] < 0.1
    # The exported ensemble takes what the model was trained on.
    x = np.load("blobs.npz")["x"][..., None].astype("float32")
    x = x * (pixel_max / np.float32(255))
    ensemble = keras.saving.load_model(run_dir / "ensemble.keras")
    predicted = ensemble.predict(x, verbose=0).argmax(axis=1)
    assert np.mean(predicted == np.load("blobs.npz")["y"]) > 0.9


@pytest.mark.parametrize(
    "first_layers, scales",
    [
        ([keras.layers.Rescaling(1 / 255)], True),
        ([keras.layers.Normalization(mean=127.5, variance=5000.0)], True),
        (
            [keras.layers.Resizing(6, 6), keras.layers.Rescaling(1 / 127.5)],
            True,
        ),
        (
            [
                keras.Sequential([keras.layers.RandomFlip("horizontal")]),
                keras.layers.Rescaling(1 / 255),
            ],
            True,
        ),
        (
            [
                keras.layers.RandomContrast(0.2),
                keras.layers.RandomBrightness(0.1, value_range=(0, 255)),
                keras.layers.Rescaling(1 / 255, offset=-1),
            ],
            True,
        ),
        ([], False),
        ([keras.layers.Conv2D(2, 3), keras.layers.Rescaling(2.0)], False),
        # Scales [0, 1] to [-1, 1] or centers it: expects [0, 1].
        ([keras.layers.Rescaling(2.0, offset=-1)], False),
        ([keras.layers.Rescaling(1.0, offset=-0.5)], False),
        ([keras.layers.Normalization(mean=0.5, variance=0.25)], False),
        (
            [keras.layers.Normalization(mean=[0.4, 0.5, 3], variance=[1] * 3)],
            True,
        ),
    ],
    ids=["rescaling", "normalization", "resize-then-rescale", "augment"]
    + ["contrast-brightness", "none", "rescaling-later", "rescaling-to-pm1"]
    + ["rescaling-center", "normalization-01", "normalization-per-channel"],
)
def test_which_models_scale_their_own_input(tmp_path, first_layers, scales):
    path = str(tmp_path / "net.keras")
    _input_model_file(path, first_layers, channels=3)
    model = keras.saving.load_model(path)
    assert (pipeline.input_scaling_layer(model) is not None) == scales
    assert pipeline.model_pixel_max(path) == (255 if scales else 1)


@pytest.mark.slow
def test_an_ensemble_no_better_than_chance_is_flagged(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    # Blank images: nothing to learn, every prediction is the same class.
    y = np.repeat(np.arange(3), 30)
    np.savez("blank.npz", x=np.zeros((90, 6, 6), np.uint8), y=y)
    _model_file("net.keras", "softmax")
    argv = ["train", "--data", "blank.npz", "--model", "net.keras", *FAST]
    assert cli.main(argv) == 0
    lines = [
        line
        for line in capsys.readouterr().out.splitlines()
        if "chance" in line
    ]
    assert len(lines) == 1, lines
    assert "66.67%" in lines[0] and "3 classes" in lines[0]
    markdown = (tmp_path / "runs" / "blank_net_seed0" / "report.md").read_text()
    assert "no better than chance" in markdown


def test_the_class_names_are_recorded_and_exported(folder_run, tmp_path):
    _, run_dir = folder_run
    classes = ["cat", "dog", "eel"]
    assert json.loads((run_dir / "run.json").read_text())["classes"] == classes
    assert json.loads((run_dir / "classes.json").read_text()) == classes
    assert '0: "cat", 1: "dog", 2: "eel"' in (run_dir / "report.md").read_text()
    out = tmp_path / "out"
    assert cli.main(["export", str(run_dir), str(out), "--last", "1"]) == 0
    assert json.loads((out / "classes.json").read_text()) == classes


def test_class_names_with_commas_or_newlines_stay_one_line(folder_run):
    from keras_snapshot.app import report as report_lib

    _, run_dir = folder_run
    report = json.loads((run_dir / "report.json").read_text())
    report["classes"] = ["a, 1: b", "c\nd", 'e"']
    lines = report_lib.markdown_report(report).splitlines()
    (line,) = [line for line in lines if line.startswith("Classes")]
    assert line == 'Classes (label: name): 0: "a, 1: b", 1: "c\\nd", 2: "e\\"".'


def _npz(tmp_path, **arrays):
    path = str(tmp_path / "data.npz")
    np.savez(path, **arrays)
    return path


def test_npz_splits_are_scaled_by_one_rule(tmp_path):
    from keras_snapshot.app.datasets import open_dataset

    x = np.random.default_rng(0).integers(0, 256, (40, 4, 4), dtype=np.uint8)
    y = np.arange(40) % 2
    # uint8 train, float 0-255 test: both are 0-255.
    path = _npz(
        tmp_path,
        x_train=x,
        y_train=y,
        x_test=x[:10].astype(np.float32),
        y_test=y[:10],
    )
    data = open_dataset(path, validation_fraction=0)
    np.testing.assert_allclose(data.x_train[..., 0], x / np.float32(255))
    np.testing.assert_allclose(data.x_test, data.x_train[:10])


@pytest.mark.parametrize(
    "arrays, message",
    [
        (
            {"y": np.r_[np.arange(10).repeat(3), 255]},
            r"integers 0\.\.K-1.*Received: labels 0\.\.9 and 255 \(1 sample\)",
        ),
        (
            {"y": np.array(["cat", "dog"] * 15 + ["cat"])},
            r"class indices.*Received: labels of dtype <U3 \('cat', 'dog'\)",
        ),
        (
            {"y": np.arange(31) % 3 + 1},
            r"Received: labels 1\.\.3 \(31 samples\)",
        ),
        (
            {
                "x_train": np.full((31, 4, 4), 0.5, np.float32),
                "x_test": np.full((4, 4, 4), 200.0, np.float32),
            },
            r"x_train.*in \[0, 1\].*x_test.*up to 200.*same way",
        ),
        (
            {"x": np.full((31, 4, 4), -3.0, np.float32)},
            r"pixel values in \[0, 1\] or \[0, 255\].*Received: .*-3",
        ),
    ],
    ids=["255-among-0-9", "strings", "from-1", "mixed-scales", "negative"],
)
def test_bad_npz_values_are_refused_in_one_line(tmp_path, arrays, message):
    from keras_snapshot.app.datasets import open_dataset

    base = {"x": np.zeros((31, 4, 4), np.uint8), "y": np.arange(31) % 2}
    if "x_train" in arrays:
        base = {"y_train": np.arange(31) % 2, "y_test": np.arange(4) % 2}
    path = _npz(tmp_path, **{**base, **arrays})
    with pytest.raises(ValueError, match=message) as error:
        open_dataset(path)
    assert "\n" not in str(error.value) and path in str(error.value)


@pytest.mark.parametrize(
    "classes, count, message",
    [
        (("a", "b"), 1, r"no test images.*--test-fraction"),
        (("a", "b", "c"), 2, r"no validation images.*--validation-fraction"),
    ],
    ids=["no-test-image", "no-validation-image"],
)
def test_too_few_images_are_refused_before_anything_is_written(
    tmp_path, monkeypatch, capsys, classes, count, message
):
    monkeypatch.chdir(tmp_path)
    write_image_folder("tiny", classes=classes, count=count, size=(16, 16))
    assert cli.main(["train", "--data", "tiny", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and __import__("re").search(message, err), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_evaluate_and_export_warn_when_the_data_changed_since_training(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    _easy_npz("blobs.npz")
    _model_file("net.keras", "softmax")
    argv = ["train", "--data", "blobs.npz", "--model", "net.keras", *FAST]
    assert cli.main(argv) == 0
    run_dir = tmp_path / "runs" / "blobs_net_seed0"
    recorded = json.loads((run_dir / "run.json").read_text())
    assert recorded["data_fingerprint"]["counts"] == {
        "train": 65,
        "val": 7,
        "test": 18,
    }
    capsys.readouterr()

    def warnings(out):
        return [line for line in out.splitlines() if "changed" in line]

    assert cli.main(["evaluate", str(run_dir)]) == 0
    assert warnings(capsys.readouterr().out) == []
    _easy_npz("blobs.npz", per_class=40)
    assert cli.main(["evaluate", str(run_dir)]) == 0
    (line,) = warnings(capsys.readouterr().out)
    assert "blobs.npz has changed since training" in line
    assert "test: 18 -> 24 images" in line and "labels differ" in line
    evaluation = json.loads((run_dir / "evaluation_test.json").read_text())
    assert evaluation["warnings"] == [line]
    out = tmp_path / "out"
    export = ["export", str(run_dir), str(out), "--select", "last_m"]
    assert cli.main(export) == 0
    assert len(warnings(capsys.readouterr().out)) == 1
