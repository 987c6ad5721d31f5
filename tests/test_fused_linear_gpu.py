"""GPU tests of the fused output-layer loss: the compiled Triton kernels on CUDA.

Skipped without a CUDA device (``gpu`` marker) or without triton. Each compares with
the unfused float64 path: the kernel's rows and gradient for every parameter setting
(``kernel_cases.CASES``), ``LinearDistillationLoss`` end to end in bf16 for every
per-row divergence with dense and TopK teachers, and the peak memory the meta-device
plan (``benchmarks/bench_fused_linear.py: plan_ours``) predicts. Run them with
``python -m pytest tests/test_fused_linear_gpu.py`` (``benchmarks/gpu_session.sh``).
The same checks run on CPU under Triton's interpreter in ``tests/test_triton_divergence.py``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import divergent as dv
from kernel_cases import (
    CASE_IDS,
    CASES,
    ONE_CASE_PER_NAME,
    assert_grad_close,
    assert_rows_close,
    check_bf16_fused_loss,
    random_logits,
    reference,
)

pytestmark = pytest.mark.gpu
pytest.importorskip("triton", reason="the fused kernels need triton")

PER_ROW_NAMES = [name for name in dv.available() if dv.get_spec(name).per_row]
GIB = 2.0**30


@pytest.fixture(scope="module")
def compiled():
    """The kernel module with compiled (not interpreted) kernels."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set; these tests are for the compiled kernels")
    from divergent.functional import triton_divergence

    assert type(triton_divergence._fused_divergence_kernel).__name__ != "InterpretedFunction"
    return triton_divergence


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_compiled_kernel_on_cuda_matches_reference(compiled, name, params, dtype):
    """The compiled kernel at an LLM-sized vocabulary (32003 = odd), default block size."""
    triton_divergence = compiled
    rows_count, vocab = 64, 32003
    student = random_logits(rows_count, vocab, dtype).cuda()
    teacher = random_logits(rows_count, vocab, dtype).cuda()
    row_scale = torch.rand(rows_count).cuda()
    row_scale[::7] = 0.0
    expected_rows, expected_grad = reference(name, student, teacher, 2.0, params, row_scale)
    rows, grad = triton_divergence.rows_and_student_grad(
        name, student.clone(), teacher, temperature=2.0, params=params, row_scale=row_scale
    )
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert_rows_close(rows.cpu(), expected_rows.cpu(), rtol=tolerance, atol=1e-5)
    assert_grad_close(grad.cpu(), expected_grad.cpu(), torch.isfinite(expected_rows).cpu(), rtol=tolerance)
    assert not math.isnan(rows.sum().item())


@pytest.mark.parametrize(("name", "params"), CASES[::3], ids=CASE_IDS[::3])
def test_compiled_topk_kernels_on_cuda_match_reference(compiled, name, params):
    """TopK teacher (k = 64) on CUDA, bf16 student logits, V = 32003."""
    triton_divergence = compiled
    student = random_logits(64, 32003, torch.bfloat16).cuda()
    teacher = dv.TopK.from_logits(random_logits(64, 32003).cuda(), 64)
    row_scale = torch.rand(64).cuda()
    student64 = student.double().requires_grad_(True)
    expected_rows = dv.divergence(name, student64, teacher, temperature=2.0, reduction="none", **params)
    (expected_grad,) = torch.autograd.grad((expected_rows * row_scale.double()).sum(), student64)
    rows, grad = triton_divergence.rows_and_student_grad_topk(
        name, student.clone(), teacher, temperature=2.0, params=params, row_scale=row_scale
    )
    finite = torch.isfinite(expected_rows).cpu()
    assert_rows_close(rows.cpu(), expected_rows.detach().cpu(), rtol=1e-2, atol=1e-5)
    assert_grad_close(grad.cpu(), expected_grad.cpu(), finite, rtol=1e-2)


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize(("name", "params"), ONE_CASE_PER_NAME, ids=[c[0] for c in ONE_CASE_PER_NAME])
def test_linear_distillation_loss_bf16_on_cuda_within_one_percent_of_float64(
    compiled, monkeypatch, name, params, teacher_kind
):
    """Every per-row divergence through the compiled kernel, bf16, four chunks of 128
    tokens at V = 32003 (odd), against float64; the PyTorch path must not be taken."""
    from divergent.functional import fused_linear

    def not_the_kernel(*args, **kwargs):
        raise AssertionError("a CUDA chunk went to the PyTorch path instead of the Triton kernel")

    monkeypatch.setattr(fused_linear, "rows_and_student_grad_torch", not_the_kernel)
    check_bf16_fused_loss(name, params, teacher_kind, device="cuda", n_tokens=512, hidden=256, vocab=32003, chunk_size=128)


def test_cuda_dispatch_matches_cpu(compiled):
    """float32 with a CE term and ignored labels: the CUDA path equals the CPU one."""
    gen = torch.Generator().manual_seed(0)
    x_s = torch.randn(37, 12, generator=gen).requires_grad_(True)
    w_s = (torch.randn(50, 12, generator=gen) * 0.5).requires_grad_(True)
    x_t, w_t = torch.randn(37, 20, generator=gen), torch.randn(50, 20, generator=gen) * 0.5
    labels = torch.randint(0, 50, (37,), generator=gen)
    labels[::5] = -100
    loss_fn = dv.LinearDistillationLoss("js", chunk_size=8, hard_weight=0.5, soft_weight=0.5)
    cpu = loss_fn(x_s, w_s, x_t, w_t, labels)
    cuda_tensors = [t.detach().cuda().requires_grad_(t.requires_grad) for t in (x_s, w_s, x_t, w_t)]
    gpu = loss_fn(*cuda_tensors, labels.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    got = torch.autograd.grad(gpu, cuda_tensors[:2])
    want = torch.autograd.grad(cpu, [x_s, w_s])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(("name", "topk"), [("js", 0), ("forward_kl", 0), ("cauchy_schwarz", 0), ("js", 64)])
def test_measured_peak_memory_matches_the_meta_device_plan(compiled, bench_fused_linear, name, topk):
    """torch.cuda.max_memory_allocated of one step against plan_ours at N = 4096, H = 1024,
    V = 32000 bf16 (chunks of 1024): within 2% plus 8 MiB (the plan leaves out the
    allocator's rounding)."""
    n, h, v = 4096, 1024, 32000
    torch.cuda.synchronize()
    x_s, w_s, x_t, w_t = bench_fused_linear.make_inputs(n, h, v, torch.bfloat16, "cuda")
    teacher = bench_fused_linear.topk_teacher(x_t, w_t, topk) if topk else None
    step = bench_fused_linear.step_ours(name, x_s, w_s, x_t, w_t, {}, 1024, teacher)
    step()  # warm up: compile the kernel, create cuBLAS's workspace
    x_s.grad = w_s.grad = None
    torch.cuda.synchronize()
    # The plan's peak counts its inputs (with a TopK teacher: no teacher layer, whose
    # tensors stay in the baseline here).
    plan_inputs = (x_s, w_s, teacher.indices, teacher.logprobs) if teacher is not None else (x_s, w_s, x_t, w_t)
    baseline = torch.cuda.memory_allocated() - sum(t.numel() * t.element_size() for t in plan_inputs)
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = (torch.cuda.max_memory_allocated() - baseline) / GIB
    plan = bench_fused_linear.plan_ours(name, n, h, v, torch.bfloat16, {}, chunk_size=1024, topk=topk)
    assert math.isclose(measured, plan["planned_peak_gib"], rel_tol=0.02, abs_tol=8 / 1024), (measured, plan)
