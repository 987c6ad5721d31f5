"""Does the GRPO regulariser keep pass@k? none / reverse KL / DPH forward KL / DPH JS on arithmetic.

Runs ``divergent rl --compare`` (same code path: :func:`divergent.cli.rl.run_comparison`)
over several seeds, each seed with its own warm-started TinyGPT shared by all
methods, and writes

- ``benchmarks/results/rl_divergence_passk.csv``: one row per (method, seed) with
  pass@k for k = 1..n, distinct correct answers, mean length, training time;
- ``benchmarks/results/rl_divergence_passk_summary.csv``: mean ± std per method and the
  paired difference to no regulariser;
- ``benchmarks/results/rl_divergence_passk.md``: the summary table.

Usage::

    python benchmarks/rl_divergence_passk.py --seeds 0,1,2
    python benchmarks/rl_divergence_passk.py --time-threads 1,2,1   # seconds per GRPO step vs torch threads
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import command_line, machine_description, write_results  # noqa: E402

from divergent.experiments import report  # noqa: E402
from divergent.experiments.rl import REPORT_KS, RLConfig, build_setup, run_comparison  # noqa: E402
from divergent.data.arithmetic import ArithmeticTask  # noqa: E402
from divergent.train.rl import GRPOConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def time_threads(thread_counts: list[int], steps: int = 20) -> None:
    """Seconds per GRPO step of the default configuration for each torch thread count (in the order given)."""
    import time

    from divergent.experiments.rl import warm_started_policy
    from divergent.train.rl import GRPOTrainer

    task = ArithmeticTask(max_operand=99, operations="+", n_test=200, seed=0)
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        policy = warm_started_policy(task, seed=0, steps=400)
        started = time.perf_counter()
        GRPOTrainer(policy, task, GRPOConfig(steps=steps)).train()
        rows.append({"threads": threads, "steps": steps,
                     "seconds_per_step": round((time.perf_counter() - started) / steps, 4)})
        print(rows[-1])
    write_results(rows, RESULTS / "rl_threads.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=GRPOConfig.steps)
    parser.add_argument("--warm-steps", type=int, default=400)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="one is fastest for this tiny policy")
    parser.add_argument("--run-dir", type=Path, default=None, help="resume a previous run folder")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--time-threads", default=None, help="only time GRPO steps for these thread counts, e.g. 1,2,1")
    args = parser.parse_args()
    if args.time_threads:
        time_threads([int(t) for t in args.time_threads.split(",")])
        return
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 3:
        print("warning: fewer than 3 seeds; differences will not be meaningful", file=sys.stderr)
    task = ArithmeticTask(max_operand=99, operations="+", n_test=200, seed=0)
    config = GRPOConfig(steps=args.steps)
    run_dir = args.run_dir or report.make_run_dir("runs", "bench-rl-passk")
    out = run_comparison(task, config, run_dir, seeds=seeds, warm_steps=args.warm_steps,
                         eval_samples=args.eval_samples, resume=args.run_dir is not None)

    name = f"rl_divergence_passk{args.tag}"
    rows = []
    for r in out["results"]:
        row = {"method": r["method"], "seed": r["seed"]}
        row.update({f"pass@{k}": round(v, 5) for k, v in sorted(r["pass_at_k"].items())})
        row.update({"distinct_correct": r["distinct_correct"], "mean_length": round(r["mean_length"], 4),
                    "final_train_reward": round(r.get("final_train_reward", float("nan")), 4),
                    "rehearsal_size": r.get("rehearsal_size"),
                    "train_seconds": round(r.get("train_seconds", 0.0), 1)})
        rows.append(row)
    command = command_line()
    write_results(rows, RESULTS / f"{name}.csv", command)
    columns = ["method", "seeds"] + [f"pass@{k}" for k in REPORT_KS] + \
        ["distinct_correct", "mean_length", "pass@1 vs none", "pass@16 vs none"]
    summary = [{c: row.get(c) for c in columns} for row in out["summary"]]
    write_results(summary, RESULTS / f"{name}_summary.csv", command)
    (RESULTS / f"{name}.md").write_text("\n".join([
        "# GRPO regularisers and pass@k on generated arithmetic",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}  ",
        f"Wall time: {out['seconds'] / 60:.1f} min for {len(seeds)} seeds x 4 methods "
        f"({config.steps} GRPO steps each, warm start {args.warm_steps} supervised steps).",
        "",
        "Mean ± std over seeds; `vs none` = paired mean difference to no regulariser on the same seeds "
        "and warm start, `*` when it exceeds its own spread across seeds. "
        "Held-out: 200 problems `a+b=` (operands 0..99), pass@k from "
        f"{args.eval_samples} samples each (unbiased estimator).",
        "",
        report.markdown_table(summary, columns),
        "",
        f"Per-seed rows: `{name}.csv`. Interpretation: docs/rl.md.",
        "",
    ]))
    print(f"wrote {RESULTS / (name + '.csv')} and {RESULTS / (name + '.md')}")


if __name__ == "__main__":
    main()
