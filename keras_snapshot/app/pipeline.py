"""The training steps of `keras-snapshot train`, with or without FreezeOut.

In order: `run_config`, `check_model`, `start_run` (and `record_data`),
`get_strategy`, `train_model`, `train_baseline`. A snapshot run
(`train.py`) and a FreezeOut run (`freezeout_job.py`) differ only in the
method's callbacks.
"""

import math
import os
import shutil
import time

import keras
import numpy as np

from keras_snapshot import _fs
from keras_snapshot._steps import optimizer_updates
from keras_snapshot.app import distribute
from keras_snapshot.app import run as run_lib
from keras_snapshot.app.models import MODELS
from keras_snapshot.app.models import get_model


def run_config(args) -> dict:
    """The settings for `run.json` from the parsed `train` arguments,
    checked before any work (`UsageError`)."""
    if args.data is not None and args.dataset is not None:
        raise run_lib.UsageError(
            f"--data {args.data} and --dataset {args.dataset} both name the "
            "data; give one: --data for a folder or .npz file, --dataset "
            "for a bundled or tensorflow-datasets name."
        )
    if args.data is None and args.dataset is None:
        args.dataset = DEFAULT_DATASET
    if args.dataset is not None and os.path.exists(args.dataset):
        raise run_lib.UsageError(
            f"--dataset takes a name and {args.dataset} is a path; pass it "
            f"with --data {args.dataset}."
        )
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
        if key != "data"
    }
    config["data"] = None if args.data is None else os.path.abspath(args.data)
    if args.model not in MODELS:  # A file: found again from any folder.
        config["model"] = os.path.abspath(args.model)
    config["output_dir"] = args.output_dir or default_run_dir(args)
    config["pixel_max"] = model_pixel_max(args.model)
    return config


# Layers that keep the pixel values' scale: skipped to find the first
# layer that uses the values.
_SCALE_KEEPING_LAYERS = (
    keras.layers.InputLayer,
    keras.layers.Identity,
    keras.layers.Resizing,
    keras.layers.CenterCrop,
    keras.layers.RandomCrop,
    keras.layers.RandomFlip,
    keras.layers.RandomRotation,
    keras.layers.RandomTranslation,
    keras.layers.RandomZoom,
    keras.layers.RandomContrast,
    keras.layers.RandomBrightness,
)


def _flat_layers(model):
    """The layers of `model` in order, those of nested models in place."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer)
        else:
            yield layer


def input_scaling_layer(model):
    """The layer that scales the model's 0-255 input first thing, or None.

    The pixel-scale rule: past scale-keeping layers (also in nested
    models), the first layer is a `Rescaling` with |scale| <= 0.05 (1/255,
    1/127.5) or a `Normalization` with a mean above 2.
    """
    for layer in _flat_layers(model):
        if not isinstance(layer, _SCALE_KEEPING_LAYERS):
            return layer if _expects_0_255(layer) else None
    return None


def _expects_0_255(layer) -> bool:
    if isinstance(layer, keras.layers.Rescaling):
        scale = np.abs(np.asarray(layer.scale, dtype="float64"))
        return bool(scale.size) and bool(np.all(scale <= 0.05))
    if isinstance(layer, keras.layers.Normalization):
        mean = getattr(layer, "mean", None)
        if mean is None:
            mean = getattr(layer, "input_mean", None)
        if mean is None:
            return False
        mean = np.asarray(keras.ops.convert_to_numpy(mean), dtype="float64")
        return bool(np.any(mean > 2))
    return False


def model_pixel_max(name: str) -> int:
    """255 for a `.keras` model that scales its own input
    (`input_scaling_layer`), else 1."""
    if name in MODELS or not os.path.isfile(name):
        return 1
    try:
        model = keras.saving.load_model(name, compile=False)
    except Exception:  # `check_model` reports it in one line.
        return 1
    return 255 if input_scaling_layer(model) is not None else 1


DEFAULT_DATASET = "fashion_mnist_small"


def _stem(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    return (
        os.path.splitext(name)[0] if name.endswith((".keras", ".npz")) else name
    )


def default_run_dir(args) -> str:
    """`runs/<data>_<model>[_<method>|_freezeout]_seed<seed>`, with file
    stems for `--data` and a `.keras` model; `snapshot` adds no suffix."""
    data = _stem(args.data) if args.data else args.dataset or DEFAULT_DATASET
    kind = ""
    if args.freezeout:
        kind = "_freezeout"
    elif args.method != "snapshot":
        kind = f"_{args.method}"
    return os.path.join(
        "runs", f"{data}_{_stem(args.model)}{kind}_seed{args.seed}"
    )


def check_model(config: dict, data):
    """The run's model, built to check that it fits the data.

    A job calls this before anything is recorded, so that a model of the
    wrong shape (or a `.keras` file that does not load) is refused in one
    line, with no run folder left behind.

    Returns:
        The uncompiled model.

    Raises:
        UsageError: if the model cannot be built for `data`.
    """
    name = config["model"]
    with run_lib.as_usage_error():
        try:
            model = get_model(name, data.input_shape, data.num_classes)
        except ValueError as e:
            if name not in MODELS:
                raise
            shape = "x".join(str(d) for d in data.input_shape)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(
                f"The model {name} cannot be built for images of {shape} "
                f"({first}); its pooling needs larger images: pass "
                "--image-size HxW (e.g. 32x32) for a folder of images, or "
                "another --model."
            ) from e
    output_is_probabilities(model, name)
    return model


def output_is_probabilities(model, name: str) -> bool:
    """Whether the model's output is probabilities (softmax) or logits.

    Decides the loss: `sparse_categorical_crossentropy` on probabilities,
    the same `from_logits=True` on a linear output.

    Raises:
        UsageError: for a model whose output layer is neither softmax nor
            linear (a sigmoid, say), naming the layer. (`get_model` refuses
            a model with several outputs.)
    """
    from keras_snapshot.ensemble import declares_probabilities

    declared = declares_probabilities(model)
    if declared is None:
        last = model.layers[-1]
        activation = getattr(last, "activation", None)
        kind = getattr(activation, "__name__", type(last).__name__)
        raise run_lib.UsageError(
            f"the output layer {last.name!r} of the model {name} has a "
            f"{kind} activation: make it softmax (probabilities) or linear "
            "(logits)."
        )
    return declared


def start_run(config: dict, overwrite: bool) -> dict:
    """Locks `config["output_dir"]` and returns its run, new or resumed.

    The lock is held until the command ends (`cli.main` releases it); see
    `run.start_or_resume` for what resuming accepts.
    """
    run_lib.lock_run_dir(config["output_dir"])
    run = run_lib.start_or_resume(config, overwrite=overwrite)
    trained_on = run["config"].get("pixel_max", 1)
    if trained_on != config["pixel_max"]:
        raise run_lib.UsageError(
            f"{config['output_dir']} was trained with pixel values in [0, "
            f"{trained_on}], but the model file {config['model']} now takes "
            f"[0, {config['pixel_max']}] (its first layer changed); start "
            "over with --overwrite, or use another --output-dir."
        )
    return run


def record_data(run: dict, run_dir: str, data):
    """Writes the data's classes and fingerprint in `run.json`, once.

    A run recorded already keeps what it has: the warning of
    `data_warning` (or None) says whether the data changed since.
    """
    if "data_fingerprint" in run:
        return data_warning(run, data)
    run["classes"] = list(data.classes)
    run["data_fingerprint"] = data.fingerprint()
    run_lib.write_run(run_dir, run)
    return None


def data_warning(
    run: dict, data, effect: str = "the scores are on it as it is now"
):
    """One line saying what changed in the data since training, or None.

    Compares `data.fingerprint()` with the run's `data_fingerprint`
    (`datasets.fingerprint_changes`); a run that has none is not checked.
    `effect` ends the line: what the command does with the new data.
    """
    from keras_snapshot.app.datasets import fingerprint_changes

    recorded = run.get("data_fingerprint")
    if not recorded:
        return None
    changes = fingerprint_changes(recorded, data.fingerprint())
    if not changes:
        return None
    return (
        f"Warning: the data {run_lib.data_source(run['config'])} has changed "
        f"since training ({'; '.join(changes)}): {effect}."
    )


def get_strategy(name: str):
    """The distribution called `name` (`distribute.get_strategy`).

    Raises:
        UsageError: for a strategy this backend or machine cannot run.
    """
    with run_lib.as_usage_error():
        return distribute.get_strategy(name)


def compiled_model(config: dict, data, learning_rate, strategy):
    """The model, compiled with SGD; weight decay is applied here only.

    `--weight-decay` is the optimizer's decoupled weight decay: each step
    multiplies the weights by `1 - learning_rate * weight_decay`. The
    models add no kernel regularizer, so the decay is applied once.

    Args:
        config: The run's settings (`train.run_config`).
        data: The run's `Dataset`.
        learning_rate: A float or a Keras learning-rate schedule.
        strategy: The distribution whose scope builds the model.

    Returns:
        The compiled `keras.Model`.
    """
    with strategy.scope():
        model = get_model(config["model"], data.input_shape, data.num_classes)
        from_logits = not output_is_probabilities(model, config["model"])
        model.compile(
            optimizer=keras.optimizers.SGD(
                learning_rate=learning_rate,
                momentum=config["momentum"],
                weight_decay=config["weight_decay"] or None,
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=from_logits
            ),
            metrics=["accuracy"],
        )
    return model


def fit(model, data, config: dict, callbacks: list, progress) -> None:
    """`model.fit` over the run's epochs, shuffled and augmented as set.

    `progress` (a `CommandProgress`) sets `fit`'s verbosity and adds the
    callback of the command's progress bar.
    """
    train = data.batches(
        "train",
        config["batch_size"],
        shuffle=True,
        augment=config["augment"],
        seed=config["seed"],
    )
    validation = None
    if data.count("val"):
        validation = data.batches("val", max(256, config["batch_size"]))
    model.fit(
        train,
        epochs=config["epochs"],
        validation_data=validation,
        callbacks=[*callbacks, *progress.callbacks(config["epochs"])],
        verbose=progress.fit_verbose,
        shuffle=False,  # The tf.data pipeline shuffles every epoch.
    )


class StopOnDivergence(keras.callbacks.Callback):
    """Stops after the first epoch whose loss is NaN or infinite.

    An epoch hook, so that Keras's asynchronous batch dispatch stays on.
    The `UsageError` it raises says how to start again; the snapshots
    taken so far stay on disk.
    """

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = optimizer_updates(self.model)
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


def check_backup(model, backup_dir: str) -> None:
    """Makes an unreadable backup harmless before `fit` reads it.

    Tries both copies; when neither loads, the backup is moved aside and
    training restarts from step 0 (snapshots are set aside, not deleted).
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


def _save_model(model, path: str) -> None:
    """Saves `model` to `path` whole or not at all (`_fs.atomic_write`)."""
    with _fs.atomic_write(path) as local_path:
        model.save(local_path)


def train_model(
    run: dict,
    config: dict,
    data,
    learning_rate,
    callbacks: list,
    strategy,
    progress,
    model_file: str | None = None,
) -> float:
    """Trains the run's model, or resumes it; returns the training time.

    The callbacks run between `BackupAndRestore` and `StopOnDivergence`.

    Args:
        run: The run (`start_run`); its status and `train_seconds` are
            updated and written.
        config: The run's settings.
        data: The run's `Dataset`.
        learning_rate: The optimizer's rate: a float or a Keras schedule.
        callbacks: The method's callbacks (`SnapshotCheckpoint`,
            `FreezeOut`, ...).
        strategy: The distribution (`get_strategy`).
        progress: The command's `CommandProgress`: `fit`'s verbosity and
            progress bar.
        model_file: A file name in the run folder to save the trained
            model to, or None (the callbacks save what the method keeps).

    Returns:
        The seconds spent in `fit`, over all the sessions of the run.
    """
    run_dir = config["output_dir"]
    if not run_lib.start_training(run, run_dir):
        progress.skip(config["epochs"])
        return run.get("train_seconds", 0.0)
    keras.utils.set_random_seed(config["seed"])
    model = compiled_model(config, data, learning_rate, strategy)
    backup_dir = os.path.join(run_dir, run_lib.BACKUP_DIR)
    check_backup(model, backup_dir)
    callbacks = [
        # Two backups: Keras falls back to the older one if the newer one
        # was cut short by a kill.
        keras.callbacks.BackupAndRestore(backup_dir, double_checkpoint=True),
        *callbacks,
        StopOnDivergence(),
    ]
    started = time.perf_counter()
    fit(model, data, config, callbacks, progress)
    seconds = run.get("train_seconds", 0.0) + time.perf_counter() - started
    if model_file is not None:
        _save_model(model, os.path.join(run_dir, model_file))
    run.update(status="trained", train_seconds=seconds)
    run_lib.write_run(run_dir, run)
    return seconds


def train_baseline(
    run: dict, config: dict, data, total_steps: int, strategy, progress
):
    """A single model with one cosine decay of `--lr` over the same budget.

    Saved once as `run.BASELINE_FILE`, after its time is in `run.json`.
    Returns that time, or None for a baseline of an older version.
    """
    run_dir = config["output_dir"]
    path = os.path.join(run_dir, run_lib.BASELINE_FILE)
    if os.path.isfile(path):
        return run.get("baseline_train_seconds")
    keras.utils.set_random_seed(config["seed"])
    decay = keras.optimizers.schedules.CosineDecay(
        config["learning_rate"], total_steps
    )
    model = compiled_model(config, data, decay, strategy)
    print("Training the baseline single model (one cosine decay) ...")
    started = time.perf_counter()
    fit(model, data, config, [], progress)
    seconds = time.perf_counter() - started
    run["baseline_train_seconds"] = seconds
    run_lib.write_run(run_dir, run)
    _save_model(model, path)
    return seconds


def versions() -> dict:
    """The Keras version and backend, for `report.json`."""
    return {"keras": keras.__version__, "backend": keras.backend.backend()}
