"""Snapshot Ensembles with the keras-snapshot API, on scikit-learn's digits.

One training run with the cyclic cosine rate of Huang et al. 2017
(arXiv:1704.00109) leaves M snapshots; their average is the ensemble. The
script prints each snapshot's test error, then the ensemble against the
final single model (the last snapshot) in error and negative log-likelihood
(NLL), and says how many test images the error difference is.

On digits a small CNN already gets about 99% of the 539 test images right,
so the ensemble and the single model differ by a few images, either way,
and their NLLs differ little: on digits the gain is not distinguishable
from noise, and the script says so rather than promise one. The paper's
gains are on CIFAR (`examples/cifar_resnet.py`).

python examples/quickstart.py
"""

import math
import os

# Before TensorFlow loads: without a GPU, it would log "failed call to cuInit".
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_snapshot  # noqa: E402
from keras_snapshot.app.datasets import load_dataset  # noqa: E402

keras.utils.set_random_seed(0)  # the same numbers on every run
data = load_dataset("digits")  # 8x8 images bundled with scikit-learn
epochs, batch_size, num_snapshots = 40, 32, 4
# The steps `fit` will run per epoch: the schedule's cycles end exactly at
# the snapshot points only if it counts the same steps as `fit`. (Fitting
# with `validation_split`? Count the images `fit` trains on.)
steps_per_epoch = math.ceil(len(data.x_train) / batch_size)

schedule = keras_snapshot.SnapshotSchedule.from_epochs(
    0.2, epochs, steps_per_epoch, num_snapshots
)
# Any Keras model. BatchNormalization keeps the high restart rate (0.2)
# stable; without it this small CNN diverges at every restart.
model = keras.Sequential(
    [
        keras.Input(data.input_shape),
        keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(2, padding="same"),
        keras.layers.Conv2D(64, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(data.num_classes, activation="softmax"),
    ]
)
model.compile(
    optimizer=keras.optimizers.SGD(schedule, momentum=0.9),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)
model.fit(
    data.x_train,
    data.y_train,
    batch_size=batch_size,
    epochs=epochs,
    callbacks=[keras_snapshot.SnapshotCheckpoint("quickstart_snapshots")],
    verbose=0,  # The checkpoint prints a line per snapshot.
)


def test_metrics(probabilities):
    """(error, NLL) on the test split."""
    result = keras_snapshot.metrics.evaluate_predictions(
        probabilities, data.y_test
    )
    return result["error"], result["nll"]


snapshots = keras_snapshot.load_snapshots("quickstart_snapshots")
for i, member in enumerate(snapshots):
    error, nll = test_metrics(member.predict(data.x_test, verbose=0))
    print(f"snapshot {i + 1}: test error {100 * error:.2f}%, NLL {nll:.4f}")
ensemble = keras_snapshot.build_ensemble("quickstart_snapshots")
single_error, single_nll = test_metrics(
    snapshots[-1].predict(data.x_test, verbose=0)
)
error, nll = test_metrics(ensemble.predict(data.x_test, verbose=0))
print(
    f"single model (final snapshot): test error {100 * single_error:.2f}%, "
    f"NLL {single_nll:.4f}"
)
print(
    f"ensemble of {len(snapshots)} snapshots:  test error {100 * error:.2f}%, "
    f"NLL {nll:.4f}"
)
images = len(data.y_test)
more_right = round((single_error - error) * images)
nll_change = 1 - nll / single_nll
if more_right:
    than = f"{abs(more_right)} {'more' if more_right > 0 else 'fewer'}"
    than += f" of the {images} test images right than"
else:
    than = f"as many of the {images} test images right as"
print(
    f"The ensemble gets {than} the single model (one image is "
    f"{100 / images:.2f}%), and its NLL is {100 * abs(nll_change):.0f}% "
    f"{'lower' if nll_change >= 0 else 'higher'}. On digits, a few images "
    "either way is noise; the paper's gains are on CIFAR "
    "(examples/cifar_resnet.py)."
)
ensemble.save("quickstart_ensemble.keras")
ensemble.export("quickstart_savedmodel")  # TensorFlow SavedModel
served = tf.saved_model.load("quickstart_savedmodel")  # keep a reference
print(served.serve(data.x_test[:2]))
