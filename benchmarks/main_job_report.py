"""Regenerates docs/main_job/: the report of the default job, as committed.

Runs `keras-snapshot train --baseline` with every other option at the
command line's defaults (whatever they are in this checkout: nothing here
names a dataset or a setting), into runs/main_job, then copies its
report.json, report.md and four plots into docs/main_job/. The `--baseline`
single model is added so that the example shows what the ensemble is
compared with.

    python benchmarks/main_job_report.py                # train, then copy
    python benchmarks/main_job_report.py --render-only  # report.md again
    python benchmarks/main_job_report.py -- --seed 1    # more train options

`--render-only` trains nothing: it writes report.md (and the two plots that
need no predictions) again from the committed report.json, after a change
to keras_snapshot/app/report.py. tests/test_report.py fails when the
committed report.md is not what report.py makes of report.json, or when
report.json was not made with the command line's current defaults.
"""

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DOCS = os.path.join(ROOT, "docs", "main_job")
RUN_DIR = os.path.join("runs", "main_job")  # relative: report.json says it
PLOTS = (
    "learning_rate.png",
    "error_vs_snapshots.png",
    "reliability.png",
    "disagreement.png",
)
COMMAND = "python benchmarks/main_job_report.py"
HEADER = (
    "_Written by `{command}`: the default job, `keras-snapshot train "
    "--baseline`, with the command line's defaults of this version; do not "
    "edit by hand._\n\n"
)


def train_argv(extra=()) -> list:
    """`keras-snapshot train` at the command line's defaults, + baseline."""
    return [
        "train",
        "--baseline",
        "--overwrite",
        "--verbose",
        "0",
        "--output-dir",
        RUN_DIR,
        *extra,
    ]


def render(report: dict) -> str:
    """The committed report.md: a header, then `markdown_report`."""
    from keras_snapshot.app import report as report_lib

    return HEADER.format(command=COMMAND) + report_lib.markdown_report(report)


def write_markdown(report: dict) -> None:
    with open(os.path.join(DOCS, "report.md"), "w") as f:
        f.write(render(report))


def render_only() -> None:
    """report.md and the plots that need no predictions, from report.json."""
    from keras_snapshot import SnapshotSchedule
    from keras_snapshot.app import report as report_lib

    with open(os.path.join(DOCS, "report.json")) as f:
        report = json.load(f)
    write_markdown(report)
    steps = report["steps"]
    num_snapshots = report["config"]["num_snapshots"]
    schedule = SnapshotSchedule(
        report["config"]["learning_rate"], steps, num_snapshots
    )
    report_lib.plot_learning_rate(
        schedule, os.path.join(DOCS, "learning_rate.png")
    )
    report_lib.plot_error_vs_snapshots(
        report["test"],
        os.path.join(DOCS, "error_vs_snapshots.png"),
        chosen_m=report_lib._val_chosen_m(report),
    )


def train_and_copy(extra) -> int:
    from keras_snapshot.app import cli

    os.chdir(ROOT)
    code = cli.main(train_argv(extra))
    if code:
        return code
    os.makedirs(DOCS, exist_ok=True)
    for name in ("report.json", *PLOTS):
        shutil.copyfile(
            os.path.join(ROOT, RUN_DIR, name), os.path.join(DOCS, name)
        )
    with open(os.path.join(DOCS, "report.json")) as f:
        write_markdown(json.load(f))
    print(f"Written: {DOCS}/report.md, report.json and {len(PLOTS)} plots")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="write report.md again from the committed report.json",
    )
    parser.add_argument(
        "train_options",
        nargs="*",
        help="after `--`: more `keras-snapshot train` options",
    )
    args = parser.parse_args(argv)
    if args.render_only:
        render_only()
        print(f"Written: {DOCS}/report.md")
        return 0
    return train_and_copy(args.train_options)


if __name__ == "__main__":
    sys.exit(main())
