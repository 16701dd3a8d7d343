"""Exports that work in every consumer, with one output name.

Each format is run in the consumer that serves it, on the same inputs as
`ensemble.predict`: `tf.saved_model.load` (the `serve` endpoint and the
`serving_default` signature that TensorFlow Serving calls), `TFSMLayer`,
`tf.lite.Interpreter` (signature runner and plain tensors) and
`onnxruntime.InferenceSession`. ONNX tests are skipped where tf2onnx or
onnxruntime are not installed (`pip install -e ".[test]"` installs them).
"""

import importlib.util
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_snapshot
from keras_snapshot.app import cli
from keras_snapshot.ensemble import combine_members
from keras_snapshot.export import export_ensemble

FEATURES = 32
CLASSES = 4
VARIANTS = ("plain", "weighted", "temperature", "uncertainty")
HAVE_ONNX = all(
    importlib.util.find_spec(name) for name in ("tf2onnx", "onnxruntime")
)
needs_onnx = pytest.mark.skipif(
    not HAVE_ONNX,
    reason='ONNX export needs tf2onnx and onnxruntime: pip install ".[onnx]"',
)


def make_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    w = rng.normal(size=(FEATURES, CLASSES))
    return x, np.argmax(x @ w, axis=1).astype("int32")


def trained_member(seed, x, y):
    """A small trained classifier; 32x64 weights so that TFLite quantizes."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def members():
    x, y = make_data(n=256, seed=1)
    return [trained_member(seed, x, y) for seed in (1, 2, 3)]


def make_ensemble(members, variant):
    options = {
        "plain": {},
        "weighted": {"weights": [0.5, 0.3, 0.2]},
        "temperature": {"temperature": 2.0},
        "uncertainty": {
            "temperature": 0.5,
            "extra_outputs": ["entropy", "mutual_information"],
        },
    }[variant]
    return combine_members(members, **options)


def as_dict(outputs):
    """Predictions as a dict: `{"probabilities": ...}` for one output."""
    if isinstance(outputs, dict):
        return {k: np.asarray(v) for k, v in outputs.items()}
    return {"probabilities": np.asarray(outputs)}


def assert_same(got, want, atol=1e-5):
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_model_in_every_tensorflow_consumer(members, variant, tmp_path):
    ensemble = make_ensemble(members, variant)
    x, _ = make_data(seed=5)
    want = as_dict(ensemble.predict(x, verbose=0))
    path = str(tmp_path / "saved_model")
    assert keras_snapshot.export_ensemble(ensemble, path) == path

    served = tf.saved_model.load(path)
    # `serve` returns what the Keras model returns, as `ensemble.export`.
    assert_same(as_dict(served.serve(x)), want)
    # The signature (TensorFlow Serving, saved_model_cli) names every output.
    signature = served.signatures["serving_default"]
    assert list(signature.structured_input_signature[1]) == ["inputs"]
    assert sorted(signature.structured_outputs) == sorted(want)
    outputs = signature(inputs=tf.constant(x))
    assert_same({k: v.numpy() for k, v in outputs.items()}, want)
    # Reloaded as a Keras layer: both endpoints.
    for endpoint in ("serving_default", "serve"):
        layer = keras.layers.TFSMLayer(path, call_endpoint=endpoint)
        got = keras.tree.map_structure(keras.ops.convert_to_numpy, layer(x))
        assert_same(as_dict(got), want)


def run_tflite(path, x):
    """Outputs of the TFLite file, by signature and by plain tensors."""
    with warnings.catch_warnings():
        # tf.lite.Interpreter warns that it moves to ai_edge_litert.
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=path)
    by_signature = interpreter.get_signature_runner("serving_default")(inputs=x)
    (input_detail,) = interpreter.get_input_details()
    assert input_detail["name"] == "inputs"
    interpreter.resize_tensor_input(input_detail["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(input_detail["index"], x)
    interpreter.invoke()
    by_tensor = {
        detail["name"]: interpreter.get_tensor(detail["index"])
        for detail in interpreter.get_output_details()
    }
    dtypes = {d["dtype"] for d in interpreter.get_tensor_details()}
    return by_signature, by_tensor, dtypes


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_tflite_float_matches_predict(members, variant, tmp_path):
    ensemble = make_ensemble(members, variant)
    x, _ = make_data(seed=5)
    want = as_dict(ensemble.predict(x, verbose=0))
    path = str(tmp_path / "ensemble.tflite")
    export_ensemble(ensemble, path, format="tflite")
    by_signature, by_tensor, dtypes = run_tflite(path, x)
    assert_same(by_signature, want)
    assert_same(by_tensor, want)
    assert np.int8 not in dtypes and np.float16 not in dtypes


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["dynamic_range", "float16"])
def test_tflite_quantized_keeps_the_predicted_class(
    members, quantization, tmp_path
):
    ensemble = make_ensemble(members, "weighted")
    x, _ = make_data(n=256, seed=5)
    want = ensemble.predict(x, verbose=0)
    float_path = str(tmp_path / "float.tflite")
    export_ensemble(ensemble, float_path, format="tflite")
    path = str(tmp_path / "quantized.tflite")
    export_ensemble(ensemble, path, format="tflite", quantization=quantization)
    by_signature, by_tensor, dtypes = run_tflite(path, x)
    # The weights really are stored in the smaller type...
    assert {"dynamic_range": np.int8, "float16": np.float16}[
        quantization
    ] in dtypes
    assert os.path.getsize(path) < 0.7 * os.path.getsize(float_path)
    # ...and the predictions barely move.
    for got in (by_signature, by_tensor):
        assert list(got) == ["probabilities"]
        probabilities = got["probabilities"]
        agree = np.mean(probabilities.argmax(1) == want.argmax(1))
        assert agree >= 0.95, agree
        np.testing.assert_allclose(probabilities, want, atol=0.05)
        np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-3)


@pytest.mark.slow
@needs_onnx
@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_in_onnxruntime_matches_predict(members, variant, tmp_path):
    import onnxruntime

    ensemble = make_ensemble(members, variant)
    x, _ = make_data(seed=5)
    want = as_dict(ensemble.predict(x, verbose=0))
    path = str(tmp_path / "ensemble.onnx")
    export_ensemble(ensemble, path, format="onnx")
    session = onnxruntime.InferenceSession(
        path, providers=["CPUExecutionProvider"]
    )
    assert [i.name for i in session.get_inputs()] == ["inputs"]
    names = [o.name for o in session.get_outputs()]
    assert sorted(names) == sorted(want)
    got = dict(zip(names, session.run(None, {"inputs": x})))
    assert_same(got, want)


@needs_onnx
def test_one_output_name_in_every_format(members, tmp_path):
    """`probabilities`, never `output_0`, `Identity:0` or a layer's name."""
    import onnxruntime

    ensemble = make_ensemble(members, "temperature")
    saved = export_ensemble(ensemble, str(tmp_path / "sm"))
    signature = tf.saved_model.load(saved).signatures["serving_default"]
    tflite = export_ensemble(
        ensemble, str(tmp_path / "e.tflite"), format="litert"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=tflite)
    onnx = export_ensemble(ensemble, str(tmp_path / "e.onnx"), format="onnx")
    session = onnxruntime.InferenceSession(
        onnx, providers=["CPUExecutionProvider"]
    )
    names = {
        "saved_model": list(signature.structured_outputs),
        "tflite_signature": interpreter.get_signature_list()["serving_default"][
            "outputs"
        ],
        "tflite_tensors": [d["name"] for d in interpreter.get_output_details()],
        "onnx": [o.name for o in session.get_outputs()],
    }
    assert names == {key: ["probabilities"] for key in names}


def test_export_refuses_bad_arguments(members, tmp_path):
    ensemble = make_ensemble(members, "plain")
    path = str(tmp_path / "out")
    cases = [
        ({"format": "pickle"}, "format='pickle'"),
        ({"quantization": "dynamic_range"}, "format='saved_model'"),
        ({"format": "tflite", "quantization": "int4"}, "quantization='int4'"),
    ]
    for kwargs, received in cases:
        with pytest.raises(ValueError, match="Received") as info:
            export_ensemble(ensemble, path, **kwargs)
        assert received in str(info.value)
    with pytest.raises(ValueError, match="'.tflite'"):
        export_ensemble(ensemble, path, format="tflite")
    inputs = keras.Input((FEATURES,))
    two = keras.Model(inputs, [members[0](inputs), members[1](inputs)])
    with pytest.raises(ValueError, match="2 outputs"):
        export_ensemble(two, path)
    with pytest.raises(ValueError, match="'probabilities' output"):
        export_ensemble(keras.Model(inputs, {"p": members[0](inputs)}), path)
    assert not os.path.exists(path)


@pytest.mark.slow
def test_onnx_without_tf2onnx_says_how_to_install(
    members, digits_run, tmp_path, monkeypatch, capsys
):
    # A None entry in sys.modules is how Python marks a module as missing.
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    ensemble = make_ensemble(members, "plain")
    with pytest.raises(RuntimeError, match=r"keras-snapshot\[onnx\]"):
        export_ensemble(ensemble, str(tmp_path / "e.onnx"), format="onnx")
    out = str(tmp_path / "out")
    assert cli.main(["export", digits_run, out, "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert 'pip install "keras-snapshot[onnx]"' in err
    assert len(err.splitlines()) == 1
    assert not os.path.exists(out)


# Run in a fresh interpreter in which `import keras_snapshot` fails.
RELOAD_SCRIPT = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "keras_snapshot":
            raise ImportError("keras_snapshot is blocked in this test")

sys.meta_path.insert(0, Block())
import keras, numpy as np

x = np.load("x.npy")
for name in ("plain", "weighted"):
    model = keras.saving.load_model(name + ".keras")
    want = np.load(name + ".npy")
    np.testing.assert_allclose(model.predict(x, verbose=0), want, atol=1e-5)
    print(name, "reloads")
for name in ("temperature", "uncertainty"):
    try:
        keras.saving.load_model(name + ".keras")
    except Exception as e:
        print(name, "needs the import:", type(e).__name__)
    else:
        print(name, "reloads")
snapshot = keras.saving.load_model("snapshot.keras", compile=False)
np.testing.assert_allclose(
    snapshot.predict(x, verbose=0), np.load("snapshot.npy"), atol=1e-5
)
print("snapshot reloads with compile=False")
try:
    keras.saving.load_model("snapshot.keras")
except Exception as e:
    print("compiled snapshot needs the import:", type(e).__name__, e)
else:
    print("compiled snapshot reloads")
assert not any(m.startswith("keras_snapshot") for m in sys.modules)
"""


@pytest.mark.slow
def test_which_files_reload_without_import_keras_snapshot(members, tmp_path):
    x, y = make_data(seed=5)
    np.save(tmp_path / "x.npy", x)
    for variant in VARIANTS:
        ensemble = make_ensemble(members, variant)
        ensemble.save(tmp_path / f"{variant}.keras")
        want = ensemble.predict(x, verbose=0)
        if variant in ("plain", "weighted"):
            np.save(tmp_path / f"{variant}.npy", want)
    # A snapshot as SnapshotCheckpoint writes it: compiled, with the
    # keras_snapshot learning-rate schedule in its optimizer.
    model = keras.models.clone_model(members[0])
    schedule = keras_snapshot.SnapshotSchedule(
        0.1, total_steps=4, num_snapshots=2
    )
    model.compile(
        keras.optimizers.SGD(schedule), "sparse_categorical_crossentropy"
    )
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    model.save(tmp_path / "snapshot.keras")
    np.save(tmp_path / "snapshot.npy", model.predict(x, verbose=0))

    result = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": "", "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "plain reloads" in lines
    assert "weighted reloads" in lines
    for needs_import in ("temperature", "uncertainty", "compiled snapshot"):
        message = f"{needs_import} needs the import"
        assert any(line.startswith(message) for line in lines), lines
    assert "snapshot reloads with compile=False" in lines
    # ...and after the import, all of them load, snapshots compiled.
    for variant in VARIANTS:
        keras.saving.load_model(tmp_path / f"{variant}.keras")
    reloaded = keras.saving.load_model(tmp_path / "snapshot.keras")
    assert reloaded.optimizer is not None


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("export_cli") / "run")
    code = cli.main(
        [
            "train",
            "--dataset",
            "digits",
            "--epochs",
            "2",
            "--snapshots",
            "2",
            "--verbose",
            "0",
            "--output-dir",
            run_dir,
        ]
    )
    assert code == 0
    return run_dir


@pytest.mark.slow
def test_cli_export_formats_and_serving_layout(digits_run, tmp_path, capsys):
    from keras_snapshot.app.datasets import load_dataset

    x = load_dataset("digits").x_test[:32]
    want = keras.saving.load_model(
        os.path.join(digits_run, "ensemble.keras")
    ).predict(x, verbose=0)

    out = tmp_path / "serving"
    args = ["export", digits_run, str(out), "--serving-version", "3"]
    assert cli.main(args) == 0
    assert "saved_model/3" in capsys.readouterr().out
    assert sorted(os.listdir(out / "saved_model")) == ["3"]
    # A second version goes next to the first; --overwrite keeps version 3.
    args = ["export", digits_run, str(out), "--serving-version", "4"]
    assert cli.main([*args, "--overwrite"]) == 0
    assert sorted(os.listdir(out / "saved_model")) == ["3", "4"]
    signature = tf.saved_model.load(str(out / "saved_model" / "3")).signatures[
        "serving_default"
    ]
    got = signature(inputs=tf.constant(x))
    assert list(got) == ["probabilities"]
    np.testing.assert_allclose(got["probabilities"].numpy(), want, atol=1e-5)

    out = tmp_path / "tflite"
    args = ["export", digits_run, str(out), "--format", "tflite"]
    assert cli.main([*args, "--quantization", "dynamic_range"]) == 0
    assert sorted(os.listdir(out)) == [
        "classes.json",
        "ensemble.keras",
        "ensemble.tflite",
    ]
    by_signature, _, _ = run_tflite(str(out / "ensemble.tflite"), x)
    agree = np.mean(by_signature["probabilities"].argmax(1) == want.argmax(1))
    assert agree >= 0.9, agree

    if HAVE_ONNX:
        import onnxruntime

        out = tmp_path / "onnx"
        assert (
            cli.main(["export", digits_run, str(out), "--format", "onnx"]) == 0
        )
        assert sorted(os.listdir(out)) == [
            "classes.json",
            "ensemble.keras",
            "ensemble.onnx",
        ]
        session = onnxruntime.InferenceSession(
            str(out / "ensemble.onnx"), providers=["CPUExecutionProvider"]
        )
        (got,) = session.run(["probabilities"], {"inputs": x})
        np.testing.assert_allclose(got, want, atol=1e-5)

    capsys.readouterr()
    for wrong in (
        ["--quantization", "float16"],
        ["--format", "onnx", "--serving-version", "1"],
    ):
        out = str(tmp_path / "wrong")
        assert cli.main(["export", digits_run, out, *wrong]) == 2
        err = capsys.readouterr().err.strip()
        assert "error" in err and len(err.splitlines()) == 1
        assert not os.path.exists(out)
    with pytest.raises(SystemExit):
        cli.main(["export", digits_run, out, "--serving-version", "0"])
    assert "serving_version" in capsys.readouterr().err
