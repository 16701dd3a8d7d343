"""`keras-snapshot`: train, evaluate and export snapshot ensembles.

A front end over the public API. `keras-snapshot train` with no options
trains a small CNN on scikit-learn's bundled digits (no network needed),
saves a snapshot at the end of every learning-rate cycle, evaluates every
snapshot and every ensemble of the last m snapshots, exports the ensemble
(`.keras` and TensorFlow SavedModel) and writes a report with plots.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time

RUN_FILE = "run.json"
SNAPSHOT_DIR = "snapshots"
# Settings that define a run: resuming with other values is refused.
_RUN_KEYS = (
    "dataset",
    "model",
    "epochs",
    "num_snapshots",
    "learning_rate",
    "batch_size",
    "momentum",
    "weight_decay",
    "augment",
    "validation_fraction",
    "seed",
    "recalibrate_bn",
)
_RECALIBRATION_SAMPLES = 10000


class UsageError(Exception):
    """A mistake in the command line: reported in one line, exit code 2."""


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, received {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, received {value}"
        )
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number, received {text!r}"
        ) from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a finite positive number, received {text}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-snapshot",
        description="Snapshot Ensembles for Keras (Huang et al. 2017, "
        "arXiv:1704.00109): train 1, get M for free.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train with snapshots, evaluate, export and report",
        description="Train one model with a cyclic cosine learning rate, "
        "save a snapshot per cycle, evaluate the snapshots and their "
        "ensembles, export the ensemble and write a report. Running the "
        "same command again on the same --output-dir resumes an "
        "interrupted run.",
    )
    train.add_argument(
        "--dataset",
        default="digits",
        help="'digits' (scikit-learn's bundled 8x8 digits, the default), "
        "'fashion_mnist_local' (Debian's dataset-fashion-mnist files) or "
        "any tensorflow-datasets image classification name (cifar10, ...)",
    )
    train.add_argument("--data-dir", help="tensorflow-datasets data directory")
    train.add_argument(
        "--model",
        default="small_cnn",
        help="small_cnn (default), resnet20, resnet56, resnet110, "
        "densenet40, wrn32_4, or a path to a .keras model file",
    )
    train.add_argument("--epochs", type=_positive_int, default=40)
    train.add_argument(
        "--snapshots",
        dest="num_snapshots",
        type=_positive_int,
        default=4,
        help="number of cycles and snapshots M (default 4)",
    )
    train.add_argument(
        "--lr",
        dest="learning_rate",
        type=_positive_float,
        default=0.2,
        help="initial learning rate of every cycle (default 0.2)",
    )
    train.add_argument("--batch-size", type=_positive_int, default=32)
    train.add_argument("--momentum", type=float, default=0.9)
    train.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="decoupled weight decay of the SGD optimizer",
    )
    train.add_argument(
        "--augment",
        action="store_true",
        help="random crop with 4-pixel padding and horizontal flip "
        "(the paper's CIFAR/SVHN augmentation)",
    )
    train.add_argument("--validation-fraction", type=float, default=0.1)
    train.add_argument(
        "--no-recalibrate-bn",
        dest="recalibrate_bn",
        action="store_false",
        help="save snapshots with their BatchNorm moving averages as they "
        "are instead of recomputing them on training data",
    )
    train.add_argument(
        "--select",
        choices=("all", "last_m", "greedy"),
        default="all",
        help="which ensemble to export: all snapshots (default), the best "
        "last m, or greedy weights, chosen on the validation split",
    )
    train.add_argument(
        "--temperature-scaling",
        action="store_true",
        help="calibrate the exported ensemble with a temperature fitted on "
        "the validation split",
    )
    train.add_argument(
        "--baseline",
        action="store_true",
        help="also train a single model with one cosine decay on the same "
        "budget, for comparison",
    )
    train.add_argument(
        "--strategy",
        default="default",
        choices=("default", "mirrored", "multiworker", "tpu"),
        help="tf.distribute strategy",
    )
    train.add_argument(
        "--output-dir",
        help="run directory (default runs/<dataset>_<model>_seed<seed>)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an existing run directory instead of resuming it",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))

    evaluate = commands.add_parser(
        "evaluate",
        help="re-evaluate a run's snapshots and ensembles",
    )
    evaluate.add_argument("run_dir")
    evaluate.add_argument(
        "--split", choices=("test", "val", "train"), default="test"
    )
    evaluate.add_argument("--data-dir")

    export = commands.add_parser(
        "export", help="build an ensemble from a run and export it"
    )
    export.add_argument("run_dir")
    export.add_argument("output")
    export.add_argument("--last", type=_positive_int)
    export.add_argument(
        "--select",
        choices=("all", "last_m", "greedy"),
        default="all",
        help="chosen on the run's validation split",
    )
    export.add_argument("--data-dir")
    for sub in (train, evaluate, export):
        sub.add_argument(
            "--debug",
            action="store_true",
            help="show full tracebacks for errors",
        )
    return parser


# Helpers -------------------------------------------------------------------


def _ensure_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UsageError(
            f"cannot write to the output directory {directory}: "
            f"{e.strerror or e}. Choose a writable --output-dir."
        ) from None


def _read_run(run_dir: str) -> dict:
    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(path):
        raise UsageError(
            f"{run_dir} is not a keras-snapshot run directory (no {RUN_FILE});"
            " create one with `keras-snapshot train --output-dir ...`."
        )
    with open(path) as f:
        return json.load(f)


def _write_run(run_dir: str, run: dict) -> None:
    from keras_snapshot.manifest import write_json_atomic

    write_json_atomic(os.path.join(run_dir, RUN_FILE), run)


def _load_data(config: dict, data_dir=None):
    from keras_snapshot.app.datasets import load_dataset

    return load_dataset(
        config["dataset"],
        data_dir=data_dir,
        validation_fraction=config["validation_fraction"],
        seed=config["seed"],
    )


def _split(data, name: str):
    x, y = {
        "train": (data.x_train, data.y_train),
        "val": (data.x_val, data.y_val),
        "test": (data.x_test, data.y_test),
    }[name]
    if len(x) == 0:
        raise UsageError(
            f"the {name} split of {data.name} is empty; choose another split "
            "or a --validation-fraction above 0."
        )
    return x, y


def _strategy(name: str):
    if name == "default":
        import tensorflow as tf

        return tf.distribute.get_strategy()
    from keras_snapshot.app.distribute import get_strategy

    return get_strategy(name)


def _compile(model, schedule, config):
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate=schedule,
            momentum=config["momentum"],
            weight_decay=config["weight_decay"] or None,
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


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


# train ---------------------------------------------------------------------


def _start_or_resume(args, config: dict) -> dict:
    run_dir = config["output_dir"]
    if args.overwrite and os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    if os.path.isfile(os.path.join(run_dir, RUN_FILE)):
        run = _read_run(run_dir)
        differ = [
            f"{key}: {run['config'].get(key)!r} != {config[key]!r}"
            for key in _RUN_KEYS
            if run["config"].get(key) != config[key]
        ]
        if differ:
            raise UsageError(
                f"{run_dir} holds a run with other settings ("
                + "; ".join(differ)
                + "). Use another --output-dir, or --overwrite to start over."
            )
        return run
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        raise UsageError(
            f"the output directory {run_dir} exists and is not a "
            "keras-snapshot run; choose another --output-dir."
        )
    _ensure_writable(run_dir)
    run = {"config": config, "status": "new"}
    _write_run(run_dir, run)
    return run


def _train_snapshots(config, data, strategy, verbose) -> float:
    import keras

    from keras_snapshot import SnapshotCheckpoint
    from keras_snapshot import SnapshotSchedule
    from keras_snapshot.app.models import get_model

    run_dir = config["output_dir"]
    keras.utils.set_random_seed(config["seed"])
    steps = -(-len(data.x_train) // config["batch_size"])
    schedule = SnapshotSchedule.from_epochs(
        config["learning_rate"],
        config["epochs"],
        steps,
        config["num_snapshots"],
    )
    with strategy.scope():
        model = get_model(config["model"], data.input_shape, data.num_classes)
        _compile(model, schedule, config)
    recalibration = None
    if config["recalibrate_bn"]:
        recalibration = data.x_train[:_RECALIBRATION_SAMPLES]
    callbacks = [
        keras.callbacks.BackupAndRestore(os.path.join(run_dir, "backup")),
        SnapshotCheckpoint(
            os.path.join(run_dir, SNAPSHOT_DIR),
            recalibration_data=recalibration,
            verbose=1 if verbose else 0,
        ),
    ]
    started = time.perf_counter()
    _fit(model, data, config, callbacks, verbose)
    return time.perf_counter() - started


def _train_baseline(config, data, strategy, verbose) -> None:
    """A single model with one cosine decay over the same budget."""
    import keras

    from keras_snapshot.app.models import get_model

    path = os.path.join(config["output_dir"], "baseline.keras")
    if os.path.isfile(path):
        return
    keras.utils.set_random_seed(config["seed"])
    steps = -(-len(data.x_train) // config["batch_size"])
    schedule = keras.optimizers.schedules.CosineDecay(
        config["learning_rate"], config["epochs"] * steps
    )
    with strategy.scope():
        model = get_model(config["model"], data.input_shape, data.num_classes)
        _compile(model, schedule, config)
    print("Training the baseline single model (one cosine decay) ...")
    _fit(model, data, config, [], verbose)
    model.save(path)


def _predictions(members, x):
    from keras_snapshot.selection import predict_members

    return predict_members(members, x)


def _evaluate_run(run_dir: str, data, splits=("val", "test")) -> dict:
    import keras

    from keras_snapshot import load_snapshots
    from keras_snapshot.app import report as report_lib

    members = load_snapshots(os.path.join(run_dir, SNAPSHOT_DIR))
    baseline_path = os.path.join(run_dir, "baseline.keras")
    baseline = None
    if os.path.isfile(baseline_path):
        baseline = keras.saving.load_model(baseline_path, compile=False)
    result, probs = {}, {}
    for split in splits:
        if split == "val" and len(data.x_val) == 0:
            continue
        x, y = _split(data, split)
        probs[split] = _predictions(members, x)
        single = None if baseline is None else _predictions([baseline], x)[0]
        result[split] = report_lib.evaluate_members(probs[split], y, single)
    return result, probs


def _export(output_dir, snapshots, weights, temperature=None):
    from keras_snapshot import build_ensemble
    from keras_snapshot import export_ensemble

    ensemble = build_ensemble(
        snapshots, weights=weights, temperature=temperature
    )
    os.makedirs(output_dir, exist_ok=True)
    ensemble.save(os.path.join(output_dir, "ensemble.keras"))
    export_ensemble(ensemble, os.path.join(output_dir, "saved_model"))
    return ensemble


def _chosen_snapshots(run_dir, choices, select):
    """Paths and weights of the ensemble named by `select`."""
    from keras_snapshot import snapshot_paths

    paths = snapshot_paths(os.path.join(run_dir, SNAPSHOT_DIR))
    if select == "all" or not choices:
        return paths, None
    weights = choices[select]["weights"]
    keep = [i for i, w in enumerate(weights) if w > 0]
    return [paths[i] for i in keep], [weights[i] for i in keep]


def train_command(args) -> int:
    import keras

    from keras_snapshot import SnapshotSchedule
    from keras_snapshot.app import report as report_lib
    from keras_snapshot.app.models import MODELS

    if args.model not in MODELS and not (
        args.model.endswith(".keras") and os.path.isfile(args.model)
    ):
        raise UsageError(
            f"unknown model {args.model!r}: choose one of "
            f"{', '.join(MODELS)}, or give the path of a .keras file."
        )
    if not 0 <= args.validation_fraction < 1:
        raise UsageError(
            "--validation-fraction must be in [0, 1), received "
            f"{args.validation_fraction}."
        )
    config = {
        key: getattr(args, key)
        for key in _RUN_KEYS
        + ("data_dir", "select", "baseline", "strategy", "output_dir")
    }
    config["output_dir"] = args.output_dir or os.path.join(
        "runs", f"{args.dataset}_{os.path.basename(args.model)}_seed{args.seed}"
    )
    data = _load_data(config, args.data_dir)
    steps = -(-len(data.x_train) // args.batch_size)
    # Checks M against the budget before anything is written.
    schedule = SnapshotSchedule.from_epochs(
        args.learning_rate, args.epochs, steps, args.num_snapshots
    )
    run = _start_or_resume(args, config)
    run_dir = config["output_dir"]
    strategy = _strategy(args.strategy)
    print(
        f"Run directory: {run_dir}\nData: {data.name}, "
        f"{len(data.x_train)} train / {len(data.x_val)} validation / "
        f"{len(data.x_test)} test images, {data.num_classes} classes\n"
        f"Schedule: {schedule.num_snapshots} cycles of "
        f"{schedule.cycle_length} steps ({schedule.total_steps} steps, "
        f"{args.epochs} epochs), snapshots after steps "
        f"{schedule.cycle_end_steps}"
    )
    if run["status"] == "trained":
        print("Training already finished; evaluating the saved snapshots.")
        train_seconds = run.get("train_seconds", 0.0)
    else:
        if run["status"] == "training":
            print("Resuming the interrupted run from its last backup.")
        run["status"] = "training"
        _write_run(run_dir, run)
        train_seconds = run.get("train_seconds", 0.0) + _train_snapshots(
            config, data, strategy, args.verbose
        )
        run.update(status="trained", train_seconds=train_seconds)
        _write_run(run_dir, run)
    if args.baseline:
        _train_baseline(config, data, strategy, args.verbose)

    evaluation, probs = _evaluate_run(run_dir, data)
    choices = None
    if "val" in probs:
        choices = report_lib.choose_ensembles(
            probs["val"], data.y_val, probs["test"], data.y_test
        )
    snapshots, weights = _chosen_snapshots(run_dir, choices, args.select)
    temperature = None
    if args.temperature_scaling:
        if not choices:
            raise UsageError(
                "--temperature-scaling is fitted on the validation split; "
                "use a --validation-fraction above 0."
            )
        temperature = choices[
            args.select if args.select != "all" else "uniform"
        ]["temperature"]
    _export(run_dir, snapshots, weights, temperature)
    report = {
        "config": config,
        "steps": schedule.total_steps,
        "cycle_end_steps": schedule.cycle_end_steps,
        "train_seconds": round(train_seconds, 2),
        "test": evaluation["test"],
        "validation": evaluation.get("val"),
        "choices": choices,
        "exported": {
            "choice": args.select,
            "members": len(snapshots),
            "temperature": temperature,
        },
        "versions": {
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
        },
    }
    report_lib.write_report(run_dir, report)
    report_lib.plot_learning_rate(
        schedule, os.path.join(run_dir, "learning_rate.png")
    )
    report_lib.plot_error_vs_snapshots(
        evaluation["test"], os.path.join(run_dir, "error_vs_snapshots.png")
    )
    test_probs = probs["test"]
    report_lib.plot_reliability(
        test_probs[-1],
        test_probs.mean(axis=0),
        data.y_test,
        os.path.join(run_dir, "reliability.png"),
    )
    report_lib.plot_disagreement(
        evaluation["test"]["disagreement"],
        os.path.join(run_dir, "disagreement.png"),
    )
    print("\n" + report_lib.summary_table(report))
    print("\n" + report_lib._verdict(report))
    print(
        f"\nReport: {os.path.join(run_dir, 'report.md')}\n"
        f"Ensemble: {os.path.join(run_dir, 'ensemble.keras')} and "
        f"{os.path.join(run_dir, 'saved_model')}"
    )
    return 0


# evaluate and export -----------------------------------------------------


def evaluate_command(args) -> int:
    from keras_snapshot.app import report as report_lib

    run = _read_run(args.run_dir)
    data = _load_data(run["config"], args.data_dir)
    evaluation, _ = _evaluate_run(args.run_dir, data, splits=(args.split,))
    result = evaluation[args.split]
    path = os.path.join(args.run_dir, f"evaluation_{args.split}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(
        report_lib.summary_table({"test": result}).replace(
            "test error", f"{args.split} error"
        )
    )
    print(f"\nWritten: {path}")
    return 0


def export_command(args) -> int:
    from keras_snapshot.app import report as report_lib

    run = _read_run(args.run_dir)
    snapshots, weights = _chosen_snapshots(args.run_dir, None, "all")
    if args.select != "all":
        data = _load_data(run["config"], args.data_dir)
        evaluation, probs = _evaluate_run(args.run_dir, data)
        if "val" not in probs:
            raise UsageError(
                "--select needs a validation split; this run has none."
            )
        choices = report_lib.choose_ensembles(
            probs["val"], data.y_val, probs["test"], data.y_test
        )
        snapshots, weights = _chosen_snapshots(
            args.run_dir, choices, args.select
        )
    if args.last is not None:
        if args.last > len(snapshots):
            raise UsageError(
                f"--last must be at most the number of snapshots "
                f"({len(snapshots)}), received {args.last}."
            )
        snapshots = snapshots[-args.last :]
        weights = None if weights is None else weights[-args.last :]
    _export(args.output, snapshots, weights)
    print(
        f"Exported an ensemble of {len(snapshots)} snapshots to "
        f"{os.path.join(args.output, 'ensemble.keras')} and "
        f"{os.path.join(args.output, 'saved_model')}"
    )
    return 0


_COMMANDS = {
    "train": train_command,
    "evaluate": evaluate_command,
    "export": export_command,
}


def main(argv=None) -> int:
    """Entry point of `keras-snapshot` and `python -m keras_snapshot`."""
    args = build_parser().parse_args(argv)
    # TensorFlow's Python warnings (e.g. retracing while predicting with
    # several snapshots) are noise on the command line.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:
        return _COMMANDS[args.command](args)
    except (
        UsageError,
        ValueError,
        TypeError,
        FileNotFoundError,
        PermissionError,
    ) as e:
        if args.debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"keras-snapshot {args.command}: error: {message or repr(e)}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            "\nInterrupted. Run the same command again to resume.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
