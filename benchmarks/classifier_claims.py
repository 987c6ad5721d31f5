"""The seed papers' classifier claims, measured on `divergent compare`'s embedded default.

Each claim is a paired comparison of two rows of one `divergent compare` run (the same
code path as the command: :func:`divergent.experiments.compare.run_compare`), on the
default regime — digits, teacher cnn-32 trained on every label, student mlp-32 seeing
10% of the labels — over several seeds, every row on the same seeds and split:

- BD-KD (Amara et al., arXiv 2212.12965): online BD-KD vs KD, accuracy up and ECE down;
  also vs DML (the online baseline) and the offline `bdkd` divergence vs forward KL at the
  same temperature and weights;
- DKD (Zhao et al. 2022) vs KD: accuracy up;
- PS-KD (Kim et al. 2021) vs the same network trained with CE: ECE down (and accuracy up);
- NKD (Yang et al. 2023) vs KD: accuracy up;
- SinKD (Cui et al. 2024) vs KD: accuracy up.

KD is Hinton KD with mdistiller's recipe (row ``hinton``: T = 4, CE 0.1, KD 0.9). For every
claim the measured paired difference (row − reference) is the mean over seeds of the
per-seed difference ± its standard deviation; it "agrees" when it points the paper's way
and exceeds both its standard deviation and one test example, is "opposite" when it
exceeds both the other way, and is "within noise" otherwise. Each claim is reported
whichever way it falls. The papers measured on CIFAR/ImageNet (GLUE for SinKD) with large
networks; this is a small student on 10% of the digits labels — a different regime, so a
disagreement says the claim does not carry over here, not that the paper is wrong.

Writes ``benchmarks/results/classifier_claims.csv`` (one row per claim, with the command and
machine) and ``benchmarks/results/classifier_claims.md`` (the table in docs/compare.md).

Usage (one thread; 412 s for 10 seeds on the shared 2-core machine at a load average of about 3)::

    python benchmarks/classifier_claims.py                 # seeds 0..9
    python benchmarks/classifier_claims.py --seeds 0,1,2,3,4 --out-dir /tmp/claims
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import command_line, machine_description, write_results  # noqa: E402

from divergent.experiments import report  # noqa: E402
from divergent.experiments.compare import NO_TEACHER, CompareConfig, run_compare  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# (claim, paper, row, reference, metric, paper's direction: +1 = the row's metric is higher)
CLAIMS = [
    ("BD-KD: accuracy above KD", "Amara et al. 2022, arXiv 2212.12965", "bdkd-online", "hinton", "accuracy", +1),
    ("BD-KD: ECE below KD", "Amara et al. 2022, arXiv 2212.12965", "bdkd-online", "hinton", "ece", -1),
    ("BD-KD: accuracy above DML (online baseline)", "Amara et al. 2022", "bdkd-online", "dml", "accuracy", +1),
    ("BD-KD: ECE below DML (online baseline)", "Amara et al. 2022", "bdkd-online", "dml", "ece", -1),
    ("BD divergence: accuracy above forward KL (offline, same T and weights)", "Amara et al. 2022 (student loss)",
     "bdkd", "forward_kl", "accuracy", +1),
    ("BD divergence: ECE below forward KL (offline, same T and weights)", "Amara et al. 2022 (student loss)",
     "bdkd", "forward_kl", "ece", -1),
    ("DKD: accuracy above KD", "Zhao et al. 2022 (CVPR)", "dkd", "hinton", "accuracy", +1),
    ("PS-KD: ECE below CE", "Kim et al. 2021 (ICCV)", "pskd", NO_TEACHER, "ece", -1),
    ("PS-KD: accuracy above CE", "Kim et al. 2021 (ICCV)", "pskd", NO_TEACHER, "accuracy", +1),
    ("NKD: accuracy above KD", "Yang et al. 2023 (ICCV)", "nkd", "hinton", "accuracy", +1),
    ("SinKD: accuracy above KD", "Cui et al. 2024", "sinkhorn-with-KD", "hinton", "accuracy", +1),
]


def claims_config(seeds: list[int], output_dir: str) -> CompareConfig:
    """The embedded default with the rows the claims need (every other setting is the default)."""
    return CompareConfig(divergences=["forward_kl", "bdkd"],
                         methods=["hinton", "dkd", "nkd", "sinkhorn-with-KD", "pskd", "dml", "bdkd-online"],
                         baseline="hinton", seeds=seeds, output_dir=output_dir, num_threads=1)


def measure(results: dict) -> list[dict]:
    """One row per claim: the paired difference (row − reference) over seeds and whether it agrees."""
    one_example = results["verdict"]["one_example"]  # 1 / number of test examples
    by_row: dict[str, dict[int, dict]] = {}
    for run in results["runs"]:
        if run["status"] == "finished":
            by_row.setdefault(run["name"], {})[run["seed"]] = run
    out = []
    for claim, paper, row, reference, metric, direction in CLAIMS:
        paired = report.paired_difference({s: r[metric] for s, r in by_row[row].items()},
                                          {s: r[metric] for s, r in by_row[reference].items()}, resolution=one_example)
        mean, std = paired["mean_diff"], paired["std_diff"]
        if not paired["significant"]:
            verdict = "within noise"
        else:
            verdict = "agrees" if (mean > 0) == (direction > 0) else "opposite"
        out.append({
            "claim": claim, "paper": paper, "row": row, "reference": reference, "metric": metric,
            "paper_direction": "higher" if direction > 0 else "lower",
            "row_mean": report.mean_std([r[metric] for r in by_row[row].values()])[0],
            "reference_mean": report.mean_std([r[metric] for r in by_row[reference].values()])[0],
            "paired_diff_mean": mean, "paired_diff_std": std, "seeds": paired["n"],
            "one_test_example": one_example, "measured": verdict,
        })
    return out


def markdown(rows: list[dict], seconds: float, machine: str) -> str:
    lines = ["| claim (paper) | row − reference | paper says | measured Δ (mean ± std over seeds) | agrees? |",
             "|---|---|---|---|---|"]
    for r in rows:
        digits = 4 if r["metric"] == "accuracy" else 3
        lines.append(
            f"| {r['claim']} ({r['paper']}) | `{r['row']}` − `{r['reference']}` | {r['metric']} {r['paper_direction']} | "
            f"{r['paired_diff_mean']:+.{digits}f} ± {r['paired_diff_std']:.{digits}f} "
            f"({r['row_mean']:.{digits}f} vs {r['reference_mean']:.{digits}f}) | {r['measured']} |")
    seeds = rows[0]["seeds"]
    lines += ["", f"{seeds} seeds, paired by seed; one test example = {rows[0]['one_test_example']:.4f}; "
                  f"{seconds:.0f} s on {machine}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default=",".join(str(s) for s in range(10)), help="comma-separated seeds (>= 5)")
    parser.add_argument("--out-dir", default="", help="where the compare run folder goes (default: a temporary folder)")
    parser.add_argument("--results", default=str(RESULTS), help="folder for classifier_claims.csv/.md")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if len(seeds) < 5:
        parser.error(f"--seeds needs at least 5 seeds for a claim to be tested, got {seeds}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        results = run_compare(claims_config(seeds, args.out_dir or scratch))
    seconds = time.perf_counter() - started
    rows = measure(results)
    machine = machine_description()
    out = Path(args.results)
    write_results(rows, out / "classifier_claims.csv", command=command_line())
    (out / "classifier_claims.md").write_text(markdown(rows, seconds, machine))
    print(markdown(rows, seconds, machine))


if __name__ == "__main__":
    main()
