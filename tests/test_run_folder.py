"""The run folder of `keras-snapshot train`, end to end (issue 31).

What `--overwrite` deletes, a symbolic link as `--output-dir`, what
`export` writes over, and a report that keeps the distilled student when
the run is run again. Real training on the bundled digits, two epochs.
"""

import json
import os

import pytest

from keras_snapshot.app import cli

SMALL = ["--dataset", "digits", "--model", "small_cnn", "--lr", "0.2"]
SMALL += ["--batch-size", "32", "--weight-decay", "0", "--epochs", "2"]
SMALL += ["--snapshots", "2", "--verbose", "0"]
RUN_FILES = {"run.json", "snapshots", "report.md", "ensemble.keras"}


@pytest.fixture(scope="module")
def linked_run(tmp_path_factory):
    """A run trained through `--output-dir link`, `link` -> `real/`."""
    root = tmp_path_factory.mktemp("linked")
    (root / "real").mkdir()
    link = root / "link"
    link.symlink_to(root / "real", target_is_directory=True)
    assert cli.main(["train", *SMALL, "--output-dir", str(link)]) == 0
    return link


@pytest.mark.slow
def test_overwrite_keeps_the_users_files_and_trains(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "snapshots").mkdir(parents=True)
    old = {"config": {"method": "snapshot"}, "status": "trained"}
    (run_dir / "run.json").write_text(json.dumps(old))
    (run_dir / "report.md").write_text("old report")
    (run_dir / "evaluation_test.json").write_text("{}")
    (run_dir / "notes.txt").write_text("mine")
    argv = ["train", *SMALL, "--output-dir", str(run_dir), "--overwrite"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert not (run_dir / "evaluation_test.json").exists()
    assert RUN_FILES <= set(os.listdir(run_dir))
    with open(run_dir / "run.json") as f:
        assert json.load(f)["status"] == "trained"


@pytest.mark.slow
def test_symlinked_output_dir_is_the_run_folder(linked_run, tmp_path, capsys):
    link = linked_run
    real = link.parent / "real"
    assert link.is_symlink()
    assert RUN_FILES | {"saved_model", "report.json"} <= set(os.listdir(real))
    assert sorted(os.listdir(link.parent)) == ["link", "real"]
    assert cli.main(["evaluate", str(link)]) == 0
    assert (real / "evaluation_test.json").is_file()
    # An export into a link to an empty folder fills that folder.
    (tmp_path / "out_real").mkdir()
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "out_real", target_is_directory=True)
    assert cli.main(["export", str(link), str(out)]) == 0
    assert out.is_symlink()
    exported = set(os.listdir(tmp_path / "out_real"))
    assert {"ensemble.keras", "saved_model"} <= exported
    assert not [name for name in exported if name.startswith(".")]
    assert sorted(os.listdir(tmp_path)) == ["out", "out_real"]
    capsys.readouterr()
    assert cli.main(["train", *SMALL, "--output-dir", str(link)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert link.is_symlink()
    assert sorted(os.listdir(link.parent)) == ["link", "real"]
    assert RUN_FILES | {"saved_model"} <= set(os.listdir(real))


@pytest.mark.slow
def test_export_refuses_a_dangling_link_or_a_file_entry(
    linked_run, tmp_path, capsys
):
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere", target_is_directory=True)
    assert cli.main(["export", str(linked_run), str(dangling)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(dangling) in err, err
    assert "symbolic link" in err and "--overwrite" in err, err
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()
    # With --overwrite, the link (to nothing) is replaced, and said so.
    argv = ["export", str(linked_run), str(dangling), "--overwrite"]
    assert cli.main(argv) == 0
    assert "symbolic link" in capsys.readouterr().out
    assert not dangling.is_symlink()
    assert {"ensemble.keras", "saved_model"} <= set(os.listdir(dangling))

    # A file where the SavedModel folder goes is not ours: refused, even
    # with --overwrite, and kept.
    out = tmp_path / "out"
    out.mkdir()
    (out / "saved_model").write_text("keep me")
    for extra in ([], ["--overwrite"], ["--overwrite", "--serving-version"]):
        if extra[-1:] == ["--serving-version"]:
            extra = [*extra, "2"]
        assert cli.main(["export", str(linked_run), str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert str(out / "saved_model") in err and "is a file" in err, err
        assert (out / "saved_model").read_text() == "keep me"
        assert sorted(os.listdir(out)) == ["saved_model"]


@pytest.mark.slow
def test_rerun_keeps_the_distilled_student_in_the_report(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert cli.main(["train", *SMALL, "--output-dir", run_dir]) == 0
    assert cli.main(["distill", run_dir, "--epochs", "1"]) == 0
    with open(os.path.join(run_dir, "report.json")) as f:
        student = json.load(f)["test"]["student"]
    assert cli.main(["train", *SMALL, "--output-dir", run_dir]) == 0
    with open(os.path.join(run_dir, "report.json")) as f:
        report = json.load(f)
    assert report["test"]["student"] == student
    assert report["student"]["file"] == "student.keras"
    with open(os.path.join(run_dir, "report.md")) as f:
        assert "Distilled student" in f.read()
    # Without student.keras, its recorded scores are no longer reported.
    os.remove(os.path.join(run_dir, "student.keras"))
    assert cli.main(["train", *SMALL, "--output-dir", run_dir]) == 0
    with open(os.path.join(run_dir, "report.json")) as f:
        assert "student" not in json.load(f)["test"]
