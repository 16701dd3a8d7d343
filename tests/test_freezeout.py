"""`FreezeOut`: per-group rates against numpy, real freezing, resume, saving.

The tests not marked slow are backend-agnostic; `test_core_tests_pass_on_jax`
runs them again in a subprocess with `KERAS_BACKEND=jax`. The file is also a
script (`python tests/test_freezeout.py MODE OUT`) for the run that needs a
process of its own: a `MirroredStrategy` over 2 logical CPUs. The resume
after a real kill is in `tests/test_resume.py`.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if __name__ == "__main__":  # run as a script: import this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from keras_snapshot._keras_compat import optimizer_iterations  # noqa: E402
from keras_snapshot.freezeout import FreezeOut  # noqa: E402
from keras_snapshot.freezeout import estimate_speedup  # noqa: E402
from keras_snapshot.freezeout import freeze_fractions  # noqa: E402
from keras_snapshot.freezeout import resolve_groups  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_SECONDS = 600
BATCH = 16
N = 96  # 6 steps per epoch
LR = 0.1
WD = 0.05  # large, so that a decay at the wrong rate fails the tolerance
TF = keras.backend.backend() == "tensorflow"


# numpy references -------------------------------------------------------


def np_fractions(num_groups, t0, scaling):
    power = {"linear": 1, "squared": 2, "cubic": 3}[scaling]
    L = num_groups - 1
    return np.array([(t0 + (1 - t0) * i / L) ** power for i in range(L + 1)])


def np_rate(t, t_i, total, lr0, scale_lr):
    """lr_i(t) of the paper; 0 from step t_i * T on."""
    if t >= t_i * total:
        return 0.0
    start = lr0 / t_i if scale_lr else lr0
    return 0.5 * start * (1 + np.cos(np.pi * t / (t_i * total)))


def np_update(kind, g, lr, state, t, w=None):
    """One Keras optimizer step on one variable; returns the change.

    Kinds ending in `_wd` (and `adamw`) first decay `w` by `lr * WD * w`,
    Keras's decoupled weight decay, with the same rate.
    """
    if kind.endswith("_wd") or kind == "adamw":
        decay = lr * WD * w
        kind = {"adamw": "adam"}.get(kind, kind.removesuffix("_wd"))
        return -decay + np_update(kind, g, lr, state, t)
    if kind == "sgd":
        return -lr * g
    if kind in ("momentum", "nesterov"):
        m = state.get("m", np.zeros_like(g)) * 0.9 - lr * g
        state["m"] = m
        return 0.9 * m - lr * g if kind == "nesterov" else m
    b1, b2, eps = 0.9, 0.999, 1e-7
    m = state.get("m", np.zeros_like(g))
    v = state.get("v", np.zeros_like(g))
    m = m + (g - m) * (1 - b1)
    v = v + (g * g - v) * (1 - b2)
    state["m"], state["v"] = m, v
    alpha = lr * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
    return -alpha * m / (np.sqrt(v) + eps)


def assert_change(change, expected, before, rtol, message=""):
    """`change == expected` up to `rtol` and the float32 rounding of the
    weights themselves (a change is measured as `w(t + 1) - w(t)`)."""
    error = np.abs(change - expected)
    bound = rtol * np.abs(expected) + 2 * np.spacing(np.abs(before))
    assert np.all(error <= bound), (
        f"{message}: max error {np.max(error)}, "
        f"change {change.ravel()[:4]}, expected {expected.ravel()[:4]}"
    )


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(LR),
    "momentum": lambda: keras.optimizers.SGD(LR, momentum=0.9),
    "nesterov": lambda: keras.optimizers.SGD(LR, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(LR / 10),
    "sgd_wd": lambda: keras.optimizers.SGD(LR, weight_decay=WD),
    "momentum_wd": lambda: keras.optimizers.SGD(
        LR, momentum=0.9, weight_decay=WD
    ),
    "adamw": lambda: keras.optimizers.AdamW(LR / 10, weight_decay=WD),
}


# models and probes --------------------------------------------------------


def make_data(n=N, features=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    w = rng.normal(size=(features, classes))
    return x, np.argmax(x @ w, axis=1).astype("int32")


class Probe(keras.Model):
    """A functional model that records each trace of its train step.

    Python code in `train_step` runs only while Keras traces the train
    function, so `traces` has one entry per trace: the number of variables
    that get gradients and, on TensorFlow, the MatMul ops the step really
    runs (those a variable update depends on; TensorFlow's function runtime
    prunes the others).
    """

    def train_step(self, *args, **kwargs):
        info = {"gradients": len(self.trainable_variables)}
        out = super().train_step(*args, **kwargs)
        if TF:
            import tensorflow as tf

            info["matmuls"] = _live_matmuls(tf.compat.v1.get_default_graph())
        self.traces = getattr(self, "traces", []) + [info]
        return out


def _live_matmuls(graph):
    """MatMul ops that some variable assignment depends on."""
    operations = graph.get_operations()
    stack = [
        op
        for op in operations
        if op.type.startswith(("Assign", "ResourceApply"))
    ]
    seen = set()
    while stack:
        op = stack.pop()
        if op.name not in seen:
            seen.add(op.name)
            stack.extend(t.op for t in op.inputs)
            stack.extend(op.control_inputs)
    return sum(op.type == "MatMul" and op.name in seen for op in operations)


def make_model(depth=3, batchnorm=False, features=8, classes=3, probe=True):
    """`depth` Dense layers (one group each); BatchNorm after the first.

    With `probe=False` a plain `keras.Model`, to save and load elsewhere.
    """
    inputs = keras.Input((features,))
    x = keras.layers.Dense(16, name="dense_0")(inputs)
    if batchnorm:
        x = keras.layers.BatchNormalization(name="bn_0")(x)
    x = keras.layers.ReLU()(x)
    for i in range(1, depth - 1):
        x = keras.layers.Dense(16, activation="relu", name=f"dense_{i}")(x)
    outputs = keras.layers.Dense(
        classes, activation="softmax", name=f"dense_{depth - 1}"
    )(x)
    return (Probe if probe else keras.Model)(inputs, outputs)


def sync(model):
    """On JAX, writes the running training state back to the variables."""
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


def batch_gradients(model, variables, x, y):
    """Gradients of the mean cross-entropy for `variables`, any backend."""
    loss = keras.losses.SparseCategoricalCrossentropy()
    if keras.backend.backend() == "jax":
        import jax

        trainable = model.trainable_variables
        others = model.non_trainable_variables
        index = {id(v): i for i, v in enumerate(variables)}

        def f(values):
            tv = [
                values[index[id(v)]] if id(v) in index else v.value
                for v in trainable
            ]
            ntv = [
                values[index[id(v)]] if id(v) in index else v.value
                for v in others
            ]
            y_pred, _ = model.stateless_call(tv, ntv, x, training=True)
            return loss(y, y_pred)

        grads = jax.grad(f)([v.value for v in variables])
        return [np.asarray(g) for g in grads]
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch([v.value for v in variables])
        value = loss(y, model(x, training=True))
    grads = tape.gradient(value, [v.value for v in variables])
    return [g.numpy() for g in grads]


class Recorder(keras.callbacks.Callback):
    """Records all weights before each step and at the end; gradients too."""

    def __init__(self, x, y, gradients=True):
        super().__init__()
        self.x, self.y, self.gradients = x, y, gradients
        self.weights, self.grads, self.frozen = [], [], []

    def on_train_begin(self, logs=None):
        self.variables = list(self.model.trainable_variables)

    def _snapshot(self):
        sync(self.model)
        return [keras.ops.convert_to_numpy(w) for w in self.model.weights]

    def on_train_batch_begin(self, batch, logs=None):
        self.weights.append(self._snapshot())
        self.frozen.append(
            [not la.trainable for la in self.model.layers if la.weights]
        )
        if self.gradients:
            sl = slice(batch * BATCH, (batch + 1) * BATCH)
            self.grads.append(
                batch_gradients(
                    self.model, self.variables, self.x[sl], self.y[sl]
                )
            )

    def on_train_end(self, logs=None):
        self.weights.append(self._snapshot())


def train(
    optimizer="sgd",
    epochs=4,
    depth=3,
    batchnorm=False,
    gradients=True,
    callbacks=(),
    probe=True,
    steps_per_execution=1,
    **freezeout,
):
    """Trains with FreezeOut; `optimizer` is a key of OPTIMIZERS or a
    function that makes one."""
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model(depth, batchnorm, probe=probe)
    make = OPTIMIZERS.get(optimizer) if isinstance(optimizer, str) else None
    model.compile(
        (make or optimizer)(),
        "sparse_categorical_crossentropy",
        steps_per_execution=steps_per_execution,
    )
    freeze = FreezeOut(verbose=0, **freezeout)
    recorder = Recorder(x, y, gradients)
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[freeze, recorder, *callbacks],
    )
    return model, freeze, recorder


def group_weight_indices(model, groups):
    """Indices into `model.weights` of each group's weights."""
    position = {id(w): i for i, w in enumerate(model.weights)}
    return [[position[id(w)] for la in g for w in la.weights] for g in groups]


# the schedule ---------------------------------------------------------------


@pytest.mark.parametrize("scaling", ["linear", "squared", "cubic"])
@pytest.mark.parametrize("t0", [0.5, 0.8, 1.0])
def test_freeze_fractions_match_the_formula(scaling, t0):
    for groups in (2, 3, 20):
        np.testing.assert_allclose(
            freeze_fractions(groups, t0, scaling),
            np_fractions(groups, t0, scaling),
            rtol=1e-12,
        )
        assert freeze_fractions(groups, t0, scaling)[-1] == 1.0
    # The paper's default: the first group freezes at 0.8**3 = 51.2%.
    assert freeze_fractions(5, 0.8, "cubic")[0] == pytest.approx(0.512)


# exact rates ----------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer, scaling, scale_lr",
    [
        ("sgd", "linear", True),
        ("sgd", "cubic", False),
        ("momentum", "squared", True),
        ("nesterov", "linear", True),
        ("adam", "cubic", True),
        ("sgd_wd", "linear", True),
        ("momentum_wd", "cubic", True),
        ("adamw", "squared", False),
    ],
)
def test_every_update_uses_the_group_rate(optimizer, scaling, scale_lr):
    """Each step's change of each variable is the optimizer's update with
    lr_i(t) of the numpy formula, and exactly zero once the group froze."""
    t0, epochs = 0.5, 4
    model, freeze, rec = train(
        optimizer, epochs, t0=t0, scaling=scaling, scale_lr=scale_lr
    )
    total = epochs * N // BATCH
    fractions = np_fractions(3, t0, scaling)
    groups = freeze.groups_
    indices = group_weight_indices(model, groups)
    variable_of = {id(v): i for i, v in enumerate(rec.variables)}
    position = {id(w): i for i, w in enumerate(model.weights)}
    states = {}
    for t in range(total):
        for i, group in enumerate(groups):
            lr = np_rate(
                t,
                fractions[i],
                total,
                LR / 10 if optimizer.startswith("adam") else LR,
                scale_lr,
            )
            for layer in group:
                for w in layer.weights:
                    change = (
                        rec.weights[t + 1][position[id(w)]]
                        - rec.weights[t][position[id(w)]]
                    )
                    if t >= math.ceil(fractions[i] * total - 1e-9):
                        # Frozen: bit-identical, however the optimizer's
                        # momentum or moments stand.
                        assert not np.any(change), (t, i, w.path)
                        continue
                    g = rec.grads[t][variable_of[id(w)]]
                    expected = np_update(
                        optimizer,
                        g,
                        lr,
                        states.setdefault(id(w), {}),
                        t,
                        rec.weights[t][position[id(w)]],
                    )
                    assert_change(
                        change,
                        expected,
                        rec.weights[t][position[id(w)]],
                        rtol=2e-3,
                        message=f"step {t}, group {i}, {w.path}",
                    )
    # Groups below the last froze; the last trained to the end.
    assert [s for s, _ in freeze.freeze_events] == [
        math.ceil(f * total - 1e-9) for f in fractions[:-1]
    ]
    last = indices[-1]
    assert any(np.any(rec.weights[-1][k] != rec.weights[-2][k]) for k in last)


def test_plain_sgd_update_is_rate_times_gradient():
    """The issue's statement, literally: w(t+1) - w(t) = -lr_i(t) * g."""
    model, freeze, rec = train("sgd", 2, t0=0.8, scaling="cubic")
    total, fractions = 12, np_fractions(3, 0.8, "cubic")
    for t in range(total):
        for i, group in enumerate(freeze.groups_):
            rate = np_rate(t, fractions[i], total, LR, True)
            for layer in group:
                w = layer.kernel
                k = [id(v) for v in model.weights].index(id(w))
                g = rec.grads[t][[id(v) for v in rec.variables].index(id(w))]
                change = rec.weights[t + 1][k] - rec.weights[t][k]
                assert_change(change, -rate * g, rec.weights[t][k], 1e-4)


# real freezing --------------------------------------------------------------


def test_frozen_groups_stay_bit_identical_batchnorm_included():
    model, freeze, rec = train(
        "momentum",
        4,
        batchnorm=True,
        gradients=False,
        t0=0.5,
        scaling="linear",
    )
    assert [[la.name for la in g] for g in freeze.groups_] == [
        ["dense_0", "bn_0"],
        ["dense_1"],
        ["dense_2"],
    ]
    indices = group_weight_indices(model, freeze.groups_)
    # Group 0 (with the BatchNorm's moving mean and variance) from step 12,
    # group 1 from step 18: unchanged to the end, bit for bit.
    for group, start in ((0, 12), (1, 18)):
        for k in indices[group]:
            for later in rec.weights[start + 1 :]:
                np.testing.assert_array_equal(later[k], rec.weights[start][k])
        # ... and changing until then.
        for k in indices[group]:
            assert np.any(rec.weights[start][k] != rec.weights[start - 1][k])
    # The groups above still train after each freeze.
    for k in indices[2]:
        assert np.any(rec.weights[-1][k] != rec.weights[-2][k])
    for k in indices[1]:
        assert np.any(rec.weights[18][k] != rec.weights[13][k])
    # The BatchNorm ran in inference mode once frozen: layer flags
    # seen at each step, and restored at the end.
    assert rec.frozen[11][:2] == [False, False]
    assert rec.frozen[12][:2] == [True, True]
    assert rec.frozen[18] == [True, True, True, False]
    assert all(la.trainable for la in model.layers)


def test_backward_pass_shrinks_with_one_trace_per_freeze_step():
    """5 groups, 6 steps, cubic t0=0.8: groups 0 and 1 freeze at step 4
    together, group 2 at 5: 3 traces, each with fewer gradients."""
    depth = 5
    model, freeze, _ = train(
        "sgd",
        1,
        depth=depth,
        gradients=False,
        t0=0.8,
        scaling="cubic",
        groups="layers",
    )
    steps = [math.ceil(f * 6 - 1e-9) for f in np_fractions(depth, 0.8, "cubic")]
    assert steps == [4, 4, 5, 6, 6]
    assert freeze.freeze_events == [(4, [0, 1]), (5, [2])]
    # One trace at the start and one per freeze step, not per group.
    assert len(model.traces) == 3
    # Kernel and bias of each Dense still training get gradients.
    assert [t["gradients"] for t in model.traces] == [10, 6, 4]
    if TF:
        # The backward pass stops at the lowest group still training:
        # `depth` forward MatMuls, and 2 per training layer but 1 for the
        # lowest (no input gradient needed there).
        frozen = [0, 2, 3]
        assert [t["matmuls"] for t in model.traces] == [
            depth + 2 * (depth - k) - 1 for k in frozen
        ]


def test_groups_argument_forms_and_cost_estimate():
    keras.utils.set_random_seed(0)
    model = make_model(4, batchnorm=True)
    names = [["dense_0", "bn_0"], ["dense_1"], ["dense_2", "dense_3"]]
    groups = resolve_groups(model, names)
    assert [[la.name for la in g] for g in groups] == names
    assert [[la.name for la in g] for g in resolve_groups(model, 2)] == [
        ["dense_0", "bn_0", "dense_1"],
        ["dense_2", "dense_3"],
    ]
    # By default the weighted layers merge into at most 4 groups (at most
    # 3 retraces); "layers" keeps one group per weighted layer.
    assert [[la.name for la in g] for g in resolve_groups(model)] == [
        ["dense_0", "bn_0"],
        ["dense_1"],
        ["dense_2"],
        ["dense_3"],
    ]
    deep = make_model(9)
    assert [len(g) for g in resolve_groups(deep)] == [3, 2, 2, 2]
    assert len(resolve_groups(deep, "layers")) == 9
    assert resolve_groups(deep) == resolve_groups(deep, 4)
    layer = model.get_layer("dense_3")
    mixed = resolve_groups(
        model, [["dense_0", "bn_0", "dense_1"], ["dense_2", layer]]
    )
    assert mixed[1][1] is layer
    # The cost model against a hand count: 2 * in * out per Dense, 4 per
    # BatchNorm output; backward twice the forward while a group trains.
    f = np.array([2 * 8 * 16 + 4 * 16, 2 * 16 * 16, 2 * 16 * 16 + 2 * 16 * 3])
    t = np_fractions(3, 0.5, "linear")
    expected = 1 - np.sum(f * (1 + 2 * t)) / np.sum(f * 3)
    assert estimate_speedup(model, names, 0.5, "linear") == pytest.approx(
        expected
    )
    assert estimate_speedup(model, names, 1.0, "linear") == pytest.approx(0)


def test_config_round_trip():
    freeze = FreezeOut(0.5, "squared", False, [["a", "b"], ["c"]], 100, 0)
    config = freeze.get_config()
    assert config == {
        "t0": 0.5,
        "scaling": "squared",
        "scale_lr": False,
        "groups": [["a", "b"], ["c"]],
        "total_steps": 100,
        "verbose": 0,
        "log_dir": None,
    }
    assert FreezeOut.from_config(config).get_config() == config
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(freeze)
    )
    assert isinstance(again, FreezeOut) and again.get_config() == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"t0": 0}, "Received: t0=0"),
        ({"t0": -0.5}, "Received: t0=-0.5"),
        ({"t0": 1.5}, r"in \(0, 1\].*Received: t0=1.5"),
        ({"t0": float("nan")}, "Received: t0=nan"),
        ({"t0": "0.8"}, "Received: t0='0.8'"),
        ({"scaling": "quadratic"}, "Received: scaling='quadratic'"),
        ({"scale_lr": "yes"}, "Received: scale_lr='yes'"),
        ({"groups": []}, "`groups` is empty"),
        ({"groups": "dense_0"}, "Received: groups='dense_0'"),
        ({"groups": True}, "Received: groups=True"),
        ({"groups": 0}, "at least 2.*Received: groups=0"),
        ({"total_steps": 0}, "Received: total_steps=0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FreezeOut(**kwargs)


@pytest.mark.parametrize(
    "groups, message",
    [
        ([["dense_0", "bn_0"], []], "Group 1 of `groups` is empty"),
        ([["dense_0", "bn_0", "dense_1", "dense_2"]], "at least 2 layer"),
        (1, "between 2 and the number"),
        ([["dense_0", "bn_0"], ["dense_1"], ["dense_9"]], "no layer named"),
        (
            [["dense_0", "bn_0"], ["dense_1", "dense_0"], ["dense_2"]],
            "in groups 0 and 1",
        ),
        ([["dense_0"], ["dense_1"], ["dense_2"]], r"\['bn_0'\] are in no"),
        ([["dense_0", "bn_0"], [3]], "Received: groups entry 3"),
    ],
)
def test_bad_groups(groups, message):
    model = make_model(3, batchnorm=True)
    with pytest.raises(ValueError, match=message):
        resolve_groups(model, groups)


def test_a_model_with_one_group_is_refused_at_fit():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    model.compile("sgd", "mse")
    x, _ = make_data(16)
    with pytest.raises(ValueError, match="has 1 group"):
        model.fit(x, np.zeros((16, 3)), verbose=0, callbacks=[FreezeOut()])


def test_optimizer_is_left_as_it_was():
    model, _, _ = train("adam", 1, gradients=False)
    assert "update_step" not in vars(model.optimizer)
    assert "stateless_apply" not in vars(model.optimizer)
    assert "_apply_weight_decay" not in vars(model.optimizer)
    assert "make_train_function" not in vars(model)
    assert "get_config" not in vars(model)
    assert type(model.optimizer) is keras.optimizers.Adam


def test_a_failed_fit_does_not_stack_rate_wrappers():
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model(3)
    model.compile(OPTIMIZERS["sgd"](), "sparse_categorical_crossentropy")

    class Fail(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=4,
            verbose=0,
            callbacks=[FreezeOut(verbose=0), Fail()],
        )
    # Keras skipped `on_train_end`: the wrappers stay until the model is
    # used again. The next `fit` undoes them before it attaches its own.
    assert freezeout_markers(model.optimizer)
    recorder = Recorder(x, y)
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=4,
        verbose=0,
        shuffle=False,
        callbacks=[FreezeOut(total_steps=26, verbose=0), recorder],
    )
    assert_as_it_was(model)
    t = 2  # the optimizer had done 2 steps: the rates continue from there
    rate = np_rate(t + 1, np_fractions(3, 0.8, "cubic")[2], 26, LR, True)
    k = [id(w) for w in model.weights].index(id(model.layers[-1].kernel))
    g = recorder.grads[1][
        [id(v) for v in recorder.variables].index(id(model.layers[-1].kernel))
    ]
    change = recorder.weights[2][k] - recorder.weights[1][k]
    assert_change(change, -rate * g, recorder.weights[1][k], 1e-4)


# every training mode: a step is an optimizer update ----------------------


def test_gradient_accumulation_counts_updates():
    """k=2: 24 batches are 12 updates. T, the freeze steps and the rate of
    every update count updates (once, T was 24 batches, so the anneal was
    half done and no group had frozen when training ended)."""
    t0, k = 0.5, 2
    model, freeze, rec = train(
        lambda: keras.optimizers.SGD(LR, gradient_accumulation_steps=k),
        4,
        t0=t0,
        scaling="linear",
    )
    total = 4 * (N // BATCH) // k
    assert freeze.total_steps_ == total == 12
    fractions = np_fractions(3, t0, "linear")
    steps = [math.ceil(f * total - 1e-9) for f in fractions]
    assert freeze.freeze_steps_ == steps == [6, 9, 12]
    assert freeze.freeze_events == [(6, [0]), (9, [1])]
    position = {id(w): i for i, w in enumerate(model.weights)}
    variable_of = {id(v): i for i, v in enumerate(rec.variables)}
    for u in range(total):  # Update u runs at batches k*u .. k*u + k - 1.
        before, after = rec.weights[k * u], rec.weights[k * u + k]
        for i, group in enumerate(freeze.groups_):
            rate = np_rate(u, fractions[i], total, LR, True)
            for w in (w for layer in group for w in layer.weights):
                p = position[id(w)]
                change = after[p] - before[p]
                if u >= steps[i]:
                    assert not np.any(change), (u, i, w.path)
                    continue
                g = np.mean(
                    [
                        rec.grads[k * u + j][variable_of[id(w)]]
                        for j in range(k)
                    ],
                    axis=0,
                )
                assert_change(
                    change, -rate * g, before[p], 2e-3, f"update {u}, {w.path}"
                )
    # Every group but the last froze, each at the batch that made its step.
    assert rec.frozen[k * 6 - 1][:2] == [False, False]
    assert rec.frozen[k * 6][:2] == [True, False]
    assert rec.frozen[k * 9][:2] == [True, True]
    assert all(la.trainable for la in model.layers)


def test_steps_per_execution_freezes_at_the_first_callback_after_its_step():
    """N=4, 6 batches an epoch, T=18: Keras calls back at steps 0, 4, 6,
    10, 12, 16, so the groups due at steps 9 and 14 freeze at 10 and 16.
    Their rate is 0 from the step due: plain SGD ends where it ends
    without N."""
    kwargs = dict(gradients=False, t0=0.5, scaling="linear")
    reference, exact, _ = train("sgd", 3, **kwargs)
    model, late, _ = train("sgd", 3, steps_per_execution=4, **kwargs)
    assert exact.freeze_events == [(9, [0]), (14, [1])]
    assert late.freeze_events == [(10, [0]), (16, [1])]
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all(la.trainable for la in model.layers)


class StepRecorder(keras.callbacks.Callback):
    """The optimizer step and the frozen flags at each batch."""

    def __init__(self):
        super().__init__()
        self.steps, self.frozen = [], []

    def on_train_batch_begin(self, batch, logs=None):
        # Updates applied (Keras 3.8's LossScaleOptimizer counts inside).
        self.steps.append(optimizer_iterations(self.model.optimizer))
        self.frozen.append(
            [not la.trainable for la in self.model.layers if la.weights]
        )


def test_skipped_updates_are_not_steps():
    """Loss scale 2**24 overflows float16 gradients: the first 8 updates
    are skipped (epoch 0 and 2 batches of epoch 1). Group 0, due at step 3,
    freezes when `optimizer.iterations` reaches 3, at batch 5 of epoch 1
    (once, at batch 3: "epoch start + batch index" counted skipped updates
    as steps)."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    recorder = StepRecorder()
    try:
        _, freeze, _ = train(
            lambda: keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD(LR), initial_scale=2.0**24
            ),
            6,
            gradients=False,
            callbacks=[recorder],
            t0=0.08,
            scaling="linear",
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert len(recorder.steps) - recorder.steps[-1] > 1  # Skipped updates.
    steps = freeze.freeze_steps_[:-1]
    assert steps == [3, 20]
    assert freeze.freeze_events == [(s, [i]) for i, s in enumerate(steps)]
    for step, frozen in zip(recorder.steps, recorder.frozen):
        assert frozen[:2] == [step >= s for s in steps], step


# whatever ends `fit`, the model and optimizer are left as they were -------


class Interrupt(keras.callbacks.Callback):
    """Raises `error` before the batch that would run update `step`."""

    def __init__(self, error, step):
        super().__init__()
        self.error, self.step = error, step

    def on_train_batch_begin(self, batch, logs=None):
        iterations = self.model.optimizer.iterations
        if int(keras.ops.convert_to_numpy(iterations)) == self.step:
            raise self.error


def freezeout_markers(obj):
    """Attributes of `obj` that FreezeOut put there."""
    return [
        name
        for name, value in vars(obj).items()
        if getattr(value, "freezeout", False)
    ]


def fit_raising(model, x, y, error, callbacks=()):
    """A FreezeOut fit (group 0 due at step 12) that `error` ends; returns
    the FreezeOut."""
    freeze = FreezeOut(t0=0.5, scaling="linear", verbose=0)
    with pytest.raises(type(error)):
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=4,
            shuffle=False,
            verbose=0,
            callbacks=[freeze, *callbacks],
        )
    return freeze


def interrupted_fit(error, step=14):
    """A FreezeOut fit (group 0 due at step 12) that `error` ends at `step`."""
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model(3, batchnorm=True, probe=False)
    model.compile(OPTIMIZERS["sgd"](), "sparse_categorical_crossentropy")
    freeze = fit_raising(model, x, y, error, [Interrupt(error, step)])
    # Keras did not call `on_train_end`: the fit ended with group 0 frozen.
    assert freeze.freeze_events == [(12, [0])]
    return model, x, y


def assert_plain_sgd_steps(model, x, y):
    """A plain `fit`: every trainable variable moves by -LR * gradient."""
    recorder = Recorder(x, y)
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[recorder],
    )
    position = {id(w): i for i, w in enumerate(model.weights)}
    assert len(recorder.variables) == 8  # 3 kernels, 3 biases, gamma, beta
    for t in range(N // BATCH):
        for v, w in enumerate(recorder.variables):
            p = position[id(w)]
            # The first bias, under BatchNorm, has a gradient near 0.
            np.testing.assert_allclose(
                recorder.weights[t + 1][p] - recorder.weights[t][p],
                -LR * recorder.grads[t][v],
                rtol=2e-3,
                atol=1e-6,
                err_msg=f"step {t}, {w.path}",
            )


def assert_as_it_was(model):
    assert all(la.trainable for la in model.layers)
    assert freezeout_markers(model) == []
    assert freezeout_markers(model.optimizer) == []


@pytest.mark.parametrize(
    "error", [RuntimeError("a callback failed"), KeyboardInterrupt()]
)
def test_a_fit_ended_by_an_exception_saves_and_trains_as_before(
    tmp_path, error
):
    model, x, y = interrupted_fit(error)
    # The first thing done with the model: save it.
    model.save(tmp_path / "after.keras")
    loaded = keras.saving.load_model(tmp_path / "after.keras")
    assert all(la.trainable for la in loaded.layers)
    config = json.dumps(model.get_config())
    assert '"trainable": false' not in config
    assert_as_it_was(model)
    assert_plain_sgd_steps(model, x, y)
    assert_as_it_was(model)


class RaiseInStep(keras.layers.Layer):
    """Raises `error` in the forward pass of training step `calls` (the
    model runs eagerly): an error or a Ctrl-C inside a step."""

    def __init__(self, error, calls, **kwargs):
        super().__init__(**kwargs)
        self.error, self.calls, self.seen = error, calls, 0

    def call(self, inputs, training=None):
        if training:
            self.seen += 1
            if self.seen == self.calls:
                raise self.error
        return inputs


@pytest.mark.parametrize(
    "error", [RuntimeError("out of memory"), KeyboardInterrupt()]
)
def test_an_exception_inside_a_step_restores_the_model_at_once(error):
    """What a custom GradientTape loop or clone_model reads right after the
    exception: every layer trainable, no wrapper left."""
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = keras.Sequential(
        [
            keras.Input((8,)),
            RaiseInStep(error, calls=15),  # Step 14; group 0 froze at 12.
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(
        OPTIMIZERS["sgd"](), "sparse_categorical_crossentropy", run_eagerly=True
    )
    freeze = fit_raising(model, x, y, error)
    assert freeze.freeze_events == [(12, [0])]
    assert all(layer.trainable for layer in model.layers)
    assert len(model.trainable_variables) == 6
    assert all(layer.get_config()["trainable"] for layer in model.layers[1:])
    assert freezeout_markers(model) == []
    assert freezeout_markers(model.optimizer) == []


@pytest.mark.parametrize("thread", [False, True])
def test_a_plain_fit_after_an_interrupted_one_trains_every_layer(thread):
    model, x, y = interrupted_fit(KeyboardInterrupt())
    # The first thing done with the model: a plain fit, without FreezeOut,
    # here or in another thread (which cannot see this thread's stack).
    if thread:
        failures = []

        def fit():
            try:
                assert_plain_sgd_steps(model, x, y)
            except BaseException as e:  # Reported in the test's thread.
                failures.append(e)

        worker = threading.Thread(target=fit)
        worker.start()
        worker.join()
        if failures:
            raise failures[0]
    else:
        assert_plain_sgd_steps(model, x, y)
    assert_as_it_was(model)


# refusals -----------------------------------------------------------------


def small_compiled_model(optimizer=None):
    keras.utils.set_random_seed(0)
    model = make_model(3, probe=False)
    model.compile(
        optimizer or OPTIMIZERS["sgd"](), "sparse_categorical_crossentropy"
    )
    return model


def fit_refused(model, callbacks, match, error=ValueError):
    """`fit` raises `error` before the first update; nothing is changed."""
    x, y = make_data()
    before = model.get_weights()
    with pytest.raises(error, match=match):
        model.fit(
            x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=callbacks
        )
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0
    assert_as_it_was(model)


@pytest.mark.parametrize("freezeout_first", [True, False])
def test_snapshot_checkpoint_in_the_same_fit_is_refused(
    tmp_path, freezeout_first
):
    from keras_snapshot import SnapshotCheckpoint

    folder = tmp_path / "snapshots"
    callbacks = [
        FreezeOut(verbose=0),
        SnapshotCheckpoint(str(folder), cycle_length=6, verbose=0),
    ]
    fit_refused(
        small_compiled_model(),
        callbacks if freezeout_first else callbacks[::-1],
        "FreezeOut and SnapshotCheckpoint cannot share a fit",
    )
    assert not folder.exists()  # Refused before any callback began.


def test_a_fit_past_total_steps_warns():
    """24 steps with T=12: the last 12 would train silently at rate 0."""
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = small_compiled_model()
    with pytest.warns(UserWarning, match=r"runs to step 24, past total_st"):
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=4,
            verbose=0,
            callbacks=[FreezeOut(total_steps=12, verbose=0)],
        )


def test_reusing_freezeout_for_a_second_fit_warns(recwarn):
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = small_compiled_model()
    freeze = FreezeOut(verbose=0)
    kwargs = dict(batch_size=BATCH, epochs=2, verbose=0, callbacks=[freeze])
    model.fit(x, y, **kwargs)
    assert not [w for w in recwarn if "FreezeOut" in str(w.message)]
    with pytest.warns(UserWarning, match=r"starts at step 12, at or past"):
        model.fit(x, y, **kwargs)


def nested_model():
    """A functional model with a Sequential block inside."""
    block = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(16, name="inner_a"),
            keras.layers.Dense(16, name="inner_b"),
        ],
        name="block",
    )
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, name="stem")(inputs)
    outputs = keras.layers.Dense(3, name="head")(block(x))
    return keras.Model(inputs, outputs), block


def test_a_nested_layer_and_its_parent_in_two_groups_are_refused():
    model, block = nested_model()
    inner = block.get_layer("inner_b")
    assert len(resolve_groups(model, [["stem", "block"], ["head"]])) == 2
    with pytest.raises(
        ValueError, match=r"'inner_b' \(group 1\) is inside 'block' \(group 0"
    ):
        resolve_groups(model, [["stem", "block"], [inner, "head"]])
    model.compile(OPTIMIZERS["sgd"](), "sparse_categorical_crossentropy")
    fit_refused(
        model,
        [FreezeOut(groups=[[inner], ["stem", "block", "head"]], verbose=0)],
        r"'inner_b' \(group 0\) is inside 'block' \(group 1\)",
    )


class SGDWithoutDecayPass(keras.optimizers.SGD):
    """An optimizer whose decoupled decay is not a separate pass."""

    _apply_weight_decay = None


class SGDWithOwnRate(keras.optimizers.SGD):
    """An optimizer whose `update_step` takes no learning rate."""

    def update_step(self, gradient, variable):
        return super().update_step(gradient, variable, self.learning_rate)


@pytest.mark.parametrize(
    "optimizer, match",
    [
        (SGDWithoutDecayPass, r"`_apply_weight_decay` is not callable"),
        (SGDWithOwnRate, r"`update_step\(gradient, variable\)` does not take"),
    ],
)
def test_an_optimizer_without_the_expected_internals_is_refused(
    optimizer, match
):
    fit_refused(
        small_compiled_model(optimizer(LR)),
        [FreezeOut(verbose=0)],
        rf"{match}.*Keras {keras.version()}",
    )


# processes of their own ------------------------------------------------------


def run(args, env=None, check=True):
    try:
        result = subprocess.run(
            [sys.executable, *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=TIMEOUT_SECONDS,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"Timed out: {args}: {str(e.stdout)[-3000:]}")
    if check:
        assert result.returncode == 0, (
            result.stdout[-3000:] + result.stderr[-3000:]
        )
    return result


@pytest.mark.slow
def test_saved_files_load_without_keras_snapshot(tmp_path):
    x, _ = make_data()
    model, _, _ = train(
        "nesterov",
        4,
        batchnorm=True,
        gradients=False,
        callbacks=[
            keras.callbacks.ModelCheckpoint(str(tmp_path / "ep{epoch}.keras"))
        ],
        probe=False,
        t0=0.5,
    )
    model.save(tmp_path / "final.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", model.predict(x, verbose=0))
    code = f"""
import sys, numpy as np, keras
d = {str(tmp_path)!r}
x = np.load(d + "/x.npy")
for compile in (False, True):
    m = keras.saving.load_model(d + "/final.keras", compile=compile)
    np.testing.assert_allclose(m.predict(x, verbose=0),
                               np.load(d + "/expected.npy"), atol=1e-6)
assert type(m.optimizer).__name__ == "SGD", m.optimizer
assert all(layer.trainable for layer in m.layers)
m.fit(x, np.zeros(len(x)), verbose=0)  # trains on
# Written mid-training, with frozen groups (group 0 froze at step 12).
m = keras.saving.load_model(d + "/ep3.keras")
assert not m.get_layer("dense_0").trainable
assert np.isfinite(m.predict(x, verbose=0)).all()
assert "keras_snapshot" not in sys.modules
print("ok")
"""
    result = run(["-c", code])
    assert "ok" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="JAX is not installed."
)
@pytest.mark.skipif(not TF, reason="Runs the JAX pass from the TF suite.")
def test_core_tests_pass_on_jax():
    result = run(
        [
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            os.path.abspath(__file__),
        ],
        env={"KERAS_BACKEND": "jax"},
    )
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not TF, reason="tf.distribute needs TensorFlow.")
def test_mirrored_strategy_on_two_cpus_matches_one_device(tmp_path):
    run([os.path.abspath(__file__), "mirrored", str(tmp_path)])
    with open(tmp_path / "result.json") as f:
        result = json.load(f)
    assert result["replicas"] == 2
    assert result["events"] == result["single_events"] == [[12, [0]], [18, [1]]]
    a = np.load(tmp_path / "mirrored.npz")
    b = np.load(tmp_path / "single.npz")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5)


# script modes ---------------------------------------------------------------


def _mirrored(out):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    x, y = make_data()
    results = {}
    for name in ("single", "mirrored"):
        keras.utils.set_random_seed(0)
        if name == "mirrored":
            strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        else:
            strategy = tf.distribute.get_strategy()
        with strategy.scope():
            model = make_model(3, batchnorm=False)
            # With decoupled weight decay: FreezeOut's per-variable decay
            # runs inside the strategy's cross-replica update.
            model.compile(
                OPTIMIZERS["momentum_wd"](), "sparse_categorical_crossentropy"
            )
        freeze = FreezeOut(t0=0.5, scaling="linear", verbose=0)
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=4,
            shuffle=False,
            verbose=0,
            callbacks=[freeze],
        )
        np.savez(
            os.path.join(out, f"{name}.npz"),
            *[keras.ops.convert_to_numpy(w) for w in model.weights],
        )
        results[name] = (strategy.num_replicas_in_sync, freeze.freeze_events)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(
            {
                "replicas": results["mirrored"][0],
                "events": results["mirrored"][1],
                "single_events": results["single"][1],
            },
            f,
        )


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    sys.path.insert(0, ROOT)
    if mode == "mirrored":
        os.makedirs(out, exist_ok=True)
        _mirrored(out)
    else:
        raise SystemExit(f"Unknown mode {mode!r}.")
