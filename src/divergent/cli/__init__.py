"""The ``divergent`` command line: one typer app, one thin module per command.

Help texts are plain text (``rich_markup_mode=None``): option help may mention
shapes such as ``[tokens, vocab]`` or code in backticks, which rich markup would
eat. Usage errors (an unknown option, a value of the wrong type) end in one line
and exit code 2, like every other user error (see :mod:`divergent.cli._common`).
"""

from __future__ import annotations

import importlib
import sys

import typer

try:  # typer >= 0.20 vendors click as typer._click; older versions use the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

app = typer.Typer(
    name="divergent",
    help="Train one model against another model's distribution, with the divergence as the choice.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(
    plugin: list[str] = typer.Option(
        [], "--plugin", metavar="MODULE",
        help="Import MODULE first (repeatable; the current folder is on the path), e.g. one that calls "
             "divergent.register_divergence or divergent.methods.register_method; its names then work in "
             "every command. Also read from DIVERGENT_PLUGINS (comma-separated).",
    ),
) -> None:
    """divergent: every divergence behind one API, and commands that compare them honestly."""
    from divergent.cli._common import fail, load_plugins

    try:
        load_plugins(plugin)
    except (ImportError, ValueError, TypeError) as exc:
        fail(str(exc))


# Each module defines ``register(app)``. One line per command module.
_COMMAND_MODULES = [
    "divergent.cli.explore",
    "divergent.cli.rl",
    "divergent.cli.distill_lm",
    "divergent.cli.compare",
    "divergent.cli.dpo",
    "divergent.cli.fdpg",
    "divergent.cli.refine_data",
]

for _module in _COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``divergent`` console script."""
    try:
        code = app(args=argv, standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as exc:  # `divergent` alone: the help, exit 0
        print(exc.ctx.get_help() if exc.ctx else "")
        code = 0
    except click_exceptions.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "divergent"
        sys.stderr.write(f"error: {' '.join(exc.format_message().split())} (see: {command} --help)\n")
        code = 2
    except typer.Abort:  # typer's own (click's in older typer); typer._click has none
        sys.stderr.write("aborted\n")
        code = 130
    except typer.Exit as exc:
        code = exc.exit_code
    except click_exceptions.ClickException as exc:
        sys.stderr.write(f"error: {' '.join(exc.format_message().split())}\n")
        code = exc.exit_code
    sys.exit(code if isinstance(code, int) else 0)
