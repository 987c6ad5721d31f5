"""Precision of the fused output-layer loss in bf16 against float64, for every divergence.

For bf16 hidden states and weights, ``LinearDistillationLoss`` (bf16 logits chunks, the
gradient in bf16, the weight gradient summed over the chunks) is compared with the
unfused loss in float64 on the same bf16 values. Columns are norm-relative errors
``||got - ref|| / ||ref||`` of the loss, ``dL/dx_s`` and ``dL/dW_s``:

- ``bf16_acc``: weight-gradient accumulator in bf16 (the GPU default);
- ``fp32_acc``: ``accumulation_dtype=torch.float32``;
- ``bf16_logits_only``: exact float64 math on the bf16-rounded logits. This is the
  error any method that forms bf16 logits makes, whatever else it does.

On CUDA the chunks go through the Triton kernel; on CPU through the PyTorch path,
which computes in float32 from the same bf16 logits.

    python benchmarks/bench_fused_linear_precision.py                 # CPU, 45 x 203, in seconds
    python benchmarks/bench_fused_linear_precision.py --device cuda --shape 2048,1024,32003

Results: ``benchmarks/results/fused_linear_precision_<device>.csv`` with the command and machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (benchmarks/ is not a package)

import divergent as dv  # noqa: E402


def norm_relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


ACCUMULATORS = {"bf16_acc": torch.bfloat16, "fp32_acc": torch.float32}


def measure(name: str, n_tokens: int, hidden: int, vocab: int, chunk_size: int, device: str,
            seed: int, temperature: float, topk: int, params: dict | None = None,
            accumulators: tuple[str, ...] = tuple(ACCUMULATORS)) -> dict:
    """One row: the errors of ``name`` (with ``params``) for each accumulator in ``accumulators``."""
    params = dict(params or {})
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=torch.bfloat16)

    x_s, w_s = randn(n_tokens, hidden), randn(vocab, hidden, scale=2 * hidden**-0.5)
    x_t, w_t = randn(n_tokens, hidden), randn(vocab, hidden, scale=3 * hidden**-0.5)
    teacher_logits = x_t.float() @ w_t.float().T
    teacher64 = dv.TopK.from_logits(teacher_logits, topk) if topk else x_t.double() @ w_t.double().T
    rounded_teacher = teacher64 if topk else teacher_logits.bfloat16().double()

    x64, w64 = x_s.double().requires_grad_(True), w_s.double().requires_grad_(True)
    reference = dv.divergence(name, x64 @ w64.T, teacher64, temperature=temperature, **params)
    want_x, want_w = torch.autograd.grad(reference, [x64, w64])
    reference = float(reference.detach())

    rounded = (x_s.float() @ w_s.float().T).bfloat16().double().requires_grad_(True)
    rounded_loss = dv.divergence(name, rounded, rounded_teacher, temperature=temperature, **params)
    (grad,) = torch.autograd.grad(rounded_loss, rounded)
    rounded_loss = float(rounded_loss.detach())
    row = {
        "divergence": name, "n_tokens": n_tokens, "hidden": hidden, "vocab": vocab, "chunk_size": chunk_size,
        "teacher": f"topk{topk}" if topk else "dense", "device": device, "seed": seed,
        "bf16_logits_only_loss": abs(rounded_loss - reference) / abs(reference),
        "bf16_logits_only_dx": norm_relative(grad @ w_s.double(), want_x),
        "bf16_logits_only_dw": norm_relative(grad.T @ x_s.double(), want_w),
    }
    for label in accumulators:
        student_input, student_weight = x_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        loss_fn = dv.LinearDistillationLoss(
            name, chunk_size=chunk_size, hard_weight=0.0, soft_weight=1.0, temperature=temperature,
            t2_scale=False, accumulation_dtype=ACCUMULATORS[label], **params,
        )
        loss = loss_fn(student_input, student_weight, *((None, teacher64) if topk else (x_t, w_t)))
        loss.backward()
        row[f"{label}_loss"] = abs(float(loss.detach()) - reference) / abs(reference)
        row[f"{label}_dx"] = norm_relative(student_input.grad, want_x)
        row[f"{label}_dw"] = norm_relative(student_weight.grad, want_w)
        row[f"{label}_grad_dtype"] = str(student_weight.grad.dtype).removeprefix("torch.")
    return row


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="45,16,203", help="N,H,V")
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--topk", type=int, default=16, help="also a TopK teacher with k entries (0: skip)")
    parser.add_argument("--seeds", default="3,4")
    parser.add_argument("--temperature", type=float, default=1.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    n_tokens, hidden, vocab = (int(part) for part in args.shape.split(","))
    names = [name for name in dv.available() if dv.get_spec(name).per_row]
    rows = [
        measure(name, n_tokens, hidden, vocab, args.chunk_size, args.device, int(seed), args.temperature, topk)
        for seed in args.seeds.split(",")
        for topk in ([0, args.topk] if args.topk else [0])
        for name in names
    ]
    output = args.output or Path(__file__).resolve().parent / "results" / f"fused_linear_precision_{args.device}.csv"
    command = "python benchmarks/bench_fused_linear_precision.py " + " ".join(argv if argv is not None else sys.argv[1:])
    harness.write_results(rows, output, command=command.strip())
    print(f"{'divergence':16} {'teacher':8} {'seed':>4}  dW error: {'bf16 acc':>9} {'fp32 acc':>9} {'bf16 logits only':>17}")
    for row in rows:
        print(f"{row['divergence']:16} {row['teacher']:8} {row['seed']:>4}  {'':10}{row['bf16_acc_dw']:>9.4%} "
              f"{row['fp32_acc_dw']:>9.4%} {row['bf16_logits_only_dw']:>17.4%}")
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
