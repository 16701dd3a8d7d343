"""Measures the default job, `keras-snapshot train`, as a user runs it.

For each seed, runs `keras-snapshot train --baseline` with the job's
options and reads its report.json: test error and NLL of the exported
snapshot ensemble, of the final single model of the snapshot run (its last
snapshot) and of the baseline single model (one cosine decay, same
budget). Then times the job itself, without `--baseline`, once: wall time,
CPU time (user + system) and the load average of this shared machine.

    python benchmarks/default_job.py   # 3 seeds; 33 min here at load 6 to 9
    python benchmarks/default_job.py --seeds 1 --name explore -- --epochs 30
    python benchmarks/default_job.py --report-only  # NAME.md from NAME.json

Options after `--` go to `keras-snapshot train` after `JOB` below (the
defaults this script measured; later options win). Writes
benchmarks/results/NAME.json and NAME.md (default_job).
"""

import argparse
import json
import os
import tempfile

import common
from common import md_table
from common import mean_std

# The job's settings, given explicitly so that the measurement does not
# depend on the command line's defaults of the day.
JOB = [
    "--dataset",
    "fashion_mnist_small",
    "--model",
    "flat_cnn",
    "--epochs",
    "100",
    "--snapshots",
    "4",
    "--lr",
    "0.1",
    "--batch-size",
    "64",
    "--weight-decay",
    "5e-3",
]
TARGET_GAIN = 0.05  # relative test error, ensemble against baseline
TARGET_SECONDS = 120  # the job without --baseline, on 2 cores


def scores(report) -> dict:
    """Test error and NLL of the three models of one report.json."""
    test = report["test"]
    return {
        "ensemble": test.get("ensemble") or test["last_m"][-1],
        "final_single": test.get("final_single") or test["snapshots"][-1],
        "baseline": test["baseline"],
    }


def relative_gain(run) -> float:
    """How much lower the ensemble's test error is than the baseline's."""
    return 1 - run["ensemble"]["error"] / run["baseline"]["error"]


def measure(options, seeds, workdir, timing=True) -> dict:
    runs = []
    for seed in range(seeds):
        report = common.run_cli_train(
            [*options, "--baseline", "--seed", str(seed), "--verbose", "0"],
            os.path.join(workdir, f"seed{seed}"),
        )
        runs.append({"seed": seed, **scores(report), **report["benchmark"]})
        print(
            f"seed {seed}: baseline {100 * runs[-1]['baseline']['error']:.2f}%"
            f", ensemble {100 * runs[-1]['ensemble']['error']:.2f}% "
            f"({runs[-1]['wall_seconds']:.0f} s with --baseline)",
            flush=True,
        )
    res = {"options": options, "config": report["config"], "runs": runs}
    if timing:
        job = common.run_cli_train(options, os.path.join(workdir, "job"))
        res["job_without_baseline"] = job["benchmark"]
    res["hardware"] = common.hardware()
    return res


def timing_line(job, hw) -> str:
    if job is None:
        return "- The job was not timed without `--baseline` (`--no-timing`)."
    met = job["wall_seconds"] < TARGET_SECONDS
    return (
        f"- The job without `--baseline` (seed 0, everything: training, "
        f"evaluation, export, report): **{job['wall_seconds']:.0f} s** wall, "
        f"{job['cpu_seconds']:.0f} s CPU (so at least "
        f"{job['cpu_seconds'] / hw['cpu_count']:.0f} s on {hw['cpu_count']} "
        "idle cores), load average "
        f"{job['load_average'][0]:.1f} to {job['load_average'][1]:.1f} on "
        f"{hw['cpu_count']} cores ({hw['cpu']}, shared with other jobs); "
        f"target {TARGET_SECONDS} s: **{'met' if met else 'missed'}**."
    )


def markdown(res) -> str:
    runs, config = res["runs"], res["config"]
    models = (
        ("baseline", "baseline single model (one cosine decay)"),
        ("final_single", "final single model of the snapshot run"),
        ("ensemble", "exported snapshot ensemble (all M)"),
    )
    stats = {
        key: {m: mean_std([r[key][m] for r in runs]) for m in ("error", "nll")}
        for key, _ in models
    }
    base, ens = stats["baseline"]["error"], stats["ensemble"]["error"]
    gain = (base["mean"] - ens["mean"]) / base["mean"]
    job = res.get("job_without_baseline")
    hw = res["hardware"]
    rows = [
        [
            label,
            common.pct(stats[key]["error"]),
            f"{stats[key]['nll']['mean']:.4f} ± {stats[key]['nll']['std']:.4f}",
        ]
        for key, label in models
    ]
    per_seed = [
        [
            r["seed"],
            f"{100 * r['baseline']['error']:.2f}",
            f"{100 * r['ensemble']['error']:.2f}",
            f"{100 * relative_gain(r):.1f}%",
            f"{r['baseline']['nll']:.4f}",
            f"{r['ensemble']['nll']:.4f}",
            f"{r['wall_seconds']:.0f}",
        ]
        for r in runs
    ]
    return "\n".join(
        [
            "# The default job, `keras-snapshot train`, measured",
            "",
            f"`keras-snapshot train {' '.join(res['options'])}`: dataset "
            f"{config['dataset']}, model {config['model']}, "
            f"{config['epochs']} epochs, M = {config['num_snapshots']}, "
            f"initial rate {config['learning_rate']}, batch "
            f"{config['batch_size']}, weight decay {config['weight_decay']:g}"
            f". {common.WEIGHT_DECAY_NOTE} {len(runs)} seeds "
            "(`--seed 0..`), test error % and NLL as mean ± std over seeds. "
            "Command: `python benchmarks/default_job.py`.",
            "",
            md_table(["model", "test error %", "test NLL"], rows),
            "",
            f"- Ensemble against baseline: **{100 * gain:.1f}%** lower test "
            f"error on average (target {100 * TARGET_GAIN:.0f}%: "
            f"**{'met' if gain >= TARGET_GAIN else 'missed'}**).",
            timing_line(job, hw),
            "",
            md_table(
                [
                    "seed",
                    "baseline error %",
                    "ensemble error %",
                    "relative gain",
                    "baseline NLL",
                    "ensemble NLL",
                    "wall s with --baseline",
                ],
                per_seed,
            ),
        ]
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--name", default="default_job")
    p.add_argument("--out", default=common.RESULTS)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite NAME.md from NAME.json, no training",
    )
    p.add_argument(
        "--no-timing",
        dest="timing",
        action="store_false",
        help="skip the timed run without --baseline (for exploring)",
    )
    p.add_argument("options", nargs="*", help="more `keras-snapshot train` ")
    args = p.parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.out, f"{args.name}.json")) as f:
            res = json.load(f)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            res = measure(JOB + args.options, args.seeds, workdir, args.timing)
    md = markdown(res)
    common.write_results(args.out, args.name, res, md)
    if args.name == "default_job":
        common.update_readme_block("default_job", md.split("\n", 2)[2])
    print(md)


if __name__ == "__main__":
    main()
