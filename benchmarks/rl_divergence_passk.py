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
    python benchmarks/rl_divergence_passk.py --hf --seeds 0,1,2     # the same on a Hugging Face model

``--hf`` goes through the path a user takes with their own model (``divergent rl --model
PATH --prompts FILE --reward exact --compare``): a tiny Llama (2 layers, hidden 64, a byte
tokenizer trained with ``tokenizers``) is built from a config, fine-tuned briefly on
arithmetic prompt/answer pairs so that rewards are not all zero, saved with
``save_pretrained``; the prompts are written as JSON Lines; then
:func:`divergent.experiments.rl.run_comparison` runs the four regularisers over the seeds
(the same initial model for every seed; seeds change the GRPO sampling and prompt order).
Results: ``benchmarks/results/rl_divergence_passk_hf.csv`` / ``_summary.csv`` / ``.md``.
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


def _hf_model_and_prompts(folder: Path, *, max_operand: int, n_test: int, sft_steps: int, seed: int = 0):
    """A tiny Llama and byte tokenizer fine-tuned on ``a+b=`` → answer, saved in ``folder``; prompt files beside it."""
    import json
    import random

    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(0).shuffle(rows)
    test, train = rows[:n_test], rows[n_test:]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # As many entries as bytes plus the specials: no merges, one token per character.
    tok.train_from_iterator([r["prompt"] + r["answer"] for r in rows], trainers.BpeTrainer(
        vocab_size=259, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    for _ in range(sft_steps):  # teacher-forced cross-entropy on the answers (+ EOS) only
        batch = rng.sample(train, 64)
        sequences = [(tokenizer(r["prompt"])["input_ids"], tokenizer(r["answer"])["input_ids"] + [2]) for r in batch]
        width = max(len(p) + len(a) for p, a in sequences)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for i, (p, a) in enumerate(sequences):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=ids, attention_mask=(ids != 0) | (labels != -100), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    for name, part in (("train.jsonl", train), ("test.jsonl", test)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder / "model", folder / "train.jsonl", folder / "test.jsonl", float(loss)


def run_hf(args, seeds: list[int]) -> None:
    """The comparison on a Hugging Face model through the user's path (see the module docstring)."""
    from rich.console import Console

    run_dir = args.run_dir or report.make_run_dir("runs", "bench-rl-passk-hf")
    model, train, test, sft_loss = _hf_model_and_prompts(run_dir, max_operand=args.hf_max_operand,
                                                        n_test=args.hf_test, sft_steps=args.hf_sft_steps)
    print(f"fine-tuned the tiny Llama for {args.hf_sft_steps} steps (last loss {sft_loss:.3f})")
    config = RLConfig(model=str(model), prompts=str(train), test_prompts=str(test), reward="exact",
                      chat_template=False, compare=True, seeds=seeds, steps=args.steps, max_new_tokens=4,
                      prompts_per_step=16, group_size=8, lr=args.hf_lr, eval_samples=args.eval_samples,
                      dph_probe_prompts=256, num_threads=args.threads, checkpoint_every=args.steps)
    console = Console()
    setup = build_setup(config, console)
    try:
        out = run_comparison(setup, config, run_dir, resume=args.run_dir is not None, console=console)
    finally:
        setup.close()
    write_tables(out, seeds, f"rl_divergence_passk_hf{args.tag}", title="GRPO regularisers and pass@k on a tiny "
                 "Hugging Face Llama (user path: --model/--prompts/--reward exact)",
                 setting=(f"{config.steps} GRPO steps each, lr {config.lr}, 16 prompts x 8 samples; the model: Llama "
                          f"2 layers, hidden 64, fine-tuned {args.hf_sft_steps} supervised steps on `a+b=` with "
                          f"operands 0..{args.hf_max_operand}"),
                 held_out=f"{args.hf_test} prompts `a+b=` (operands 0..{args.hf_max_operand})",
                 eval_samples=args.eval_samples)


def write_tables(out, seeds, name, *, title, setting, held_out, eval_samples) -> None:
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
        f"# {title}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}  ",
        f"Wall time: {out['seconds'] / 60:.1f} min for {len(seeds)} seeds x 4 methods ({setting}).",
        "",
        "Mean ± std over seeds; `vs none` = paired mean difference to no regulariser on the same seeds "
        "and initial policy ± the std of the per-seed differences, `*` when it exceeds both that std and one "
        "held-out prompt (the rule of `divergent compare`). "
        f"Held-out: {held_out}, pass@k from {eval_samples} samples each (unbiased estimator).",
        "",
        report.markdown_table(summary, columns),
        "",
        f"Per-seed rows: `{name}.csv`. Interpretation: docs/rl.md.",
        "",
    ]))
    print(f"wrote {RESULTS / (name + '.csv')} and {RESULTS / (name + '.md')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps (default 150; 60 with --hf)")
    parser.add_argument("--warm-steps", type=int, default=400)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="one is fastest for this tiny policy")
    parser.add_argument("--run-dir", type=Path, default=None, help="resume a previous run folder")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--time-threads", default=None, help="only time GRPO steps for these thread counts, e.g. 1,2,1")
    parser.add_argument("--hf", action="store_true", help="run on a tiny Hugging Face Llama through --model/--prompts")
    parser.add_argument("--hf-max-operand", type=int, default=19)
    parser.add_argument("--hf-test", type=int, default=100, help="held-out prompts of the --hf run")
    parser.add_argument("--hf-sft-steps", type=int, default=150)
    parser.add_argument("--hf-lr", type=float, default=1e-3)
    args = parser.parse_args()
    if args.time_threads:
        time_threads([int(t) for t in args.time_threads.split(",")])
        return
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 3:
        print("warning: fewer than 3 seeds; differences will not be meaningful", file=sys.stderr)
    if args.hf:
        args.steps = args.steps or 60
        run_hf(args, seeds)
        return
    config = RLConfig(compare=True, seeds=seeds, steps=args.steps or GRPOConfig.steps, warm_steps=args.warm_steps,
                      eval_samples=args.eval_samples, num_threads=args.threads)
    run_dir = args.run_dir or report.make_run_dir("runs", "bench-rl-passk")
    from rich.console import Console

    setup = build_setup(config, Console())
    out = run_comparison(setup, config, run_dir, resume=args.run_dir is not None)
    write_tables(out, seeds, f"rl_divergence_passk{args.tag}", title="GRPO regularisers and pass@k on generated arithmetic",
                 setting=f"{config.steps} GRPO steps each, warm start {args.warm_steps} supervised steps",
                 held_out="200 problems `a+b=` (operands 0..99)", eval_samples=args.eval_samples)


if __name__ == "__main__":
    main()
