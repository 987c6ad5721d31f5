"""What every command shares: the settings options, one-line errors, exit codes.

Every command takes ``--config FILE.yaml``, ``--set KEY=VALUE`` (repeatable),
``-o/--out-dir`` and ``--resume RUN_DIR`` the same way, and ``--debug``:

- settings come from the command's config dataclass defaults, then the YAML file,
  then the command's own options and ``--set`` (later wins; a key given twice on
  the command line is an error);
- ``--resume RUN_DIR`` restores the run's own settings from ``RUN_DIR/config.yaml``
  and accepts no other settings;
- a user's mistake (bad value, missing or corrupt file, unwritable folder) ends in
  one line on stderr and exit code 2; ``--debug`` (or ``DIVERGENT_DEBUG=1``) shows
  the traceback instead. Ctrl-C ends with exit code 130 after saving, saying how
  to resume; a non-finite loss with exit code 1.

A command module is thin: it parses options, calls :func:`settings`, hands the
config to :mod:`divergent.experiments` inside :func:`run_command`, and prints.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
import yaml

__all__ = [
    "ConfigOption",
    "SetOption",
    "OutDirOption",
    "ResumeOption",
    "DebugOption",
    "split_list",
    "parse_sets",
    "settings",
    "run_command",
    "fail",
    "load_plugins",
    "USER_ERRORS",
]

T = TypeVar("T")

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML file of settings (the keys --set takes); command-line options override it."),
]
SetOption = Annotated[
    list[str],
    typer.Option("--set", metavar="KEY=VALUE",
                 help="Any setting by its key (repeatable), e.g. --set lr=0.005; YAML values: --set 'divergence_params={js: {beta: 0.3}}'."),
]
OutDirOption = Annotated[
    Optional[Path],
    typer.Option("--out-dir", "--output-dir", "-o", help="Folder in which the run folder is created (default: runs)."),
]
ResumeOption = Annotated[
    Optional[Path],
    typer.Option("--resume", metavar="RUN_DIR", help="Continue the interrupted run in RUN_DIR with its own saved settings (give no other settings)."),
]
DebugOption = Annotated[
    bool,
    typer.Option("--debug", help="On an error, show the full traceback instead of one line."),
]

# Exceptions that mean "the user's input or environment is wrong": one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    OSError,  # FileNotFoundError, PermissionError, IsADirectoryError, divergent.io.WriteError (disk full, read-only)
    ImportError,  # an optional extra that is not installed
    yaml.YAMLError,
)


def split_list(value: Optional[str]) -> Optional[list[str]]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; None stays None."""
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``["lr=0.1", "m={a: 1}"]`` -> ``{"lr": "0.1", "m": {"a": 1}}`` (mappings and lists as inline YAML).

    >>> parse_sets(["lr=0.1", "seeds=[0, 1]"])
    {'lr': '0.1', 'seeds': [0, 1]}
    """
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        if key in overrides:
            raise ValueError(f"--set {key} is given twice")
        if value[:1] in "{[":
            try:
                overrides[key] = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ValueError(f"--set {key}: {value!r} is not valid inline YAML ({str(exc).splitlines()[0]})") from None
        else:
            overrides[key] = value
    return overrides


def settings(
    cls: type[T],
    *,
    config_file: Optional[Path],
    options: dict[str, Any],
    sets: list[str],
    resume: Optional[Path],
) -> T:
    """The command's config: defaults < ``--config`` file < options and ``--set``; or the run's own with ``--resume``.

    ``options`` maps config keys to the values of the command's own options (None = not given).
    """
    from divergent.config import load_config, load_run_config

    given = {key: value for key, value in options.items() if value is not None}
    extra = parse_sets(sets)
    for key in extra:
        if key in given:
            raise ValueError(f"{key} is set twice on the command line (by its option and by --set)")
    if resume is not None:
        if given or extra or config_file is not None:
            names = sorted({*given, *extra}) + (["--config"] if config_file is not None else [])
            raise ValueError(
                f"--resume continues with the run's own saved settings; remove the other settings given "
                f"({', '.join(names)})"
            )
        return load_run_config(cls, resume)
    return load_config(cls, config_file, {**given, **extra})


def load_plugins(modules: list[str]) -> list[str]:
    """Import the user's modules named by ``--plugin`` and ``$DIVERGENT_PLUGINS`` (registrations happen on import).

    The current folder is put on ``sys.path`` first, so ``--plugin my_divergences`` finds
    ``./my_divergences.py``. A module that cannot be imported is an ``ImportError`` naming it.
    """
    import importlib

    names = [*modules, *(split_list(os.environ.get("DIVERGENT_PLUGINS", "")) or [])]
    if names and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"--plugin {name}: cannot import it ({exc}); give a module name on the Python path, "
                              f"e.g. my_divergences for ./my_divergences.py") from None
        except Exception as exc:  # the user's module raised while registering
            raise ValueError(f"--plugin {name}: importing it raised {type(exc).__name__}: {exc}") from None
    return names


def command_line(name: str) -> str | None:
    """The command as typed (``divergent NAME ...``, shell-quoted) for a report's *Reproduce*; None when
    the process was not started as ``divergent NAME`` (e.g. from Python or with a global option first)."""
    args = sys.argv[1:]
    return "divergent " + " ".join(shlex.quote(a) for a in args) if args[:1] == [name] else None


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit with ``code`` (no rich wrapping, no markup)."""
    line = " ".join(str(message).split())  # one line, whatever the message holds
    sys.stderr.write(f"error: {line}\n" if code == 2 else f"{line}\n")
    sys.stderr.flush()
    raise typer.Exit(code=code)


def _debug_requested(debug: bool) -> bool:
    return debug or os.environ.get("DIVERGENT_DEBUG", "") not in ("", "0")


def run_command(body: Callable[[], Any], *, debug: bool = False) -> Any:
    """Run a command's body, turning user errors into one line and an exit code.

    Exit codes: 2 for user errors (:data:`USER_ERRORS`), 130 for an interrupted run
    (after its state was saved; the message says how to resume), 1 for a non-finite loss.
    With ``debug`` the exception propagates with its traceback.
    """
    from divergent.train.run import NonFiniteLossError, RunInterrupted

    try:
        return body()
    except (typer.Exit, typer.Abort):
        raise
    except RunInterrupted as exc:
        if _debug_requested(debug):
            raise
        fail(str(exc), code=130)
    except KeyboardInterrupt:
        if _debug_requested(debug):
            raise
        fail("interrupted", code=130)
    except NonFiniteLossError as exc:
        if _debug_requested(debug):
            raise
        fail(f"stopped: {exc}", code=1)
    except USER_ERRORS as exc:
        if _debug_requested(debug):
            raise
        message = str(exc) or type(exc).__name__
        if isinstance(exc, KeyError) and exc.args:
            message = str(exc.args[0])
        fail(message, code=2)
