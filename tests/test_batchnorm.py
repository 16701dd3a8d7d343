import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import make_data
from helpers import make_model

from keras_snapshot import recalibrate_batchnorm


def _stats(layer):
    return layer.moving_mean.numpy(), layer.moving_variance.numpy()


def test_moving_statistics_equal_numpy_moments_of_layer_inputs():
    keras.utils.set_random_seed(0)
    x, _ = make_data(n=100)
    model = make_model()
    dense, bn = model.layers[0], model.layers[1]
    weights_before = [w.copy() for w in model.get_weights()]
    # batch 32 over 100 samples: uneven last batch, weighted exactly.
    recalibrate_batchnorm(model, x, batch_size=32)
    features = x @ dense.kernel.numpy() + dense.bias.numpy()
    mean, variance = _stats(bn)
    np.testing.assert_allclose(mean, features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance, features.var(0), rtol=1e-4, atol=1e-6)
    # Only the moving statistics changed; momentum is restored.
    after = model.get_weights()
    for before, now, variable in zip(weights_before, after, model.weights):
        if "moving" not in variable.path:
            np.testing.assert_array_equal(before, now)
    assert bn.momentum == 0.99


def test_dataset_with_labels_and_nested_models():
    keras.utils.set_random_seed(0)
    x, y = make_data(n=64)
    inner = make_model(name="inner")
    inputs = keras.Input((8,))
    hidden = inner(inputs)
    outputs = keras.layers.BatchNormalization(name="outer_bn")(hidden)
    model = keras.Model(inputs, outputs)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    recalibrate_batchnorm(model, dataset)
    dense, bn = inner.layers[0], inner.layers[1]
    features = x @ dense.kernel.numpy() + dense.bias.numpy()
    np.testing.assert_allclose(
        _stats(bn)[0], features.mean(0), rtol=1e-5, atol=1e-6
    )
    # The outer layer sees the inner model's training-mode outputs, batch
    # by batch (the inner BatchNorm normalises with each batch's moments).
    inner_out = np.concatenate(
        [
            keras.ops.convert_to_numpy(inner(x[i : i + 16], training=True))
            for i in range(0, 64, 16)
        ]
    )
    np.testing.assert_allclose(
        _stats(model.get_layer("outer_bn"))[0],
        inner_out.mean(0),
        rtol=1e-4,
        atol=1e-5,
    )


def test_model_without_batchnorm_is_unchanged():
    x, _ = make_data()
    model = make_model(batchnorm=False)
    before = [w.copy() for w in model.get_weights()]
    assert recalibrate_batchnorm(model, x) is model
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_frozen_batchnorm_is_left_alone():
    x, _ = make_data()
    model = make_model()
    model.layers[1].trainable = False
    before = _stats(model.layers[1])
    recalibrate_batchnorm(model, x)
    np.testing.assert_array_equal(before[0], _stats(model.layers[1])[0])


def test_steps_limits_the_batches():
    x, _ = make_data(n=96)
    model = make_model()
    recalibrate_batchnorm(model, x, batch_size=16, steps=2)
    dense = model.layers[0]
    features = x[:32] @ dense.kernel.numpy() + dense.bias.numpy()
    np.testing.assert_allclose(
        _stats(model.layers[1])[0], features.mean(0), rtol=1e-5, atol=1e-6
    )


def test_bad_input():
    model = make_model()
    with pytest.raises(ValueError, match="empty"):
        recalibrate_batchnorm(model, np.zeros((0, 8), "float32"))
    with pytest.raises(ValueError, match="batch_size"):
        recalibrate_batchnorm(model, np.zeros((4, 8), "float32"), batch_size=0)
