import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import make_data
from helpers import make_model

import keras_snapshot
from keras_snapshot import build_ensemble
from keras_snapshot import load_snapshots


def member_mean(models, x):
    return np.mean([m.predict(x, verbose=0) for m in models], axis=0)


def test_prediction_is_mean_of_members(snapshot_run):
    directory, _ = snapshot_run
    x, _ = make_data(seed=3)
    ensemble = build_ensemble(directory)
    members = load_snapshots(directory)
    assert len(members) == 3
    np.testing.assert_allclose(
        ensemble.predict(x, verbose=0), member_mean(members, x), atol=1e-6
    )
    names = [layer.name for layer in ensemble.layers]
    assert {"snapshot_1", "snapshot_2", "snapshot_3"} <= set(names)
    # Members are really different: the average is not any one of them.
    for member in members:
        assert not np.allclose(
            member.predict(x, verbose=0), ensemble.predict(x, verbose=0)
        )


def test_last_m_picks_the_last_snapshots(snapshot_run):
    directory, _ = snapshot_run
    x, _ = make_data(seed=3)
    members = load_snapshots(directory)
    ensemble = build_ensemble(directory, last=2)
    np.testing.assert_allclose(
        ensemble.predict(x, verbose=0), member_mean(members[1:], x), atol=1e-6
    )
    single = build_ensemble(directory, last=1)
    np.testing.assert_allclose(
        single.predict(x, verbose=0),
        members[2].predict(x, verbose=0),
        atol=1e-6,
    )


def test_list_of_paths_and_list_of_models(snapshot_run):
    directory, _ = snapshot_run
    x, _ = make_data(seed=3)
    paths = keras_snapshot.snapshot_paths(directory)
    members = load_snapshots(paths)
    from_paths = build_ensemble(paths, last=2)
    from_models = build_ensemble(members, last=2)
    np.testing.assert_allclose(
        from_paths.predict(x, verbose=0),
        from_models.predict(x, verbose=0),
        atol=1e-6,
    )


def test_weighted_average(snapshot_run):
    directory, _ = snapshot_run
    x, _ = make_data(seed=3)
    members = load_snapshots(directory)
    ensemble = build_ensemble(directory, weights=[1, 0, 3])
    want = 0.25 * members[0].predict(x, verbose=0) + 0.75 * members[2].predict(
        x, verbose=0
    )
    np.testing.assert_allclose(ensemble.predict(x, verbose=0), want, atol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        build_ensemble(directory, weights=[1, 2])


def test_from_logits_applies_softmax(tmp_path):
    keras.utils.set_random_seed(0)
    x, _ = make_data()
    logit_models = [
        keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
        for _ in range(2)
    ]
    # A linear output layer declares logits: no argument needed.
    ensemble = build_ensemble(logit_models)
    explicit = build_ensemble(logit_models, from_logits=True)
    np.testing.assert_allclose(
        ensemble.predict(x, verbose=0), explicit.predict(x, verbose=0)
    )
    undeclared = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(3),
            keras.layers.Activation("relu"),
        ]
    )
    with pytest.raises(ValueError, match="from_logits=True"):
        build_ensemble([undeclared])
    want = np.mean(
        [
            keras.ops.convert_to_numpy(
                keras.ops.softmax(m.predict(x, verbose=0))
            )
            for m in logit_models
        ],
        axis=0,
    )
    np.testing.assert_allclose(ensemble.predict(x, verbose=0), want, atol=1e-6)


def test_mismatched_members_name_the_offender(snapshot_run, tmp_path):
    directory, _ = snapshot_run
    other = make_model(classes=4)
    path = str(tmp_path / "other.keras")
    other.save(path)
    paths = keras_snapshot.snapshot_paths(directory) + [path]
    with pytest.raises(ValueError, match="other.keras") as info:
        build_ensemble(paths)
    assert "output shape" in str(info.value)
    wider = make_model(features=5)
    with pytest.raises(ValueError, match="input shape"):
        build_ensemble([make_model(), wider])


def test_multi_output_member_is_refused():
    inputs = keras.Input((8,))
    a = keras.layers.Dense(3, activation="softmax")(inputs)
    b = keras.layers.Dense(3, activation="softmax")(inputs)
    model = keras.Model(inputs, [a, b])
    with pytest.raises(ValueError, match="one input and one output"):
        build_ensemble([model])


def test_ensemble_keras_file_reloads_without_keras_snapshot(
    snapshot_run, tmp_path
):
    import subprocess
    import sys

    directory, _ = snapshot_run
    x, _ = make_data(seed=3)
    ensemble = build_ensemble(directory, weights=[1, 2, 3])
    path = str(tmp_path / "ensemble.keras")
    ensemble.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", ensemble.predict(x, verbose=0))
    script = (
        "import sys, numpy as np, keras\n"
        f"m = keras.saving.load_model({path!r})\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"want = np.load({str(tmp_path / 'want.npy')!r})\n"
        "np.testing.assert_allclose(m.predict(x, verbose=0), want, atol=1e-5)\n"
        "assert 'keras_snapshot' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout


def test_savedmodel_export_reproduces_predictions(snapshot_run, tmp_path):
    directory, _ = snapshot_run
    x, _ = make_data(seed=3)
    ensemble = build_ensemble(directory, last=2)
    want = ensemble.predict(x, verbose=0)
    path = str(tmp_path / "saved")
    keras_snapshot.export_ensemble(ensemble, path)
    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(reloaded.serve(x).numpy(), want, atol=1e-5)
    signature = reloaded.signatures["serving_default"]
    (output,) = signature(tf.constant(x)).values()
    np.testing.assert_allclose(output.numpy(), want, atol=1e-5)
    if keras.backend.backend() != "tensorflow":
        return  # TFSMLayer (reloading as a Keras layer) needs TensorFlow.
    layer = keras.layers.TFSMLayer(path, call_endpoint="serve")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), want, atol=1e-5
    )


def test_weighted_ensemble_survives_savedmodel(snapshot_run, tmp_path):
    directory, _ = snapshot_run
    x, _ = make_data(seed=3)
    ensemble = build_ensemble(directory, weights=[0.2, 0.0, 0.8])
    want = ensemble.predict(x, verbose=0)
    ensemble.export(str(tmp_path / "saved"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_allclose(reloaded.serve(x).numpy(), want, atol=1e-5)


def test_recalibration_data_in_build_ensemble(snapshot_run):
    directory, _ = snapshot_run
    x, _ = make_data()
    members = load_snapshots(directory)
    before = members[0].layers[1].moving_mean.numpy().copy()
    ensemble = build_ensemble(members, recalibration_data=x)
    # The given models are not changed...
    np.testing.assert_array_equal(members[0].layers[1].moving_mean, before)
    # ...but the ensemble's members carry statistics of the data.
    inner = ensemble.get_layer("snapshot_1")
    dense = members[0].layers[0]
    features = x @ dense.kernel.numpy() + dense.bias.numpy()
    bn = [
        layer
        for layer in inner.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ][0]
    np.testing.assert_allclose(
        bn.moving_mean.numpy(), features.mean(0), rtol=1e-4, atol=1e-5
    )


def test_temperature_and_uncertainty_outputs_survive_export(
    snapshot_run, tmp_path
):
    from keras_snapshot import metrics
    from keras_snapshot import selection

    directory, _ = snapshot_run
    x, _ = make_data(seed=3)
    members = load_snapshots(directory)
    member_probs = np.stack([m.predict(x, verbose=0) for m in members])
    ensemble = build_ensemble(
        directory,
        temperature=2.0,
        extra_outputs=["entropy", "mutual_information"],
    )
    got = ensemble.predict(x, verbose=0)
    want = selection.apply_temperature(member_probs.mean(0), 2.0)
    np.testing.assert_allclose(got["probabilities"], want, atol=1e-5)
    np.testing.assert_allclose(
        got["entropy"],
        metrics.uncertainty(np.asarray(want)[None])["entropy"],
        atol=1e-5,
    )
    np.testing.assert_allclose(
        got["mutual_information"],
        metrics.uncertainty(member_probs)["mutual_information"],
        atol=1e-5,
    )
    path = str(tmp_path / "ensemble.keras")
    ensemble.save(path)
    reloaded = keras.saving.load_model(path).predict(x, verbose=0)
    for key in got:
        np.testing.assert_allclose(reloaded[key], got[key], atol=1e-6)
    ensemble.export(str(tmp_path / "saved"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "saved"))
    outputs = served.serve(x)
    np.testing.assert_allclose(
        outputs["entropy"].numpy(), got["entropy"], atol=1e-5
    )
    with pytest.raises(ValueError, match="extra_outputs"):
        build_ensemble(directory, extra_outputs=["variance"])
    with pytest.raises(ValueError, match="temperature"):
        build_ensemble(directory, temperature=0.0)
