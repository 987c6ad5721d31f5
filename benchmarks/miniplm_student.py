"""MiniPLM's claim on ``refine-data``'s embedded default: a student pre-trained on the selected half
against one pre-trained on a random half, for the same steps.

1. ``divergent refine-data`` with no data (the same code path:
   :func:`divergent.experiments.refine.run_refine_data`): the default teacher and reference
   score the embedded corpus (hard, easy and noise rows) and keep the top half.
2. For each seed, two byte-level students (``REFERENCE_CONFIG``-sized GPT, the same initial
   weights) train on next-byte prediction alone (MiniPLM pre-trains the student on the refined
   corpus with the plain LM loss), ``--steps`` steps of ``--batch-size`` rows: one on the kept
   rows, one on a random half of the rows drawn with the seed (the same number of rows).
3. Both are evaluated on held-out rows of each part (drawn like the corpus, from other text):
   mean cross-entropy per byte (nats) per part, over the clean rows (hard and easy: the text a
   pre-trained student is for) and over all held-out rows (noise included).

The difference top − random per seed is summarised with compare's marking rule
(:func:`divergent.experiments.report.paired_difference`): "lower" / "higher" when the mean
difference exceeds its standard deviation across seeds, "within noise" otherwise.

Writes ``benchmarks/results/miniplm_student.csv`` (per seed and arm) and
``benchmarks/results/miniplm_student.md`` (the table in docs/data.md).

    python benchmarks/miniplm_student.py                  # seeds 0,1,2
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import command_line, machine_description, write_results  # noqa: E402

from divergent.experiments import report  # noqa: E402
from divergent.experiments.refine import REFERENCE_CONFIG, RefineDataConfig, default_corpus, run_refine_data  # noqa: E402
from divergent.io import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("hard", "easy", "noise")


def _examples(rows):
    return [{"input_ids": list(r["text"].encode()), "labels": list(r["text"].encode())} for r in rows]


def _train(rows, seed: int, steps: int, batch_size: int):
    from divergent.models.gpt import GPTConfig, TinyGPT
    from divergent.train.lm import ExampleSource, LMDistillConfig, LMTrainer
    from divergent.train.run import drive

    torch.manual_seed(1000)  # the same initial weights for both arms and every seed
    student = TinyGPT(GPTConfig(**REFERENCE_CONFIG))
    config = LMDistillConfig(steps=steps, batch_size=batch_size, lr=3e-3, hard_weight=1.0, soft_weight=0.0,
                             seed=seed, log_every=steps)
    drive(LMTrainer(student, None, ExampleSource(_examples(rows), seed=seed), config))
    return student.eval()


def _losses(student, held_out) -> dict[str, float]:
    from divergent.train.lm import evaluate_lm

    out = {part: evaluate_lm(student, _examples([r for r in held_out if r["domain"] == part]))["loss"] for part in PARTS}
    out["clean"] = evaluate_lm(student, _examples([r for r in held_out if r["domain"] != "noise"]))["loss"]
    out["all"] = evaluate_lm(student, _examples(held_out))["loss"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--default-rows", type=int, default=4000, help="Rows of the embedded corpus.")
    parser.add_argument("--out", default="miniplm_student", help="Name of the result files in benchmarks/results.")
    parser.add_argument("--out-dir", default=None, help="Where refine-data's run folder goes (default: a temporary folder).")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    config = RefineDataConfig(output_dir=args.out_dir or tempfile.mkdtemp(), num_threads=1, default_rows=args.default_rows)
    results = run_refine_data(config, console=report.output_console())
    import pyarrow.parquet as pq

    run_dir = Path(results["run_dir"])
    kept = pq.read_table(run_dir / "scores.parquet").column("kept").to_pylist()
    rows = [__import__("json").loads(line) for line in (run_dir / "input" / "corpus.jsonl").read_text().splitlines()]
    top = [r for r, k in zip(rows, kept) if k]
    held_out = default_corpus(config, {"hard": 300, "easy": 100, "noise": 100}, seed_offset=1)
    held_texts = {r["text"] for r in held_out} & {r["text"] for r in rows}
    held_out = [r for r in held_out if r["text"] not in held_texts]  # never a training row
    table, losses = [], {"top": {}, "random": {}}
    for seed in seeds:
        random_half = random.Random(seed).sample(rows, len(top))
        for arm, train_rows in (("top", top), ("random", random_half)):
            values = _losses(_train(train_rows, seed, args.steps, args.batch_size), held_out)
            losses[arm][seed] = values
            counts = {part: sum(r["domain"] == part for r in train_rows) for part in PARTS}
            table.append({"seed": seed, "arm": arm, **{f"loss_{k}": round(v, 4) for k, v in values.items()},
                          **{f"rows_{p}": counts[p] for p in PARTS}})
            print(table[-1], flush=True)
    summary = []
    for part in ("all", "clean", *PARTS):
        diff = report.paired_difference({s: losses["top"][s][part] for s in seeds},
                                        {s: losses["random"][s][part] for s in seeds})
        mean_top, std_top = report.mean_std([losses["top"][s][part] for s in seeds])
        mean_random, std_random = report.mean_std([losses["random"][s][part] for s in seeds])
        verdict = ("lower" if diff["mean_diff"] < 0 else "higher") if diff["significant"] else "within noise"
        summary.append({"held-out part": part, "top half": f"{mean_top:.4f} ± {std_top:.4f}",
                        "random half": f"{mean_random:.4f} ± {std_random:.4f}",
                        "top − random": f"{diff['mean_diff']:+.4f} ± {diff['std_diff']:.4f}",
                        "top half's loss": verdict})
    columns = list(summary[0])
    report.print_table(summary, columns, title=f"student on the top half vs a random half ({len(seeds)} seeds)")
    seconds = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    write_results(table, RESULTS / f"{args.out}.csv")
    kept_parts = {p: sum(r["domain"] == p for r in top) for p in PARTS}
    all_parts = {p: sum(r["domain"] == p for r in rows) for p in PARTS}
    text = "\n".join([
        f"<!-- command: {command_line()} -->", f"<!-- machine: {machine_description()}; {seconds:.0f} s -->", "",
        "Rows kept by refine-data's default (keep 0.5): " + ", ".join(
            f"{p} {kept_parts[p]}/{all_parts[p]}" for p in PARTS) + ".", "",
        f"Held-out loss (nats per byte; {len(held_out)} rows: "
        + ", ".join(f"{p} {sum(r['domain'] == p for r in held_out)}" for p in PARTS)
        + f") after {args.steps} steps of {args.batch_size} rows, mean ± std over seeds {args.seeds}:", "",
        report.markdown_table(summary, columns), "",
    ])
    atomic_write_text(RESULTS / f"{args.out}.md", text)
    print(text)


if __name__ == "__main__":
    main()
