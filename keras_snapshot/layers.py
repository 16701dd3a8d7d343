"""Layers for ensemble outputs: temperature scaling and uncertainty.

`build_ensemble(temperature=...)` and `build_ensemble(extra_outputs=...)`
use them. They are registered serializable, so an ensemble that has them
reloads from `.keras` once `keras_snapshot` is imported, and its SavedModel
export needs nothing at all.
"""

import keras
from keras import ops

from keras_snapshot._checks import check_positive_number

_EPSILON = 1e-12


def _entropy(probabilities):
    return -ops.sum(
        probabilities * ops.log(ops.maximum(probabilities, _EPSILON)), axis=-1
    )


@keras.saving.register_keras_serializable(package="keras_snapshot")
class TemperatureScaling(keras.layers.Layer):
    """Rescales probabilities by a temperature: `softmax(log(p) / T)`.

    Temperature scaling (Guo et al. 2017) calibrates an ensemble's
    confidence without changing its predicted classes. Fit `temperature` on
    validation data with `keras_snapshot.selection.fit_temperature`.

    Args:
        temperature: A positive number; above 1 softens, below 1 sharpens.

    Example:

    ```python
    layer = TemperatureScaling(temperature=1.5)
    calibrated = layer(probabilities)
    ```
    """

    def __init__(self, temperature: float, **kwargs):
        super().__init__(**kwargs)
        self.temperature = check_positive_number("temperature", temperature)

    def call(self, probabilities):
        logits = ops.log(ops.maximum(probabilities, _EPSILON))
        return ops.softmax(logits / self.temperature, axis=-1)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="keras_snapshot")
class PredictiveEntropy(keras.layers.Layer):
    """Entropy (in nats) of each row of probabilities: the total uncertainty.

    Example:

    ```python
    entropy = PredictiveEntropy()(probabilities)  # shape (batch,)
    ```
    """

    def call(self, probabilities):
        return _entropy(probabilities)


@keras.saving.register_keras_serializable(package="keras_snapshot")
class MutualInformation(keras.layers.Layer):
    """Disagreement between members: entropy of the mean minus mean entropy.

    Called on the list of member probabilities; zero when all members
    agree (the epistemic part of the uncertainty, as in BALD).

    Example:

    ```python
    disagreement = MutualInformation()([p1, p2, p3])  # shape (batch,)
    ```
    """

    def call(self, member_probabilities):
        stacked = ops.stack(member_probabilities, axis=0)
        mean_entropy = ops.mean(_entropy(stacked), axis=0)
        return ops.maximum(
            _entropy(ops.mean(stacked, axis=0)) - mean_entropy, 0.0
        )
