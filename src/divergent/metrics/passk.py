"""Unbiased pass@k (Chen et al., 2021) and sample-set metrics.

From n samples of which c are correct, the unbiased estimate of the chance that
at least one of k samples (drawn without replacement) is correct is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

The product form never forms the huge binomials.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["pass_at_k", "pass_at_k_curve", "distinct_correct"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem from ``n`` samples with ``c`` correct.

    Example:
        >>> pass_at_k(4, 1, 2)
        0.5
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_curve(correct_counts: Sequence[int], n: int, ks: Sequence[int] | None = None) -> dict[int, float]:
    """Mean pass@k over problems for each k (default k = 1..n).

    Args:
        correct_counts: number of correct samples per problem.
        n: samples per problem.
    """
    if len(correct_counts) == 0:
        raise ValueError("correct_counts is empty")
    ks = list(range(1, n + 1)) if ks is None else list(ks)
    return {k: float(np.mean([pass_at_k(n, int(c), k) for c in correct_counts])) for k in ks}


def distinct_correct(responses_per_problem: Sequence[Sequence[str]], correct_per_problem: Sequence[Sequence[bool]]) -> int:
    """Number of distinct (problem, response) pairs among the correct samples.

    Counts each correct response string once per problem: a policy that repeats
    one answer scores 1 per problem however many times it samples it.
    """
    if len(responses_per_problem) != len(correct_per_problem):
        raise ValueError("responses_per_problem and correct_per_problem must have the same length")
    total = 0
    for responses, correct in zip(responses_per_problem, correct_per_problem):
        if len(responses) != len(correct):
            raise ValueError("each problem needs one correctness flag per response")
        total += len({r for r, ok in zip(responses, correct) if ok})
    return total
