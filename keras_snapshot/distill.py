"""Distilling an ensemble into one model (Hinton, Vinyals, Dean 2015)."""

import keras
import numpy as np
from keras import ops

from keras_snapshot import _scoring
from keras_snapshot._checks import check_in_range
from keras_snapshot._checks import check_positive_int
from keras_snapshot.layers import temperature_logits
from keras_snapshot.layers import temperature_softmax
from keras_snapshot.loading import clone_model
from keras_snapshot.loading import load_snapshots

_EPSILON = 1e-7


# The highest temperature `distill` accepts. Far above the logits' spread
# the soft loss is already the high-temperature limit (matching logits) and
# a higher T only adds float32 rounding to the gradient (relative error
# about 5e-8 * T), until `T^2` overflows float32 above 1.8e19.
MAX_TEMPERATURE = 1000.0


def _check_temperature(temperature) -> float:
    return check_in_range(
        "temperature",
        temperature,
        0.0,
        MAX_TEMPERATURE,
        "Hinton et al. use T from 1 to 20; a higher T only adds float32 "
        "rounding.",
        include_low=False,
        include_high=True,
    )


def _check_alpha(alpha) -> float:
    return check_in_range(
        "alpha",
        alpha,
        0.0,
        1.0,
        "It is the weight of the hard-label loss.",
        include_high=True,
    )


class _DistillationLoss(keras.losses.Loss):
    """`alpha * CE(labels) + (1 - alpha) * T^2 * KL(soft targets)`.

    `y_true` packs the teacher's soft targets at temperature T (first
    `num_classes` columns) and the one-hot labels (the rest). Used only by
    the training wrapper of `distill`; the student never holds it.
    """

    def __init__(self, temperature, alpha, num_classes, from_logits):
        super().__init__(name="distillation")
        self.temperature = temperature
        self.alpha = alpha
        self.num_classes = num_classes
        self.from_logits = from_logits

    def _log_probabilities(self, y_pred, temperature):
        """The student's `log softmax(z / T)`."""
        z_t = temperature_logits(
            y_pred, temperature, self.from_logits, epsilon=_EPSILON
        )
        return ops.log_softmax(z_t, axis=-1)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        soft = y_true[:, : self.num_classes]
        hard = y_true[:, self.num_classes :]
        log_p = self._log_probabilities(y_pred, 1.0)
        log_p_t = self._log_probabilities(y_pred, self.temperature)
        kl = ops.sum(
            soft * (ops.log(ops.clip(soft, _EPSILON, 1.0)) - log_p_t), axis=-1
        )
        cross_entropy = -ops.sum(hard * log_p, axis=-1)
        return (
            self.alpha * cross_entropy
            + (1.0 - self.alpha) * self.temperature**2 * kl
        )


def _label_accuracy(num_classes: int):
    def accuracy(y_true, y_pred):
        hard = y_true[:, num_classes:]
        return ops.cast(
            ops.equal(ops.argmax(hard, axis=-1), ops.argmax(y_pred, axis=-1)),
            "float32",
        )

    return accuracy


def _split_data(data, name: str):
    if data is None:
        raise ValueError(
            f"`{name}` must be training inputs `x` or an `(x, y)` tuple of "
            f"arrays. Received: {name}=None."
        )
    if isinstance(data, tuple) and len(data) == 2:
        x, y = data
    elif isinstance(data, tuple):
        raise ValueError(
            f"`{name}` must be `x` or an `(x, y)` tuple of arrays. Received: "
            f"a tuple of {len(data)} items."
        )
    else:
        x, y = data, None
    try:
        x = np.asarray(x)
    except (TypeError, ValueError):
        x = None
    if x is None or x.dtype == object or x.ndim == 0 or len(x) == 0:
        raise ValueError(
            f"The inputs of `{name}` must be a non-empty numeric array. "
            f"Received: {type(data).__name__}."
        )
    return x, y


def _one_hot(y, num_samples: int, num_classes: int, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
        labels = y.astype("float32")
    else:
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"The labels of `{name}` must be integer class indices of "
                f"shape (n,) or one-hot rows of shape (n, {num_classes}). "
                f"Received: labels of shape {y.shape} and dtype {y.dtype}."
            )
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"The labels of `{name}` must be between 0 and "
                f"{num_classes - 1} (the teacher has {num_classes} classes)."
                f" Received: labels from {y.min()} to {y.max()}."
            )
        labels = np.eye(num_classes, dtype="float32")[y]
    if len(labels) != num_samples:
        raise ValueError(
            f"`{name}` has {num_samples} inputs but {len(labels)} labels; "
            "pass one label per input."
        )
    return labels


def _resolve_teacher(teacher, **load_kwargs):
    """The models whose mean probabilities teach, and the first member."""
    if isinstance(teacher, keras.Model):
        try:
            first = teacher.get_layer("snapshot_1")
        except ValueError:
            first = None
        if not isinstance(first, keras.Model):
            first = teacher
        return [teacher], first
    members = load_snapshots(teacher, **load_kwargs)
    return members, members[0]


def teacher_probabilities(
    teacher_models: list, x, batch_size: int = 256, from_logits: bool = False
) -> np.ndarray:
    """The mean of the models' class probabilities on `x`, as float64.

    Example:

    ```python
    q = teacher_probabilities([ensemble], x_train)
    ```
    """
    total = None
    for model in teacher_models:
        output = model.predict(x, batch_size=batch_size, verbose=0)
        if isinstance(output, dict):
            if "probabilities" not in output:
                raise ValueError(
                    f"The teacher {model.name!r} returns a dict without a "
                    f"'probabilities' key (keys {sorted(output)})."
                )
            output = output["probabilities"]
        output = _scoring.probabilities(output, from_logits)
        if not from_logits and (
            output.ndim != 2
            or not np.all(output >= -1e-6)
            or not np.allclose(output.sum(axis=-1), 1.0, atol=1e-3)
        ):
            raise ValueError(
                f"The teacher {model.name!r} does not output class "
                "probabilities (non-negative rows that sum to 1); for logits "
                "pass `teacher_from_logits=True`. Received: outputs of shape "
                f"{output.shape}."
            )
        total = output if total is None else total + output
    return total / len(teacher_models)


def distill(
    teacher,
    student=None,
    data=None,
    temperature: float = 4.0,
    alpha: float = 0.1,
    epochs: int = 10,
    batch_size: int = 32,
    optimizer="adam",
    validation_data=None,
    callbacks=None,
    verbose="auto",
    teacher_from_logits: bool = False,
    student_from_logits: bool = False,
    teacher_batch_size: int = 256,
    safe_mode: bool = True,
    custom_objects: dict | None = None,
    skip_invalid: bool = False,
    allow_nonfinite: bool = False,
):
    """Trains one student model on an ensemble's softened probabilities.

    Knowledge distillation (Hinton et al. 2015, arXiv:1503.02531): the
    teacher's mean probabilities `q` are computed once on `data`, and the
    student, with logits `z`, is trained with `model.fit` on

    `L = alpha * CE(y, softmax(z))`
    `    + (1 - alpha) * T^2 * KL(q_T || softmax(z / T))`

    with soft targets `q_T = softmax(log(q) / T)`. The student is trained
    in place and returned with no keras_snapshot object in it.

    Args:
        teacher: A Keras model that outputs class probabilities (such as
            `build_ensemble(...)`), a snapshot directory, or a list of
            `.keras` paths or models (their probabilities are averaged).
        student: The Keras model (functional or Sequential) to train; by
            default a fresh copy of the first member (the `snapshot_1`
            sub-model of a `build_ensemble` model).
        data: `x` or an `(x, y)` tuple of arrays; `y` are integer labels
            or one-hot rows. Without labels, `alpha` must be 0.
        temperature: The temperature `T` (Hinton et al. use 1 to 20), in
            `(0, 1000]` (`MAX_TEMPERATURE`): beyond, a higher T only adds
            float32 rounding.
        alpha: Weight of the hard-label loss, between 0 and 1.
        epochs: Epochs of student training.
        batch_size: Batch size of student training.
        optimizer: A Keras optimizer or its name.
        validation_data: Optional `(x_val, y_val)`; reported as `val_loss`
            (the same distillation loss) and `val_accuracy` (labels).
        callbacks: Keras callbacks for the student's `fit`.
        verbose: Passed to `fit` ("auto" shows the progress bar).
        teacher_from_logits: The teacher outputs logits, not probabilities.
        student_from_logits: The student outputs logits.
        teacher_batch_size: Batch size of the teacher's predictions.
        safe_mode, skip_invalid, custom_objects, allow_nonfinite: How a
            teacher of snapshots is loaded, the same for every loader: see
            `keras_snapshot.loading.LoadOptions`.

    Returns:
        The trained student, a plain Keras model.

    Example:

    ```python
    student = keras_snapshot.distill(
        "snapshots", data=(x_train, y_train), temperature=4.0, alpha=0.1,
        epochs=20,
    )
    student.save("student.keras")  # Reloads without keras_snapshot.
    ```
    """
    temperature = _check_temperature(temperature)
    alpha = _check_alpha(alpha)
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    teacher_batch_size = check_positive_int(
        "teacher_batch_size", teacher_batch_size
    )
    x, y = _split_data(data, "data")
    if y is None and alpha > 0:
        raise ValueError(
            "`data` has no labels, but `alpha` > 0 weights a hard-label loss:"
            " pass `data=(x, y)`, or `alpha=0`. "
            f"Received: alpha={alpha}, data without labels."
        )
    if student is not None and not isinstance(student, keras.Model):
        raise TypeError(
            "`student` must be a Keras model or None (a fresh copy of the "
            f"first member). Received: student={student!r}."
        )
    teacher_models, first_member = _resolve_teacher(
        teacher,
        safe_mode=safe_mode,
        skip_invalid=skip_invalid,
        custom_objects=custom_objects,
        allow_nonfinite=allow_nonfinite,
    )
    if student is None:
        student = clone_model(first_member, safe_mode, custom_objects)
    try:
        inputs, outputs = student.inputs, student.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ValueError(
            "`student` must be a functional or Sequential model built with "
            "`keras.Input`. Received: a model of type "
            f"{type(student).__name__} without `inputs`."
        )
    if len(outputs) != 1:
        raise ValueError(
            "`student` must have one output (class probabilities or "
            f"logits). Received: a model with {len(outputs)} outputs."
        )

    def targets(x_part, y_part, name):
        q = teacher_probabilities(
            teacher_models, x_part, teacher_batch_size, teacher_from_logits
        )
        num_classes = q.shape[-1]
        if y_part is None:
            labels = np.zeros_like(q, dtype="float32")
        else:
            labels = _one_hot(y_part, len(x_part), num_classes, name)
        return np.concatenate(
            [temperature_softmax(q, temperature).astype("float32"), labels],
            axis=-1,
        ), num_classes

    packed, num_classes = targets(x, y, "data")
    student_classes = outputs[0].shape[-1]
    if student_classes != num_classes:
        raise ValueError(
            f"The student outputs {student_classes} classes but the teacher "
            f"{num_classes}. Received: student output shape "
            f"{tuple(outputs[0].shape)}."
        )
    validation = None
    if validation_data is not None:
        x_val, y_val = _split_data(validation_data, "validation_data")
        if y_val is None and alpha > 0:
            raise ValueError(
                "`validation_data` must be `(x_val, y_val)` when `alpha` > 0."
                f" Received: validation inputs without labels, alpha={alpha}."
            )
        validation = (x_val, targets(x_val, y_val, "validation_data")[0])

    trainer = keras.Model(inputs, outputs, name=f"{student.name}_distiller")
    metrics = [_label_accuracy(num_classes)] if y is not None else []
    trainer.compile(
        optimizer=optimizer,
        loss=_DistillationLoss(
            temperature, alpha, num_classes, student_from_logits
        ),
        metrics=metrics,
    )
    trainer.fit(
        x,
        packed,
        batch_size=batch_size,
        epochs=epochs,
        validation_data=validation,
        callbacks=callbacks,
        verbose=verbose,
    )
    return student
