"""The classifier trainer and `compare` on the shared run layer: Ctrl-C and SIGKILL, then resume, equal the uninterrupted run.

Ctrl-C is requested from the progress hook (``current_interrupt().request()``, what the SIGINT
handler does) at several steps, mid-epoch and at an epoch end; a real SIGINT or SIGKILL is sent
to a subprocess. Methods: an offline divergence (forward_kl), PS-KD (per-sample state in the
objective) and DML (an online teacher trained alongside). Also: a damaged cached teacher is
an error naming the file, never a retrain; the MCMI teacher's cache key holds its centroid
mode; a run folder of the old layout is refused.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from divergent.data.digits import load_digits_data
from divergent.data.vision import ClassificationData
from divergent.models.classifiers import MLP
from divergent.train.classifier import ClassifierTrainConfig, ClassifierTrainer, predict_logits, train_classifier
from divergent.train.run import current_interrupt
from signal_helpers import signal_then_resume

METHODS = ["forward_kl", "pskd", "dml"]


def _small_data():
    """192 digits for training (6 steps of 32 per epoch), the real validation and test splits."""
    full = load_digits_data()
    x, y = full.train.tensors
    return ClassificationData("digits-small", TensorDataset(x[:192], y[:192]), full.val, full.test, 10, (1, 8, 8))


def _models(seed=0):
    torch.manual_seed(seed)
    student = MLP((1, 8, 8), 10, hidden=(16,))
    torch.manual_seed(seed + 1)
    teacher = MLP((1, 8, 8), 10, hidden=(32,))
    return student, teacher


def _config(method):
    return ClassifierTrainConfig(method=method, epochs=2, batch_size=32, lr=1e-2, seed=3)


def _trainer(method):
    """For the subprocess tests: the trainer a fresh process builds."""
    student, teacher = _models()
    return ClassifierTrainer(student, _small_data(), _config(method), teacher=teacher)


class _CtrlCAt:
    """A progress bar stand-in that presses Ctrl-C after step ``at``."""

    def __init__(self, at):
        self.at, self.count = at, 0

    def advance(self, task):
        self.count += 1
        if self.count == self.at:
            current_interrupt().request()


def _test_logits(model, data):
    return predict_logits(model, data.test)[0]


@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_mid_epoch_and_at_an_epoch_end_then_resume_equals_the_uninterrupted_run(method, tmp_path):
    data = _small_data()
    student, teacher = _models()
    full = train_classifier(student, data, _config(method), teacher=teacher)
    assert full.status == "finished" and full.steps == 12
    for stop_at in (4, 6, 11):  # mid-epoch 1, the end of epoch 1 (after validation), one step before the end
        run_dir = tmp_path / f"stop{stop_at}"
        student, teacher = _models()
        part = train_classifier(student, data, _config(method), teacher=teacher, run_dir=run_dir,
                                progress=_CtrlCAt(stop_at), progress_task=0)
        assert part.status == "interrupted" and part.steps == stop_at
        assert (run_dir / "checkpoints" / f"step_{stop_at}.ckpt").is_file()
        torch.manual_seed(1234)  # a fresh process: the RNG state must come from the checkpoint
        student, teacher = _models(seed=7)  # other initial weights: all must come from the checkpoint
        if method != "dml":
            teacher = _models()[1]  # a frozen teacher is given again, not restored
        resumed = train_classifier(student, data, _config(method), teacher=teacher, run_dir=run_dir, resume=True)
        assert resumed.status == "finished" and resumed.steps == 12
        assert resumed.history == full.history, stop_at  # losses, validation accuracy and NLL, lr: exactly
        assert torch.equal(_test_logits(resumed.student, data), _test_logits(full.student, data)), stop_at
        if method == "dml":
            assert torch.equal(_test_logits(resumed.teacher, data), _test_logits(full.teacher, data))


@pytest.mark.parametrize("method", [pytest.param("forward_kl", marks=pytest.mark.slow), "pskd",
                                    pytest.param("dml", marks=pytest.mark.slow)])
def test_sigkill_then_resume_equals_the_uninterrupted_run(method, tmp_path):
    """A killed process resumes from its last periodic checkpoint (the same mechanism for every method:
    PS-KD, with the most state, runs in CI; the others with --runslow, about 15 s each)."""
    reference = _trainer(method)
    while reference.step_index < reference.total_steps:
        reference.step()
    history = signal_then_resume(tmp_path, f"from test_classifier_resume import _trainer; trainer = _trainer({method!r})",
                                 signal.SIGKILL, after=3, every=2)
    assert history == reference.history and len(history) == 2


@pytest.mark.slow
def test_a_real_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path):
    reference = _trainer("pskd")
    while reference.step_index < reference.total_steps:
        reference.step()
    history = signal_then_resume(tmp_path, "from test_classifier_resume import _trainer; trainer = _trainer('pskd')",
                                 signal.SIGINT, after=7, every=5)
    assert history == reference.history


def test_resuming_with_other_settings_is_refused(tmp_path):
    data = _small_data()
    student, _ = _models()
    train_classifier(student, data, ClassifierTrainConfig(method="ce", epochs=1, batch_size=32, stop_after_steps=2),
                     run_dir=tmp_path)
    with pytest.raises(ValueError, match="written with batch_size=32, this run has batch_size=16"):
        train_classifier(_models()[0], data, ClassifierTrainConfig(method="ce", epochs=1, batch_size=16),
                         run_dir=tmp_path, resume=True)


def test_a_run_folder_of_the_old_layout_is_refused_not_ignored(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"an old pickle")
    with pytest.raises(ValueError, match=r"checkpoint\.pt is a checkpoint of an older divergent version.*delete"):
        train_classifier(_models()[0], _small_data(), ClassifierTrainConfig(method="ce", epochs=1), run_dir=tmp_path,
                         resume=True)


# ------------------------------------------------------------------------------ compare


def _quiet():
    from rich.console import Console

    return Console(file=open(os.devnull, "w"))


def _cli(*args):
    from typer.testing import CliRunner

    from divergent.cli import app

    return CliRunner().invoke(app, list(args))


def _tiny_compare(tmp_path, out):
    from divergent.experiments.compare import CompareConfig

    return CompareConfig(divergences=["forward_kl"], methods=["pskd"], seeds=[0, 1], epochs=3, teacher_epochs=2,
                         teacher_model="mlp-32", student_model="mlp-8", output_dir=str(out))


def _numbers(run_dir):
    rows = list(csv.DictReader(open(Path(run_dir) / "results.csv")))
    return {(r["name"], r["seed"]): (r["accuracy"], r["nll"], r["ece"], r["agreement"], r["steps"]) for r in rows}


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGKILL],
                         ids=["ctrl-c", "sigkill"])
def test_compare_killed_mid_run_resumes_to_the_same_results(tmp_path, sig):
    """Killed inside the second seed's pskd run; `divergent compare --resume` gives the same results.csv numbers
    (Ctrl-C in the middle of a comparison is also tested in-process in test_compare.py)."""
    from divergent.experiments.compare import run_compare

    reference = run_compare(_tiny_compare(tmp_path, tmp_path / "reference"), console=_quiet())  # caches the teacher
    from divergent.config import save_config

    save_config(_tiny_compare(tmp_path, tmp_path / "killed"), tmp_path / "c.yaml")
    command = [sys.executable, "-m", "divergent.cli", "compare", "--config", str(tmp_path / "c.yaml")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list((tmp_path / "killed").glob("*/runs/*/seed1/checkpoints/step_*.ckpt")):  # inside the 2nd seed
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() else ""
        time.sleep(0.005)
    process.send_signal(sig)
    code = process.wait(timeout=60)
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    (run_dir,) = (tmp_path / "killed").iterdir()
    if sig == signal.SIGINT:
        assert f"divergent compare --resume {run_dir}" in process.stderr.read()
    assert not (run_dir / "results.csv").exists()
    result = _cli("compare", "--resume", str(run_dir))
    assert result.exit_code == 0, result.output
    assert _numbers(run_dir) == _numbers(reference["run_dir"])


def test_a_damaged_cached_teacher_is_an_error_naming_it_never_a_retrain(tmp_path):
    from divergent.experiments.compare import run_compare

    config = _tiny_compare(tmp_path, tmp_path / "runs")
    config.seeds, config.methods = [0], []
    run_compare(config, console=_quiet())
    (cached,) = (tmp_path / "cache" / "teachers").glob("*.pt")
    before = cached.stat().st_mtime_ns
    data = bytearray(cached.read_bytes())
    data[-10] ^= 0x01  # one flipped bit in the weights
    cached.write_bytes(bytes(data))
    from divergent.config import save_config

    save_config(config, tmp_path / "c.yaml")
    result = _cli("compare", "--config", str(tmp_path / "c.yaml"))
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert f"cached teacher {cached} is damaged" in message and f"delete {cached}" in message
    assert cached.read_bytes() == bytes(data) and cached.stat().st_mtime_ns != before  # left as it was: not retrained


def test_the_mcmi_teacher_cache_key_holds_the_centroid_mode(tmp_path):
    from divergent.experiments.compare import CompareConfig, get_teacher

    data = _small_data()
    quiet = _quiet()
    base = dict(divergences=["forward_kl"], methods=["mcmi"], teacher_model="mlp-16", teacher_epochs=1, mcmi_epochs=2,
                output_dir=str(tmp_path))
    once, _ = get_teacher(CompareConfig(**base), data, console=quiet, mcmi=True)
    epoch, _ = get_teacher(CompareConfig(**base, method_params={"mcmi-teacher": {"centroids": "epoch"}}), data,
                           console=quiet, mcmi=True)
    files = sorted((tmp_path / "cache" / "teachers").glob("*-mcmi.pt"))
    assert len(files) == 2  # two modes, two cache entries (the base teacher is shared)
    assert len(list((tmp_path / "cache" / "teachers").glob("*.pt"))) == 3
    assert not torch.equal(_test_logits(once, data), _test_logits(epoch, data))
    again, info = get_teacher(CompareConfig(**base), data, console=quiet, mcmi=True)
    assert info["cached"] and torch.equal(_test_logits(again, data), _test_logits(once, data))
