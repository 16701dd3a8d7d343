"""Choosing a `tf.distribute` strategy by name, for front ends such as the CLI.

TensorFlow is imported inside the functions, so that importing this module
costs nothing on other Keras backends.
"""

import json
import os
import warnings

STRATEGY_NAMES = ("default", "mirrored", "multiworker", "tpu")


def get_strategy(
    name: str = "default",
    devices: list[str] | None = None,
    tpu: str | None = None,
):
    """Returns the `tf.distribute` strategy called `name`.

    Snapshot Ensembles (Huang et al. 2017, arXiv:1704.00109) train one
    network, so they distribute like any Keras model: build and compile the
    model inside `strategy.scope()` and call `fit` with the global batch
    size. `SnapshotCheckpoint` then writes every snapshot once: with several
    machines only the chief writes to the snapshot directory, while the
    other workers take part in each save in a scratch folder they delete.

    - `"default"`: the default strategy (one device, no distribution).
    - `"mirrored"`: `tf.distribute.MirroredStrategy`, data parallel over the
      GPUs of one machine (or the given `devices`).
    - `"multiworker"`: `tf.distribute.MultiWorkerMirroredStrategy`, data
      parallel over several machines described by the `TF_CONFIG`
      environment variable (one worker without it).
    - `"tpu"`: `tf.distribute.TPUStrategy` on the TPU found through
      `TPUClusterResolver` (a Cloud TPU, or the TPU attached to this VM).

    These are strategies of the TensorFlow backend. On JAX, use
    `keras.distribution.DataParallel` instead (see `docs/distributed.md`).

    Args:
        name: One of `"default"`, `"mirrored"`, `"multiworker"`, `"tpu"`.
        devices: For `"mirrored"`: the devices to use, e.g.
            `["/gpu:0", "/gpu:1"]`; by default all GPUs of this machine (or
            its CPU if there are none).
        tpu: For `"tpu"`: the TPU name or `grpc://` address; by default the
            `TPU_NAME` environment variable, else a TPU attached to this VM.

    Returns:
        A `tf.distribute.Strategy`.

    Example:

    ```python
    from keras_snapshot.app.distribute import get_strategy

    strategy = get_strategy("mirrored")
    with strategy.scope():
        model = make_model()
        model.compile(optimizer=keras.optimizers.SGD(schedule), loss=loss)
    model.fit(x, y, batch_size=64 * strategy.num_replicas_in_sync,
              callbacks=[keras_snapshot.SnapshotCheckpoint("snapshots")])
    ```
    """
    if name not in STRATEGY_NAMES:
        raise ValueError(
            f"Unknown strategy: `name` must be one of {STRATEGY_NAMES}. "
            f"Received: name={name!r}."
        )
    if devices is not None and name != "mirrored":
        raise ValueError(
            "`devices` is only used with the 'mirrored' strategy. Received: "
            f"name={name!r}, devices={devices!r}."
        )
    if tpu is not None and name != "tpu":
        raise ValueError(
            "`tpu` is only used with the 'tpu' strategy. Received: "
            f"name={name!r}, tpu={tpu!r}."
        )
    import keras

    backend = keras.backend.backend()
    if name != "default" and backend != "tensorflow":
        raise ValueError(
            f"The {name!r} strategy is a tf.distribute strategy and needs "
            f"KERAS_BACKEND=tensorflow. Received backend {backend!r}; on "
            "JAX, distribute with keras.distribution.set_distribution("
            "keras.distribution.DataParallel()) instead."
        )
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        if _count_tf_config_tasks() > 1:
            warnings.warn(
                "Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy"
                " with several workers (keras-team/keras#20585, open as of "
                "Keras 3.15): 'Attempt to convert a value (PerReplica...)'. "
                "See docs/distributed.md of keras-snapshot for a workaround.",
                stacklevel=2,
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    return _tpu_strategy(tpu)


def _count_tf_config_tasks() -> int:
    """The number of tasks in `TF_CONFIG`; fails early if it is unreadable."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return 1  # One worker: MultiWorkerMirroredStrategy still works.
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"The TF_CONFIG environment variable is not valid JSON ({e}). "
            'Expected e.g. {"cluster": {"worker": ["host1:port", '
            '"host2:port"]}, "task": {"type": "worker", "index": 0}}.'
        ) from None
    if not isinstance(config, dict) or not isinstance(
        config.get("cluster"), dict
    ):
        raise ValueError(
            "The TF_CONFIG environment variable needs a 'cluster' object "
            'listing the workers, e.g. {"cluster": {"worker": ["host1:port",'
            ' "host2:port"]}, "task": {"type": "worker", "index": 0}}. '
            f"Received: {text}"
        )
    tasks = config["cluster"].values()
    return sum(len(t) if isinstance(t, (list, dict)) else 1 for t in tasks)


def _tpu_strategy(tpu: str | None):
    import tensorflow as tf

    resolver_class = tf.distribute.cluster_resolver.TPUClusterResolver
    try:
        try:
            resolver = resolver_class(tpu=tpu)
        except ValueError:
            if tpu is not None:
                raise
            # No TPU_NAME: a TPU attached to this VM (a TPU VM).
            resolver = resolver_class(tpu="local")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            "No TPU found for the 'tpu' strategy. Run on a TPU runtime "
            "(Colab: Runtime > Change runtime type > TPU), set TPU_NAME or "
            "pass `tpu=`, or choose another strategy: "
            f"{[n for n in STRATEGY_NAMES if n != 'tpu']}. "
            f"Cause: {type(e).__name__}: {cause[:200]}"
        ) from e
    return tf.distribute.TPUStrategy(resolver)
