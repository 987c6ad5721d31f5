"""dv.register_divergence: a user's divergence works everywhere a built-in does, and every mistake is named.

The divergence registered here is the triangular discrimination Δ(p, q) = Σ (p − q)² / (p + q)
(an f-divergence that is not built in); references are numpy formulas on probabilities and
finite differences (gradcheck), never the plumbing under test.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import divergent as dv
from divergent.functional import registry
from references import probs

NAME = "triangular"


def triangular(student_logprobs, teacher_logprobs, scale=1.0):
    """Σ (p − q)² / (p + q); the clamp keeps 0/0 (both zero) at 0 with a finite gradient."""
    p, q = teacher_logprobs.exp(), student_logprobs.exp()
    return scale * ((p - q) ** 2 / (p + q).clamp_min(1e-30)).sum(-1)


def triangular_reference(p, q, scale=1.0):
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(p + q > 0, (p - q) ** 2 / (p + q), 0.0)
    return scale * terms.sum(-1)


@pytest.fixture
def registered():
    """``triangular`` registered for one test, removed afterwards whatever happens."""
    spec = dv.register_divergence(
        NAME, triangular, params={"scale": 1.0},
        formula="Σ (p − q)² / (p + q)", summary="Triangular discrimination.", symmetric="yes", bounded="≤ 2",
    )
    yield spec
    if NAME in dv.available():
        registry.unregister_divergence(NAME)


@pytest.fixture
def cleanup():
    """Unregisters every user name a test leaves behind."""
    yield
    for name in [n for n in dv.available() if not dv.get_spec(n).builtin]:
        registry.unregister_divergence(name)


def _pair(shape=(5, 7), dtype=torch.float64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * scale, torch.randn(shape, generator=g, dtype=dtype) * scale


# ---------------------------------------------------------------- it works everywhere


def test_values_match_numpy_with_temperature_mask_and_reductions(registered):
    assert NAME in dv.available() and dv.available()[: len(registry.REGISTRY) - 1] == tuple(
        n for n in registry.REGISTRY if n != NAME)
    s, t = _pair(shape=(2, 4, 7))
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    for temperature in (1.0, 2.5):
        p, q = probs(t.numpy(), temperature), probs(s.numpy(), temperature)
        want = triangular_reference(p, q, scale=0.5)
        rows = dv.divergence(NAME, s, t, temperature=temperature, reduction="none", scale=0.5)
        np.testing.assert_allclose(rows.numpy(), want, rtol=1e-12)
        masked = dv.divergence(NAME, s, t, temperature=temperature, mask=mask, reduction="none", scale=0.5)
        np.testing.assert_allclose(masked.numpy(), np.where(mask.numpy(), want, 0.0), rtol=1e-12)
        mean = dv.divergence(NAME, s, t, temperature=temperature, mask=mask, scale=0.5)
        np.testing.assert_allclose(float(mean), want[mask.numpy()].mean(), rtol=1e-12)
        total = dv.divergence(NAME, s, t, temperature=temperature, mask=mask, reduction="sum", scale=0.5)
        np.testing.assert_allclose(float(total), want[mask.numpy()].sum(), rtol=1e-12)
        normalized = dv.divergence(NAME, s, t, temperature=temperature, mask=mask, normalizer=20, scale=0.5)
        np.testing.assert_allclose(float(normalized), want[mask.numpy()].sum() / 20, rtol=1e-12)
    # defaults come from params, float32 is computed in float32
    got = dv.divergence(NAME, s.float(), t.float(), reduction="none")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), triangular_reference(probs(t.numpy()), probs(s.numpy())), rtol=1e-5)


def test_gradients_by_finite_differences_to_student_and_teacher(registered):
    s, t = _pair(shape=(3, 5), scale=1.0)
    s.requires_grad_(True)
    t.requires_grad_(True)
    fn = lambda a, b: dv.divergence(NAME, a, b, temperature=1.7, reduction="none", scale=2.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s, t))


def test_zero_probability_classes_and_all_masked(registered):
    inf = float("-inf")
    s = torch.tensor([[0.3, inf, 1.0, -0.5], [1.0, 0.0, inf, 2.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1.0, inf, 0.2, 0.1], [0.5, 0.3, inf, 1.0]], dtype=torch.float64)
    rows = dv.divergence(NAME, s, t, reduction="none")
    np.testing.assert_allclose(rows.detach().numpy(), triangular_reference(probs(t.numpy()), probs(s.detach().numpy())))
    rows.sum().backward()
    assert torch.isfinite(s.grad).all()
    s.grad = None
    value = dv.divergence(NAME, s, t, mask=torch.zeros(2, dtype=torch.bool))
    assert float(value.detach()) == 0.0
    value.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_named_function_from_the_registry(registered):
    fn = dv.functional.triangular
    assert fn.__name__ == NAME and NAME in dir(dv.functional)
    signature = inspect.signature(fn)
    assert list(signature.parameters) == ["student_logits", "teacher_logits", "scale", "temperature", "mask",
                                          "reduction", "normalizer"]
    assert signature.parameters["scale"].default == 1.0
    assert signature.parameters["scale"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "Triangular discrimination" in fn.__doc__ and "Σ (p − q)² / (p + q)" in fn.__doc__
    s, t = _pair()
    torch.testing.assert_close(fn(s, t, scale=3.0), dv.divergence(NAME, s, t, scale=3.0))
    assert NAME not in dv.functional.__all__  # the built-ins' list is fixed at import
    with pytest.raises(AttributeError, match="no attribute 'triangularr'"):
        dv.functional.triangularr  # noqa: B018


def test_topk_teacher_through_the_buckets(registered):
    s, t = _pair(shape=(4, 9))
    sparse = dv.TopK.from_logits(t, k=3)
    p, q = probs(t.numpy()), probs(s.numpy())
    idx = sparse.indices.numpy()

    def buckets(x):
        top = np.take_along_axis(x, idx, -1)
        return np.concatenate([top, 1 - top.sum(-1, keepdims=True)], -1)

    got = dv.divergence(NAME, s, sparse, reduction="none")
    np.testing.assert_allclose(got.numpy(), triangular_reference(buckets(p), buckets(q)), rtol=1e-9)
    full = dv.TopK.from_logits(t, k=9)
    torch.testing.assert_close(dv.divergence(NAME, s, full, reduction="none"), dv.divergence(NAME, s, t, reduction="none"))


def test_refuses_topk_when_registered_so(cleanup):
    dv.register_divergence("dense_only", triangular, accepts_topk=False)
    s, t = _pair()
    with pytest.raises(ValueError, match="dense_only does not accept a TopK teacher"):
        dv.divergence("dense_only", s, dv.TopK.from_logits(t, k=2))


def test_loss_modules(registered):
    torch.manual_seed(0)
    s, t = _pair(shape=(6, 5))
    labels = torch.tensor([0, 4, -100, 2, 1, -100])
    keep = labels != -100
    p, q = probs(t.numpy()[keep.numpy()], 2.0), probs(s.numpy()[keep.numpy()], 2.0)
    soft = triangular_reference(p, q, scale=0.5).mean()
    module = dv.DivergenceLoss(NAME, temperature=2.0, scale=0.5)
    np.testing.assert_allclose(float(module(s[keep], t[keep])), 4.0 * soft, rtol=1e-12)
    loss = dv.DistillationLoss(NAME, hard_weight=0.3, soft_weight=0.7, temperature=2.0, scale=0.5)
    ce = float(F.cross_entropy(s[keep], labels[keep]))
    np.testing.assert_allclose(float(loss(s, t, labels)), 0.3 * ce + 0.7 * 4.0 * soft, rtol=1e-12)
    with pytest.raises(TypeError, match="scale must be any finite number, got str"):
        dv.DivergenceLoss(NAME, scale="big")


def test_linear_distillation_loss_uses_the_chunked_torch_path(registered):
    gen = torch.Generator().manual_seed(0)
    x_s = torch.randn(11, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    x_t, w_t = torch.randn(11, 4, generator=gen, dtype=torch.float64), torch.randn(9, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 9, (11,), generator=gen)
    labels[::4] = -100
    fused = dv.LinearDistillationLoss(NAME, chunk_size=4, hard_weight=0.2, soft_weight=0.8, temperature=1.5, scale=2.0)
    value = fused(x_s, w_s, x_t, w_t, labels)
    keep = (labels != -100).numpy()
    s, t = (x_s @ w_s.T).detach().numpy()[keep], (x_t @ w_t.T).numpy()[keep]
    soft = triangular_reference(probs(t, 1.5), probs(s, 1.5), scale=2.0)
    ce = F.cross_entropy(torch.from_numpy(s), labels[labels != -100], reduction="none").numpy()
    np.testing.assert_allclose(float(value.detach()), (0.2 * ce + 0.8 * 1.5**2 * soft).mean(), rtol=1e-10)
    assert torch.autograd.gradcheck(
        lambda a, b: dv.LinearDistillationLoss(NAME, chunk_size=4, scale=2.0)(a, b, x_t, w_t, labels), (x_s, w_s)
    )
    from divergent.functional import triton_divergence

    assert not triton_divergence.supports(NAME) and NAME not in triton_divergence.SUPPORTED_NAMES


def test_not_per_row_is_refused_by_the_fused_loss(cleanup):
    dv.register_divergence("batch_coupled", triangular, per_row=False)
    with pytest.raises(ValueError, match="'batch_coupled' is not per-row"):
        dv.LinearDistillationLoss("batch_coupled")


def test_a_trainer_runs_a_registered_divergence(registered):
    """The classifier trainer (and compare's rows) look names up in the registry."""
    from torch.utils.data import TensorDataset

    from divergent.data.vision import ClassificationData
    from divergent.methods.registry import get_method
    from divergent.models.classifiers import MLP
    from divergent.train.classifier import ClassifierTrainConfig, train_classifier

    assert get_method(NAME).kind == "offline"
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))
    data = ClassificationData("tiny", TensorDataset(x, y), TensorDataset(x[:16], y[:16]), TensorDataset(x[:16], y[:16]),
                              3, (1, 4, 4))
    student, teacher = MLP((1, 4, 4), 3, hidden=(8,)), MLP((1, 4, 4), 3, hidden=(8,))
    before = [p.detach().clone() for p in student.parameters()]
    result = train_classifier(student, data, ClassifierTrainConfig(method=NAME, epochs=1, batch_size=16, lr=1e-2),
                              teacher=teacher)
    assert result.status == "finished"
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_docs_table_lists_a_registered_name_until_it_is_removed(registered):
    assert f"| `{NAME}` | Σ (p − q)² / (p + q) | `scale=1.0` (any finite number) |" in dv.functional.render_markdown()
    registry.unregister_divergence(NAME)
    assert NAME not in dv.functional.render_markdown() and NAME not in dv.available()


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("params", "given", "error", "match"),
    [
        ({"scale": 1.0}, {"scal": 2.0}, TypeError, "unexpected parameter\\(s\\) scal \\(did you mean 'scale'\\?\\); valid parameters: scale"),
        ({"scale": 1.0}, {"scale": "2"}, TypeError, "parameter scale must be any finite number, got str '2'"),
        ({"scale": 1.0}, {"scale": True}, TypeError, "parameter scale must be any finite number, got bool"),
        ({"scale": 1.0}, {"scale": float("nan")}, ValueError, "parameter scale must be finite"),
        ({"steps": 3}, {"steps": 2.5}, ValueError, "parameter steps must be an integer, got 2.5"),
        ({"flag": False}, {"flag": 1}, TypeError, "parameter flag must be True or False, got int 1"),
        ({"mode": "a"}, {"mode": 3}, TypeError, "parameter mode must be a string, got int 3"),
        ({"scale": registry.ParamSpec("scale", 1.0, "weight", 0.0, 2.0)}, {"scale": 3.0}, ValueError,
         "parameter scale must be a number in \\[0, 2\\], got 3.0"),
    ],
)
def test_parameter_values_are_checked_by_the_defaults_type(cleanup, params, given, error, match):
    def fn(lq, lp, **kwargs):
        return ((lp.exp() - lq.exp()) ** 2).sum(-1)

    dv.register_divergence("checked", fn, params=params)
    s, t = _pair()
    with pytest.raises(error, match=match):
        dv.divergence("checked", s, t, **given)


def test_typed_parameters_reach_the_function(cleanup):
    seen = {}

    def fn(lq, lp, steps, flag, mode):
        seen.update(steps=steps, flag=flag, mode=mode)
        return (lp.exp() * (lp - lq)).sum(-1)

    dv.register_divergence("typed", fn, params={"steps": 3, "flag": False, "mode": "a"})
    s, t = _pair()
    dv.divergence("typed", s, t, steps=4.0, flag=True)
    assert seen == {"steps": 4, "flag": True, "mode": "a"} and type(seen["steps"]) is int


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"temperature": 1.0}, ValueError, "parameter 'temperature': the name is taken"),
        ({"hard_weight": 1.0}, ValueError, "parameter 'hard_weight': the name is taken"),
        ({"gamma": None}, TypeError, "default must be a bool, int, float or str"),
        ({"gamma": [1, 2]}, TypeError, "default must be a bool, int, float or str"),
        ({"gamma": float("inf")}, ValueError, "parameter gamma must be finite"),
        ({"not valid": 1.0}, ValueError, "must be a Python identifier"),
        ({"gamma": registry.ParamSpec("delta", 1.0)}, ValueError, "its ParamSpec is named 'delta'"),
        ([("gamma", 1.0)], TypeError, "params must map parameter names to defaults"),
    ],
)
def test_bad_parameter_declarations_raise_at_registration(cleanup, params, error, match):
    with pytest.raises(error, match=match):
        dv.register_divergence("bad_params", lambda lq, lp, **kw: lq.sum(-1), params=params)
    assert "bad_params" not in dv.available()


# ---------------------------------------------------------------- names, metadata, the function


def test_names_overwrite_and_unregister(cleanup):
    fn = lambda lq, lp: (lp.exp() * (lp - lq)).sum(-1)  # noqa: E731
    dv.register_divergence("mine", fn)
    with pytest.raises(ValueError, match="'mine' is already registered.*overwrite=True"):
        dv.register_divergence("mine", fn)
    other = lambda lq, lp: 2 * (lp.exp() * (lp - lq)).sum(-1)  # noqa: E731
    dv.register_divergence("mine", other, overwrite=True)
    s, t = _pair()
    torch.testing.assert_close(dv.divergence("mine", s, t), 2 * dv.functional.forward_kl(s, t))
    for builtin in ("forward_kl", "sinkhorn"):
        with pytest.raises(ValueError, match=f"'{builtin}' is a built-in divergence and cannot be replaced"):
            dv.register_divergence(builtin, fn, overwrite=True)
        with pytest.raises(ValueError, match="built-in divergence and cannot be unregistered"):
            registry.unregister_divergence(builtin)
    registry.unregister_divergence("mine")
    with pytest.raises(ValueError, match="unknown divergence 'mine'"):
        dv.divergence("mine", s, t)
    with pytest.raises(ValueError, match="unknown divergence 'mine'"):
        registry.unregister_divergence("mine")
    for bad in ("", "my-kl", "_private", "2x"):
        with pytest.raises(ValueError, match="name must be a Python identifier"):
            dv.register_divergence(bad, fn)
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        dv.register_divergence("mine", fn, overwrite="yes")


def test_classifier_method_names_and_aliases_are_refused(cleanup):
    """A compare row or ClassifierTrainConfig(method=) names a divergence or a method: never both."""
    import subprocess
    import sys

    from divergent.methods import registry as methods

    fn = lambda lq, lp: (lp.exp() * (lp - lq)).sum(-1)  # noqa: E731
    for taken, holder in (("dkd", "a classifier method"), ("ce", "a classifier method"),
                          ("kd", "an alias of the classifier method 'hinton'")):
        with pytest.raises(ValueError, match=f"'{taken}' is already {holder}"):
            dv.register_divergence(taken, fn)
        assert taken not in dv.available()
    # A user's method reserves its name until it is unregistered.
    methods.register_method("mymethod", lambda s, t, y: F.cross_entropy(s, y))
    try:
        with pytest.raises(ValueError, match="'mymethod' is already a classifier method"):
            dv.register_divergence("mymethod", fn)
    finally:
        methods.unregister_method("mymethod")
    dv.register_divergence("mymethod", fn)
    registry.unregister_divergence("mymethod")
    # Also before divergent.methods was ever imported (a plugin registering at start-up).
    code = ("import sys, divergent as dv\n"
            "assert 'divergent.methods' not in sys.modules\n"
            "try:\n    dv.register_divergence('nkd', lambda a, b: (a - b).sum(-1))\n"
            "except ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'nkd' is already a classifier method" in out


def test_metadata_keys_and_types(cleanup):
    fn = lambda lq, lp: (lp.exp() * (lp - lq)).sum(-1)  # noqa: E731
    with pytest.raises(TypeError, match="unknown metadata symetric \\(did you mean 'symmetric'\\?\\); valid keys: "
                                        "formula, summary, behaviour, symmetric, bounded, source, per_row, accepts_topk"):
        dv.register_divergence("meta", fn, symetric="yes")
    with pytest.raises(TypeError, match="per_row must be True or False"):
        dv.register_divergence("meta", fn, per_row="no")
    with pytest.raises(TypeError, match="formula must be a string"):
        dv.register_divergence("meta", fn, formula=3)
    spec = dv.register_divergence("meta", fn, source="my notes")
    assert spec.source == "my notes" and spec.formula == "not stated" and not spec.builtin
    assert spec.triton_kernel is None and spec.kernel is None and spec.fn is fn


def test_the_function_is_checked(cleanup):
    with pytest.raises(TypeError, match="fn must be callable"):
        dv.register_divergence("broken", "not a function")
    with pytest.raises(TypeError, match="cannot be called as fn\\(student_logprobs, teacher_logprobs, gamma=...\\)"):
        dv.register_divergence("broken", lambda lq, lp: lq.sum(-1), params={"gamma": 1.0})
    with pytest.raises(TypeError, match="cannot be called as fn\\(student_logprobs, teacher_logprobs\\)"):
        dv.register_divergence("broken", lambda lq: lq.sum(-1))


@pytest.mark.parametrize(
    ("fn", "error", "match"),
    [
        (lambda lq, lp: 1.0, TypeError, "must return a torch.Tensor of per-row values, got float"),
        (lambda lq, lp: (lp - lq).sum(), ValueError, "must return one value per row, shape \\(5,\\).*got shape \\(\\)"),
        (lambda lq, lp: (lp - lq), ValueError, "must return one value per row, shape \\(5,\\).*got shape \\(5, 7\\)"),
        (lambda lq, lp: (lp > lq).sum(-1), TypeError, "must return floating-point values, got dtype torch.int64"),
        (lambda lq, lp: (lp.exp() * (lp - lq)).sum(-1).detach(), ValueError, "no gradient path to its inputs"),
        (lambda lq, lp: (lp.exp() * lq).sum(-1) * float("nan"), ValueError, "returned NaN from valid inputs"),
    ],
    ids=["not-a-tensor", "scalar", "not-reduced", "integer", "detached", "nan"],
)
def test_the_functions_output_is_checked_and_named(cleanup, fn, error, match):
    dv.register_divergence("faulty", fn)
    s, t = _pair()
    with pytest.raises(error, match=f"divergence 'faulty' \\(fn .*<lambda>\\) .*{match}"):
        dv.divergence("faulty", s.requires_grad_(True), t)


def test_zero_probabilities_without_limits_name_the_function(cleanup):
    """p·log p written naively gives 0·(−inf) = NaN at a zero-probability class: the user's fn is named."""
    def naive_kl(lq, lp):
        return (lp.exp() * (lp - lq)).sum(-1)

    dv.register_divergence("naive_kl", naive_kl)
    inf = float("-inf")
    s = torch.tensor([[0.0, 1.0, 2.0]])
    t = torch.tensor([[0.0, inf, 2.0]])
    with pytest.raises(ValueError, match="naive_kl.*returned NaN from valid inputs.*-inf where a probability is 0"):
        dv.divergence("naive_kl", s, t)


def test_unknown_names_suggest_the_closest():
    s, t = _pair()
    with pytest.raises(ValueError, match="unknown divergence 'forwad_kl' \\(did you mean 'forward_kl'\\?\\); "
                                         "valid names: forward_kl, reverse_kl"):
        dv.divergence("forwad_kl", s, t)
    with pytest.raises(ValueError, match="did you mean 'hellinger'"):
        dv.DivergenceLoss("helinger")
    with pytest.raises(ValueError, match="did you mean 'js'"):
        dv.LinearDistillationLoss("jss")
    with pytest.raises(TypeError, match="name must be a string"):
        dv.divergence(3, s, t)


def test_no_warnings(registered):
    s, t = _pair()
    s.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dv.divergence(NAME, s, t).backward()
