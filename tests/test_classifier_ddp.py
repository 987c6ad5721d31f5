"""Two CPU processes under torchrun (gloo) follow the same trajectory as one process with the same global batch.

Run as a script by torchrun: each process trains on its half of every global batch and
rank 0 saves the final weights; the test compares them with a single-process run.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src"


def _train(run_dir=None):
    from torch.utils.data import TensorDataset

    from divergent.data.digits import load_digits_data
    from divergent.data.vision import ClassificationData
    from divergent.models.classifiers import MLP
    from divergent.train.classifier import ClassifierTrainConfig, train_classifier

    full = load_digits_data()
    x, y = full.train.tensors
    # 200 rows and batch 48: the last batch (8 rows) is split 4/4, the others 24/24.
    data = ClassificationData("digits-small", TensorDataset(x[:200], y[:200]), full.val, full.test, 10, (1, 8, 8))
    torch.manual_seed(0)
    student = MLP((1, 8, 8), 10, hidden=(32,))
    torch.manual_seed(1)
    teacher = MLP((1, 8, 8), 10, hidden=(64,))
    config = ClassifierTrainConfig(method="js", epochs=2, batch_size=48, lr=1e-2, seed=3)
    return train_classifier(student, data, config, teacher=teacher, run_dir=run_dir)


def test_two_gloo_processes_equal_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
               __file__, str(tmp_path / "ddp.pt")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    distributed = torch.load(tmp_path / "ddp.pt")
    single = _train().student.state_dict()
    assert distributed.keys() == single.keys()
    torch.manual_seed(0)
    from divergent.models.classifiers import MLP

    initial = MLP((1, 8, 8), 10, hidden=(32,)).state_dict()
    assert not torch.allclose(initial["classifier.weight"], single["classifier.weight"])  # it did train
    for key in single:
        # Same math, different summation order across processes: equal up to float32 rounding.
        torch.testing.assert_close(distributed[key], single[key], rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = _train()
    if dist.get_rank() == 0:
        torch.save(result.student.state_dict(), sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_compare_under_torchrun_matches_one_process(tmp_path):
    """`divergent compare` launched by torchrun: one run folder, written by the first process, same numbers."""
    from rich.console import Console

    from divergent.experiments.compare import CompareConfig, run_compare
    from divergent.config import save_config

    cache = tmp_path / "cache"
    config = CompareConfig(divergences=["forward_kl", "js"], seeds=[0], epochs=2, teacher_epochs=2, teacher_model="mlp-32",
                           student_model="mlp-8", include_student_alone=False, output_dir=str(tmp_path / "one"))
    os.environ["DIVERGENT_CACHE_DIR"] = str(cache)  # conftest restores it after the test
    single = run_compare(config, console=Console(file=open(os.devnull, "w")))  # also caches the teacher
    save_config(dataclasses.replace(config, output_dir=str(tmp_path / "two")), tmp_path / "c.yaml")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    script = "import sys; from divergent.cli import main; sys.argv = ['divergent', 'compare', '--config', sys.argv[1]]; main()"
    runner = tmp_path / "run_cli.py"
    runner.write_text(script)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
               str(runner), str(tmp_path / "c.yaml")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = (tmp_path / "two").iterdir()
    import json

    distributed = json.loads((run_dir / "results.json").read_text())
    for a, b in zip(single["runs"], distributed["runs"]):
        assert (a["name"], a["seed"]) == (b["name"], b["seed"])
        assert abs(a["nll"] - b["nll"]) < 1e-4 and abs(a["accuracy"] - b["accuracy"]) <= 1 / 359
