"""Two CPU processes started by `accelerate launch` train the same model as one process.

The torchrun tests (test_classifier_ddp.py, test_lm_distributed.py) already check the DDP
arithmetic; these check that the trainers also join the process group when Hugging Face
Accelerate is the launcher, running the very same worker scripts.

Which accelerate flags give two CPU processes: with accelerate 1.15 and no config file,
``--cpu --num_processes 2`` starts ONE process (accelerate's multi-CPU mode goes through
``mpirun --hostfile``, and without one it falls back to a plain ``python script``). The
flags that work are ``--multi_gpu --num_processes 2``: accelerate hands over to
torch.distributed.run, which sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, and the
trainers pick gloo because CUDA is hidden. Each rank writes a marker with its rank and
world size so a launch that silently ran one process cannot pass.
"""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"

# Records what the launcher told this process, then runs the worker as its own __main__.
SHIM = """
import os, runpy, sys
from pathlib import Path
Path(sys.argv[1], "rank" + os.environ.get("RANK", "unset")).write_text(os.environ.get("WORLD_SIZE", "unset"))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_accelerate_{name}", TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accelerate_launch(tmp_path: Path, script: Path, *args: str, flags: tuple[str, ...] = ("--multi_gpu",)) -> None:
    """Run ``script args`` on 2 CPU processes via ``python -m accelerate.commands.launch``; check both ranks ran.

    ``flags``: the launcher's mode (``--multi_gpu`` for DDP; ``--use_fsdp ...`` in tests/test_hf_fsdp.py)."""
    shim, markers = tmp_path / "shim.py", tmp_path / "ranks"
    shim.write_text(SHIM)
    markers.mkdir(exist_ok=True)
    for marker in markers.iterdir():
        marker.unlink()
    command = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(shim), str(markers), str(script), *args]
    # HF_HOME/HOME in tmp: no user accelerate config is read. No CUDA: gloo, as on the CI machine.
    env = {"PYTHONPATH": str(SRC), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
           "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "CUDA_VISIBLE_DEVICES": "",
           "DIVERGENT_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {p.name: p.read_text() for p in markers.iterdir()} == {"rank0": "2", "rank1": "2"}


@pytest.mark.slow  # an accelerate + torchrun start-up on top of the torchrun test: ~15 s on 2 cores
def test_classifier_under_accelerate_equals_one_process(tmp_path):
    """The classifier DDP worker (200 digits rows, global batch 48, 2 epochs) under accelerate vs one process."""
    ddp = _load("test_classifier_ddp")
    _accelerate_launch(tmp_path, TESTS / "test_classifier_ddp.py", str(tmp_path / "ddp.pt"))
    distributed = torch.load(tmp_path / "ddp.pt")
    single = ddp._train().student.state_dict()
    assert distributed.keys() == single.keys()
    torch.manual_seed(0)
    from divergent.models.classifiers import MLP

    initial = MLP((1, 8, 8), 10, hidden=(32,)).state_dict()
    assert not torch.allclose(initial["classifier.weight"], single["classifier.weight"])  # it did train
    for key in single:
        # Same tolerance as the torchrun test: the ranks sum gradients in a different order.
        torch.testing.assert_close(distributed[key], single[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_lm_distillation_under_accelerate_equals_one_process(tmp_path):
    """The LMTrainer worker: one process with 8 examples vs 2 ranks x 2 examples x 2 accumulation steps."""
    lm = _load("test_lm_distributed")
    single = lm._run(tmp_path, 1, 8, 1)
    worker = tmp_path / "worker.py"  # written by lm._run
    out = tmp_path / "accelerate.pt"
    _accelerate_launch(tmp_path, worker, str(out), "2", "2", "ddp")
    lm._assert_equal(single, torch.load(out))


# DistillationTrainer as a transformers user runs it: `accelerate launch script.py`.
HF_WORKER = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import lm_helpers as H
from divergent.hf import DistillationConfig, DistillationTrainer

out, per_device, accumulation = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tokenizer = H.tokenizer()
teacher, student = H.llama(len(tokenizer), 48, 2, seed=1), H.llama(len(tokenizer), 32, 1, seed=0, tie=True)
args = DistillationConfig(output_dir=out + ".run", per_device_train_batch_size=per_device,
                          gradient_accumulation_steps=accumulation, max_steps=3, learning_rate=0.5, optim="sgd",
                          lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, save_strategy="no",
                          use_cpu=True, report_to=[], seed=0, disable_tqdm=True, divergence="js",
                          hard_weight=0.3, fused=True, chunk_size=7, dataloader_drop_last=True)
trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=H.chat_rows(32),
                              processing_class=tokenizer)
trainer.train()
state = trainer.accelerator.get_state_dict(trainer.model)  # gathers FSDP shards (collective)
if trainer.accelerator.is_main_process:
    torch.save({{"state": {{k: v.detach().cpu() for k, v in state.items()}},
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                "wrapped": type(trainer.model_wrapped).__name__}}, out)
"""


def _hf_worker(tmp_path):
    script = tmp_path / "hf_worker.py"
    script.write_text(HF_WORKER.format(tests=str(TESTS)))
    return script


def _one_process(tmp_path, script):
    out = tmp_path / "single.pt"
    env = {"PYTHONPATH": str(SRC), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
           "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(script), str(out), "8", "1"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def _assert_hf_equal(single, double):
    assert single["state"].keys() == double["state"].keys()
    for name in single["state"]:
        torch.testing.assert_close(double["state"][name], single["state"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert double["losses"] == pytest.approx(single["losses"], rel=1e-5)


def test_distillation_trainer_under_accelerate_ddp_equals_one_process(tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP, fused loss): 2 ranks x 2 rows x 2 accumulation steps
    give the same three updates as one process with 8 rows (num_items_in_batch summed over ranks)."""
    script = _hf_worker(tmp_path)
    single = _one_process(tmp_path, script)
    _accelerate_launch(tmp_path, script, str(tmp_path / "ddp.pt"), "2", "2")
    double = torch.load(tmp_path / "ddp.pt")
    assert double["wrapped"] == "DistributedDataParallel"
    _assert_hf_equal(single, double)


# accelerate's FSDP needs GPUs: on CPU it runs MULTI_CPU (DDP) whatever --use_fsdp says. The fused loss
# under FSDP is checked on CPU through torch's FSDP in test_lm_distributed.py (LMTrainer), whose loss is
# computed by the same LMObjective and replace_output hooks as DistillationTrainer's.
