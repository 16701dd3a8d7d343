"""The report step of `keras-snapshot`: tables, Markdown, JSON and plots.

`report.json`, `report.md` and four PNG plots, drawn with matplotlib's
object-oriented API (no backend, no global state).
"""

import json
import os

import keras
import numpy as np
from matplotlib.figure import Figure

from keras_snapshot import _fs
from keras_snapshot import metrics
from keras_snapshot.app import run as run_lib

# Significance level of the verdict's exact McNemar tests.
ALPHA = 0.05
# Reliability bins with fewer images than this (or than 1% of the test
# set) are left out of the reliability diagram.
MIN_BIN_IMAGES = 5
MIN_BIN_FRACTION = 0.01

# The single models the ensemble is compared with: report key, words.
SINGLES = (
    ("final_single", "the final single model (the last snapshot)"),
    ("baseline", "the baseline single model (one cosine decay, same budget)"),
)


def _percent(value) -> str:
    return f"{100 * value:.2f}"


def _ensemble(test: dict) -> dict:
    """The exported ensemble's scores; older reports: all snapshots."""
    return test.get("ensemble") or test["last_m"][-1]


def _final_single(test: dict) -> dict:
    return test.get("final_single") or test["snapshots"][-1]


def _exported_words(report: dict) -> str:
    exported = report.get("exported") or {}
    members = exported.get("members", len(report["test"]["snapshots"]))
    choice = exported.get("choice", "all")
    words = {
        "all": f"all {members} snapshots",
        "last_m": f"the last {members} snapshots, m chosen on validation",
        "greedy": f"{members} snapshots weighted greedily on validation",
    }.get(choice, f"{members} snapshots, {choice}")
    if exported.get("temperature") is not None:
        words += f", temperature {exported['temperature']:.3g} from validation"
    return words


def _val_chosen_m(report: dict):
    """The last-m choice made on validation, or None."""
    return ((report.get("choices") or {}).get("last_m") or {}).get("m")


def compare_sentence(name: str, ensemble: dict, single: dict, test) -> str:
    """The ensemble against one single model: error, McNemar test and NLL.

    Args:
        name: Words for the single model.
        ensemble: The ensemble's test scores (`error`, `nll`).
        single: The single model's test scores.
        test: `metrics.mcnemar_test` of the ensemble (A) against the single
            model (B), or None when the paired predictions were not kept.
    """
    e, s = ensemble["error"], single["error"]
    words = f"Against {name}: {_percent(e)}% vs {_percent(s)}% test error"
    if test is None:
        words += " (no paired test recorded)"
    else:
        p = test["p_value"]
        words += (
            f", {'' if p < ALPHA else 'not '}distinguishable (p = {p:.2g}; "
            f"exact McNemar test: {test['a_only']} test images only the "
            f"ensemble gets right, {test['b_only']} only the single model)"
        )
        if p >= ALPHA:
            words += ", a tie"
        else:
            words += f": the ensemble is {'better' if e < s else 'worse'}"
    if ensemble["nll"] == single["nll"]:
        nll = "the same"
    else:
        nll = "lower" if ensemble["nll"] < single["nll"] else "higher"
    return (
        f"{words}. The ensemble's NLL is {nll} ({ensemble['nll']:.4f} vs "
        f"{single['nll']:.4f})."
    )


def verdict(report: dict) -> str:
    """How the exported ensemble compares with the single models.

    Against the final single model and the baseline: whether the error
    differs beyond chance (McNemar at `ALPHA`) and how the NLL compares.
    """
    test = report["test"]
    ensemble = _ensemble(test)
    tests = test.get("mcnemar") or {}
    sentences = [
        f"The exported ensemble ({_exported_words(report)}) has "
        f"{_percent(ensemble['error'])}% test error and NLL "
        f"{ensemble['nll']:.4f}."
    ]
    for key, name in SINGLES:
        single = _final_single(test) if key == "final_single" else test.get(key)
        if single is not None:
            sentences.append(
                compare_sentence(
                    name, ensemble, single, tests.get(f"ensemble_vs_{key}")
                )
            )
    chosen = _val_chosen_m(report)
    if chosen is not None:
        error = test["last_m"][chosen - 1]["error"]
        sentences.append(
            f"The last-m ensemble chosen on the validation split (m={chosen}) "
            f"has {_percent(error)}% test error."
        )
    best = min(test["last_m"], key=lambda e: e["error"])
    sentences.append(
        f"With hindsight on the test split, m={best['m']} gives "
        f"{_percent(best['error'])}% (chosen on test: optimistic, not a "
        "fair choice)."
    )
    return " ".join(sentences)


def markdown_report(report: dict) -> str:
    """A readable Markdown version of `report.json`.

    Renders what the report holds: the baseline, the choices made on the
    validation split and the McNemar tests appear when present.
    """
    config = report["config"]
    test = report["test"]
    timing = ""
    if "train_seconds" in report:
        timing = f" Training took {report['train_seconds']:.1f} s"
        if "baseline_train_seconds" in report:
            timing += (
                f" (the baseline {report['baseline_train_seconds']:.1f} s)"
            )
        timing += "."
    lines = [
        "# Snapshot ensemble report",
        "",
        f"Method: `{report.get('method', 'snapshot')}`.",
        "",
        f"Data `{run_lib.data_source(config)}`, model `{config['model']}`, "
        f"{config['epochs']} epochs, {config['num_snapshots']} snapshots, "
        f"initial rate {config['learning_rate']}, batch "
        f"{config['batch_size']}, seed {config['seed']}, "
        f"{report.get('steps', '?')} steps.{timing}",
    ]
    if "pixel_max" in config:  # Older runs did not record it.
        lines += ["", f"Inputs: {input_words(config)}."]
    if report.get("classes"):
        # Quoted, so that a comma or newline in a name stays unambiguous.
        names = ", ".join(
            f"{i}: {json.dumps(n, ensure_ascii=False)}"
            for i, n in enumerate(report["classes"])
        )
        lines += ["", f"Classes (label: name): {names}."]
    for warning in report.get("warnings") or []:
        lines += ["", f"**{warning}**"]
    if "num_examples" in test:
        lines += [
            "",
            f"{test['num_examples']} test images: one image is "
            f"{100 / test['num_examples']:.3f}% of test error.",
        ]
    lines += [
        "",
        "## Verdict",
        "",
        verdict(report),
        "",
        "## Each snapshot alone, and the ensemble of the last m",
        "",
        "All on the test split; nothing here is chosen. Snapshot i is the "
        "model at the end of cycle i.",
        "",
        "| snapshot i | error % | NLL | ECE % |",
        "|---|---|---|---|",
    ]
    for i, snapshot in enumerate(test["snapshots"], start=1):
        lines.append(
            f"| {i} | {_percent(snapshot['error'])} | "
            f"{snapshot['nll']:.4f} | {_percent(snapshot['ece'])} |"
        )
    lines += [
        "",
        "As in Figure 3 of Huang et al. 2017: m = 1 is the last snapshot "
        "alone, m = M all snapshots.",
        "",
        "| m (most recent snapshots averaged) | ensemble of last m: "
        "error % | NLL | ECE % |",
        "|---|---|---|---|",
    ]
    for ens in test["last_m"]:
        lines.append(
            f"| {ens['m']} | {_percent(ens['error'])} | {ens['nll']:.4f} | "
            f"{_percent(ens['ece'])} |"
        )
    lines.append("")
    if "baseline" in test:
        lines += [
            f"Baseline single model (one cosine decay, same budget): "
            f"{_percent(test['baseline']['error'])}% test error, NLL "
            f"{test['baseline']['nll']:.4f}.",
            "",
        ]
    for key, label in (
        ("swa", "Running SWA (one model, BatchNorm recalibrated)"),
        ("student", "Distilled student (one model)"),
    ):
        if key in test:
            lines += [
                f"{label}: {_percent(test[key]['error'])}% test error, "
                f"NLL {test[key]['nll']:.4f}.",
                "",
            ]
    lines += _mcnemar_table(test)
    lines += _choices_table(report)
    exported = report["exported"]
    lines += [
        f"Exported ensemble: `{exported['choice']}` "
        f"({_exported_words(report)}) in `ensemble.keras` and "
        "`saved_model/`.",
        "",
    ]
    fit = exported.get("temperature_fit")
    if fit:
        lines += [f"Temperature scaling: {fit['message']}", ""]
    lines += [
        "![learning rate](learning_rate.png)",
        "",
        "![error vs m](error_vs_snapshots.png)",
        "",
        "![reliability](reliability.png)",
        "",
        "![disagreement](disagreement.png)",
        "",
    ]
    return "\n".join(lines)


def _mcnemar_table(test: dict) -> list:
    tests = test.get("mcnemar") or {}
    if not tests:
        return []
    lines = [
        "## Is the difference distinguishable? (exact McNemar test)",
        "",
        "Paired on the same test images; `scipy.stats.binomtest` on the "
        f"images exactly one model gets right. Distinguishable: p < {ALPHA}.",
        "",
        "| exported ensemble vs | error % (ensemble / single) | "
        "NLL (ensemble / single) | only ensemble right | only single right "
        "| p | distinguishable |",
        "|---|---|---|---|---|---|---|",
    ]
    ensemble = _ensemble(test)
    for key, _ in SINGLES:
        result = tests.get(f"ensemble_vs_{key}")
        if result is None or key not in test:
            continue
        single = test[key]
        lines.append(
            f"| {key.replace('_', ' ')} | {_percent(ensemble['error'])} / "
            f"{_percent(single['error'])} | {ensemble['nll']:.4f} / "
            f"{single['nll']:.4f} | {result['a_only']} | {result['b_only']} "
            f"| {result['p_value']:.2g} | "
            f"{'yes' if result['p_value'] < ALPHA else 'no'} |"
        )
    return lines + [""]


def _choice_name(name: str, choice: dict) -> str:
    if "m" in choice:
        return f"{name} (m={choice['m']})"
    return name


def _choices_table(report: dict) -> list:
    choices = report.get("choices")
    if not choices:
        return []
    lines = [
        "## Ensembles chosen on the validation split",
        "",
        "Members, weights and temperatures fitted on the validation split, "
        'scored on test. The columns "with T" are what temperature '
        "scaling would give; `keras-snapshot train --temperature-scaling` "
        "exports the ensemble with its temperature (the exported one is "
        "the uniform average unless `--select` chose another).",
        "",
        "| choice (on val) | test error % | NLL | ECE % | temperature T "
        "(on val) | NLL with T | ECE % with T | weights |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name, choice in choices.items():
        weights = ", ".join(f"{w:.2f}" for w in choice["weights"])
        test, scaled = choice["test"], choice["test_temperature_scaled"]
        temperature = f"{choice['temperature']:.3g}"
        fit = choice.get("temperature_fit")
        if fit and fit["status"] != "fitted":
            temperature += f" ({fit['status'].replace('_', ' ')})"
            notes.append(f"- {name}: {fit['message']}")
        lines.append(
            f"| {_choice_name(name, choice)} | {_percent(test['error'])} | "
            f"{test['nll']:.4f} | {_percent(test['ece'])} | {temperature} | "
            f"{scaled['nll']:.4f} | {_percent(scaled['ece'])} | {weights} |"
        )
    lines.append("")
    if notes:
        lines += ["Temperatures kept at 1:", "", *notes, ""]
    return lines


def summary_table(report: dict) -> str:
    """The plain-text table printed at the end of `keras-snapshot train`."""
    test = report["test"]
    rows = [("model", "test error %", "NLL")]
    for i, s in enumerate(test["snapshots"], start=1):
        rows.append((f"snapshot {i}", _percent(s["error"]), f"{s['nll']:.4f}"))
    for e in test["last_m"][1:]:
        rows.append(
            (f"ensemble last {e['m']}", _percent(e["error"]), f"{e['nll']:.4f}")
        )
    if "baseline" in test:
        b = test["baseline"]
        rows.append(
            ("baseline single", _percent(b["error"]), f"{b['nll']:.4f}")
        )
    for name, choice in (report.get("choices") or {}).items():
        if name != "uniform":
            t = choice["test"]
            rows.append(
                (
                    f"chosen on val: {_choice_name(name, choice)}",
                    _percent(t["error"]),
                    f"{t['nll']:.4f}",
                )
            )
    if "exported" in report and "ensemble" in test:
        e = test["ensemble"]
        rows.append(
            ("exported ensemble", _percent(e["error"]), f"{e['nll']:.4f}")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for j, row in enumerate(rows):
        lines.append(
            "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row))
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report(run_dir: str, report: dict, markdown: str | None = None):
    """Writes `report.json` and `report.md` into `run_dir`, atomically.

    NaN and infinities are written as strings, so the JSON is strict.

    Args:
        run_dir: The run directory.
        report: The report dict.
        markdown: The text of `report.md`; by default `markdown_report`
            of a snapshot run's report.
    """
    _fs.write_json(os.path.join(run_dir, "report.json"), report)
    if markdown is None:
        markdown = markdown_report(report)
    _fs.write_text(os.path.join(run_dir, "report.md"), markdown)


def input_words(config: dict) -> str:
    """What the model is fed: raw pixel values, or values in [0, 1]."""
    if config.get("pixel_max", 1) == 255:
        return (
            "raw pixel values 0-255, as the model scales its own input (its "
            "first layer is a Rescaling or Normalization layer)"
        )
    return "pixel values scaled to [0, 1]"


def chance_warning(error: float, num_classes: int):
    """One line when `error` is no better than chance, else None.

    Chance is `1 - 1 / num_classes`, the error of always guessing one
    class on balanced data: a run there has learnt nothing.
    """
    chance = 1 - 1 / num_classes
    if error < chance - 1e-9:
        return None
    return (
        f"Warning: the exported ensemble's test error ({_percent(error)}%) "
        f"is no better than chance ({_percent(chance)}% for {num_classes} "
        "classes): it has learnt nothing. Check the data, the scale of the "
        "model's inputs and --lr."
    )


def plan(run_dir: str, data, schedule, config: dict) -> str:
    """The lines printed before training: directory, data and schedule."""
    head = (
        f"Run directory: {run_dir}\nData: {data.describe()}\n"
        f"Inputs: {input_words(config)}\n"
    )
    if hasattr(schedule, "describe"):
        return f"{head}Schedule: {schedule.describe()}"
    return (
        f"{head}Schedule: {schedule.num_snapshots} cycles of "
        f"{schedule.cycle_length} steps ({schedule.total_steps} steps, "
        f"{config['epochs']} epochs), snapshots after steps "
        f"{schedule.cycle_end_steps}"
    )


def write_run_report(run_dir: str, report: dict, schedule, probs, y_test):
    """Writes `report.json`, `report.md` and the four plots into `run_dir`.

    Args:
        run_dir: The run directory.
        report: The report dict (`test` holds `evaluate_members` scores).
        schedule: The run's `SnapshotSchedule`.
        probs: Snapshot predictions per split; `probs["test"]` is used.
        y_test: Test labels.
    """
    _keep_student(run_dir, report)
    write_report(run_dir, report)
    plot_learning_rate(schedule, os.path.join(run_dir, "learning_rate.png"))
    plot_error_vs_snapshots(
        report["test"],
        os.path.join(run_dir, "error_vs_snapshots.png"),
        chosen_m=_val_chosen_m(report),
    )
    test_probs = probs["test"]
    plot_reliability(
        test_probs[-1],
        test_probs.mean(axis=0),
        y_test,
        os.path.join(run_dir, "reliability.png"),
    )
    plot_disagreement(
        report["test"]["disagreement"],
        os.path.join(run_dir, "disagreement.png"),
    )


def _keep_student(run_dir: str, report: dict) -> None:
    """Carries the distilled student's recorded scores into `report`.

    A rewritten report keeps them while `student.keras` is there
    (`--overwrite`, the only way to change the test split, deletes it).
    """
    path = os.path.join(run_dir, "report.json")
    if "student" in report["test"] or not os.path.isfile(
        os.path.join(run_dir, run_lib.STUDENT_FILE)
    ):
        return
    try:
        with open(path) as f:
            old = json.load(f)
        scores = old["test"]["student"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # No recorded scores: the student is not reported.
    report["test"]["student"] = scores
    if "student" in old:
        report["student"] = old["student"]


def _figure(figsize):
    """A matplotlib `Figure` and its axes, without pyplot or a backend."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots()


def _save(figure, path: str) -> None:
    figure.tight_layout()
    with _fs.atomic_write(path) as local_path:
        figure.savefig(local_path, dpi=110)


def plot_learning_rate(schedule, path: str) -> None:
    """Learning rate over optimizer steps, with the snapshot points marked."""
    steps = np.arange(schedule.total_steps)
    rates = keras.ops.convert_to_numpy(schedule(steps))
    ends = np.array(schedule.cycle_end_steps)
    fig, ax = _figure((7, 3.2))
    ax.plot(steps, rates, lw=1.2, label="learning rate")
    ax.scatter(
        ends, rates[ends - 1], color="crimson", zorder=3, label="snapshot"
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(
        f"{getattr(schedule, 'method', 'snapshot')}: "
        f"{schedule.num_snapshots} snapshots"
    )
    ax.legend()
    _save(fig, path)


def error_band(errors, num_examples: int):
    """Exact 95% intervals (in %) around test errors measured on n images.

    Returns `(low, high)` arrays, from `metrics.error_interval`.
    """
    bounds = [
        metrics.error_interval(round(e * num_examples), num_examples)
        for e in errors
    ]
    low, high = np.array(bounds).T
    return 100 * low, 100 * high


def plot_error_vs_snapshots(test: dict, path: str, chosen_m=None) -> None:
    """Test error of the ensemble of the last m snapshots against m.

    Figure 3 of Huang et al. 2017, with the single models as lines, the
    exact 95% interval of each error shaded (when `num_examples` is known)
    and `chosen_m`, chosen on validation, circled.
    """
    errors = np.array([e["error"] for e in test["last_m"]])
    m = np.arange(1, len(errors) + 1)
    fig, ax = _figure((6.4, 4))
    ax.plot(
        m, 100 * errors, marker="o", label="ensemble of the last m snapshots"
    )
    num_examples = test.get("num_examples")
    subtitle = ""
    if num_examples:
        low, high = error_band(errors, num_examples)
        ax.fill_between(
            m, low, high, alpha=0.2, label="exact 95% interval (binomial)"
        )
        subtitle = (
            f"\n{num_examples} test images: one image = "
            f"{100 / num_examples:.3g}% error"
        )
    final = test.get("final_single") or test["snapshots"][-1]
    ax.axhline(
        100 * final["error"],
        color="crimson",
        ls="--",
        label="final single model (snapshot M)",
    )
    if "baseline" in test:
        ax.axhline(
            100 * test["baseline"]["error"],
            color="gray",
            ls=":",
            label="baseline single model (one cosine decay)",
        )
    if chosen_m is not None:
        ax.scatter(
            [chosen_m],
            [100 * errors[chosen_m - 1]],
            s=160,
            facecolors="none",
            edgecolors="black",
            zorder=3,
            label=f"m chosen on validation (m={chosen_m})",
        )
    ax.set_xlabel("m: number of most recent snapshots averaged")
    ax.set_ylabel("test error %")
    ax.set_xticks(m)
    ax.set_title(
        "Ensemble of the last m snapshots (Huang et al. 2017, Fig. 3)"
        + subtitle,
        fontsize=10,
    )
    ax.legend(fontsize=8)
    _save(fig, path)


def min_bin_images(num_examples: int) -> int:
    """Bins with fewer images are left out of the reliability diagram."""
    return max(MIN_BIN_IMAGES, int(np.ceil(MIN_BIN_FRACTION * num_examples)))


def reliability_points(probs, y, num_bins: int = 15):
    """The reliability diagram's points, without the near-empty bins.

    Returns:
        `(confidence, accuracy, count, keep)`: the per-bin arrays of
        `metrics.reliability_curve`, and the mask of the bins holding at
        least `min_bin_images(len(y))` images, the ones plotted.
    """
    confidence, accuracy, count = metrics.reliability_curve(
        probs, y, num_bins=num_bins
    )
    keep = count >= min_bin_images(int(count.sum()))
    return confidence, accuracy, count, keep


def plot_reliability(single_probs, ensemble_probs, y, path: str) -> None:
    """Reliability diagram of the final single model and the ensemble.

    Accuracy against confidence for bins of at least `min_bin_images`
    images, above the number of test images in each bin.
    """
    fig = Figure(figsize=(5, 6))
    top, bottom = fig.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    top.plot([0, 1], [0, 1], color="gray", ls=":", label="perfect calibration")
    num_bins = 15
    width = 1 / num_bins
    centers = (np.arange(num_bins) + 0.5) * width
    minimum = 0
    for offset, marker, (probs, label) in zip(
        (-width / 4, width / 4),
        ("s", "o"),
        (
            (single_probs, "final single model"),
            (ensemble_probs, "ensemble"),
        ),
        strict=True,
    ):
        confidence, accuracy, count, keep = reliability_points(
            probs, y, num_bins
        )
        minimum = min_bin_images(int(count.sum()))
        ece = metrics.evaluate_predictions(probs, y, num_bins)["ece"]
        top.plot(
            confidence[keep],
            accuracy[keep],
            marker=marker,
            markersize=8 if marker == "s" else 5,
            label=f"{label} (ECE {100 * ece:.2f}%)",
        )
        bottom.bar(centers + offset, count, width=width / 2, label=label)
    top.set_ylabel("accuracy")
    top.set_title(
        f"Reliability on {len(np.asarray(y))} test images\n(bins with "
        f"fewer than {minimum} images left out)",
        fontsize=10,
    )
    top.legend(loc="upper left", fontsize=8)
    bottom.set_yscale("log")
    bottom.axhline(minimum, color="gray", ls=":", lw=1)
    bottom.set_xlabel("confidence (largest predicted probability)")
    bottom.set_ylabel("images per bin")
    bottom.set_xlim(0, 1)
    _save(fig, path)


def plot_disagreement(disagreement, path: str) -> None:
    """Heatmap of the pairwise disagreement between snapshots."""
    matrix = 100 * np.asarray(disagreement)
    count = len(matrix)
    fig, ax = _figure((4.8, 4))
    image = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(count), [str(i + 1) for i in range(count)])
    ax.set_yticks(range(count), [str(i + 1) for i in range(count)])
    ax.set_xlabel("snapshot")
    ax.set_ylabel("snapshot")
    ax.set_title("test predictions that differ (%)")
    fig.colorbar(image, ax=ax)
    _save(fig, path)
