"""Edges found by probing the library as a user would (issue 18): each is a place where a user
got a wrong answer or a deep traceback. References are closed forms, mpmath or the CLI's own
documented behaviour as a user sees it."""

import json

import pytest
import torch
from typer.testing import CliRunner

import divergent as dv
from divergent.cli import app

# ---------------------------------------------------------------- TopK: the tolerance of the stored dtype


def test_bf16_values_held_as_float32_keep_bf16_tolerance():
    """A bf16 TopK read back as float32 (``.float()``) is judged by bf16's rounding, not float32's."""
    g = torch.Generator().manual_seed(0)
    stored = torch.log_softmax(torch.randn(16, 1000, generator=g) * 3, -1).to(torch.bfloat16)
    assert float(torch.logsumexp(stored.double(), -1).exp().max()) > 1.0001  # beyond float32's rounding
    indices = torch.arange(1000).expand(16, 1000)
    cast = dv.TopK(indices, stored).logprobs.float()
    teacher = dv.TopK(indices, cast)  # was: "sum to more than 1 ... beyond the rounding of torch.float32"
    student = torch.randn(16, 1000, generator=g)
    p = torch.softmax(stored.double(), -1)  # normalised: k = V is the whole distribution
    want = (p * (p.log() - torch.log_softmax(student.double(), -1))).sum(-1)
    torch.testing.assert_close(dv.functional.forward_kl(student, teacher, reduction="none").double(), want,
                               rtol=1e-5, atol=1e-6)
    # Float32 values that are not bf16 numbers keep float32's tolerance.
    with pytest.raises(ValueError, match="beyond the rounding of torch.float32"):
        dv.TopK(torch.tensor([[0, 1]]), torch.tensor([[-0.69, -0.69]]))
    # bf16 numbers held as float32 still refuse what bf16 rounding does not explain; the message says so.
    with pytest.raises(ValueError, match="rounding of torch.bfloat16 \\(the values are torch.bfloat16 numbers"):
        dv.TopK(torch.tensor([[0, 1]]), torch.tensor([[-0.5, -0.625]]))


def _cli(args):
    return CliRunner().invoke(app, args)


def test_bf16_cache_with_k_equal_vocab_written_by_cache_teacher_trains_in_distill_lm(tmp_path):
    pytest.importorskip("transformers")
    import lm_helpers as H

    teacher, student, tok = H.save_pair(tmp_path)
    data = H.write_jsonl(tmp_path / "pc.jsonl", H.prompt_completion_rows(8))
    vocab = len(tok)
    cache = tmp_path / "cache-bf16"
    made = _cli(["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--k", str(vocab),
                 "--logprob-dtype", "bfloat16", "-o", str(cache)])
    assert made.exit_code == 0, made.output
    index = json.loads((cache / "index.json").read_text())
    assert index["k"] == vocab and index["logprob_dtype"] == "bfloat16"
    from safetensors.torch import load_file

    shard = load_file(str(cache / index["splits"]["train"][0]["file"]))
    real = shard["attention_mask"].bool()
    mass = torch.logsumexp(shard["logprobs"][real].double(), -1).exp()
    assert float(mass.max()) > 1.0001  # the stored rows are beyond float32's rounding: the case at issue
    run = _cli(["distill-lm", "--teacher-cache", str(cache), "--student", str(student), "--steps", "2",
                "--batch-size", "4", "-d", "forward_kl", "--threads", "1", "-o", str(tmp_path / "runs")])
    assert run.exit_code == 0, run.output
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("distill-lm-")]
    rows = json.loads((run_dir / "results.json").read_text())
    assert "forward_kl" in json.dumps(rows)


# ---------------------------------------------------------------- α → 0 where the student's q underflows


def _ab_limit_mp(student, teacher, beta, mirror=False):
    """D_AB at (0, β) in mpmath: 1/β² Σ [q^β log(q^β/p^β) − q^β + p^β] (mirror: (β, 0), p and q swapped)."""
    import mpmath

    mpmath.mp.dps = 50

    def probs(row):
        z = mpmath.fsum(mpmath.exp(x) for x in row if x != float("-inf"))
        return [mpmath.mpf(0) if x == float("-inf") else mpmath.exp(x) / z for x in row]

    p, q = probs(teacher), probs(student)
    if mirror:
        p, q = q, p
    total = mpmath.mpf(0)
    for pk, qk in zip(p, q):
        if qk == 0:
            total += pk ** beta / beta**2
        elif pk == 0:
            return float("inf")
        else:
            total += (qk**beta * beta * (mpmath.log(qk) - mpmath.log(pk)) - qk**beta + pk**beta) / beta**2
    return float(total)


@pytest.mark.parametrize("student_logit", [-120.0, -200.0, -30.0])
def test_alpha_at_zero_is_infinite_where_the_teacher_is_zero_even_if_q_underflows(student_logit):
    """Amari α at α=0 is KL(q‖p): +inf when p = 0 < q, also when q = e^-120 underflows float32."""
    ninf = float("-inf")
    student = [[0.0, 1.0, student_logit], [0.0, 1.0, student_logit]]
    teacher = [[0.5, 0.0, ninf], [0.5, 0.0, -100.0]]
    got = dv.divergence("alpha", torch.tensor(student), torch.tensor(teacher), alpha=0.0, reduction="none")
    want = [_ab_limit_mp(s, t, 1.0) for s, t in zip(student, teacher)]
    assert got[0].item() == float("inf") == want[0]
    assert got[1].item() == pytest.approx(want[1], rel=1e-5)
    assert dv.divergence("reverse_kl", torch.tensor(student), torch.tensor(teacher), reduction="none")[0] == float("inf")


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_alpha_beta_at_its_log_limits_is_infinite_where_one_side_is_zero(beta):
    """(0, β): +inf where p = 0 < q; (β, 0): +inf where q = 0 < p, however small the other side is."""
    ninf = float("-inf")
    low = [[0.0, 1.0, -250.0]]
    zero = [[0.5, 0.0, ninf]]
    got = dv.divergence("alpha_beta", torch.tensor(low), torch.tensor(zero), alpha=0.0, beta=beta)
    assert got.item() == float("inf") == _ab_limit_mp(low[0], zero[0], beta)
    mirrored = dv.divergence("alpha_beta", torch.tensor(zero), torch.tensor(low), alpha=beta, beta=0.0)
    assert mirrored.item() == float("inf") == _ab_limit_mp(zero[0], low[0], beta, mirror=True)
    # Where both sides have support the value is finite and matches the closed form.
    finite = [[0.5, 0.0, -100.0]]
    got = dv.divergence("alpha_beta", torch.tensor(low, dtype=torch.float64), torch.tensor(finite, dtype=torch.float64),
                        alpha=0.0, beta=beta)
    assert got.item() == pytest.approx(_ab_limit_mp(low[0], finite[0], beta), rel=1e-9)


# ---------------------------------------------------------------- clear errors instead of deep tracebacks


def test_a_parameter_beyond_float32_is_named():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"bdkd: parameter high_weight must be finite in float32 .*got 1e\+39"):
        dv.divergence("bdkd", s, t, high_weight=1e39)
    with pytest.raises(ValueError, match="parameter low_weight must be finite in float32"):
        dv.LinearDistillationLoss("bdkd", low_weight=-1e39)
    assert torch.isfinite(dv.divergence("bdkd", s, t, high_weight=1e38))  # within float32: computed


def test_a_mask_without_values_is_named():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="mask is on the meta device: it has a shape but no values"):
        dv.divergence("forward_kl", s, t, mask=torch.ones(3, dtype=torch.bool, device="meta"))


def test_a_second_backward_says_retain_graph():
    """Plain, TopK and fused paths: a second backward names retain_graph (never a deep 'does not require grad')."""
    t = torch.randn(4, 5)
    student = torch.randn(4, 5, requires_grad=True)
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    losses = {
        "plain": lambda: dv.divergence("js", student, t),
        "TopK": lambda: dv.divergence("forward_kl", student, dv.TopK.from_logits(t, k=2)),
        "fused": lambda: dv.LinearDistillationLoss("js")(hidden, weight, torch.randn(4, 8), torch.randn(5, 8)),
    }
    for path, loss_of in losses.items():
        loss = loss_of()
        loss.backward()
        with pytest.raises(RuntimeError, match="retain_graph"):
            loss.backward()


def test_topk_values_changed_to_nan_after_construction_are_named():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    teacher = dv.TopK.from_logits(t, k=2)
    teacher.logprobs[1, 0] = float("nan")  # TopK checked its values when it was built, not since
    with pytest.raises(ValueError, match="TopK teacher's logprobs contain NaN or \\+inf \\(1 entries\\).*changed afterwards"):
        dv.divergence("forward_kl", s, teacher)
    with pytest.raises(ValueError, match="TopK teacher's logprobs contain NaN"):
        dv.LinearDistillationLoss("js")(torch.randn(3, 4), torch.randn(5, 4), None, teacher)


# ---------------------------------------------------------------- divergent compare as a user runs it

TINY_COMPARE = ["--seeds", "0", "--epochs", "1", "--teacher-epochs", "1", "--teacher-model", "mlp-8",
                "--student-model", "mlp-8"]


def test_compare_interrupted_while_writing_the_report_says_how_to_resume(tmp_path, monkeypatch):
    import divergent.experiments.compare as compare_module

    real = compare_module.plot_reliability

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_module, "plot_reliability", ctrl_c)
    out = tmp_path / "out"
    cut = _cli(["compare", "-d", "forward_kl", *TINY_COMPARE, "-o", str(out)])
    (run_dir,) = out.iterdir()
    text = " ".join(cut.output.split())
    assert cut.exit_code == 130, cut.output
    assert f"interrupted while writing the report; every run is saved; write the report with: divergent compare --resume {run_dir}" in text
    monkeypatch.setattr(compare_module, "plot_reliability", real)
    resumed = _cli(["compare", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert (run_dir / "report.md").is_file() and (run_dir / "reliability.png").is_file()


def test_compare_data_error_prints_no_run_folder(tmp_path):
    import numpy as np

    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 2)))  # no X, y
    result = _cli(["compare", "--data", str(bad), *TINY_COMPARE, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "bad.npz" in result.output
    assert "run folder" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_readme_plugin_example_with_one_row_runs(tmp_path, monkeypatch):
    """`divergent --plugin mymodule compare -d weighted_sq`: one row with no baseline named is its own baseline."""
    import sys

    from divergent.functional import registry

    (tmp_path / "mymodule.py").write_text(
        "import divergent as dv\n\n"
        "def squared_logratio(student_logprobs, teacher_logprobs, gamma):\n"
        "    return gamma * ((teacher_logprobs - student_logprobs) ** 2 * teacher_logprobs.exp()).sum(-1)\n\n"
        "dv.register_divergence('weighted_sq', squared_logratio, params={'gamma': 1.0})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        done = _cli(["--plugin", "mymodule", "compare", "-d", "weighted_sq", *TINY_COMPARE, "-o", str(tmp_path / "out")])
    finally:
        sys.modules.pop("mymodule", None)
        if "weighted_sq" in dv.available():
            registry.unregister_divergence("weighted_sq")
    assert done.exit_code == 0, done.output
    (run_dir,) = (tmp_path / "out").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["baseline"] == "weighted_sq"
    assert {r["name"] for r in results["runs"]} == {"weighted_sq", "student alone (CE)"}


def test_rl_regulariser_choice_says_did_you_mean():
    result = _cli(["rl", "--regulariser", "dph", "--divergence", "jss"])
    assert result.exit_code == 2
    assert "dph_divergence must be one of 'forward_kl', 'js', 'alpha', got 'jss' (did you mean 'js'?)" in result.output
    from divergent.rl import get_regulariser

    with pytest.raises(ValueError, match="got 'k33' \\(did you mean 'k3'\\?\\)"):
        get_regulariser("reverse_kl").resolve({"kl_estimator": "k33"})


@pytest.mark.parametrize(("name", "params", "student", "teacher"), [
    ("alpha_beta", {"alpha": 0.0, "beta": 1.0}, [[0.0, 1.0, -120.0]], [[0.5, 0.0, float("-inf")]]),
    ("alpha_beta", {"alpha": 1.0, "beta": 0.0}, [[0.5, 0.0, float("-inf")]], [[0.0, 1.0, -120.0]]),
    ("alpha", {"alpha": 0.0}, [[0.0, 1.0, -120.0]], [[0.5, 0.0, float("-inf")]]),
    ("reverse_kl", {}, [[0.0, 1.0, -120.0]], [[0.5, 0.0, float("-inf")]]),
    ("forward_kl", {}, [[0.5, 0.0, float("-inf")]], [[0.0, 1.0, -120.0]]),
])
def test_the_triton_kernel_gives_the_same_infinity(name, params, student, teacher):
    """The fused GPU kernel (here under Triton's interpreter) decides p = 0 < q in log space too (was 0·inf)."""
    pytest.importorskip("triton")
    import importlib
    import os

    from divergent.functional import triton_divergence

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        kernel = importlib.reload(triton_divergence)
        rows, _ = kernel.rows_and_student_grad(name, torch.tensor(student), torch.tensor(teacher), temperature=1.0,
                                               params=params, row_scale=torch.ones(1), block_size=64)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
        importlib.reload(triton_divergence)
    assert rows.tolist() == [float("inf")]
    assert dv.divergence(name, torch.tensor(student), torch.tensor(teacher), **params).item() == float("inf")
