"""Method-level objectives against references written from the papers' formulas in numpy/scipy."""

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, softmax
from scipy.stats import entropy

from divergent.methods.dkd import dkd_loss
from divergent.methods.kd import abkd_loss, divergence_kd_loss, hinton_kd_loss, sinkd_loss
from divergent.methods.mcmi import mcmi_teacher_loss
from divergent.methods.nd import nd_loss, teacher_class_centers
from divergent.methods.nkd import nkd_loss
from divergent.methods.ofa import ofa_loss
from divergent.methods.online import bdkd_online_losses, dml_losses
from divergent.methods.self_kd import pskd_alpha, pskd_loss, uskd_loss, zipf_non_target_labels


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    return student, teacher, labels


def _ce(z, y):
    return -log_softmax(z, axis=1)[np.arange(len(y)), y].mean()


def _kl_rows(p, q):
    return np.array([entropy(a, b) for a, b in zip(p, q)])


def test_hinton_kd_matches_scipy(batch):
    s, t, y = batch
    T = 4.0
    expected = 0.1 * _ce(s.numpy(), y.numpy()) + 0.9 * T**2 * _kl_rows(softmax(t.numpy() / T, 1), softmax(s.numpy() / T, 1)).mean()
    assert hinton_kd_loss(s, t, y).item() == pytest.approx(expected, rel=1e-6)


def test_abkd_at_alpha_1_beta_0_is_forward_kl_kd(batch):
    s, t, y = batch
    a = abkd_loss(s, t, y, alpha=1.0, beta=0.0)
    b = divergence_kd_loss("forward_kl", s, t, y, temperature=4.0, hard_weight=1.0, soft_weight=2.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_dkd_decomposes_kd_for_one_sample():
    """DKD paper, eq. (1): KL(p‖q) = TCKD + (1 − p_y) · NCKD (per sample)."""
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(1, 6, generator=g, dtype=torch.float64), torch.randn(1, 6, generator=g, dtype=torch.float64), torch.tensor([2])
    T = 2.0
    p = softmax(t.numpy() / T, 1)
    kd = _kl_rows(p, softmax(s.numpy() / T, 1))[0]
    got = dkd_loss(s, t, y, epoch=100, alpha=1.0, beta=1.0 - p[0, 2], temperature=T, ce_weight=0.0)
    assert got.item() == pytest.approx(T**2 * kd, rel=1e-6)


def test_dkd_matches_written_out_formula_and_warmup(batch):
    s, t, y = batch
    T, alpha, beta = 4.0, 1.0, 8.0
    ps, pt = softmax(s.numpy() / T, 1), softmax(t.numpy() / T, 1)
    idx = np.arange(len(y))
    bs = np.stack([ps[idx, y], 1 - ps[idx, y]], 1)
    bt = np.stack([pt[idx, y], 1 - pt[idx, y]], 1)
    mask = np.ones_like(ps, dtype=bool)
    mask[idx, y] = False
    ns = softmax((s.numpy() / T)[mask].reshape(6, 4), 1)
    nt = softmax((t.numpy() / T)[mask].reshape(6, 4), 1)
    tckd, nckd = _kl_rows(bt, bs).mean(), _kl_rows(nt, ns).mean()
    full = _ce(s.numpy(), y.numpy()) + T**2 * (alpha * tckd + beta * nckd)
    assert dkd_loss(s, t, y, epoch=19).item() == pytest.approx(full, rel=1e-6)
    half = _ce(s.numpy(), y.numpy()) + 0.5 * T**2 * (alpha * tckd + beta * nckd)
    assert dkd_loss(s, t, y, epoch=9).item() == pytest.approx(half, rel=1e-6)


def test_nkd_matches_written_out_formula(batch):
    s, t, y = batch
    T, gamma = 3.0, 3.5
    sn, tn, yn = s.numpy(), t.numpy(), y.numpy()
    idx = np.arange(len(y))
    t_y = softmax(tn, 1)[idx, yn]
    log_s_y = log_softmax(sn, 1)[idx, yn]
    mask = np.ones_like(sn, dtype=bool)
    mask[idx, yn] = False
    nt = softmax(tn[mask].reshape(6, 4) / T, 1)
    log_ns = log_softmax(sn[mask].reshape(6, 4) / T, 1)
    expected = _ce(sn, yn) - (t_y * log_s_y).mean() - gamma * T**2 * (nt * log_ns).sum(1).mean()
    assert nkd_loss(s, t, y).item() == pytest.approx(expected, rel=1e-6)


def test_sinkd_matches_pot_at_convergence(batch):
    ot = pytest.importorskip("ot")
    s, t, y = batch
    T, eps = 2.0, 0.1
    q, p = softmax(s.numpy() / T, 1), softmax(t.numpy() / T, 1)
    cost = np.abs(q[:, None, :] - p[None, :, :]).sum(-1)
    n = len(q)
    sink = ot.sinkhorn2(np.full(n, 1 / n), np.full(n, 1 / n), cost, eps, numItermax=2000, stopThr=1e-14)
    kd = _kl_rows(p, q).mean()
    # Official scaling: no T² on KD; 0.001 × Σ_ij P_ij W_ij with unit column sums = 0.001 · n · ⟨P, W⟩.
    expected = 0.1 * _ce(s.numpy(), y.numpy()) + 0.9 * kd + 0.8 * 0.001 * n * sink
    assert sinkd_loss(s, t, y, n_iters=2000).item() == pytest.approx(float(expected), rel=1e-5)
    # The Hinton-style option: T² on KD and ⟨P, W⟩ with unit total mass.
    hinton_style = 0.1 * _ce(s.numpy(), y.numpy()) + 0.9 * T**2 * kd + 0.8 * sink
    got = sinkd_loss(s, t, y, n_iters=2000, t2_scale=True, sinkhorn_scale=1.0, sinkhorn_reduction="mean")
    assert got.item() == pytest.approx(float(hinton_style), rel=1e-5)


def test_ofa_at_epsilon_1_is_cross_entropy_with_teacher(batch):
    s, t, y = batch
    expected = -(softmax(t.numpy(), 1) * log_softmax(s.numpy(), 1)).sum(1).mean()
    assert ofa_loss(s, t, y, epsilon=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_ofa_enhances_the_target_weight(batch):
    s, t, y = batch
    p = softmax(t.numpy(), 1)
    onehot = np.eye(5)[y.numpy()]
    weight = (p + onehot) ** 1.5 - onehot
    expected = -(weight * log_softmax(s.numpy(), 1)).sum(1).mean()
    assert ofa_loss(s, t, y, epsilon=1.5).item() == pytest.approx(expected, rel=1e-6)


def test_pskd_target_and_schedule(batch):
    s, _, y = batch
    prev = torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1)
    alpha = pskd_alpha(2, 10)
    assert alpha == pytest.approx(0.24)
    target = (1 - alpha) * np.eye(5)[y.numpy()] + alpha * prev.numpy()
    expected = -(target * log_softmax(s.numpy(), 1)).sum(1).mean()
    assert pskd_loss(s, y, prev, alpha).item() == pytest.approx(expected, rel=1e-6)
    assert pskd_loss(s, y, None, alpha).item() == pytest.approx(_ce(s.numpy(), y.numpy()), rel=1e-6)


def test_uskd_weak_ranking_matches_written_out_formula(batch):
    """``ranking="weak"``: Zipf ranks of the non-target classes by the weak head's logits alone."""
    s, t, y = batch  # t plays the weak head's logits
    sn, wn, yn = s.numpy(), t.numpy(), y.numpy()
    idx = np.arange(len(y))
    s_y = softmax(sn, 1)[idx, yn]
    target = s_y**2 + 1 - (s_y**2).mean()
    loss_target = -(target * log_softmax(sn, 1)[idx, yn]).mean()
    mask = np.ones_like(sn, dtype=bool)
    mask[idx, yn] = False
    weak_nt = wn[mask].reshape(6, 4)
    ranks = (-weak_nt).argsort(1).argsort(1) + 1
    zipf = (1 / ranks) / (1 / ranks).sum(1, keepdims=True)
    loss_non = -(zipf * log_softmax(sn[mask].reshape(6, 4), 1)).sum(1).mean()
    smooth = 0.9 * np.eye(5)[yn] + 0.1 / 5
    loss_weak = -(smooth * log_softmax(wn, 1)).sum(1).mean()
    expected = _ce(sn, yn) + loss_target + 0.1 * loss_non + 0.005 * loss_weak
    assert uskd_loss(s, y, weak_logits=t, ranking="weak").item() == pytest.approx(expected, rel=1e-6)


def test_zipf_labels_follow_rank():
    scores, y = torch.tensor([[0.0, 5.0, 1.0, 3.0]]), torch.tensor([1])
    z = zipf_non_target_labels(scores, y, rank_over="non_target")
    # non-target classes 0, 2, 3 with logits 0, 1, 3 -> ranks 3, 2, 1 among themselves
    expected = np.array([1 / 3, 1 / 2, 1.0]) / (1 / 3 + 1 / 2 + 1)
    np.testing.assert_allclose(z.numpy()[0], expected, rtol=1e-6)
    # Ranked among all four classes the target (5.0) is first: the others get ranks 4, 3, 2.
    z = zipf_non_target_labels(scores, y)
    expected = np.array([1 / 4, 1 / 3, 1 / 2]) / (1 / 4 + 1 / 3 + 1 / 2)
    np.testing.assert_allclose(z.numpy()[0], expected, rtol=1e-6)
    # A target ranked last leaves the non-target classes ranks 1, 2, 3: the two rules agree.
    low_target = torch.tensor([[0.0, -9.0, 1.0, 3.0]])
    torch.testing.assert_close(zipf_non_target_labels(low_target, y), zipf_non_target_labels(low_target, y, rank_over="non_target"))
    with pytest.raises(ValueError, match="rank_over"):
        zipf_non_target_labels(scores, y, rank_over="some")


def test_nd_loss_is_zero_when_student_points_at_the_class_centre_with_teacher_norm():
    centers = teacher_class_centers(torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0]]), torch.tensor([0, 1, 0]), 2)
    torch.testing.assert_close(centers, torch.eye(2))
    f_t = torch.tensor([[0.0, 2.0]])
    assert nd_loss(torch.tensor([[0.0, 2.0]]), f_t, torch.tensor([1]), centers).item() == pytest.approx(0.0)
    # Orthogonal to the centre: 1 − 0 / max(‖f_s‖, ‖f_t‖) = 1.
    assert nd_loss(torch.tensor([[5.0, 0.0]]), f_t, torch.tensor([1]), centers).item() == pytest.approx(1.0)
    # Half the teacher's norm along the centre: 1 − 1 / 2.
    assert nd_loss(torch.tensor([[0.0, 1.0]]), f_t, torch.tensor([1]), centers).item() == pytest.approx(0.5)


def test_mcmi_matches_written_out_formula_and_has_gradient(batch):
    _, t, y = batch
    tn, yn = t.numpy(), y.numpy()
    p = softmax(tn, 1)
    centroids = {c: p[yn == c].mean(0) for c in np.unique(yn)}
    cmi = np.mean([entropy(p[i], centroids[yn[i]]) for i in range(len(yn))])
    expected = _ce(tn, yn) - 0.15 * cmi
    logits = t.clone().requires_grad_(True)
    loss = mcmi_teacher_loss(logits, y)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # The CMI term must move the logits: compare with the CE-only gradient.
    plain = t.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(plain, y).backward()
    assert not torch.allclose(logits.grad, plain.grad)


def test_dml_each_loss_reaches_only_its_own_network(batch):
    s, t, y = batch
    a, b = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss_a, loss_b = dml_losses(a, b, y)
    expected_a = _ce(s.numpy(), y.numpy()) + _kl_rows(softmax(t.numpy(), 1), softmax(s.numpy(), 1)).mean()
    assert loss_a.item() == pytest.approx(expected_a, rel=1e-6)
    loss_a.backward()
    assert b.grad is None
    loss_b.backward()
    assert b.grad is not None


def test_bdkd_online_student_loss_weights_and_teacher_term(batch):
    s, t, y = batch
    sn, tn = s.numpy(), t.numpy()
    p, q = softmax(tn, 1), softmax(sn, 1)
    fkl, rkl = _kl_rows(p, q), _kl_rows(q, p)
    student_less_confident = entropy(q, axis=1) > entropy(p, axis=1)
    w_r = np.where(student_less_confident, 3.0, 1.0)
    w_f = np.where(student_less_confident, 1.0, 3.0)
    expected_student = _ce(sn, y.numpy()) + (w_f * fkl + w_r * rkl).mean()
    expected_teacher = _ce(tn, y.numpy()) + _kl_rows(q, p).mean()  # teacher toward the student: KL(q_s ‖ p_t)
    student_loss, teacher_loss = bdkd_online_losses(s, t, y)
    assert student_loss.item() == pytest.approx(expected_student, rel=1e-6)
    assert teacher_loss.item() == pytest.approx(expected_teacher, rel=1e-6)
