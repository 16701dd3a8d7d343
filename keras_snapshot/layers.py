"""Layers for ensemble outputs: temperature scaling and uncertainty.

`temperature_logits` and `temperature_softmax` are the one implementation
of temperature scaling (layer, distillation, selection).
"""

import keras
import numpy as np
from keras import ops
from scipy import special

from keras_snapshot._checks import check_positive_number

_EPSILON = 1e-12


def _entropy(probabilities):
    return -ops.sum(
        probabilities * ops.log(ops.maximum(probabilities, _EPSILON)), axis=-1
    )


def temperature_logits(
    scores, temperature: float, from_logits: bool = False, epsilon=_EPSILON
):
    """The logits of temperature scaling: `z / T`.

    As in temperature scaling (Guo et al. 2017) and distillation (Hinton et
    al. 2015, arXiv:1503.02531); for probabilities `p`, `z = log(p)` with `p`
    floored at `epsilon`. Numpy arrays stay numpy, tensors use `keras.ops`.

    Args:
        scores: Probabilities, or logits if `from_logits=True`, classes on
            the last axis.
        temperature: A positive number (not checked here: callers check
            it once, where the user passes it).
        from_logits: Whether `scores` are logits.
        epsilon: The floor on probabilities before the logarithm.

    Returns:
        `z / T`, of the shape of `scores`.

    Example:

    ```python
    temperature_logits(np.array([[0.8, 0.2]]), 2.0)  # log([0.8, 0.2]) / 2
    ```
    """
    xp = np if isinstance(scores, np.ndarray) else ops
    logits = scores if from_logits else xp.log(xp.maximum(scores, epsilon))
    return logits / temperature


def temperature_softmax(scores, temperature: float, from_logits: bool = False):
    """Probabilities at temperature `T`: `softmax(z / T)`.

    `z` as in `temperature_logits`: `T > 1` softens, `T < 1` sharpens, the
    predicted class never changes.

    Example:

    ```python
    temperature_softmax(np.array([[0.8, 0.2]]), 2.0)  # [[2/3, 1/3]]
    ```
    """
    z = temperature_logits(scores, temperature, from_logits)
    if isinstance(z, np.ndarray):
        return special.softmax(z, axis=-1)
    return ops.softmax(z, axis=-1)


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
        return temperature_softmax(probabilities, self.temperature)

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
