import math

import numpy as np
import pytest

from keras_snapshot import metrics
from keras_snapshot import selection

NUM_EXAMPLES = 120
LABELS = np.arange(NUM_EXAMPLES) % 3


def negative_log_likelihood(probs, y):
    return metrics.evaluate_predictions(probs, y)["nll"]


def _member(correct, wrong, mask=None, other=None):
    """Probabilities with `correct` on the label, `wrong` on the next class.

    Where `mask` is False, the row comes from `other` instead.
    """
    n = NUM_EXAMPLES
    probs = np.zeros((n, 3))
    probs[np.arange(n), LABELS] = correct
    probs[np.arange(n), (LABELS + 1) % 3] = wrong
    probs[np.arange(n), (LABELS + 2) % 3] = 1.0 - correct - wrong
    if mask is not None:
        probs = np.where(mask[:, None], probs, other)
    return probs


def _complementary_members():
    """Member 0 is bad, 2 is the best single one, 1 and 3 complement."""
    first_half = np.arange(NUM_EXAMPLES) < NUM_EXAMPLES // 2
    poor = _member(0.3, 0.6)
    return np.stack(
        [
            _member(0.1, 0.8),
            _member(0.98, 0.01, first_half, poor),
            _member(0.55, 0.225),
            _member(0.98, 0.01, ~first_half, poor),
        ]
    )


def _ref_greedy(member_probs, labels, max_size):
    """Caruana et al. 2004 greedy selection, written with plain loops."""
    selected = []
    best = math.inf
    for _ in range(max_size):
        scores = []
        for j in range(len(member_probs)):
            avg = np.mean([member_probs[i] for i in [*selected, j]], axis=0)
            scores.append(negative_log_likelihood(avg, labels))
        j = int(np.argmin(scores))
        if scores[j] >= best:
            break
        best = scores[j]
        selected.append(j)
    return np.bincount(selected, minlength=len(member_probs))


def _softmax(z):
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("metric", ["nll", "error"])
def test_greedy_skips_bad_member_and_keeps_complementary_pair(metric):
    member_probs = _complementary_members()
    nll = [negative_log_likelihood(p, LABELS) for p in member_probs]
    pair_nll = negative_log_likelihood(
        member_probs[[1, 3]].mean(axis=0), LABELS
    )
    # The construction: 2 is the best single member, and the average of
    # the pair beats every single member.
    assert int(np.argmin(nll)) == 2 and pair_nll < min(nll)

    weights, counts = selection.greedy_selection(
        member_probs, LABELS, metric=metric
    )
    assert weights.shape == counts.shape == (4,)
    assert weights.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(weights, counts / counts.sum())
    assert weights[0] == 0.0
    assert weights[1] > 0.0 and weights[3] > 0.0
    assert counts.max() > 1  # Repeats are allowed and used here.
    assert counts.sum() <= 2 * 4
    ensemble = np.tensordot(weights, member_probs, axes=1)
    assert negative_log_likelihood(ensemble, LABELS) < min(nll)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_greedy_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    member_probs = rng.dirichlet(np.full(4, 0.7), size=(5, 60))
    labels = rng.integers(0, 4, size=60)
    for max_size in (1, 3, 10):
        _, counts = selection.greedy_selection(
            member_probs, labels, max_size=max_size
        )
        np.testing.assert_array_equal(
            counts, _ref_greedy(member_probs, labels, max_size)
        )


def test_greedy_with_max_size_one_picks_best_single_member():
    member_probs = _complementary_members()
    weights, counts = selection.greedy_selection(
        member_probs, LABELS, max_size=1
    )
    np.testing.assert_array_equal(counts, [0, 0, 1, 0])
    np.testing.assert_array_equal(weights, [0.0, 0.0, 1.0, 0.0])


def test_greedy_error_metric_breaks_ties_by_nll():
    # Both members classify everything correctly (error 0); member 1 is
    # more confident, so it wins the tie on NLL and nothing improves after.
    member_probs = np.stack([_member(0.5, 0.25), _member(0.9, 0.05)])
    _, counts = selection.greedy_selection(member_probs, LABELS, "error")
    np.testing.assert_array_equal(counts, [0, 1])


def test_best_last_m_skips_poor_early_members():
    # Members 0-2 are poor; members 3-5 are each sharp and right on two
    # thirds of the examples and wrong on a different third, so averaging
    # all three good members is best.
    third = np.arange(NUM_EXAMPLES) % 3
    poor = _member(0.2, 0.7)
    good = [_member(0.9, 0.05, third != i, _member(0.2, 0.7)) for i in range(3)]
    member_probs = np.stack([poor, poor, _member(0.4, 0.5), *good])
    for metric in ("nll", "error"):
        m, weights = selection.best_last_m(member_probs, LABELS, metric)
        assert m == 3
        np.testing.assert_allclose(weights, [0, 0, 0, 1 / 3, 1 / 3, 1 / 3])

    ref = [
        negative_log_likelihood(member_probs[-k:].mean(axis=0), LABELS)
        for k in range(1, 7)
    ]
    assert int(np.argmin(ref)) + 1 == 3


def test_best_last_m_prefers_fewer_members_on_ties():
    member_probs = np.stack([_member(0.7, 0.2)] * 4)
    m, weights = selection.best_last_m(member_probs, LABELS)
    assert m == 1
    np.testing.assert_array_equal(weights, [0.0, 0.0, 0.0, 1.0])


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_fit_temperature_recovers_known_temperature(true_temperature):
    rng = np.random.default_rng(0)
    logits = 2.0 * rng.normal(size=(4000, 5))
    calibrated = _softmax(logits)
    labels = np.array([rng.choice(5, p=p) for p in calibrated])
    # Seen through `true_temperature`, the model is miscalibrated; scaling
    # by 1 / true_temperature undoes it.
    distorted = logits / true_temperature
    expected = 1.0 / true_temperature

    from_probs = selection.fit_temperature(_softmax(distorted), labels)
    from_logits = selection.fit_temperature(distorted, labels, from_logits=True)
    assert from_probs == pytest.approx(expected, rel=0.05)
    assert from_logits == pytest.approx(expected, rel=0.05)
    assert from_probs == pytest.approx(from_logits, rel=1e-4)


def test_fit_temperature_minimises_validation_nll():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(4, 0.3), size=300)
    # Labels drawn from softer predictions: the optimum is near T = 3.
    soft = selection.apply_temperature(probs, 3.0)
    labels = np.array([rng.choice(4, p=p) for p in soft])
    temperature = selection.fit_temperature(probs, labels)
    assert 2 < temperature < 5

    def nll(t):
        return negative_log_likelihood(
            selection.apply_temperature(probs, t), labels
        )

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 2001))
    assert nll(temperature) <= min(nll(t) for t in grid) + 1e-9
    assert nll(temperature) <= nll(temperature * 1.001)
    assert nll(temperature) <= nll(temperature / 1.001)


def _near_perfect(num_examples=200, num_classes=10, wrong=0, seed=0):
    """Confident, correct predictions; the first `wrong` rows are wrong."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=num_examples)
    logits = rng.normal(size=(num_examples, num_classes))
    logits[np.arange(num_examples), labels] += 6.0
    logits[np.arange(wrong), (labels[:wrong] + 1) % num_classes] += 9.0
    return _softmax(logits), labels


def test_temperature_falls_back_to_one_without_validation_errors():
    # Validation NLL falls without end as T -> 0 when nothing is wrong:
    # the unbounded search used to return its floor, T = 0.01.
    probs, labels = _near_perfect()
    fit = selection.calibrate_temperature(probs, labels)
    assert fit.status == "no_errors"
    assert fit.temperature == 1.0
    assert fit.fitted < 0.5 and fit.fitted_nll < fit.nll
    assert "validation error is 0" in fit.message and "T = 1" in fit.message
    assert selection.fit_temperature(probs, labels) == 1.0


def test_temperature_fitted_on_near_perfect_validation_spares_test_nll():
    # The case: a near-perfect validation split, and a test split
    # where a few confident mistakes happen. The fallback keeps test NLL.
    val_probs, val_labels = _near_perfect(wrong=0, seed=0)
    test_probs, test_labels = _near_perfect(wrong=4, seed=1)
    temperature = selection.fit_temperature(val_probs, val_labels)
    before = negative_log_likelihood(test_probs, test_labels)
    after = negative_log_likelihood(
        selection.apply_temperature(test_probs, temperature), test_labels
    )
    assert after == pytest.approx(before)
    floor = negative_log_likelihood(
        selection.apply_temperature(test_probs, 0.05), test_labels
    )
    assert floor > 3 * before  # what the floor temperature would do


def test_temperature_on_a_bound_falls_back_to_one():
    # Labels independent of confident predictions: the optimum is T > 20.
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(4, 0.3), size=300)
    labels = rng.integers(0, 4, size=300)
    fit = selection.calibrate_temperature(probs, labels)
    assert fit.status == "at_bound"
    assert fit.fitted == pytest.approx(20.0, rel=1e-3)
    assert fit.temperature == 1.0
    assert "[0.05, 20]" in fit.message
    wider = selection.calibrate_temperature(probs, labels, bounds=(0.01, 100))
    assert wider.status == "fitted" and 20 < wider.temperature < 100


def test_temperature_with_flat_validation_nll_falls_back_to_one():
    # Calibrated predictions: the optimum is near 1 and gains < 1% NLL.
    rng = np.random.default_rng(2)
    logits = 2.0 * rng.normal(size=(3000, 5))
    calibrated = _softmax(logits)
    labels = np.array([rng.choice(5, p=p) for p in calibrated])
    fit = selection.calibrate_temperature(calibrated, labels)
    assert fit.status == "flat"
    assert fit.temperature == 1.0
    assert fit.fitted == pytest.approx(1.0, abs=0.1)
    assert 0 <= fit.nll - fit.fitted_nll < 0.01 * fit.nll
    assert "barely changes" in fit.message
    strict = selection.calibrate_temperature(
        calibrated, labels, min_nll_gain=1e-9
    )
    assert strict.status == "fitted"
    assert strict.temperature == pytest.approx(fit.fitted)


def test_calibrate_temperature_reports_a_fitted_temperature():
    rng = np.random.default_rng(3)
    logits = 2.0 * rng.normal(size=(2000, 5))
    labels = np.array([rng.choice(5, p=p) for p in _softmax(logits)])
    fit = selection.calibrate_temperature(logits / 2.0, labels, True)
    assert fit.status == "fitted"
    assert fit.temperature == fit.fitted == pytest.approx(0.5, rel=0.05)
    assert fit.temperature == selection.fit_temperature(
        logits / 2.0, labels, from_logits=True
    )
    reference = negative_log_likelihood(
        _softmax(logits / 2.0 / fit.temperature), labels
    )
    assert fit.fitted_nll == pytest.approx(reference, rel=1e-9)
    assert fit.nll == pytest.approx(
        negative_log_likelihood(_softmax(logits / 2.0), labels), rel=1e-9
    )
    assert "fitted" in fit.message and "0.5" in fit.message


@pytest.mark.parametrize(
    "bounds", [(0.0, 20.0), (1.5, 20.0), (0.05, 0.9), (1.0,), None, "ab"]
)
def test_calibrate_temperature_rejects_bad_bounds(bounds):
    probs, labels = _near_perfect(wrong=3)
    with pytest.raises(ValueError, match="Received: bounds="):
        selection.calibrate_temperature(probs, labels, bounds=bounds)


def test_apply_temperature():
    probs = np.array([[0.8, 0.2], [0.1, 0.9]])
    np.testing.assert_allclose(
        selection.apply_temperature(probs, 2.0),
        [[2 / 3, 1 / 3], [0.25, 0.75]],
    )
    np.testing.assert_allclose(selection.apply_temperature(probs, 1.0), probs)
    sharpened = selection.apply_temperature(probs, 0.5)
    np.testing.assert_allclose(sharpened.sum(axis=1), 1.0)
    np.testing.assert_array_equal(
        np.argmax(sharpened, axis=1), np.argmax(probs, axis=1)
    )
    logits = np.log(probs) + 3.0
    np.testing.assert_allclose(
        selection.apply_temperature(logits, 2.0, from_logits=True),
        selection.apply_temperature(probs, 2.0),
    )
    member_probs = np.stack([probs, probs[::-1]])
    result = selection.apply_temperature(member_probs, 2.0)
    assert result.shape == (2, 2, 2)
    np.testing.assert_allclose(
        result[1], selection.apply_temperature(probs[::-1], 2.0)
    )


@pytest.mark.parametrize("temperature", [0.0, -1.0, np.inf, np.nan, "2"])
def test_apply_temperature_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        selection.apply_temperature(np.array([[0.5, 0.5]]), temperature)


def test_temperature_rejects_bad_inputs():
    with pytest.raises(ValueError, match="logits"):
        selection.fit_temperature(np.array([[2.0, -1.0]]), [0])
    with pytest.raises(ValueError, match=r"shape=\(3,\)"):
        selection.fit_temperature(np.array([1.0, 2.0, 3.0]), [0], True)
    with pytest.raises(ValueError, match="finite"):
        selection.fit_temperature(np.array([[np.inf, 1.0]]), [0], True)
    with pytest.raises(ValueError, match=r"y_val.shape=\(2,\)"):
        selection.fit_temperature(np.full((3, 2), 0.5), [0, 1])


def test_normalize_weights():
    np.testing.assert_allclose(
        selection.normalize_weights([2, 1, 1], num_members=3),
        [0.5, 0.25, 0.25],
    )
    np.testing.assert_allclose(
        selection.normalize_weights(np.array([0.0, 3.0]), 2), [0.0, 1.0]
    )


@pytest.mark.parametrize(
    "weights, num_members, match",
    [
        ([1.0, 1.0], 3, r"shape \(3,\).*weights.shape=\(2,\)"),
        ([[1.0, 1.0]], 2, r"weights.shape=\(1, 2\)"),
        (1.0, 1, r"weights.shape=\(\)"),
        ([1.0, -0.5], 2, r"non-negative.*-0.5"),
        ([1.0, np.nan], 2, "finite"),
        ([1.0, np.inf], 2, "finite"),
        ([0.0, 0.0], 2, "all zero"),
        (["a", "b"], 2, "numbers"),
        ([1.0], 0, "num_members"),
        ([1.0], 1.5, "num_members"),
    ],
)
def test_normalize_weights_errors(weights, num_members, match):
    with pytest.raises(ValueError, match=match):
        selection.normalize_weights(weights, num_members)


def test_selection_rejects_bad_arguments():
    member_probs = _complementary_members()
    for fn in (selection.greedy_selection, selection.best_last_m):
        with pytest.raises(ValueError, match="metric='accuracy'"):
            fn(member_probs, LABELS, metric="accuracy")
        with pytest.raises(ValueError, match=r"y_val.shape=\(5,\)"):
            fn(member_probs, LABELS[:5])
        with pytest.raises(ValueError, match=r"member_probs.shape=\(120, 3\)"):
            fn(member_probs[0], LABELS)
    with pytest.raises(ValueError, match="max_size=0"):
        selection.greedy_selection(member_probs, LABELS, max_size=0)


def test_select_snapshots_on_a_trained_run(snapshot_run):
    from helpers import make_data

    import keras_snapshot

    directory, _ = snapshot_run
    x_val, y_val = make_data(seed=5)
    for method in ("greedy", "last_m", "all"):
        choice = keras_snapshot.select_snapshots(
            directory, validation_data=(x_val, y_val), method=method
        )
        assert len(choice.snapshots) == len(choice.weights) >= 1
        assert np.isclose(choice.weights.sum(), 1.0)
        ensemble = keras_snapshot.build_ensemble(
            choice.snapshots, weights=choice.weights
        )
        probs = ensemble.predict(x_val, verbose=0)
        assert np.isclose(
            negative_log_likelihood(probs, y_val),
            choice.validation_scores["nll"],
            rtol=1e-4,
        )
    with pytest.raises(ValueError, match="method"):
        keras_snapshot.select_snapshots(
            directory, validation_data=(x_val, y_val), method="best"
        )
    with pytest.raises(TypeError):
        keras_snapshot.select_snapshots(directory, (x_val, y_val))


def test_choose_members_is_the_one_choice_of_members():
    member_probs = _complementary_members()
    greedy, _ = selection.greedy_selection(member_probs, LABELS)
    _, last = selection.best_last_m(member_probs, LABELS)
    count = len(member_probs)
    np.testing.assert_allclose(
        selection.choose_members(member_probs, LABELS, "greedy"), greedy
    )
    np.testing.assert_allclose(
        selection.choose_members(member_probs, LABELS, "last_m"), last
    )
    np.testing.assert_allclose(
        selection.choose_members(member_probs, LABELS, "all"),
        np.full(count, 1.0 / count),
    )
    with pytest.raises(ValueError, match="method='best'"):
        selection.choose_members(member_probs, LABELS, "best")


def test_members_and_weights_drops_zero_weights():
    members, weights = selection.members_and_weights(
        ["a", "b", "c"], [0.0, 1.0, 3.0]
    )
    assert members == ["b", "c"]
    np.testing.assert_allclose(weights, [0.25, 0.75])


# tf.data validation data and logits members: what build_ensemble takes ---


def _snapshot_models(snapshot_run):
    import keras

    import keras_snapshot

    directory, _ = snapshot_run
    return [
        keras.saving.load_model(path)
        for path in keras_snapshot.snapshot_paths(directory)
    ]


def _logits_twin(model):
    """The same network and weights with a linear (logits) output layer."""
    import keras

    config = model.get_config()
    assert config["layers"][-1]["config"]["activation"] == "softmax"
    config["layers"][-1]["config"]["activation"] = "linear"
    twin = keras.Sequential.from_config(config)
    twin.set_weights(model.get_weights())
    return twin


def _assert_same_selection(got, want, got_members, want_members):
    """Same chosen members (by position), weights, method and scores."""

    def positions(choice, members):
        return [
            next(i for i, m in enumerate(members) if m is s)
            for s in choice.snapshots
        ]

    assert positions(got, got_members) == positions(want, want_members)
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-12)
    assert got.method == want.method
    assert got.validation_scores.keys() == want.validation_scores.keys()
    for key, value in want.validation_scores.items():
        assert got.validation_scores[key] == pytest.approx(
            value, rel=1e-5, abs=1e-6
        ), key


def _label_order(dataset):
    return np.concatenate([np.asarray(y) for _, y in dataset])


@pytest.mark.parametrize("method", ["greedy", "last_m"])
def test_select_snapshots_on_a_dataset_equals_on_arrays(snapshot_run, method):
    import tensorflow as tf
    from helpers import make_data

    import keras_snapshot

    models = _snapshot_models(snapshot_run)
    x_val, y_val = make_data(seed=5)
    want = keras_snapshot.select_snapshots(
        models, validation_data=(x_val, y_val), method=method
    )
    slices = tf.data.Dataset.from_tensor_slices((x_val, y_val))
    in_order = slices.batch(16)
    reshuffled = slices.shuffle(
        len(x_val), seed=1, reshuffle_each_iteration=True
    ).batch(16)
    # Each pass has its own order: labels must come from the same pass.
    assert not np.array_equal(_label_order(reshuffled), y_val)
    assert not np.array_equal(
        _label_order(reshuffled), _label_order(reshuffled)
    )
    filtered = slices.filter(lambda x, y: True).batch(32)  # Unknown length.
    assert int(filtered.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    for dataset in (in_order, reshuffled, filtered):
        got = keras_snapshot.select_snapshots(
            models, validation_data=dataset, method=method
        )
        _assert_same_selection(got, want, models, models)


def test_select_snapshots_refuses_an_endless_dataset(snapshot_run):
    import tensorflow as tf
    from helpers import make_data

    import keras_snapshot

    directory, _ = snapshot_run
    endless = tf.data.Dataset.from_tensor_slices(make_data(n=32)).batch(8)
    endless = endless.repeat()
    with pytest.raises(
        ValueError,
        match=r"(?s)`validation_data` is an endless dataset.*\.repeat\(\).*"
        r"\.take\(num_batches\).*Received: validation_data=",
    ):
        keras_snapshot.select_snapshots(directory, validation_data=endless)
    with pytest.raises(ValueError, match=r"`x` is an endless dataset"):
        selection.predict_members(
            _snapshot_models(snapshot_run), endless.map(lambda x, y: x)
        )


def test_dataset_of_other_than_x_y_batches_is_refused(snapshot_run):
    import tensorflow as tf
    from helpers import make_data

    import keras_snapshot

    x, y = make_data(n=32)
    weighted = tf.data.Dataset.from_tensor_slices((x, y, np.ones(32)))
    with pytest.raises(
        ValueError, match=r"(?s)`\(x, y\)` batches.*lambda x, y, w: \(x, y\)"
    ):
        keras_snapshot.select_snapshots(
            _snapshot_models(snapshot_run), validation_data=weighted.batch(8)
        )
    empty = tf.data.Dataset.from_tensor_slices((x, y)).take(0).batch(8)
    with pytest.raises(ValueError, match="`data` is an empty dataset"):
        selection.predict_members_and_labels(
            _snapshot_models(snapshot_run), empty
        )


@pytest.mark.parametrize("method", ["greedy", "last_m", "all"])
@pytest.mark.parametrize("from_logits", [None, True])
def test_logits_members_select_as_their_softmax_twins(
    snapshot_run, method, from_logits
):
    from helpers import make_data

    import keras_snapshot

    models = _snapshot_models(snapshot_run)
    twins = [_logits_twin(m) for m in models]
    x_val, y_val = make_data(seed=5)
    want = keras_snapshot.select_snapshots(
        models, validation_data=(x_val, y_val), method=method
    )
    got = keras_snapshot.select_snapshots(
        twins,
        validation_data=(x_val, y_val),
        method=method,
        from_logits=from_logits,
    )
    _assert_same_selection(got, want, twins, models)
    # Chosen members and weights build the same ensemble.
    ensemble = keras_snapshot.build_ensemble(got.snapshots, weights=got.weights)
    probs = ensemble.predict(x_val, verbose=0)
    assert negative_log_likelihood(probs, y_val) == pytest.approx(
        want.validation_scores["nll"], rel=1e-5
    )


def test_mixed_logits_and_softmax_members_are_refused_as_by_build_ensemble(
    snapshot_run,
):
    from helpers import make_data

    import keras_snapshot

    models = _snapshot_models(snapshot_run)
    mixed = [models[0], _logits_twin(models[1])]
    message = "Some members output probabilities and others logits"
    with pytest.raises(ValueError, match=message):
        keras_snapshot.build_ensemble(mixed)
    with pytest.raises(ValueError, match=message):
        keras_snapshot.select_snapshots(mixed, validation_data=make_data(n=32))


def test_predict_members_on_a_dataset_equals_on_arrays(snapshot_run):
    import tensorflow as tf
    from helpers import make_data

    models = _snapshot_models(snapshot_run)
    x, y = make_data(n=50, seed=5)
    want = selection.predict_members(models, x, batch_size=16)
    assert want.shape == (len(models), 50, 3)
    inputs = tf.data.Dataset.from_tensor_slices(x).batch(16)
    pairs = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    for dataset in (inputs, pairs):
        np.testing.assert_allclose(
            selection.predict_members(models, dataset), want, atol=1e-6
        )
    probs, labels = selection.predict_members_and_labels(models, pairs)
    np.testing.assert_allclose(probs, want, atol=1e-6)
    np.testing.assert_array_equal(labels, y)
    # Logits members get a softmax when asked (or detected).
    twins = [_logits_twin(m) for m in models]
    for from_logits in (True, None):
        np.testing.assert_allclose(
            selection.predict_members(twins, inputs, from_logits=from_logits),
            want,
            atol=1e-6,
        )
