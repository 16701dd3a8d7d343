"""Classification models to train as snapshot ensembles.

The networks of Huang et al. 2017 (arXiv:1704.00109): CIFAR ResNets,
DenseNet-40, Wide-ResNet-32, plus a small CNN for CPUs; stock Keras layers
only, so a saved `.keras` file loads without this module. `weight_decay`
adds the papers' coupled L2 penalty; the command line decays through the
optimizer instead (use one, not both).
"""

import functools
import os
import re
import zipfile
from collections.abc import Callable
from collections.abc import Sequence

import keras
from keras import layers

from keras_snapshot._checks import check_positive_int

__all__ = [
    "MODELS",
    "densenet",
    "get_model",
    "resnet",
    "small_cnn",
    "wide_resnet",
]

_CIFAR_SHAPE = (32, 32, 3)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """Returns `input_shape` as a tuple of 3 positive ints, or raises."""
    try:
        shape = tuple(check_positive_int("dimension", d) for d in input_shape)
        ok = len(shape) == 3
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            "`input_shape` must be (height, width, channels) with 3 positive "
            "ints, e.g. (32, 32, 3). Received: "
            f"input_shape={input_shape!r}"
        )
    return shape


def _check_num_classes(num_classes: int) -> int:
    """Returns `num_classes` as an int >= 2, or raises."""
    try:
        ok = check_positive_int("num_classes", num_classes) >= 2
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            "`num_classes` must be an int >= 2 for a softmax classifier. "
            f"Received: num_classes={num_classes!r}"
        )
    return num_classes


def _check_depth(depth: int, name: str, rule: str, valid: bool) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or not valid:
        raise ValueError(
            f"`depth` of {name} must be {rule}. Received: depth={depth!r}"
        )


def _check_resnet_depth(depth, name: str, examples: str) -> None:
    valid = isinstance(depth, int) and depth >= 8 and (depth - 2) % 6 == 0
    _check_depth(depth, name, f"6 * n + 2 with n >= 1 (e.g. {examples})", valid)


def _l2(weight_decay):
    """The Keras L2 penalty for an SGD weight decay `lambda`: `L2(lambda/2)`,
    whose gradient `2 * l2 * w` is the papers' `lambda * w`."""
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None


def _conv(filters, kernel_size, weight_decay, strides=1):
    """Convolution without bias, He-normal init and weight decay."""
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=_l2(weight_decay),
    )


def _bn_relu(x):
    x = layers.BatchNormalization(epsilon=1e-5, momentum=0.9)(x)
    return layers.ReLU()(x)


def _classifier(x, num_classes, weight_decay, name, inputs):
    """Global average pool, dense softmax, and the `keras.Model`."""
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(
        num_classes,
        activation="softmax",
        kernel_initializer="he_normal",
        kernel_regularizer=_l2(weight_decay),
    )(x)
    return keras.Model(inputs, outputs, name=name)


def small_cnn(
    input_shape: Sequence[int], num_classes: int, weight_decay: float = 0.0
) -> keras.Model:
    """A small CNN that trains in seconds on a CPU.

    Three Conv3x3-BN-ReLU blocks with 32, 64 and 128 filters, 2x2 max pooling
    after the first two, global average pooling and a dense softmax layer
    (about 94K parameters). Pooling uses "same" padding, so inputs as small
    as the 8x8 scikit-learn digits work, as do 28x28 (Fashion-MNIST) and
    32x32 (CIFAR) images. It is the default for quick snapshot-ensemble runs
    (Huang et al. 2017, arXiv:1704.00109) where a CIFAR network is too slow.

    Args:
        input_shape: `(height, width, channels)` of one image.
        num_classes: Number of classes of the softmax output, >= 2.
        weight_decay: Coupled weight-decay coefficient applied to the
            kernels as `L2(weight_decay / 2)`. Defaults to `0.0`: no
            regularizer; decay the weights through the optimizer instead.

    Returns:
        An uncompiled `keras.Model` named `"small_cnn"` whose output is a
        softmax over `num_classes`.

    Example:

    ```python
    model = small_cnn((8, 8, 1), 10)
    model.compile("adam", "sparse_categorical_crossentropy")
    ```
    """
    input_shape = _check_input_shape(input_shape)
    num_classes = _check_num_classes(num_classes)
    inputs = keras.Input(shape=input_shape)
    x = inputs
    for i, filters in enumerate((32, 64, 128)):
        x = _conv(filters, 3, weight_decay)(x)
        x = _bn_relu(x)
        if i < 2:
            x = layers.MaxPooling2D(2, padding="same")(x)
    return _classifier(x, num_classes, weight_decay, "small_cnn", inputs)


def flat_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int] = (16, 32, 64),
    weight_decay: float = 0.0,
) -> keras.Model:
    """The default job's CNN: conv blocks and a flatten head (29K parameters).

    Three Conv3x3 (no bias) - BatchNorm - ReLU - MaxPool blocks with 16, 32
    and 64 filters, then Flatten and a dense softmax. The flatten head (not
    global pooling) lets it overfit a few thousand images, the regime where
    snapshot ensembles (Huang et al. 2017, arXiv:1704.00109) pay: chosen by
    `benchmarks/default_job.py`, which `benchmarks/` also train.

    Args:
        input_shape: `(height, width, channels)` of one image.
        num_classes: Number of classes of the softmax output, >= 2.
        widths: Filters of the three blocks.
        weight_decay: Coupled weight decay as `L2(weight_decay / 2)` on the
            kernels; `0.0` (default) adds none.

    Returns:
        An uncompiled `keras.Model` named `"flat_cnn"`.

    Example:

    ```python
    model = flat_cnn((28, 28, 1), 10)
    ```
    """
    input_shape = _check_input_shape(input_shape)
    num_classes = _check_num_classes(num_classes)
    inputs = keras.Input(shape=input_shape)
    x = inputs
    for filters in widths:
        x = layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            kernel_regularizer=_l2(weight_decay),
        )(x)
        x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(
        num_classes,
        activation="softmax",
        kernel_initializer="he_normal",
        kernel_regularizer=_l2(weight_decay),
    )(x)
    return keras.Model(inputs, outputs, name="flat_cnn")


def _zero_pad_shortcut(x, filters, strides):
    """Option A shortcut of He et al. 2016: subsample, pad channels with 0s.

    Parameter-free. Built from stock layers (strided 1x1 pooling picks
    `x[:, ::2, ::2]`; a reshape to 5-D lets `ZeroPadding3D` pad the channel
    axis) so saved models need no custom objects.
    """
    if strides > 1:
        x = layers.MaxPooling2D(pool_size=1, strides=strides)(x)
    extra = filters - x.shape[-1]
    if extra > 0:
        height, width, channels = x.shape[1:]
        x = layers.Reshape((height, width, channels, 1))(x)
        x = layers.ZeroPadding3D(
            ((0, 0), (0, 0), (extra // 2, extra - extra // 2))
        )(x)
        x = layers.Reshape((height, width, filters))(x)
    return x


def _basic_block(x, filters, strides, weight_decay, shortcut):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, add, ReLU."""
    y = _conv(filters, 3, weight_decay, strides)(x)
    y = _bn_relu(y)
    y = _conv(filters, 3, weight_decay)(y)
    y = layers.BatchNormalization(epsilon=1e-5, momentum=0.9)(y)
    if strides == 1 and x.shape[-1] == filters:
        s = x
    elif shortcut == "A":
        s = _zero_pad_shortcut(x, filters, strides)
    else:
        s = _conv(filters, 1, weight_decay, strides)(x)
        s = layers.BatchNormalization(epsilon=1e-5, momentum=0.9)(s)
    y = layers.Add()([y, s])
    return layers.ReLU()(y)


def _cifar_resnet(
    blocks, widths, input_shape, num_classes, weight_decay, shortcut, name
):
    """The CIFAR ResNet trunk shared by `resnet` and `wide_resnet`."""
    inputs = keras.Input(shape=_check_input_shape(input_shape))
    num_classes = _check_num_classes(num_classes)
    x = _conv(16, 3, weight_decay)(inputs)
    x = _bn_relu(x)
    for stage, filters in enumerate(widths):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, filters, strides, weight_decay, shortcut)
    return _classifier(x, num_classes, weight_decay, name, inputs)


def resnet(
    depth: int,
    input_shape: Sequence[int] = _CIFAR_SHAPE,
    num_classes: int = 10,
    weight_decay: float = 0.0,
) -> keras.Model:
    """The CIFAR ResNet of He et al. 2016 (ResNet-20/32/44/56/110 ...).

    A 3x3 convolution with 16 filters, then three stages of `n` basic blocks
    with 16, 32 and 64 filters (the 2nd and 3rd stages halve the spatial size),
    global average pooling and a dense softmax: `depth = 6 * n + 2` layers.
    Shortcuts are identities; where the shape changes they subsample and pad
    the new channels with zeros (option A), so the parameter counts match the
    paper: ResNet-20 0.27M, ResNet-56 0.85M, ResNet-110 1.7M. Convolutions use
    He-normal init, as in the ResNet experiments of Huang et al. 2017,
    arXiv:1704.00109.

    Args:
        depth: Number of weighted layers, `6 * n + 2` with `n >= 1`
            (20, 32, 44, 56, 110, ...).
        input_shape: `(height, width, channels)` of one image. Defaults to
            CIFAR's `(32, 32, 3)`.
        num_classes: Number of classes of the softmax output. Defaults to 10.
        weight_decay: Coupled weight-decay coefficient `lambda` (gradient
            `lambda * w`), applied to every kernel as `L2(lambda / 2)`.
            Defaults to `0.0`: no regularizer; decay the weights through
            the optimizer instead, as the command line does. The paper
            used `1e-4`.

    Returns:
        An uncompiled `keras.Model` named `f"resnet{depth}"`.

    Example:

    ```python
    model = resnet(20, input_shape=(32, 32, 3), num_classes=10)
    model.count_params()  # 271,098: 269,722 trainable + BN moving stats
    ```
    """
    _check_resnet_depth(depth, "ResNet", "20, 32, 44, 56, 110")
    return _cifar_resnet(
        (depth - 2) // 6,
        (16, 32, 64),
        input_shape,
        num_classes,
        weight_decay,
        "A",
        f"resnet{depth}",
    )


def wide_resnet(
    depth: int = 32,
    width: int = 4,
    input_shape: Sequence[int] = _CIFAR_SHAPE,
    num_classes: int = 10,
    weight_decay: float = 0.0,
) -> keras.Model:
    """A Wide ResNet (Zagoruyko & Komodakis 2016), e.g. WRN-32-4.

    The CIFAR ResNet of `resnet` with `width` times more filters per stage
    (16k, 32k, 64k after a 16-filter stem) and `(depth - 2) / 6` basic blocks
    per stage. Where the number of channels changes, the shortcut is a 1x1
    convolution with BN (option B): zero-padding 16 channels to 64 would
    leave most of the first stage without an identity path. Huang et al.
    2017 (arXiv:1704.00109) use Wide-ResNet-32 with width 4 on CIFAR.

    Args:
        depth: Number of layers on the main path, `6 * n + 2` with `n >= 1`.
            Defaults to 32.
        width: Widening factor `k >= 1`. Defaults to 4.
        input_shape: `(height, width, channels)` of one image. Defaults to
            CIFAR's `(32, 32, 3)`.
        num_classes: Number of classes of the softmax output. Defaults to 10.
        weight_decay: Coupled weight-decay coefficient `lambda`, applied to
            every kernel as `L2(lambda / 2)`. Defaults to `0.0`: no
            regularizer; decay the weights through the optimizer instead.
            Zagoruyko & Komodakis 2016 used `5e-4`.

    Returns:
        An uncompiled `keras.Model` named `f"wrn{depth}_{width}"`.

    Example:

    ```python
    model = wide_resnet(32, 4, input_shape=(32, 32, 3), num_classes=100)
    ```
    """
    _check_resnet_depth(depth, "Wide-ResNet", "14, 20, 26, 32")
    check_positive_int("width", width)
    return _cifar_resnet(
        (depth - 2) // 6,
        (16 * width, 32 * width, 64 * width),
        input_shape,
        num_classes,
        weight_decay,
        "B",
        f"wrn{depth}_{width}",
    )


def densenet(
    depth: int = 40,
    growth_rate: int = 12,
    input_shape: Sequence[int] = _CIFAR_SHAPE,
    num_classes: int = 10,
    weight_decay: float = 0.0,
) -> keras.Model:
    """The CIFAR DenseNet of Huang et al. 2017 (DenseNet-40, k=12).

    A 3x3 convolution with 16 filters, then three dense blocks of
    `(depth - 4) / 3` BN-ReLU-Conv3x3 layers, each adding `growth_rate`
    feature maps concatenated to its input, separated by transitions
    BN-ReLU-Conv1x1-AvgPool2x2 that keep the number of channels (no
    bottleneck, no compression), then BN-ReLU, global average pooling and a
    dense softmax. DenseNet-40 with k=12 has 1.0M parameters, as published;
    it is one of the networks of the snapshot-ensemble experiments (Huang et
    al. 2017, arXiv:1704.00109). No dropout: the paper trains it with data
    augmentation.

    Args:
        depth: Number of weighted layers, `3 * L + 4` with `L >= 1` layers
            per dense block. Defaults to 40.
        growth_rate: Feature maps added by each layer, `k >= 1`. Defaults
            to 12.
        input_shape: `(height, width, channels)` of one image. Defaults to
            CIFAR's `(32, 32, 3)`.
        num_classes: Number of classes of the softmax output. Defaults to 10.
        weight_decay: Coupled weight-decay coefficient `lambda`, applied to
            every kernel as `L2(lambda / 2)`. Defaults to `0.0`: no
            regularizer; decay the weights through the optimizer instead.
            The paper used `1e-4`.

    Returns:
        An uncompiled `keras.Model` named `f"densenet{depth}_k{growth_rate}"`.

    Example:

    ```python
    model = densenet(40, 12, input_shape=(32, 32, 3), num_classes=100)
    ```
    """
    _check_depth(
        depth,
        "DenseNet",
        "3 * L + 4 with L >= 1 layers per dense block (e.g. 40, 100)",
        isinstance(depth, int) and depth >= 7 and (depth - 4) % 3 == 0,
    )
    check_positive_int("growth_rate", growth_rate)
    inputs = keras.Input(shape=_check_input_shape(input_shape))
    num_classes = _check_num_classes(num_classes)
    x = _conv(16, 3, weight_decay)(inputs)
    for block in range(3):
        for _ in range((depth - 4) // 3):
            y = _bn_relu(x)
            y = _conv(growth_rate, 3, weight_decay)(y)
            x = layers.Concatenate()([x, y])
        if block < 2:
            x = _bn_relu(x)
            x = _conv(x.shape[-1], 1, weight_decay)(x)
            x = layers.AveragePooling2D(2, padding="same")(x)
    x = _bn_relu(x)
    return _classifier(
        x, num_classes, weight_decay, f"densenet{depth}_k{growth_rate}", inputs
    )


MODELS: dict[str, Callable[..., keras.Model]] = {
    "flat_cnn": flat_cnn,
    "small_cnn": small_cnn,
    "resnet20": functools.partial(resnet, 20),
    "resnet56": functools.partial(resnet, 56),
    "resnet110": functools.partial(resnet, 110),
    "densenet40": functools.partial(densenet, 40, 12),
    "wrn32_4": functools.partial(wide_resnet, 32, 4),
}
"""Model names accepted by `get_model`, each mapped to a builder called as
`builder(input_shape, num_classes)`."""


_UNKNOWN_OBJECT = re.compile(r"Could not locate (class|function) '([^']+)'")


def _read_model_file(path: str) -> keras.Model:
    """The model saved in `path`, uncompiled (a custom loss or metric needs
    no registration), or a one-line `ValueError`."""
    if not zipfile.is_zipfile(path) and not path.endswith((".h5", ".hdf5")):
        raise ValueError(
            f"{path} is not a Keras model file (.keras): save one with "
            f"`model.save(...)`. Received: model={path!r}"
        )
    try:
        return keras.saving.load_model(path, compile=False)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as e:
        chain, cause = [], e
        while cause is not None and len(chain) < 8:
            chain.append(str(cause))
            cause = cause.__cause__ or cause.__context__
        unknown = _UNKNOWN_OBJECT.search(" ".join(chain))
        if unknown:
            kind, name = unknown.groups()
            raise ValueError(
                f"The model in {path} uses the unregistered custom {kind} "
                f"{name!r}: register it with "
                "`@keras.saving.register_keras_serializable()`, or use stock "
                f"Keras layers. Received: model={path!r}"
            ) from e
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"The model file {path} does not load with "
            f"`keras.saving.load_model` ({first.rstrip('.')}). "
            f"Received: model={path!r}"
        ) from e


def _load_model_file(
    path: str, input_shape: tuple[int, int, int], num_classes: int
) -> keras.Model:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No model file at {path!r}: pass an existing `.keras` file or "
            f"one of {sorted(MODELS)}."
        )
    model = _read_model_file(path)
    if len(model.outputs) != 1:
        names = ", ".join(getattr(model, "output_names", None) or [])
        raise ValueError(
            f"The model in {path!r} has {len(model.outputs)} outputs "
            f"({names}): save one with a single softmax or linear output."
        )
    outputs = model.output_shape
    if not isinstance(outputs, tuple) or len(outputs) != 2:
        raise ValueError(
            f"The model in {path!r} must output (batch, classes): flatten or "
            f"pool its output. Received: output_shape={outputs}"
        )
    if outputs[-1] != num_classes:
        raise ValueError(
            f"The model in {path!r} has output shape {outputs}: its last "
            "layer needs one unit per class. Received: "
            f"num_classes={num_classes}"
        )
    inputs = model.input_shape
    if (
        not isinstance(inputs, tuple)
        or len(inputs) != 4
        or any(
            m is not None and m != d
            for m, d in zip(inputs[1:], input_shape, strict=True)
        )
    ):
        raise ValueError(
            f"The model in {path!r} takes inputs of shape {inputs}: pass a "
            "model built for these images. Received: "
            f"input_shape={input_shape}"
        )
    return model


def get_model(
    name: str | os.PathLike,
    input_shape: Sequence[int],
    num_classes: int,
) -> keras.Model:
    """Builds a model by name, or loads one from a `.keras` file.

    The command-line and quick-start entry point: `name` is a key of `MODELS`
    (`"small_cnn"`, `"resnet20"`, `"resnet56"`, `"resnet110"`,
    `"densenet40"`, `"wrn32_4"`, the networks of Huang et al. 2017,
    arXiv:1704.00109), or the path of a model saved with `model.save(...)`,
    which is loaded with `keras.saving.load_model` and checked against
    `input_shape` and `num_classes`.

    Args:
        name: A key of `MODELS`, or the path of a `.keras` file.
        input_shape: `(height, width, channels)` of one image.
        num_classes: Number of classes of the softmax output.

    Returns:
        An uncompiled `keras.Model` (a file is loaded with `compile=False`).

    Raises:
        ValueError: If `name` is neither a known model nor a path, or the
            loaded model does not fit `input_shape` and `num_classes`.
        FileNotFoundError: If `name` looks like a path and no file is there.

    Example:

    ```python
    model = get_model("resnet20", (32, 32, 3), 10)
    model.save("/tmp/resnet20.keras")
    again = get_model("/tmp/resnet20.keras", (32, 32, 3), 10)
    ```
    """
    input_shape = _check_input_shape(input_shape)
    num_classes = _check_num_classes(num_classes)
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        raise TypeError(
            f"`name` must be a model name, one of {sorted(MODELS)}, or the "
            f"path of a `.keras` file. Received: name={name!r}"
        )
    if name in MODELS:
        return MODELS[name](input_shape, num_classes)
    if name.endswith(".keras") or os.sep in name or os.path.exists(name):
        return _load_model_file(name, input_shape, num_classes)
    raise ValueError(
        f"Unknown model name {name!r}: use one of {sorted(MODELS)} or the "
        f"path of a `.keras` file. Received: name={name!r}"
    )
