"""Loading: every public loader takes the same loading keyword arguments.

`load_snapshots`, `build_ensemble`, `select_snapshots`, `average_weights`
and `distill` all read snapshots through `loading.load_members`, which
makes one `LoadOptions` of `safe_mode`, `skip_invalid`, `custom_objects`
and `allow_nonfinite`. The table below calls every loader with every
keyword, on files that load only with it, so a loader that drops one fails.
"""

import dataclasses
import glob
import inspect
import os
import shutil

import keras
import numpy as np
import pytest
from helpers import make_data
from helpers import make_model

import keras_snapshot
from keras_snapshot.loading import LoadOptions
from keras_snapshot.loading import load_members


class Doubling(keras.layers.Layer):
    """A custom layer registered nowhere: it loads only by custom_objects."""

    def call(self, x):
        return 2.0 * x


def _model(first_layer=None, seed=0):
    keras.utils.set_random_seed(seed)
    model = make_model(batchnorm=True)
    if first_layer is None:
        return model
    return keras.Sequential([keras.Input((8,)), first_layer, *model.layers])


def _save_pair(directory, name, build):
    """Two `.keras` files of one architecture (different weights)."""
    paths = []
    for seed in (1, 2):
        path = os.path.join(directory, f"{name}-{seed}.keras")
        build(seed).save(path)
        paths.append(path)
    return paths


def _custom_layer_files(directory, snapshot_dir):
    return _save_pair(directory, "custom", lambda s: _model(Doubling(), s))


def _lambda_files(directory, snapshot_dir):
    return _save_pair(
        directory,
        "lambda",
        lambda s: _model(keras.layers.Lambda(lambda x: x * 2.0), s),
    )


def _nonfinite_files(directory, snapshot_dir):
    def build(seed):
        model = _model(seed=seed)
        if seed == 1:
            # An infinite moving variance: the weights are not finite, but
            # that BatchNorm feature is just its beta, so predictions are.
            (batchnorm,) = [
                layer
                for layer in model.layers
                if isinstance(layer, keras.layers.BatchNormalization)
            ]
            variance = keras.ops.convert_to_numpy(batchnorm.moving_variance)
            variance[0] = np.inf
            batchnorm.moving_variance.assign(variance)
        return model

    return _save_pair(directory, "nonfinite", build)


def _directory_with_a_corrupted_file(directory, snapshot_dir):
    copy = os.path.join(directory, "snapshots")
    shutil.copytree(snapshot_dir, copy)
    with open(os.path.join(copy, "snapshot-01.keras"), "ab") as f:
        f.write(b"corrupted")
    return copy


# keyword: (sources that load only with it, the keyword's value, and the
# error and message without it).
KEYWORD_CASES = {
    "custom_objects": (
        _custom_layer_files,
        {"Doubling": Doubling},
        TypeError,
        "Doubling",
    ),
    "safe_mode": (_lambda_files, False, ValueError, "safe_mode=False"),
    "allow_nonfinite": (
        _nonfinite_files,
        True,
        ValueError,
        "allow_nonfinite=True",
    ),
    "skip_invalid": (
        _directory_with_a_corrupted_file,
        True,
        ValueError,
        "snapshot-01.keras",
    ),
}


def keras_finds_by_module(sources) -> bool:
    """Whether this Keras loads an unregistered class by importing the
    module named in the file (Keras 3.8 does, for this test module)."""
    paths = sources["custom_objects"]
    path = paths[0] if isinstance(paths, list) else paths
    if os.path.isdir(path):
        path = sorted(glob.glob(os.path.join(path, "*.keras")))[0]
    try:
        keras.saving.load_model(path)
    except TypeError:
        return False
    return True


def _distill(sources, **kwargs):
    return keras_snapshot.distill(
        sources, data=make_data(n=32), epochs=1, verbose=0, **kwargs
    )


LOADERS = {
    "load_snapshots": keras_snapshot.load_snapshots,
    # With recalibration, build_ensemble clones its members too.
    "build_ensemble": lambda sources, **kwargs: keras_snapshot.build_ensemble(
        sources, recalibration_data=make_data(n=32)[0], **kwargs
    ),
    "select_snapshots": lambda sources, **kwargs: (
        keras_snapshot.select_snapshots(
            sources, validation_data=make_data(n=32), **kwargs
        )
    ),
    "average_weights": lambda sources, **kwargs: keras_snapshot.average_weights(
        sources, recalibration_data=make_data(n=32)[0], **kwargs
    ),
    "distill": _distill,
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, snapshot_run):
    directory = str(tmp_path_factory.mktemp("loading"))
    return {
        keyword: make(directory, snapshot_run[0])
        for keyword, (make, *_) in KEYWORD_CASES.items()
    }


@pytest.mark.parametrize(
    "keyword, loader",
    [
        pytest.param(keyword, loader, id=f"{keyword}-{loader}")
        for keyword in sorted(KEYWORD_CASES)
        for loader in sorted(LOADERS)
    ],
)
def test_every_loader_takes_every_loading_keyword(sources, keyword, loader):
    _, value, error, match = KEYWORD_CASES[keyword]
    load = LOADERS[loader]
    if keyword == "custom_objects" and keras_finds_by_module(sources):
        pass  # Keras 3.8 imports `Doubling`'s module: nothing to refuse.
    else:
        with pytest.raises(error, match=match):
            load(sources[keyword])
    if keyword == "skip_invalid":
        with pytest.warns(UserWarning, match="Skipping snapshot"):
            result = load(sources[keyword], **{keyword: value})
    else:
        result = load(sources[keyword], **{keyword: value})
    assert result is not None


def test_skipped_and_custom_members_are_the_ones_loaded(sources):
    with pytest.warns(UserWarning, match="Skipping snapshot"):
        members = load_members(sources["skip_invalid"], skip_invalid=True)
    assert [m.name for m in members] == ["snapshot_2", "snapshot_3"]
    (model, _) = keras_snapshot.load_snapshots(
        sources["custom_objects"], custom_objects={"Doubling": Doubling}
    )
    assert isinstance(model.layers[0], Doubling)


PUBLIC_LOADERS = [
    keras_snapshot.load_snapshots,
    load_members,
    keras_snapshot.build_ensemble,
    keras_snapshot.select_snapshots,
    keras_snapshot.average_weights,
    keras_snapshot.distill,
]


@pytest.mark.parametrize("loader", PUBLIC_LOADERS, ids=lambda f: f.__name__)
def test_every_loader_has_the_same_loading_keywords(loader):
    expected = {f.name: f.default for f in dataclasses.fields(LoadOptions)}
    parameters = inspect.signature(loader).parameters
    assert {
        name: parameters[name].default
        for name in expected
        if name in parameters
    } == expected


BAD_OPTIONS = [
    ({"safe_mode": "no"}, ValueError, "safe_mode='no'"),
    ({"skip_invalid": 1}, ValueError, "skip_invalid=1"),
    ({"allow_nonfinite": None}, ValueError, "allow_nonfinite=None"),
    ({"custom_objects": [Doubling]}, TypeError, "custom_objects=\\["),
]


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize(
    "kwargs, error, match", BAD_OPTIONS, ids=[str(k) for k, *_ in BAD_OPTIONS]
)
def test_every_loader_refuses_bad_loading_keywords(
    snapshot_run, loader, kwargs, error, match
):
    with pytest.raises(error, match=match):
        LOADERS[loader](snapshot_run[0], **kwargs)


# Every path that rebuilds a model predicts as the original ------------------


def model_with_state(x):
    """Adapted Normalization (derived state), an adapted Discretization
    (state outside its variables), Dropout, BatchNorm inside a nested
    model, integer variables (Normalization's count)."""
    keras.utils.set_random_seed(0)
    norm = keras.layers.Normalization()
    norm.adapt(x)
    bins = keras.layers.Discretization(num_bins=4)
    bins.adapt(x)
    inputs = keras.Input((x.shape[1],))
    embedded = keras.layers.Embedding(4, 2)(bins(inputs))
    features = keras.layers.Concatenate()(
        [norm(inputs), keras.layers.Flatten()(embedded)]
    )
    block = keras.Sequential(
        [
            keras.layers.Dense(16),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
        ],
        name="block",
    )
    hidden = keras.layers.Dropout(0.5)(block(features))
    outputs = keras.layers.Dense(3, activation="softmax")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile("sgd", "sparse_categorical_crossentropy")
    y = np.arange(len(x)) % 3
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    return model, y


@pytest.fixture(scope="module")
def stateful():
    x = np.random.default_rng(0).normal(50, 20, size=(64, 8))
    x = x.astype("float32")
    model, y = model_with_state(x)
    return model, x, y, model.predict(x, verbose=0)


def test_model_with_weights_predicts_as_the_original(stateful):
    from keras_snapshot.loading import model_with_weights

    model, x, _, expected = stateful
    copy = model_with_weights(model, model.get_weights())
    np.testing.assert_allclose(copy.predict(x, verbose=0), expected, atol=1e-6)


def test_averages_and_soups_of_one_model_predict_as_the_model(stateful):
    model, x, y, expected = stateful
    averaged = keras_snapshot.average_weights([model, model])
    np.testing.assert_allclose(
        averaged.predict(x, verbose=0), expected, atol=1e-6
    )
    soup = keras_snapshot.average_weights(
        [model, model], method="greedy", validation_data=(x, y), metric="nll"
    )
    assert soup.soup_members == [0, 1]
    np.testing.assert_allclose(soup.predict(x, verbose=0), expected, atol=1e-6)


def test_a_recalibrated_ensemble_member_predicts_as_its_reload(
    stateful, tmp_path
):
    model, x, _, _ = stateful
    path = str(tmp_path / "member.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    keras_snapshot.recalibrate_batchnorm(reloaded, x)
    expected = reloaded.predict(x, verbose=0)
    ensemble = keras_snapshot.build_ensemble([path], recalibration_data=x)
    np.testing.assert_allclose(
        ensemble.predict(x, verbose=0), expected, atol=1e-5
    )


def test_the_running_average_of_one_model_predicts_as_the_model():
    x = np.random.default_rng(1).normal(50, 20, size=(64, 8))
    x = x.astype("float32")
    model, y = model_with_state(x)
    # 4 updates an epoch, 8 done: the average holds the final step only.
    swa = keras_snapshot.WeightAveraging(
        mode="swa", start_step=16, every_steps=16, verbose=0
    )
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[swa])
    assert swa.num_averaged == 1
    np.testing.assert_allclose(
        swa.averaged_model().predict(x, verbose=0),
        model.predict(x, verbose=0),
        atol=1e-6,
    )
