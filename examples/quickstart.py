"""Snapshot Ensembles with the keras-snapshot API, on scikit-learn's digits.

python examples/quickstart.py
"""

import keras
import numpy as np
import tensorflow as tf

import keras_snapshot
from keras_snapshot.app.datasets import load_dataset

data = load_dataset("digits")  # 8x8 images bundled with scikit-learn
epochs, batch_size, num_snapshots = 40, 32, 4
steps_per_epoch = int(np.ceil(len(data.x_train) / batch_size))

schedule = keras_snapshot.SnapshotSchedule.from_epochs(
    0.2, epochs, steps_per_epoch, num_snapshots
)
model = keras.Sequential(
    [
        keras.Input(data.input_shape),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
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
    verbose=2,
)

ensemble = keras_snapshot.build_ensemble("quickstart_snapshots")
for i, member in enumerate(
    keras_snapshot.load_snapshots("quickstart_snapshots")
):
    error = keras_snapshot.metrics.error_rate(
        member.predict(data.x_test, verbose=0), data.y_test
    )
    print(f"snapshot {i + 1}: test error {100 * error:.2f}%")
error = keras_snapshot.metrics.error_rate(
    ensemble.predict(data.x_test, verbose=0), data.y_test
)
print(f"ensemble:   test error {100 * error:.2f}%")
ensemble.save("quickstart_ensemble.keras")
ensemble.export("quickstart_savedmodel")  # TensorFlow SavedModel
served = tf.saved_model.load("quickstart_savedmodel")  # keep a reference
print(served.serve(data.x_test[:2]))
