"""Measures the defaults of `keras-snapshot train` (digits, no network).

Runs the main job as a user would, with `--baseline`, over several seeds,
with and without BatchNorm recalibration of the snapshots, and prints the
mean and standard deviation of test error and NLL for: the final single
model of the snapshot run (its last snapshot), the snapshot ensemble, and
the baseline single model trained with one cosine decay on the same budget.

    python benchmarks/default_job.py            # 3 seeds, about 5 minutes
    python benchmarks/default_job.py --seeds 5

Writes benchmarks/results/default_job.json and default_job.md.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def run_job(seed, recalibrate, extra, workdir):
    run_dir = os.path.join(workdir, f"seed{seed}_recal{int(recalibrate)}")
    command = [
        sys.executable,
        "-m",
        "keras_snapshot",
        "train",
        "--baseline",
        "--seed",
        str(seed),
        "--verbose",
        "0",
        "--output-dir",
        run_dir,
        *extra,
    ]
    if not recalibrate:
        command.append("--no-recalibrate-bn")
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    with open(os.path.join(run_dir, "report.json")) as f:
        report = json.load(f)
    test = report["test"]
    return {
        "seed": seed,
        "wall_seconds": seconds,
        "final_single": test["snapshots"][-1],
        "ensemble": test["last_m"][-1],
        "baseline": test["baseline"],
        "snapshots": [s["error"] for s in test["snapshots"]],
        "config": report["config"],
    }


def summarize(runs, key, metric):
    values = np.array([r[key][metric] for r in runs])
    return float(values.mean()), float(values.std())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "extra", nargs="*", help="more `keras-snapshot train` options"
    )
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        for recalibrate in (False, True):
            runs = [
                run_job(seed, recalibrate, args.extra, workdir)
                for seed in range(args.seeds)
            ]
            rows[f"recalibrate_bn={recalibrate}"] = runs
    config = rows["recalibrate_bn=True"][0]["config"]
    lines = [
        "# `keras-snapshot train` defaults, measured",
        "",
        f"Dataset {config['dataset']}, model {config['model']}, "
        f"{config['epochs']} epochs, M={config['num_snapshots']}, initial "
        f"rate {config['learning_rate']}, batch {config['batch_size']}; "
        f"{args.seeds} seeds, mean ± std over seeds. Command: "
        "`python benchmarks/default_job.py`.",
        "",
        "| BN recalibration | model | test error % | test NLL |",
        "|---|---|---|---|",
    ]
    for name, runs in rows.items():
        for key, label in (
            ("baseline", "baseline single model (one cosine decay)"),
            ("final_single", "final single model of the snapshot run"),
            ("ensemble", "snapshot ensemble (all M)"),
        ):
            err, err_std = summarize(runs, key, "error")
            nll, nll_std = summarize(runs, key, "nll")
            lines.append(
                f"| {name.split('=')[1]} | {label} | {100 * err:.2f} ± "
                f"{100 * err_std:.2f} | {nll:.4f} ± {nll_std:.4f} |"
            )
    wall = np.mean([r["wall_seconds"] for r in rows["recalibrate_bn=True"]])
    lines += [
        "",
        f"Mean wall time of one `keras-snapshot train --baseline`: "
        f"{wall:.0f} s (snapshot run, baseline, evaluation and export).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "default_job.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(RESULTS, "default_job.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
