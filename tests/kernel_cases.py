"""Shared cases and float64 references of the fused divergence kernel's tests.

Used by ``tests/test_triton_divergence.py`` (the kernels under Triton's interpreter
on CPU) and ``tests/test_fused_linear_gpu.py`` (compiled, on CUDA), so both check the
same parameter settings against the same references.
"""

from __future__ import annotations

import torch

import divergent as dv

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
    ("alpha", {}),
    ("alpha", {"alpha": 0.2}),
    ("alpha", {"alpha": 1.0}),
    ("alpha", {"alpha": 0.0}),
    ("hellinger", {}),
    ("chi2", {}),
    ("cauchy_schwarz", {}),
    ("bdkd", {}),
    ("bdkd", {"high_weight": 2.0, "low_weight": 0.5}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in CASES]

ONE_CASE_PER_NAME = [case for i, case in enumerate(CASES) if case[0] not in [c[0] for c in CASES[:i]]]


def norm_relative(got, want):
    return float((got.double() - want).norm() / want.norm())



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


def check_bf16_fused_loss(name, params, teacher_kind, *, device, n_tokens, hidden, vocab, chunk_size, seed=3):
    """bf16 LinearDistillationLoss against the unfused float64 loss of the same bf16 values.

    bf16 hidden states and weights, bf16 logits chunks, the gradient in bf16, the weight
    gradient summed over ``n_tokens / chunk_size`` chunks in a bf16 accumulator: loss,
    dL/dx_s and dL/dW_s must be within 1e-2 (norm-relative) of the float64 reference, or,
    where rounding the logits to bf16 alone costs more (TVD's sign(q - p) and chi^2's p^2/q
    amplify it past 1%), within 1.25 times what exact float64 math on those rounded logits
    gives: the kernel, its bf16 gradient and the accumulator add at most a quarter to it.
    """
    from divergent.losses.linear import LinearDistillationLoss

    gen = torch.Generator().manual_seed(seed)
    temperature = 1.5

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=torch.bfloat16)

    x_s, w_s = randn(n_tokens, hidden), randn(vocab, hidden, scale=2 * hidden**-0.5)
    x_t, w_t = randn(n_tokens, hidden), randn(vocab, hidden, scale=3 * hidden**-0.5)
    topk = dv.TopK.from_logits(x_t.float() @ w_t.float().T, 16) if teacher_kind == "topk" else None

    x64, w64 = x_s.double().requires_grad_(True), w_s.double().requires_grad_(True)
    teacher64 = topk if topk is not None else x_t.double() @ w_t.double().T
    reference_loss = dv.divergence(name, x64 @ w64.T, teacher64, temperature=temperature, **params)
    want_x, want_w = torch.autograd.grad(reference_loss, [x64, w64])
    # The same float64 math on bf16-rounded logits: the error no bf16-logits method avoids.
    rounded = (x_s.float() @ w_s.float().T).bfloat16().double().requires_grad_(True)
    teacher_rounded = topk if topk is not None else (x_t.float() @ w_t.float().T).bfloat16().double()
    (rounded_grad,) = torch.autograd.grad(
        dv.divergence(name, rounded, teacher_rounded, temperature=temperature, **params), rounded
    )
    allowed = [
        max(1e-2, 1.25 * norm_relative(rounded_grad @ w_s.double(), want_x)),
        max(1e-2, 1.25 * norm_relative(rounded_grad.T @ x_s.double(), want_w)),
    ]

    student_input, student_weight = x_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    loss_fn = LinearDistillationLoss(
        name, chunk_size=chunk_size, hard_weight=0.0, soft_weight=1.0, temperature=temperature,
        t2_scale=False, accumulation_dtype=torch.bfloat16, **params,
    )
    if topk is None:
        loss = loss_fn(student_input, student_weight, x_t, w_t)
    else:
        loss = loss_fn(student_input, student_weight, None, topk)
    loss.backward()
    assert student_weight.grad.dtype == torch.bfloat16
    assert abs(float(loss) - float(reference_loss)) <= 1e-2 * abs(float(reference_loss)), (loss, reference_loss)
    errors = [norm_relative(student_input.grad, want_x), norm_relative(student_weight.grad, want_w)]
    assert errors[0] <= allowed[0] and errors[1] <= allowed[1], (errors, allowed)
    return errors
