"""The classifier-method and RL-regulariser registries: one name, one place, used everywhere."""

import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import divergent.methods as methods
import divergent.rl as rl
from divergent.data.digits import load_digits_data
from divergent.data.vision import ClassificationData
from divergent.methods import available_methods, get_method, register_method, unregister_method
from divergent.methods.registry import ADAPTERS, render_markdown
from divergent.models.classifiers import MLP
from divergent.rl import available_regularisers, get_regulariser, register_regulariser, unregister_regulariser
from divergent.train import classifier as classifier_trainer
from divergent.train.classifier import METHODS, ClassifierTrainConfig, train_classifier
from divergent.train.rl import REGULARISERS, GRPOConfig

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


@pytest.fixture(scope="module")
def small_data():
    full = load_digits_data()
    x, y = full.train.tensors
    return ClassificationData("digits-small", TensorDataset(x[:96], y[:96]), full.val, full.test, 10, (1, 8, 8))


def _mlp(seed, width=16):
    torch.manual_seed(seed)
    return MLP((1, 8, 8), 10, hidden=(width,))


# ------------------------------------------------------------------------------ public names


def test_design_public_names_import():
    """The names DESIGN.md promises, importable from their packages."""
    from divergent.methods import (  # noqa: F401
        abkd_loss, dkd_loss, dml_losses, hinton_kd_loss, mcmi_teacher_loss, nd_loss, nkd_loss, ofa_loss,
        pskd_alpha, pskd_loss, sinkd_loss, teacher_class_centers, uskd_loss, zipf_non_target_labels,
    )
    from divergent.metrics import pass_at_k  # noqa: F401
    from divergent.rl import f_generator, fdpo_loss, group_advantages, kl_estimator, ppo_clip_loss  # noqa: F401

    for module in (methods, rl):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert not missing, f"{module.__name__}.__all__ names missing attributes: {missing}"


# ------------------------------------------------------------------------------ methods


def test_every_builtin_default_is_read_from_its_function():
    """Defaults live in the loss functions' signatures; the registry only reads them (plus declared extras)."""
    for name in available_methods():
        spec = get_method(name)
        if spec.fn is None:
            assert dict(spec.defaults) == {}
            continue
        signature = {k: p.default for k, p in inspect.signature(spec.fn).parameters.items()
                     if p.default is not inspect.Parameter.empty}
        for key, value in spec.defaults.items():
            if key in spec.extra_params:
                continue
            if key in signature:
                assert signature[key] == value, (name, key)
            else:  # from params_from (nd: hinton_kd_loss's, pskd: pskd_alpha's)
                assert name in ("nd", "pskd"), (name, key)
    assert get_method("nd").defaults["temperature"] == inspect.signature(methods.hinton_kd_loss).parameters["temperature"].default
    assert get_method("pskd").defaults == {"alpha_final": 0.8}


def test_names_aliases_and_divergences_resolve():
    assert get_method("kd").name == "hinton"
    assert get_method("sinkhorn-with-KD").name == "sinkd"
    js = get_method("js")
    assert (js.kind, js.adapter, dict(js.defaults)) == ("offline", "divergence", {"beta": 0.5})
    assert METHODS["dml"][0] == "online" and "uskd" in METHODS and "js" not in METHODS
    assert classifier_trainer.ALIASES["kd"] == "hinton"
    assert set(available_methods()) == set(METHODS)


def test_a_user_divergence_is_an_offline_method(small_data):
    import divergent as dv

    def half_l2(student_logprobs, teacher_logprobs, scale):
        return scale * 0.5 * (student_logprobs.exp() - teacher_logprobs.exp()).square().sum(-1)

    dv.register_divergence("half_l2_test", half_l2, params={"scale": 1.0})
    try:
        spec = get_method("half_l2_test")
        assert (spec.kind, spec.adapter, dict(spec.defaults)) == ("offline", "divergence", {"scale": 1.0})
        config = ClassifierTrainConfig(method="half_l2_test", params={"scale": 2.0}, epochs=1, batch_size=48)
        assert train_classifier(_mlp(0), small_data, config, teacher=_mlp(1)).status == "finished"
        with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['scal'\] for divergence 'half_l2_test'"):
            ClassifierTrainConfig(method="half_l2_test", params={"scal": 2.0})
    finally:
        dv.functional.registry.unregister_divergence("half_l2_test")


def test_unknown_method_raises_with_suggestion_and_valid_names():
    with pytest.raises(ValueError, match=r"unknown method 'dkdd' \(did you mean 'dkd'\?\); valid: a divergence \(forward_kl.*or a method \(ce, hinton"):
        get_method("dkdd")
    with pytest.raises(ValueError, match="unknown method 'new-method'"):
        ClassifierTrainConfig(method="new-method")  # no silent fall-through to USKD
    with pytest.raises(TypeError, match="method must be a string.*int 3"):
        get_method(3)


def test_parameters_resolve_and_unknown_ones_raise():
    assert get_method("dkd").resolve({"beta": 4.0}) == {**get_method("dkd").defaults, "beta": 4.0}
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['gama'\] for method 'nkd'.*\(did you mean 'gamma'\?\)"):
        get_method("nkd").resolve({"gama": 1.0})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['centroid'\] for method 'mcmi-teacher'"):
        ClassifierTrainConfig(method="mcmi-teacher", params={"centroid": "once"})
    with pytest.raises(TypeError, match="params for method 'dkd' must be a mapping"):
        get_method("dkd").resolve([("beta", 1.0)])


def test_every_adapter_has_an_objective_in_the_trainer():
    assert set(ADAPTERS) == set(classifier_trainer._OBJECTIVES)


def test_user_logits_method_trains_and_gets_its_params_and_the_epoch(small_data):
    calls = []

    def margin_kd(student_logits, teacher_logits, labels, *, epoch, weight=1.0, temperature=2.0):
        calls.append((epoch, weight, temperature, student_logits.shape, teacher_logits.shape, labels.shape))
        soft = F.kl_div(F.log_softmax(student_logits / temperature, -1), F.softmax(teacher_logits / temperature, -1),
                        reduction="batchmean")
        return F.cross_entropy(student_logits, labels) + weight * soft

    spec = register_method("margin-kd", margin_kd, summary="test method")
    try:
        assert spec.takes_epoch and dict(spec.defaults) == {"weight": 1.0, "temperature": 2.0}
        assert "margin-kd" in METHODS and METHODS["margin-kd"][0] == "offline"
        student, teacher = _mlp(0), _mlp(1, width=32)
        before = [p.detach().clone() for p in student.parameters()]
        config = ClassifierTrainConfig(method="margin-kd", params={"weight": 0.5}, epochs=2, batch_size=32, lr=1e-2)
        result = train_classifier(student, small_data, config, teacher=teacher)
        assert result.status == "finished"
        assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
        # Epochs are passed from 0 (DKD's warm-up relies on it: epoch 0 gets 1/warmup, as mdistiller's epoch 1).
        assert sorted({c[0] for c in calls}) == [0, 1] and calls[0][0] == 0
        assert {(c[1], c[2]) for c in calls} == {(0.5, 2.0)}
        assert calls[0][3] == calls[0][4] == (32, 10) and calls[0][5] == (32,)
        with pytest.raises(ValueError, match="needs a teacher"):
            train_classifier(_mlp(0), small_data, config)
    finally:
        unregister_method("margin-kd")
    with pytest.raises(ValueError, match="unknown method 'margin-kd'"):
        get_method("margin-kd")


def test_user_online_method_trains_both_networks(small_data):
    def mutual(student_logits, teacher_logits, labels):
        return (F.cross_entropy(student_logits, labels) + F.mse_loss(student_logits, teacher_logits.detach()),
                F.cross_entropy(teacher_logits, labels))

    register_method("mutual-mse", mutual, kind="online")
    try:
        teacher = _mlp(1)
        before = [p.detach().clone() for p in teacher.parameters()]
        train_classifier(_mlp(0), small_data, ClassifierTrainConfig(method="mutual-mse", epochs=1, batch_size=48), teacher=teacher)
        assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    finally:
        unregister_method("mutual-mse")


def test_user_method_is_a_compare_row(tmp_path, monkeypatch):
    from rich.console import Console

    from divergent.experiments.compare import CompareConfig, run_compare

    monkeypatch.setenv("DIVERGENT_CACHE_DIR", str(tmp_path / "cache"))

    def logit_mse(student_logits, teacher_logits, labels, *, weight=0.1):
        return F.cross_entropy(student_logits, labels) + weight * F.mse_loss(student_logits, teacher_logits)

    register_method("logit-mse", logit_mse)
    try:
        config = CompareConfig(divergences=["forward_kl"], methods=["logit-mse"], seeds=[0], epochs=1, teacher_epochs=1,
                               teacher_model="mlp-32", student_model="mlp-8", include_student_alone=False,
                               output_dir=str(tmp_path / "runs"))
        results = run_compare(config, console=Console(file=open("/dev/null", "w")))
        rows = {r["name"]: r for r in results["runs"]}
        assert rows["logit-mse"]["status"] == "finished" and rows["logit-mse"]["kind"] == "offline"
    finally:
        unregister_method("logit-mse")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"name": "hinton"}, ValueError, "'hinton' is already registered"),
        ({"name": "kd"}, ValueError, "'kd' is already registered"),
        ({"name": "tvd"}, ValueError, "'tvd' is a registered divergence"),
        ({"kind": "teacherless"}, ValueError, "kind must be one of offline, online, self, plain, got 'teacherless'"),
        ({"kind": "self"}, ValueError, "'logits' adapter needs a teacher"),
        ({"adapter": "divergence"}, ValueError, "adapter must be one of"),
        ({"fn": lambda s, t, y, scale: s.sum()}, TypeError, r"parameter\(s\) \['scale'\] of fn need a default"),
        ({"fn": lambda s, t: s.sum()}, TypeError, "fn must take"),
        ({"fn": "not a function"}, TypeError, "fn must be callable"),
        ({"colour": "red"}, TypeError, r"unexpected keyword\(s\) \['colour'\]"),
        ({"extra_params": {"weight": 2.0}}, ValueError, r"extra_params \['weight'\] are already parameters"),
    ],
)
def test_register_method_rejects_bad_input(kwargs, error, match):
    arguments = {"name": "fresh-method", "fn": lambda s, t, y, weight=1.0: s.sum()}
    arguments.update(kwargs)
    name, fn = arguments.pop("name"), arguments.pop("fn")
    with pytest.raises(error, match=match):
        register_method(name, fn, **arguments)
    assert "fresh-method" not in available_methods()


def test_builtins_cannot_be_unregistered():
    with pytest.raises(ValueError, match="built-in method"):
        unregister_method("dkd")


def test_docs_carry_the_generated_tables():
    """docs/methods.md holds the tables the registries print (regenerate: python -m divergent.methods.registry)."""
    text = DOCS.read_text()
    assert render_markdown() in text
    assert rl.registry.render_markdown() in text
    for name in available_methods():
        assert f"`{name}`" in text
    for name in available_regularisers():
        assert f"`{name}`" in text


# ------------------------------------------------------------------------------ regularisers


def test_grpo_config_reads_names_and_defaults_from_the_registry():
    assert list(REGULARISERS) == list(available_regularisers()) == ["none", "reverse_kl", "dph", "kdrl"]
    config = GRPOConfig()
    for name in available_regularisers():
        for param in get_regulariser(name).params:
            assert getattr(config, param.name) == param.default, param.name
    assert config.advantage_std == "sample" and config.dual_clip is None and config.log_ratio_clamp is None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"regulariser": "revers_kl"}, ValueError, r"unknown regulariser 'revers_kl' \(did you mean 'reverse_kl'\?\); valid: none, reverse_kl, dph, kdrl"),
        ({"kl_estimator": "k4"}, ValueError, "GRPOConfig.kl_estimator must be one of 'k1', 'k2', 'k3', got 'k4'"),
        ({"kl_beta": -0.1}, ValueError, r"GRPOConfig.kl_beta must be a number in \[0, inf\), got -0.1"),
        ({"kl_value_clamp": 0.0}, ValueError, "GRPOConfig.kl_value_clamp must be a number in \\(0, inf\\) or None"),
        ({"dph_alpha": 1.0}, ValueError, r"GRPOConfig.dph_alpha must be a number in \(0, 1\), got 1.0"),
        ({"dph_batch_size": 2.5}, TypeError, "GRPOConfig.dph_batch_size must be an integer"),
        ({"kdrl_mask_correct": "yes"}, TypeError, "GRPOConfig.kdrl_mask_correct must be True or False, got str 'yes'"),
        ({"advantage_std": "bessel"}, ValueError, "GRPOConfig.advantage_std must be 'sample' or 'population'"),
        ({"dual_clip": 0.5}, ValueError, "GRPOConfig.dual_clip must be > 1 or None, got 0.5"),
        ({"regulariser_params": {"kl_beta": 1.0}}, ValueError, "regulariser_params is for user-registered regularisers"),
    ],
)
def test_grpo_config_validation_comes_from_the_registry(kwargs, error, match):
    with pytest.raises(error, match=match):
        GRPOConfig(**kwargs)


def test_regulariser_values_and_coefficients():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 4, generator=g) - 2
    ref = torch.randn(3, 4, generator=g) - 2
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [True, False, False, False]])
    inputs = rl.RegulariserInputs(logp=logp, logits=torch.zeros(3, 4, 5), mask=mask, rewards=torch.zeros(3), step=7,
                                  ref_logp=ref)
    spec = get_regulariser("reverse_kl")
    params = spec.resolve({"kl_estimator": "k2"})
    expected = (0.5 * (logp - ref) ** 2)[mask].mean()
    torch.testing.assert_close(spec.value(inputs, **params), expected)
    assert spec.coefficient(7, **params) == 0.05
    kdrl = get_regulariser("kdrl")
    assert kdrl.coefficient(10, **kdrl.defaults) == pytest.approx(max(0.02 - 0.0001 * 10, 0.005))
    assert kdrl.log_coefficient_as == "kdrl_beta"
    assert get_regulariser("none").value(inputs).item() == 0.0
    dph = get_regulariser("dph")
    assert dph.value(inputs, **dph.defaults).item() == 0.0  # an empty rehearsal set adds nothing


def test_user_regulariser_trains_in_grpo():
    from divergent.data.arithmetic import VOCAB_SIZE, ArithmeticTask
    from divergent.models.gpt import GPTConfig, TinyGPT
    from divergent.train.rl import GRPOTrainer

    seen = []

    def squared_log_ratio(inputs, *, scale=1.0, sq_beta=0.1):
        seen.append(inputs.ref_logp is not None and inputs.teacher_logp is None)
        return scale * rl.masked_token_mean((inputs.logp - inputs.ref_logp).square(), inputs.mask)

    register_regulariser("squared-log-ratio", squared_log_ratio, coefficient="sq_beta",
                         params={"scale": 1.0, "sq_beta": 0.1}, needs=("reference",), log_coefficient_as="sq_beta")
    try:
        assert "squared-log-ratio" in REGULARISERS
        with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['scal'\] for regulariser 'squared-log-ratio'"):
            GRPOConfig(regulariser="squared-log-ratio", regulariser_params={"scal": 2.0})
        config = GRPOConfig(regulariser="squared-log-ratio", regulariser_params={"sq_beta": 0.5}, steps=2,
                            prompts_per_step=2, group_size=2, max_new_tokens=3, checkpoint_every=0)
        task = ArithmeticTask(max_operand=9, n_test=4, seed=0)
        torch.manual_seed(0)
        policy = TinyGPT(GPTConfig(vocab_size=VOCAB_SIZE, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))
        trainer = GRPOTrainer(policy, task, config)
        history = trainer.train()
        assert trainer.reference is not None and all(seen)
        assert [h["sq_beta"] for h in history] == [0.5, 0.5]
        assert all(torch.isfinite(torch.tensor(h["regulariser"])) for h in history)
    finally:
        unregister_regulariser("squared-log-ratio")
    with pytest.raises(ValueError, match="unknown regulariser 'squared-log-ratio'"):
        GRPOConfig(regulariser="squared-log-ratio")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"name": "kdrl"}, ValueError, "'kdrl' is already registered"),
        ({"needs": ("oracle",)}, ValueError, r"needs must be a subset of \('reference', 'rehearsal', 'teacher'\)"),
        ({"coefficient": "beta"}, ValueError, r"coefficient 'beta' is not one of the parameters \['scale'\]"),
        ({"value": 3}, TypeError, "value must be callable"),
    ],
)
def test_register_regulariser_rejects_bad_input(kwargs, error, match):
    arguments = {"name": "fresh", "value": lambda inputs, scale=1.0: inputs.logp.sum(), "coefficient": 1.0,
                 "params": {"scale": 1.0}}
    arguments.update(kwargs)
    name, value = arguments.pop("name"), arguments.pop("value")
    with pytest.raises(error, match=match):
        register_regulariser(name, value, **arguments)
    assert "fresh" not in available_regularisers()
    with pytest.raises(ValueError, match="built-in regulariser"):
        unregister_regulariser("dph")


def test_no_docstring_points_to_a_missing_methods_file():
    root = Path(__file__).resolve().parents[1] / "src" / "divergent"
    for folder in ("methods", "rl"):
        for path in (root / folder).glob("*.py"):
            assert not re.search(r"(?<![/\w])METHODS\.md", path.read_text()), path
