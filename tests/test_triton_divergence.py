"""The fused Triton divergence kernel against the unfused float64 path.

Without a GPU the kernel runs on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``); these tests skip when triton is not installed. The
reference is ``dv.divergence(..., reduction="none")`` on float64 copies of the
same logits, differentiated by autograd: independent of the kernel's
hand-derived gradients. Tests marked ``gpu`` run the compiled kernel on CUDA.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

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

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not TRITON_INSTALLED, reason="triton is not installed")

ROW_SCALE = torch.tensor([1.0, 0.5, 0.0, 2.0, -0.7])
VOCAB = 203  # odd: with BLOCK = 64 the row spans four blocks and the last one is partial
BLOCK = 64


@pytest.fixture(scope="module")
def interpreted():
    """The module re-imported with ``TRITON_INTERPRET=1`` (kernels run on CPU tensors)."""
    pytest.importorskip("triton")
    from divergent.functional import triton_divergence

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    module = importlib.reload(triton_divergence)
    yield module
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous
    importlib.reload(triton_divergence)  # compiled kernels again for any later CUDA test


def check_against_reference(module, name, params, student, teacher, temperature, rows_rtol, rows_atol, grad_rtol):
    """Run the kernel on a copy of ``student`` and compare rows and gradient with the reference."""
    expected_rows, expected_grad = reference(name, student, teacher, temperature, params, ROW_SCALE)
    rows, grad = module.rows_and_student_grad(
        name, student.clone(), teacher, temperature=temperature, params=params, row_scale=ROW_SCALE, block_size=BLOCK
    )
    assert grad.dtype == student.dtype
    assert_rows_close(rows, expected_rows, rtol=rows_rtol, atol=rows_atol)
    assert_grad_close(grad, expected_grad, torch.isfinite(expected_rows), rtol=grad_rtol)
    return rows, grad


@needs_triton
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_rows_and_gradient_match_float64_reference(interpreted, name, params):
    """Odd vocabulary (203, not a multiple of the block), T != 1, row weights with 0 and < 0."""
    student = random_logits(5, VOCAB)
    teacher = random_logits(5, VOCAB)
    rows, grad = check_against_reference(interpreted, name, params, student, teacher, 1.7, 1e-4, 1e-6, 1e-4)
    assert rows[2] == 0 and torch.all(grad[2] == 0)  # row_scale 0: no value, no gradient


@needs_triton
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_zero_probabilities_give_the_reference_value_or_its_infinity(interpreted, name, params):
    """-inf logits: classes both sides give 0, classes only the teacher gives 0, and one row
    where the student gives 0 to a class the teacher does not (infinite for some divergences)."""
    student = random_logits(5, VOCAB)
    teacher = random_logits(5, VOCAB)
    neg_inf = float("-inf")
    teacher[:, 10:40] = neg_inf
    student[:, 10:25] = neg_inf  # shared zeros
    teacher[1, 150:VOCAB] = neg_inf  # a teacher row with its whole tail at zero
    student[4, 100:120] = neg_inf  # q = 0 < p: forward-type divergences are +inf here
    check_against_reference(interpreted, name, params, student, teacher, 1.0, 1e-4, 1e-6, 1e-4)


@needs_triton
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_extreme_logits(interpreted, name, params):
    """Entries at +-1e4 (near one-hot rows, probabilities far below float32's range).

    Where one side is near one-hot, log-probabilities of ~-1e4 carry float32's absolute
    rounding of ~1e-3 into the gradient (reverse KL: q (log q - log p - D) with both terms
    ~1e4); the float32 PyTorch path has the same error, hence 5e-3 for gradients here.
    """
    student = random_logits(5, VOCAB)
    teacher = random_logits(5, VOCAB)
    student[0, 5], teacher[0, 5] = 1e4, 1e4  # the same dominant class
    student[1, 7], teacher[1, 9] = 1e4, 1e4  # different dominant classes
    student[3, 50:60] = -1e4
    teacher[3, 0:VOCAB:3] = -1e4
    teacher[4, 11] = 1e4
    check_against_reference(interpreted, name, params, student, teacher, 1.0, 1e-4, 1e-5, 5e-3)


@needs_triton
@pytest.mark.parametrize(
    ("name", "params", "dtype"),
    [(name, params, torch.bfloat16) for name, params in CASES[::2]]
    + [(name, params, torch.float16) for name, params in CASES[1::4]],
    ids=[f"{i}-bf16" for i in CASE_IDS[::2]] + [f"{i}-fp16" for i in CASE_IDS[1::4]],
)
def test_half_precision_inputs_within_one_percent(interpreted, name, params, dtype):
    """bf16/fp16 logits accumulate in float32; the gradient is stored in the input dtype."""
    student = random_logits(5, VOCAB, dtype)
    teacher = random_logits(5, VOCAB, dtype)
    check_against_reference(interpreted, name, params, student, teacher, 2.0, 1e-2, 1e-5, 1e-2)


@needs_triton
@pytest.mark.parametrize(("name", "params"), CASES[::3], ids=CASE_IDS[::3])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_teacher_matches_float64_reference(interpreted, name, params, temperature):
    """A dv.TopK teacher (k = 7 of 203, tail bucket): rows and the full-vocabulary gradient."""
    student = random_logits(5, VOCAB)
    student[1, 100:110] = float("-inf")  # student zeros inside the tail
    teacher = dv.TopK.from_logits(random_logits(5, VOCAB), 7)
    student64 = student.double().requires_grad_(True)
    expected_rows = dv.divergence(
        name, student64, teacher, temperature=temperature, mask=ROW_SCALE != 0, reduction="none", **params
    )
    (expected_grad,) = torch.autograd.grad((expected_rows * ROW_SCALE.double()).sum(), student64)
    buffer = student.clone()
    rows, grad = interpreted.rows_and_student_grad_topk(
        name, buffer, teacher, temperature=temperature, params=params, row_scale=ROW_SCALE, block_size=BLOCK
    )
    assert grad.data_ptr() == buffer.data_ptr()
    assert_rows_close(rows, expected_rows.detach(), rtol=1e-4, atol=1e-6)
    assert_grad_close(grad, expected_grad, torch.isfinite(expected_rows), rtol=1e-4)


@needs_triton
def test_topk_teacher_with_every_class_stored_has_no_tail(interpreted):
    student = random_logits(3, 40)
    teacher = dv.TopK.from_logits(random_logits(3, 40), 40)
    student64 = student.double().requires_grad_(True)
    expected_rows = dv.divergence("js", student64, teacher, temperature=1.5, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected_rows.sum(), student64)
    rows, grad = interpreted.rows_and_student_grad_topk(
        "js", student.clone(), teacher, temperature=1.5, params={}, row_scale=torch.ones(3)
    )
    assert_rows_close(rows, expected_rows.detach(), rtol=1e-4, atol=1e-6)
    assert_grad_close(grad, expected_grad, torch.ones(3, dtype=torch.bool), rtol=1e-4)


def route_chunks_to_kernel(interpreted, monkeypatch) -> set:
    """Send LinearDistillationLoss's per-chunk step to the interpreted kernels, as on CUDA;
    returns the set that collects the dtypes of the chunks' student logits."""
    from divergent.functional import fused_linear

    seen = set()

    def through_kernel(name, student_logits, teacher_logits, temperature, params, row_scale):
        seen.add(student_logits.dtype)
        kernel = (
            interpreted.rows_and_student_grad_topk
            if isinstance(teacher_logits, dv.TopK)
            else interpreted.rows_and_student_grad
        )
        return kernel(name, student_logits, teacher_logits, temperature=temperature, params=params, row_scale=row_scale)

    monkeypatch.setattr(fused_linear, "_student_rows_and_grad", through_kernel)
    return seen


@needs_triton
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize(("name", "params"), [("js", {"beta": 0.3}), ("reverse_kl", {}), ("bdkd", {})])
def test_linear_distillation_loss_through_the_kernel_equals_the_torch_path(
    interpreted, monkeypatch, name, params, teacher_kind
):
    """LinearDistillationLoss with its per-chunk step routed to the kernel, as on CUDA:
    same loss and input/weight gradients as the PyTorch path (CE term, ignored labels, T = 2)."""
    from divergent.losses.linear import LinearDistillationLoss

    x_s, w_s = torch.randn(13, 8), torch.randn(VOCAB, 8)
    x_t, w_t = torch.randn(13, 6), torch.randn(VOCAB, 6)
    labels = torch.randint(0, VOCAB, (13,))
    labels[[2, 7]] = -100
    teacher_input, teacher = (x_t, w_t) if teacher_kind == "dense" else (None, dv.TopK.from_logits(x_t @ w_t.T, 9))
    loss_fn = LinearDistillationLoss(name, chunk_size=5, temperature=2.0, **params)

    def loss_and_grads():
        student_input = x_s.clone().requires_grad_(True)
        student_weight = w_s.clone().requires_grad_(True)
        loss = loss_fn(student_input, student_weight, teacher_input, teacher, labels)
        loss.backward()
        return loss.detach(), student_input.grad, student_weight.grad

    expected = loss_and_grads()

    route_chunks_to_kernel(interpreted, monkeypatch)
    for got, want in zip(loss_and_grads(), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize(("name", "params"), ONE_CASE_PER_NAME, ids=[c[0] for c in ONE_CASE_PER_NAME])
def test_bf16_gpu_path_end_to_end_within_one_percent_of_float64(interpreted, monkeypatch, name, params, teacher_kind):
    """What runs on a GPU, emulated on CPU: the chunks go through the interpreted kernel with
    bf16 logits and a bf16 weight-gradient accumulator (``kernel_cases.check_bf16_fused_loss``;
    on CUDA, ``tests/test_fused_linear_gpu.py`` runs the same check on the compiled kernel)."""
    seen = route_chunks_to_kernel(interpreted, monkeypatch)
    check_bf16_fused_loss(name, params, teacher_kind, device="cpu", n_tokens=45, hidden=16, vocab=VOCAB, chunk_size=8)
    assert seen == {torch.bfloat16}  # the chunks' logits, as cuBLAS gives them


@needs_triton
def test_gradient_is_written_into_contiguous_student_logits(interpreted):
    student = random_logits(4, 100)
    teacher = random_logits(4, 100)
    teacher_before = teacher.clone()
    _, expected_grad = reference("js", student, teacher, 1.0, {}, torch.ones(4))
    buffer = student.clone()
    rows, grad = interpreted.rows_and_student_grad("js", buffer, teacher, temperature=1.0, params={}, row_scale=torch.ones(4))
    assert grad.data_ptr() == buffer.data_ptr()
    assert torch.equal(teacher, teacher_before)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)


@needs_triton
def test_non_contiguous_student_is_left_unchanged(interpreted):
    student = random_logits(100, 4).t()  # [4, 100] view with row stride 1
    teacher = random_logits(100, 4).t()
    before = student.clone()
    _, expected_grad = reference("forward_kl", student, teacher, 1.0, {}, torch.ones(4))
    _, grad = interpreted.rows_and_student_grad(
        "forward_kl", student, teacher, temperature=1.0, params={}, row_scale=torch.ones(4)
    )
    assert torch.equal(student, before)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)


@needs_triton
def test_block_size_does_not_change_the_result(interpreted):
    student = random_logits(3, 300)
    teacher = random_logits(3, 300)
    results = [
        interpreted.rows_and_student_grad(
            "skew_reverse_kl", student.clone(), teacher, temperature=1.0, params={}, row_scale=torch.ones(3), block_size=b
        )
        for b in (16, 256, 1024)
    ]
    for rows, grad in results[1:]:
        # float32 sums in another order: rounding-level differences only
        torch.testing.assert_close(rows, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-4, atol=1e-7)


@needs_triton
def test_bad_input_raises_clear_errors(interpreted):
    student = random_logits(2, 10)
    teacher = random_logits(2, 10)
    call = interpreted.rows_and_student_grad
    with pytest.raises(ValueError, match="sinkhorn"):
        call("sinkhorn", student, teacher, temperature=1.0, params={}, row_scale=torch.ones(2))
    with pytest.raises(ValueError, match="nope"):
        call("nope", student, teacher, temperature=1.0, params={}, row_scale=torch.ones(2))
    with pytest.raises(ValueError, match="same shape"):
        call("js", student, teacher[:, :9], temperature=1.0, params={}, row_scale=torch.ones(2))
    with pytest.raises(ValueError, match="beta"):
        call("js", student, teacher, temperature=1.0, params={"beta": 1.0}, row_scale=torch.ones(2))
    with pytest.raises(TypeError, match="gamma"):
        call("js", student, teacher, temperature=1.0, params={"gamma": 1.0}, row_scale=torch.ones(2))
    with pytest.raises(TypeError, match="dtype|float"):
        call("js", student.long(), teacher, temperature=1.0, params={}, row_scale=torch.ones(2))
    with pytest.raises(ValueError, match="temperature"):
        call("js", student, teacher, temperature=0.0, params={}, row_scale=torch.ones(2))
    with pytest.raises(ValueError, match="row_scale"):
        call("js", student, teacher, temperature=1.0, params={}, row_scale=torch.ones(3))
    with pytest.raises(ValueError, match="2-D"):
        call("js", student[None], teacher[None], temperature=1.0, params={}, row_scale=torch.ones(2))
    with pytest.raises(ValueError, match="num_warps"):
        call("js", student, teacher, temperature=1.0, params={}, row_scale=torch.ones(2), num_warps=3)


@needs_triton
def test_supports_every_divergence_with_a_kernel(interpreted):
    for name in dv.available():
        assert interpreted.supports(name) == (dv.get_spec(name).triton_kernel is not None), name
    assert not interpreted.supports("sinkhorn") and not interpreted.supports(3)


def test_support_list_is_derived_from_the_registry():
    """Every built-in's ``triton_kernel`` names a kernel; the support list is exactly those entries."""
    from divergent.functional import triton_divergence as module

    kernels = {name: spec.triton_kernel for name, spec in dv.functional.registry.REGISTRY.items() if spec.builtin}
    assert {k for k in kernels.values() if k} <= set(module.KERNEL_CONSTANTS)
    assert module.SUPPORTED_NAMES == tuple(name for name, kernel in kernels.items() if kernel)
    ids = {module.KERNEL_CONSTANTS[kernel](dv.get_spec(name).resolve({}))[0] for name, kernel in kernels.items() if kernel}
    assert ids <= set(module._KERNEL_IDS)


@needs_triton
@pytest.mark.parametrize(
    ("name", "params", "zero_side"),
    [("alpha_beta", {"alpha": 1e-20, "beta": 1e-20}, None), ("alpha", {"alpha": 1e-20}, "student"),
     ("alpha", {"alpha": 1 - 1e-9}, "teacher"), ("alpha_beta", {"alpha": 0.0, "beta": 1e-20}, None)],
)
def test_exponents_next_to_zero_give_the_limit(interpreted, name, params, zero_side):
    """α = β = 1e-20 is ½ Σ (log p − log q)², not 0; Amari α → 0 is reverse KL, finite where q = 0 < p."""
    student = random_logits(5, VOCAB)
    teacher = random_logits(5, VOCAB)
    if zero_side == "student":
        student[:, 7:19] = float("-inf")
    elif zero_side == "teacher":
        teacher[:, 7:19] = float("-inf")
    rows, _ = check_against_reference(interpreted, name, params, student, teacher, 1.3, 1e-4, 1e-6, 1e-4)
    assert torch.isfinite(rows).all() and (rows[ROW_SCALE != 0] > 0.1).all()


# Compiles the kernel ahead of time for an H100 (sm_90): needs Triton's bundled toolchain, no GPU.
# In a subprocess, because the interpreter fixture above swaps this module's kernels.
COMPILE_FOR_H100 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from divergent.functional import triton_divergence as td

ids = td._KERNEL_IDS if sys.argv[1] == "all" else [int(i) for i in sys.argv[1].split(",")]
for dtype in sys.argv[2].split(","):
    signature = {"student_ptr": "*" + dtype, "teacher_ptr": "*" + dtype, "row_scale_ptr": "*fp32",
                 "rows_ptr": "*fp32", "vocab_size": "i32", "student_row_stride": "i64",
                 "teacher_row_stride": "i64", "inv_temperature": "fp32", "param0": "fp32",
                 "param1": "fp32", "param2": "fp32", "DIVERGENCE": "constexpr", "BLOCK_V": "constexpr"}
    for kernel_id in ids:
        source = triton.compiler.ASTSource(
            fn=td._fused_divergence_kernel, signature=signature,
            constexprs={"DIVERGENCE": kernel_id, "BLOCK_V": 4096},
        )
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
        assert compiled.asm["cubin"], kernel_id
    rowwise = {"logits_ptr": "*" + dtype, "vocab_size": "i32", "row_stride": "i64", "inv_temperature": "fp32",
               "BLOCK_V": "constexpr"}
    for kernel, extra in ((td._row_logsumexp_kernel, {"out_ptr": "*fp32"}),
                          (td._scaled_softmax_kernel, {"log_norm_ptr": "*fp32", "coefficient_ptr": "*fp32"})):
        names = kernel.arg_names
        signature = {name: {**rowwise, **extra}[name] for name in names}
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK_V": 4096})
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16}).asm["cubin"]
print("compiled", len(ids) + 2, "kernels for", sys.argv[2])
"""


@needs_triton
@pytest.mark.parametrize(
    ("kernel_ids", "dtypes"),
    [
        pytest.param("0,2,7,12", "bf16", id="forward_kl-js-alpha_beta_small-cauchy_schwarz-bf16"),
        pytest.param("all", "bf16,fp16,fp32", id="all-kernels-all-dtypes", marks=pytest.mark.slow),
    ],
)
def test_kernel_compiles_for_h100_without_a_gpu(kernel_ids, dtypes):
    """The interpreter does not type-check like the compiler does; compile for sm_90 too."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_H100, kernel_ids, dtypes],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("compiled")


def test_module_imports_and_declines_without_triton():
    """CI has no triton: the module must import and ``supports`` must say no."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "from divergent.functional import triton_divergence as td\n"
        "assert not td.triton_available()\n"
        "assert not any(td.supports(n) for n in ('forward_kl', 'js', 'sinkhorn'))\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
