"""Benchmark: divergent.hf.DistillationTrainer beside TRL's GKDTrainer, side by side on CPU.

Same tiny Hugging Face GPT-2 teacher and student (built from configs, vocabulary ``--vocab``),
same data (windows of the Python standard library's source as token ids), same batch,
optimiser (AdamW, constant learning rate, gradient clipping 1.0) and number of steps,
generalized JSD with beta = 0.5, off-policy (λ = 0), both driven by the same
``transformers.Trainer`` loop:

- ``trl``: ``trl.experimental.gkd.GKDTrainer`` (full [tokens, vocab] logits for student and
  teacher, ``generalized_jsd_loss``);
- ``divergent``: ``divergent.hf.DistillationTrainer`` (``divergence="js"``, the fused loss:
  the output layer is chunked over tokens inside the student's forward).

Each run is a fresh process with ``--threads`` torch threads; the frameworks alternate
(trl, divergent, trl, ...) ``--repeats`` times and the table reports medians. Measured:
counted tokens per second from the end of the first step to the end of the last (start-up
and the first step excluded); the process's peak resident memory during training
(``peak_rss_mb``; it includes the ~0.6 GB of the imported libraries and both models) and
its growth over the start of training (``train_growth_mb``, VmHWM reset once the models and
data are built); that growth less the student's gradients and AdamW states
(``beyond_model_mb``: what the loss and the activations cost); and the JSD of the first
batch computed by each library's loss (they must agree).

``--vocab-sweep 32000,128000,256000`` repeats the comparison at fixed tokens for each
vocabulary size: ``beyond_model_mb`` stays flat with the fused loss and grows with the
vocabulary with full logits.

    python benchmarks/bench_trl_gkd.py --repeats 5
    python benchmarks/bench_trl_gkd.py --vocab-sweep 32000,128000,256000 --repeats 1 --steps 4 \\
        --out benchmarks/results/lm_trl_gkd_vocab.csv
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_MEASURED = ("tokens_per_s", "peak_rss_mb", "train_growth_mb", "beyond_model_mb")

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
windows = windows % args["vocab"]
tokens_per_step = args["batch_size"] * args["seq_len"]

import datasets
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, TrainerCallback

vocab = {f"t{i}": i for i in range(args["vocab"])}
tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
                                    pad_token="t0", eos_token="t1", unk_token="t0")

def collate(features):
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "prompts": ids[:, :1], "prompt_attention_mask": torch.ones_like(ids[:, :1])}

class Clock(TrainerCallback):
    def __init__(self):
        self.ends = []
    def on_step_end(self, args_, state, control, **kwargs):
        self.ends.append(time.perf_counter())

dataset = datasets.Dataset.from_dict({"input_ids": windows.tolist()})
common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args["batch_size"], max_steps=args["steps"],
              learning_rate=args["lr"], logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
              dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, seed=0,
              disable_tqdm=True, optim="adamw_torch")
batch = collate([dataset[i] for i in range(args["batch_size"])])
clock = Clock()
if args["framework"] == "trl":
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    config = GKDConfig(**common, lmbda=0.0, beta=0.5, seq_kd=False, temperature=1.0, max_length=args["seq_len"] + 1,
                       disable_dropout=True)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, data_collator=collate,
                         train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    with torch.no_grad():
        first_loss = float(GKDTrainer.generalized_jsd_loss(
            student(batch["input_ids"]).logits[:, :-1], teacher(batch["input_ids"]).logits[:, :-1],
            labels=batch["labels"][:, 1:], beta=0.5))
else:
    from divergent.hf import DistillationConfig, DistillationTrainer
    from divergent.train.lm import Batch, LMObjective

    config = DistillationConfig(**common, divergence="js", divergence_params={"beta": 0.5}, hard_weight=0.0,
                                soft_weight=1.0, fused=True, chunk_size=args["chunk_size"])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[clock])
    with torch.no_grad():
        objective = LMObjective("js", {"beta": 0.5}, hard_weight=0.0, soft_weight=1.0)
        first_loss = float(objective(student, student, Batch(batch["input_ids"], batch["attention_mask"],
                                                             batch["labels"]), teacher=teacher))
# What training adds for the model itself: the student's gradients and two AdamW moments.
optimizer_mb = 3 * sum(p.numel() for p in student.parameters()) * 4 / 2**20
reset_hwm()
start_mb = vm_hwm_mb()
trainer.train()
peak = vm_hwm_mb()
seconds = clock.ends[-1] - clock.ends[0]
print(json.dumps({"tokens_per_s": tokens_per_step * (len(clock.ends) - 1) / seconds, "peak_rss_mb": peak,
                  "train_growth_mb": peak - start_mb, "beyond_model_mb": peak - start_mb - optimizer_mb,
                  "first_batch_jsd": first_loss}))
"""


def run(framework: str, args: argparse.Namespace, vocab: int) -> dict:
    chunk_size = max(1, args.chunk_logits // vocab) if args.chunk_logits else args.chunk_size
    payload = dict(framework=framework, vocab=vocab, seq_len=args.seq_len, batch_size=args.batch_size,
                   steps=args.steps, lr=args.lr, threads=args.threads, chunk_size=chunk_size,
                   student_width=args.student_width, teacher_width=args.teacher_width)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), MALLOC_MMAP_THRESHOLD_="65536",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")
    out = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(payload)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{framework} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--vocab-sweep", default="", help="comma-separated vocabulary sizes (instead of --vocab)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: the machines are shared)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="tokens per chunk of the fused loss (default: automatic, 2^27 logits per chunk)")
    parser.add_argument("--chunk-logits", type=int, default=None,
                        help="instead of --chunk-size: chunk_size = this // vocab (a fixed logits budget per chunk)")
    parser.add_argument("--student-width", type=int, default=64)
    parser.add_argument("--teacher-width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="alternate runs of each framework this many times")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_trl_gkd.csv"))
    args = parser.parse_args()

    vocabs = [int(v) for v in args.vocab_sweep.split(",")] if args.vocab_sweep else [args.vocab]
    rows, summary = [], []
    for vocab in vocabs:
        runs = {"trl": [], "divergent": []}
        for repeat in range(args.repeats):
            for framework in ("trl", "divergent"):
                result = run(framework, args, vocab)
                runs[framework].append(result)
                chunk = max(1, args.chunk_logits // vocab) if args.chunk_logits else args.chunk_size
                row = {"framework": framework, "repeat": repeat, "vocab": vocab,
                       "chunk_size": "" if framework == "trl" else (chunk or "auto"), "seq_len": args.seq_len,
                       "batch_size": args.batch_size, "steps": args.steps, "threads": args.threads,
                       **{k: round(v, 6 if k == "first_batch_jsd" else 1) for k, v in result.items()}}
                rows.append(row)
                print(row, flush=True)
        median = {f: {k: statistics.median(r[k] for r in runs[f]) for k in _MEASURED} for f in runs}
        for framework in ("trl", "divergent"):
            summary.append({"framework": f"{framework} (median)", "vocab": vocab,
                            **{k: round(v, 1) for k, v in median[framework].items()}})
        summary.append({
            "framework": "divergent/trl", "vocab": vocab,
            "tokens_per_s": round(median["divergent"]["tokens_per_s"] / median["trl"]["tokens_per_s"], 3),
            "peak_rss_mb": round(median["divergent"]["peak_rss_mb"] / median["trl"]["peak_rss_mb"], 3),
            "train_growth_mb": round(median["divergent"]["train_growth_mb"] / median["trl"]["train_growth_mb"], 3),
            "beyond_model_mb": round(median["divergent"]["beyond_model_mb"] / median["trl"]["beyond_model_mb"], 3),
            "first_batch_jsd": round(runs["divergent"][0]["first_batch_jsd"] - runs["trl"][0]["first_batch_jsd"], 9),
        })
        print(summary[-1], flush=True)
    print(f"wrote {write_results(rows + summary, args.out)}")


if __name__ == "__main__":
    main()
