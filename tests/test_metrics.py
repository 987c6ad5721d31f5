"""Classification metrics against independent references (numpy, scikit-learn)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss

from divergent.metrics.classification import (
    accuracy,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
    teacher_agreement,
)


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _numpy_ece(probs, labels, n_bins=15):
    """Top-label ECE written from its definition: bins (k/n, (k+1)/n], weighted |acc - conf|."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(float)
    ece = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return ece


@pytest.fixture
def logits_labels():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(500, 7, generator=g) * 2.5
    labels = torch.randint(0, 7, (500,), generator=g)
    return logits, labels


def test_accuracy_and_nll_match_sklearn(logits_labels):
    logits, labels = logits_labels
    probs = _softmax(logits.double().numpy())
    assert accuracy(logits, labels) == pytest.approx(accuracy_score(labels.numpy(), probs.argmax(1)))
    assert negative_log_likelihood(logits, labels) == pytest.approx(log_loss(labels.numpy(), probs, labels=range(7)), rel=1e-5)


def test_ece_matches_definition_with_15_bins(logits_labels):
    logits, labels = logits_labels
    probs = _softmax(logits.double().numpy())
    assert expected_calibration_error(logits, labels) == pytest.approx(_numpy_ece(probs, labels.numpy()), abs=1e-5)


def test_ece_is_zero_for_a_calibrated_certain_model():
    """When every prediction is right with confidence ~1, the ECE is ~0."""
    logits = torch.eye(4) * 50
    assert expected_calibration_error(logits, torch.arange(4)) == pytest.approx(0.0, abs=1e-6)


def test_brier_matches_numpy(logits_labels):
    logits, labels = logits_labels
    probs = _softmax(logits.double().numpy())
    onehot = np.eye(7)[labels.numpy()]
    assert brier_score(logits, labels) == pytest.approx(((probs - onehot) ** 2).sum(1).mean(), rel=1e-5)


def test_agreement_counts_equal_argmax():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    t = torch.tensor([[2.0, 0.0], [3.0, 1.0], [1.0, 0.5]])
    assert teacher_agreement(s, t) == pytest.approx(2 / 3)


def test_reliability_bins_are_consistent_with_ece(logits_labels):
    logits, labels = logits_labels
    bins = reliability_bins(logits, labels)
    counts = np.array(bins["count"])
    assert counts.sum() == len(labels)
    acc, conf = np.array(bins["accuracy"]), np.array(bins["confidence"])
    filled = counts > 0
    ece = (counts[filled] / counts.sum() * np.abs(acc[filled] - conf[filled])).sum()
    assert ece == pytest.approx(expected_calibration_error(logits, labels), abs=1e-5)


def test_classification_metrics_keys():
    logits = torch.randn(10, 3)
    m = classification_metrics(logits, torch.zeros(10, dtype=torch.long), logits)
    assert set(m) == {"accuracy", "nll", "ece", "brier", "agreement"}
    assert m["agreement"] == 1.0


@pytest.mark.parametrize(
    "args, error",
    [
        ((torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), ValueError),
        ((torch.randn(4, 3), torch.zeros(4)), TypeError),
        ((torch.randn(4, 3), torch.full((4,), 3)), ValueError),
        ((torch.randn(4), torch.zeros(4, dtype=torch.long)), ValueError),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(args, error):
    with pytest.raises(error, match="labels|logits"):
        accuracy(*args)
