"""Benchmark: peak CPU memory of LinearDistillationLoss vs the unfused loss at growing token counts.

One step = forward + backward of

    0.5 * CE(x_s W_s^T, y) + 0.5 * D(softmax(x_t W_t^T) || softmax(x_s W_s^T))

for ``N`` tokens, hidden size ``H`` and vocabulary ``V`` (float32), with the
student's ``x_s``, ``W_s`` trainable. ``unfused`` builds the ``[N, V]`` logits
and calls ``dv.DistillationLoss``; ``fused`` is ``dv.LinearDistillationLoss``
(chunks of ``--chunk-size`` tokens). Each measurement runs in a fresh Python
process with glibc's mmap threshold fixed (so freed blocks go back to the OS)
and reports the growth of the peak resident set (VmHWM) over the inputs, and
the wall time of the step. ``inputs_mb`` is the size of x_s, x_t, W_s, W_t.

    python benchmarks/bench_linear_memory.py                       # defaults below
    python benchmarks/bench_linear_memory.py --tokens 1024,4096 --vocab 8192
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

_WORKER = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[6]))
from divergent.losses.linear import LinearDistillationLoss
from divergent.losses.modules import DistillationLoss

def vm_hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

mode, n, vocab, hidden, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
gen = torch.Generator().manual_seed(0)
x_s = torch.randn(n, hidden, generator=gen).requires_grad_(True)
w_s = (torch.randn(vocab, hidden, generator=gen) * 0.05).requires_grad_(True)
x_t, w_t = torch.randn(n, hidden, generator=gen), torch.randn(vocab, hidden, generator=gen) * 0.05
labels = torch.randint(0, vocab, (n,), generator=gen)
fused = LinearDistillationLoss("js", chunk_size=chunk, hard_weight=0.5, soft_weight=0.5)
unfused = DistillationLoss("js", hard_weight=0.5, soft_weight=0.5)

def step():
    if mode == "fused":
        loss = fused(x_s, w_s, x_t, w_t, labels)
    else:
        loss = unfused(x_s @ w_s.T, x_t @ w_t.T, labels)
    loss.backward()
    return float(loss)

# Warm up on 8 tokens: one-time allocations (kernels, thread pools) are not counted.
fused(x_s[:8], w_s, x_t[:8], w_t, labels[:8]).backward()
x_s.grad = w_s.grad = None
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset VmHWM to the current resident set
before = vm_hwm_mb()
start = time.perf_counter()
loss = step()
seconds = time.perf_counter() - start
print(json.dumps({"peak_growth_mb": vm_hwm_mb() - before, "step_s": seconds, "loss": loss}))
"""


def measure(mode: str, tokens: int, vocab: int, hidden: int, chunk: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, mode, str(tokens), str(vocab), str(hidden), str(chunk), str(threads)],
        env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1024,2048,4096,8192,16384", help="comma-separated token counts")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unfused-max-tokens", type=int, default=4096,
                        help="skip the unfused loss above this many tokens (its logits alone are N*V*4 bytes)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_linear_memory.csv"))
    args = parser.parse_args()

    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        inputs_mb = (2 * tokens * args.hidden + 2 * args.vocab * args.hidden) * 4 / 2**20
        for mode in ("unfused", "fused"):
            if mode == "unfused" and tokens > args.unfused_max_tokens:
                continue
            result = measure(mode, tokens, args.vocab, args.hidden, args.chunk_size, args.threads)
            row = {"mode": mode, "tokens": tokens, "vocab": args.vocab, "hidden": args.hidden,
                   "chunk_size": args.chunk_size if mode == "fused" else "", "inputs_mb": round(inputs_mb, 1),
                   "logits_mb": round(tokens * args.vocab * 4 / 2**20, 1),
                   "peak_growth_mb": round(result["peak_growth_mb"], 1), "step_s": round(result["step_s"], 3),
                   "loss": round(result["loss"], 6)}
            rows.append(row)
            print(row, flush=True)
    path = write_results(rows, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
