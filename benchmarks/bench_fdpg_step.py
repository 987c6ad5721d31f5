"""One f-DPG step against one `divergent rl` GRPO step on the same model, batch and generation length.

Both sample B = prompts x samples responses from the policy (TinyGPT of `divergent rl`'s
shape, 2 layers, d=128, byte vocabulary), score them, and take one AdamW step. GRPO runs with
its reverse-KL regulariser (one reference forward per sample); f-DPG adds one forward of the
base model a(x) per sample. Steps are timed alternately, side by side, and the CSV keeps the
medians and their ratio.

    python benchmarks/bench_fdpg_step.py --repeats 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import time_fn, write_results  # noqa: E402

from divergent.data.arithmetic import VOCAB_SIZE, ArithmeticTask
from divergent.models.gpt import GPTConfig, TinyGPT
from divergent.rl.rewards import RewardScorer, resolve_reward
from divergent.train.fdpg import FDPGConfig, FDPGTarget, FDPGTrainer
from divergent.train.rl import GRPOConfig, GRPOTrainer


def policy() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(vocab_size=VOCAB_SIZE, d_model=128, n_layers=2, n_heads=4, max_seq_len=32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fdpg_step_cpu.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = ArithmeticTask(max_operand=99, n_test=200, seed=0)
    steps = 10 * (args.repeats + 5)
    grpo = GRPOTrainer(policy(), task, GRPOConfig(steps=steps, prompts_per_step=args.prompts, group_size=args.samples,
                                                  max_new_tokens=args.max_new_tokens, regulariser="reverse_kl"))
    scorer = RewardScorer(resolve_reward("regex:7", "--constraint"), timeout=0)
    target = FDPGTarget("constraint", "--constraint regex:7", epsilon=1e-3,
                        score=lambda problems, texts: scorer([p.prompt for p in problems], list(texts), {}))
    fdpg = FDPGTrainer(policy(), task, task.train[:32], target,
                       FDPGConfig(steps=steps, prompts_per_step=args.prompts, samples_per_prompt=args.samples,
                                  max_new_tokens=args.max_new_tokens, eval_every=10**6, divergence="js"))
    fdpg.step()  # the initial evaluation runs before the first step: keep it out of the timings
    grpo.step()
    times = {"grpo": [], "fdpg": []}
    for _ in range(args.repeats):  # alternate, so that load on a shared machine hits both alike
        times["grpo"].append(time_fn(grpo.step, repeats=1, warmup=0)["median_ms"])
        times["fdpg"].append(time_fn(fdpg.step, repeats=1, warmup=0)["median_ms"])
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    rows = [{"trainer": name, "batch": args.prompts * args.samples, "max_new_tokens": args.max_new_tokens,
             "threads": args.threads, "median_ms": round(median[name], 2),
             "ratio_to_grpo": round(median[name] / median["grpo"], 3)} for name in ("grpo", "fdpg")]
    for row in rows:
        print(row)
    write_results(rows, args.out)


if __name__ == "__main__":
    main()
