"""The evaluate step of `keras-snapshot`: score a run's snapshots.

Scores each snapshot, each ensemble of the last m snapshots and the
baseline, with McNemar tests of the ensemble against the single models, and
chooses ensembles (and temperatures) on the validation split.
"""

import os

import keras
import numpy as np

from keras_snapshot import _fs
from keras_snapshot import load_snapshots
from keras_snapshot import metrics
from keras_snapshot import selection
from keras_snapshot.app import report as report_lib
from keras_snapshot.app import run as run_lib
from keras_snapshot.app.pipeline import data_warning


def evaluate_members(member_probs, y, single_probs=None) -> dict:
    """Scores of each snapshot and of the ensembles of the last m snapshots.

    Args:
        member_probs: `(M, n, k)` predictions of the snapshots, oldest first.
        y: Labels.
        single_probs: Optional predictions of a baseline single model.

    Returns:
        A dict with `snapshots` (one score dict per snapshot), `last_m`
        (the ensemble of the last m snapshots, m = 1..M, as in Figure 3 of
        Huang et al. 2017), `disagreement`, and the keys of
        `compare_singles` for the ensemble of all snapshots (`ensemble`,
        `final_single`, `baseline` when given, `mcnemar`, `num_examples`).
    """
    member_probs = np.asarray(member_probs)
    count = len(member_probs)
    result = {
        "snapshots": [metrics.evaluate_predictions(p, y) for p in member_probs],
        "last_m": [
            dict(
                m=m,
                **metrics.evaluate_predictions(
                    member_probs[-m:].mean(axis=0), y
                ),
            )
            for m in range(1, count + 1)
        ],
        "disagreement": metrics.diversity(member_probs)[
            "disagreement"
        ].tolist(),
    }
    result.update(compare_singles(member_probs, y, baseline_probs=single_probs))
    return result


def compare_singles(
    member_probs, y, weights=None, temperature=None, baseline_probs=None
) -> dict:
    """The ensemble against the single models, on the same test images.

    Args:
        member_probs: `(M, n, k)` predictions of the snapshots, oldest first.
        y: Labels.
        weights: One weight per snapshot (zeros leave members out), as from
            `selection.choose_members`; `None` averages all snapshots.
        temperature: The ensemble's temperature, or `None`.
        baseline_probs: Optional predictions of a baseline single model.

    Returns:
        A dict with the scores (`error`, `nll`, `brier`, `ece`) of
        `ensemble` (the ensemble so weighted and scaled), `final_single`
        (the last snapshot: the model that training without an ensemble
        gives) and `baseline` when given; `mcnemar`, the exact McNemar
        test (`metrics.mcnemar_test`) of the ensemble against each single
        model (`ensemble_vs_final_single`, `ensemble_vs_baseline`: `a_only`
        counts the images only the ensemble gets right); `num_examples`.
    """
    member_probs = np.asarray(member_probs)
    if weights is None:
        weights = np.ones(len(member_probs))
    weights = np.asarray(weights, dtype=np.float64)
    ensemble = np.tensordot(weights / weights.sum(), member_probs, axes=1)
    if temperature is not None:
        ensemble = selection.apply_temperature(ensemble, temperature)
    singles = {"final_single": member_probs[-1]}
    if baseline_probs is not None:
        singles["baseline"] = np.asarray(baseline_probs)
    result = {
        "num_examples": len(ensemble),
        "ensemble": metrics.evaluate_predictions(ensemble, y),
        "mcnemar": {},
    }
    for name, probs in singles.items():
        result[name] = metrics.evaluate_predictions(probs, y)
        result["mcnemar"][f"ensemble_vs_{name}"] = metrics.mcnemar_test(
            ensemble, probs, y
        )
    return result


# The report's name of each `selection.choose_members` method.
CHOICES = {"uniform": "all", "last_m": "last_m", "greedy": "greedy"}


def choose_ensembles(val_probs, y_val, test_probs, y_test) -> dict:
    """Uniform, last-m and greedy-weighted ensembles chosen on validation.

    Members, weights and temperatures are fitted on `val_probs` only, then
    scored on test; a temperature validation cannot identify is 1
    (`temperature_fit` says why).
    """
    result = {}
    for name, method in CHOICES.items():
        weights = selection.choose_members(val_probs, y_val, method)
        val = np.tensordot(weights, val_probs, axes=1)
        test = np.tensordot(weights, test_probs, axes=1)
        fit = selection.calibrate_temperature(val, y_val)
        result[name] = {
            "weights": np.round(weights, 6).tolist(),
            "validation": metrics.evaluate_predictions(val, y_val),
            "test": metrics.evaluate_predictions(test, y_test),
            # Temperature scaling fitted on validation (Guo et al. 2017).
            "temperature": round(float(fit.temperature), 4),
            "temperature_fit": {
                "status": fit.status,
                "fitted": round(fit.fitted, 4),
                "message": fit.message,
            },
            "test_temperature_scaled": metrics.evaluate_predictions(
                selection.apply_temperature(test, fit.temperature), y_test
            ),
        }
    result["last_m"]["m"] = int(np.count_nonzero(result["last_m"]["weights"]))
    return result


_PREDICT_BATCH = 256


def _splits(data, splits):
    """The names of `splits` to evaluate: an empty validation split is not."""
    return [s for s in splits if not (s == "val" and data.count("val") == 0)]


def predict_split(models: list, data, split: str) -> np.ndarray:
    """`(M, n, k)` probabilities of `models` on `split`, batch by batch.

    The images are streamed; a linear (logits) output gets a softmax.
    """
    run_lib.check_split(data, split)
    inputs = data.inputs(split, _PREDICT_BATCH)
    return selection.predict_members(models, inputs, from_logits=None)


def predict_models(run_dir: str, data, files: dict, splits=("val", "test")):
    """Predictions of the run's single models on each of `splits`.

    Args:
        run_dir: The run directory.
        data: The run's `Dataset`.
        files: `{name: file name in run_dir}` of `.keras` models; the
            files that do not exist are left out.
        splits: Names of the splits; an empty validation split is left out.

    Returns:
        `{split: {name: (n, k) predictions}}`.
    """
    models = {}
    for name, file in files.items():
        path = os.path.join(run_dir, file)
        if os.path.isfile(path):
            models[name] = keras.saving.load_model(path, compile=False)
    probs = {}
    for split in _splits(data, splits):
        probs[split] = {
            name: predict_split([model], data, split)[0]
            for name, model in models.items()
        }
    return probs


def evaluate_run(run_dir: str, data, splits=("val", "test")):
    """Scores and member predictions of a run on each of `splits`.

    Returns:
        `(scores, probs)`: `scores[split]` from `evaluate_members` and
        `probs[split]` the `(M, n, k)` snapshot predictions; when the run
        has a baseline, `probs["baseline"][split]` its `(n, k)`
        predictions. An empty validation split is left out.

    Raises:
        UsageError: when the run's snapshot folder is missing or unusable.
    """
    with run_lib.as_usage_error():
        members = load_snapshots(os.path.join(run_dir, run_lib.SNAPSHOT_DIR))
    singles = predict_models(
        run_dir, data, {"baseline": run_lib.BASELINE_FILE}, splits
    )
    scores, probs = {}, {}
    for name in _splits(data, splits):
        probs[name] = predict_split(members, data, name)
        single = singles[name].get("baseline")
        if single is not None:
            probs.setdefault("baseline", {})[name] = single
        scores[name] = evaluate_members(probs[name], data.labels(name), single)
    return scores, probs


def evaluate_command(args) -> int:
    """`keras-snapshot evaluate RUN_DIR`: score the run on one split."""
    run = run_lib.read_run(args.run_dir)
    run_lib.check_has_ensemble(run, args.run_dir, "evaluate")
    run_lib.check_finished(run, args.run_dir, "evaluate", args.allow_unfinished)
    data = run_lib.load_data(run["config"], args.data_dir)
    warning = data_warning(run, data)
    if warning:
        print(warning)
    scores, _ = evaluate_run(args.run_dir, data, splits=(args.split,))
    result = scores[args.split]
    if warning:
        result["warnings"] = [warning]
    path = os.path.join(args.run_dir, f"evaluation_{args.split}.json")
    _fs.write_json(path, result)
    print(
        report_lib.summary_table({"test": result}).replace(
            "test error", f"{args.split} error"
        )
    )
    print(f"\nWritten: {path}")
    return 0
