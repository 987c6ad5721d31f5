"""KL-Top (OSTQuant) against the authors' formula, a float64 reference, and in every path a divergence takes.

The official formula is transcribed from OSTQuant's released training code,
``quant/trainer.py``, ``MyTrainer.compute_loss``, the ``"kl_top" in loss_type`` branch
(read at github.com/weesunghyun/OSTQuant, a copy of the authors' release, commit
a5d1247887a48948299ba8789b50749a8019dfa2):

    top_ori_logits, indices = ori_logits.topk(k, dim=-1, sorted=False)
    if args.post_attn:
        ref = F.softmax(ori_logits, dim=-1).gather(-1, indices).flatten(0, -2)
        can = F.log_softmax(logits, dim=-1).gather(-1, indices).flatten(0, -2)
        loss = F.kl_div(can, ref, reduction="batchmean")
    else:
        top_logits = logits.gather(-1, indices)
        loss = F.kl_div(F.log_softmax(top_logits, -1).flatten(0, -2),
                        F.softmax(top_ori_logits, -1).flatten(0, -2), reduction="batchmean")

(``ori_logits``: the full-precision model = teacher; ``logits``: the quantized model = student.)
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as torch_f

import divergent as dv
from divergent.functional.fused_linear import fused_linear_distillation  # noqa: F401  (the path under test)
from divergent.losses.linear import LinearDistillationLoss
from references import kl_top as reference_kl_top
from references import probs


def official_kl_top(logits, ori_logits, k, post_attn):
    """The released scripts' loss, transcribed (see the module docstring)."""
    top_ori_logits, indices = ori_logits.topk(k, dim=-1, sorted=False)
    if post_attn:
        ref = torch_f.softmax(ori_logits, dim=-1).gather(-1, indices).flatten(0, -2)
        can = torch_f.log_softmax(logits, dim=-1).gather(-1, indices).flatten(0, -2)
        return torch_f.kl_div(can, ref, reduction="batchmean")
    top_logits = logits.gather(-1, indices)
    return torch_f.kl_div(torch_f.log_softmax(top_logits, dim=-1).flatten(0, -2),
                          torch_f.softmax(top_ori_logits, dim=-1).flatten(0, -2), reduction="batchmean")


def _pair(shape=(2, 5, 40), dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * scale, torch.randn(shape, generator=g, dtype=dtype) * scale


@pytest.mark.parametrize("k", [1, 7, 40])
@pytest.mark.parametrize("renormalize", [False, True])
def test_equals_the_official_formula(k, renormalize):
    """post_attn=True is renormalize=False; the other branch is renormalize=True; batchmean = mean over tokens."""
    s, t = _pair()
    s.requires_grad_(True)
    ours = dv.functional.kl_top(s, t, k=k, renormalize=renormalize)
    theirs = official_kl_top(s, t, k, post_attn=not renormalize)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_theirs,) = torch.autograd.grad(official_kl_top(s, t, k, post_attn=not renormalize), s)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 11])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_float64_reference(k, renormalize, temperature):
    s, t = _pair(shape=(6, 11), scale=2.0)
    got = dv.functional.kl_top(s, t, k=k, renormalize=renormalize, temperature=temperature, reduction="none")
    want = reference_kl_top(probs(t.numpy(), temperature), probs(s.numpy(), temperature), k=k, renormalize=renormalize)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


def test_float32_and_bfloat16_close_to_float64():
    s, t = _pair(dtype=torch.float32)
    want = dv.functional.kl_top(s.double(), t.double(), k=5, reduction="none")
    got = dv.functional.kl_top(s, t, k=5, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    half = dv.functional.kl_top(s.bfloat16(), t.bfloat16(), k=5, reduction="none")
    torch.testing.assert_close(half.double(),
                               dv.functional.kl_top(s.bfloat16().double(), t.bfloat16().double(), k=5, reduction="none"),
                               rtol=1e-4, atol=1e-5)


def test_k_at_or_above_the_vocabulary_is_forward_kl():
    """The official torch.topk raises for k > V; here k takes every class (the default k=1000 on a small vocabulary)."""
    s, t = _pair(shape=(4, 9))
    for k in (9, 10, 1000):
        torch.testing.assert_close(dv.functional.kl_top(s, t, k=k), dv.functional.forward_kl(s, t))
        torch.testing.assert_close(dv.functional.kl_top(s, t, k=k, renormalize=True), dv.functional.forward_kl(s, t))


def test_partial_sum_can_be_negative_and_is_at_least_minus_one_over_e():
    """Σ_S p log(p/q) < 0 when the student puts more mass than the teacher on S; renormalised it is a KL ≥ 0."""
    t = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[5.0, -5.0, -5.0, -5.0]], dtype=torch.float64)
    partial = float(dv.functional.kl_top(s, t, k=1))
    assert -1 / np.e <= partial < 0
    assert float(dv.functional.kl_top(s, t, k=1, renormalize=True)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("renormalize", [False, True])
def test_gradcheck_both_arguments(renormalize):
    s, t = _pair(shape=(3, 8), scale=1.0)
    s.requires_grad_(True)
    t.requires_grad_(True)
    fn = lambda a, b: dv.functional.kl_top(a, b, k=3, renormalize=renormalize, temperature=1.3,  # noqa: E731
                                           reduction="none")
    assert torch.autograd.gradcheck(fn, (s, t))


def test_zero_probabilities():
    """−inf logits: 0·log 0 = 0, a student with no mass on a top class gives inf (not NaN), gradients finite."""
    inf = float("-inf")
    t = torch.tensor([[2.0, 1.0, inf, 0.0]], dtype=torch.float64)
    s = torch.tensor([[0.5, inf, 1.0, 0.0]], dtype=torch.float64)
    assert float(dv.functional.kl_top(s.detach(), t, k=1)) < float("inf")
    assert float(dv.functional.kl_top(s, t, k=2)) == float("inf")
    assert float(dv.functional.kl_top(s, t, k=2, renormalize=True)) == float("inf")
    s2 = torch.tensor([[inf, inf, 1.0, 0.0]], dtype=torch.float64)
    assert float(dv.functional.kl_top(s2, t, k=2, renormalize=True)) == float("inf")
    both = torch.tensor([[0.3, inf, 1.0, -0.5]], dtype=torch.float64, requires_grad=True)
    value = dv.functional.kl_top(both, both.detach().clone() + 0.1, k=3, renormalize=True)
    value.backward()
    assert torch.isfinite(both.grad).all()


# ---------------------------------------------------------------- a TopK teacher


@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_teacher_equals_dense_when_it_stores_the_top_k(renormalize):
    """The teacher's top k are among its stored classes: with stored k' ≥ k the value (and gradient) is the dense one."""
    s, t = _pair(shape=(3, 4, 30))
    sparse = dv.TopK.from_logits(t, k=8)
    for k in (1, 5, 8):
        s_dense = s.clone().requires_grad_(True)
        s_sparse = s.clone().requires_grad_(True)
        dense = dv.functional.kl_top(s_dense, t, k=k, renormalize=renormalize)
        bucketed = dv.functional.kl_top(s_sparse, sparse, k=k, renormalize=renormalize)
        torch.testing.assert_close(bucketed, dense, rtol=1e-10, atol=1e-12)
        (g_dense,) = torch.autograd.grad(dense, s_dense)
        (g_sparse,) = torch.autograd.grad(bucketed, s_sparse)
        torch.testing.assert_close(g_sparse, g_dense, rtol=1e-9, atol=1e-12)
    # k above the stored k takes the stored classes (never the tail bucket): k = 1000 is k = 8
    torch.testing.assert_close(dv.functional.kl_top(s, sparse), dv.functional.kl_top(s, t, k=8))


def test_topk_teacher_never_picks_the_tail_bucket():
    """A flat teacher's tail (most of the mass) would be the largest bucket; it is not a class."""
    t = torch.zeros(1, 50, dtype=torch.float64)
    t[0, :2] = 1.0
    s = torch.randn(1, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sparse = dv.TopK.from_logits(t, k=2)
    torch.testing.assert_close(dv.functional.kl_top(s, sparse, k=1), dv.functional.kl_top(s, t, k=1))


# ---------------------------------------------------------------- loss modules, fused loss


def test_loss_modules_and_fused_output_layer_loss():
    g = torch.Generator().manual_seed(0)
    n, h, vocab = 23, 8, 64
    x_s = torch.randn(n, h, generator=g, requires_grad=True)
    w_s = (torch.randn(vocab, h, generator=g) * 0.5).requires_grad_(True)
    x_t, w_t = torch.randn(n, h + 4, generator=g), torch.randn(vocab, h + 4, generator=g) * 0.5
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::4] = -100
    counted = labels != -100
    student, teacher = x_s @ w_s.T, x_t @ w_t.T
    want = 4.0 * dv.functional.kl_top(student[counted], teacher[counted], k=6, renormalize=True, temperature=2.0)
    module = dv.DivergenceLoss("kl_top", temperature=2.0, k=6, renormalize=True)
    torch.testing.assert_close(module(student[counted], teacher[counted]), want)
    fused = LinearDistillationLoss("kl_top", chunk_size=5, temperature=2.0, hard_weight=0.0, soft_weight=1.0, k=6,
                                   renormalize=True)(x_s, w_s, x_t, w_t, labels)
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-6)
    for got, ref in zip(torch.autograd.grad(fused, [x_s, w_s]), torch.autograd.grad(want, [x_s, w_s])):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    # a TopK teacher in the fused loss
    sparse = dv.TopK.from_logits(teacher.detach(), k=16)
    fused_topk = LinearDistillationLoss("kl_top", chunk_size=7, hard_weight=0.0, soft_weight=1.0, k=6)(x_s, w_s, None, sparse, labels)
    torch.testing.assert_close(fused_topk, dv.functional.kl_top(student[counted], teacher[counted], k=6),
                               rtol=1e-5, atol=1e-6)


def test_no_triton_kernel_and_declared_so():
    from divergent.functional import triton_divergence

    spec = dv.get_spec("kl_top")
    assert spec.triton_kernel is None and spec.per_row and spec.accepts_topk
    assert "kl_top" not in triton_divergence.SUPPORTED_NAMES


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"k": 0}, ValueError, r"kl_top: parameter k must be an integer in \[1, inf\], got 0"),
        ({"k": 2.5}, ValueError, "kl_top: parameter k must be an integer, got 2.5"),
        ({"k": "10"}, TypeError, "kl_top: parameter k must be an integer"),
        ({"renormalize": 1}, TypeError, "kl_top: parameter renormalize must be True or False, got int 1"),
        ({"top_k": 5}, TypeError, "unexpected parameter.*top_k"),
    ],
)
def test_bad_parameters_name_the_argument(params, error, match):
    s, t = _pair(shape=(2, 5))
    with pytest.raises(error, match=match):
        dv.functional.kl_top(s, t, **params)


# ---------------------------------------------------------------- trainers, compare rows, the CLI


def test_distill_lm_and_compare_take_kl_top(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from rich.console import Console
    from typer.testing import CliRunner

    import lm_helpers as H
    from divergent.cli import app
    from divergent.experiments.compare import CompareConfig, run_compare

    monkeypatch.setenv("DIVERGENT_CACHE_DIR", str(tmp_path / "cache"))
    teacher, student, _ = H.save_pair(tmp_path)
    data = H.write_jsonl(tmp_path / "pc.jsonl", H.prompt_completion_rows(12))
    args = ["distill-lm", "--teacher", str(teacher), "--student", str(student), "--data", str(data), "--steps", "2",
            "--batch-size", "4", "-d", "kl_top", "--set", "divergence_params={kl_top: {k: 8, renormalize: true}}",
            "--set", "evaluations=1", "--threads", "1"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    assert [r["divergence"] for r in rows] == ["-", "kl_top"] and rows[-1]["status"] == "finished"
    bad = CliRunner().invoke(app, ["distill-lm", "--teacher", str(teacher), "--student", str(student), "--data",
                                   str(data), "-d", "kl_top", "--set", "divergence_params={kl_top: {k: 0}}",
                                   "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "kl_top: parameter k must be an integer in [1, inf], got 0" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and "Traceback" not in bad.output

    config = CompareConfig(divergences=["kl_top"], methods=[], baseline="kl_top", seeds=[0], epochs=1, teacher_epochs=2,
                           teacher_model="mlp-32", student_model="mlp-8", divergence_params={"kl_top": {"k": 3}},
                           output_dir=str(tmp_path / "compare"))
    results = run_compare(config, console=Console(file=open(os.devnull, "w")))
    (run,) = [r for r in results["runs"] if r["name"] == "kl_top"]
    assert 0 <= run["accuracy"] <= 1


def test_hf_distillation_trainer_takes_kl_top(tmp_path):
    pytest.importorskip("transformers")
    import lm_helpers as H
    from divergent.hf import DistillationConfig, DistillationTrainer

    tokenizer = H.tokenizer(300)
    student, teacher = H.llama(len(tokenizer), 32, 1, seed=0), H.llama(len(tokenizer), 48, 1, seed=1)
    args = DistillationConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                              learning_rate=1e-2, save_strategy="no", use_cpu=True, report_to=[], seed=0,
                              disable_tqdm=True, logging_steps=1, divergence="kl_top",
                              divergence_params={"k": 16, "renormalize": True}, chunk_size=7)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=H.text_rows(8),
                                  processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
