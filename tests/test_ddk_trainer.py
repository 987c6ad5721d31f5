"""DomainMixingTrainer: DDK's schedule in the LM trainer (weights from measured perplexities by Eq. 1-2,
written out in numpy here), draws that follow the weights, fixed mixings, and Ctrl-C/SIGKILL then
resume equal to the uninterrupted run (weights, per-domain iterators and the sampler's RNG restored)."""

import signal

import numpy as np
import pytest
import torch

from divergent.models.gpt import GPTConfig, TinyGPT
from divergent.train.ddk import DomainMixingTrainer
from divergent.train.lm import LMDistillConfig, evaluate_lm
from divergent.train.run import Checkpointer, RunInterrupted, current_interrupt, drive
from signal_helpers import signal_then_resume

VOCAB = 48


def _model(seed, d_model=32, n_layers=1):
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(vocab_size=VOCAB, d_model=d_model, n_layers=n_layers, n_heads=2, max_seq_len=32))


def _rows(low, high, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(low, high, (10,), generator=gen).tolist()), "labels": list(ids)}
            for _ in range(n)]


def _domains():
    """Two domains over disjoint token ranges (a: tokens 3..19, b: tokens 20..47)."""
    train = {"a": _rows(3, 20, 24, 0), "b": _rows(20, 48, 12, 1)}
    evaluation = {"a": _rows(3, 20, 4, 2), "b": _rows(20, 48, 4, 3)}
    return train, evaluation


def _config(**overrides):
    return LMDistillConfig(**{"steps": 8, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "hard_weight": 1.0,
                              "soft_weight": 0.2, "log_every": 1, "seed": 2, **overrides})


def _trainer(mixing="ddk", teacher_ppl=(3.0, 5.0), interval=3, smoothing=0.5, **overrides):
    train, evaluation = _domains()
    return DomainMixingTrainer(_model(0), _model(1, 48, 2), train, evaluation, _config(**overrides), mixing=mixing,
                               interval=interval, smoothing=smoothing, teacher_ppl=teacher_ppl, eval_batch_size=3)


def test_ddk_weights_follow_eq1_then_eq2_from_the_measured_perplexities():
    trainer = _trainer()
    student0 = _model(0)
    _, evaluation = _domains()
    drive(trainer)
    history = trainer.domain_history
    assert [h["step"] for h in history] == [0, 3, 6, 8]
    # the first measurement is the initial student's perplexity on each domain's eval rows
    measured = [evaluate_lm(student0, evaluation[d])["perplexity"] for d in ("a", "b")]
    np.testing.assert_allclose(history[0]["student_ppl"], measured, rtol=1e-6)
    teacher = np.array([3.0, 5.0])
    ratio = np.array(history[0]["student_ppl"]) / teacher
    np.testing.assert_allclose(history[0]["weights"], np.exp(ratio) / np.exp(ratio).sum(), rtol=1e-10)  # Eq. 1
    for before, after in zip(history[:-2], history[1:-1]):
        psi = np.array(before["weights"]) * np.exp(np.array(after["student_ppl"]) / teacher)  # Eq. 2
        np.testing.assert_allclose(after["weights"], 0.5 * psi / psi.sum() + 0.25, rtol=1e-10)
    assert history[-1]["weights"] == history[-2]["weights"]  # the final measurement changes nothing
    assert sum(history[-1]["drawn"]) == 8 * 4
    assert trainer.history[0]["domain_weights"] == history[0]["weights"]


def test_draws_follow_the_weights():
    """A teacher far better on domain a: softmax of ratios puts (almost) all the weight there."""
    trainer = _trainer(teacher_ppl=(0.05, 1e4), interval=100, steps=4)
    drive(trainer)
    assert trainer.domain_history[0]["weights"][0] > 1 - 1e-12
    assert trainer.source.drawn == [16, 0]


@pytest.mark.parametrize("mixing, expected", [("uniform", [0.5, 0.5]), ("proportional", [24 / 36, 12 / 36])])
def test_fixed_mixings_measure_at_start_and_end_only(mixing, expected):
    trainer = _trainer(mixing=mixing, teacher_ppl=None, steps=5)
    drive(trainer)
    assert [h["step"] for h in trainer.domain_history] == [0, 5]
    assert trainer.domain_history[0]["weights"] == pytest.approx(expected)


def test_bad_settings_name_themselves():
    with pytest.raises(ValueError, match="needs teacher_ppl"):
        _trainer(teacher_ppl=None)
    with pytest.raises(ValueError, match="ddk_interval"):
        _trainer(interval=0)
    with pytest.raises(ValueError, match="ddk_smoothing"):
        _trainer(smoothing=2.0)
    with pytest.raises(ValueError, match="did you mean 'uniform'"):
        _trainer(mixing="unifrom")


def _resumable():
    return _trainer(steps=10, interval=3)


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path):
    reference = _resumable()
    drive(reference)
    checkpointer = Checkpointer(tmp_path / "ck")
    first = _resumable()

    def ctrl_c(record):
        if record["step"] == 4:  # mid-interval: the next update is at step 6
            current_interrupt().request()

    with pytest.raises(RunInterrupted, match="after step 4"):
        drive(first, checkpointer=checkpointer, checkpoint_every=100, on_step=ctrl_c)
    torch.manual_seed(123)
    second = _resumable()
    drive(second, checkpointer=checkpointer, resume=True)
    assert second.history == reference.history
    assert second.domain_history == reference.domain_history
    assert second.source.drawn == reference.source.drawn
    for p, q in zip(second.student.parameters(), reference.student.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_resume_refuses_other_mixing_settings(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ck")
    drive(_trainer(steps=2), checkpointer=checkpointer)
    with pytest.raises(ValueError, match="smoothing=0.5, this run has smoothing=0.9"):
        drive(_trainer(steps=2, smoothing=0.9), checkpointer=checkpointer, resume=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_a_real_signal_then_resume_equals_the_uninterrupted_run(tmp_path, sig):
    reference = _resumable()
    drive(reference)
    history = signal_then_resume(tmp_path, "from test_ddk_trainer import _resumable; trainer = _resumable()", sig,
                                 after=4, every=2)
    assert history == [{k: v for k, v in h.items()} for h in reference.history]


DDP_WORKER = """
import json, sys, torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_ddk_trainer import _trainer
from divergent.train.lm import init_distributed_from_env
from divergent.train.run import drive

torch.set_num_threads(1)
distributed = init_distributed_from_env()
out, batch_size, grad_accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
trainer = _trainer(steps=4, interval=1, batch_size=batch_size, grad_accum=grad_accum, optimizer="sgd", lr=0.5,
                   warmup_steps=0, grad_clip=0.0)
drive(trainer)
rank = dist.get_rank() if distributed else 0
json.dump({{"history": trainer.domain_history, "losses": [h["loss"] for h in trainer.history]}},
          open(out + f".rank{{rank}}.json", "w"))
if rank == 0:
    torch.save(trainer.full_model_state(), out + ".pt")
if distributed:
    dist.destroy_process_group()
"""


def test_two_ddp_ranks_draw_the_same_domains_and_equal_one_process(tmp_path):
    """torchrun, 2 CPU ranks x 2 rows x 2 accumulation vs one process x 8 rows, DDK every step: the ranks
    agree on every measurement and weight, and the student equals the one-process student."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER.format(tests=str(Path(__file__).parent)))
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for command in ([sys.executable, str(script), str(tmp_path / "one"), "8", "1"],
                    [*launcher, str(script), str(tmp_path / "two"), "2", "2"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one.rank0.json").read_text())
    rank0, rank1 = (json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["history"] == rank1["history"]
    assert [h["step"] for h in rank0["history"]] == [0, 1, 2, 3, 4]
    for got, want in zip(rank0["history"], one["history"]):
        assert got["weights"] == pytest.approx(want["weights"], rel=1e-5)
        assert got["drawn"] == want["drawn"]
    assert rank0["losses"] == pytest.approx(one["losses"], rel=1e-5)
    single, double = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
