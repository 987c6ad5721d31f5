"""Every name in the classifier modules' ``__all__`` exists, and the CLI registers ``compare``."""

import importlib

import pytest
from typer.testing import CliRunner

MODULES = [
    "divergent.experiments.compare",
    "divergent.data.digits",
    "divergent.data.vision",
    "divergent.metrics.classification",
    "divergent.experiments.plots",
    "divergent.models.classifiers",
    "divergent.models.resnet_cifar",
    "divergent.train.classifier",
    "divergent.methods.kd",
    "divergent.methods.dkd",
    "divergent.methods.nkd",
    "divergent.methods.self_kd",
    "divergent.methods.nd",
    "divergent.methods.ofa",
    "divergent.methods.mcmi",
    "divergent.methods.online",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name):
    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing


def test_compare_command_is_registered():
    from divergent.cli import app

    result = CliRunner().invoke(app, ["compare", "--help"])
    assert result.exit_code == 0
    assert "--config" in result.output and "--resume" in result.output
