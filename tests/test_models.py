"""Tests for `keras_snapshot.app.models`."""

import keras
import numpy as np
import pytest

from keras_snapshot.app import models

# The deep CIFAR networks, a few seconds each on a CPU.
BIG = {"resnet56", "resnet110", "densenet40", "wrn32_4"}


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _resnet_params(depth, channels, num_classes, widths=(16, 32, 64)):
    """Trainable parameters of the option-A CIFAR ResNet, counted by hand."""
    n = (depth - 2) // 6
    total = 9 * channels * 16 + 2 * 16  # stem conv + BN
    c_in = 16
    for filters in widths:
        for _ in range(n):
            total += 9 * c_in * filters + 9 * filters * filters + 4 * filters
            c_in = filters
    return total + c_in * num_classes + num_classes


def _densenet_params(depth, k, channels, num_classes):
    """Trainable parameters of the CIFAR DenseNet, counted by hand."""
    total, c = 9 * channels * 16, 16
    for block in range(3):
        for _ in range((depth - 4) // 3):
            total += 2 * c + 9 * c * k  # BN + conv3x3
            c += k
        if block < 2:
            total += 2 * c + c * c  # BN + conv1x1
    return total + 2 * c + c * num_classes + num_classes


@pytest.mark.parametrize(
    "name, published",
    [
        ("resnet20", 0.27e6),
        ("resnet56", 0.85e6),
        ("resnet110", 1.7e6),
        ("densenet40", 1.0e6),
    ],
)
def test_param_counts_match_papers(name, published):
    model = models.get_model(name, (32, 32, 3), 10)
    assert abs(_trainable(model) - published) / published < 0.03


@pytest.mark.parametrize("depth", [8, 20, 56])
@pytest.mark.parametrize("shape, classes", [((32, 32, 3), 10), ((8, 8, 1), 3)])
def test_resnet_params_match_hand_count(depth, shape, classes):
    model = models.resnet(depth, shape, classes)
    assert _trainable(model) == _resnet_params(depth, shape[-1], classes)


@pytest.mark.parametrize("depth, k", [(40, 12), (10, 4)])
def test_densenet_params_match_hand_count(depth, k):
    model = models.densenet(depth, k, (32, 32, 3), 100)
    assert _trainable(model) == _densenet_params(depth, k, 3, 100)


def test_zero_pad_shortcut_is_subsample_and_zero_channels():
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype("float32")
    inputs = keras.Input((8, 8, 16))
    block = keras.Model(inputs, models._zero_pad_shortcut(inputs, 32, 2))
    expected = np.pad(x[:, ::2, ::2], ((0, 0), (0, 0), (0, 0), (8, 8)))
    np.testing.assert_array_equal(block.predict(x, verbose=0), expected)
    assert block.count_params() == 0


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow) if name in BIG else name
        for name in sorted(models.MODELS)
    ],
)
def test_registry_models_output_softmax(name):
    keras.utils.set_random_seed(0)
    model = models.get_model(name, (32, 32, 3), 7)
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3))
    y = model.predict(x.astype("float32"), verbose=0)
    assert model.output_shape == (None, 7)
    assert y.shape == (2, 7)
    assert np.all(y >= 0)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)


def _kernel_layers(model):
    return [
        layer
        for layer in model.layers
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
    ]


def test_model_names():
    assert models.resnet(20).name == "resnet20"
    assert models.densenet().name == "densenet40_k12"
    assert models.wide_resnet().name == "wrn32_4"
    assert models.small_cnn((8, 8, 1), 10).name == "small_cnn"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow) if name in BIG else name
        for name in sorted(models.MODELS)
    ],
)
def test_no_regularizer_by_default(name):
    """Weight decay is the optimizer's job (the CLI's `--weight-decay`):
    a default L2 penalty would decay the weights a second time."""
    model = models.get_model(name, (8, 8, 1), 3)
    assert not model.losses
    for layer in _kernel_layers(model):
        assert layer.kernel_regularizer is None


def test_explicit_weight_decay_adds_coupled_l2():
    model = models.resnet(20, weight_decay=1e-4)
    kernels = _kernel_layers(model)
    assert len(kernels) == 20
    for layer in kernels:
        assert isinstance(layer.kernel_initializer, keras.initializers.HeNormal)
        reg = layer.kernel_regularizer
        np.testing.assert_allclose(reg.get_config()["l2"], 0.5e-4)
    assert len(model.losses) == 20
    decayed = models.small_cnn((8, 8, 1), 10, weight_decay=1e-4)
    assert len(decayed.losses) == 4


def test_wide_resnet_is_wider():
    model = models.wide_resnet(14, 2, (8, 8, 1), 10)
    convs = [
        layer.filters
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D)
    ]
    assert max(convs) == 128
    assert model.output_shape == (None, 10)


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_small_cnn_shapes(shape):
    model = models.small_cnn(shape, 10)
    y = model.predict(np.zeros((3, *shape), "float32"), verbose=0)
    assert y.shape == (3, 10)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)


def test_small_cnn_fits_tiny_data():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, size=64)
    model = models.get_model("small_cnn", (8, 8, 1), 10)
    model.compile("adam", "sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


@pytest.mark.parametrize("depth", [0, 2, 19, 21, 111, -4, 20.0, True, "20"])
def test_resnet_bad_depth(depth):
    with pytest.raises(ValueError, match=r"6 \* n \+ 2.*Received: depth="):
        models.resnet(depth)


@pytest.mark.parametrize("depth", [4, 39, 41, 40.0])
def test_densenet_bad_depth(depth):
    with pytest.raises(ValueError, match=r"3 \* L \+ 4.*Received: depth="):
        models.densenet(depth)


def test_bad_width_growth_shape_and_classes():
    with pytest.raises(ValueError, match="Received: width=0"):
        models.wide_resnet(32, 0)
    with pytest.raises(ValueError, match="Received: growth_rate=0"):
        models.densenet(40, 0)
    with pytest.raises(ValueError, match=r"Received: input_shape=\(32, 32\)"):
        models.small_cnn((32, 32), 10)
    with pytest.raises(ValueError, match="Received: num_classes=1"):
        models.get_model("resnet20", (32, 32, 3), 1)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown model name 'resnet21'") as e:
        models.get_model("resnet21", (32, 32, 3), 10)
    for name in models.MODELS:
        assert name in str(e.value)
    assert ".keras" in str(e.value)


def test_keras_file_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = models.resnet(8, (8, 8, 1), 4)
    path = tmp_path / "net.keras"
    model.save(path)
    x = np.random.default_rng(1).uniform(size=(5, 8, 8, 1)).astype("float32")
    for name in (path, str(path)):
        loaded = models.get_model(name, (8, 8, 1), 4)
        assert loaded.name == "resnet8"
        np.testing.assert_allclose(
            loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
        )


def test_keras_file_checks(tmp_path):
    path = tmp_path / "small.keras"
    models.small_cnn((8, 8, 1), 10).save(path)
    with pytest.raises(ValueError, match=r"small\.keras.*num_classes=3"):
        models.get_model(path, (8, 8, 1), 3)
    with pytest.raises(ValueError, match=r"small\.keras.*input_shape"):
        models.get_model(path, (28, 28, 1), 10)
    missing = str(tmp_path / "missing.keras")
    with pytest.raises(FileNotFoundError, match=r"missing\.keras"):
        models.get_model(missing, (8, 8, 1), 10)
