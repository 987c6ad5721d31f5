"""Benchmark: one fused distillation step from a mixture of two teachers at real vocabulary sizes.

One step = forward + backward of :class:`divergent.train.lm.LMObjective` (fused, forward KL)
for a tiny Llama student on ``--batch`` x ``--length`` random tokens, with as teacher

- ``one teacher``: a tiny Llama (the loss reads its output layer's input and weight), or
- ``mixture of 2``: :class:`divergent.models.mixture.TeacherMixture` of two tiny Llamas, which
  gives its logits ``T * log p_mix`` ``[tokens, V]`` directly (no output layer).

Reported per vocabulary: the extra peak memory of the step (CPU: growth of VmHWM, the lower of
two measurements, see ``harness.peak_memory_mb``), its median wall time, the size of the
teacher's tensors and what the former ``[V, V]`` identity output layer of the mixture would
have taken in float32 (refused above V = 16384). The models are tiny (hidden ``--hidden``,
one layer) so that the vocabulary-sized tensors dominate.

    python benchmarks/bench_teacher_mixture.py                  # V = 32000, 128256
    python benchmarks/bench_teacher_mixture.py --vocab 20000 --batch 2 --length 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import peak_memory_mb, time_fn, write_results  # noqa: E402

from divergent.models.mixture import TeacherMixture  # noqa: E402
from divergent.train.lm import Batch, LMObjective  # noqa: E402


def _llama(vocab: int, hidden: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(config).eval()


def _mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", default="32000,128256", help="comma-separated vocabulary sizes")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "teacher_mixture_cpu.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for vocab in [int(v) for v in args.vocab.split(",")]:
        student, a, b = (_llama(vocab, args.hidden, seed) for seed in (0, 1, 2))
        for parameter in (*a.parameters(), *b.parameters()):
            parameter.requires_grad_(False)
        ids = torch.randint(3, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
        batch = Batch(ids, torch.ones_like(ids), ids.clone())
        objective = LMObjective("forward_kl", temperature=2.0)
        mixture = TeacherMixture([a, b], [0.7, 0.3], temperature=2.0)
        for mode, teacher in (("one teacher", a), ("mixture of 2", mixture)):
            def make(teacher=teacher):
                student.zero_grad(set_to_none=True)
                return lambda: objective(student, student, batch, teacher=teacher).backward()

            timing = time_fn(lambda teacher=teacher: objective(student, student, batch, teacher=teacher).backward(),
                             repeats=args.repeats, warmup=1)
            peak = min(peak_memory_mb(make) for _ in range(2))  # the lower of two: VmHWM is noisy
            tensors = [*teacher.parameters(), *teacher.buffers()]
            rows.append({"vocab": vocab, "teacher": mode, "tokens": args.batch * args.length, "hidden": args.hidden,
                         "peak_mb": round(peak, 1), "median_ms": round(timing["median_ms"], 1),
                         "teacher_tensors_mb": round(_mb(tensors), 1),
                         "logits_mb": round(args.batch * args.length * vocab * 4 / 2**20, 1),
                         "identity_layer_mb": round(vocab * vocab * 4 / 2**20, 1) if mode != "one teacher" else ""})
            print(rows[-1], flush=True)
    path = write_results(rows, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
