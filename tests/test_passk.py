"""pass@k against scipy's exact binomials and a brute-force enumeration."""

import itertools

import pytest
from scipy.special import comb

from divergent.rl import distinct_correct, pass_at_k, pass_at_k_curve


@pytest.mark.parametrize("n,c,k", [(16, 0, 1), (16, 3, 1), (16, 3, 4), (16, 15, 16), (200, 7, 50), (10, 10, 3), (5, 1, 5)])
def test_pass_at_k_matches_scipy_comb(n, c, k):
    expected = 1.0 - comb(n - c, k, exact=True) / comb(n, k, exact=True)
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_pass_at_k_matches_enumeration_of_subsets():
    """Averaging 'any correct' over all k-subsets of the n samples is the definition being estimated."""
    samples = [True, False, False, True, False, False]
    for k in range(1, 7):
        subsets = list(itertools.combinations(samples, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(6, 2, k) == pytest.approx(brute)


def test_pass_at_k_large_n_is_finite():
    assert 0.0 < pass_at_k(10_000, 1, 10) < 1.0
    assert pass_at_k(10_000, 1, 10) == pytest.approx(10 / 10_000)


def test_pass_at_1_is_accuracy_and_curve_is_monotone():
    curve = pass_at_k_curve([0, 3, 8, 1], n=8)
    assert curve[1] == pytest.approx((0 + 3 + 8 + 1) / 32)
    values = [curve[k] for k in range(1, 9)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    assert curve[8] == pytest.approx(3 / 4)


def test_pass_at_k_bad_input():
    with pytest.raises(ValueError, match="k must"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c must"):
        pass_at_k(4, 5, 1)
    with pytest.raises(TypeError, match="n must"):
        pass_at_k(4.0, 1, 1)
    with pytest.raises(ValueError, match="empty"):
        pass_at_k_curve([], 4)


def test_distinct_correct_counts_unique_strings_per_problem():
    responses = [["19", "19", "18"], ["5", "05", "5"]]
    correct = [[True, True, False], [True, True, True]]
    assert distinct_correct(responses, correct) == 1 + 2
