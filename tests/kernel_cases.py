"""Shared cases and float64 references of the fused divergence kernel's tests.

Used by ``tests/test_triton_divergence.py`` (the kernels under Triton's interpreter
on CPU) and ``tests/test_fused_linear_gpu.py`` (compiled, on CUDA), so both check the
same parameter settings against the same references.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import divergent as dv

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# Every supported name, with the parameter settings whose formulas differ (limits included).
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("js", {}),
    ("js", {"beta": 0.2}),
    ("tvd", {}),
    ("skew_kl", {}),
    ("skew_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 0.3}),
    ("alpha_beta", {}),
    ("alpha_beta", {"alpha": 0.0, "beta": 0.5}),
    ("alpha_beta", {"alpha": 1.5, "beta": 0.0}),
    ("alpha_beta", {"alpha": 0.0, "beta": 0.0}),
    ("alpha_beta", {"alpha": 1.0, "beta": 0.0}),
    ("alpha_beta", {"alpha": 1e-6, "beta": 1e-6}),  # exponents near 0: the form without cancellation
    ("alpha_beta", {"alpha": 0.05, "beta": 2.0}),
    ("alpha_beta", {"alpha": 0.01, "beta": 0.0}),
    ("alpha", {}),
    ("alpha", {"alpha": 0.2}),
    ("alpha", {"alpha": 1.0}),
    ("alpha", {"alpha": 0.0}),
    ("alpha", {"alpha": 1e-6}),
    ("alpha", {"alpha": 0.97}),
    ("hellinger", {}),
    ("chi2", {}),
    ("cauchy_schwarz", {}),
    ("bdkd", {}),
    ("bdkd", {"high_weight": 2.0, "low_weight": 0.5}),
    ("bdkd", {"high_weight": 0.0, "low_weight": 1.0}),  # a zero weight where that direction is infinite
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in CASES]

ONE_CASE_PER_NAME = [case for i, case in enumerate(CASES) if case[0] not in [c[0] for c in CASES[:i]]]


def reference(name, student, teacher, temperature, params, row_scale):
    """Rows and d(sum_i c_i rows_i)/d student from the functional layer in float64."""
    student64 = student.detach().double().requires_grad_(True)
    rows = dv.divergence(
        name,
        student64,
        teacher.detach().double(),
        temperature=temperature,
        mask=row_scale != 0,
        reduction="none",
        **params,
    )
    (grad,) = torch.autograd.grad((rows * row_scale.double()).sum(), student64)
    return rows.detach(), grad


def assert_rows_close(rows, expected, rtol, atol):
    """Equal where the reference is finite; the same infinity where it is not."""
    assert rows.dtype == torch.float32
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isinf(rows), ~finite), (rows, expected)
    assert torch.equal(rows[~finite], expected[~finite].float())
    torch.testing.assert_close(rows[finite].double(), expected[finite], rtol=rtol, atol=atol)


def assert_grad_close(grad, expected, finite_rows, rtol, floor=1e-6):
    """Gradients of the rows whose divergence is finite, to ``rtol`` of each row's largest entry.

    ``floor`` is an absolute allowance at float32 level: a saturated row (TVD = 1 against a
    one-hot teacher) has a gradient far below the probabilities it is computed from.
    """
    grad = grad.double()[finite_rows]
    expected = expected[finite_rows]
    assert torch.isfinite(grad).all()
    allowed = rtol * expected.abs().amax(dim=-1, keepdim=True) + floor
    excess = ((grad - expected).abs() - allowed).max()
    assert excess <= 0, f"gradient off by {excess.item():.3g} beyond the allowance"


def random_logits(rows, vocab, dtype=torch.float32, spread=3.0):
    return (torch.randn(rows, vocab) * spread).to(dtype)


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (benchmarks/ is not a package; each script puts
    its folder on sys.path for its ``import harness``)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_bf16_fused_loss(name, params, teacher_kind, *, device, n_tokens, hidden, vocab, chunk_size, seed=3):
    """bf16 LinearDistillationLoss against the unfused float64 loss of the same bf16 values.

    The measurement is ``benchmarks/bench_fused_linear_precision.py: measure``: bf16 hidden
    states and weights, bf16 logits chunks, the gradient in bf16, the weight gradient summed
    over ``n_tokens / chunk_size`` chunks in a bf16 accumulator. Loss, dL/dx_s and dL/dW_s
    must be within 1e-2 (norm-relative) of the float64 reference, or, where rounding the
    logits to bf16 alone costs more (TVD's sign(q - p) and chi^2's p^2/q amplify it past
    1%), within 1.25 times what exact float64 math on those rounded logits gives: the
    kernel, its bf16 gradient and the accumulator add at most a quarter to it.
    """
    row = load_benchmark("bench_fused_linear_precision").measure(
        name, n_tokens, hidden, vocab, chunk_size, device, seed, temperature=1.5,
        topk=16 if teacher_kind == "topk" else 0, params=params, accumulators=("bf16_acc",),
    )
    assert row["bf16_acc_grad_dtype"] == "bfloat16"
    assert row["bf16_acc_loss"] <= 1e-2, row
    for part in ("dx", "dw"):
        allowed = max(1e-2, 1.25 * row[f"bf16_logits_only_{part}"])
        assert row[f"bf16_acc_{part}"] <= allowed, (part, row)
    return row
