"""The fused-linear benchmark runs end to end on CPU on a tiny shape and writes its CSV."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    lines = path.read_text().splitlines()
    comments = [line for line in lines if line.startswith("#")]
    return comments, list(csv.DictReader(line for line in lines if not line.startswith("#")))


def test_benchmark_writes_every_implementation_with_matching_losses(tmp_path, bench_fused_linear):
    torch.set_num_threads(1)
    output = tmp_path / "fused_linear.csv"
    bench_fused_linear.main(
        [
            "--device", "cpu", "--shape", "24,16,203", "--names", "js,forward_kl,cauchy_schwarz",
            "--dtype", "fp32", "--chunk-size", "10", "--topk", "5", "--repeats", "1", "--warmup", "0",
            "--output", str(output),
        ]
    )
    comments, rows = read_rows(output)
    assert comments[0].startswith("# command: python benchmarks/bench_fused_linear.py")
    assert comments[1].startswith("# machine:")
    seen = {(row["implementation"], row["divergence"]) for row in rows}
    expected = {("matmul_floor", "-")}
    expected |= {(impl, name) for impl in ("torch_full", "liger") for name in ("js", "forward_kl")}
    expected |= {(impl, name) for impl in ("ours", "ours_topk") for name in ("js", "forward_kl", "cauchy_schwarz")}
    assert seen == expected
    for row in rows:
        if row["implementation"] == "liger" and row["status"] != "ok":
            assert row["status"] == "liger_kernel not installed"
            continue
        assert row["status"] == "ok", row
        assert float(row["median_ms"]) > 0 and float(row["x_floor"]) > 0
    # The chunked loss equals the full-logits loss; a TopK teacher gives at most the full value.
    loss = {(row["implementation"], row["divergence"]): float(row["loss"]) for row in rows if row.get("loss")}
    for name in ("js", "forward_kl"):
        assert math.isclose(loss[("ours", name)], loss[("torch_full", name)], rel_tol=1e-5)
        assert 0 <= loss[("ours_topk", name)] <= loss[("ours", name)] * (1 + 1e-6)
        if ("liger", name) in loss:  # Liger's rows compute the same quantity
            assert math.isclose(loss[("liger", name)], loss[("ours", name)], rel_tol=1e-5)
