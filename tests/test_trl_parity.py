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


# ----------------------------------------------------------------------------- gkd_loss: TRL's signature, any divergence

from divergent.hf import gkd_loss  # noqa: E402


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_gkd_loss_js_equals_trl_for_beta_in_the_open_interval(beta, temperature, reduction):
    student, teacher, labels = _logits()
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta,
                                                   temperature=temperature, reduction=reduction)
    ours = gkd_loss("js")(student, teacher, labels=labels, beta=beta, temperature=temperature, reduction=reduction)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(torch.autograd.grad(ours, student)[0], torch.autograd.grad(trl_loss, student)[0],
                               rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("name, trl_beta", [("forward_kl", 0.0), ("reverse_kl", 1.0)])
def test_gkd_loss_forward_and_reverse_kl_equal_trl_at_the_ends(name, trl_beta):
    student, teacher, labels = _logits(seed=3)
    for kwargs in ({}, {"num_items_in_batch": 17}, {"reduction": "sum"}):
        trl_loss = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=trl_beta, **kwargs)
        # TRL passes its GKDConfig.beta; a fixed divergence ignores it.
        ours = gkd_loss(name)(student, teacher, labels=labels, beta=0.5, **kwargs)
        torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-7)
    trl_rows = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=trl_beta, reduction="none")
    torch.testing.assert_close(gkd_loss(name)(student, teacher, labels=labels, reduction="none"), trl_rows.sum(-1),
                               rtol=1e-5, atol=1e-7)  # per token (TRL: per vocabulary entry)


def test_gkd_loss_without_labels_and_parameters_fixed_at_construction():
    student, teacher, _ = _logits(seed=4)
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, beta=0.3)
    torch.testing.assert_close(gkd_loss("js")(student, teacher, beta=0.3), trl_loss, rtol=1e-5, atol=1e-7)
    # A beta given to gkd_loss wins over the one TRL passes at call time.
    torch.testing.assert_close(gkd_loss("js", beta=0.3)(student, teacher, beta=0.9), trl_loss, rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="did you mean 'alpha'"):
        gkd_loss("skew_kl", alpah=0.1)
    with pytest.raises(ValueError, match="unknown divergence"):
        gkd_loss("kl")


def test_a_trl_user_swaps_the_divergence_of_gkd_trainer_in_one_line(tmp_path):
    """GKDTrainer(beta=0) computes forward KL; with gkd_loss("forward_kl") it computes the same loss,
    and with gkd_loss("tvd") the total variation of the same logits."""
    datasets = pytest.importorskip("datasets")
    import lm_helpers as H

    tokenizer = H.tokenizer()
    student, teacher = H.llama(len(tokenizer), 32, 1, seed=0), H.llama(len(tokenizer), 48, 2, seed=1)
    args = gkd.GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                         use_cpu=True, beta=0.0, lmbda=0.0, save_strategy="no", max_length=64)
    trainer = gkd.GKDTrainer(model=student, teacher_model=teacher, args=args,
                             train_dataset=datasets.Dataset.from_list(H.chat_rows(8)), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
        trainer.generalized_jsd_loss = gkd_loss("forward_kl")
        ours = trainer.compute_loss(trainer.model, batch)
        trainer.generalized_jsd_loss = gkd_loss("tvd")
        tvd = trainer.compute_loss(trainer.model, batch)
        s, t = student(batch["input_ids"]).logits[:, :-1], teacher(batch["input_ids"]).logits[:, :-1]
    torch.testing.assert_close(ours, trl_loss)
    counted = batch["labels"][:, 1:] != -100
    expected_tvd = 0.5 * (s.softmax(-1) - t.softmax(-1)).abs().sum(-1)[counted].mean()
    torch.testing.assert_close(tvd, expected_tvd, rtol=1e-5, atol=1e-7)
