"""``LinearDistillationLoss`` equals Liger-Kernel's ``LigerFusedLinearJSDLoss``.

Liger-Kernel's chunked distillation loss is an independent implementation of the
same fused quantity: hard-label CE and a generalized JSD of the output layer,
averaged over the tokens whose label is not ``ignore_index``, with the mixture
m = beta * p_teacher + (1 - beta) * q_student and, at its ends, forward KL
(beta = 0) and reverse KL (beta = 1). It applies no T^2 factor, so ours runs with
``t2_scale=False``. Liger's module runs on CPU with ``compiled=False``; these
tests skip when ``liger_kernel`` is not installed.
"""

import pytest
import torch

from divergent.losses.linear import LinearDistillationLoss

chunked_loss = pytest.importorskip("liger_kernel.chunked_loss", reason="liger_kernel is not installed")

# Liger's beta -> our name and parameters for the same divergence.
CASES = [(0.0, "forward_kl", {}), (1.0, "reverse_kl", {}), (0.3, "js", {"beta": 0.3}), (0.5, "js", {"beta": 0.5})]


def _inputs(seed=0, n=45, h_s=12, h_t=20, vocab=300):
    gen = torch.Generator().manual_seed(seed)
    x_s = torch.randn(n, h_s, generator=gen).requires_grad_(True)
    w_s = (torch.randn(vocab, h_s, generator=gen) * h_s**-0.5).requires_grad_(True)
    x_t = torch.randn(n, h_t, generator=gen)
    w_t = torch.randn(vocab, h_t, generator=gen) * h_t**-0.5 * 2
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::4] = -100
    return x_s, w_s, x_t, w_t, labels


@pytest.mark.parametrize(("liger_beta", "name", "params"), CASES, ids=[c[1] + str(c[0]) for c in CASES])
@pytest.mark.parametrize(("hard_weight", "temperature"), [(0.0, 1.0), (0.3, 2.0)])
def test_linear_distillation_loss_equals_liger_fused_linear_jsd(liger_beta, name, params, hard_weight, temperature):
    x_s, w_s, x_t, w_t, labels = _inputs()
    liger = chunked_loss.LigerFusedLinearJSDLoss(
        weight_hard_loss=hard_weight, weight_soft_loss=1.0 - hard_weight, beta=liger_beta,
        temperature=temperature, compiled=False,
    )
    theirs = liger(x_s, w_s, x_t, w_t, labels)
    ours = LinearDistillationLoss(
        name, chunk_size=7, hard_weight=hard_weight, soft_weight=1.0 - hard_weight,
        temperature=temperature, t2_scale=False, **params,
    )(x_s, w_s, x_t, w_t, labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    for got, want in zip(torch.autograd.grad(ours, [x_s, w_s]), torch.autograd.grad(theirs, [x_s, w_s])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
