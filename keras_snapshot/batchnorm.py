"""Recomputing BatchNorm statistics so that they match a snapshot's weights."""

import numpy as np
from keras import layers
from keras import ops

from keras_snapshot._checks import check_positive_int
from keras_snapshot._checks import is_endless
from keras_snapshot._keras_compat import batchnorm_renorm


def batchnorm_layers(model) -> list:
    """Every `BatchNormalization` layer of `model`, nested models included."""
    found = []

    def visit(layer):
        if isinstance(layer, layers.BatchNormalization):
            found.append(layer)
        for child in getattr(layer, "layers", None) or []:
            visit(child)

    for layer in model.layers:
        visit(layer)
    # A layer shared between nested models is listed once.
    unique = {id(layer): layer for layer in found}
    return list(unique.values())


def save_batchnorm_statistics(model) -> list:
    """The moving mean and variance of every BatchNorm layer, as numpy."""
    return [
        (
            layer,
            ops.convert_to_numpy(layer.moving_mean),
            ops.convert_to_numpy(layer.moving_variance),
        )
        for layer in batchnorm_layers(model)
    ]


def restore_batchnorm_statistics(model, saved: list) -> None:
    """Puts back statistics returned by `save_batchnorm_statistics`."""
    for layer, mean, variance in saved:
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(variance)


def check_bounded_data(data, steps: int | None) -> None:
    """Refuses an endless dataset (`.repeat()`) without a `steps` limit."""
    if steps is not None:
        return
    if is_endless(data):
        raise ValueError(
            "The recalibration data is an endless dataset, so BatchNorm "
            "recalibration would never finish: pass `steps` "
            "(`recalibration_steps` for SnapshotCheckpoint), e.g. steps=50."
        )


def _input_batches(data, batch_size: int, steps: int | None):
    """Yields the input part of each batch of `data`."""
    if isinstance(data, tuple) and len(data) in (2, 3):
        data = data[0]
    if isinstance(data, (np.ndarray, list)) or hasattr(data, "__array__"):
        if not hasattr(data, "element_spec"):
            array = np.asarray(data)
            if array.dtype == object:
                raise ValueError(
                    "`data` for BatchNorm recalibration must be a numeric "
                    "array, an `(x, y)` tuple or a dataset of batches. "
                    f"Received: a sequence of {type(array.flat[0]).__name__}"
                    " objects."
                )
            if array.ndim == 0 or len(array) == 0:
                raise ValueError(
                    "`data` for BatchNorm recalibration is empty. Received: "
                    f"an array of shape {array.shape}."
                )
            for count, start in enumerate(range(0, len(array), batch_size)):
                if steps is not None and count >= steps:
                    return
                yield array[start : start + batch_size]
            return
    count = 0
    for batch in data:
        if steps is not None and count >= steps:
            return
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        elif isinstance(batch, dict):
            raise ValueError(
                "BatchNorm recalibration takes batches of inputs or "
                "(inputs, targets) tuples. Received: a batch that is a dict "
                f"with keys {sorted(batch)}."
            )
        yield batch
        count += 1


def recalibrate_batchnorm(
    model, data, batch_size: int = 128, steps: int | None = None
):
    """Recomputes BatchNorm moving statistics from data, weights untouched.

    A snapshot's moving averages still remember the high-rate part of its
    cycle. This runs the model over `data` in training mode and sets each
    trainable `BatchNormalization` layer's moving mean and variance to the
    exact statistics of its inputs over all of `data`, as SWA does
    (Izmailov et al. 2018). Weights and frozen BatchNorm layers are left
    as they are.

    Args:
        model: A Keras model.
        data: Training inputs: an array, an `(x, y)` tuple of arrays, a
            `tf.data.Dataset` or another iterable of batches (`x` or
            `(x, y, ...)`).
        batch_size: Batch size used for arrays.
        steps: Optional number of batches to use.

    Returns:
        The same `model`, recalibrated in place.

    Example:

    ```python
    snapshot = keras.saving.load_model("snapshots/snapshot-01.keras")
    keras_snapshot.recalibrate_batchnorm(snapshot, x_train[:2000])
    ```
    """
    if not hasattr(model, "layers"):
        raise TypeError(
            "`model` must be a Keras model. Received: "
            f"{model!r} (type {type(model).__name__})."
        )
    check_positive_int("batch_size", batch_size)
    if steps is not None:
        check_positive_int("steps", steps)
    if data is None:
        raise ValueError(
            "`data` must be training inputs for BatchNorm recalibration: an "
            "array, an `(x, y)` tuple or a `tf.data.Dataset`. Received: "
            "data=None."
        )
    check_bounded_data(data, steps)
    bn_layers = [layer for layer in batchnorm_layers(model) if layer.trainable]
    if not bn_layers:
        return model
    renorm = [layer.name for layer in bn_layers if batchnorm_renorm(layer)]
    if renorm:
        raise ValueError(
            "recalibrate_batchnorm does not support batch renormalization. "
            f"Received: renorm=True in {renorm}."
        )
    momenta = [layer.momentum for layer in bn_layers]
    count = 0
    sums = [None] * len(bn_layers)
    squares = [None] * len(bn_layers)
    try:
        # With momentum 0, one training-mode call leaves the batch's own
        # mean and variance in the moving statistics.
        for layer in bn_layers:
            layer.momentum = 0.0
        for batch in _input_batches(data, batch_size, steps):
            size = int(ops.shape(batch)[0]) if hasattr(batch, "shape") else 1
            model(batch, training=True)
            for i, layer in enumerate(bn_layers):
                mean = ops.convert_to_numpy(layer.moving_mean).astype(
                    np.float64
                )
                variance = ops.convert_to_numpy(layer.moving_variance).astype(
                    np.float64
                )
                if sums[i] is None:
                    sums[i] = np.zeros_like(mean)
                    squares[i] = np.zeros_like(mean)
                sums[i] += size * mean
                squares[i] += size * (variance + mean**2)
            count += size
    finally:
        for layer, momentum in zip(bn_layers, momenta):
            layer.momentum = momentum
    if count == 0:
        raise ValueError(
            "`data` for BatchNorm recalibration gave no batches; pass at "
            "least one batch of training inputs."
        )
    for i, layer in enumerate(bn_layers):
        mean = sums[i] / count
        variance = np.maximum(squares[i] / count - mean**2, 0.0)
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(
            variance.astype(layer.moving_variance.dtype)
        )
    return model
