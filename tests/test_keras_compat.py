"""Each Keras internal that `_keras_compat` relies on, checked on the
installed Keras: a release that changes one fails here, by name.

CI runs this file on the floor Keras (3.8.0) and on the newest.
"""

import inspect
import os

import keras
import numpy as np
import pytest
from helpers import CrashAtEpochEnd
from helpers import make_data
from helpers import make_model

import keras_snapshot
from keras_snapshot import _keras_compat as compat
from keras_snapshot._steps import join_fit


def compiled(optimizer, **compile_kwargs):
    model = make_model()
    model.compile(
        optimizer, "sparse_categorical_crossentropy", **compile_kwargs
    )
    return model


def test_the_installed_keras_is_at_least_the_floor():
    assert compat._version_tuple(keras.version()) >= compat.KERAS_FLOOR
    assert compat._version_tuple("3.10.0.dev2025") == (3, 10)


def test_the_schedule_object_is_kept_in_the_optimizer():
    # `optimizer._learning_rate` holds the schedule itself.
    schedule = keras_snapshot.SnapshotSchedule(0.1, 12, 3)
    assert compat.learning_rate_schedule(keras.optimizers.SGD(schedule)) is (
        schedule
    )
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(schedule))
    assert compat.learning_rate_schedule(scaled) is schedule
    assert compat.learning_rate_schedule(keras.optimizers.SGD(0.1)) is None


def test_updates_are_counted_under_loss_scaling():
    # Keras 3.8's LossScaleOptimizer keeps its own `iterations` at 0: the
    # inner optimizer counts the updates.
    x, y = make_data(n=64)
    model = compiled(
        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01))
    )
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert compat.optimizer_iterations(model.optimizer) == 8


def test_batchnorm_renorm_is_read_where_keras_has_it():
    assert compat.batchnorm_renorm(keras.layers.BatchNormalization()) is False
    arguments = inspect.signature(keras.layers.BatchNormalization).parameters
    if "renorm" in arguments:  # Keras 3.14+
        layer = keras.layers.BatchNormalization(renorm=True)
        assert compat.batchnorm_renorm(layer) is True


def test_nested_layers_lists_every_layer_parents_first():
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3)], name="inner"
    )
    outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2)])
    names = [layer.name for layer in compat.nested_layers(outer)]
    assert names[0] == outer.name
    assert names.index("inner") < names.index(inner.layers[0].name)
    assert outer.layers[-1].name in names
    assert outer.name not in [
        la.name for la in compat.nested_layers(outer, include_self=False)
    ]


def test_backup_and_restore_writes_the_files_we_look_for(tmp_path):
    x, y = make_data(n=32)
    model = compiled(keras.optimizers.SGD(0.1))
    backup = tmp_path / "backup"
    with pytest.raises(RuntimeError):
        model.fit(
            x,
            y,
            batch_size=16,
            epochs=3,
            verbose=0,
            callbacks=[
                keras.callbacks.BackupAndRestore(str(backup)),
                CrashAtEpochEnd(0),
            ],
        )
    assert set(compat.BACKUP_AND_RESTORE_FILES) <= set(os.listdir(backup))


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: keras.optimizers.SGD(0.1, momentum=0.9),
        lambda: keras.optimizers.Adam(0.01),
        lambda: keras.optimizers.AdamW(0.01, weight_decay=0.01),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_the_optimizer_methods_freezeout_wraps_are_as_expected(optimizer):
    model = compiled(optimizer())
    model.optimizer.build(model.trainable_variables)
    compat.check_optimizer_internals(model.optimizer)  # Does not raise.
    for name in compat.WRAPPED_METHODS:
        assert callable(getattr(model.optimizer, name)), name


def test_an_optimizer_that_does_not_match_is_refused_with_the_keras_version():
    model = compiled(keras.optimizers.SGD(0.1))
    model.optimizer.build(model.trainable_variables)
    model.optimizer.update_step = lambda gradient: None  # Another signature.
    with pytest.raises(ValueError, match=rf"Keras {keras.version()}"):
        compat.check_optimizer_internals(model.optimizer)


def test_fit_frame_is_the_frame_of_fit():
    found = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            found["name"] = compat.fit_frame(self).f_code.co_name

    x, y = make_data(n=16)
    model = compiled(keras.optimizers.SGD(0.1))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[Probe()])
    assert found["name"] == "fit"


def test_every_callback_of_a_fit_gets_the_same_params_dict():
    # `_steps.join_fit` tells the fits apart by this dict.
    seen = []

    class Peer(keras.callbacks.Callback):
        def set_params(self, params):
            super().set_params(params)
            join_fit(self)
            seen.append(params)

        def check_fit_peer(self, other):
            seen.append(("met", other))

    first, second = Peer(), Peer()
    x, y = make_data(n=16)
    model = compiled(keras.optimizers.SGD(0.1))
    for _ in range(2):  # A second fit: the peers meet again, once.
        model.fit(x, y, epochs=1, verbose=0, callbacks=[first, second])
    dicts = [s for s in seen if isinstance(s, dict)]
    assert dicts[0] is dicts[1] and dicts[2] is dicts[3]
    assert dicts[0] is not dicts[2]
    assert seen.count(("met", first)) == 2
    assert seen.count(("met", second)) == 2


def test_a_backend_other_than_tensorflow_or_jax_is_refused_in_one_line():
    compat.check_backend()  # The backend of this test run.
    with pytest.raises(RuntimeError, match=r"Received: backend='torch'"):
        compat.check_backend("torch")


def test_make_train_function_can_be_forced_again():
    # FreezeOut retraces after a freeze with `make_train_function(force=
    # True)`; `fit` itself calls `make_train_function` first.
    model = compiled(keras.optimizers.SGD(0.1))
    model.make_train_function()
    first = model.train_function
    model.make_train_function(force=True)
    assert callable(first) and callable(model.train_function)
    assert model.train_function is not first
    assert np.isfinite(model.evaluate(*make_data(n=16), verbose=0))


def test_model_checkpoint_best_is_none_before_any_score(tmp_path):
    # Keras 3.8 starts `best` at +-inf, later releases at None.
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "best.keras"), monitor="loss", save_best_only=True
    )
    assert compat.model_checkpoint_best(checkpoint) is None
    x, y = make_data(n=16)
    model = compiled(keras.optimizers.SGD(0.1))
    model.fit(x, y, epochs=1, verbose=0, callbacks=[checkpoint])
    assert np.isfinite(compat.model_checkpoint_best(checkpoint))
