"""Does DDK's domain mixing close the student's gap to the teacher where it is weakest?

An embedded three-domain corpus from the Python standard library, by kind of text:

- ``code``: the top-level ``*.py`` files' source lines (comments and blank lines dropped);
- ``prose``: the English of their docstrings;
- ``tables``: the decoding tables of the ``encodings/cp*.py`` codecs (``'\\x0c'  #  0x0C -> FORM FEED``).

Each domain is cut into rows of 64 characters (bytes for the byte-level models). The teacher
(the default distill-lm teacher's architecture) is trained on all three domains; the student
(the default student's architecture) is pre-trained on ``code`` and ``prose`` only, so it
starts weak on ``tables``. Both are saved with ``save_pretrained`` and then, per seed, the
user's command runs with each mixing::

    divergent distill-lm --teacher T --student S --data corpus.jsonl --domain-column kind \\
        --mixing ddk|uniform|proportional --ddk-interval 20 -d forward_kl --hard-weight 1 --soft-weight 0.2

(DDK's loss: CE + 0.2 · forward KL at T = 1). The measure is each domain's gap to the teacher
after training, ln ppl_S − ln ppl_T (nats per byte) on the domain's held-out rows, and the
average over the domains; DDK against uniform mixing (``--mixings`` adds proportional) is the paired
difference over the seeds (:func:`divergent.experiments.report.paired_difference`: marked when
|mean| exceeds its spread over seeds). Writes ``benchmarks/results/ddk_mixing.csv`` (one row per
seed, mixing and domain), ``ddk_mixing_summary.csv``, ``ddk_mixing.md`` and
``ddk_mixing_weights.png`` (the first seed's DDK weights over the steps).

Usage::

    python benchmarks/ddk_mixing.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import shutil
import sys
import sysconfig
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import command_line, machine_description, write_results  # noqa: E402

from divergent.experiments import report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROW_CHARS = 64


def _windows(text: str, limit: int) -> list[str]:
    text = "".join(ch for ch in text if ord(ch) < 128)  # one byte per character: a row is 64 tokens
    return [text[i:i + ROW_CHARS] for i in range(0, min(len(text), limit * ROW_CHARS) - ROW_CHARS + 1, ROW_CHARS)]


def stdlib_domains(rows_per_domain: int) -> list[dict]:
    """``{"text", "kind"}`` rows of the three domains (see the module docstring), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    code, prose = [], []
    for path in sorted(root.glob("*.py")):
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    prose.append(" ".join(doc.split()))
        code.extend(line for line in source.splitlines() if line.strip() and not line.strip().startswith(("#", '"', "'")))
    tables = []
    for path in sorted((root / "encodings").glob("cp*.py")):
        tables.extend(line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                      if "0x" in line and "->" in line)
    texts = {"code": "\n".join(code), "prose": " ".join(prose), "tables": "\n".join(tables)}
    return [{"text": row, "kind": kind} for kind, text in texts.items() for row in _windows(text, rows_per_domain)]


def _pretrain(config: dict, examples: list[dict], steps: int, seed: int, folder: Path) -> Path:
    from divergent.models.gpt import GPTConfig, TinyGPT
    from divergent.models.hf import save_pretrained
    from divergent.train.lm import ExampleSource, LMDistillConfig, LMTrainer
    from divergent.train.run import drive

    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(**config))
    settings = LMDistillConfig(steps=steps, batch_size=16, lr=3e-3, hard_weight=1.0, soft_weight=0.0, seed=seed)
    drive(LMTrainer(model, None, ExampleSource(examples, seed=seed), settings))
    save_pretrained(model, folder)
    return folder


def main() -> None:
    from divergent.data.lm_data import ByteTokenizer, tokenize_rows
    from divergent.experiments.lm import STUDENT_CONFIG, TEACHER_CONFIG, DistillLMConfig, run_distill_lm

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--mixings", default="uniform,ddk")
    parser.add_argument("--rows-per-domain", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--interval", type=int, default=20)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=100)
    parser.add_argument("--work", default=str(report.cache_dir() / "ddk-mixing"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    mixings = args.mixings.split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)

    rows = stdlib_domains(args.rows_per_domain)
    corpus = work / "stdlib_domains.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = {k: sum(1 for r in rows if r["kind"] == k) for k in ("code", "prose", "tables")}
    print(f"corpus: {counts} rows of {ROW_CHARS} bytes in {corpus}", flush=True)
    tokenizer = ByteTokenizer()
    everything, _ = tokenize_rows(rows, tokenizer, max_length=ROW_CHARS + 1)
    weak, _ = tokenize_rows([r for r in rows if r["kind"] != "tables"], tokenizer, max_length=ROW_CHARS + 1)
    teacher = _pretrain(TEACHER_CONFIG, everything, args.teacher_steps, 1000, work / f"teacher-{args.teacher_steps}")
    student = _pretrain(STUDENT_CONFIG, weak, args.student_steps, 2000, work / f"student-{args.student_steps}")

    per_run = []
    for seed in seeds:
        for mixing in mixings:
            config = DistillLMConfig(
                teacher=str(teacher), student=str(student), data=str(corpus), domain_column="kind", mixing=mixing,
                ddk_interval=args.interval, divergences=["forward_kl"], include_scratch=False, hard_weight=1.0,
                soft_weight=0.2, temperature=1.0, steps=args.steps, batch_size=16, max_length=ROW_CHARS + 1,
                max_eval_examples=64, evaluations=1, seed=seed, output_dir=str(work / "runs"), num_threads=args.threads)
            result = run_distill_lm(config)
            if seed == seeds[0] and mixing == "ddk":  # the first seed's weights over the steps, for docs/data.md
                shutil.copyfile(Path(result["run_dir"]) / "domain_weights.png", RESULTS / "ddk_mixing_weights.png")
            info = result["rows"][0]["domains"]
            total = sum(info["drawn"])
            for i, name in enumerate(info["names"]):
                per_run.append({"seed": seed, "mixing": mixing, "domain": name,
                                "teacher_ppl": info["teacher_ppl"][i], "student_ppl_before": info["before"][i],
                                "student_ppl_after": info["after"][i],
                                "gap_before": math.log(info["before"][i] / info["teacher_ppl"][i]),
                                "gap_after": math.log(info["after"][i] / info["teacher_ppl"][i]),
                                "drawn_share": info["drawn"][i] / total, "final_weight": info["final_weights"][i]})
            print(f"seed {seed} {mixing}: gaps after "
                  + ", ".join(f"{r['domain']} {r['gap_after']:.3f}" for r in per_run[-len(info['names']):]), flush=True)

    domains = sorted({r["domain"] for r in per_run})

    def gaps(mixing: str, domain: str | None) -> dict[int, float]:
        out = {}
        for seed in seeds:
            mine = [r["gap_after"] for r in per_run if r["seed"] == seed and r["mixing"] == mixing
                    and (domain is None or r["domain"] == domain)]
            out[seed] = sum(mine) / len(mine)
        return out

    summary = []
    for domain in [*domains, None]:
        label = domain or "average"
        entry = {"domain": label}
        for mixing in mixings:
            values = list(gaps(mixing, domain).values())
            mean, std = report.mean_std(values)
            entry[f"{mixing}_gap"] = f"{mean:.3f} ± {std:.3f}"
            shares = [r["drawn_share"] for r in per_run if r["mixing"] == mixing and r["domain"] == domain]
            if shares:
                entry[f"{mixing}_share"] = round(sum(shares) / len(shares), 3)
        for other in (m for m in mixings if m != "ddk"):
            if "ddk" in mixings:
                diff = report.paired_difference(gaps("ddk", domain), gaps(other, domain))
                entry[f"ddk_minus_{other}"] = (f"{diff['mean_diff']:+.3f} ± {diff['std_diff']:.3f}"
                                               + (" *" if diff["significant"] else ""))
        summary.append(entry)
    command = command_line()
    write_results(per_run, RESULTS / "ddk_mixing.csv", command)
    write_results(summary, RESULTS / "ddk_mixing_summary.csv", command)
    columns = list(summary[0])
    text = (f"# DDK vs uniform mixing on the stdlib domains\n\n`{command}`\n\n{machine_description()}\n\n"
            f"Gap to the teacher after training: ln ppl_S − ln ppl_T (nats per byte) on each domain's held-out rows, "
            f"mean ± std over seeds {seeds}; `*`: the paired difference exceeds its spread over the seeds. "
            f"share: fraction of the training rows drawn from the domain. Corpus rows: {counts}.\n\n"
            + report.markdown_table(summary, columns) + "\n")
    (RESULTS / "ddk_mixing.md").write_text(text)
    report.print_table(summary, columns, title="DDK vs uniform: gap to the teacher (nats/byte)")


if __name__ == "__main__":
    main()
