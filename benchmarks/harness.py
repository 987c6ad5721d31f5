"""Shared benchmark harness: median timings, peak memory, CSV with provenance.

Every benchmark file in this folder times one op with :func:`time_fn`, measures
memory with :func:`peak_memory_mb`, and writes rows with :func:`write_results`,
which records the command line and the machine in a comment header so that a
committed CSV says where its numbers came from. Quote medians and ratios taken
side by side in one run: these machines are shared and noisy.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import shlex
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

from divergent.experiments.report import write_csv

__all__ = [
    "time_fn",
    "peak_memory_mb",
    "LiveBytes",
    "machine_description",
    "write_results",
    "command_line",
]


def _sync(device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], Any],
    repeats: int = 10,
    warmup: int = 2,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; return median/min/max in ms."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "repeats": repeats,
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_memory_mb(make_fn: Callable[[], Callable[[], Any]], device: str | torch.device = "cpu") -> float:
    """Extra peak memory (MiB) of one call of the function that ``make_fn()`` returns.

    ``make_fn`` builds the inputs and returns a zero-argument callable, so that
    inputs are not counted. On CUDA this is ``torch.cuda.max_memory_allocated``
    above the allocation before the call. On CPU (Linux) the kernel's peak
    resident-set counter is reset through ``/proc/self/clear_refs`` just before the
    call, and the result is the peak (VmHWM) minus the resident set before it. (A
    forked child would be cleaner but can hang once torch's thread pool has run.)
    """
    fn = make_fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return max(peak - before, 0) / 1024.0


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storage while code runs, counted op by op.

    Meant for the ``meta`` device, whose tensors have shapes and dtypes but no data: a
    step at full size (8k tokens x a 128k vocabulary) runs on any machine in a second, and
    this counts what it would hold. Every storage is counted from the op that creates it
    until its last tensor is freed, which is what ``torch.cuda.max_memory_allocated``
    reports, less the caching allocator's rounding to 512 bytes and less what libraries
    allocate outside the ops (cuBLAS's workspace). Tensors made before the mode is entered
    are not counted. Meta tensors hold no values, so every number read back to
    the host (``int(t)``, ``bool(t)``, ``t.item()``) is 0 here: a plan is only as faithful
    as the code's allocations are independent of such values.

    >>> with LiveBytes() as live:
    ...     a = torch.empty(1024, device="meta")          # 4 KiB
    ...     b = a * 2                                     # 4 KiB more
    ...     del a, b
    ...     c = torch.empty(256, device="meta")           # 1 KiB
    >>> live.peak, live.live
    (8192, 1024)
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def _add(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
            return
        key = id(storage)
        if key in self._alive:
            return
        nbytes = storage.nbytes()
        self._alive.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        # The storage's Python object lives as long as any tensor on it (PyObject preservation).
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        if key in self._alive:
            self._alive.discard(key)
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            dtype = args[0].dtype
            return False if dtype == torch.bool else (0.0 if dtype.is_floating_point else 0)
        out = func(*args, **(kwargs or {}))
        for leaf in _pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf)
        return out


def machine_description() -> str:
    """One line: CPU or GPU model, core count, torch version."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as handle:
                for line in handle:
                    if line.startswith("model name"):
                        device = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return f"{device}; {os.cpu_count()} cores; torch {torch.__version__}; python {platform.python_version()}"


def command_line() -> str:
    """The command that is running, as a user would retype it."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def write_results(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, command: str | None = None) -> Path:
    """Write rows as CSV preceded by ``# command:``, ``# machine:`` and ``# date:`` comment lines."""
    path = Path(path)
    header = (
        f"# command: {command or command_line()}\n"
        f"# machine: {machine_description()}\n"
        f"# date: {_dt.datetime.now().isoformat(timespec='seconds')}\n"
    )
    write_csv(rows, path)
    path.write_text(header + path.read_text())
    return path
