"""Exporting an ensemble for serving: SavedModel, TFLite or ONNX."""

import functools

import keras

from keras_snapshot.ensemble import OUTPUT_NAME

# `export_ensemble`'s formats, with Keras's names for them as aliases.
EXPORT_FORMATS = ("saved_model", "tflite", "onnx")
_FORMAT_ALIASES = {"tf_saved_model": "saved_model", "litert": "tflite"}
QUANTIZATIONS = ("dynamic_range", "float16")


def export_ensemble(
    ensemble,
    path: str,
    format: str = "saved_model",
    quantization: str | None = None,
):
    """Exports an ensemble for serving: SavedModel, TFLite or ONNX.

    Every format names its output `probabilities` (plus `entropy` and
    `mutual_information` if the ensemble has them), so TensorFlow Serving,
    TFLite and onnxruntime clients read the same key; none of the files
    needs keras_snapshot. The SavedModel's `serve` endpoint returns what
    `ensemble(x)` returns; TFLite needs the TensorFlow backend, ONNX
    `pip install "keras-snapshot[onnx]"`.

    Args:
        ensemble: A functional Keras model with one input, such as
            `build_ensemble`'s: its output is the probabilities, or a dict
            with a `"probabilities"` entry.
        path: Where to write: a new folder for `"saved_model"`, a file for
            the others.
        format: `"saved_model"` (default), `"tflite"` or `"onnx"`; Keras's
            names `"tf_saved_model"` and `"litert"` are accepted too.
        quantization: TFLite only: `None` (float32, default),
            `"dynamic_range"` (int8 weights) or `"float16"`.

    Returns:
        `path`.

    Example:

    ```python
    keras_snapshot.export_ensemble(ensemble, "ensemble_savedmodel")
    served = tf.saved_model.load("ensemble_savedmodel")
    signature = served.signatures["serving_default"]
    probabilities = signature(tf.constant(x_test))["probabilities"]
    ```
    """
    format = _FORMAT_ALIASES.get(format, format)
    if format not in EXPORT_FORMATS:
        raise ValueError(
            f"`format` must be one of {EXPORT_FORMATS}. Received: "
            f"format={format!r}."
        )
    if quantization is not None and (
        format != "tflite" or quantization not in QUANTIZATIONS
    ):
        raise ValueError(
            f"`quantization` must be None or, with format='tflite', one of "
            f"{QUANTIZATIONS}. Received: quantization={quantization!r}, "
            f"format={format!r}."
        )
    path = str(path)
    if format == "tflite" and not path.endswith(".tflite"):
        raise ValueError(
            "A TFLite export's path must end in '.tflite'. Received: "
            f"path={path!r}."
        )
    named = _named_outputs(ensemble)
    try:
        if format == "saved_model":
            _export_saved_model(ensemble, named, path)
        elif format == "tflite":
            _export_tflite(named, path, quantization)
        else:
            _export_onnx(named, path)
    except ImportError as e:
        raise RuntimeError(
            f"Exporting to {format} on the {keras.backend.backend()} backend "
            f"needs a package that is not installed ({e}). "
            + _INSTALL_HINT[format]
        ) from e
    return path


_INSTALL_HINT = {
    "saved_model": "Install tensorflow, or save a `.keras` file with "
    "`ensemble.save(...)` instead.",
    "tflite": "TFLite export runs on the TensorFlow backend with tensorflow "
    "installed (KERAS_BACKEND=tensorflow).",
    "onnx": 'Install the ONNX extra: pip install "keras-snapshot[onnx]" '
    "(tf2onnx on the TensorFlow backend, jax2onnx on JAX).",
}


def _named_outputs(ensemble):
    """`ensemble` with its output in a dict under `OUTPUT_NAME`.

    Keras names a SavedModel signature's outputs, and tf2onnx its outputs,
    after the keys of the model's output dict (`output_0` and `Identity:0`
    for a single tensor), so the dict is the one place the name is set.
    """
    inputs = getattr(ensemble, "inputs", None)
    if not isinstance(ensemble, keras.Model) or not inputs:
        raise ValueError(
            "`ensemble` must be a functional Keras model with one input, "
            "such as `build_ensemble`'s. Received: "
            f"ensemble={type(ensemble).__name__}."
        )
    if len(inputs) != 1:
        raise ValueError(
            "`ensemble` must have one input. Received: a model with "
            f"{len(inputs)} inputs."
        )
    output = ensemble.output
    if isinstance(output, dict):
        if OUTPUT_NAME not in output:
            raise ValueError(
                f"An ensemble with several outputs must have a "
                f"{OUTPUT_NAME!r} output. Received: outputs "
                f"{sorted(output)}."
            )
        return ensemble
    if len(ensemble.outputs) != 1:
        raise ValueError(
            f"`ensemble` must have one output ({OUTPUT_NAME}) or a dict of "
            f"outputs. Received: {len(ensemble.outputs)} outputs."
        )
    return keras.Model(inputs, {OUTPUT_NAME: output}, name=ensemble.name)


def _input_signature(model):
    (tensor,) = model.inputs
    return [
        keras.InputSpec(
            shape=tuple(tensor.shape), dtype=tensor.dtype, name=tensor.name
        )
    ]


def _export_saved_model(ensemble, named, path):
    """`serve`: as `ensemble.export`; `serving_default`: named outputs."""
    archive = keras.export.ExportArchive()
    # `named` shares the ensemble's variables: tracked once (on JAX, a
    # second `track` would feed every variable twice to jax2tf).
    archive.track(ensemble)
    signature = _input_signature(ensemble)
    for name, model in (("serve", ensemble), ("serving_default", named)):
        archive.add_endpoint(
            name,
            functools.partial(model.__call__, training=False),
            input_signature=signature,
        )
    archive.write_out(path, verbose=False)


def _export_tflite(named, path, quantization):
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "TFLite export needs the TensorFlow backend: run with "
            "KERAS_BACKEND=tensorflow. Received: "
            f"backend={keras.backend.backend()!r}."
        )
    import tensorflow as tf

    converter_settings = {}
    if quantization is not None:
        converter_settings["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter_settings["target_spec"] = {"supported_types": [tf.float16]}
    named.export(
        path,
        format="litert",
        verbose=False,
        input_signature=_input_signature(named),
        **converter_settings,
    )
    _name_tflite_tensors(path)


def _name_tflite_tensors(path):
    """Names the TFLite file's input and output tensors as its signature.

    The converter names them `serving_default_inputs:0` and
    `StatefulPartitionedCall_1:0`; after this, `get_output_details()` of a
    plain `Interpreter` says `probabilities`, as the signature runner does.
    """
    try:
        from tensorflow.lite.tools import flatbuffer_utils
    except ImportError:  # The signature keeps the names.
        return
    model = flatbuffer_utils.read_model(path)
    for signature in model.signatureDefs:
        tensors = model.subgraphs[signature.subgraphIndex].tensors
        for entry in list(signature.inputs) + list(signature.outputs):
            tensors[entry.tensorIndex].name = entry.name
    flatbuffer_utils.write_model(model, path)


def _export_onnx(named, path):
    if keras.backend.backend() == "tensorflow":
        import tf2onnx  # noqa: F401  (a clear ImportError before Keras's)
    named.export(
        path,
        format="onnx",
        verbose=False,
        input_signature=_input_signature(named),
    )
