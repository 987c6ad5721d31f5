"""Datasets that need no network: scikit-learn's digits, the stdlib source as text, generated tasks."""
