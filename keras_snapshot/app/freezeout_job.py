"""`keras-snapshot train --freezeout`: a FreezeOut single model, timed.

FreezeOut (Brock et al. 2017, arXiv:1706.04983) as the method's callback of
`pipeline.train_model`, with `--baseline` the same model trained normally;
reports the estimated FLOPs saving and the measured time saving. The run
has no snapshots: `evaluate`, `export` and `distill` refuse it.
"""

import os

from keras_snapshot import metrics
from keras_snapshot.app import pipeline
from keras_snapshot.app import report as report_lib
from keras_snapshot.app import run as run_lib
from keras_snapshot.app.evaluate import predict_models
from keras_snapshot.app.progress import CommandProgress
from keras_snapshot.freezeout import FreezeOut
from keras_snapshot.freezeout import estimate_speedup


def _check_options(args) -> None:
    if args.method != "snapshot":
        raise run_lib.UsageError(
            "--freezeout has its own schedule, not a --method one. Drop "
            f"--method or --freezeout. Received: --method {args.method}"
        )
    if args.temperature_scaling:
        raise run_lib.UsageError(
            "--temperature-scaling calibrates a snapshot ensemble; "
            "--freezeout trains a single model. Leave one of them out."
        )
    if args.select != "all":
        raise run_lib.UsageError(
            f"--select {args.select} chooses snapshots of an ensemble; "
            "--freezeout trains a single model. Leave one of them out."
        )


def _plan_text(run_dir, data, config, steps, saving) -> str:
    kind = "scaled" if config["scale_lr"] else "unscaled"
    return (
        f"Run directory: {run_dir}\nData: {data.describe()}\n"
        f"FreezeOut: t0={config['t0']} ({config['freezeout_scaling']}, "
        f"{kind}), {steps} steps ({config['epochs']} epochs), one cosine "
        f"anneal of lr {config['learning_rate']} per layer group.\n"
        f"Estimated saving: {100 * saving:.1f}% of training FLOPs "
        "(FreezeOut's cost model: forward always, backward while a group "
        "or one below it trains)."
    )


def _scores(run_dir: str, data, with_baseline: bool) -> dict:
    """`{split: {"final_single": scores, "baseline": scores}}`."""
    files = {"final_single": run_lib.FREEZEOUT_FILE}
    if with_baseline:
        files["baseline"] = run_lib.BASELINE_FILE
    return {
        split: {
            name: metrics.evaluate_predictions(p, data.labels(split))
            for name, p in models.items()
        }
        for split, models in predict_models(run_dir, data, files).items()
    }


def markdown_report(report: dict) -> str:
    """A readable Markdown version of a FreezeOut run's `report.json`."""
    config = report["config"]
    test = report["test"]
    kind = "scaled" if config["scale_lr"] else "unscaled"
    rows = [("FreezeOut", test["final_single"], report["train_seconds"])]
    if "baseline" in test:
        rows.append(
            (
                "normal (one cosine decay)",
                test["baseline"],
                report.get("baseline_train_seconds"),
            )
        )
    lines = [
        "# FreezeOut report",
        "",
        f"Data `{run_lib.data_source(config)}`, model `{config['model']}`, "
        f"{config['epochs']} epochs ({report['steps']} steps), lr "
        f"{config['learning_rate']}, batch {config['batch_size']}, seed "
        f"{config['seed']}. FreezeOut t0={config['t0']} "
        f"({config['freezeout_scaling']}, {kind}).",
        "",
        "| model | test error % | NLL | train seconds |",
        "|---|---|---|---|",
    ]
    for name, scores, seconds in rows:
        seconds = "not recorded" if seconds is None else f"{seconds:.1f}"
        lines.append(
            f"| {name} | {100 * scores['error']:.2f} | "
            f"{scores['nll']:.4f} | {seconds} |"
        )
    lines += ["", saving_text(report), ""]
    return "\n".join(lines)


def saving_text(report: dict) -> str:
    """The estimated saving, and the measured one when there is a baseline."""
    text = (
        f"Estimated saving: {100 * report['estimated_saving']:.1f}% of "
        "training FLOPs."
    )
    if report.get("measured_saving") is not None:
        text += (
            f" Measured saving: {100 * report['measured_saving']:.1f}% of "
            f"training wall time ({report['train_seconds']:.1f} s against "
            f"{report['baseline_train_seconds']:.1f} s, first trace and "
            "FreezeOut's retraces included)."
        )
    return text


def freezeout_command(args) -> int:
    """`keras-snapshot train --freezeout`: train, evaluate, report."""
    _check_options(args)
    config = pipeline.run_config(args)
    data = run_lib.load_data(config, args.data_dir)
    steps = config["epochs"] * run_lib.steps_per_epoch(config, data)
    # The model must fit the data and have FreezeOut groups before a run
    # is recorded.
    model = pipeline.check_model(config, data)
    with run_lib.as_usage_error():
        saving = estimate_speedup(
            model, t0=config["t0"], scaling=config["freezeout_scaling"]
        )
    del model
    run = pipeline.start_run(config, overwrite=args.overwrite)
    run_dir = config["output_dir"]
    strategy = pipeline.get_strategy(args.strategy)
    print(_plan_text(run_dir, data, config, steps, saving))

    freezeout = FreezeOut(
        t0=config["t0"],
        scaling=config["freezeout_scaling"],
        scale_lr=config["scale_lr"],
        total_steps=steps,
        verbose=1,  # A line per freeze, with or without --verbose.
    )
    epochs = config["epochs"] * (2 if args.baseline else 1)
    with CommandProgress(epochs, args.verbose) as progress:
        # A constant optimizer rate: FreezeOut anneals it per group.
        train_seconds = pipeline.train_model(
            run,
            config,
            data,
            config["learning_rate"],
            [freezeout],
            strategy,
            progress,
            model_file=run_lib.FREEZEOUT_FILE,
        )
        baseline_seconds = None
        if args.baseline:
            baseline_seconds = pipeline.train_baseline(
                run, config, data, steps, strategy, progress
            )
    scores = _scores(run_dir, data, args.baseline)
    report = {
        "config": config,
        "method": "freezeout",
        "steps": steps,
        "train_seconds": round(train_seconds, 2),
        "estimated_saving": saving,
        "test": scores["test"],
        "validation": scores.get("val"),
        "versions": pipeline.versions(),
    }
    if baseline_seconds is not None:
        report["baseline_train_seconds"] = round(baseline_seconds, 2)
        report["measured_saving"] = 1.0 - train_seconds / baseline_seconds
    report_lib.write_report(run_dir, report, markdown_report(report))
    test = report["test"]
    print(
        f"\nFreezeOut model: {100 * test['final_single']['error']:.2f}% test "
        f"error, NLL {test['final_single']['nll']:.4f}, "
        f"{train_seconds:.1f} s of training."
    )
    if "baseline" in test:
        seconds = ""
        if baseline_seconds is not None:
            seconds = f", {baseline_seconds:.1f} s of training"
        print(
            f"Normal training: {100 * test['baseline']['error']:.2f}% test "
            f"error, NLL {test['baseline']['nll']:.4f}{seconds}."
        )
    print(saving_text(report))
    print(
        f"\nReport: {os.path.join(run_dir, 'report.md')}\n"
        f"Model: {os.path.join(run_dir, run_lib.FREEZEOUT_FILE)}"
    )
    return 0
