"""Generalized JSD equals TRL's ``GKDTrainer.generalized_jsd_loss`` for beta in (0, 1).

TRL's mixture is m = beta * p_teacher + (1 - beta) * q_student and its loss
beta * KL(p || m) + (1 - beta) * KL(q || m), averaged over tokens whose label
is not -100 -- the same quantity as ``dv.divergence("js", ..., beta=beta)``.
"""

import pytest
import torch

import divergent.functional as F
from divergent.losses.linear import LinearDistillationLoss

gkd = pytest.importorskip("trl.experimental.gkd", reason="trl is not installed")


def _logits(seed=0, shape=(3, 7, 40)):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, generator=gen) * 2).requires_grad_(True)
    teacher = torch.randn(*shape, generator=gen) * 2
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    return student, teacher, labels


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_js_equals_trl_generalized_jsd(beta, temperature):
    student, teacher, labels = _logits()
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    ours = F.divergence("js", student, teacher, mask=labels != -100, temperature=temperature, beta=beta)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-7)
    (trl_grad,) = torch.autograd.grad(trl_loss, student)
    (our_grad,) = torch.autograd.grad(ours, student)
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("beta", [0.25, 0.75])
def test_fused_js_with_global_normaliser_equals_trl_num_items_in_batch(beta):
    """TRL's gradient-accumulation normaliser (num_items_in_batch) and ours (normalizer) agree."""
    gen = torch.Generator().manual_seed(1)
    hidden_s = torch.randn(2, 9, 16, generator=gen).requires_grad_(True)
    hidden_t = torch.randn(2, 9, 24, generator=gen)
    w_s, w_t = torch.randn(50, 16, generator=gen), torch.randn(50, 24, generator=gen)
    labels = torch.randint(0, 50, (2, 9), generator=gen)
    labels[1, :4] = -100
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss(
        hidden_s @ w_s.T, hidden_t @ w_t.T, labels=labels, beta=beta, num_items_in_batch=40
    )
    fused = LinearDistillationLoss("js", chunk_size=5, hard_weight=0.0, soft_weight=1.0, beta=beta)(
        hidden_s, w_s, hidden_t, w_t, labels, normalizer=40
    )
    torch.testing.assert_close(fused, trl_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        torch.autograd.grad(fused, hidden_s)[0], torch.autograd.grad(trl_loss, hidden_s)[0], rtol=1e-4, atol=1e-7
    )
