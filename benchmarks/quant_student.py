"""KL-Top's use case (OSTQuant) on the embedded default: a weight-quantized copy of a model distilled from
its full-precision self, ``divergent distill-lm --teacher T --student T --student-quant int8|int4``.

1. T is the default byte-level GPT teacher (``--teacher-steps`` steps on the standard-library corpus,
   cached: :func:`divergent.experiments.lm.default_teacher`).
2. Before training: the fake-quantized T (:mod:`divergent.models.fake_quant`) on the held-out bytes.
3. For each bit width and seed, ``distill-lm`` (:func:`divergent.experiments.lm.run_distill_lm`, the
   command's code) trains the quantized copy ``--steps`` steps: on the data alone (``scratch``, CE) and
   distilled with forward KL and with KL-Top (``kl_top``, the teacher's top ``--kl-top-k`` bytes: 8 of 256
   is about OSTQuant's 1000 of a 32k vocabulary; the partial sum, the released scripts' default).
4. Held-out perplexity and KL(T || student) per row, mean ± sd over the seeds.

Writes ``benchmarks/results/quant_student.csv`` (per run) and ``benchmarks/results/quant_student.md``.

    python benchmarks/quant_student.py                      # int8,int4; seeds 0,1,2; 100 steps
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import command_line, machine_description, write_results  # noqa: E402

from divergent.data.lm_data import ByteTokenizer  # noqa: E402
from divergent.experiments import lm  # noqa: E402
from divergent.io import atomic_write_text  # noqa: E402
from divergent.models.fake_quant import quant_bits, quantize_linears  # noqa: E402
from divergent.train.lm import evaluate_lm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", default="int8,int4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kl-top-k", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "quant_student"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    divergences = ["forward_kl", "kl_top"]
    base = lm.DistillLMConfig(teacher_steps=args.teacher_steps, seeds=[])
    train, evaluation, _, _ = lm._load_examples(base, ByteTokenizer())
    teacher, folder = lm.default_teacher(train, base, console=console)
    teacher.eval()

    rows = []
    for quant in args.quant.split(","):
        student = copy.deepcopy(teacher)
        quantize_linears(student, quant_bits(quant))
        before = evaluate_lm(student, evaluation, teacher=teacher, batch_size=base.eval_batch_size, byte_level=True)
        rows.append({"quant": quant, "seed": "", "model": "quantized, not trained", "divergence": "-",
                     "perplexity": before["perplexity"], "kl_teacher": before["kl_teacher"]})
        for seed in [int(s) for s in args.seeds.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                config = lm.DistillLMConfig(teacher=str(folder), student=str(folder), student_quant=quant,
                                            divergences=divergences, divergence_params={"kl_top": {"k": args.kl_top_k}},
                                            steps=args.steps, lr=args.lr, seed=seed,
                                            seeds=[], teacher_steps=args.teacher_steps, num_threads=args.threads,
                                            output_dir=tmp)
                result = lm.run_distill_lm(config, console=console)
            teacher_row = result["teacher"]
            for row in result["rows"]:
                rows.append({"quant": quant, "seed": seed, "model": row["model"], "divergence": row["divergence"],
                             "perplexity": row["perplexity"], "kl_teacher": row["kl_teacher"]})
    full = {"quant": "full precision", "seed": "", "model": "teacher", "divergence": "-",
            "perplexity": teacher_row["perplexity"], "kl_teacher": 0.0}
    rows.insert(0, full)
    command = command_line()
    write_results(rows, args.out + ".csv", command)

    lines = [f"`{command}` ({machine_description()}); teacher {folder.name}, {args.steps} steps, lr {args.lr}, "
             f"seeds {args.seeds}; held-out perplexity (bytes) and KL(teacher || student), mean ± sd over seeds.", "",
             "| weights | student | perplexity | KL(t‖s) |", "|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        name = row["model"] if row["divergence"] in ("-", None) else row["divergence"]
        name = f"kl_top (k={args.kl_top_k})" if name == "kl_top" else name
        groups.setdefault((row["quant"], "CE (scratch)" if name == "scratch" else name), []).append(row)
    for (quant, name), group in groups.items():
        cells = []
        for key in ("perplexity", "kl_teacher"):
            values = [float(r[key]) for r in group]
            sd = f" ± {statistics.stdev(values):.2g}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.4g}{sd}")
        lines.append(f"| {quant} | {name} | {cells[0]} | {cells[1]} |")
    atomic_write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    console.print("\n".join(lines))


if __name__ == "__main__":
    main()
