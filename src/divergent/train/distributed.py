"""Joining PyTorch's process group when launched by ``torchrun`` or ``accelerate launch``.

Both launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; every trainer calls :func:`init_distributed_from_env` once and
then uses PyTorch's own DDP/FSDP.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed_from_env", "rank", "world_size", "collective_device"]


def init_distributed_from_env(device: str | None = None) -> bool:
    """Initialise torch.distributed from the launcher's environment; True when running distributed.

    NCCL when CUDA is available and ``device`` is not ``"cpu"`` (each process on the GPU
    ``LOCAL_RANK``), gloo otherwise. A single process (no ``WORLD_SIZE`` or 1) does nothing.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU under NCCL, else the CPU (gloo)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
