"""Runs a user asks for: ``compare``, the LM and RL comparisons, cached default models, run folders, reports, plots.

The layer between the command line (:mod:`divergent.cli`, which only parses options and
prints) and the trainers (:mod:`divergent.train`). Everything a command does can be done
from Python through this layer, e.g. ``divergent.experiments.compare.run_compare``.
"""
