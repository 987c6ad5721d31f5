"""Shared test configuration: `slow`, `gpu` and `vllm` markers.

Slow tests run with ``pytest --runslow`` or ``DIVERGENT_SLOW=1``; GPU tests run
whenever CUDA is available; `vllm` tests when CUDA and the `vllm` command are there.
"""

import os
import shutil

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("DIVERGENT_SLOW") == "1"
    has_gpu = torch.cuda.is_available()
    skip_slow = pytest.mark.skip(reason="slow: use --runslow or DIVERGENT_SLOW=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_vllm = pytest.mark.skip(reason="needs vllm (the `vllm` command) and a CUDA device")
    has_vllm = has_gpu and shutil.which("vllm") is not None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("vllm") is not None and not has_vllm:
            item.add_marker(skip_vllm)


# The tests' models and tensors are tiny: one thread avoids thread-pool overhead that made
# trainer tests several times slower on the 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads(tmp_path, monkeypatch):
    torch.manual_seed(0)
    # Keep cached teachers and run folders inside the test's tmp dir.
    monkeypatch.setenv("DIVERGENT_CACHE_DIR", str(tmp_path / "cache"))
    yield


@pytest.fixture(scope="module")
def bench_fused_linear():
    """``benchmarks/bench_fused_linear.py`` as a module."""
    from kernel_cases import load_benchmark

    return load_benchmark("bench_fused_linear")
