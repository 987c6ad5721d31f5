"""Teacher cache size: bytes per token and the KL change of compression (`cache-teacher --logprob-bits`).

For k = 32 and 64, `divergent cache-teacher` writes the default byte-level teacher's top-k over
the standard-library corpus (the same sequences each time) as float32 (the reference), float16
(today's default) and compressed at 8, 6 and 4 bits. Per cache: bytes/token (files on disk),
the mean and largest KL(p ‖ p̂) between the reference's and the cache's k + 1 buckets (p̂ what a
trainer reads), the largest bound the cache records, and the mean absolute change of the
distillation loss forward_kl(student ‖ TopK teacher) of an untrained student against the
float16 cache's value.

    python benchmarks/bench_teacher_cache.py --out benchmarks/results/teacher_cache_cpu.csv
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_results  # noqa: E402

import divergent as dv  # noqa: E402
from divergent.data.teacher_cache import TeacherCache  # noqa: E402
from divergent.experiments.lm import STUDENT_CONFIG, CacheTeacherConfig, run_cache_teacher  # noqa: E402
from divergent.models.gpt import GPTConfig, TinyGPT  # noqa: E402

STORAGE = [("float32", 0), ("float16", 0), ("float16", 8), ("float16", 6), ("float16", 4)]


def buckets(logprobs: torch.Tensor) -> torch.Tensor:
    """k + 1 bucket probabilities (the tail 1 − Σ top-k) in float64."""
    p = logprobs.double().exp()
    return torch.cat([p, (1 - p.sum(-1, keepdim=True)).clamp_min(0.0)], -1)


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), 0.0)
    return terms.sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="32,64")
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/teacher_cache_cpu.csv")
    args = parser.parse_args()
    console = Console(stderr=True)
    work = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    torch.manual_seed(0)
    student = TinyGPT(GPTConfig(**STUDENT_CONFIG)).eval()
    rows = []
    for k in [int(x) for x in args.ks.split(",")]:
        caches = {}
        for dtype, bits in STORAGE:
            folder = work / f"k{k}-{dtype}-{bits}"
            run_cache_teacher(CacheTeacherConfig(k=k, logprob_dtype=dtype, logprob_bits=bits,
                                                 max_sequences=args.sequences, num_threads=args.threads,
                                                 output_dir=str(folder), device="cpu"), console=console)
            caches[(dtype, bits)] = TeacherCache(folder)
        reference = caches[("float32", 0)]
        ids, labels, ref_teacher = reference.get(range(len(reference)))
        with torch.no_grad():
            student_logits = student(ids)
        mask = labels != -100
        ref_buckets = buckets(ref_teacher.logprobs)[mask]
        fp16_loss = None
        for (dtype, bits), cache in caches.items():
            _, _, teacher = cache.get(range(len(cache)))
            assert torch.equal(teacher.indices, ref_teacher.indices)
            kl = kl_rows(ref_buckets, buckets(teacher.logprobs)[mask])
            loss = dv.functional.forward_kl(student_logits, teacher, mask=mask, reduction="none")[mask].double()
            if (dtype, bits) == ("float16", 0):
                fp16_loss = loss
            rows.append({"k": k, "storage": f"{bits}-bit" if bits else dtype, "index_bits":
                         (cache.compression or {}).get("index_bits", 16),
                         "bytes_per_token": round(cache.bytes_per_token, 1),
                         "kl_to_float32_mean": f"{float(kl.mean()):.3g}", "kl_to_float32_max": f"{float(kl.max()):.3g}",
                         "kl_bound_max": f"{(cache.compression or {}).get('kl_bound_max', float('nan')):.3g}",
                         "loss": loss})
        for row in rows[-len(caches):]:
            row["student_kl_change_vs_float16"] = f"{float((row.pop('loss') - fp16_loss).abs().mean()):.3g}"
            row["tokens"] = int(mask.sum())
            console.print(row)
    write_results(rows, args.out)
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
