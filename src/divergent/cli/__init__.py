"""The ``divergent`` command line: one typer app, one module per command."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="divergent",
    help="Train one model against another model's distribution, with the divergence as the choice.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """divergent: every divergence behind one API, and commands that compare them honestly."""


# Each module defines ``register(app)``. One line per command module.
_COMMAND_MODULES = [
    "divergent.cli.explore",
    "divergent.cli.rl",
    "divergent.cli.distill_lm",
    "divergent.cli.compare",
]

for _module in _COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:
    """Entry point of the ``divergent`` console script."""
    app()
