"""Universal Logit Distillation against TRL's ULDLoss (the installed trl.experimental.gold) and a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from divergent.functional.cross_tokenizer import uld_distance, uld_sequence_loss
from references import probs


def _numpy_uld(p, q):
    """Sorted-probability L1 with the shorter vocabulary padded with zeros, written directly in numpy."""
    width = max(p.shape[-1], q.shape[-1])
    pad = lambda a: np.concatenate([-np.sort(-a, axis=-1), np.zeros(a.shape[:-1] + (width - a.shape[-1],))], -1)  # noqa: E731
    return np.abs(pad(q) - pad(p)).sum(-1)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(3, 9, 11, generator=g) * 2, torch.randn(3, 7, 17, generator=g) * 2
    s_labels, t_labels = torch.full((3, 9), -100), torch.full((3, 7), -100)
    s_labels[0, 2:8] = 1; s_labels[1, :] = 1; s_labels[2, 5:6] = 1  # noqa: E702  (the last: only its EOS)
    t_labels[0, 1:7] = 1; t_labels[1, 3:5] = 1; t_labels[2, :] = 1  # noqa: E702
    return s, t, s_labels, t_labels, torch.randint(0, 11, (3, 9), generator=g), torch.randint(0, 17, (3, 7), generator=g)


@pytest.mark.parametrize(("student_t", "teacher_t", "skip_eos"), [(1.0, 1.0, True), (2.0, 0.5, True), (1.0, 1.0, False)])
def test_equals_trl_uld_loss(student_t, teacher_t, skip_eos):
    """TRL's ULDLoss (trl.experimental.gold, use_extended_uld=False) on the same logits and labels, value and gradient."""
    gold = pytest.importorskip("trl.experimental.gold")
    from trl.experimental.gold.gold_trainer import ULDLoss

    config = gold.GOLDConfig(output_dir="unused", use_uld_loss=True, use_extended_uld=False, report_to="none",
                             bf16=False, use_cpu=True, uld_student_temperature=student_t,
                             uld_teacher_temperature=teacher_t, uld_skip_student_eos=skip_eos,
                             uld_skip_teacher_eos=skip_eos)
    s, t, s_labels, t_labels, s_ids, t_ids = _batch()
    s_ours, s_trl = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ours = uld_sequence_loss(s_ours, t, s_labels, t_labels, student_temperature=student_t,
                             teacher_temperature=teacher_t, skip_student_eos=skip_eos, skip_teacher_eos=skip_eos)
    theirs = ULDLoss(config)(s_trl, t, s_labels, t_labels, s_ids, t_ids)
    torch.testing.assert_close(ours, theirs.reshape(()), rtol=1e-6, atol=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(s_ours.grad, s_trl.grad, rtol=1e-5, atol=1e-8)


def test_uld_distance_matches_numpy_and_is_a_relabelling_invariant():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 13, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    got = uld_distance(s, t, student_temperature=1.5, reduction="none")
    np.testing.assert_allclose(got.numpy(), _numpy_uld(probs(t.numpy()), probs(s.numpy(), 1.5)), rtol=1e-12)
    # permuting either vocabulary changes nothing; equal sorted distributions give 0
    assert torch.allclose(uld_distance(s[:, torch.randperm(13, generator=g)], t, reduction="none"),
                          uld_distance(s, t, reduction="none"))
    assert float(uld_distance(t, t.flip(-1))) == pytest.approx(0.0, abs=1e-12)
    assert (got >= 0).all() and (got <= 2).all()
    mask = torch.tensor([True, False, True, True, False])
    torch.testing.assert_close(uld_distance(s, t, mask=mask), uld_distance(s[mask], t[mask]).mean())


def test_sequence_loss_is_the_mean_of_truncated_span_means():
    """Positions aligned by truncation to the shorter answer span, each sequence normalised by that length."""
    s, t, s_labels, t_labels, _, _ = _batch()
    spans = [((2, 5), (1, 5)), ((0, 8), (3, 1)), None]  # (start, length) after dropping the EOS; row 2 has nothing
    want = []
    for b, span in enumerate(spans):
        if span is None:
            want.append(0.0)
            continue
        (s0, n_s), (t0, n_t) = span
        m = min(n_s, n_t)
        rows = _numpy_uld(probs(t[b, t0:t0 + m].double().numpy()), probs(s[b, s0:s0 + m].double().numpy()))
        want.append(rows.sum() / m)
    assert float(uld_sequence_loss(s, t, s_labels, t_labels)) == pytest.approx(np.mean(want), rel=1e-5)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda s, t: uld_distance(s, t[:2]), ValueError, "same leading dimensions"),
        (lambda s, t: uld_distance(s.long(), t), TypeError, "student_logits must hold floating-point"),
        (lambda s, t: uld_distance(s, t, teacher_temperature=0.0), ValueError, "teacher_temperature must be"),
        (lambda s, t: uld_distance(s, t, reduction="avg"), ValueError, "reduction"),
        (lambda s, t: uld_sequence_loss(s, t, torch.zeros(3, 1), torch.zeros(3, 1)), ValueError,
         r"\[batch, length, vocab\]"),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    s, t = torch.randn(3, 5), torch.randn(3, 7)
    with pytest.raises(error, match=match):
        call(s, t)
