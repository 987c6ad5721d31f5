"""`distill-lm --seeds` on tiny Hugging Face models: do the LLM-distillation papers' claims show up?

The same code path as the command (:func:`divergent.experiments.lm.run_distill_lm` with
``seeds``), on the tiny Llamas the tests build (``tests/lm_helpers.py``: a byte-level BPE
tokenizer of 300 tokens; teacher hidden 64 × 2 layers, student hidden 32 × 1 layer) and
prompt–completion data with a checkable answer (``"what is 3 plus 4?"`` → ``" 3 plus 4 is
7."``). The teacher is first trained on the data alone (cross-entropy) so that it has
something to teach; the student starts from its random initial weights on every seed (the
seed changes the batch order and sampling). Every divergence row, the student alone and the
teacher are evaluated on the same held-out rows: evaluation loss, KL to the teacher, and
generation on the held-out prompts — ROUGE-L against the reference completion and against
the teacher's greedy generation, distinct-n, and the ``exact`` reward (the completion equals
the reference).

The claims checked, each reported as it falls (paired by seed, marked only beyond the seed
spread and one held-out prompt — the rule of :mod:`divergent.experiments.verdict`):
MiniLLM (Gu et al. 2024) and DistiLLM (Ko et al. 2024) report reverse KL / skew KL above
forward KL on generation (ROUGE-L), ABKD (Wang et al. 2025) the AB-divergence above both.
These papers trained GPT-2/OPT/LLaMA students on instruction data; this is a toy regime, so
a disagreement says the claim does not carry over here, not that a paper is wrong.

Writes ``benchmarks/results/lm_compare_tiny_hf.csv`` (the summary rows, with command and
machine) and ``benchmarks/results/lm_compare_tiny_hf.md`` (the report's table and verdict).

Usage (one thread)::

    python benchmarks/lm_compare_tiny_hf.py                     # seeds 0,1,2
    python benchmarks/lm_compare_tiny_hf.py --seeds 0,1 --steps 60 --out-dir /tmp/tiny-hf
    python benchmarks/lm_compare_tiny_hf.py --divergences forward_kl,reverse_kl --on-policy 0,0.5,1 \
        --name lm_compare_tiny_hf_on_policy                    # GKD's λ as rows
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from harness import command_line, machine_description, write_results  # noqa: E402

import lm_helpers as H  # noqa: E402
from divergent.experiments.lm import DistillLMConfig, run_distill_lm  # noqa: E402

RESULTS = HERE / "results"
DIVERGENCES = ["forward_kl", "reverse_kl", "js", "tvd", "skew_kl", "alpha_beta"]


def arithmetic_rows(limit: int = 20) -> list[dict[str, str]]:
    return [{"prompt": f"what is {a} plus {b}?", "completion": f" {a} plus {b} is {a + b}."}
            for a in range(limit) for b in range(limit)]


def trained_teacher(folder: Path, data: Path, steps: int, console) -> Path:
    """The tiny Llama teacher trained on the data alone (cross-entropy), saved with its tokenizer."""
    from divergent.data.lm_data import load_lm_data
    from divergent.models.hf import save_pretrained
    from divergent.train.lm import ExampleSource, LMDistillConfig, LMTrainer
    from divergent.train.run import Checkpointer, drive

    tokenizer = H.tokenizer(300)
    teacher = H.llama(len(tokenizer), 64, 2, seed=1)
    rows = load_lm_data(str(data), tokenizer, eval_fraction=0.1, max_length=64, seed=0)
    config = LMDistillConfig(steps=steps, batch_size=16, lr=3e-3, hard_weight=1.0, soft_weight=0.0, seed=1000,
                             warmup_steps=10)
    trainer = LMTrainer(teacher, None, ExampleSource(rows.train, seed=1000, pad_token_id=tokenizer.pad_token_id),
                        config, device="cpu", pad_token_id=tokenizer.pad_token_id)
    drive(trainer, checkpointer=Checkpointer(folder / "checkpoints", keep=1), checkpoint_every=steps, resume=False)
    save_pretrained(teacher, folder / "teacher", tokenizer=tokenizer)
    student = H.llama(len(tokenizer), 32, 1, seed=0)
    student.save_pretrained(folder / "student")
    tokenizer.save_pretrained(folder / "student")
    console.print(f"teacher trained {steps} steps")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--divergences", default=",".join(DIVERGENCES))
    parser.add_argument("--on-policy", default="", help="GKD λ values as rows, e.g. 0,0.5,1 (default: none)")
    parser.add_argument("--name", default="lm_compare_tiny_hf", help="stem of the results files")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from divergent.experiments import report

    console = report.output_console()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out_dir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        data = H.write_jsonl(root / "arithmetic.jsonl", arithmetic_rows())
        trained_teacher(root, data, args.teacher_steps, console)
        config = DistillLMConfig(
            teacher=str(root / "teacher"), student=str(root / "student"), data=str(data), eval_fraction=0.1,
            max_length=64, divergences=args.divergences.split(","),
            on_policy_fractions=[float(v) for v in args.on_policy.split(",") if v], seeds=[int(s) for s in args.seeds.split(",")],
            steps=args.steps, batch_size=16, generation_prompts=40, max_new_tokens=12, reward="exact",
            reward_timeout=0, evaluations=5, num_threads=1, device="cpu", output_dir=str(root / "runs"))
        results = run_distill_lm(config, console=console, command=command_line())
        seconds = time.perf_counter() - started
        rows = [{k: v for k, v in entry.items()} for entry in results["summary"]]
        RESULTS.mkdir(exist_ok=True)
        write_results(rows, RESULTS / f"{args.name}.csv", command=command_line())
        report_text = (Path(results["run_dir"]) / "report.md").read_text()
        table = report_text.split("## Results\n\n", 1)[1].split("\n\n", 1)[0]
        (RESULTS / f"{args.name}.md").write_text(
            f"<!-- {command_line()} | {machine_description()} | {seconds:.0f} s -->\n\n"
            f"{results['verdict']['text']}\n\n{table}\n\nTeacher: {json.dumps({k: round(v, 4) for k, v in results['teacher'].items() if isinstance(v, float)})}\n")
        console.print(f"wrote {RESULTS / args.name}.csv and .md in {seconds:.0f} s")


if __name__ == "__main__":
    main()
