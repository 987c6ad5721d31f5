"""Run folders, tables and result files shared by every command.

Every command reports the same way: a rich table in the terminal, and in a run
folder ``results.csv``/``results.json``, a Markdown ``report.md`` and PNG plots.
The helpers here keep that uniform; they know nothing about any method.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import os
import shutil
import shlex
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from divergent.io import atomic_write_text, cache_dir, write_json
from divergent.train.run import progress
# The marking rule lives with the verdict (one module for every comparison); re-exported here for old callers.
from divergent.experiments.verdict import mean_std, paired_difference

__all__ = [
    "run_folder",
    "run_with_setup",
    "RunFolder",
    "cache_dir",
    "make_run_dir",
    "write_csv",
    "write_json",
    "print_table",
    "output_console",
    "markdown_table",
    "format_value",
    "mean_std",
    "paired_difference",
    "progress",
]


def make_run_dir(root: str | os.PathLike, name: str) -> Path:
    """Create and return a new folder ``root/<name>-<YYYYmmdd-HHMMSS>[-k]`` that did not exist."""
    from divergent.io import WriteError

    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"output folder {root} is a file; expected a folder (-o/--out-dir)")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{name}-{stamp}"
    candidate, k = base, 1
    while True:
        try:
            root.mkdir(parents=True, exist_ok=True)
            candidate.mkdir(parents=False, exist_ok=False)
            return candidate
        except FileExistsError:
            k += 1
            candidate = Path(f"{base}-{k}")
        except OSError as exc:
            raise WriteError(exc.errno or 0, f"cannot create the run folder in {root}: {exc.strerror or exc}") from None


class RunFolder:
    """A run's folder. ``started()`` marks that training began (from then on it is kept on errors)."""

    def __init__(self, path: Path, created: bool) -> None:
        self.path = path
        self.created = created
        self.is_started = not created

    def started(self) -> None:
        self.is_started = True


@contextmanager
def run_folder(root: str | os.PathLike, name: str, *, resume: str | os.PathLike | None = None) -> Iterator[RunFolder]:
    """The folder of a new run (``root/<name>-<time>``), or the existing one given to ``--resume``.

    A run that fails before :meth:`RunFolder.started` is called leaves no folder behind: a
    newly created folder is removed when the body raises before training began (a resumed
    run's folder is never removed).
    """
    if resume is not None:
        folder = RunFolder(Path(resume), created=False)
    else:
        folder = RunFolder(make_run_dir(root, name), created=True)
    try:
        yield folder
    except BaseException:
        if folder.created and not folder.is_started:
            shutil.rmtree(folder.path, ignore_errors=True)
        raise


def run_with_setup(command: str, config: Any, run_dir: str | os.PathLike | None, console: Console,
                   build_setup: Callable[[Any, Console], Any], body: Callable[[Any, Path], Any]) -> Any:
    """The frame of a training command (``divergent rl``, ``divergent fdpg``) around ``body(setup, folder)``.

    Sets ``config.num_threads`` (restored after), opens the run folder (``<command>-compare`` with
    ``config.compare``; ``run_dir`` to continue one) and saves ``config.yaml`` in a new one, builds the
    setup (closed after), and turns a Ctrl-C into a :class:`RunInterrupted` naming the resume command.
    """
    import torch

    from divergent.config import save_config
    from divergent.train.run import RunInterrupted

    previous = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    setup = None
    try:
        name = f"{command}-compare" if config.compare else command
        with run_folder(config.output_dir, name, resume=run_dir) as folder:
            if run_dir is None:
                save_config(config, folder.path / "config.yaml")
            setup = build_setup(config, console)
            folder.started()
            console.print(f"[bold]divergent {command}[/] → {folder.path}")
            try:
                return body(setup, folder.path)
            except KeyboardInterrupt as exc:  # RunInterrupted (saved by drive) or Ctrl-C outside training
                step = getattr(exc, "step", 0)
                checkpoint = getattr(exc, "checkpoint", None)
                saved = f" (saved {checkpoint})" if checkpoint else ""
                raise RunInterrupted(step, checkpoint, f"interrupted after step {step}{saved}; resume with: "
                                                       f"divergent {command} --resume {shlex.quote(str(folder.path))}"
                                     ) from None
    finally:
        if setup is not None:
            setup.close()
        torch.set_num_threads(previous)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows (dicts) as CSV, atomically; the header is the union of keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _plain(v) for k, v in row.items()})
    return atomic_write_text(path, buffer.getvalue())


def format_value(value: Any, digits: int = 4) -> str:
    """Compact text for a table cell: floats to ``digits`` significant places."""
    value = _plain(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}g}"
    return "" if value is None else str(value)


def output_console() -> Console:
    """The console a command prints to: rich's defaults in a terminal; never wrapping lines otherwise.

    Written to a log file, ``nohup``, a cluster job, ``torchrun`` or a pipe, rich assumes 80
    columns and breaks long lines (paths, a verdict) mid-word; there, every line is printed
    whole (tables too, see :func:`print_table`).
    """
    console = Console()
    if not console.is_terminal:
        console.soft_wrap = True
    return console


def print_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    title: str | None = None,
    console: Console | None = None,
) -> Table:
    """Print rows as a rich table with the given columns; returns the table.

    In a terminal the table fits the terminal's width. When the output is not a terminal
    (a log file, ``nohup``, a cluster job, ``torchrun``, a pipe) it is printed at its natural
    width, never wrapped: rich would otherwise assume 80 columns and fold a cell such as
    "baseline" into "baselin / e".
    """
    console = console or Console()
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(format_value(row.get(column)) for column in columns))
    if console.is_terminal:
        console.print(table)
        return table
    natural = Measurement.get(console, console.options.update_width(100_000), table).maximum
    saved = console._width  # None = detected; Console.print(width=...) is capped by console.width
    console.width = max(console.width, natural)
    try:
        console.print(table, crop=False)
    finally:
        console._width = saved
    return table


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows as a GitHub-flavoured Markdown table.

    >>> print(markdown_table([{"a": 1, "b": 0.123456}], ["a", "b"]))
    | a | b |
    |---|---|
    | 1 | 0.1235 |
    """
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [format_value(row.get(c)).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
