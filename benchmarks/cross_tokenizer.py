"""A teacher with another tokenizer: `distill-lm --cross-tokenizer uld|gold` against scratch, over seeds.

Two byte-level BPE tokenizers are trained with `tokenizers` on the Python standard library's
source (the student's with --student-vocab tokens, the teacher's with --teacher-vocab), a tiny
Llama teacher is trained on that text in its own tokens, and then, for each seed, distill-lm
trains the same tiny student from the same initial weights with cross-entropy alone
(scratch) and with cross-entropy + ULD to the teacher (--cross-tokenizer uld,
hard_weight 1, soft_weight --uld-weight); with ``--modes uld,gold`` also with GOLD
(--cross-tokenizer gold, the shared vocabulary by --gold-divergence, merge --gold-strategy,
the same weights). Held-out loss is in the student's tokens.

    python benchmarks/cross_tokenizer.py --out benchmarks/results/cross_tokenizer_cpu.csv
    python benchmarks/cross_tokenizer.py --modes uld,gold --threads 1 --out benchmarks/results/cross_tokenizer_gold_cpu.csv

``--teacher DIR --student DIR`` reuse a teacher and an initial student written by an earlier
run (folders ``teacher-init``'s trained row and ``student`` of its work folder, printed at
the start), e.g. to run the seeds as parallel processes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_results  # noqa: E402

from divergent.data.text import decode_bytes, load_stdlib_corpus  # noqa: E402
from divergent.experiments.lm import DistillLMConfig, run_distill_lm  # noqa: E402

TRAIN_BYTES, VAL_BYTES = 300_000, 30_000


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def llama(vocab: int, hidden: int, layers: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--student-vocab", type=int, default=384)
    parser.add_argument("--teacher-vocab", type=int, default=768)
    parser.add_argument("--uld-weight", type=float, default=1.0, help="soft_weight of every cross-tokenizer row")
    parser.add_argument("--modes", default="uld", help="comma-separated cross-tokenizer modes, one row each")
    parser.add_argument("--gold-divergence", default="forward_kl", help="gold: the divergence on the shared vocabulary")
    parser.add_argument("--gold-strategy", default="observed", help="gold: observed or bayesian")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/cross_tokenizer_cpu.csv")
    parser.add_argument("--teacher", default="", help="a trained teacher folder to reuse (skips its training)")
    parser.add_argument("--student", default="", help="the initial student folder to reuse (with --teacher)")
    args = parser.parse_args()
    console = Console(stderr=True)
    corpus = load_stdlib_corpus(max_train_bytes=TRAIN_BYTES, max_val_bytes=VAL_BYTES)
    text = decode_bytes(corpus.train)
    work = Path(tempfile.mkdtemp(prefix="cross-tokenizer-"))
    console.print(f"work folder: {work}")
    common = dict(max_train_bytes=TRAIN_BYTES, max_val_bytes=VAL_BYTES, max_eval_examples=64, batch_size=16,
                  num_threads=args.threads, evaluations=2, device="cpu")

    if args.teacher:
        run_seeds(args, Path(args.teacher), Path(args.student), None, work, common, console)
        return
    student_tok, teacher_tok = train_tokenizer(text, args.student_vocab), train_tokenizer(text, args.teacher_vocab)
    folders = {}
    for name, tok, hidden, layers in (("teacher-init", teacher_tok, 128, 2), ("student", student_tok, 64, 1)):
        folders[name] = work / name
        llama(len(tok), hidden, layers, seed=0).save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    # The teacher: one row trained with cross-entropy alone (soft_weight 0) on the text in its own tokens.
    trained = run_distill_lm(DistillLMConfig(teacher=str(folders["teacher-init"]), student=str(folders["teacher-init"]),
                                             steps=args.teacher_steps, hard_weight=1.0, soft_weight=0.0,
                                             include_scratch=False, output_dir=str(work / "t"), **common),
                             console=console)
    (scratch_teacher,) = trained["rows"]
    teacher = scratch_teacher["model_dir"]
    console.print(f"teacher: eval loss {scratch_teacher['loss']:.3f} in its own tokens ({len(teacher_tok)} tokens), "
                  f"saved in {teacher}")
    run_seeds(args, Path(teacher), folders["student"], scratch_teacher["loss"], work, common, console)


def run_seeds(args, teacher: Path, student: Path, teacher_loss, work: Path, common: dict, console: Console) -> None:
    from divergent.models.hf import load_tokenizer

    student_tok, teacher_tok = load_tokenizer(student, "--student"), load_tokenizer(teacher, "--teacher")
    modes = args.modes.split(",")
    gold = dict(divergences=[args.gold_divergence], gold_strategy=args.gold_strategy)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        by_label = {}
        for i, mode in enumerate(modes):  # the scratch row once per seed, with the first mode
            result = run_distill_lm(DistillLMConfig(teacher=str(teacher), student=str(student), steps=args.steps,
                                                    cross_tokenizer=mode, hard_weight=1.0, soft_weight=args.uld_weight,
                                                    seed=seed, include_scratch=i == 0,
                                                    output_dir=str(work / f"s{seed}-{mode}"), **common,
                                                    **(gold if mode == "gold" else {})), console=console)
            by_label.update({r["label"]: r for r in result["rows"]})
        scratch = by_label["scratch"]["loss"]
        row = {"seed": seed, "scratch_eval_loss": round(scratch, 4)}
        for mode in modes:
            difference = "difference" if modes == ["uld"] else f"{mode}_difference"  # the first CSV's columns
            row.update({f"{mode}_eval_loss": round(by_label[mode]["loss"], 4),
                        difference: round(by_label[mode]["loss"] - scratch, 4)})
        row.update({"teacher_eval_loss_own_tokens": round(teacher_loss, 4) if teacher_loss is not None else "",
                    "student_vocab": len(student_tok), "teacher_vocab": len(teacher_tok), "steps": args.steps,
                    "teacher_steps": "" if args.teacher else args.teacher_steps, "uld_weight": args.uld_weight})
        if "gold" in modes:
            row.update(gold_divergence=args.gold_divergence, gold_strategy=args.gold_strategy)
        rows.append(row)
        console.print(rows[-1])
    for mode in modes:
        differences = [by_mode for r in rows for key, by_mode in r.items() if key.endswith("difference")
                       and (key == f"{mode}_difference" or modes == ["uld"])]
        spread = statistics.stdev(differences) if len(differences) > 1 else 0.0
        console.print(f"{mode} − scratch held-out loss: mean {statistics.mean(differences):+.4f} ± {spread:.4f} "
                      f"(sd over {len(rows)} seeds)")
    write_results(rows, args.out)
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
