"""Choosing a distribution by name, for front ends such as the CLI.

TensorFlow and JAX are imported inside the functions, so that importing
this module costs nothing on other Keras backends.
"""

STRATEGY_NAMES = ("default", "mirrored", "tpu", "data_parallel")

_MULTIWORKER_HELP = (
    "Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy with "
    "several workers (keras-team/keras#20585, open as of Keras 3.15): "
    "'Attempt to convert a value (PerReplica...) to a Tensor'. For several "
    "machines, train on the JAX backend with keras.distribution.initialize()"
    " and DataParallel; see docs/distributed.md of keras-snapshot."
)


def get_strategy(
    name: str = "default",
    devices: list[str] | None = None,
    tpu: str | None = None,
):
    """Returns the distribution called `name`, to use as `with x.scope():`.

    Snapshot Ensembles (Huang et al. 2017, arXiv:1704.00109) train one
    network, so they distribute like any Keras model: build, compile and
    fit the model inside `strategy.scope()`, with the global batch size.
    `SnapshotCheckpoint` then writes every snapshot once.

    - `"default"`: no distribution (the default `tf.distribute` strategy,
      whose scope changes nothing, on every backend).
    - `"mirrored"` (TensorFlow): `tf.distribute.MirroredStrategy`, data
      parallel over the GPUs of one machine (or the given `devices`).
    - `"tpu"` (TensorFlow): `tf.distribute.TPUStrategy` on the TPU found
      through `TPUClusterResolver` (a Cloud TPU, or the TPU of this VM).
    - `"data_parallel"` (JAX): `keras.distribution.DataParallel` over all
      devices JAX sees in this process (or the given `devices`).

    There is no multi-worker TensorFlow strategy: Keras 3's `fit` fails
    under `MultiWorkerMirroredStrategy` with several workers
    (keras-team/keras#20585). For several machines, use the JAX backend
    with `keras.distribution.initialize()` (see `docs/distributed.md`).

    Args:
        name: One of `"default"`, `"mirrored"`, `"tpu"`, `"data_parallel"`.
        devices: For `"mirrored"`: the devices to use, e.g.
            `["/gpu:0", "/gpu:1"]`; by default all GPUs of this machine (or
            its CPU if there are none). For `"data_parallel"`: JAX device
            names as `keras.distribution.list_devices()` gives them, e.g.
            `["gpu:0", "gpu:1"]`; by default all of them.
        tpu: For `"tpu"`: the TPU name or `grpc://` address; by default the
            `TPU_NAME` environment variable, else a TPU attached to this VM.

    Returns:
        A `tf.distribute.Strategy` on TensorFlow, a
        `keras.distribution.DataParallel` for `"data_parallel"`; both have
        a `scope()` context manager.

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
    if name == "multiworker":
        raise ValueError(
            "The 'multiworker' strategy is not offered: "
            f"{_MULTIWORKER_HELP} Received: name={name!r}."
        )
    if name not in STRATEGY_NAMES:
        raise ValueError(
            f"Unknown strategy: `name` must be one of {STRATEGY_NAMES}. "
            f"Received: name={name!r}."
        )
    if devices is not None and name not in ("mirrored", "data_parallel"):
        raise ValueError(
            "`devices` is only used with the 'mirrored' and 'data_parallel' "
            f"strategies. Received: name={name!r}, devices={devices!r}."
        )
    if tpu is not None and name != "tpu":
        raise ValueError(
            "`tpu` is only used with the 'tpu' strategy. Received: "
            f"name={name!r}, tpu={tpu!r}."
        )
    import keras

    backend = keras.backend.backend()
    if name == "data_parallel":
        if backend != "jax":
            raise ValueError(
                "The 'data_parallel' strategy needs KERAS_BACKEND=jax; on "
                f"TensorFlow use 'mirrored'. Received: backend {backend!r}"
            )
        return keras.distribution.DataParallel(
            devices=devices or keras.distribution.list_devices()
        )
    if name != "default" and backend != "tensorflow":
        raise ValueError(
            f"The {name!r} strategy needs KERAS_BACKEND=tensorflow; on JAX "
            "use 'data_parallel' (keras.distribution.DataParallel). "
            f"Received: backend {backend!r}"
        )
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    return _tpu_strategy(tpu)


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
            "No TPU found for the 'tpu' strategy: run on a TPU runtime "
            "(Colab: Runtime > Change runtime type > TPU), set TPU_NAME or "
            "pass `tpu=`, or choose another strategy. "
            f"Received: {type(e).__name__}: {cause[:200]}"
        ) from e
    return tf.distribute.TPUStrategy(resolver)
