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


def _accelerate_launch(tmp_path: Path, script: Path, *args: str) -> None:
    """Run ``script args`` on 2 CPU processes via ``python -m accelerate.commands.launch``; check both ranks ran."""
    shim, markers = tmp_path / "shim.py", tmp_path / "ranks"
    shim.write_text(SHIM)
    markers.mkdir()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
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
    """The LM worker: one process with 8 sequences vs 2 ranks x 2 sequences x 2 accumulation steps."""
    lm = _load("test_lm_distributed")
    single = lm._run(tmp_path, 1, 8, 1)
    worker = tmp_path / "worker.py"  # written by lm._run
    out = tmp_path / "accelerate.pt"
    _accelerate_launch(tmp_path, worker, str(out), "2", "2", "ddp")
    double = torch.load(out)
    assert single.keys() == double.keys()
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
