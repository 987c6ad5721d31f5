"""Public API surface, registry metadata, generated docs, loss modules, config, report, checkpoints."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import divergent as dv
from divergent import config, io
from divergent.experiments import report
from divergent.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
# The names DESIGN.md promises; the registry may hold more built-ins (each then tested the same way).
DESIGN_NAMES = ("forward_kl", "reverse_kl", "js", "tvd", "skew_kl", "skew_reverse_kl", "alpha_beta", "alpha",
                "hellinger", "chi2", "cauchy_schwarz", "bdkd", "sinkhorn", "kl_top")
BUILTINS = tuple(name for name in dv.available() if dv.get_spec(name).builtin)


def test_all_names_registered_with_one_function_each():
    assert BUILTINS[: len(DESIGN_NAMES)] == DESIGN_NAMES
    assert dv.functional.__all__[-len(BUILTINS):] == list(BUILTINS)
    for name in BUILTINS:
        fn = getattr(dv.functional, name)
        spec = dv.get_spec(name)
        assert spec.formula and spec.source and spec.behaviour and spec.symmetric and spec.bounded
        assert spec.example is not None, f"{name}: the registry entry needs an example (its doctest)"
        # the named function's signature is made from the registry: keyword-only parameters
        # with the registry's defaults, then the shared keywords
        sig = inspect.signature(fn)
        assert list(sig.parameters) == ["student_logits", "teacher_logits", *(p.name for p in spec.params),
                                        "temperature", "mask", "reduction", "normalizer"]
        for param in spec.params:
            assert sig.parameters[param.name].default == param.default, (name, param.name)
            assert sig.parameters[param.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert fn.__name__ == name and fn.__module__ == "divergent.functional.api"


def test_named_functions_run_their_registry_example():
    """The example in each docstring is the registry's; the doctest runs it, this checks the wiring."""
    for name in BUILTINS:
        arguments, value = dv.get_spec(name).example
        assert f"round({name}(s, t{', ' + arguments if arguments else ''}).item(), 4)\n    {value}" in \
            getattr(dv.functional, name).__doc__


def test_public_all_is_importable_and_documented():
    expected = {"available", "divergence", "get_spec", "TopK", "DivergenceLoss", "DistillationLoss", "functional",
                "__version__"}
    assert expected <= set(dv.__all__)
    for name in dv.__all__:
        obj = getattr(dv, name)
        if callable(obj):
            assert obj.__doc__ and ">>>" in obj.__doc__, f"{name} needs a docstring with an example"
    for name in dv.functional.__all__:
        obj = getattr(dv.functional, name)
        assert obj.__doc__, name
        if name in BUILTINS:
            assert "Formula:" in obj.__doc__ and ">>>" in obj.__doc__


def test_generated_docs_are_current():
    """docs/divergences.md is generated from the registry; regenerate it when this fails:
    python -m divergent.functional.registry > docs/divergences.md"""
    assert (ROOT / "docs" / "divergences.md").read_text() == dv.functional.render_markdown()


def test_readme_lists_every_divergence_and_both_commands():
    readme = (ROOT / "README.md").read_text()
    for name in DESIGN_NAMES:
        assert f"`{name}`" in readme
    assert "divergent compare" in readme and "pytest" in readme


# ------------------------------------------------------------------ loss modules


def test_divergence_loss_applies_t2_and_checks_params():
    s, t = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7)
    loss = dv.DivergenceLoss("skew_kl", temperature=3.0, alpha=0.2)
    torch.testing.assert_close(loss(s, t), 9.0 * dv.functional.skew_kl(s, t, alpha=0.2, temperature=3.0))
    plain = dv.DivergenceLoss("skew_kl", temperature=3.0, t2_scale=False, alpha=0.2)
    torch.testing.assert_close(plain(s, t), dv.functional.skew_kl(s, t, alpha=0.2, temperature=3.0))
    with pytest.raises(ValueError, match="unknown divergence"):
        dv.DivergenceLoss("klx")
    with pytest.raises(ValueError, match="alpha"):
        dv.DivergenceLoss("skew_kl", alpha=2.0)
    with pytest.raises(ValueError, match="temperature"):
        dv.DivergenceLoss("js", temperature=-1)
    assert "skew_kl" in repr(loss)


def test_distillation_loss_against_hand_computation():
    """hard·CE + soft·T²·KL with ignored rows excluded from both terms (reference: torch CE + scipy-free KL)."""
    torch.manual_seed(1)
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    labels = torch.tensor([0, 4, -100, 2, 1, -100])
    loss = dv.DistillationLoss("forward_kl", hard_weight=0.3, soft_weight=0.7, temperature=2.0)
    keep = labels != -100
    ce = F.cross_entropy(s[keep], labels[keep])
    p = torch.softmax(t[keep] / 2, -1)
    q = torch.softmax(s[keep] / 2, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(loss(s, t, labels), 0.3 * ce + 0.7 * 4.0 * kl)
    # global normaliser: sums divided by the given count
    ce_sum = F.cross_entropy(s[keep], labels[keep], reduction="sum")
    torch.testing.assert_close(loss(s, t, labels, normalizer=10), (0.3 * ce_sum + 0.7 * 4.0 * kl * 4) / 10)


def test_distillation_loss_errors():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    loss = dv.DistillationLoss("js")
    with pytest.raises(ValueError, match="labels are required"):
        loss(s, t)
    with pytest.raises(ValueError, match="labels must be in \\[0, 3\\)"):
        loss(s, t, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="labels must have shape"):
        loss(s, t, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer tensor"):
        loss(s, t, torch.zeros(4))
    with pytest.raises(ValueError, match="hard_weight must be a finite number ≥ 0"):
        dv.DistillationLoss("js", hard_weight=-1)
    assert float(dv.DistillationLoss("js", hard_weight=0.0)(s, t)) >= 0


def test_distillation_loss_with_topk_teacher_and_all_ignored():
    s = torch.randn(3, 4, 10, requires_grad=True)
    teacher = dv.TopK.from_logits(torch.randn(3, 4, 10), k=4)
    labels = torch.full((3, 4), -100)
    value = dv.DistillationLoss("reverse_kl")(s, teacher, labels)
    assert float(value.detach()) == 0.0
    value.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


# ------------------------------------------------------------------ hypothesis fuzzing

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

_logit = st.one_of(
    st.floats(-1e4, 1e4, allow_nan=False, width=32),
    st.just(float("-inf")),
    st.sampled_from([0.0, 1e4, -1e4, 30.0, -30.0]),
)


@st.composite
def logit_pairs(draw):
    rows = draw(st.integers(1, 4))
    vocab = draw(st.integers(1, 6))
    a = draw(arrays("float32", (rows, vocab), elements=_logit))
    b = draw(arrays("float32", (rows, vocab), elements=_logit))
    # every row needs one finite logit to be a distribution
    for x in (a, b):
        x[~np.isfinite(x[:, 0]), 0] = 0.0
    return torch.from_numpy(a), torch.from_numpy(b)


@settings(max_examples=int(os.environ.get("DIVERGENT_FUZZ_EXAMPLES", 60)), deadline=None)
@given(pair=logit_pairs(), name=st.sampled_from(BUILTINS))
def test_fuzz_never_nan_never_negative(pair, name):
    """Any valid logits (−inf entries, ±1e4 extremes): no NaN, never below zero, zero at p = q."""
    s, t = pair
    value = dv.divergence(name, s, t, reduction="none")
    assert not torch.isnan(value).any()
    assert (value >= -1e-5).all()
    same = dv.divergence(name, s, s.clone(), reduction="none", **({"epsilon": 1e-3, "n_iters": 50} if name == "sinkhorn" else {}))
    if name != "sinkhorn":
        assert (same.abs() <= 1e-4).all(), (name, same)


@settings(max_examples=int(os.environ.get("DIVERGENT_FUZZ_EXAMPLES", 40)), deadline=None)
@given(pair=logit_pairs(), name=st.sampled_from(BUILTINS))
def test_fuzz_gradients_finite_where_value_finite(pair, name):
    s, t = pair
    s = s.clone().requires_grad_(True)
    value = dv.divergence(name, s, t, reduction="none")
    finite = torch.isfinite(value)
    if finite.any() and dv.get_spec(name).per_row:
        value[finite].sum().backward()
        assert torch.isfinite(s.grad[finite]).all()


# ------------------------------------------------------------------ shared helpers


def test_config_loader(tmp_path):
    @dataclass
    class Cfg:
        epochs: int = 2
        lr: float = 0.1
        names: list[str] = field(default_factory=lambda: ["forward_kl"])
        flag: bool = False

    path = tmp_path / "c.yaml"
    path.write_text("epochs: 5\nnames: [js, tvd]\n")
    cfg = config.load_config(Cfg, path, overrides={"lr": "0.5", "flag": "true"})
    assert cfg == Cfg(epochs=5, lr=0.5, names=["js", "tvd"], flag=True)
    with pytest.raises(ValueError, match="unknown config key 'epoch'.*valid keys: epochs, flag, lr, names"):
        config.load_config(Cfg, overrides={"epoch": 3})
    with pytest.raises(TypeError, match="expected an integer"):
        config.load_config(Cfg, overrides={"epochs": "many"})
    with pytest.raises(FileNotFoundError):
        config.load_config(Cfg, tmp_path / "missing.yaml")
    saved = config.save_config(cfg, tmp_path / "out.yaml")
    assert config.load_config(Cfg, saved) == cfg


def test_checkpoint_atomic_and_latest(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "step_2.pt", {"x": 1})
    checkpoint.save_checkpoint(tmp_path / "step_10.pt", {"x": 2})
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_10.pt"
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a divergent state file"):
        checkpoint.load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        checkpoint.load_checkpoint(tmp_path / "none.pt")


def test_checkpoint_interrupted_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "step_1.pt"
    checkpoint.save_checkpoint(path, {"x": 1})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, {"x": 2})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path) == {"x": 1}
    assert not [p for p in tmp_path.iterdir() if p.name != "step_1.pt"]


def test_report_helpers(tmp_path):
    rows = [{"a": 1, "b": 0.5}, {"a": 2, "c": "x"}]
    report.write_csv(rows, tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines()[0] == "a,b,c"
    io.write_json({"rows": rows, "t": torch.tensor(1.5)}, tmp_path / "r.json")
    assert '"t": 1.5' in (tmp_path / "r.json").read_text()
    first = report.make_run_dir(tmp_path, "run")
    second = report.make_run_dir(tmp_path, "run")
    assert first != second and first.is_dir() and second.is_dir()
    diff = report.paired_difference({0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0})
    assert diff["mean_diff"] == 0 and not diff["significant"]
    with pytest.raises(ValueError):
        report.paired_difference({0: 1.0}, {1: 1.0})
