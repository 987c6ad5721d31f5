"""Datasets that need no network: scikit-learn's digits, the stdlib source as text, generated tasks;
and DDK's domain weights (:func:`ddk_update`, :mod:`divergent.data.domains`)."""

from divergent.data.domains import ddk_initial_weights, ddk_update

__all__ = ["ddk_update", "ddk_initial_weights"]
