"""`keras-snapshot train`: train, evaluate, export and report, in that order.

`train_command` reads top to bottom as the job it runs; what is particular
to snapshot runs lives here: the callbacks and the exported ensemble.
"""

import os

from keras_snapshot import SnapshotCheckpoint
from keras_snapshot.app import methods as methods_lib
from keras_snapshot.app import pipeline
from keras_snapshot.app import report as report_lib
from keras_snapshot.app import run as run_lib
from keras_snapshot.app.evaluate import choose_ensembles
from keras_snapshot.app.evaluate import compare_singles
from keras_snapshot.app.evaluate import evaluate_run
from keras_snapshot.app.export import chosen_snapshots
from keras_snapshot.app.export import export_files
from keras_snapshot.app.freezeout_job import freezeout_command
from keras_snapshot.app.progress import CommandProgress

_RECALIBRATION_SAMPLES = 10000


def snapshot_callbacks(config: dict, data, schedule) -> list:
    """`SnapshotCheckpoint` and the method's extra callbacks (SWA).

    The checkpoint prints one line per snapshot, with or without
    `--verbose`.
    """
    run_dir = config["output_dir"]
    recalibration = None
    if config["recalibrate_bn"]:
        recalibration = data.inputs("train", 256, limit=_RECALIBRATION_SAMPLES)
    return [
        SnapshotCheckpoint(
            os.path.join(run_dir, run_lib.SNAPSHOT_DIR),
            recalibration_data=recalibration,
            verbose=1,
            **methods_lib.snapshot_kwargs(schedule),
        ),
        *methods_lib.extra_callbacks(schedule, run_dir, recalibration),
    ]


def _temperature(choices, args):
    """The validation-fitted temperature of the exported choice, or None.

    Also its `temperature_fit` (what validation could tell), or None.
    """
    if not args.temperature_scaling:
        return None, None
    if not choices:
        raise run_lib.UsageError(
            "--temperature-scaling is fitted on the validation split; "
            "use a --validation-fraction above 0."
        )
    choice = choices[args.select if args.select != "all" else "uniform"]
    return choice["temperature"], choice["temperature_fit"]


def train_command(args) -> int:
    """`keras-snapshot train`: the whole job, one step after the other."""
    if args.freezeout:
        return freezeout_command(args)
    config = pipeline.run_config(args)
    data = run_lib.load_data(config, args.data_dir)
    # Checks M against the budget before anything is written.
    schedule = methods_lib.make_schedule(config, data)
    if not args.overwrite:  # --overwrite starts over, whatever the method.
        methods_lib.check_resume(config)
    pipeline.check_model(config, data)
    run = pipeline.start_run(config, overwrite=args.overwrite)
    run_dir = config["output_dir"]
    data_warning = pipeline.record_data(run, run_dir, data)
    strategy = pipeline.get_strategy(args.strategy)
    print(report_lib.plan(run_dir, data, schedule, config))
    if data_warning:
        print(data_warning)

    epochs = config["epochs"]
    with CommandProgress(
        epochs * (2 if args.baseline else 1), args.verbose
    ) as progress:
        train_seconds = pipeline.train_model(
            run,
            config,
            data,
            methods_lib.optimizer_schedule(schedule),
            snapshot_callbacks(config, data, schedule),
            strategy,
            progress,
        )
        baseline_seconds = None
        if args.baseline:
            baseline_seconds = pipeline.train_baseline(
                run, config, data, schedule.total_steps, strategy, progress
            )

    scores, probs = evaluate_run(run_dir, data)
    choices = None
    if "val" in probs:
        choices = choose_ensembles(
            probs["val"], data.labels("val"), probs["test"], data.labels("test")
        )
    weights = None
    if args.select != "all" and choices:
        weights = choices[args.select]["weights"]
    temperature, temperature_fit = _temperature(choices, args)
    if temperature_fit:
        print("Temperature scaling: " + temperature_fit["message"])
    # The exported ensemble against the single models, on test.
    scores["test"].update(
        compare_singles(
            probs["test"],
            data.labels("test"),
            weights,
            temperature,
            probs.get("baseline", {}).get("test"),
        )
    )
    snapshots, weights = chosen_snapshots(run_dir, weights)
    snapshots, weights = methods_lib.exported_members(
        config, run_dir, snapshots, weights
    )
    export_files(run_dir, snapshots, weights, temperature, classes=data.classes)

    scores["test"].update(methods_lib.method_scores(config, run_dir, data))
    report = {
        "method": config["method"],
        "config": config,
        "steps": schedule.total_steps,
        "cycle_end_steps": schedule.cycle_end_steps,
        "train_seconds": round(train_seconds, 2),
        "test": scores["test"],
        "validation": scores.get("val"),
        "choices": choices,
        "exported": {
            "choice": args.select,
            "members": len(snapshots),
            "temperature": temperature,
            **({"temperature_fit": temperature_fit} if temperature_fit else {}),
        },
        "versions": pipeline.versions(),
        "classes": list(data.classes),
        "warnings": [
            w
            for w in (
                data_warning,
                report_lib.chance_warning(
                    scores["test"]["ensemble"]["error"], data.num_classes
                ),
            )
            if w
        ],
    }
    if baseline_seconds is not None:
        report["baseline_train_seconds"] = round(baseline_seconds, 2)
    report_lib.write_run_report(
        run_dir, report, schedule, probs, data.labels("test")
    )
    print("\n" + report_lib.summary_table(report))
    print("\n" + report_lib.verdict(report))
    for warning in report["warnings"]:
        if warning != data_warning:  # Printed before training.
            print("\n" + warning)
    print(
        f"\nReport: {os.path.join(run_dir, 'report.md')}\n"
        f"Ensemble: {os.path.join(run_dir, 'ensemble.keras')} and "
        f"{os.path.join(run_dir, 'saved_model')}"
    )
    return 0
