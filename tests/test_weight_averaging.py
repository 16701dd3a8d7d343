"""`WeightAveraging` (SWA and EMA in `fit`), the greedy soup, old names.

Every update is checked against a numpy reference of the recorded weights.
The resume after a real kill is in `tests/test_resume.py`.
"""

import json
import os
import subprocess
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.path.insert(1, os.path.dirname(HERE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import CrashAtEpochEnd  # noqa: E402
from helpers import make_data  # noqa: E402
from helpers import make_model  # noqa: E402

from keras_snapshot import averaging as averaging_module  # noqa: E402
from keras_snapshot.averaging import AveragedModelCheckpoint  # noqa: E402
from keras_snapshot.averaging import WeightAveraging  # noqa: E402
from keras_snapshot.averaging import average_weights  # noqa: E402
from keras_snapshot.averaging import ema_weight  # noqa: E402


def numpy_weights(model):
    return [keras.ops.convert_to_numpy(v) for v in model.weights]


class Recorder(keras.callbacks.Callback):
    """After the averaging callback: the model's weights at every optimizer
    step, and the average each time its count grows."""

    def __init__(self, averaging):
        super().__init__()
        self.averaging = averaging
        self.by_step = {}
        self.averages = {}

    def _record(self):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.by_step.setdefault(step, numpy_weights(self.model))
        count = self.averaging.num_averaged
        if count and count not in self.averages:
            self.averages[count] = (
                self.averaging._last_step,
                self.averaging.averaged_weights(),
            )

    def on_train_batch_begin(self, batch, logs=None):
        self._record()

    def on_epoch_end(self, epoch, logs=None):
        self._record()

    def on_train_end(self, logs=None):
        self._record()


def fit_with(
    callback, epochs=3, batchnorm=False, accumulation=None, callbacks=(), **kw
):
    """48 samples, batch 8: 6 batches per epoch."""
    keras.utils.set_random_seed(0)
    x, y = make_data(n=48)
    model = make_model(batchnorm=batchnorm)
    model.compile(
        keras.optimizers.SGD(
            0.05, momentum=0.9, gradient_accumulation_steps=accumulation
        ),
        "sparse_categorical_crossentropy",
    )
    recorder = Recorder(callback)
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[*callbacks, callback, recorder],
        **kw,
    )
    return model, recorder, history


def numpy_average(mode, weights_by_update, decay=None, warmup=False):
    """The reference: the average after each update, as a list."""
    averages, average = [], None
    for n, weights in enumerate(weights_by_update):
        weights = [w.astype(np.float64) for w in weights]
        if average is None:
            average = weights
        else:
            if mode == "swa":
                rate = 1.0 / (n + 1)
            else:
                d = min(decay, (1 + n) / (10 + n)) if warmup else decay
                rate = 1.0 - d
            average = [a + rate * (w - a) for a, w in zip(average, weights)]
        averages.append(average)
    return averages


@pytest.mark.parametrize(
    "kwargs, steps, fit_kwargs",
    [
        (
            {"mode": "swa", "start_epoch": 2, "average_batchnorm": True},
            [12, 18],
            {"batchnorm": True},
        ),
        (
            {"mode": "swa", "start_step": 3, "every_steps": 4},
            [3, 7, 11, 15],
            {},
        ),
        ({"mode": "ema", "decay": 0.7}, list(range(1, 19)), {}),
        (
            {"mode": "ema", "decay": 0.9, "warmup": True, "every_steps": 5},
            [5, 10, 15],
            {},
        ),
        # 6 batches per epoch, 2 per optimizer update: 9 updates.
        (
            {"mode": "ema", "decay": 0.8},
            list(range(1, 10)),
            {"accumulation": 2},
        ),
    ],
    ids=["swa_epochs_bn", "swa_steps", "ema", "ema_warmup_every_5", "ema_acc"],
)
def test_every_update_matches_numpy(kwargs, steps, fit_kwargs):
    """The one numpy reference of the running averages (SWA's mean, EMA
    with and without warm-up), BatchNorm statistics averaged too."""
    averaging = WeightAveraging(**kwargs, verbose=0)
    model, recorder, _ = fit_with(averaging, **fit_kwargs)
    assert averaging.num_averaged == len(steps)
    expected = numpy_average(
        kwargs["mode"],
        [recorder.by_step[s] for s in steps],
        kwargs.get("decay"),
        kwargs.get("warmup", False),
    )
    for count, want in enumerate(expected, start=1):
        last_step, got = recorder.averages[count]
        assert last_step == steps[count - 1]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # Training went on from the trained weights.
    for g, w in zip(
        numpy_weights(model), recorder.by_step[max(recorder.by_step)]
    ):
        np.testing.assert_array_equal(g, w)


def test_ema_weight_warmup_formula():
    assert ema_weight(0.99, True, 0) == 1.0
    assert ema_weight(0.99, True, 1) == pytest.approx(1 - 2 / 11)
    assert ema_weight(0.99, True, 1000) == pytest.approx(0.01)
    assert ema_weight(0.9, False, 3) == pytest.approx(0.1)


def test_batchnorm_is_recalibrated_not_averaged(tmp_path):
    x, _ = make_data(n=48)
    path = str(tmp_path / "swa.keras")
    averaging = WeightAveraging(
        start_epoch=2,
        recalibration_data=x,
        filepath=path,
        set_weights_at_end=True,
        verbose=0,
    )
    model, recorder, _ = fit_with(averaging, batchnorm=True)
    kernel = np.mean([recorder.by_step[s][0] for s in (12, 18)], axis=0)
    bias = np.mean([recorder.by_step[s][1] for s in (12, 18)], axis=0)
    features = x.astype(np.float64) @ kernel + bias
    for m in (model, keras.saving.load_model(path)):
        bn = m.layers[1]
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(bn.moving_mean),
            features.mean(0),
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(bn.moving_variance),
            features.var(0),
            rtol=1e-4,
            atol=1e-6,
        )


def test_validation_sees_the_average_and_training_the_trained_weights():
    x_val, y_val = make_data(n=80)
    x_val, y_val = x_val[48:], y_val[48:]
    averaging = WeightAveraging(
        mode="ema", decay=0.7, validate_with_average=True, verbose=0
    )

    class AtEpochEnd(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.averages, self.weights = [], []

        def on_epoch_end(self, epoch, logs=None):
            self.averages.append(averaging.averaged_weights())
            self.weights.append(numpy_weights(self.model))

    at_end = AtEpochEnd()
    keras.utils.set_random_seed(0)
    x, y = make_data(n=48)
    model = make_model(batchnorm=False)
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        "sparse_categorical_crossentropy",
    )
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=3,
        shuffle=False,
        verbose=0,
        validation_data=(x_val, y_val),
        callbacks=[averaging, at_end],
    )
    plain, _, _ = fit_with(WeightAveraging(mode="ema", verbose=0))
    probe = make_model(batchnorm=False)
    probe.compile(loss="sparse_categorical_crossentropy")
    for epoch, val_loss in enumerate(history.history["val_loss"]):
        probe.set_weights(at_end.averages[epoch])
        want = probe.evaluate(x_val, y_val, verbose=0)
        assert val_loss == pytest.approx(want, rel=1e-5)
        probe.set_weights(at_end.weights[epoch])
        raw = probe.evaluate(x_val, y_val, verbose=0)
        assert abs(val_loss - raw) > 1e-4  # Not the trained weights.
    # The trained weights are those of a run that never swapped.
    for g, w in zip(numpy_weights(model), numpy_weights(plain)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_averaged_checkpoint_saves_the_validated_average(tmp_path):
    """Each epoch's file is the model that `val_loss` scored (the EMA,
    BatchNorm recalibrated), the best file is the best epoch's, and training
    goes on from the trained weights."""
    x_val, y_val = make_data(n=80)
    x_val, y_val = x_val[48:], y_val[48:]
    x, _ = make_data(n=48)

    class CountingRecalibrations(WeightAveraging):
        recalibrations = 0

        def _recalibrate(self, model):
            self.recalibrations += 1
            super()._recalibrate(model)

    averaging = CountingRecalibrations(
        mode="ema",
        decay=0.7,
        validate_with_average=True,
        recalibration_data=x,
        verbose=0,
    )
    every = AveragedModelCheckpoint(averaging, str(tmp_path / "e{epoch}.keras"))
    best = AveragedModelCheckpoint(
        averaging,
        str(tmp_path / "best.keras"),
        monitor="val_loss",
        save_best_only=True,
    )
    # The checkpoints before the averaging: the epoch's update is taken first.
    model, _, history = fit_with(
        averaging,
        epochs=4,
        batchnorm=True,
        validation_data=(x_val, y_val),
        callbacks=[every, best],
    )
    # One recalibration per epoch, shared by validation and both checkpoints.
    assert averaging.recalibrations == 4
    val_losses = history.history["val_loss"]
    for epoch, val_loss in enumerate(val_losses, start=1):
        saved = keras.saving.load_model(tmp_path / f"e{epoch}.keras")
        got = saved.evaluate(x_val, y_val, verbose=0)
        assert got == pytest.approx(val_loss, rel=1e-5)
    best_epoch = int(np.argmin(val_losses)) + 1
    kept = keras.saving.load_model(tmp_path / f"e{best_epoch}.keras")
    for g, w in zip(
        numpy_weights(keras.saving.load_model(tmp_path / "best.keras")),
        numpy_weights(kept),
    ):
        np.testing.assert_array_equal(g, w)
    plain, _, _ = fit_with(
        WeightAveraging(mode="ema", verbose=0), epochs=4, batchnorm=True
    )
    for g, w in zip(numpy_weights(model), numpy_weights(plain)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_averaged_checkpoint_takes_the_epochs_last_update_first(tmp_path):
    # No validation, the checkpoint listed first: the update of the epoch's
    # last step (taken at epoch end) must be in the file.
    averaging = WeightAveraging(mode="ema", decay=0.7, verbose=0)
    every = AveragedModelCheckpoint(averaging, str(tmp_path / "e{epoch}.keras"))
    _, recorder, _ = fit_with(averaging, epochs=2, callbacks=[every])
    for epoch in (1, 2):
        last_step, want = recorder.averages[6 * epoch]
        assert last_step == 6 * epoch
        saved = keras.saving.load_model(tmp_path / f"e{epoch}.keras")
        for g, w in zip(numpy_weights(saved), want):
            np.testing.assert_array_equal(g, w)


class Scores(keras.callbacks.Callback):
    """Logs `score` = `scores[epoch]` (before the checkpoints that read it)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def on_epoch_end(self, epoch, logs=None):
        logs["score"] = self.scores[epoch]


def test_averaged_checkpoint_keeps_its_best_across_a_resume(tmp_path):
    """A run resumed by BackupAndRestore with new callbacks (a new process)
    does not overwrite the best average with a worse one; a new run does."""
    path = str(tmp_path / "best.keras")
    scores = [3.0, 1.0, 2.0, 1.5]  # Best at epoch 2; worse after the resume.

    def callbacks(stop=None):
        averaging = WeightAveraging(mode="ema", decay=0.7, verbose=0)
        best = AveragedModelCheckpoint(
            averaging, path, monitor="score", mode="min", save_best_only=True
        )
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
        extra = [] if stop is None else [CrashAtEpochEnd(stop, "interrupted")]
        return averaging, [backup, Scores(scores), best, *extra]

    averaging, first = callbacks(stop=1)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit_with(averaging, epochs=4, callbacks=first)
    kept = numpy_weights(keras.saving.load_model(path))
    with open(f"{path}.best.json") as f:
        record = json.load(f)
    assert record.pop("run") == averaging._state.run_number() > 0
    assert record == {"monitor": "score", "best": 1.0, "epoch": 2, "step": 12}
    averaging, resumed = callbacks()
    fit_with(averaging, epochs=4, callbacks=resumed)
    assert resumed[2].best == 1.0
    for g, w in zip(numpy_weights(keras.saving.load_model(path)), kept):
        np.testing.assert_array_equal(g, w)
    # A new run (from step 0, no backup left) starts its own best.
    averaging, fresh = callbacks()
    fit_with(averaging, epochs=1, callbacks=fresh)
    assert fresh[2].best == 3.0
    with open(f"{path}.best.json") as f:
        assert json.load(f)["epoch"] == 1


def test_a_best_record_of_another_run_is_not_used(tmp_path, capsys):
    """A model trained on (step > 0) by new callbacks is another run: the
    best score the first run left beside the file does not hold it back."""
    path = str(tmp_path / "best.keras")

    def checkpoint(averaging):
        return AveragedModelCheckpoint(
            averaging, path, monitor="score", mode="min", save_best_only=True
        )

    first = WeightAveraging(mode="ema", decay=0.7, verbose=0)
    model, _, _ = fit_with(
        first, epochs=2, callbacks=[Scores([1.0, 0.5]), checkpoint(first)]
    )
    second = WeightAveraging(
        mode="ema", decay=0.7, start_step=13, every_steps=1, verbose=0
    )
    best = checkpoint(second)
    x, y = make_data(n=48)
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[second, Scores([2.0, 3.0]), best],
    )
    assert best.best == 2.0
    with open(f"{path}.best.json") as f:
        record = json.load(f)
    assert record["best"] == 2.0 and record["step"] == 18
    assert record["run"] == second._state.run_number() != 0
    assert "written by another run" in capsys.readouterr().out


def test_two_averages_of_one_mode_in_a_fit_are_refused():
    with pytest.raises(ValueError, match=r"one SWA average.*Received: callb"):
        fit_with(
            WeightAveraging(start_epoch=1, verbose=0),
            callbacks=[WeightAveraging(start_epoch=2, verbose=0)],
        )
    swa = WeightAveraging(mode="swa", start_epoch=1, verbose=0)
    ema = WeightAveraging(mode="ema", verbose=0)
    fit_with(swa, callbacks=[ema])  # One of each mode: each its own.
    assert (swa.num_averaged, ema.num_averaged) == (3, 18)


def test_a_new_callback_starts_a_new_average_and_says_so(capsys):
    first = WeightAveraging(mode="swa", start_epoch=1, verbose=0)
    model, _, _ = fit_with(first, epochs=2)
    assert first.num_averaged == 2
    x, y = make_data(n=48)
    second = WeightAveraging(mode="swa", start_epoch=1)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[second])
    assert second.num_averaged == 2  # Not 4: the first one's is not its.
    assert "starts a new average" in capsys.readouterr().out
    # The same callback in a later fit continues its own average.
    model.fit(
        x,
        y,
        batch_size=8,
        initial_epoch=2,
        epochs=4,
        verbose=0,
        callbacks=[second],
    )
    assert second.num_averaged == 4


def test_average_in_model_in_the_middle_of_an_epoch_adds_no_update():
    swa = WeightAveraging(mode="swa", start_epoch=1, verbose=0)
    peeked = []

    class Peek(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            with swa.average_in_model():
                peeked.append(swa.num_averaged)

    fit_with(swa, epochs=3, callbacks=[Peek()])
    assert swa.num_averaged == 3  # One per epoch, not one per peek.
    assert peeked == [0] * 6 + [1] * 6 + [2] * 6
    unpeeked = WeightAveraging(mode="swa", start_epoch=1, verbose=0)
    fit_with(unpeeked, epochs=3)
    for got, want in zip(swa.averaged_weights(), unpeeked.averaged_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("averaging_last", [True, False])
def test_set_weights_at_end_and_early_stopping_the_last_listed_wins(
    averaging_last,
):
    """Both set the weights in `on_train_end`; Keras runs the hooks in
    list order, so the callback listed last decides (docs/averaging.md)."""
    swa = WeightAveraging(
        mode="swa", start_epoch=1, set_weights_at_end=True, verbose=0
    )
    stop = keras.callbacks.EarlyStopping(
        "score", mode="min", patience=5, restore_best_weights=True
    )
    recorder = Recorder(swa)
    keras.utils.set_random_seed(0)
    x, y = make_data(n=48)
    model = make_model(batchnorm=False)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
    model.fit(
        x,
        keras.utils.to_categorical(y, 3),
        batch_size=8,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[
            recorder,
            Scores([1.0, 2.0, 3.0]),  # Best at epoch 1 (step 6).
            *([stop, swa] if averaging_last else [swa, stop]),
        ],
    )
    expected = swa.averaged_weights() if averaging_last else recorder.by_step[6]
    for got, want in zip(numpy_weights(model), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(swa.averaged_weights()[0], recorder.by_step[6][0])


def test_a_filepath_that_cannot_be_written_is_refused_before_training(
    tmp_path,
):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    swa = WeightAveraging(
        mode="swa", start_epoch=1, filepath=str(blocker / "swa.keras")
    )
    with pytest.raises(OSError, match=r"Received: filepath=") as info:
        fit_with(swa)
    assert len(str(info.value).splitlines()) == 1
    assert swa.model.optimizer.iterations.numpy() == 0


def test_averaged_checkpoint_refuses_what_it_cannot_do(tmp_path):
    averaging = WeightAveraging(mode="ema", verbose=0)
    with pytest.raises(TypeError, match="Received: averaging=ModelCheckpoint"):
        AveragedModelCheckpoint(
            keras.callbacks.ModelCheckpoint(str(tmp_path / "a.keras")),
            str(tmp_path / "b.keras"),
        )
    with pytest.raises(ValueError, match="save_freq=5"):
        AveragedModelCheckpoint(
            averaging, str(tmp_path / "a.keras"), save_freq=5
        )
    alone = AveragedModelCheckpoint(averaging, str(tmp_path / "a.keras"))
    with pytest.raises(ValueError, match="same `fit`"):
        fit_with(WeightAveraging(mode="ema", verbose=0), callbacks=[alone])
    unvalidated = AveragedModelCheckpoint(
        averaging, str(tmp_path / "a.keras"), save_best_only=True
    )
    with pytest.warns(UserWarning, match="validate_with_average=True"):
        fit_with(
            averaging,
            epochs=1,
            validation_data=make_data(n=16),
            callbacks=[unvalidated],
        )


def test_average_in_model_evaluates_the_average_and_puts_weights_back():
    averaging = WeightAveraging(mode="swa", start_epoch=2, verbose=0)
    model, recorder, _ = fit_with(averaging)
    trained = numpy_weights(model)
    with averaging.average_in_model() as inside:
        assert inside is model
        with averaging.average_in_model():
            pass  # A nested swap leaves the outer one in place.
        for g, w in zip(numpy_weights(model), averaging.averaged_weights()):
            np.testing.assert_array_equal(g, w)
    for g, w in zip(numpy_weights(model), trained):
        np.testing.assert_array_equal(g, w)


def test_saved_files_load_into_the_plain_architecture(tmp_path):
    """The average rides on the optimizer: the model's and the optimizer's
    variable lists do not change, and `model.save` files load without it."""
    averaging = WeightAveraging(mode="ema", decay=0.9, verbose=0)
    model, _, _ = fit_with(averaging, batchnorm=True, epochs=1)
    fresh = make_model(batchnorm=True)
    fresh.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        "sparse_categorical_crossentropy",
    )
    fresh.optimizer.build(fresh.trainable_variables)
    assert len(model.weights) == len(fresh.weights)
    assert len(model.optimizer.variables) == len(fresh.optimizer.variables)
    path = str(tmp_path / "model.keras")
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = keras.saving.load_model(path)
    for g, w in zip(numpy_weights(loaded), numpy_weights(model)):
        np.testing.assert_array_equal(g, w)
    assert not hasattr(loaded.optimizer, "keras_snapshot_ema_average")


def test_backup_and_restore_carries_the_average(tmp_path):
    """A `fit` stopped after epoch 2 and resumed by a new callback object on
    a new model equals a run never stopped."""

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))

    def make():
        return WeightAveraging(mode="ema", decay=0.8, warmup=True, verbose=0)

    first = make()
    with pytest.raises(RuntimeError, match="stopped"):
        fit_with(
            first, epochs=4, callbacks=[backup, CrashAtEpochEnd(1, "stopped")]
        )
    resumed, reference = make(), make()
    fit_with(resumed, epochs=4, callbacks=[backup])
    fit_with(reference, epochs=4)
    assert resumed.num_averaged == reference.num_averaged == 24
    for g, w in zip(resumed.averaged_weights(), reference.averaged_weights()):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "sma"}, "mode='sma'"),
        ({}, "start_epoch=None, start_step=None"),
        ({"start_epoch": 0}, "start_epoch=0"),
        ({"mode": "swa", "decay": 0.9, "start_epoch": 1}, "decay=0.9"),
        ({"mode": "ema", "decay": 1.0}, "decay=1.0"),
        ({"mode": "ema", "decay": 0.0}, "decay=0.0"),
        ({"mode": "ema", "every_steps": 0}, "every_steps=0"),
        ({"mode": "ema", "start_epoch": 1, "every_steps": 2}, "start_epoch=1"),
        ({"mode": "ema", "filepath": "ema.h5"}, "filepath='ema.h5'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match="Received") as info:
        WeightAveraging(**kwargs)
    assert info.match(match)


def test_get_config_round_trips():
    averaging = WeightAveraging(mode="ema", decay=0.99, warmup=True)
    config = averaging.get_config()
    assert WeightAveraging(**config).get_config() == config


def test_validate_with_average_refuses_keras_use_ema():
    x, y = make_data(n=16)
    model = make_model(batchnorm=False)
    model.compile(
        keras.optimizers.SGD(0.05, use_ema=True),
        "sparse_categorical_crossentropy",
    )
    averaging = WeightAveraging(mode="ema", validate_with_average=True)
    with pytest.raises(ValueError, match="use_ema=True"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[averaging])


# Greedy soup ----------------------------------------------------------------


def soup_members():
    """Two fine-tuned copies of one model, and a third with wrecked
    weights (in the middle, so that the input order is not the answer)."""
    keras.utils.set_random_seed(0)
    x, y = make_data(n=160)
    (x, x_val), (y, y_val) = (x[:96], x[96:]), (y[:96], y[96:])
    base = make_model(batchnorm=False)
    base.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    base.fit(x, y, batch_size=16, epochs=10, verbose=0)
    members = []
    for seed in (1, 2, 3):
        member = keras.models.clone_model(base)
        member.set_weights(base.get_weights())
        member.compile(
            keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy"
        )
        keras.utils.set_random_seed(seed)
        member.fit(x, y, batch_size=16, epochs=2, verbose=0)
        members.append(member)
    rng = np.random.default_rng(0)
    members[1].set_weights(
        [w + rng.normal(scale=3.0, size=w.shape) for w in base.get_weights()]
    )
    return members, (x_val, y_val)


def greedy(members, validation_data, **kwargs):
    """`(soup, kept)` of `average_weights(method="greedy")`."""
    soup = average_weights(
        members, method="greedy", validation_data=validation_data, **kwargs
    )
    return soup, soup.soup_members


@pytest.mark.parametrize("metric", ["error", "nll"])
def test_greedy_soup_leaves_the_bad_member_out(metric, tmp_path):
    """The one numpy reference of the greedy soup."""
    members, (x_val, y_val) = soup_members()
    paths = []
    for i, member in enumerate(members):
        paths.append(str(tmp_path / f"member-{i}.keras"))
        member.save(paths[-1])
    soup, kept = greedy(paths, (x_val, y_val), metric=metric)
    probs = [m.predict(x_val, verbose=0) for m in members]
    if metric == "error":
        own = [np.mean(p.argmax(1) != y_val) for p in probs]
        # Members 0 and 2 are close: their average keeps the accuracy.
        assert sorted(kept) == [0, 2]
    else:
        picked = [p[np.arange(len(y_val)), y_val] for p in probs]
        own = [-np.mean(np.log(np.clip(q, 1e-12, None))) for q in picked]
    assert 1 not in kept
    assert kept[0] == int(np.argmin(own))
    want = [
        np.mean([numpy_weights(members[i])[k] for i in kept], axis=0)
        for k in range(len(members[0].weights))
    ]
    for g, w in zip(numpy_weights(soup), want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def accuracy_greedy_choice(members, x_val, y_val):
    """The removed `greedy_soup(metric="accuracy")`'s rule in numpy: best
    accuracy first (ties: input order), a member joins when the soup's
    accuracy does not drop (`>=`)."""
    probe = keras.models.clone_model(members[0])

    def accuracy(arrays):
        probe.set_weights(arrays)
        return np.mean(probe.predict(x_val, verbose=0).argmax(1) == y_val)

    weights = [m.get_weights() for m in members]
    own = [accuracy(w) for w in weights]
    order = sorted(range(len(members)), key=lambda i: -own[i])
    kept, best = [order[0]], own[order[0]]
    for i in order[1:]:
        mean = [
            np.mean([weights[k][j] for k in kept + [i]], axis=0)
            for j in range(len(weights[0]))
        ]
        candidate = accuracy(mean)
        if candidate >= best:
            kept, best = kept + [i], candidate
    return kept, own


def test_error_chooses_what_accuracy_chose_on_ties():
    """Member 3 is member 1 with its logits scaled by 1.01 (the same
    argmax): its own score ties with member 1's, and so do soups."""
    members, (x_val, y_val) = soup_members()
    scaled = keras.models.clone_model(members[0])
    scaled.set_weights(
        [
            w * (1.01 if i >= 2 else 1)
            for i, w in enumerate(members[0].get_weights())
        ]
    )
    members = [members[1], members[0], members[2], scaled]
    _, kept = greedy(members, (x_val, y_val), metric="error")
    want, own = accuracy_greedy_choice(members, x_val, y_val)
    assert own[1] == own[3]  # A tie.
    assert kept == want


def test_old_names_warn_or_say_what_to_write(tmp_path):
    members, data = soup_members()
    with pytest.warns(DeprecationWarning, match="method='greedy'"):
        greedy_soup = averaging_module.greedy_soup
    old, old_kept = greedy_soup(members, data)  # metric="accuracy"
    new, new_kept = greedy(members, data, metric="error")
    assert old_kept == new_kept
    for g, w in zip(numpy_weights(old), numpy_weights(new)):
        np.testing.assert_array_equal(g, w)
    with pytest.raises(AttributeError, match=r"mode='swa', average_batchn"):
        _ = averaging_module.StochasticWeightAveraging
    from keras_snapshot import weight_averaging

    for name in ("WeightAveraging", "AveragedModelCheckpoint"):
        with pytest.warns(DeprecationWarning, match=f"keras_snapshot.{name}"):
            old = getattr(weight_averaging, name)
        assert old is getattr(averaging_module, name)


# JAX --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("importlib").util.find_spec("jax") is None,
    reason="JAX is not installed: pip install jax (or '.[test]').",
)
def test_on_jax():
    """The numpy checks and the validation swap, on the JAX backend."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            os.path.abspath(__file__),
            "-k",
            "matches_numpy or validation_sees or accumulation or carries "
            "or averaged_checkpoint_saves",
        ],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(HERE),
        timeout=600,
        env={**os.environ, "KERAS_BACKEND": "jax"},
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def overflowing(member):
    """Finite weights whose predictions overflow to NaN."""
    copy = keras.models.clone_model(member)
    copy.set_weights([w * 1e30 for w in member.get_weights()])
    return copy


@pytest.mark.parametrize("metric", ["error", "nll"])
def test_greedy_soup_never_keeps_a_member_that_predicts_nan(metric):
    members, (x_val, y_val) = soup_members()
    bad = overflowing(members[0])
    assert np.isnan(bad.predict(x_val, verbose=0)).any()
    soup, kept = greedy(
        [bad, members[0], members[2]], (x_val, y_val), metric=metric
    )
    assert 0 not in kept
    assert np.all(np.isfinite(soup.predict(x_val, verbose=0)))
    with pytest.raises(ValueError, match="every member predicts non-finite"):
        greedy([bad, overflowing(members[2])], (x_val, y_val))


def test_greedy_soup_labels_one_hot_or_refused_in_one_line():
    members, (x_val, y_val) = soup_members()
    _, kept = greedy(members, (x_val, y_val))
    one_hot = keras.utils.to_categorical(y_val, 3)
    assert greedy(members, (x_val, one_hot))[1] == kept
    for bad, match in [
        (np.where(y_val == 2, 7, y_val), r"between 0 and 2.*max=7"),
        (one_hot[:, :2], r"shape=\(64, 2\)"),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            greedy(members, (x_val, bad))
        assert len(str(info.value).splitlines()) == 1


def test_a_new_ema_on_a_trained_model_starts_where_the_model_is(capsys):
    """EMA forgets its start: on a model trained before (fine-tuning) it
    begins at the current step. (A new SWA whose start is in the past is
    refused: tests/test_averaging.py.)"""
    keras.utils.set_random_seed(0)
    x, y = make_data(n=48)
    model = make_model(batchnorm=False)
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # Step 6.
    ema = WeightAveraging(mode="ema", decay=0.5)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    assert ema.num_averaged == 7  # Steps 6 (where it starts) to 12.
    assert ema._last_step == 12
    assert "the average starts here" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text",
    ["{", "", '{"best": 1.0}', "[1]", '{"best": 1.0, "step": "x"}'],
    ids=["truncated", "empty", "no_step", "list", "bad_step"],
)
def test_a_best_record_that_is_not_one_is_ignored(tmp_path, capsys, text):
    path = str(tmp_path / "best.keras")
    averaging = WeightAveraging(mode="ema", decay=0.7, verbose=0)

    def checkpoint():
        return AveragedModelCheckpoint(
            averaging, path, monitor="score", mode="min", save_best_only=True
        )

    model, _, _ = fit_with(
        averaging, epochs=1, callbacks=[Scores([1.0]), checkpoint()]
    )
    with open(f"{path}.best.json", "w") as f:
        f.write(text)
    best = checkpoint()
    x, y = make_data(n=48)
    model.fit(
        x,
        y,
        batch_size=8,
        initial_epoch=1,
        epochs=2,
        verbose=0,
        callbacks=[averaging, Scores([0.0, 2.0]), best],
    )
    assert best.best == 2.0  # Its own best, not a crash.
    assert "is not a record of a best score" in capsys.readouterr().out


def test_an_averaged_checkpoint_that_cannot_be_written_is_refused_first(
    tmp_path,
):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    averaging = WeightAveraging(mode="ema", verbose=0)
    best = AveragedModelCheckpoint(averaging, str(blocker / "best.keras"))
    with pytest.raises(OSError, match=r"a_file is a file, not a folder"):
        fit_with(averaging, callbacks=[best])
    assert averaging.model.optimizer.iterations.numpy() == 0


def test_a_resume_with_fresh_callbacks_says_resumed_only(tmp_path, capsys):
    backup = str(tmp_path / "backup")
    first = WeightAveraging(mode="swa", start_epoch=1, verbose=0)
    with pytest.raises(RuntimeError):
        fit_with(
            first,
            epochs=3,
            callbacks=[
                keras.callbacks.BackupAndRestore(backup),
                CrashAtEpochEnd(1),
            ],
        )
    model = first.model
    resumed = WeightAveraging(mode="swa", start_epoch=1)
    x, y = make_data(n=48)
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[keras.callbacks.BackupAndRestore(backup), resumed],
    )
    out = capsys.readouterr().out
    assert resumed.num_averaged == 3
    assert "resumed at step 12 with the average of 2 models" in out
    assert "new average" not in out


def test_greedy_soup_refuses_a_single_output_model():
    keras.utils.set_random_seed(0)
    x, y = make_data(n=32, classes=2)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(1, activation="sigmoid")]
    )
    with pytest.raises(ValueError, match=r"one output per class") as info:
        greedy([model, model], (x, y), from_logits=False)
    assert len(str(info.value).splitlines()) == 1
