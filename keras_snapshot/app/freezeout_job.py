"""`keras-snapshot train --freezeout`: a FreezeOut single model, timed.

FreezeOut (Brock, Lim, Ritchie, Weston 2017, arXiv:1706.04983) trains one
model whose layer groups get their own cosine-annealed rates and freeze one
after the other (`keras_snapshot.freezeout.FreezeOut`). This job trains that
model (the optimizer's rate is the constant `--lr`; FreezeOut anneals it per
group, the last group over the whole budget), and with `--baseline` the same
model trained normally (one cosine decay of `--lr` over the same budget). It
prints the estimated saving of training FLOPs before training and the
measured saving of wall time after, and writes `report.json` and
`report.md`:

    train_seconds, baseline_train_seconds (with --baseline),
    estimated_saving, measured_saving (with --baseline),
    test: {final_single: {error, nll, ...}, baseline: {...}}

Resuming works as for snapshot runs: `run.json` records the status, and
`keras.callbacks.BackupAndRestore` the training state, from which FreezeOut
derives which groups are frozen.
"""

import os
import time

from keras_snapshot.app import run as run_lib
from keras_snapshot.app.train import run_config


def _check_options(args) -> None:
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
        f"Run directory: {run_dir}\nData: {data.name}, "
        f"{len(data.x_train)} train / {len(data.x_val)} validation / "
        f"{len(data.x_test)} test images, {data.num_classes} classes\n"
        f"FreezeOut: t0={config['t0']} ({config['freezeout_scaling']}, "
        f"{kind}), {steps} steps ({config['epochs']} epochs), one cosine "
        f"anneal of lr {config['learning_rate']} per layer group.\n"
        f"Estimated saving: {100 * saving:.1f}% of training FLOPs "
        "(FreezeOut's cost model: forward always, backward while a group "
        "or one below it trains)."
    )


def _train_freezeout(run, config, data, steps, strategy, verbose) -> float:
    """Trains the FreezeOut model, or resumes it; returns its train time."""
    import keras

    from keras_snapshot.app.train import _check_backup
    from keras_snapshot.app.train import _compiled_model
    from keras_snapshot.app.train import _Diverged
    from keras_snapshot.app.train import _fit
    from keras_snapshot.freezeout import FreezeOut

    run_dir = config["output_dir"]
    if not run_lib.start_training(run, run_dir):
        return run.get("train_seconds", 0.0)

    keras.utils.set_random_seed(config["seed"])
    # A constant optimizer rate: FreezeOut anneals it per group.
    model = _compiled_model(config, data, config["learning_rate"], strategy)
    _check_backup(model, os.path.join(run_dir, run_lib.BACKUP_DIR))
    callbacks = [
        keras.callbacks.BackupAndRestore(
            os.path.join(run_dir, run_lib.BACKUP_DIR), double_checkpoint=True
        ),
        FreezeOut(
            t0=config["t0"],
            scaling=config["freezeout_scaling"],
            scale_lr=config["scale_lr"],
            total_steps=steps,
            verbose=1 if verbose else 0,
        ),
        _Diverged(),
    ]
    started = time.perf_counter()
    _fit(model, data, config, callbacks, verbose)
    seconds = run.get("train_seconds", 0.0) + time.perf_counter() - started
    model.save(os.path.join(run_dir, run_lib.FREEZEOUT_FILE))
    run.update(status="trained", train_seconds=seconds)
    run_lib.write_run(run_dir, run)
    return seconds


def _train_baseline(run, config, data, steps, strategy, verbose) -> float:
    """The same model with one cosine decay over the budget; its time."""
    import keras

    from keras_snapshot.app.train import _compiled_model
    from keras_snapshot.app.train import _fit

    run_dir = config["output_dir"]
    path = os.path.join(run_dir, run_lib.BASELINE_FILE)
    if os.path.isfile(path) and "baseline_train_seconds" in run:
        return run["baseline_train_seconds"]
    keras.utils.set_random_seed(config["seed"])
    decay = keras.optimizers.schedules.CosineDecay(
        config["learning_rate"], steps
    )
    model = _compiled_model(config, data, decay, strategy)
    print("Training the baseline single model (one cosine decay) ...")
    started = time.perf_counter()
    _fit(model, data, config, [], verbose)
    seconds = time.perf_counter() - started
    model.save(path)
    run["baseline_train_seconds"] = seconds
    run_lib.write_run(run_dir, run)
    return seconds


def _scores(run_dir: str, data, with_baseline: bool) -> dict:
    """`{split: {"final_single": scores, "baseline": scores}}`."""
    import keras

    from keras_snapshot import metrics

    names = {"final_single": run_lib.FREEZEOUT_FILE}
    if with_baseline:
        names["baseline"] = run_lib.BASELINE_FILE
    models = {
        name: keras.saving.load_model(
            os.path.join(run_dir, file), compile=False
        )
        for name, file in names.items()
    }
    scores = {}
    for split in ("val", "test"):
        x, y = {
            "val": (data.x_val, data.y_val),
            "test": (data.x_test, data.y_test),
        }[split]
        if len(x) == 0:
            continue
        scores[split] = {
            name: metrics.evaluate_predictions(
                model.predict(x, batch_size=256, verbose=0), y
            )
            for name, model in models.items()
        }
    return scores


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
                report["baseline_train_seconds"],
            )
        )
    lines = [
        "# FreezeOut report",
        "",
        f"Dataset `{config['dataset']}`, model `{config['model']}`, "
        f"{config['epochs']} epochs ({report['steps']} steps), lr "
        f"{config['learning_rate']}, batch {config['batch_size']}, seed "
        f"{config['seed']}. FreezeOut t0={config['t0']} "
        f"({config['freezeout_scaling']}, {kind}).",
        "",
        "| model | test error % | NLL | train seconds |",
        "|---|---|---|---|",
    ]
    for name, scores, seconds in rows:
        lines.append(
            f"| {name} | {100 * scores['error']:.2f} | "
            f"{scores['nll']:.4f} | {seconds:.1f} |"
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
    import json

    import keras

    from keras_snapshot.app.models import get_model
    from keras_snapshot.app.train import _strategy
    from keras_snapshot.freezeout import estimate_speedup

    _check_options(args)
    config = run_config(args)
    if args.output_dir is None:
        config["output_dir"] = os.path.join(
            "runs",
            f"{args.dataset}_{os.path.basename(args.model)}_freezeout"
            f"_seed{args.seed}",
        )
    data = run_lib.load_data(config, args.data_dir)
    steps = config["epochs"] * run_lib.steps_per_epoch(config, data)
    # The model must fit the data and have FreezeOut groups before a run
    # is recorded.
    model = get_model(config["model"], data.input_shape, data.num_classes)
    saving = estimate_speedup(
        model, t0=config["t0"], scaling=config["freezeout_scaling"]
    )
    del model
    run_lib.lock_run_dir(config["output_dir"])  # Until the command ends.
    run = run_lib.start_or_resume(config, overwrite=args.overwrite)
    run_dir = config["output_dir"]
    strategy = _strategy(args.strategy)
    print(_plan_text(run_dir, data, config, steps, saving))

    train_seconds = _train_freezeout(
        run, config, data, steps, strategy, args.verbose
    )
    baseline_seconds = None
    if args.baseline:
        baseline_seconds = _train_baseline(
            run, config, data, steps, strategy, args.verbose
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
        "versions": {
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
        },
    }
    if baseline_seconds is not None:
        report["baseline_train_seconds"] = round(baseline_seconds, 2)
        report["measured_saving"] = 1.0 - train_seconds / baseline_seconds
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write(markdown_report(report))
    test = report["test"]
    print(
        f"\nFreezeOut model: {100 * test['final_single']['error']:.2f}% test "
        f"error, NLL {test['final_single']['nll']:.4f}, "
        f"{train_seconds:.1f} s of training."
    )
    if "baseline" in test:
        print(
            f"Normal training: {100 * test['baseline']['error']:.2f}% test "
            f"error, NLL {test['baseline']['nll']:.4f}, "
            f"{baseline_seconds:.1f} s of training."
        )
    print(saving_text(report))
    print(
        f"\nReport: {os.path.join(run_dir, 'report.md')}\n"
        f"Model: {os.path.join(run_dir, run_lib.FREEZEOUT_FILE)}"
    )
    return 0
