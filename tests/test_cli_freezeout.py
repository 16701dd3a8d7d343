"""`keras-snapshot train --freezeout`, end to end on tiny digits runs."""

import json
import os

import keras
import pytest

from keras_snapshot import metrics
from keras_snapshot.app import cli
from keras_snapshot.app import methods
from keras_snapshot.app.datasets import load_dataset

TINY = ["--dataset", "digits", "--epochs", "3", "--batch-size", "64"]


@pytest.fixture(scope="module")
def fo_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("cli_fo") / "run")
    argv = ["train", *TINY, "--freezeout", "--baseline", "--verbose", "2"]
    return run_dir, argv


@pytest.fixture(scope="module")
def fo_output(fo_run):
    run_dir, argv = fo_run
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main([*argv, "--output-dir", run_dir])
    assert code == 0
    return out.getvalue()


def _report(run_dir):
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f)


def test_flags_parse():
    args = cli.build_parser().parse_args(
        [
            "train",
            "--freezeout",
            "--t0",
            "0.5",
            "--freezeout-scaling",
            "linear",
            "--no-scale-lr",
        ]
    )
    assert args.freezeout and args.t0 == 0.5
    assert args.freezeout_scaling == "linear" and args.scale_lr is False
    defaults = cli.build_parser().parse_args(["train"])
    assert not defaults.freezeout and defaults.t0 == 0.8
    assert defaults.freezeout_scaling == "cubic" and defaults.scale_lr


@pytest.mark.slow
def test_report_keys_and_scores(fo_run, fo_output):
    run_dir, _ = fo_run
    report = _report(run_dir)
    assert report["train_seconds"] > 0
    assert report["baseline_train_seconds"] > 0
    for name in ("final_single", "baseline"):
        assert 0 <= report["test"][name]["error"] <= 1
        assert report["test"][name]["nll"] > 0
    assert 0 < report["estimated_saving"] < 1
    config = report["config"]
    assert config["freezeout"] is True and config["t0"] == 0.8
    assert config["freezeout_scaling"] == "cubic" and config["scale_lr"]
    # `final_single` is the saved FreezeOut model, `baseline` the other.
    data = load_dataset("digits", validation_fraction=0.1, seed=0)
    for name, file in (
        ("final_single", "freezeout.keras"),
        ("baseline", "baseline.keras"),
    ):
        model = keras.saving.load_model(
            os.path.join(run_dir, file), compile=False
        )
        probs = model.predict(data.x_test, verbose=0)
        assert report["test"][name]["error"] == pytest.approx(
            metrics.evaluate_predictions(probs, data.y_test)["error"]
        )
    assert not os.path.exists(os.path.join(run_dir, "snapshots"))


@pytest.mark.slow
def test_freezeout_really_froze_and_savings_are_printed(fo_output):
    assert "Estimated saving:" in fo_output
    assert "Measured saving:" in fo_output
    assert "FreezeOut froze group(s)" in fo_output
    assert "Training the baseline single model" in fo_output


@pytest.mark.slow
def test_other_options_are_recorded_and_no_baseline_without_flag(tmp_path):
    run_dir = str(tmp_path / "run")
    code = cli.main(
        [
            "train",
            *TINY,
            "--freezeout",
            "--t0",
            "0.34",
            "--freezeout-scaling",
            "linear",
            "--no-scale-lr",
            "--verbose",
            "0",
            "--output-dir",
            run_dir,
        ]
    )
    assert code == 0
    report = _report(run_dir)
    assert "baseline" not in report["test"]
    assert "baseline_train_seconds" not in report
    assert report["config"]["t0"] == 0.34
    assert report["config"]["scale_lr"] is False
    with open(os.path.join(run_dir, "run.json")) as f:
        assert json.load(f)["status"] == "trained"


@pytest.mark.slow
def test_resume_and_other_mode_refused(fo_run, fo_output, capsys):
    run_dir, argv = fo_run
    capsys.readouterr()
    code = cli.main([*argv, "--output-dir", run_dir])
    assert code == 0
    assert "Training already finished" in capsys.readouterr().out
    # A snapshot run on the FreezeOut run's folder, or another t0: refused.
    for other in (
        ["train", *TINY, "--verbose", "0"],
        [*argv, "--t0", "0.5"],
    ):
        assert cli.main([*other, "--output-dir", run_dir]) == 2
        assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--t0", "0"], "t0"),
        (["--t0", "1.5"], "(0, 1]"),
        (["--t0", "-0.2"], "t0"),
        (["--t0", "nan"], "t0"),
        (["--freezeout-scaling", "quartic"], "invalid choice"),
    ],
)
def test_bad_values_exit_2_before_anything_is_written(
    flags, message, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--freezeout", *flags, "--output-dir", str(run_dir)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not run_dir.exists()


def test_ensemble_options_refused_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    for flags in (["--temperature-scaling"], ["--select", "greedy"]):
        code = cli.main(
            ["train", "--freezeout", *flags, "--output-dir", str(run_dir)]
        )
        assert code == 2
        assert "--freezeout trains a single model" in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "method", [m for m in methods.METHODS if m != "snapshot"]
)
def test_another_method_is_refused_before_anything_is_written(
    method, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    argv = ["train", *TINY, "--freezeout", "--method", method]
    assert cli.main([*argv, "--output-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"Received: --method {method}" in err
    assert "Drop --method or --freezeout" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, verb",
    [
        (["evaluate", "RUN"], "evaluate"),
        (["evaluate", "RUN", "--split", "val"], "evaluate"),
        (["export", "RUN", "OUT"], "export"),
        (["distill", "RUN"], "distil"),
    ],
)
def test_ensemble_commands_say_what_a_freezeout_run_is(
    fo_run, fo_output, tmp_path, capsys, command, verb
):
    run_dir, _ = fo_run
    before = sorted(os.listdir(run_dir))
    out = tmp_path / "exported"
    argv = [{"RUN": run_dir, "OUT": str(out)}.get(a, a) for a in command]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"{run_dir} is a FreezeOut run" in err
    assert f"no snapshot ensemble to {verb}" in err
    assert "freezeout.keras" in err and "report.json" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(os.listdir(run_dir)) == before
    assert not out.exists()


@pytest.mark.slow
def test_run_json_records_both_training_times(fo_run, fo_output):
    run_dir, _ = fo_run
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    assert run["baseline_train_seconds"] > 0
    assert run["train_seconds"] > 0
    assert not [n for n in os.listdir(run_dir) if n.startswith(".partial-")]
