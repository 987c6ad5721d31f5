"""The run layer every trainer stands on: atomic and checksummed files, Ctrl-C between steps,
non-finite losses, resume equal to an uninterrupted run, and the command-line conventions."""

from __future__ import annotations

import errno
import io
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from divergent.io import (
    CorruptFileError,
    WriteError,
    atomic_write_text,
    load_state,
    read_json,
    read_yaml,
    save_state,
    write_json,
)
from divergent.train.run import (
    Checkpointer,
    NonFiniteLossError,
    RunInterrupted,
    check_finite,
    current_interrupt,
    drive,
)


# ----------------------------------------------------------------------------- files


def test_state_round_trip_keeps_tensors_optimizer_and_rng_states(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    import random

    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
             "py_rng": random.Random(1).getstate(), "history": [{"loss": 1.5}], "name": "x", "none": None}
    loaded = load_state(save_state(tmp_path / "s.ckpt", state))
    assert torch.equal(loaded["model"]["weight"], model.state_dict()["weight"])
    assert loaded["optimizer"]["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert torch.equal(loaded["rng"], state["rng"])
    assert random.Random().setstate(loaded["py_rng"]) is None  # a valid random state
    assert loaded["history"] == [{"loss": 1.5}] and loaded["none"] is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "header"])
def test_a_damaged_state_file_is_detected_not_loaded(tmp_path, damage):
    path = save_state(tmp_path / "s.ckpt", {"w": torch.arange(1000.0)})
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) - 10]
    elif damage == "empty":
        data = bytearray()
    else:
        data[:5] = b"XXXXX"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=str(path)):
        load_state(path)


def test_loading_never_executes_a_pickled_payload(tmp_path):
    """A state file whose checksum is right but whose payload would run code is refused."""
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    torch.save({"w": torch.ones(1), "evil": Evil()}, buffer, pickle_module=pickle)
    payload = buffer.getvalue()
    import hashlib

    from divergent import io as dio

    path = tmp_path / "evil.ckpt"
    path.write_bytes(dio._MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    with pytest.raises(CorruptFileError):
        load_state(path)
    assert not marker.exists()


def test_saving_refuses_objects_that_would_need_unpickling(tmp_path):
    with pytest.raises(TypeError, match=r"state\['where'\] is a pathlib"):
        save_state(tmp_path / "s.ckpt", {"where": Path("x")})
    assert not (tmp_path / "s.ckpt").exists()


def test_an_atomic_write_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    path = atomic_write_text(tmp_path / "config.yaml", "old: 1\n")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(WriteError, match=r"cannot write .*config.yaml: No space left on device \(the disk is full"):
        atomic_write_text(path, "new: 2\n")
    assert path.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left behind


def test_reading_names_the_file_and_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [2\n")
    with pytest.raises(CorruptFileError, match=r"bad.yaml is not valid YAML \(line 3"):
        read_yaml(bad)
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(CorruptFileError, match="empty.json is empty"):
        read_json(tmp_path / "empty.json")
    write_json({"a": torch.tensor(2.0), "p": Path("x")}, tmp_path / "ok.json")
    assert read_json(tmp_path / "ok.json") == {"a": 2.0, "p": "x"}


# ----------------------------------------------------------------------------- drive


class ToyTrainer:
    """Noisy SGD on a linear model: every step draws from the torch RNG, so an exact resume
    needs the RNG state, the optimiser state and the counters."""

    def __init__(self, total_steps: int = 12, nan_at: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.05)
        self.step_index, self.total_steps, self.nan_at = 0, total_steps, nan_at
        self.history: list[dict] = []

    def step(self) -> dict:
        x = torch.randn(8, 4)
        y = x.sum(1, keepdim=True) + 0.1 * torch.randn(8, 1)
        loss = (self.model(x) - y).pow(2).mean()
        if self.nan_at is not None and self.step_index + 1 == self.nan_at:
            loss = loss * float("nan")
        check_finite(loss, "loss", step=self.step_index + 1, context="the toy trainer")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.step_index += 1
        record = {"step": self.step_index, "loss": loss.item()}
        self.history.append(record)
        return record

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": torch.get_rng_state(), "step": self.step_index, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.step_index = state["step"]
        self.history = list(state["history"])


def _uninterrupted():
    trainer = ToyTrainer()
    drive(trainer)
    return trainer


@pytest.mark.parametrize("stop_after", [1, 5, 11])
def test_ctrl_c_between_steps_then_resume_equals_the_uninterrupted_run(tmp_path, stop_after):
    reference = _uninterrupted()
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    first = ToyTrainer()

    def ctrl_c(record):
        if record["step"] == stop_after:
            current_interrupt().request()  # what the SIGINT handler does

    with pytest.raises(RunInterrupted, match=f"after step {stop_after}") as info:
        drive(first, checkpointer=checkpointer, checkpoint_every=4, on_step=ctrl_c)
    assert info.value.checkpoint == tmp_path / "checkpoints" / f"step_{stop_after}.ckpt"
    assert isinstance(info.value, KeyboardInterrupt)

    torch.manual_seed(123)  # a fresh process would not share the RNG: resume must restore it
    second = ToyTrainer()
    drive(second, checkpointer=checkpointer, checkpoint_every=4, resume=True)
    assert second.history == reference.history
    assert torch.equal(second.model.weight, reference.model.weight)
    names = [p.name for p in checkpointer.paths()]
    assert names[-1] == "step_12.ckpt" and len(names) == 2  # the final state, and keep=2


def test_non_finite_loss_stops_before_the_update_and_names_the_last_good_checkpoint(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ck")
    trainer = ToyTrainer(nan_at=7)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 7 with the toy trainer.*step_6.ckpt"):
        drive(trainer, checkpointer=checkpointer, checkpoint_every=3)
    assert trainer.step_index == 6
    assert torch.isfinite(trainer.model.weight).all()


def test_a_corrupt_newest_checkpoint_is_an_error_naming_it_and_the_intact_older_one(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ck")
    drive(ToyTrainer(total_steps=6), checkpointer=checkpointer, checkpoint_every=3)
    newest = checkpointer.latest()
    newest.write_bytes(newest.read_bytes()[:-5])
    with pytest.raises(CorruptFileError, match=r"step_6.ckpt is corrupt.*step_3.ckpt is intact"):
        drive(ToyTrainer(total_steps=6), checkpointer=checkpointer, resume=True)


_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_run_layer import ToyTrainer
    from divergent.train.run import Checkpointer, RunInterrupted, drive

    trainer = ToyTrainer(total_steps=40)
    def slow(record):
        print(record["step"], flush=True)
        time.sleep({delay})
    try:
        drive(trainer, checkpointer=Checkpointer({folder!r}), checkpoint_every=5, resume=True, on_step=slow)
    except RunInterrupted as exc:
        print("INTERRUPTED", exc.step, flush=True)
        sys.exit(130)
    json.dump(trainer.history, open({out!r}, "w"))
    """
)


def _start(tmp_path, delay):
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent), folder=str(tmp_path / "ck"),
                                     out=str(tmp_path / "history.json"), delay=delay))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)


def _wait_for_step(process, step):
    for line in process.stdout:
        if line.strip().isdigit() and int(line) >= step:
            return


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_a_real_signal_then_resume_equals_the_uninterrupted_run(tmp_path, sig):
    import json

    reference = ToyTrainer(total_steps=40)
    drive(reference)
    process = _start(tmp_path, delay=0.05)
    _wait_for_step(process, 7)
    process.send_signal(sig)
    rest = process.stdout.read()
    code = process.wait(timeout=60)
    if sig == signal.SIGINT:
        assert code == 130 and "INTERRUPTED" in rest
    else:
        assert code == -signal.SIGKILL
    resumed = _start(tmp_path, delay=0.0)
    resumed.stdout.read()
    assert resumed.wait(timeout=60) == 0
    assert json.loads((tmp_path / "history.json").read_text()) == reference.history


# ----------------------------------------------------------------------------- command line


def _cli(args, tmp_path):
    env = {**os.environ, "DIVERGENT_CACHE_DIR": str(tmp_path / "cache")}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "divergent.cli", *args], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    return result, time.perf_counter() - started


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "--epochs", "x"], "error: Invalid value for '--epochs'"),
        (["compare", "--set", "epoch=3"], "did you mean 'epochs'"),
        (["compare", "--config", "missing.yaml"], "config file not found: missing.yaml"),
        (["compare", "--resume", "nowhere"], "run folder not found: nowhere"),
        (["compare", "--resume", ".", "--epochs", "2"], "remove the other settings given (epochs)"),
        (["nope"], "No such command 'nope'"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, message):
    result, _ = _cli(args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_yaml_syntax_errors_name_file_and_line_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: 3\nseeds: [0, 1\n")
    result, _ = _cli(["compare", "-c", "bad.yaml"], tmp_path)
    assert result.returncode == 2
    assert "config file bad.yaml is not valid YAML (line 3" in result.stderr
    debug, _ = _cli(["compare", "-c", "bad.yaml", "--debug"], tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "AttributeError" not in debug.stderr


def test_a_run_that_fails_before_training_leaves_no_run_folder(tmp_path):
    (tmp_path / "empty").mkdir()  # a folder without the CIFAR files: the run fails when it loads them
    result, _ = _cli(["compare", "--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"), "-o", "runs"], tmp_path)
    assert result.returncode == 2 and "CIFAR files not found" in result.stderr
    assert not any((tmp_path / "runs").iterdir()) if (tmp_path / "runs").exists() else True


def test_an_output_folder_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "taken").write_text("")
    result, _ = _cli(["compare", "-o", "taken"], tmp_path)
    assert result.returncode == 2 and "output folder taken is a file" in result.stderr


def test_help_texts_keep_brackets_and_backticks(tmp_path):
    from typer.testing import CliRunner

    from divergent.cli import app

    result = CliRunner().invoke(app, ["distill-lm", "--help"])
    assert result.exit_code == 0
    assert "[tokens, vocab]" in " ".join(result.output.split())
