"""The run layer under every trainer: interrupts, checkpoints, non-finite losses, resume, progress.

Every trainer in :mod:`divergent.train` (classifier, LM, RL, preference) is a
small object with

- ``step_index`` (steps done) and ``total_steps``;
- ``step() -> dict``: one optimisation step, returning what it logs; it raises
  :class:`NonFiniteLossError` *before* updating any weight when the loss or a
  gradient is NaN or infinite;
- ``state_dict() -> dict`` and ``load_state_dict(state)``: everything needed to
  continue exactly (weights, optimiser, RNG states, history, counters), made of
  tensors and plain Python values only;

and :func:`drive` runs it::

    drive(trainer, checkpointer=Checkpointer(run_dir / "checkpoints"), checkpoint_every=50, resume=True)

:func:`drive` owns what used to drift between trainers:

- **Ctrl-C** (SIGINT) and SIGTERM set a flag that is honoured *between* steps:
  the step in progress finishes, a checkpoint is written, and
  :class:`RunInterrupted` is raised (a ``KeyboardInterrupt``). A second Ctrl-C
  stops at once without writing (the last checkpoint on disk stays intact).
  Under ``torch.distributed`` the ranks agree on the flag, so all stop at the
  same step.
- **Checkpoints** are checksummed and written atomically
  (:func:`divergent.io.save_state`), every ``checkpoint_every`` steps, at the
  end, and on interrupt; the newest ``keep`` are kept. Loading verifies the
  checksum and never unpickles arbitrary objects. A corrupt newest checkpoint is
  an error naming it (and the older one that is intact), never a silent
  fall-back.
- **Resume**: ``resume=True`` loads the newest checkpoint; because every random
  draw of a trainer is restored with its state, the resumed run reproduces the
  uninterrupted one (tested for every trainer, for Ctrl-C and SIGKILL).
- **Non-finite losses** stop the run with :class:`NonFiniteLossError` naming
  the step and the last good checkpoint.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from divergent.io import CorruptFileError, load_state, save_state
from divergent.train import distributed

__all__ = [
    "NonFiniteLossError",
    "RunInterrupted",
    "InterruptFlag",
    "Checkpointer",
    "Steppable",
    "drive",
    "check_finite",
    "progress",
]


class NonFiniteLossError(FloatingPointError):
    """The loss or a gradient became NaN or infinite; no weight was updated by that step.

    The message names the step, what was non-finite and the last good checkpoint.
    """


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a run between two steps, after its state was saved.

    ``step``: steps completed; ``checkpoint``: the file written (None without a run folder).
    """

    def __init__(self, step: int, checkpoint: Path | None, message: str | None = None) -> None:
        self.step = step
        self.checkpoint = checkpoint
        where = f"; state saved to {checkpoint}" if checkpoint is not None else " (no run folder: nothing saved)"
        super().__init__(message or f"interrupted after step {step}{where}")

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "interrupted"


class InterruptFlag:
    """Turns Ctrl-C and SIGTERM into a flag checked between steps, so a step is never cut in half.

    Used as a context manager around a training loop. ``raised`` is True once a signal came
    (or :meth:`request` was called, as tests and callbacks do). A second Ctrl-C raises
    ``KeyboardInterrupt`` at once. Outside the main thread signals cannot be caught, and
    the flag only reflects :meth:`request`.
    """

    def __init__(self) -> None:
        self.raised = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._previous[signum] = signal.signal(signum, self._handle)
                except (ValueError, OSError):  # pragma: no cover - unusual embedding
                    pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = True

    def request(self) -> None:
        """Ask the loop to stop after the current step, as Ctrl-C does."""
        self.raised = True

    def agreed(self) -> bool:
        """Whether to stop now; under torch.distributed, True on every rank when raised on any."""
        if distributed.world_size() == 1:
            return self.raised
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.raised else 0.0], device=distributed.collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


# The interrupt flag of the loop that is running now (a callback may call current_interrupt().request()).
_ACTIVE: list[InterruptFlag] = []


def current_interrupt() -> InterruptFlag | None:
    """The flag of the innermost running :func:`drive`, or None outside one."""
    return _ACTIVE[-1] if _ACTIVE else None


_STEP_FILE = re.compile(r"^step_(\d+)\.ckpt$")


class Checkpointer:
    """Checksummed, atomic checkpoints ``folder/step_<N>.ckpt``, keeping the newest ``keep``.

    Only rank 0 writes (every rank may call :meth:`save`; state gathering that needs all
    ranks happens in the trainer's ``state_dict``). ``on_save(step, path)`` runs after each
    write on rank 0 (e.g. to export a ``save_pretrained`` folder beside it).
    """

    def __init__(self, folder: str | Path, keep: int = 2, on_save: Callable[[int, Path], None] | None = None) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1 (checkpoints kept on disk), got {keep!r}")
        self.folder = Path(folder)
        self.keep = keep
        self.on_save = on_save

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _STEP_FILE.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        path = self.folder / f"step_{step}.ckpt"
        if distributed.rank() != 0:
            return path
        save_state(path, state)
        for old in self.paths()[:-self.keep]:
            if old != path:
                old.unlink(missing_ok=True)
        if self.on_save is not None:
            self.on_save(step, path)
        return path

    def load_latest(self, map_location: Any = "cpu") -> dict[str, Any] | None:
        """The newest checkpoint's state, None when there is none; a corrupt one raises naming it."""
        paths = self.paths()
        if not paths:
            return None
        try:
            return load_state(paths[-1], map_location=map_location)
        except CorruptFileError as exc:
            older = f"; the older checkpoint {paths[-2]} is intact: delete {paths[-1]} to resume from it" \
                if len(paths) > 1 and _intact(paths[-2]) else ""
            raise CorruptFileError(f"{exc}{older}") from None


def _intact(path: Path) -> bool:
    try:
        load_state(path)
        return True
    except (CorruptFileError, FileNotFoundError):
        return False


class Steppable(Protocol):
    step_index: int
    total_steps: int

    def step(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def drive(
    trainer: Steppable,
    *,
    checkpointer: Checkpointer | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    map_location: Any = "cpu",
) -> list[dict[str, Any]]:
    """Run ``trainer`` to ``trainer.total_steps``; returns the records of the steps run in this call.

    With ``resume`` the newest checkpoint of ``checkpointer`` is loaded first (nothing
    happens when there is none). Checkpoints are written every ``checkpoint_every`` steps
    (0: only at the end and on interrupt) and at the end. ``on_step(record)`` runs after
    each step (progress bars, logging; it may call ``current_interrupt().request()``).

    Raises :class:`RunInterrupted` after saving when Ctrl-C/SIGTERM came, and
    :class:`NonFiniteLossError` (naming the last good checkpoint) when a step's loss or
    gradient is not finite.
    """
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}")
    if resume and checkpointer is not None:
        state = checkpointer.load_latest(map_location=map_location)
        if state is not None:
            trainer.load_state_dict(state)
    records: list[dict[str, Any]] = []
    last_saved = trainer.step_index if resume and checkpointer is not None and checkpointer.latest() else None

    def save() -> Path | None:
        nonlocal last_saved
        if checkpointer is None:
            return None
        state = trainer.state_dict()  # every rank: gathering sharded weights may be collective
        path = checkpointer.save(trainer.step_index, state)
        last_saved = trainer.step_index
        return path

    with InterruptFlag() as interrupt:
        _ACTIVE.append(interrupt)
        try:
            while trainer.step_index < trainer.total_steps:
                try:
                    record = trainer.step()
                except NonFiniteLossError as exc:
                    latest = checkpointer.latest() if checkpointer is not None else None
                    where = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
                    raise NonFiniteLossError(f"{exc}; {where}") from None
                records.append(record)
                if on_step is not None:
                    on_step(record)
                if trainer.step_index >= trainer.total_steps:
                    break
                if interrupt.agreed():
                    path = save() if last_saved != trainer.step_index else (checkpointer.latest() if checkpointer else None)
                    raise RunInterrupted(trainer.step_index, path)
                if checkpoint_every and trainer.step_index % checkpoint_every == 0:
                    save()
        finally:
            _ACTIVE.remove(interrupt)
    if last_saved != trainer.step_index:
        save()
    return records


def check_finite(value: torch.Tensor | float, what: str, *, step: int, context: str = "") -> None:
    """Raise :class:`NonFiniteLossError` when ``value`` holds NaN or ±inf.

    ``step`` is the 1-based number of the step being taken; ``context`` names the method or
    regulariser (e.g. ``"method 'dkd'"``).
    """
    finite = bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) else \
        torch.isfinite(torch.tensor(float(value))).item()
    if not finite:
        shown = float(value.detach().float().reshape(-1)[0]) if isinstance(value, torch.Tensor) else float(value)
        extra = f" with {context}" if context else ""
        raise NonFiniteLossError(
            f"non-finite {what} ({shown}) at step {step}{extra}; stopped without updating the weights. "
            f"Try a lower learning rate, a smaller coefficient, or gradient clipping"
        )


def progress(console=None, transient: bool = False):
    """A rich progress bar with description, bar, count, elapsed and remaining time.

    ``with progress() as bar: task = bar.add_task("training", total=n); bar.advance(task)``.
    On a console that is not a terminal (a log file, ``nohup``, a cluster job) rich prints
    nothing while the bar runs, so logs stay readable.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )
