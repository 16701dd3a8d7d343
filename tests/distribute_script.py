"""Trains a tiny model with snapshots under a distribution, for tests.

`tests/test_distribute.py` and `tests/test_backends.py` run this script in
subprocesses: logical devices must be configured before TensorFlow or JAX
start, and several workers need several processes. It is not collected by
pytest (its name does not start with `test_`).

Usage:

    python tests/distribute_script.py mirrored OUTDIR
    python tests/distribute_script.py multiworker OUTDIR SNAPSHOT_DIR
    python tests/distribute_script.py multiworker_upstream OUTDIR
    python tests/distribute_script.py jax_data_parallel OUTDIR
    python tests/distribute_script.py jax_multiprocess OUTDIR SNAPSHOT_DIR \
        COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_INDEX
    python tests/distribute_script.py jax_single OUTDIR

- `mirrored`: `MirroredStrategy` over 2 logical CPU devices, and the same
  model (same initial weights) on one device with the same global batch,
  each with an EMA (`WeightAveraging`, validated with the average, saved by
  `AveragedModelCheckpoint`). Writes the snapshot directories
  `OUTDIR/mirrored` and `OUTDIR/single`, and the EMA files beside them
  (`OUTDIR/mirrored-ema.keras`...).
- `multiworker`: one worker of a `MultiWorkerMirroredStrategy` cluster
  described by `TF_CONFIG`, with the public-API workaround of
  `_multiworker_model`; every worker is given the same `SNAPSHOT_DIR`.
  Two runs in that directory: the second starts again at step 0, so every
  snapshot of the first is stale and retaken, and trains one epoch past
  the schedule's budget. Its chief starts late, so the other worker reads
  the manifest while it still lists the stale snapshots.
- `multiworker_upstream`: plain Keras `fit` under that strategy, recording
  the error Keras raises (keras-team/keras#20585).
- `jax_data_parallel`: `get_strategy("data_parallel")`
  (`keras.distribution.DataParallel`) over the CPU devices JAX sees (2 with
  `XLA_FLAGS=--xla_force_host_platform_device_count=2`). Writes the
  snapshot directory `OUTDIR/snapshots`.
- `jax_multiprocess`: one of NUM_PROCESSES JAX processes joined by
  `keras.distribution.initialize`, training one model with `DataParallel`.
- `jax_single`: the same training in one JAX process, for reference.

Every mode writes `OUTDIR/result.json` (`OUTDIR/worker-INDEX.json` for
`multiworker*`, `OUTDIR/process-INDEX.json` and `OUTDIR/single.json` for
the `jax_multiprocess` and `jax_single`) with the steps each callback saved
at. The writer prints one line `Snapshot K/M saved at step S ...` per
snapshot it writes.
"""

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# 96 samples, global batch 8: 12 steps per epoch. 2 epochs = 24 steps and 3
# snapshots, at steps 8 (in the first epoch), 16 (mid-epoch) and 24 (end).
SAMPLES = 96
BATCH_SIZE = 8
EPOCHS = 2
SNAPSHOTS = 3


def _recording_checkpoint(directory, late_chief_seconds=0.0):
    """A `SnapshotCheckpoint` that records the steps it saves at.

    With `late_chief_seconds`, the chief sleeps before its first epoch
    begins, which is when it removes stale snapshots from the manifest.
    """
    import keras_snapshot

    class RecordingCheckpoint(keras_snapshot.SnapshotCheckpoint):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 0 and self._writer:
                time.sleep(late_chief_seconds)
            super().on_epoch_begin(epoch, logs)

        def _save_snapshot(self, step, batch, logs):
            super()._save_snapshot(step, batch, logs)
            self.saved_steps.append(step)

    callback = RecordingCheckpoint(directory, verbose=1)
    callback.saved_steps = []
    return callback


def _train(
    directory,
    model,
    epochs=EPOCHS,
    late_chief_seconds=0.0,
    after_compile=None,
    averaging=False,
):
    """Compiles and fits `model` with snapshots; returns the callback.

    With `averaging`, also an EMA validated with the average, saved at each
    epoch end (`AveragedModelCheckpoint`, `directory-ema-{epoch}.keras`)
    and at the end (`directory-ema.keras`); returns the History too.
    """
    from helpers import compile_with_schedule
    from helpers import make_data

    x, y = make_data(n=SAMPLES)
    compile_with_schedule(model, EPOCHS * (SAMPLES // BATCH_SIZE), SNAPSHOTS)
    if after_compile is not None:
        after_compile(model)
    callback = _recording_checkpoint(directory, late_chief_seconds)
    callbacks, validation = [callback], None
    if averaging:
        import keras_snapshot

        ema = keras_snapshot.WeightAveraging(
            mode="ema",
            decay=0.9,
            validate_with_average=True,
            filepath=f"{directory}-ema.keras",
            verbose=0,
        )
        every = keras_snapshot.AveragedModelCheckpoint(
            ema, directory + "-ema-{epoch}.keras"
        )
        callbacks += [ema, every]
        validation = make_data(n=16, seed=3)
    history = model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        shuffle=False,
        callbacks=callbacks,
        validation_data=validation,
        verbose=0,
    )
    sys.stdout.flush()
    return (callback, history) if averaging else callback


def _new_model():
    from helpers import make_model

    # No BatchNorm: each replica would normalise with the moments of its
    # part of the batch, so a distributed run would differ on purpose.
    return make_model(batchnorm=False)


def mirrored(outdir):
    import tensorflow as tf

    # Before anything initialises TensorFlow's devices.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras

    from keras_snapshot.app.distribute import get_strategy

    keras.utils.set_random_seed(0)
    single = _new_model()
    initial = single.get_weights()
    single_callback, single_history = _train(
        os.path.join(outdir, "single"), single, averaging=True
    )
    strategy = get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = _new_model()
        model.set_weights(initial)
        callback, history = _train(
            os.path.join(outdir, "mirrored"), model, averaging=True
        )
    result = {
        "replicas": strategy.num_replicas_in_sync,
        "variable": type(model.trainable_variables[0].value).__name__,
        "saved_steps": callback.saved_steps,
        "single_saved_steps": single_callback.saved_steps,
        "val_loss": history.history["val_loss"],
        "single_val_loss": single_history.history["val_loss"],
    }
    with open(os.path.join(outdir, "result.json"), "w") as f:
        json.dump(result, f)


def _multiworker_model(strategy):
    """A model that Keras 3.15 can `fit` on several workers, by public API.

    Keras 3 (3.15 here) cannot run `fit` under `MultiWorkerMirroredStrategy`
    with several workers (keras-team/keras#20585); two public steps avoid
    both failures:

    1. Make the model object outside `strategy.scope()`, without
       `keras.Input`, and build it inside the scope. Its variables are
       mirrored, but Keras does not record the strategy on the model, so
       `fit` skips the reduction of the first batch that fails ("Attempt to
       convert a value (PerReplica...) to a Tensor") and uses the strategy
       current when `fit` runs: call `fit` inside the scope.
    2. Return the logs of `train_step` as vectors of one value: each step,
       Keras reduces them across workers with `axis=0`, which fails on
       scalars ("Invalid reduction dimension 0 for input with 0
       dimensions"). The logs `fit` reports are still scalars.

    The model is a plain `Sequential`; the override is an attribute of this
    object only, so the snapshots are ordinary `.keras` files.
    """
    import keras

    # Same layers as `conftest.make_model(batchnorm=False)`.
    model = keras.Sequential(
        [
            keras.layers.Dense(16),
            keras.layers.Activation("relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    train_step = model.train_step

    def train_step_with_vector_logs(data):
        logs = train_step(data)
        return {k: keras.ops.reshape(v, (1,)) for k, v in logs.items()}

    model.train_step = train_step_with_vector_logs
    with strategy.scope():
        model.build((None, 8))
    return model


def multiworker(outdir, snapshot_dir):
    import keras
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    index = strategy.cluster_resolver.task_id
    runs = []
    for run in range(2):
        keras.utils.set_random_seed(0)
        model = _multiworker_model(strategy)
        with strategy.scope():
            callback = _train(
                snapshot_dir,
                model,
                epochs=EPOCHS + run,
                late_chief_seconds=2.0 if run else 0.0,
                # Optimizer variables mirrored too, before `fit` starts.
                after_compile=lambda m: m.optimizer.build(
                    m.trainable_variables
                ),
            )
        runs.append(
            {
                "chief": callback._writer,
                "variable": type(model.trainable_variables[0].value).__name__,
                "saved_steps": callback.saved_steps,
                "steps": int(model.optimizer.iterations.numpy()),
            }
        )
    result = {
        "index": index,
        "should_checkpoint": strategy.extended.should_checkpoint,
        "replicas": strategy.num_replicas_in_sync,
        "runs": runs,
    }
    with open(os.path.join(outdir, f"worker-{index}.json"), "w") as f:
        json.dump(result, f)


def multiworker_upstream(outdir):
    """Plain Keras `fit` under `MultiWorkerMirroredStrategy`; records the error.

    The model is made and compiled in the scope, as Keras documents. With
    several workers Keras 3.15 fails (keras-team/keras#20585).
    """
    import keras
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    index = strategy.cluster_resolver.task_id
    keras.utils.set_random_seed(0)
    error = None
    try:
        with strategy.scope():
            _train(os.path.join(outdir, f"snapshots-{index}"), _new_model())
    except Exception as e:  # The upstream failure, recorded for the test.
        error = f"{type(e).__name__}: {str(e)[:2000]}"
    with open(os.path.join(outdir, f"worker-{index}.json"), "w") as f:
        json.dump({"keras": keras.__version__, "error": error}, f)


def jax_data_parallel(outdir):
    import jax
    import keras

    from keras_snapshot.app.distribute import get_strategy

    strategy = get_strategy("data_parallel")
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = _new_model()
        callback = _train(os.path.join(outdir, "snapshots"), model)
    kernel = model.trainable_variables[0].value
    try:
        get_strategy("mirrored")
        tf_strategy_error = None
    except ValueError as e:
        tf_strategy_error = str(e)
    result = {
        "backend": keras.backend.backend(),
        "jax_devices": len(jax.devices()),
        "kernel_devices": len(kernel.sharding.device_set),
        "saved_steps": callback.saved_steps,
        "tf_strategy_error": tf_strategy_error,
    }
    with open(os.path.join(outdir, "result.json"), "w") as f:
        json.dump(result, f)


def jax_multiprocess(outdir, snapshot_dir, coordinator, count, index):
    """One of `count` JAX processes training one model with `DataParallel`.

    `keras.distribution.initialize` starts `jax.distributed` with the
    coordinator (process 0) at `coordinator`. Every process feeds its part
    of each global batch of `BATCH_SIZE` samples (`fit` gets the per-process
    batch size), so the global batches are those of a one-process run.
    """
    import jax
    import keras
    import numpy as np
    from helpers import compile_with_schedule
    from helpers import make_data

    keras.distribution.initialize(
        job_addresses=coordinator, num_processes=count, process_id=index
    )
    # Every process passes its own part of the data (numpy arrays, which
    # Keras cannot shard itself).
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(
            devices=keras.distribution.list_devices("cpu"),
            auto_shard_dataset=False,
        )
    )
    keras.utils.set_random_seed(0)
    model = _new_model()
    x, y = make_data(n=SAMPLES)
    # Rows of global batch b: b * BATCH_SIZE + [index * local, ...).
    local = BATCH_SIZE // count
    rows = np.arange(SAMPLES).reshape(-1, count, local)[:, index].ravel()
    compile_with_schedule(model, EPOCHS * (SAMPLES // BATCH_SIZE), SNAPSHOTS)
    callback = _recording_checkpoint(snapshot_dir)
    model.fit(
        x[rows],
        y[rows],
        batch_size=local,
        epochs=EPOCHS,
        shuffle=False,
        callbacks=[callback],
        verbose=0,
    )
    sys.stdout.flush()
    kernel = model.trainable_variables[0].value
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "global_devices": len(jax.devices()),
        "local_devices": len(jax.local_devices()),
        "kernel_devices": len(kernel.sharding.device_set),
        "writer": callback._writer,
        "saved_steps": callback.saved_steps,
        "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
    }
    with open(os.path.join(outdir, f"process-{index}.json"), "w") as f:
        json.dump(result, f)


def jax_single(outdir):
    """The same training in one JAX process on one device, for reference."""
    import keras

    keras.utils.set_random_seed(0)
    model = _new_model()
    callback = _train(os.path.join(outdir, "single"), model)
    with open(os.path.join(outdir, "single.json"), "w") as f:
        json.dump({"saved_steps": callback.saved_steps}, f)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    if mode == "mirrored":
        mirrored(out)
    elif mode == "multiworker":
        multiworker(out, sys.argv[3])
    elif mode == "multiworker_upstream":
        multiworker_upstream(out)
    elif mode == "jax_data_parallel":
        jax_data_parallel(out)
    elif mode == "jax_multiprocess":
        jax_multiprocess(
            out, sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
        )
    elif mode == "jax_single":
        jax_single(out)
    else:
        raise SystemExit(f"Unknown mode {mode!r}; see the docstring.")
    print("done", flush=True)
