"""`keras-snapshot distill RUN_DIR`: the run's ensemble in one model.

The teacher is the run's `ensemble.keras`, the student a fresh copy of the
snapshot architecture (`keras_snapshot.distill`, Hinton et al. 2015); saves
`student.keras` and adds `test.student` to `report.json`.
"""

import json
import os
import time

from keras_snapshot.app import run as run_lib

STUDENT_FILE = run_lib.STUDENT_FILE


def distill_command(args) -> int:
    """Distils, evaluates on the test split and updates the report."""
    run = run_lib.read_run(args.run_dir)
    run_lib.check_has_ensemble(run, args.run_dir, "distil")
    config = run["config"]
    ensemble_path = os.path.join(args.run_dir, "ensemble.keras")
    report_path = os.path.join(args.run_dir, "report.json")
    for path in (ensemble_path, report_path):
        if not os.path.isfile(path):
            raise run_lib.UsageError(
                f"{path} does not exist: the run has not finished; run "
                "`keras-snapshot train` with the same settings first."
            )
    data = run_lib.load_data(config, args.data_dir)
    epochs = args.epochs or config["epochs"]

    import keras

    from keras_snapshot import distill
    from keras_snapshot import metrics
    from keras_snapshot.app import report as report_lib
    from keras_snapshot.app.evaluate import predict_split
    from keras_snapshot.app.progress import CommandProgress

    keras.utils.set_random_seed(config["seed"])
    teacher = keras.saving.load_model(ensemble_path, compile=False)
    steps = run_lib.steps_per_epoch(config, data) * epochs
    optimizer = keras.optimizers.SGD(
        keras.optimizers.schedules.CosineDecay(config["learning_rate"], steps),
        momentum=config["momentum"],
        weight_decay=config["weight_decay"] or None,
    )
    validation = None
    if data.count("val"):
        validation = data.arrays("val")
    print(
        f"Distilling {ensemble_path} into a fresh copy of its first member "
        f"(T={args.temperature}, alpha={args.alpha}, {epochs} epochs) ..."
    )
    started = time.perf_counter()
    with CommandProgress(epochs, args.verbose) as progress:
        student = distill(
            teacher,
            data=data.arrays("train"),
            temperature=args.temperature,
            alpha=args.alpha,
            epochs=epochs,
            batch_size=config["batch_size"],
            optimizer=optimizer,
            validation_data=validation,
            callbacks=progress.callbacks(epochs),
            verbose=progress.fit_verbose,
        )
    seconds = time.perf_counter() - started
    path = os.path.join(args.run_dir, STUDENT_FILE)
    student.save(path)
    probs = predict_split([student], data, "test")[0]
    scores = metrics.evaluate_predictions(probs, data.labels("test"))
    with open(report_path) as f:
        report = json.load(f)
    report["test"]["student"] = scores
    report["student"] = {
        "file": STUDENT_FILE,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "epochs": epochs,
        "train_seconds": round(seconds, 2),
    }
    report_lib.write_report(args.run_dir, report)
    print(
        f"Student: {100 * scores['error']:.2f}% test error, NLL "
        f"{scores['nll']:.4f} (ensemble: "
        f"{100 * report['test']['last_m'][-1]['error']:.2f}%).\n"
        f"Saved: {path}"
    )
    return 0
