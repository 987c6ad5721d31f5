"""Two CPU processes (torchrun, gloo) train the same student as one process: DDP and FSDP, both with the
fused loss (computed inside the wrapped forward, where FSDP has gathered the output layer's weight)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from divergent.io import load_state

WORKER = textwrap.dedent(
    """
    import sys, torch
    import torch.distributed as dist
    from divergent.models.gpt import GPTConfig, TinyGPT
    from divergent.train.lm import ExampleSource, LMDistillConfig, LMTrainer, init_distributed_from_env
    from divergent.train.run import Checkpointer, drive

    def model(seed, width, layers):
        torch.manual_seed(seed)
        return TinyGPT(GPTConfig(vocab_size=48, d_model=width, n_layers=layers, n_heads=2, max_seq_len=32))

    def examples():
        gen = torch.Generator().manual_seed(7)
        rows = []
        for _ in range(64):
            length = int(torch.randint(4, 13, (1,), generator=gen))
            ids = torch.randint(0, 48, (length,), generator=gen).tolist()
            prompt = int(torch.randint(0, length - 1, (1,), generator=gen))
            rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        return rows

    def run(batch_size, grad_accum, fsdp, run_dir):
        torch.set_num_threads(1)
        config = LMDistillConfig(steps=3, batch_size=batch_size, grad_accum=grad_accum, fsdp=fsdp, fused=True,
                                 chunk_size=9, hard_weight=0.3, divergence="js", optimizer="sgd", lr=0.5,
                                 grad_clip=0.0, warmup_steps=0)
        trainer = LMTrainer(model(0, 32, 1), model(1, 48, 2), ExampleSource(examples(), seed=3), config)
        drive(trainer, checkpointer=Checkpointer(run_dir), checkpoint_every=2)
        return trainer.full_model_state(), [h["loss"] for h in trainer.history]

    if __name__ == "__main__":
        distributed = init_distributed_from_env()
        state, losses = run(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "fsdp", sys.argv[1] + ".run")
        if not distributed or dist.get_rank() == 0:
            torch.save({"state": state, "losses": losses}, sys.argv[1])
        if distributed:
            dist.destroy_process_group()
    """
)


def _run(tmp_path: Path, nproc: int, batch_size: int, grad_accum: int, mode: str = "ddp") -> dict:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"state_{nproc}_{batch_size}_{grad_accum}_{mode}.pt"
    src = str(Path(__file__).resolve().parents[1] / "src")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = (launcher if nproc > 1 else [sys.executable]) + [str(script), str(out), str(batch_size), str(grad_accum), mode]
    env = {"PYTHONPATH": src, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def _assert_equal(single, double):
    assert single["state"].keys() == double["state"].keys()
    for name in single["state"]:
        torch.testing.assert_close(double["state"][name], single["state"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert double["losses"] == pytest.approx(single["losses"], rel=1e-6)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_with_the_fused_loss_equal_one_process(tmp_path, mode):
    """Global batch of 8 examples: one process (8 x 1) vs two ranks (2 x 2 x 2 accumulation), fused=True."""
    single = _run(tmp_path, 1, 8, 1, mode)
    double = _run(tmp_path, 2, 2, 2, mode)
    _assert_equal(single, double)
    from divergent.models.gpt import GPTConfig, TinyGPT

    torch.manual_seed(0)
    initial = TinyGPT(GPTConfig(vocab_size=48, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)).state_dict()
    assert not torch.allclose(initial["lm_head.weight"], single["state"]["lm_head.weight"])  # it did train
    if mode == "fsdp":
        # The collective checkpoint holds the full, unsharded state, written by rank 0.
        checkpoint = load_state(tmp_path / "state_2_2_2_fsdp.pt.run" / "step_2.ckpt")
        assert {k: tuple(v.shape) for k, v in checkpoint["model"].items()} == \
            {k: tuple(v.shape) for k, v in single["state"].items()}
