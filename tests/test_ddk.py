"""DDK's domain weights (Liu et al., NeurIPS 2024, arXiv 2407.16154, Eq. 1-2) against hand and numpy
computations, their input checks, and the domain sampler (draws by the weights, cycles a domain's rows,
state restores exactly)."""

import math

import numpy as np
import pytest
import torch

import divergent.data
from divergent.data import ddk_initial_weights, ddk_update
from divergent.data.domains import DomainSampler, mixing_weights


def test_worked_value_of_the_issue_by_hand():
    """weights [0.5, 0.5], ratios [2, 1]: ψ = [0.5e², 0.5e], ψ/Σψ = e/(e+1), r = 0.5·e/(e+1) + 0.25."""
    first = 0.5 * math.e / (math.e + 1) + 0.25
    assert first == pytest.approx(0.6155, abs=5e-5)
    result = ddk_update([0.5, 0.5], [2.0, 1.0], [1.0, 1.0], smoothing=0.5)
    assert result == pytest.approx([first, 1 - first], abs=1e-12)
    assert result == pytest.approx([0.6155, 0.3845], abs=5e-5)
    # the same ratios from other perplexities: only ℓ_S/ℓ_T matters
    assert ddk_update([0.5, 0.5], [8.0, 3.0], [4.0, 3.0]) == pytest.approx(result, abs=1e-12)


def test_initial_weights_are_the_softmax_of_the_ratios():
    student, teacher = np.array([12.0, 3.0, 7.5]), np.array([4.0, 2.5, 5.0])
    ratios = student / teacher
    expected = np.exp(ratios) / np.exp(ratios).sum()
    np.testing.assert_allclose(ddk_initial_weights(student, teacher), expected, rtol=1e-12)
    assert ddk_initial_weights([2.0, 1.0], [1.0, 1.0]) == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_update_against_numpy_written_out(alpha):
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(5))
    student, teacher = rng.uniform(2, 30, 5), rng.uniform(1.5, 10, 5)
    psi = weights * np.exp(student / teacher)
    expected = alpha * psi / psi.sum() + (1 - alpha) / 5
    got = ddk_update(weights, student, teacher, smoothing=alpha)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)


def test_the_result_has_the_kind_of_the_weights():
    out = ddk_update(torch.tensor([0.25, 0.75]), torch.tensor([3.0, 3.0]), torch.tensor([1.0, 1.0]))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    # equal ratios: ψ/Σψ = r, so the update only mixes r with the uniform weights
    torch.testing.assert_close(out, torch.tensor([0.5 * 0.25 + 0.25, 0.5 * 0.75 + 0.25], dtype=torch.float64))
    assert isinstance(ddk_update((0.5, 0.5), (2, 1), (1, 1)), list)


def test_huge_ratios_do_not_overflow_and_zero_weights_stay_at_the_floor():
    """exp(1000) overflows float64; the update is computed in log space."""
    out = ddk_update([0.5, 0.5, 0.0], [1000.0, 1.0, 5000.0], [1.0, 1.0, 1.0], smoothing=0.5)
    assert np.isfinite(out).all()
    assert out == pytest.approx([0.5 + 0.5 / 3, 0.5 / 3, 0.5 / 3], abs=1e-12)
    assert ddk_initial_weights([1e6, 1.0], [1.0, 1.0]) == pytest.approx([1.0, 0.0])


def test_smoothing_one_is_the_unsmoothed_update_and_zero_is_uniform():
    assert ddk_update([0.2, 0.8], [5.0, 2.0], [1.0, 1.0], smoothing=0.0) == pytest.approx([0.5, 0.5])
    psi = np.array([0.2 * math.exp(5), 0.8 * math.exp(2)])
    assert ddk_update([0.2, 0.8], [5.0, 2.0], [1.0, 1.0], smoothing=1.0) == pytest.approx(psi / psi.sum())


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=[0.5, 0.5], student_ppl=[2.0], teacher_ppl=[1.0]), "one weight per domain"),
    (dict(weights=[0.5, 0.5], student_ppl=[2.0, 1.0], teacher_ppl=[1.0]), "one value per domain"),
    (dict(weights=[0.5, 0.5], student_ppl=[2.0, 0.0], teacher_ppl=[1.0, 1.0]), "student_ppl must be finite perplexities > 0"),
    (dict(weights=[0.5, 0.5], student_ppl=[2.0, 1.0], teacher_ppl=[float("nan"), 1.0]), "teacher_ppl"),
    (dict(weights=[0.5, 0.5], student_ppl=[2.0, 1.0], teacher_ppl=[-1.0, 1.0]), "teacher_ppl"),
    (dict(weights=[0.7, 0.5], student_ppl=[2.0, 1.0], teacher_ppl=[1.0, 1.0]), "distribution"),
    (dict(weights=[1.5, -0.5], student_ppl=[2.0, 1.0], teacher_ppl=[1.0, 1.0]), "distribution"),
    (dict(weights=[], student_ppl=[], teacher_ppl=[]), "non-empty"),
    (dict(weights=[0.5, 0.5], student_ppl=[2.0, 1.0], teacher_ppl=[1.0, 1.0], smoothing=1.5), r"smoothing .*\[0, 1\]"),
    (dict(weights=[0.5, 0.5], student_ppl=[2.0, 1.0], teacher_ppl=[1.0, 1.0], smoothing=-0.1), "smoothing"),
    (dict(weights=[0.5, 0.5], student_ppl=[2.0, 1.0], teacher_ppl=[1.0, 1.0], smoothing=True), "smoothing"),
])
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ddk_update(**kwargs)


def test_non_numbers_are_a_type_error():
    with pytest.raises(TypeError, match="student_ppl"):
        ddk_update([0.5, 0.5], ["a", "b"], [1.0, 1.0])


def test_exported_from_divergent_data():
    assert "ddk_update" in divergent.data.__all__
    assert all(hasattr(divergent.data, name) for name in divergent.data.__all__)


def test_fixed_mixings():
    assert mixing_weights("uniform", [10, 30]) == [0.5, 0.5]
    assert mixing_weights("proportional", [10, 30]) == [0.25, 0.75]
    with pytest.raises(ValueError, match="uniform, proportional"):
        mixing_weights("ddk", [1, 2])


# ----------------------------------------------------------------------------- the sampler


def _domains():
    return {"a": [("a", i) for i in range(5)], "b": [("b", i) for i in range(3)], "c": [("c", i) for i in range(7)]}


def test_sampler_frequencies_follow_the_weights():
    sampler = DomainSampler(_domains(), [0.6, 0.3, 0.1], seed=3)
    counts = np.bincount(sampler.draw_domains(20_000), minlength=3) / 20_000
    # binomial standard error at n = 20000 is < 0.0035; 4 of them
    np.testing.assert_allclose(counts, [0.6, 0.3, 0.1], atol=0.014)


def test_a_domains_rows_cycle_each_epoch_in_a_new_order():
    sampler = DomainSampler(_domains(), [0.0, 1.0, 0.0], seed=0)
    drawn = [example for _, example in sampler.draw(9)]
    assert all(name == "b" for name, _ in drawn)
    epochs = [sorted(i for _, i in drawn[k:k + 3]) for k in (0, 3, 6)]
    assert epochs == [[0, 1, 2]] * 3  # every row once per epoch
    assert sampler.positions == [0, 9, 0]


def test_state_dict_restores_the_exact_continuation():
    a = DomainSampler(_domains(), [0.2, 0.5, 0.3], seed=5)
    a.draw(11)
    state = a.state_dict()
    expected = a.draw(20)
    b = DomainSampler(_domains(), [1 / 3] * 3, seed=5)
    b.load_state_dict(state)
    assert b.draw(20) == expected
    with pytest.raises(ValueError, match="seed"):
        DomainSampler(_domains(), seed=6).load_state_dict(state)


def test_two_samplers_with_one_seed_draw_the_same_domains():
    """What every rank relies on: the same seed gives the same stream."""
    a, b = DomainSampler(_domains(), [0.2, 0.5, 0.3], seed=9), DomainSampler(_domains(), [0.2, 0.5, 0.3], seed=9)
    assert a.draw(50) == b.draw(50)


def test_sampler_rejects_bad_weights_and_empty_domains():
    with pytest.raises(ValueError, match="one per domain"):
        DomainSampler(_domains(), [0.5, 0.5])
    with pytest.raises(ValueError, match="distribution"):
        DomainSampler(_domains(), [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="'b' has no examples"):
        DomainSampler({"a": [1], "b": []})
