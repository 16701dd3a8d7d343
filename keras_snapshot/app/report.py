"""The report step of `keras-snapshot`: tables, Markdown, JSON and plots.

Writes what `keras-snapshot train` found (scores from
`keras_snapshot.app.evaluate`) as `report.json`, `report.md` and four PNG
plots. The plots use matplotlib's object-oriented API (`Figure` and
`savefig`), which needs no backend and sets no global state.
"""

import json
import os

import keras
import numpy as np
from matplotlib.figure import Figure

from keras_snapshot import metrics


def _percent(value) -> str:
    return f"{100 * value:.2f}"


def markdown_report(report: dict) -> str:
    """A readable Markdown version of `report.json`."""
    config = report["config"]
    test = report["test"]
    lines = [
        "# Snapshot ensemble report",
        "",
        f"Method: `{report.get('method', 'snapshot')}`.",
        "",
        f"Dataset `{config['dataset']}`, model `{config['model']}`, "
        f"{config['epochs']} epochs, {config['num_snapshots']} snapshots, "
        f"initial rate {config['learning_rate']}, batch "
        f"{config['batch_size']}, seed {config['seed']}. Training took "
        f"{report['train_seconds']:.1f} s "
        f"({report['steps']} steps).",
        "",
        "## Test error of each snapshot and of the last m averaged",
        "",
        "| m / snapshot | snapshot error % | ensemble of last m: error % "
        "| NLL | ECE % |",
        "|---|---|---|---|---|",
    ]
    count = len(test["snapshots"])
    for i in range(count):
        ens = test["last_m"][i]
        lines.append(
            f"| {i + 1} | {_percent(test['snapshots'][i]['error'])} | "
            f"{_percent(ens['error'])} | {ens['nll']:.4f} | "
            f"{_percent(ens['ece'])} |"
        )
    lines += ["", verdict(report), ""]
    if "baseline" in test:
        lines += [
            f"Baseline single model (one cosine decay, same budget): "
            f"{_percent(test['baseline']['error'])}% test error.",
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
    choices = report.get("choices")
    if choices:
        lines += [
            "## Ensembles chosen on the validation split",
            "",
            "| choice | test error % | NLL | ECE % | temperature T | "
            "NLL with T | ECE % with T | weights |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, choice in choices.items():
            weights = ", ".join(f"{w:.2f}" for w in choice["weights"])
            test, scaled = choice["test"], choice["test_temperature_scaled"]
            lines.append(
                f"| {name} | {_percent(test['error'])} | {test['nll']:.4f} | "
                f"{_percent(test['ece'])} | {choice['temperature']:.3g} | "
                f"{scaled['nll']:.4f} | {_percent(scaled['ece'])} | "
                f"{weights} |"
            )
        lines.append("")
    exported = report["exported"]
    scaling = (
        f", temperature {exported['temperature']:.3g}"
        if exported.get("temperature")
        else ""
    )
    lines += [
        f"Exported ensemble: `{exported['choice']}` "
        f"({exported['members']} members{scaling}) in `ensemble.keras` "
        "and `saved_model/`.",
        "",
        "![learning rate](learning_rate.png)",
        "",
        "![error vs m](error_vs_snapshots.png)",
        "",
    ]
    return "\n".join(lines)


def verdict(report: dict) -> str:
    """One honest sentence on how the ensemble compares with its members."""
    test = report["test"]
    ensemble = test["last_m"][-1]["error"]
    last = test["snapshots"][-1]["error"]
    best = min(s["error"] for s in test["snapshots"])
    best_m = min(test["last_m"], key=lambda e: e["error"])
    words = (
        f"The ensemble of all {len(test['snapshots'])} snapshots has "
        f"{_percent(ensemble)}% test error against {_percent(last)}% for "
        f"the final single model (the last snapshot) and {_percent(best)}% "
        f"for the best snapshot; the best last-m ensemble (m={best_m['m']}) "
        f"has {_percent(best_m['error'])}%."
    )
    if "baseline" in test:
        base = test["baseline"]["error"]
        change = "lower" if ensemble < base else "higher"
        words += (
            f" Against the baseline single model ({_percent(base)}%), the "
            f"ensemble's error is {change}."
        )
    return words


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
                    f"chosen on val: {name}",
                    _percent(t["error"]),
                    f"{t['nll']:.4f}",
                )
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


def write_report(run_dir: str, report: dict) -> None:
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write(markdown_report(report))


def plan(run_dir: str, data, schedule, config: dict) -> str:
    """The lines printed before training: directory, data and schedule."""
    if hasattr(schedule, "describe"):
        return (
            f"Run directory: {run_dir}\nData: {data.name}, "
            f"{len(data.x_train)} train / {len(data.x_val)} validation / "
            f"{len(data.x_test)} test images\nSchedule: {schedule.describe()}"
        )
    return (
        f"Run directory: {run_dir}\nData: {data.name}, "
        f"{len(data.x_train)} train / {len(data.x_val)} validation / "
        f"{len(data.x_test)} test images, {data.num_classes} classes\n"
        f"Schedule: {schedule.num_snapshots} cycles of "
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
    write_report(run_dir, report)
    plot_learning_rate(schedule, os.path.join(run_dir, "learning_rate.png"))
    plot_error_vs_snapshots(
        report["test"], os.path.join(run_dir, "error_vs_snapshots.png")
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


def _figure(figsize):
    """A matplotlib `Figure` and its axes, without pyplot or a backend."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots()


def _save(figure, path: str) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)


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


def plot_error_vs_snapshots(test: dict, path: str) -> None:
    """Test error of the ensemble of the last m snapshots (Figure 3)."""
    count = len(test["snapshots"])
    m = np.arange(1, count + 1)
    fig, ax = _figure((6, 3.6))
    ax.plot(
        m,
        [100 * e["error"] for e in test["last_m"]],
        marker="o",
        label="ensemble of the last m snapshots",
    )
    ax.plot(
        m,
        [100 * s["error"] for s in test["snapshots"]],
        marker="s",
        ls="--",
        label="snapshot m alone",
    )
    if "baseline" in test:
        ax.axhline(
            100 * test["baseline"]["error"],
            color="gray",
            ls=":",
            label="baseline single model",
        )
    ax.set_xlabel("m")
    ax.set_ylabel("test error %")
    ax.set_xticks(m)
    ax.legend()
    _save(fig, path)


def plot_reliability(single_probs, ensemble_probs, y, path: str) -> None:
    """Reliability diagram of the final single model and the ensemble."""
    fig, ax = _figure((4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="gray", ls=":", label="perfect calibration")
    for probs, label in (
        (single_probs, "final single model"),
        (ensemble_probs, "ensemble"),
    ):
        confidence, accuracy, count = metrics.reliability_curve(probs, y)
        keep = count > 0
        ece = metrics.expected_calibration_error(probs, y)
        ax.plot(
            confidence[keep],
            accuracy[keep],
            marker="o",
            label=f"{label} (ECE {100 * ece:.2f}%)",
        )
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
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
