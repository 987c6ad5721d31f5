"""Evaluation metrics: accuracy, NLL, calibration, agreement (classification), pass@k (generation)."""

from divergent.metrics.diversity import distinct_n, self_bleu
from divergent.metrics.passk import distinct_correct, pass_at_k, pass_at_k_curve

__all__ = ["pass_at_k", "pass_at_k_curve", "distinct_correct", "distinct_n", "self_bleu"]
