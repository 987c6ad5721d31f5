"""Evaluation metrics: accuracy, NLL, calibration, agreement, pass@k."""
