"""The throughput benchmark script runs and writes a CSV with its provenance header (tiny settings)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_script_writes_csv_with_command_and_machine(tmp_path):
    out = tmp_path / "bench.csv"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_classifier_throughput.py"), "--methods", "ce,forward_kl",
         "--threads", "1", "--epochs", "1", "--repeats", "1", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("# command: python") and lines[1].startswith("# machine:")
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert [r["method"] for r in rows] == ["ce", "forward_kl"]
    assert all(float(r["samples_per_s"]) > 0 for r in rows)
