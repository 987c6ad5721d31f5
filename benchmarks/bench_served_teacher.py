"""``cache-teacher`` through a served teacher against the same teacher in-process (CPU).

    python benchmarks/bench_served_teacher.py                # 64 sequences x 128 tokens, k = 16
    python benchmarks/bench_served_teacher.py --sequences 16 # quicker

The teacher is a small Llama (hidden 256, 4 layers, the tests' 300-token tokenizer) saved to
a temporary folder. The server is tests/served_server.py in its own process on 127.0.0.1 (one
torch thread, one forward per request thread, vLLM's JSON); the client is
:class:`divergent.models.served.ServedTeacher` with 1 and 4 requests in flight. In-process is
``write_teacher_cache`` on the loaded model (one torch thread). Each served row is timed right
after a fresh in-process timing, and tokens/s are taken side by side: the machine is shared.
The served path pays for JSON (k + 1 entries per token) and HTTP; it exists for teachers that
do not fit the student's process, not to be faster than a teacher that does.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from harness import time_fn, write_results  # noqa: E402

from divergent.data.teacher_cache import write_teacher_cache  # noqa: E402
from divergent.models.served import ServedTeacher  # noqa: E402
from tests import lm_helpers  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "served_teacher_cpu.csv"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = lm_helpers.tokenizer(300)
    model = lm_helpers.llama(len(tok), hidden=256, layers=4, seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.sequences):
        ids = torch.randint(3, len(tok), (args.length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    tokens = args.sequences * args.length
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "teacher"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        port = _free_port()
        server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "served_server.py"), str(folder), str(port)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            server.stdout.readline()  # "serving ..." once it listens
            url = f"http://127.0.0.1:{port}/v1"

            def in_process():
                write_teacher_cache(model, {"train": rows}, Path(tmp) / "local", k=args.k, vocab_size=len(tok),
                                    batch_size=args.batch_size)

            for in_flight in (1, 4):
                teacher = ServedTeacher(url, tok, max_in_flight=in_flight)

                def served(teacher=teacher):
                    write_teacher_cache(teacher, {"train": rows}, Path(tmp) / "remote", k=args.k,
                                        vocab_size=len(tok), batch_size=args.batch_size)

                local = time_fn(in_process, repeats=args.repeats, warmup=1)
                remote = time_fn(served, repeats=args.repeats, warmup=1)
                teacher.close()
                for path, timing in (("in-process", local), (f"served, {in_flight} in flight", remote)):
                    results.append({"path": path, "in_flight": in_flight if path != "in-process" else "",
                                    "sequences": args.sequences, "tokens": tokens, "k": args.k,
                                    "batch_size": args.batch_size, "median_s": round(timing["median_ms"] / 1e3, 3),
                                    "tokens_per_s": round(tokens / (timing["median_ms"] / 1e3), 1)})
                results[-1]["vs_in_process"] = round(results[-2]["median_s"] / results[-1]["median_s"], 3)
                results[-2]["vs_in_process"] = 1.0
        finally:
            server.terminate()
            server.wait(timeout=30)
    path = write_results(results, args.out)
    for row in results:
        print(row)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
