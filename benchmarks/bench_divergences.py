"""Forward+backward time and peak memory of every divergence, beside torch's kl_div.

    python benchmarks/bench_divergences.py                 # [4096, 32000] float32, CPU
    python benchmarks/bench_divergences.py --rows 512      # quicker

Each divergence is timed right after a fresh timing of the baseline
``F.kl_div(log_softmax(s), log_softmax(t), log_target=True)`` (forward + backward),
and the ratio is taken against that neighbouring baseline, so that drift in the
machine's load affects both sides alike. Peak memory is measured in a fresh
process per case (growth of the peak resident set during one forward+backward,
inputs excluded). Sinkhorn, which couples the rows of a batch, is compared with
POT's ``ot.sinkhorn2`` (torch backend, autograd through the iterations) at equal
iterations on B = 256 rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import peak_memory_mb, time_fn, write_results  # noqa: E402

import divergent as dv  # noqa: E402


def make_inputs(rows: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=g) * 2).requires_grad_(True)
    teacher = torch.randn(rows, vocab, generator=g) * 2
    return student, teacher


def baseline_step(student, teacher):
    student.grad = None
    loss = F.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True,
                    reduction="batchmean")
    loss.backward()


def divergence_step(name, student, teacher, **params):
    student.grad = None
    dv.divergence(name, student, teacher, **params).backward()


def pot_step(student, teacher, epsilon, n_iters, method):
    import ot

    student.grad = None
    q, p = torch.softmax(student, -1), torch.softmax(teacher, -1)
    n = q.shape[0]
    cost = torch.cdist(q, p, p=1)
    marginal = torch.full((n,), 1.0 / n)
    loss = ot.sinkhorn2(marginal, marginal, cost, epsilon, method=method, numItermax=n_iters, stopThr=0.0)
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sinkhorn-rows", type=int, default=256)
    parser.add_argument("--sinkhorn-vocab", type=int, default=1000)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case memory measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cases", default=None, help="comma-separated divergences (default: all; sinkhorn runs only when listed or by default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "divergences_cpu.csv")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows_out = []
    student, teacher = make_inputs(args.rows, args.vocab)
    shape = f"{args.rows}x{args.vocab}"
    threads = torch.get_num_threads()

    def memory(step, *extra):
        if args.no_memory:
            return float("nan")
        return peak_memory_mb(lambda: (lambda s, t: (lambda: step(*extra, s, t)))(*make_inputs(args.rows, args.vocab)))

    base_memory = memory(baseline_step)
    cases = dv.available() if args.cases is None else [c.strip() for c in args.cases.split(",")]
    for name in cases:
        if not dv.get_spec(name).per_row:
            continue
        base = time_fn(lambda: baseline_step(student, teacher), repeats=args.repeats, warmup=1)
        ours = time_fn(lambda: divergence_step(name, student, teacher), repeats=args.repeats, warmup=1)
        row = {
            "case": name, "shape": shape, "threads": threads, "median_ms": round(ours["median_ms"], 1),
            "kl_div_median_ms": round(base["median_ms"], 1),
            "time_ratio_vs_kl_div": round(ours["median_ms"] / base["median_ms"], 2),
            "peak_mb": round(memory(divergence_step, name), 1), "kl_div_peak_mb": round(base_memory, 1),
        }
        rows_out.append(row)
        print(row, flush=True)

    if "sinkhorn" not in cases:
        cases = []
    # Sinkhorn vs POT at equal iterations
    s_small, t_small = make_inputs(args.sinkhorn_rows, args.sinkhorn_vocab, seed=1)
    sshape = f"{args.sinkhorn_rows}x{args.sinkhorn_vocab}"
    for n_iters in ((20, 100) if cases else ()):
        ours = time_fn(lambda: divergence_step("sinkhorn", s_small, t_small, n_iters=n_iters), repeats=args.repeats)
        for method in ("sinkhorn", "sinkhorn_log"):
            try:
                pot = time_fn(lambda: pot_step(s_small, t_small, 0.1, n_iters, method), repeats=args.repeats)
            except ImportError:
                print("POT is not installed: pip install pot", flush=True)
                break
            row = {
                "case": f"sinkhorn n_iters={n_iters} vs POT {method}", "shape": sshape, "threads": threads,
                "median_ms": round(ours["median_ms"], 2), "pot_median_ms": round(pot["median_ms"], 2),
                "time_ratio_vs_pot": round(ours["median_ms"] / pot["median_ms"], 2),
            }
            rows_out.append(row)
            print(row, flush=True)

    path = write_results(rows_out, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
