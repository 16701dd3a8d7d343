"""The report: McNemar tests, the verdict, the plots and the main job example.

Most tests build reports from synthetic predictions with the functions that
`keras-snapshot train` uses; one tiny CLI run checks the keys of a real
report.json against the exported files.
"""

import contextlib
import importlib.util
import io
import json
import math
import os

import keras
import numpy as np
import pytest
from scipy import stats

import keras_snapshot
from keras_snapshot import metrics
from keras_snapshot import selection
from keras_snapshot.app import cli
from keras_snapshot.app import evaluate
from keras_snapshot.app import pipeline
from keras_snapshot.app import report as report_lib
from keras_snapshot.app.datasets import load_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_JOB = os.path.join(ROOT, "docs", "main_job")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = (
    "learning_rate.png",
    "error_vs_snapshots.png",
    "reliability.png",
    "disagreement.png",
)


def _predictions(labels, accuracy, seed, num_classes=10, confidence=4.0):
    """Probabilities right on about `accuracy` of the examples."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    predicted = np.where(
        rng.random(n) < accuracy,
        labels,
        (labels + rng.integers(1, num_classes, size=n)) % num_classes,
    )
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), predicted] += confidence
    return keras_snapshot.selection.apply_temperature(logits, 1.0, True)


def _labels(n=500, num_classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, num_classes, size=n)


# metrics.mcnemar_test and the error interval ----------------------------


def _ref_mcnemar(probs_a, probs_b, labels):
    """Loop counts and the exact two-sided binomial p-value, by hand."""
    a_only = b_only = 0
    for pa, pb, label in zip(probs_a, probs_b, labels, strict=True):
        right_a, right_b = np.argmax(pa) == label, np.argmax(pb) == label
        a_only += int(right_a and not right_b)
        b_only += int(right_b and not right_a)
    n = a_only + b_only
    if n == 0:
        return a_only, b_only, 1.0
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))
    return a_only, b_only, min(1.0, 2 * tail / 2**n)


@pytest.mark.parametrize(
    "accuracy_a, accuracy_b, seed",
    [(0.9, 0.9, 0), (0.95, 0.8, 1), (0.7, 0.75, 2), (0.99, 0.5, 3)],
)
def test_mcnemar_test_matches_the_binomial_reference(
    accuracy_a, accuracy_b, seed
):
    labels = _labels(seed=seed)
    a = _predictions(labels, accuracy_a, seed + 10)
    b = _predictions(labels, accuracy_b, seed + 20)
    result = metrics.mcnemar_test(a, b, labels)
    a_only, b_only, p_value = _ref_mcnemar(a, b, labels)
    assert (result["a_only"], result["b_only"]) == (a_only, b_only)
    assert result["p_value"] == pytest.approx(p_value, rel=1e-9)
    swapped = metrics.mcnemar_test(b, a, labels)
    assert (swapped["a_only"], swapped["b_only"]) == (b_only, a_only)
    assert swapped["p_value"] == pytest.approx(result["p_value"])
    json.dumps(result)  # plain Python numbers, for report.json


def test_mcnemar_test_on_a_clear_difference_and_on_a_tie():
    labels = _labels(n=1000)
    good = _predictions(labels, 0.95, 1)
    bad = _predictions(labels, 0.80, 2)
    assert metrics.mcnemar_test(good, bad, labels)["p_value"] < 1e-6
    # Identical predictions: no discordant pair, p = 1.
    same = metrics.mcnemar_test(good, good, labels)
    assert same == {"a_only": 0, "b_only": 0, "p_value": 1.0}
    # One-hot labels work as in the other metrics.
    one_hot = np.eye(10)[labels]
    assert metrics.mcnemar_test(good, bad, one_hot) == metrics.mcnemar_test(
        good, bad, labels
    )


def test_mcnemar_test_rejects_unpaired_predictions():
    labels = _labels(n=20)
    a = _predictions(labels, 0.9, 0)
    with pytest.raises(ValueError, match=r"Received: probs_a.shape=\(20, 10\)"):
        metrics.mcnemar_test(a, a[:10], labels)


@pytest.mark.parametrize(
    "k, n", [(0, 10), (3, 539), (5, 1000), (500, 1000), (10, 10)]
)
def test_error_interval_is_clopper_pearson(k, n):
    low, high = metrics.error_interval(k, n)
    # Clopper-Pearson from beta quantiles, the textbook formula.
    ref_low = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
    ref_high = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
    assert low == pytest.approx(ref_low, abs=1e-9)
    assert high == pytest.approx(ref_high, abs=1e-9)
    assert low <= k / n <= high


@pytest.mark.parametrize(
    "args, match",
    [
        ((11, 10), "num_errors"),
        ((-1, 10), "num_errors"),
        ((1.5, 10), "num_errors"),
        ((1, 0), "num_examples"),
        ((1, 10, 1.0), "confidence"),
    ],
)
def test_error_interval_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        metrics.error_interval(*args)


# evaluate: the exported ensemble against the single models -----------------


def _members(labels, accuracies=(0.8, 0.85, 0.86, 0.87)):
    return np.stack(
        [_predictions(labels, a, 100 + i) for i, a in enumerate(accuracies)]
    )


def test_compare_singles_scores_the_weighted_scaled_ensemble():
    labels = _labels()
    members = _members(labels)
    baseline = _predictions(labels, 0.84, 7)
    weights = [0.0, 0.5, 0.25, 0.25]
    result = evaluate.compare_singles(
        members, labels, weights, temperature=0.7, baseline_probs=baseline
    )
    ensemble = selection.apply_temperature(
        0.5 * members[1] + 0.25 * members[2] + 0.25 * members[3], 0.7
    )
    assert result["ensemble"] == pytest.approx(
        metrics.evaluate_predictions(ensemble, labels)
    )
    assert result["final_single"] == metrics.evaluate_predictions(
        members[-1], labels
    )
    assert result["baseline"] == metrics.evaluate_predictions(baseline, labels)
    assert result["mcnemar"] == {
        "ensemble_vs_final_single": metrics.mcnemar_test(
            ensemble, members[-1], labels
        ),
        "ensemble_vs_baseline": metrics.mcnemar_test(
            ensemble, baseline, labels
        ),
    }
    assert result["num_examples"] == len(labels)


def test_evaluate_members_compares_the_ensemble_of_all_snapshots():
    labels = _labels()
    members = _members(labels)
    scores = evaluate.evaluate_members(members, labels)
    all_m = dict(scores["last_m"][-1])
    assert all_m.pop("m") == 4
    assert scores["ensemble"] == pytest.approx(all_m)
    assert scores["final_single"] == scores["snapshots"][-1]
    assert "baseline" not in scores
    assert set(scores["mcnemar"]) == {"ensemble_vs_final_single"}


def test_choose_ensembles_keeps_t_1_on_a_perfect_validation_split():
    labels = _labels(n=200)
    val = np.stack([_predictions(labels, 1.0, s, confidence=6) for s in (1, 2)])
    test_labels = _labels(n=300, seed=5)
    test = _members(test_labels, (0.9, 0.92))
    choices = evaluate.choose_ensembles(val, labels, test, test_labels)
    for choice in choices.values():
        assert choice["temperature"] == 1.0
        assert choice["temperature_fit"]["status"] == "no_errors"
        assert choice["temperature_fit"]["fitted"] < 1.0
        assert choice["test_temperature_scaled"] == pytest.approx(
            choice["test"]
        )


# The verdict and the Markdown report -------------------------------------


def _report(members, labels, baseline=None, choices=None, **exported):
    test = evaluate.evaluate_members(members, labels, baseline)
    return {
        "config": {
            "dataset": "synthetic",
            "model": "none",
            "epochs": 4,
            "num_snapshots": len(members),
            "learning_rate": 0.1,
            "batch_size": 32,
            "seed": 0,
        },
        "steps": 100,
        "train_seconds": 12.5,
        "test": test,
        "choices": choices,
        "exported": {
            "choice": "all",
            "members": len(members),
            "temperature": None,
            **exported,
        },
    }


def test_verdict_calls_a_tie_a_tie():
    labels = _labels()
    single = _predictions(labels, 0.9, 0)
    # Every snapshot predicts the same classes: the ensemble ties with them.
    members = np.stack([single, 0.5 * single + 0.5 / 10, single])
    words = report_lib.verdict(_report(members, labels))
    assert "not distinguishable (p = 1;" in words
    assert "a tie" in words
    assert "better" not in words and "worse" not in words


def test_verdict_says_when_the_gain_is_distinguishable():
    labels = _labels(n=2000)
    members = _members(labels, (0.75, 0.76, 0.77, 0.78))
    baseline = _predictions(labels, 0.999, 9)
    report = _report(members, labels, baseline)
    test = report["test"]
    words = report_lib.verdict(report)
    gain = test["mcnemar"]["ensemble_vs_final_single"]
    assert gain["p_value"] < report_lib.ALPHA  # four diverse members
    ensemble, final = test["ensemble"], test["final_single"]
    assert (
        f"{100 * ensemble['error']:.2f}% vs {100 * final['error']:.2f}% "
        "test error, distinguishable (p = "
    ) in words
    assert "the ensemble is better" in words
    # Against a much better baseline: distinguishable, and worse.
    assert "the ensemble is worse" in words
    # NLL as well as error, for each comparison.
    assert words.count("NLL is") == 2
    assert f"{final['nll']:.4f}" in words
    assert f"{test['baseline']['nll']:.4f}" in words


def test_verdict_labels_which_split_chose_m():
    labels = _labels()
    members = _members(labels)
    val_labels = _labels(seed=3)
    choices = evaluate.choose_ensembles(
        _members(val_labels), val_labels, members, labels
    )
    report = _report(members, labels, choices=choices)
    words = report_lib.verdict(report)
    chosen = choices["last_m"]["m"]
    assert f"chosen on the validation split (m={chosen})" in words
    best = min(report["test"]["last_m"], key=lambda e: e["error"])["m"]
    assert f"on the test split, m={best} gives" in words
    assert "chosen on test: optimistic, not a fair choice" in words
    assert "best last-m" not in words  # the old, unlabelled wording
    table = report_lib.summary_table(report)
    assert f"chosen on val: last_m (m={chosen})" in table
    assert "chosen on val: greedy" in table
    markdown = report_lib.markdown_report(report)
    assert f"| last_m (m={chosen}) |" in markdown
    assert "| choice (on val) |" in markdown


def test_reports_without_the_new_keys_still_render():
    # A report dict as other commands (or older runs) write it: no
    # exported-ensemble scores, McNemar tests or choices.
    labels = _labels()
    members = _members(labels)
    report = _report(members, labels)
    for key in ("ensemble", "final_single", "mcnemar", "num_examples"):
        del report["test"][key]
    del report["train_seconds"]
    words = report_lib.verdict(report)
    assert "no paired test recorded" in words
    assert report_lib.markdown_report(report)
    assert report_lib.summary_table(report)


def test_markdown_embeds_the_four_plots_and_what_is_present():
    labels = _labels()
    members = _members(labels)
    report = _report(
        members,
        labels,
        baseline=_predictions(labels, 0.85, 3),
        temperature=1.0,
        temperature_fit={"status": "no_errors", "message": "kept T = 1."},
    )
    report["baseline_train_seconds"] = 7.25
    markdown = report_lib.markdown_report(report)
    for name in PLOTS:
        assert f"({name})" in markdown
    assert "(the baseline 7.2 s)" in markdown
    assert "Baseline single model" in markdown
    assert "| final single |" in markdown and "| baseline |" in markdown
    assert "Temperature scaling: kept T = 1." in markdown
    assert f"{len(labels)} test images: one image is 0.200%" in markdown
    table = report_lib.summary_table(report)
    assert "exported ensemble" in table and "baseline single" in table


# Plots --------------------------------------------------------------------


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


def test_error_band_is_the_exact_interval_in_percent():
    low, high = report_lib.error_band([0.0, 0.01, 0.2], 500)
    for i, errors in enumerate((0, 5, 100)):
        ref = metrics.error_interval(errors, 500)
        assert (low[i], high[i]) == pytest.approx((100 * ref[0], 100 * ref[1]))


@pytest.mark.slow
def test_error_vs_snapshots_plot(tmp_path):
    labels = _labels()
    members = _members(labels)
    report = _report(members, labels, baseline=_predictions(labels, 0.85, 3))
    path = str(tmp_path / "error.png")
    report_lib.plot_error_vs_snapshots(report["test"], path, chosen_m=2)
    assert _is_png(path)
    # Without num_examples (older reports) there is no band, and no error.
    del report["test"]["num_examples"]
    report_lib.plot_error_vs_snapshots(report["test"], path)
    assert _is_png(path)


def test_reliability_leaves_out_near_empty_bins(tmp_path):
    labels = _labels(n=1000)
    probs = _predictions(labels, 0.99, 0, confidence=8.0)
    # Three images with confidence near 0.45 share one bin.
    probs[:3] = 0.0
    probs[:3, 0], probs[:3, 1] = 0.45, 0.55
    confidence, accuracy, count, keep = report_lib.reliability_points(
        probs, labels
    )
    assert report_lib.min_bin_images(1000) == 10
    assert report_lib.min_bin_images(100) == 5
    bin_of_three = int(0.55 * 15)
    assert count[bin_of_three] == 3 and not keep[bin_of_three]
    np.testing.assert_array_equal(keep, count >= 10)
    assert keep.any()
    path = str(tmp_path / "reliability.png")
    report_lib.plot_reliability(probs, probs, labels, path)
    assert _is_png(path)


# The committed example of the main job ------------------------------------


def _main_job_script():
    path = os.path.join(ROOT, "benchmarks", "main_job_report.py")
    spec = importlib.util.spec_from_file_location("main_job_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_main_job_report_is_what_report_py_writes():
    with open(os.path.join(MAIN_JOB, "report.json")) as f:
        report = json.load(f)
    with open(os.path.join(MAIN_JOB, "report.md")) as f:
        committed = f.read()
    assert committed == _main_job_script().render(report), (
        "docs/main_job/report.md is stale: run "
        "`python benchmarks/main_job_report.py --render-only`."
    )
    for name in PLOTS:
        assert f"({name})" in committed
        assert _is_png(os.path.join(MAIN_JOB, name))


def test_committed_main_job_ran_with_the_cli_defaults():
    with open(os.path.join(MAIN_JOB, "report.json")) as f:
        config = json.load(f)["config"]
    defaults = pipeline.run_config(cli.build_parser().parse_args(["train"]))
    stale = {
        key: (value, defaults[key])
        for key, value in config.items()
        if key in defaults
        and key not in ("output_dir", "baseline")
        and value != defaults[key]
    }
    assert not stale, (
        f"docs/main_job/ was made with other settings than today's "
        f"defaults (made with, default): {stale}; run "
        "`python benchmarks/main_job_report.py`."
    )
    assert config["baseline"] is True
    argv = _main_job_script().train_argv()
    assert argv[0] == "train" and "--dataset" not in argv


# One tiny CLI run: the report.json keys scripts read --------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("report") / "run")
    argv = [
        "train",
        "--dataset",
        "digits",
        "--epochs",
        "2",
        "--snapshots",
        "2",
        "--verbose",
        "0",
        "--baseline",
        "--temperature-scaling",
        "--output-dir",
        run_dir,
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    with open(os.path.join(run_dir, "report.json")) as f:
        report = json.load(f)
    return run_dir, report, out.getvalue()


@pytest.mark.slow
def test_report_json_keys_hold_the_exported_and_single_models(tiny_run):
    run_dir, report, _ = tiny_run
    test = report["test"]
    data = load_dataset("digits", validation_fraction=0.1, seed=0)
    ensemble = keras.saving.load_model(os.path.join(run_dir, "ensemble.keras"))
    snapshots = keras_snapshot.load_snapshots(
        os.path.join(run_dir, "snapshots")
    )
    baseline = keras.saving.load_model(
        os.path.join(run_dir, "baseline.keras"), compile=False
    )
    probs = {
        "ensemble": ensemble.predict(data.x_test, verbose=0),
        "final_single": snapshots[-1].predict(data.x_test, verbose=0),
        "baseline": baseline.predict(data.x_test, verbose=0),
    }
    for key, p in probs.items():
        assert test[key]["error"] == pytest.approx(
            metrics.evaluate_predictions(p, data.y_test)["error"], abs=1e-9
        )
        assert test[key]["nll"] == pytest.approx(
            metrics.evaluate_predictions(p, data.y_test)["nll"], rel=1e-3
        )
    for key in ("final_single", "baseline"):
        recomputed = metrics.mcnemar_test(
            probs["ensemble"], probs[key], data.y_test
        )
        assert (
            test["mcnemar"][f"ensemble_vs_{key}"]["a_only"]
            == (recomputed["a_only"])
        )
        assert (
            test["mcnemar"][f"ensemble_vs_{key}"]["b_only"]
            == (recomputed["b_only"])
        )
    # Keys other scripts and tests read are kept.
    assert len(test["snapshots"]) == len(test["last_m"]) == 2
    assert test["num_examples"] == len(data.y_test)


@pytest.mark.slow
def test_cli_says_what_temperature_scaling_did(tiny_run):
    run_dir, report, output = tiny_run
    fit = report["exported"]["temperature_fit"]
    assert fit["status"] in ("fitted", "no_errors", "at_bound", "flat")
    assert f"Temperature scaling: {fit['message']}" in output
    assert 0.05 <= fit["fitted"] <= 20
    expected = fit["fitted"] if fit["status"] == "fitted" else 1.0
    assert report["exported"]["temperature"] == pytest.approx(
        expected, abs=1e-4
    )
    assert "distinguishable (p = " in output
    with open(os.path.join(run_dir, "report.md")) as f:
        markdown = f.read()
    assert f"Temperature scaling: {fit['message']}" in markdown
    for name in PLOTS:
        assert f"({name})" in markdown
        assert _is_png(os.path.join(run_dir, name))
