"""A real Ctrl-C or SIGKILL sent to a training subprocess, then a resume: the history it ends with.

``signal_then_resume(tmp_path, "from test_x import make; trainer = make()", sig)`` runs the
trainer under ``drive`` in a fresh Python process that prints each step, sends ``sig`` after
step ``after``, checks the exit (130 and "INTERRUPTED" for SIGINT, killed for SIGKILL), runs
the same script again with ``resume=True`` and returns the history that run wrote. Tests
compare it with an uninterrupted run's.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from divergent.train.run import Checkpointer, RunInterrupted, drive
    {make}

    DELAY = {delay}
    def slow(record):
        print(record["step"], flush=True)
        time.sleep(DELAY)
    try:
        drive(trainer, checkpointer=Checkpointer({folder!r}), checkpoint_every={every}, resume=True, on_step=slow)
    except RunInterrupted as exc:
        print("INTERRUPTED", exc.step, flush=True)
        sys.exit(130)
    json.dump(trainer.history, open({out!r}, "w"))
    """
)


def signal_then_resume(tmp_path: Path, make: str, sig: int, *, after: int = 3, every: int = 2,
                       delay: float = 0.15) -> list:
    """The history of a run interrupted by ``sig`` after step ``after`` and then resumed (see the module doc)."""
    script = tmp_path / "run.py"
    fields = dict(tests=str(Path(__file__).parent), make=make, folder=str(tmp_path / "ck"),
                  out=str(tmp_path / "history.json"), every=every)
    script.write_text(_SCRIPT.format(delay=delay, **fields))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.strip().isdigit() and int(line) >= after:
            break
    process.send_signal(sig)
    rest = process.stdout.read()
    code = process.wait(timeout=120)
    if sig == signal.SIGINT:
        assert code == 130 and "INTERRUPTED" in rest, (code, rest)
    else:
        assert code == -sig, code
    script.write_text(_SCRIPT.format(delay=0.0, **fields))
    resumed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return json.loads((tmp_path / "history.json").read_text())


def ctrl_c_in_drive(monkeypatch, module, step: int) -> None:
    """Make ``module.drive`` (an experiment's) ask for Ctrl-C after step ``step``, as a user pressing it would;
    undo with ``monkeypatch.undo()`` or by setting ``module.drive`` back."""
    from divergent.train.run import current_interrupt

    real_drive = module.drive

    def interrupted_drive(trainer, **kwargs):
        def ctrl_c(record):
            kwargs["on_step"](record)
            if record["step"] == step:
                current_interrupt().request()
        return real_drive(trainer, **{**kwargs, "on_step": ctrl_c})

    monkeypatch.setattr(module, "drive", interrupted_drive)
