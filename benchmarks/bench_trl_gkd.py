"""Benchmark: TRL's GKDTrainer vs divergent's LM distillation trainer, side by side on CPU.

Same tiny Hugging Face GPT-2 teacher and student (built from configs, vocabulary
``--vocab``), same data (windows of the Python standard library's source as
token ids), same batch, same number of steps, generalized JSD with beta = 0.5,
off-policy (λ = 0) so both run the same computation:

- ``trl``: ``trl.experimental.gkd.GKDTrainer`` (full [tokens, vocab] logits for
  student and teacher, ``generalized_jsd_loss``);
- ``divergent``: ``divergent.train.lm.train_lm_distillation`` with
  ``LinearDistillationLoss`` (output layer fused, chunked over tokens).

Each trainer runs in a fresh process with ``--threads`` torch threads. Reported:
counted tokens per second over the training loop, the process's peak resident
memory during training (``peak_rss_mb``; VmHWM reset once the models and data
are built) and its growth over that starting point (``train_growth_mb``), and
the JSD of the first batch computed by each library's loss (they must agree).

    python benchmarks/bench_trl_gkd.py                  # defaults below
    python benchmarks/bench_trl_gkd.py --vocab 8192 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

_WORKER = r"""
import json, sys, tempfile, time, warnings
import torch
warnings.filterwarnings("ignore")
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
import transformers
transformers.logging.set_verbosity_error()
from divergent.data.text import load_stdlib_corpus, random_windows

def vm_hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

def reset_hwm():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")

def gpt2(seed, width, layers, heads):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=layers, n_embd=width, n_head=heads, vocab_size=args["vocab"], n_positions=args["seq_len"] + 1,
        bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)

student = gpt2(0, args["student_width"], 2, 2)
teacher = gpt2(1, args["teacher_width"], 2, 4).eval()
corpus = load_stdlib_corpus(max_train_bytes=400_000, max_val_bytes=2_000)
n_sequences = args["steps"] * args["batch_size"]
# Sequences of seq_len + 1 tokens: both trainers predict seq_len tokens per sequence.
windows, _ = random_windows(corpus.train, n_sequences, args["seq_len"] + 1, torch.Generator().manual_seed(0))
tokens = args["steps"] * args["batch_size"] * args["seq_len"]

if args["framework"] == "trl":
    import datasets
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    vocab = {f"t{i}": i for i in range(args["vocab"])}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
                                        pad_token="t0", eos_token="t1", unk_token="t0")

    def collate(features):
        ids = torch.tensor([f["input_ids"] for f in features])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                "prompts": ids[:, :1], "prompt_attention_mask": torch.ones_like(ids[:, :1])}

    dataset = datasets.Dataset.from_dict({"input_ids": windows.tolist()})
    config = GKDConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args["batch_size"], max_steps=args["steps"],
        learning_rate=args["lr"], lmbda=0.0, beta=0.5, seq_kd=False, temperature=1.0, max_length=args["seq_len"] + 1,
        logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, seed=0, disable_dropout=True,
    )
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, data_collator=collate,
                         train_dataset=dataset, processing_class=tokenizer)
    batch = collate([dataset[i] for i in range(args["batch_size"])])
    with torch.no_grad():
        first_loss = float(GKDTrainer.generalized_jsd_loss(
            student(batch["input_ids"]).logits[:, :-1], teacher(batch["input_ids"]).logits[:, :-1],
            labels=batch["labels"][:, 1:], beta=0.5))
    reset_hwm()
    start_mb = vm_hwm_mb()
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
else:
    from divergent.losses.linear import LinearDistillationLoss
    from divergent.models.hf import hidden_and_logits, output_weight
    from divergent.train.lm import Batch, LMDistillConfig, train_lm_distillation

    def sample(step, n):
        rows = windows[step * n:(step + 1) * n]
        return Batch(rows[:, :-1], rows[:, 1:])

    ids = windows[: args["batch_size"]]
    with torch.no_grad():
        hidden_s, _ = hidden_and_logits(student, ids[:, :-1], compute_logits=False)
        hidden_t, _ = hidden_and_logits(teacher, ids[:, :-1], compute_logits=False)
        first_loss = float(LinearDistillationLoss("js", hard_weight=0.0, soft_weight=1.0, beta=0.5)(
            hidden_s, output_weight(student), hidden_t, output_weight(teacher), ids[:, 1:]))
    config = LMDistillConfig(
        divergence="js", divergence_params={"beta": 0.5}, hard_weight=0.0, soft_weight=1.0, steps=args["steps"],
        batch_size=args["batch_size"], seq_len=args["seq_len"], lr=args["lr"], warmup_steps=0, grad_clip=1.0,
        chunk_size=args["chunk_size"], fused=True)
    reset_hwm()
    start_mb = vm_hwm_mb()
    began = time.perf_counter()
    train_lm_distillation(student, teacher, sample, config, show_progress=False)
    seconds = time.perf_counter() - began
peak = vm_hwm_mb()
print(json.dumps({"tokens_per_s": tokens / seconds, "seconds": seconds, "peak_rss_mb": peak,
                  "train_growth_mb": peak - start_mb, "first_batch_jsd": first_loss}))
"""


def run(framework: str, args: argparse.Namespace) -> dict:
    payload = dict(framework=framework, vocab=args.vocab, seq_len=args.seq_len, batch_size=args.batch_size,
                   steps=args.steps, lr=args.lr, threads=args.threads, chunk_size=args.chunk_size,
                   student_width=args.student_width, teacher_width=args.teacher_width)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), MALLOC_MMAP_THRESHOLD_="65536",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(payload)], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{framework} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--student-width", type=int, default=64)
    parser.add_argument("--teacher-width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="alternate runs of each framework this many times")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_trl_gkd.csv"))
    args = parser.parse_args()

    rows = []
    for repeat in range(args.repeats):
        for framework in ("trl", "divergent"):
            result = run(framework, args)
            row = {"framework": framework, "repeat": repeat, "vocab": args.vocab, "seq_len": args.seq_len,
                   "batch_size": args.batch_size, "steps": args.steps, "threads": args.threads,
                   **{k: round(v, 6 if k == "first_batch_jsd" else 1) for k, v in result.items()}}
            rows.append(row)
            print(row, flush=True)
    by = {f: [r for r in rows if r["framework"] == f] for f in ("trl", "divergent")}
    speedup = sum(r["tokens_per_s"] for r in by["divergent"]) / sum(r["tokens_per_s"] for r in by["trl"])
    memory = sum(r["peak_rss_mb"] for r in by["divergent"]) / sum(r["peak_rss_mb"] for r in by["trl"])
    rows.append({"framework": "divergent/trl", "tokens_per_s": round(speedup, 3), "peak_rss_mb": round(memory, 3),
                 "first_batch_jsd": round(by["divergent"][0]["first_batch_jsd"] - by["trl"][0]["first_batch_jsd"], 9)})
    print(rows[-1])
    print(f"wrote {write_results(rows, args.out)}")


if __name__ == "__main__":
    main()
