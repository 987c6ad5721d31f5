"""Classifier distillation methods built from the functional layer."""
