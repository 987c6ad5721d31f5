"""Benchmark: ``refine-data`` scoring throughput against the bare forward passes of its two models.

The corpus: ``--rows`` rows of Python standard-library source of varied length (20 to
``--max-chars`` characters), as JSON Lines. The models: Llama teacher and reference built
from configs (``--teacher-width``/``--reference-width``), each with its own byte-level BPE
tokenizer trained on the standard library (vocabulary ``--vocab``; the two differ, as in
distillation across model families).

- ``scoring``: what ``refine-data`` does per shard — read the rows, tokenize them with each
  model's tokenizer, batch by length, run both models and reduce each unit to its mean
  log-probability (:func:`divergent.experiments.refine._score_shard` on the units of
  :func:`~divergent.experiments.refine._row_units`);
- ``bare``: only ``model(input_ids, attention_mask)`` of both models on the same batches, with
  the tokens already on the device (no tokenization, no reduction).

``ratio = scoring / bare``: the median over ``--repeats`` pairs of one bare call and one scoring
call run back to back (so both see the same load on a shared machine), of wall time and of the
process's CPU time (with one thread, the work done however loaded the machine is); the target is
at most 1.2. Tokens/s count every token of every unit, of both models.

    python benchmarks/bench_refine_data.py                     # CPU, writes results/refine_data_cpu.csv
    python benchmarks/bench_refine_data.py --memory            # peak memory at 10k and 100k rows, results/refine_data_memory.csv

``--memory``: the whole ``divergent refine-data`` command in a child process on 10,000 and 100,000
short rows (tiny 1-layer Llama teacher and reference, width 32), its peak resident memory
(``ru_maxrss``) and wall time: flat memory means the same peak for ten times the rows.
    python benchmarks/bench_refine_data.py --device cuda --rows 4096 --teacher-width 1024 --out refine_data_gpu.csv
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import time_fn, write_results  # noqa: E402  (benchmarks/ is not a package)

from divergent.data.row_files import RowFile  # noqa: E402
from divergent.data.text import decode_bytes, load_stdlib_corpus  # noqa: E402
from divergent.experiments import refine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _tokenizer(text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def _llama(vocab: int, width: int, layers: int, max_length: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
                                      num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                                      max_position_embeddings=max_length, pad_token_id=0, eos_token_id=1)
    return transformers.LlamaForCausalLM(config).eval()


def memory(args) -> None:
    import os
    import random
    import subprocess

    folder = Path(tempfile.mkdtemp())
    tok = _tokenizer(decode_bytes(load_stdlib_corpus(max_train_bytes=200_000, max_val_bytes=20_000).val), 300)
    for name, width in (("teacher", 32), ("reference", 32)):
        _llama(len(tok), width, 1, 256).save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    rng = random.Random(0)
    words = "the cat sat on a mat while python reads plain text and numbers count one two three".split()
    rows_out = []
    for n in (10_000, 100_000):
        data = folder / f"rows{n}.jsonl"
        data.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=12))}) + "\n" for _ in range(n)))
        command = [sys.executable, "-m", "divergent.cli", "refine-data", "--teacher", str(folder / "teacher"),
                   "--reference", str(folder / "reference"), "--data", str(data), "--threads", "1",
                   "-o", str(folder / f"out{n}")]
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(child.pid, 0)
        if status != 0:
            raise SystemExit(f"refine-data failed on {n} rows: {child.stderr.read()[-2000:]}")
        rows_out.append({"rows": n, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                         "wall_s": round(time.perf_counter() - start, 1)})
        print(rows_out[-1])
    RESULTS.mkdir(exist_ok=True)
    print("wrote", write_results(rows_out, RESULTS / "refine_data_memory.csv"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--max-chars", type=int, default=1200)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--teacher-width", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--reference-width", type=int, default=128)
    parser.add_argument("--reference-layers", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="refine_data_cpu.csv")
    parser.add_argument("--memory", action="store_true", help="Peak memory of the command at 10k and 100k rows.")
    args = parser.parse_args()
    if args.memory:
        return memory(args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    corpus = load_stdlib_corpus(max_train_bytes=2_000_000, max_val_bytes=200_000)
    source = decode_bytes(corpus.train)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.rows):
        length = int(torch.randint(20, args.max_chars, (1,), generator=generator))
        start = int(torch.randint(0, len(source) - length, (1,), generator=generator))
        rows.append({"text": source[start:start + length]})
    folder = Path(tempfile.mkdtemp())
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher_tok = _tokenizer(decode_bytes(corpus.val), args.vocab)
    reference_tok = _tokenizer(decode_bytes(corpus.val)[: len(decode_bytes(corpus.val)) // 2], args.vocab // 2)
    teacher = refine._Scorer("teacher", _llama(len(teacher_tok), args.teacher_width, args.teacher_layers,
                                               args.max_length).to(device), teacher_tok, "bench teacher")
    reference = refine._Scorer("reference", _llama(len(reference_tok), args.reference_width, args.reference_layers,
                                                   args.max_length).to(device), reference_tok, "bench reference")
    config = refine.RefineDataConfig(teacher="t", reference="r", data=str(data), batch_tokens=args.batch_tokens,
                                     rows_per_shard=args.rows)

    def scoring():
        units = list(refine._row_units(iter(RowFile(data)), config, teacher, reference, args.max_length, str(data), "",
                                       frozenset()))
        return refine._score_shard(units, teacher, reference, config, device)

    # The bare passes: the same units, tokenized beforehand, in the same batches, already on the device.
    units = list(refine._row_units(iter(RowFile(data)), config, teacher, reference, args.max_length, str(data), "", frozenset()))
    prepared = []
    for scorer, position in ((teacher, 1), (reference, 2)):
        for _, ids, mask in refine.padded_batches([u[position] for u in units], args.batch_tokens, scorer.pad_id):
            prepared.append((scorer.model, ids.to(device), mask.to(device)))
    tokens = sum(len(u[1]) + len(u[2]) for u in units)

    @torch.no_grad()
    def bare():
        for model, ids, mask in prepared:
            model(input_ids=ids, attention_mask=mask)

    # Alternated, one call each, so that both see the same load on a shared machine: the ratios are
    # the medians of the per-pair ratios, of wall time and of this process's CPU time (on a CPU run
    # with one thread, CPU time is the work done, whatever else the machine runs).
    def timed(fn):
        cpu = time.process_time()
        wall = time_fn(fn, repeats=1, warmup=0, device=device)["median_ms"]
        return wall, (time.process_time() - cpu) * 1e3

    bare(), scoring()  # warm-up
    pairs = [(timed(bare), timed(scoring)) for _ in range(args.repeats)]
    wall_ratio = statistics.median(s[0] / b[0] for b, s in pairs)
    cpu_ratio = statistics.median(s[1] / b[1] for b, s in pairs)
    rows_out = []
    for name, index in (("bare", 0), ("scoring", 1)):
        wall = statistics.median(p[index][0] for p in pairs)
        cpu = statistics.median(p[index][1] for p in pairs)
        rows_out.append({"what": name, "device": str(device), "rows": args.rows, "tokens": tokens,
                         "teacher": f"llama w{args.teacher_width} l{args.teacher_layers} v{len(teacher_tok)}",
                         "reference": f"llama w{args.reference_width} l{args.reference_layers} v{len(reference_tok)}",
                         "median_wall_ms": round(wall, 1), "median_cpu_ms": round(cpu, 1),
                         "tokens_per_s": round(tokens / wall * 1e3),
                         "wall_ratio_to_bare": 1.0 if name == "bare" else round(wall_ratio, 3),
                         "cpu_ratio_to_bare": 1.0 if name == "bare" else round(cpu_ratio, 3), "pairs": args.repeats})
        print(rows_out[-1])
    RESULTS.mkdir(exist_ok=True)
    print("wrote", write_results(rows_out, RESULTS / args.out))


if __name__ == "__main__":
    main()
