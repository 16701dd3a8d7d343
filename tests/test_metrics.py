import math

import numpy as np
import pytest

from keras_snapshot import metrics


def _random_probs(seed, num_examples=50, num_classes=4, num_members=None):
    rng = np.random.default_rng(seed)
    size = (
        (num_examples,) if num_members is None else (num_members, num_examples)
    )
    probs = rng.dirichlet(np.full(num_classes, 0.5), size=size)
    labels = rng.integers(0, num_classes, size=num_examples)
    return probs, labels


# Straightforward loop references, independent of the implementation.


def _ref_error(probs, labels):
    wrong = 0
    for p, label in zip(probs, labels, strict=True):
        wrong += int(np.argmax(p) != label)
    return wrong / len(labels)


def _ref_nll(probs, labels, eps=1e-12):
    total = 0.0
    for p, label in zip(probs, labels, strict=True):
        total -= math.log(max(p[label], eps))
    return total / len(labels)


def _ref_brier(probs, labels):
    total = 0.0
    for p, label in zip(probs, labels, strict=True):
        for c, p_c in enumerate(p):
            total += (p_c - (1.0 if c == label else 0.0)) ** 2
    return total / len(labels)


def _ref_reliability(probs, labels, num_bins):
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    confs, accs, counts = [], [], []
    for b in range(num_bins):
        lo, hi = edges[b], edges[b + 1]
        members = [
            i
            for i, p in enumerate(probs)
            if (lo < max(p) <= hi) or (b == 0 and max(p) == 0)
        ]
        counts.append(len(members))
        if members:
            confs.append(sum(max(probs[i]) for i in members) / len(members))
            accs.append(
                sum(np.argmax(probs[i]) == labels[i] for i in members)
                / len(members)
            )
        else:
            confs.append(float("nan"))
            accs.append(float("nan"))
    return confs, accs, counts


def _ref_ece(probs, labels, num_bins):
    confs, accs, counts = _ref_reliability(probs, labels, num_bins)
    ece = 0.0
    for conf, acc, count in zip(confs, accs, counts, strict=True):
        if count:
            ece += count / len(labels) * abs(acc - conf)
    return ece


def _ref_entropy(p):
    return -sum(p_c * math.log(p_c) for p_c in p if p_c > 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scalar_metrics_match_loop_references(seed):
    probs, labels = _random_probs(seed)
    assert metrics.evaluate_predictions(probs, labels)[
        "error"
    ] == pytest.approx(_ref_error(probs, labels))
    assert metrics.evaluate_predictions(probs, labels)["nll"] == pytest.approx(
        _ref_nll(probs, labels)
    )
    assert metrics.evaluate_predictions(probs, labels)[
        "brier"
    ] == pytest.approx(_ref_brier(probs, labels))
    for num_bins in (1, 5, 15):
        assert metrics.evaluate_predictions(probs, labels, num_bins=num_bins)[
            "ece"
        ] == pytest.approx(_ref_ece(probs, labels, num_bins))


def test_hand_checked_values():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.5, 0.5]])
    labels = np.array([0, 1, 1, 1])
    # Row 3 is a tie: argmax picks class 0, which is wrong.
    assert metrics.evaluate_predictions(probs, labels)[
        "error"
    ] == pytest.approx(0.5)
    assert metrics.evaluate_predictions(probs, labels)["nll"] == pytest.approx(
        -(math.log(0.9) + math.log(0.6) + math.log(0.2) + math.log(0.5)) / 4
    )
    assert metrics.evaluate_predictions(probs, labels)[
        "brier"
    ] == pytest.approx((0.02 + 0.32 + 1.28 + 0.5) / 4)
    # 2 bins, [0, 0.5] and (0.5, 1]; confidences 0.9, 0.6, 0.8, 0.5.
    # Bin 0: conf 0.5, acc 0; bin 1: conf (0.9 + 0.6 + 0.8) / 3, acc 2 / 3.
    expected = 0.25 * 0.5 + 0.75 * abs(2 / 3 - 2.3 / 3)
    assert metrics.evaluate_predictions(probs, labels, num_bins=2)[
        "ece"
    ] == pytest.approx(expected)


def test_confident_and_correct_is_perfect():
    labels = np.array([0, 2, 1, 2, 0])
    probs = np.eye(3)[labels]
    result = metrics.evaluate_predictions(probs, labels)
    assert result == pytest.approx(
        {"error": 0.0, "nll": 0.0, "brier": 0.0, "ece": 0.0}
    )


def test_confident_and_wrong():
    labels = np.array([0, 1])
    probs = np.eye(2)[1 - labels]
    assert metrics.evaluate_predictions(probs, labels)["error"] == 1.0
    assert metrics.evaluate_predictions(probs, labels)[
        "brier"
    ] == pytest.approx(2.0)
    assert metrics.evaluate_predictions(probs, labels)["ece"] == pytest.approx(
        1.0
    )
    # Clipping keeps the NLL finite: -log(eps).
    assert metrics.evaluate_predictions(probs, labels)["nll"] == pytest.approx(
        -math.log(1e-12)
    )


@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_uniform_predictions(num_classes):
    probs = np.full((7, num_classes), 1.0 / num_classes)
    labels = np.arange(7) % num_classes
    assert metrics.evaluate_predictions(probs, labels)["nll"] == pytest.approx(
        math.log(num_classes)
    )
    assert metrics.evaluate_predictions(probs, labels)[
        "brier"
    ] == pytest.approx(1.0 - 1.0 / num_classes)
    np.testing.assert_allclose(
        metrics.uncertainty(np.asarray(probs)[None])["entropy"],
        math.log(num_classes),
    )


def test_reliability_curve_matches_loop_reference():
    probs, labels = _random_probs(3, num_examples=200)
    for num_bins in (3, 10, 15):
        conf, acc, count = metrics.reliability_curve(probs, labels, num_bins)
        ref_conf, ref_acc, ref_count = _ref_reliability(probs, labels, num_bins)
        assert conf.shape == acc.shape == count.shape == (num_bins,)
        np.testing.assert_array_equal(count, ref_count)
        np.testing.assert_allclose(conf, ref_conf)  # NaNs compare equal
        np.testing.assert_allclose(acc, ref_acc)
        assert count.sum() == len(labels)


def test_reliability_curve_bin_edges_are_right_closed():
    # Confidences exactly on a bin edge go to the lower bin: (lo, hi].
    probs = np.array([[0.6, 0.4], [0.8, 0.2], [1.0, 0.0]])
    conf, acc, count = metrics.reliability_curve(probs, [0, 1, 0], 5)
    np.testing.assert_array_equal(count, [0, 0, 1, 1, 1])
    np.testing.assert_allclose(conf, [np.nan, np.nan, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(acc, [np.nan, np.nan, 1.0, 0.0, 1.0])


def test_label_formats_agree():
    probs, labels = _random_probs(4)
    one_hot = np.eye(probs.shape[1])[labels]
    expected = metrics.evaluate_predictions(probs, labels)
    assert metrics.evaluate_predictions(probs, one_hot) == expected
    assert metrics.evaluate_predictions(probs, labels[:, None]) == expected
    assert metrics.evaluate_predictions(probs, labels.astype("uint8")) == (
        expected
    )
    assert metrics.evaluate_predictions(probs, labels.astype(float)) == (
        expected
    )
    assert metrics.evaluate_predictions(probs.tolist(), labels.tolist()) == (
        expected
    )


def test_evaluate_predictions_matches_individual_metrics():
    probs, labels = _random_probs(5)
    result = metrics.evaluate_predictions(probs, labels, num_bins=10)
    assert set(result) == {"error", "nll", "brier", "ece"}
    assert all(isinstance(v, float) for v in result.values())
    assert (
        result["error"] == metrics.evaluate_predictions(probs, labels)["error"]
    )
    assert result["nll"] == metrics.evaluate_predictions(probs, labels)["nll"]
    assert (
        result["brier"] == metrics.evaluate_predictions(probs, labels)["brier"]
    )
    assert (
        result["ece"]
        == metrics.evaluate_predictions(probs, labels, num_bins=10)["ece"]
    )


def test_pairwise_disagreement():
    member_probs, _ = _random_probs(6, num_members=5, num_classes=3)
    result = metrics.diversity(member_probs)["disagreement"]
    assert result.shape == (5, 5)
    np.testing.assert_array_equal(result, result.T)
    np.testing.assert_array_equal(np.diag(result), 0.0)
    for i in range(5):
        for j in range(5):
            ref = np.mean(
                [
                    np.argmax(member_probs[i, n])
                    != np.argmax(member_probs[j, n])
                    for n in range(member_probs.shape[1])
                ]
            )
            assert result[i, j] == pytest.approx(ref)


def test_pairwise_disagreement_hand_checked():
    member_probs = np.array(
        [
            [[0.9, 0.1], [0.8, 0.2]],
            [[0.9, 0.1], [0.3, 0.7]],
        ]
    )
    np.testing.assert_allclose(
        metrics.diversity(member_probs)["disagreement"], [[0, 0.5], [0.5, 0]]
    )


def test_prediction_correlation():
    member_probs, _ = _random_probs(7, num_members=4, num_classes=3)
    result = metrics.diversity(member_probs)["correlation"]
    flat = member_probs.reshape(4, -1)
    ref = np.zeros((4, 4))
    for i in range(4):
        for j in range(4):
            a = flat[i] - flat[i].mean()
            b = flat[j] - flat[j].mean()
            ref[i, j] = np.sum(a * b) / math.sqrt(np.sum(a * a) * np.sum(b * b))
    np.testing.assert_allclose(result, ref, atol=1e-12)
    np.testing.assert_allclose(np.diag(result), 1.0)
    np.testing.assert_array_equal(result, result.T)


def test_prediction_correlation_of_affine_copies_and_constant_member():
    base = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    # 0.5 * base + 0.25 is an affine copy: correlation 1; a uniform member
    # has no variance, so its correlations are undefined.
    member_probs = np.stack([base, 0.5 * base + 0.25, np.full((3, 2), 0.5)])
    result = metrics.diversity(member_probs)["correlation"]
    np.testing.assert_allclose(result[:2, :2], 1.0)
    assert np.all(np.isnan(result[2])) and np.all(np.isnan(result[:, 2]))


def test_predictive_entropy_matches_loop():
    probs, _ = _random_probs(8)
    probs[0] = [1.0, 0.0, 0.0, 0.0]
    result = metrics.uncertainty(np.asarray(probs)[None])["entropy"]
    assert result.shape == (probs.shape[0],)
    np.testing.assert_allclose(result, [_ref_entropy(p) for p in probs])
    assert result[0] == 0.0


def test_mutual_information_matches_loop():
    member_probs, _ = _random_probs(9, num_members=3)
    result = metrics.uncertainty(member_probs)["mutual_information"]
    ref = []
    for n in range(member_probs.shape[1]):
        members = member_probs[:, n]
        mean_entropy = np.mean([_ref_entropy(p) for p in members])
        ref.append(_ref_entropy(members.mean(axis=0)) - mean_entropy)
    np.testing.assert_allclose(result, ref, atol=1e-12)
    assert np.all(result >= 0)


def test_mutual_information_is_zero_when_members_agree():
    probs, _ = _random_probs(10)
    member_probs = np.stack([probs, probs, probs])
    np.testing.assert_allclose(
        metrics.uncertainty(member_probs)["mutual_information"], 0.0, atol=1e-12
    )


def test_mutual_information_of_opposite_confident_members():
    member_probs = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(
        metrics.uncertainty(member_probs)["mutual_information"], [math.log(2)]
    )


@pytest.mark.parametrize(
    "probs, y, match",
    [
        (np.full(4, 0.25), [0], r"probs.shape=\(4,\)"),
        (np.full((2, 3, 2), 0.5), [0, 1], r"probs.shape=\(2, 3, 2\)"),
        (np.zeros((0, 3)), [], r"probs.shape=\(0, 3\)"),
        (np.ones((3, 1)), [0, 0, 0], "at least 2 classes"),
        (np.full((3, 2), 0.5), [0, 1], r"y.shape=\(2,\)"),
        (np.full((3, 2), 0.5), np.zeros((3, 3)), r"y.shape=\(3, 3\)"),
        (np.full((3, 2), 0.5), [0, 1, 2], "max=2"),
        (np.full((3, 2), 0.5), [0, -1, 1], "min=-1"),
        (np.full((3, 2), 0.5), [0, 0.5, 1], "non-integer"),
        (np.full((3, 2), 0.5), np.full((3, 2), 0.5), "not one-hot"),
        (np.full((3, 2), 0.5), ["a", "b", "c"], "dtype"),
        ([[2.0, -1.0], [0.0, 1.0]], [0, 1], "logits"),
        ([[0.5, 0.6], [0.0, 1.0]], [0, 1], "row sums"),
        ([[np.nan, 0.5], [0.0, 1.0]], [0, 1], "finite"),
    ],
)
def test_bad_inputs_raise(probs, y, match):
    for fn in (metrics.reliability_curve, metrics.evaluate_predictions):
        with pytest.raises(ValueError, match=match):
            fn(probs, y)


def test_bad_member_probs_raise():
    for fn in (metrics.diversity, metrics.uncertainty):
        with pytest.raises(ValueError, match=r"member_probs.shape=\(3, 2\)"):
            fn(np.full((3, 2), 0.5))


@pytest.mark.parametrize("num_bins", [0, -3, 2.5, True])
def test_bad_num_bins_raise(num_bins):
    probs, labels = _random_probs(11)
    with pytest.raises(ValueError, match="num_bins"):
        metrics.evaluate_predictions(probs, labels, num_bins=num_bins)


OLD_METRICS = [
    ("error_rate", "error"),
    ("negative_log_likelihood", "nll"),
    ("brier_score", "brier"),
    ("expected_calibration_error", "ece"),
]


@pytest.mark.parametrize("old, key", OLD_METRICS)
def test_old_metric_names_warn_and_agree(old, key):
    probs, labels = _random_probs(13)
    with pytest.warns(DeprecationWarning, match="evaluate_predictions"):
        old_function = getattr(metrics, old)
    expected = metrics.evaluate_predictions(probs, labels)[key]
    assert old_function(probs, labels) == expected


def test_old_diversity_names_warn_and_agree():
    member_probs = np.random.default_rng(14).dirichlet(np.ones(3), (4, 20))
    new = {
        **metrics.diversity(member_probs),
        **metrics.uncertainty(member_probs),
    }
    for old, key in [
        ("pairwise_disagreement", "disagreement"),
        ("prediction_correlation", "correlation"),
        ("mutual_information", "mutual_information"),
    ]:
        with pytest.warns(DeprecationWarning, match=key):
            np.testing.assert_array_equal(
                getattr(metrics, old)(member_probs), new[key]
            )
    with pytest.warns(DeprecationWarning, match="uncertainty"):
        entropy = metrics.predictive_entropy(member_probs.mean(axis=0))
    np.testing.assert_array_equal(entropy, new["entropy"])
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(ValueError, match="eps"),
    ):
        metrics.negative_log_likelihood(*_random_probs(12), eps=0.0)
    with pytest.raises(AttributeError, match="no attribute 'f1_score'"):
        metrics.f1_score  # noqa: B018


def test_public_names():
    assert metrics.__all__ == [
        "diversity",
        "error_interval",
        "evaluate_predictions",
        "mcnemar_test",
        "reliability_curve",
        "uncertainty",
    ]
