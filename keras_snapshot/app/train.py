"""`keras-snapshot train`: train, evaluate, export and report, in that order.

`train_command` reads top to bottom as the job it runs; each step is a
function here or in `evaluate`, `export` and `report`, which the `evaluate`
and `export` commands reuse.
"""

import math
import os
import shutil
import time

import keras

from keras_snapshot import SnapshotCheckpoint
from keras_snapshot.app import methods as methods_lib
from keras_snapshot.app import report as report_lib
from keras_snapshot.app import run as run_lib
from keras_snapshot.app.evaluate import choose_ensembles
from keras_snapshot.app.evaluate import compare_singles
from keras_snapshot.app.evaluate import evaluate_run
from keras_snapshot.app.export import chosen_snapshots
from keras_snapshot.app.export import export_files
from keras_snapshot.app.models import MODELS
from keras_snapshot.app.models import get_model

_RECALIBRATION_SAMPLES = 10000


def run_config(args) -> dict:
    """The run's settings from the command line, checked before any work."""
    looks_like_a_path = args.model.endswith(".keras") or os.sep in args.model
    if args.model not in MODELS and looks_like_a_path:
        if not os.path.isfile(args.model):
            raise run_lib.UsageError(
                f"the model file {args.model} does not exist; give the path "
                "of a saved .keras model, or a model name: "
                f"{', '.join(MODELS)}."
            )
    elif args.model not in MODELS:
        raise run_lib.UsageError(
            f"unknown model {args.model!r}: choose one of "
            f"{', '.join(MODELS)}, or give the path of a .keras file."
        )
    if args.output_dir is not None and not args.output_dir.strip():
        raise run_lib.UsageError(
            "--output-dir is empty; give a folder, or leave the option out "
            "for runs/<dataset>_<model>_seed<seed>."
        )
    if args.temperature_scaling and args.validation_fraction == 0:
        raise run_lib.UsageError(
            "--temperature-scaling is fitted on the validation split; use a "
            "--validation-fraction above 0."
        )
    config = {
        key: getattr(args, key)
        for key in run_lib.RUN_KEYS
        + ("data_dir", "select", "baseline", "strategy", "output_dir")
    }
    config["method"] = getattr(args, "method", "snapshot")
    config["output_dir"] = args.output_dir or os.path.join(
        "runs", f"{args.dataset}_{os.path.basename(args.model)}_seed{args.seed}"
    )
    return config


def _strategy(name: str):
    if name == "default":
        import tensorflow as tf

        return tf.distribute.get_strategy()
    from keras_snapshot.app.distribute import get_strategy

    return get_strategy(name)


def _compiled_model(config, data, learning_rate, strategy):
    """The model, compiled with SGD; weight decay is applied here only.

    `--weight-decay` is the optimizer's decoupled weight decay: each step
    multiplies the weights by `1 - learning_rate * weight_decay`. The
    models add no kernel regularizer, so the decay is applied once.
    """
    with strategy.scope():
        model = get_model(config["model"], data.input_shape, data.num_classes)
        model.compile(
            optimizer=keras.optimizers.SGD(
                learning_rate=learning_rate,
                momentum=config["momentum"],
                weight_decay=config["weight_decay"] or None,
            ),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    return model


def _fit(model, data, config, callbacks, verbose):
    from keras_snapshot.app.datasets import make_dataset

    train = make_dataset(
        data.x_train,
        data.y_train,
        config["batch_size"],
        shuffle=True,
        augment=config["augment"],
        seed=config["seed"],
    )
    validation = None
    if len(data.x_val):
        validation = make_dataset(
            data.x_val, data.y_val, max(256, config["batch_size"])
        )
    model.fit(
        train,
        epochs=config["epochs"],
        validation_data=validation,
        callbacks=callbacks,
        verbose=verbose,
        shuffle=False,  # The tf.data pipeline shuffles every epoch.
    )


class _Diverged(keras.callbacks.Callback):
    """Stops after the first epoch whose loss is NaN or infinite.

    An epoch hook, so that Keras's asynchronous batch dispatch stays on.
    """

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = int(
                keras.ops.convert_to_numpy(self.model.optimizer.iterations)
            )
            raise run_lib.UsageError(
                f"training diverged: the loss is {float(loss)} at step {step}."
                " Lower --lr (or --weight-decay) and start again with "
                "--overwrite; the snapshots taken so far are kept in "
                "snapshots/ until then."
            )


def _loads(model, path: str) -> bool:
    try:
        model.load_weights(path)
    except (OSError, ValueError):
        return False
    return True


def _check_backup(model, backup_dir: str) -> None:
    """Makes an unreadable backup harmless before `fit` reads it.

    A kill while `BackupAndRestore` writes can leave a backup that does not
    load. Keras falls back to its older copy (`double_checkpoint`) only for
    some errors; here both copies are tried, and when neither loads the
    backup is moved aside and training starts again from step 0. The
    snapshots are never deleted: `SnapshotCheckpoint` sets those from later
    steps aside in `snapshots/superseded-*`.
    """
    latest = os.path.join(backup_dir, "latest.weights.h5")
    if not os.path.exists(latest):
        return
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    if _loads(model, latest):
        return
    if os.path.exists(latest + ".bkp"):
        # Keras reads weights only from a `.weights.h5` name: put the older
        # copy (and its epoch) in place of the newer one, then try it.
        for name in ("latest.weights.h5", "training_metadata.json"):
            older = os.path.join(backup_dir, name + ".bkp")
            if os.path.exists(older):
                shutil.copyfile(older, os.path.join(backup_dir, name))
        if _loads(model, latest):
            print("The last backup was cut short; resuming from the one before")
            return
    aside = f"{backup_dir}-unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(backup_dir, aside)
    print(
        f"The training backup does not load (moved to {aside}); training "
        "starts again from step 0, and earlier snapshots are set aside, "
        "not deleted."
    )


def train_snapshots(run, config, data, schedule, strategy, verbose) -> float:
    """Trains with snapshots, or resumes; returns the total training time.

    `run.json` records the status, so that a run killed during training
    resumes from its last backup and a finished one is not trained again.
    """
    run_dir = config["output_dir"]
    if not run_lib.start_training(run, run_dir):
        return run.get("train_seconds", 0.0)

    keras.utils.set_random_seed(config["seed"])
    model = _compiled_model(
        config, data, methods_lib.optimizer_schedule(schedule), strategy
    )
    _check_backup(model, os.path.join(run_dir, run_lib.BACKUP_DIR))
    recalibration = None
    if config["recalibrate_bn"]:
        recalibration = data.x_train[:_RECALIBRATION_SAMPLES]
    callbacks = [
        # Two backups: Keras falls back to the older one if the newer one
        # was cut short by a kill.
        keras.callbacks.BackupAndRestore(
            os.path.join(run_dir, run_lib.BACKUP_DIR), double_checkpoint=True
        ),
        SnapshotCheckpoint(
            os.path.join(run_dir, run_lib.SNAPSHOT_DIR),
            recalibration_data=recalibration,
            verbose=1 if verbose else 0,
            **methods_lib.snapshot_kwargs(schedule),
        ),
    ] + methods_lib.extra_callbacks(schedule, run_dir, recalibration)
    started = time.perf_counter()
    _fit(model, data, config, callbacks + [_Diverged()], verbose)
    seconds = run.get("train_seconds", 0.0) + time.perf_counter() - started
    run.update(status="trained", train_seconds=seconds)
    run_lib.write_run(run_dir, run)
    return seconds


def train_baseline(config, data, schedule, strategy, verbose) -> None:
    """A single model with one cosine decay over the same budget."""
    path = os.path.join(config["output_dir"], run_lib.BASELINE_FILE)
    if os.path.isfile(path):
        return
    keras.utils.set_random_seed(config["seed"])
    decay = keras.optimizers.schedules.CosineDecay(
        config["learning_rate"], schedule.total_steps
    )
    model = _compiled_model(config, data, decay, strategy)
    print("Training the baseline single model (one cosine decay) ...")
    _fit(model, data, config, [], verbose)
    model.save(path)


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
    if getattr(args, "freezeout", False):
        from keras_snapshot.app.freezeout_job import freezeout_command

        return freezeout_command(args)
    config = run_config(args)
    data = run_lib.load_data(config, args.data_dir)
    # Checks M against the budget before anything is written.
    schedule = methods_lib.make_schedule(config, data)
    methods_lib.check_resume(config)
    # The model must fit the data before a run is recorded.
    get_model(config["model"], data.input_shape, data.num_classes)
    run_lib.lock_run_dir(config["output_dir"])  # Until the command ends.
    run = run_lib.start_or_resume(config, overwrite=args.overwrite)
    run_dir = config["output_dir"]
    strategy = _strategy(args.strategy)
    print(report_lib.plan(run_dir, data, schedule, config))

    train_seconds = train_snapshots(
        run, config, data, schedule, strategy, args.verbose
    )
    if args.baseline:
        train_baseline(config, data, schedule, strategy, args.verbose)

    scores, probs = evaluate_run(run_dir, data)
    choices = None
    if "val" in probs:
        choices = choose_ensembles(
            probs["val"], data.y_val, probs["test"], data.y_test
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
            data.y_test,
            weights,
            temperature,
            probs.get("baseline", {}).get("test"),
        )
    )
    snapshots, weights = chosen_snapshots(run_dir, weights)
    snapshots, weights = methods_lib.exported_members(
        config, run_dir, snapshots, weights
    )
    export_files(run_dir, snapshots, weights, temperature)

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
        "versions": {
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
        },
    }
    report_lib.write_run_report(run_dir, report, schedule, probs, data.y_test)
    print("\n" + report_lib.summary_table(report))
    print("\n" + report_lib.verdict(report))
    print(
        f"\nReport: {os.path.join(run_dir, 'report.md')}\n"
        f"Ensemble: {os.path.join(run_dir, 'ensemble.keras')} and "
        f"{os.path.join(run_dir, 'saved_model')}"
    )
    return 0
