"""Each method at its authors' official settings against a re-statement of the official code.

Every reference below is a few lines of plain torch written from the official repository
(file and line cited beside it, at the commit named), or TRL itself where TRL defines the
same quantity — never the code under test. Where our default differs from the official
code it is an option, and a test pins the option too. docs/methods.md lists the differences.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from divergent.methods import (
    class_centroids,
    dkd_loss,
    mcmi_teacher_loss,
    nkd_loss,
    sinkd_loss,
    uskd_loss,
)
from divergent.rl import fdpo_loss, group_advantages, kl_estimator, ppo_clip_loss


def _batch(n=8, c=10, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(n, c, generator=g, dtype=torch.float64) * scale * 1.5
    labels = torch.randint(0, c, (n,), generator=g)
    return student, teacher, labels


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    fn(x).backward()
    return x.grad


# ---------------------------------------------------------------------------------------------
# USKD — yzd-v/cls_KD @ 1e5d48f, mmcls/models/dis_losses/uskd.py (USKDLoss.forward, lines 32-95);
# the CE of the classifier head is added by mmcls/models/classifiers/distiller.py:122.
# ---------------------------------------------------------------------------------------------


def _official_uskd(weak_logits, logit_s, label, alpha, beta, mu):
    n, c = logit_s.shape
    label = label.view(-1, 1)
    s_t = torch.gather(F.softmax(logit_s, dim=1), 1, label)           # uskd.py:44-45
    p_t = s_t**2
    p_t = (p_t + 1 - p_t.mean(0, True)).detach()                      # uskd.py:48-51 (hard labels: value = 1)
    s_i = F.log_softmax(logit_s, dim=1)                               # uskd.py:53-55
    loss_t = -(p_t * torch.gather(s_i, 1, label)).sum(dim=1).mean()
    target = torch.zeros_like(logit_s).scatter_(1, label, 0.9) + 0.1 / c   # uskd.py:61
    loss_weak = -(mu * target * F.log_softmax(weak_logits, dim=1)).sum(dim=1).mean()  # uskd.py:64-66
    w_i = F.softmax(weak_logits, dim=1)                               # uskd.py:69-70
    w_t = torch.gather(w_i, 1, label)
    s_t_log = torch.gather(s_i, 1, label)
    rank = w_i / (1 - w_t + 1e-6) + s_i / (1 - s_t_log + 1e-6)        # uskd.py:73 (s_i holds log-probs there)
    _, order = torch.sort(rank, descending=True, dim=-1)             # uskd.py:76-79
    zipf = (1 / torch.arange(1, c + 1, dtype=logit_s.dtype)).repeat(n, 1)
    z_i = torch.gather(zipf, 1, torch.argsort(order))
    mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()     # uskd.py:81-89
    ns_i = F.log_softmax(logit_s[mask].reshape(n, -1), dim=1)
    nz_i = z_i[mask].reshape(n, -1)
    nz_i = (nz_i / nz_i.sum(dim=1, keepdim=True)).detach()
    loss_non = -(nz_i * ns_i).sum(dim=1).mean()
    return alpha * loss_t + beta * loss_non + loss_weak              # uskd.py:93


@pytest.mark.parametrize("alpha, beta, mu", [(1.0, 0.1, 0.005), (0.1, 0.1, 0.1)], ids=["imagenet", "cifar100"])
def test_uskd_matches_the_official_loss(alpha, beta, mu):
    s, w, y = _batch(n=12, c=10, seed=1)
    expected = F.cross_entropy(s, y) + _official_uskd(w, s, y, alpha, beta, mu)
    got = uskd_loss(s, y, weak_logits=w, alpha=alpha, beta=beta, mu=mu)
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)
    grad_ours = _grad(lambda x: uskd_loss(x, y, weak_logits=w, alpha=alpha, beta=beta, mu=mu), s)
    grad_official = _grad(lambda x: F.cross_entropy(x, y) + _official_uskd(w, x, y, alpha, beta, mu), s)
    torch.testing.assert_close(grad_ours, grad_official, rtol=1e-9, atol=1e-12)


def test_uskd_weak_only_ranking_is_the_other_option_and_differs():
    """``ranking="weak"`` (ranks by the weak head alone, among non-target classes) is a different loss."""
    s, w, y = _batch(n=12, c=10, seed=2)
    official = uskd_loss(s, y, weak_logits=w)
    weak = uskd_loss(s, y, weak_logits=w, ranking="weak")
    assert abs(official.item() - weak.item()) > 1e-3
    with pytest.raises(ValueError, match="ranking must be 'combined'.*got 'final'"):
        uskd_loss(s, y, weak_logits=w, ranking="final")


# ---------------------------------------------------------------------------------------------
# SinKD — 2018cx/SinKD @ 1ffac90: loss.py DistillKL (lines 7-18) and Sinkhorn (119-139);
# glue_train.py combines them: loss = α·kd + (1 − α)·CE (line 403), loss += β·sinkhorn (line 429).
# ---------------------------------------------------------------------------------------------


def _official_sinkd(y_s, y_t, labels, alpha, beta, kd_temperature):
    p_s = F.log_softmax(y_s / kd_temperature, dim=-1)                # loss.py:15-17, no T² factor
    p_t = F.softmax(y_t / kd_temperature, dim=-1)
    loss_kd = -torch.sum(p_t * p_s, dim=-1).mean()
    q_s, q_t = F.softmax(y_s / 2, dim=1), F.softmax(y_t / 2, dim=1)  # loss.py:122, 135-137: T fixed at 2
    w = torch.cdist(q_s, q_t, p=1)                                   # loss.py:130-133
    plan = torch.exp(-w / 0.1)
    for _ in range(20):                                              # loss.py:123-127
        plan = plan / torch.sum(plan, dim=1, keepdim=True)
        plan = plan / torch.sum(plan, dim=0, keepdim=True)
    emd = 0.001 * torch.sum(plan * w)                                # loss.py:138
    loss = alpha * loss_kd + (1 - alpha) * F.cross_entropy(y_s, labels)
    return loss + beta * emd


@pytest.mark.parametrize("temperature", [2.0, 3.5])
def test_sinkd_matches_the_official_recipe(temperature):
    """Equal gradients; values differ by α·H(p_T), the teacher entropy the official soft CE carries."""
    s, t, y = _batch(n=16, c=6, seed=3, scale=1.0)
    alpha, beta = 0.9, 0.8
    ours = sinkd_loss(s, t, y, kd_weight=alpha, sinkhorn_weight=beta, temperature=temperature)
    official = _official_sinkd(s, t, y, alpha, beta, temperature)
    p_t = F.softmax(t / temperature, dim=-1)
    entropy = -(p_t * p_t.log()).sum(-1).mean()
    assert ours.item() + alpha * entropy.item() == pytest.approx(official.item(), rel=1e-10)
    torch.testing.assert_close(
        _grad(lambda x: sinkd_loss(x, t, y, kd_weight=alpha, sinkhorn_weight=beta, temperature=temperature), s),
        _grad(lambda x: _official_sinkd(x, t, y, alpha, beta, temperature), s),
        rtol=1e-8, atol=1e-12,
    )


def test_sinkd_hinton_style_option_is_the_former_scaling():
    """t2_scale, sinkhorn_scale=1 and the mean reduction: T²·KD and ⟨P, W⟩ — 62.5x the official Sinkhorn term at B = 16."""
    s, t, y = _batch(n=16, c=6, seed=4, scale=1.0)
    ce = F.cross_entropy(s, y)
    official_sink = sinkd_loss(s, t, y, kd_weight=0.0, sinkhorn_weight=1.0) - ce
    former_sink = sinkd_loss(s, t, y, kd_weight=0.0, sinkhorn_weight=1.0, sinkhorn_scale=1.0, sinkhorn_reduction="mean") - ce
    assert former_sink.item() / official_sink.item() == pytest.approx(1 / (0.001 * 16), rel=1e-9)
    official_kd = sinkd_loss(s, t, y, kd_weight=1.0, sinkhorn_weight=0.0)
    former_kd = sinkd_loss(s, t, y, kd_weight=1.0, sinkhorn_weight=0.0, t2_scale=True)
    assert former_kd.item() / official_kd.item() == pytest.approx(4.0, rel=1e-9)
    with pytest.raises(ValueError, match="sinkhorn_reduction must be 'sum'.*got 'none'"):
        sinkd_loss(s, t, y, sinkhorn_reduction="none")


# ---------------------------------------------------------------------------------------------
# DKD — megvii-research/mdistiller @ a08d46f, mdistiller/distillers/DKD.py dkd_loss (lines 8-32)
# and forward_train (line 72: min(epoch / warmup, 1)); engine/trainer.py:78-87 counts epochs from 1.
# ---------------------------------------------------------------------------------------------


def _official_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = ~gt_mask
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t):
        return torch.cat([(t * gt_mask).sum(1, keepdim=True), (t * other_mask).sum(1, keepdim=True)], dim=1)

    pred_student, pred_teacher = cat_mask(pred_student), cat_mask(pred_teacher)
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("mdistiller_epoch", [1, 2, 10, 20, 21, 240])
def test_dkd_matches_mdistiller_with_its_epoch_count(mdistiller_epoch):
    """Our epoch e (from 0, as the trainer passes it) is mdistiller's e + 1: epoch 0 gets 1/20 of the DKD term."""
    s, t, y = _batch(n=8, c=10, seed=5, scale=1.0)
    warmup = min(mdistiller_epoch / 20, 1.0)                         # DKD.py:72
    expected = F.cross_entropy(s, y) + warmup * _official_dkd(s, t, y, 1.0, 8.0, 4.0)
    got = dkd_loss(s, t, y, epoch=mdistiller_epoch - 1)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# NKD — yzd-v/cls_KD @ 1e5d48f, mmcls/models/dis_losses/nkd.py (NKDLoss.forward, lines 23-51);
# CIFAR-100 config configs/distillers/cifar100/res34_distill_res18_cifar.py: temp=3, gamma=3.5.
# ---------------------------------------------------------------------------------------------


def _official_nkd(logit_s, logit_t, gt_label, temp, gamma):
    label = gt_label.view(-1, 1)
    n, _ = logit_s.shape
    s_t = torch.gather(F.log_softmax(logit_s, dim=1), 1, label)
    t_t = torch.gather(F.softmax(logit_t, dim=1), 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()
    s_non = F.log_softmax(logit_s[mask].reshape(n, -1) / temp, dim=1)
    t_non = F.softmax(logit_t[mask].reshape(n, -1) / temp, dim=1)
    return loss_t - gamma * temp**2 * (t_non * s_non).sum(dim=1).mean()


@pytest.mark.parametrize("temp, gamma", [(3.0, 3.5), (1.0, 1.5)], ids=["cifar100", "imagenet"])
def test_nkd_matches_the_official_loss(temp, gamma):
    s, t, y = _batch(n=8, c=10, seed=6)
    expected = F.cross_entropy(s, y) + _official_nkd(s, t, y, temp, gamma)  # the head's CE is added (distiller.py:122)
    assert nkd_loss(s, t, y, temperature=temp, gamma=gamma).item() == pytest.approx(expected.item(), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# MCMI — iclr2024mcmi/ICLRMCMI @ d12f354, CIFAT-100KD: centroid.py Centroid.update_epoch (lines 95-110),
# losses.py CE_KL_loss (lines 16-19), helper/loops.py:90-94 (loss = param[0]·CE + param[1]·KL,
# param = [1, -λ]); FineTuneTeacher.py:143 computes the centroids once, before fine-tuning.
# ---------------------------------------------------------------------------------------------


def test_mcmi_with_training_set_centroids_matches_the_official_loss():
    train_logits, _, train_labels = _batch(n=60, c=5, seed=7)
    batch_logits, _, batch_labels = _batch(n=10, c=5, seed=8)
    centroids = torch.zeros(5, 5, dtype=torch.float64)                 # centroid.py:96-110
    probs = F.softmax(train_logits, 1)
    for cls in train_labels.unique():
        centroids[cls] += probs[train_labels == cls].sum(0)
    centroids = centroids / centroids.sum(1)[:, None]
    cs = torch.index_select(centroids, 0, batch_labels)                 # centroid.py:112-113
    kl = F.kl_div(cs.log(), F.log_softmax(batch_logits, 1), reduction="batchmean", log_target=True)  # losses.py:18
    expected = F.cross_entropy(batch_logits, batch_labels) - 0.15 * kl  # loops.py:94 with param = [1, -0.15]
    ours = class_centroids(train_logits, train_labels, 5)
    torch.testing.assert_close(ours, centroids)
    got = mcmi_teacher_loss(batch_logits, batch_labels, centroids=ours)
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)
    # The official centroids are fixed: no gradient reaches them (the batch estimate lets one through).
    grad = _grad(lambda x: mcmi_teacher_loss(x, batch_labels, centroids=ours), batch_logits)
    official_grad = _grad(lambda x: F.cross_entropy(x, batch_labels) - 0.15 * F.kl_div(
        cs.log(), F.log_softmax(x, 1), reduction="batchmean", log_target=True), batch_logits)
    torch.testing.assert_close(grad, official_grad)
    assert not torch.allclose(grad, _grad(lambda x: mcmi_teacher_loss(x, batch_labels), batch_logits))


def test_mcmi_centroids_shape_is_checked():
    logits, _, labels = _batch(n=6, c=5, seed=9)
    with pytest.raises(ValueError, match=r"centroids must have shape \(5, 5\).*got \(4, 5\)"):
        mcmi_teacher_loss(logits, labels, centroids=torch.full((4, 5), 0.2))


# ---------------------------------------------------------------------------------------------
# GRPO advantages — TRL (installed): trl/trainer/grpo_trainer.py:2765-2787 with trl.trainer.utils.nanstd
# (Bessel-corrected); verl @ b178a3c, verl/trainer/ppo/core_algos.py:303-330 (torch.std, eps 1e-6).
# ---------------------------------------------------------------------------------------------


def test_group_advantages_match_trl():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(10)
    num_generations = 6
    rewards = torch.randint(0, 3, (5 * num_generations,), generator=g).float()
    rewards[:num_generations] = 1.0  # one all-equal group
    # TRL's "group" scaling, grpo_trainer.py:2765-2787:
    mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    std_grouped = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    trl_advantages = (rewards - mean_grouped) / (std_grouped + 1e-4)
    ours = group_advantages(rewards.view(-1, num_generations)).flatten()
    torch.testing.assert_close(ours, trl_advantages)
    population = group_advantages(rewards.view(-1, num_generations), std="population").flatten()
    assert not torch.allclose(population, trl_advantages)


def test_group_advantages_match_verl():
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(4, 5, generator=g, dtype=torch.float64)
    expected = torch.stack([(row - torch.mean(row)) / (torch.std(row) + 1e-6) for row in scores])  # core_algos.py:318-325
    torch.testing.assert_close(group_advantages(scores, eps=1e-6), expected)


# ---------------------------------------------------------------------------------------------
# PPO dual clip and log-ratio clamp — verl @ b178a3c, verl/trainer/ppo/core_algos.py
# compute_policy_loss_vanilla, lines 1210-1243 (token-mean aggregation).
# ---------------------------------------------------------------------------------------------


def _verl_policy_loss(old_log_prob, log_prob, advantages, mask, clip_ratio, clip_ratio_c):
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio, 1 + clip_ratio)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return (pg_losses * mask).sum() / mask.sum()


def test_dual_clip_and_log_ratio_clamp_match_verl():
    g = torch.Generator().manual_seed(12)
    old = torch.randn(6, 7, generator=g, dtype=torch.float64) - 2
    # Ratios from e^-25 to e^25: the clamp at ±20 and the dual clip at c = 3 both act.
    new = old + torch.linspace(-25, 25, 42, dtype=torch.float64).view(6, 7)
    advantages = torch.tensor([1.0, -1.0, 0.5, -2.0, -0.3, 0.0], dtype=torch.float64).unsqueeze(1).expand(6, 7)
    mask = torch.rand(6, 7, generator=g) > 0.2

    def ours(x):
        return ppo_clip_loss(x, old, advantages, mask, clip_eps=0.2, dual_clip=3.0, log_ratio_clamp=20.0)[0]

    def verl(x):
        return _verl_policy_loss(old, x, advantages, mask.double(), 0.2, 3.0)

    assert ours(new).item() == pytest.approx(verl(new).item(), rel=1e-12)
    torch.testing.assert_close(_grad(ours, new), _grad(verl, new))
    _, stats = ppo_clip_loss(new, old, advantages, mask, dual_clip=3.0, log_ratio_clamp=20.0)
    assert 0 < stats["dual_clip_fraction"] < 1
    # Off by default: without the dual clip a negative-advantage token with a large ratio keeps pushing.
    plain, _ = ppo_clip_loss(new, old, advantages, mask)
    assert plain.item() > ours(new).item()


def test_dual_clip_and_clamp_reject_bad_values():
    x = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_clip_loss(x, x, torch.ones(1), mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="log_ratio_clamp must be > 0"):
        ppo_clip_loss(x, x, torch.ones(1), mask, log_ratio_clamp=0.0)


# ---------------------------------------------------------------------------------------------
# k3 clamps — verl @ b178a3c, verl/trainer/ppo/core_algos.py kl_penalty_forward, lines 1890-1896.
# ---------------------------------------------------------------------------------------------


def test_k3_clamps_match_verl_low_var_kl():
    logprob = torch.linspace(-40, 0, 81, dtype=torch.float64)
    ref_logprob = torch.linspace(0, -40, 81, dtype=torch.float64)
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    expected = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    got = kl_estimator(logprob, ref_logprob, "k3", log_ratio_clamp=20.0, value_clamp=10.0)
    torch.testing.assert_close(got, expected)
    # Without the clamps (the default, as TRL) the large ratios are not capped.
    assert kl_estimator(logprob, ref_logprob, "k3").max() > 1e6
    with pytest.raises(ValueError, match="value_clamp must be a number > 0"):
        kl_estimator(logprob, ref_logprob, "k3", value_clamp=-1.0)


# ---------------------------------------------------------------------------------------------
# f-DPO — TRL (installed), trl/trainer/dpo_trainer.py:1353-1379: the f-divergence scores of DPO.
# TRL's alpha-divergence f'(t) = (t^(a-1) - 1)/(a-1) is ours (1 - u^-alpha)/alpha with a = 1 - alpha.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["reverse_kl", "js", "alpha"])
def test_fdpo_matches_trl_scores(divergence):
    g = torch.Generator().manual_seed(13)
    pw, pl, rw, rl = (torch.randn(8, generator=g, dtype=torch.float64) * 3 - 20 for _ in range(4))
    beta, alpha = 0.1, 0.3
    chosen, rejected = pw - rw, pl - rl
    if divergence == "reverse_kl":
        scores = chosen, rejected
    elif divergence == "js":
        scores = (math.log(2) + F.logsigmoid(chosen), math.log(2) + F.logsigmoid(rejected))
    else:
        a = 1.0 - alpha
        scores = tuple((torch.exp((a - 1.0) * r) - 1.0) / (a - 1.0) for r in (chosen, rejected))
    expected = -F.logsigmoid(beta * (scores[0] - scores[1]))
    got, _ = fdpo_loss(pw, pl, rw, rl, divergence=divergence, beta=beta, alpha=alpha, reduction="none")
    torch.testing.assert_close(got, expected)
