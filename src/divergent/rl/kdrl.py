"""KDRL: GRPO plus reverse KL to a teacher on the student's own rollouts.

    L = L_GRPO + beta_t * mean_{counted tokens} k(log pi_student(y_t) - log pi_teacher(y_t))

with y sampled from the student, ``k`` a KL estimator (k2 by default, the
variant KDRL reports best) or ``"full"`` — the exact per-position reverse KL
over the whole vocabulary from ``divergent.functional``. The coefficient is
annealed linearly, ``beta_t = max(beta_0 - delta * t, beta_min)``, and
reward-guided masking drops the KD term on responses that were already
correct (reward > threshold). The exact recipe details are unverified (see
``docs/methods.md``); every one of them is a parameter here.
"""

from __future__ import annotations

import torch

from divergent.rl.estimators import KL_ESTIMATORS, kl_estimator
from divergent.rl.grpo import masked_token_mean

__all__ = ["kdrl_coefficient", "kdrl_kd_loss"]


def kdrl_coefficient(step: int, beta0: float, delta: float, beta_min: float) -> float:
    """Linearly annealed KD coefficient ``max(beta0 - delta * step, beta_min)``.

    Example:
        >>> kdrl_coefficient(10, beta0=0.02, delta=0.001, beta_min=0.005)
        0.01
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if beta0 < 0 or delta < 0 or beta_min < 0:
        raise ValueError(f"beta0, delta and beta_min must be >= 0, got {beta0}, {delta}, {beta_min}")
    return round(max(beta0 - delta * step, beta_min), 12)


def kdrl_kd_loss(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor | None = None,
    *,
    estimator: str = "k2",
    mask_correct: bool = True,
    correct_threshold: float = 0.0,
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-mean reverse-KL-to-teacher term of KDRL (without the coefficient).

    Args:
        student_logp, teacher_logp: ``[B, T]`` log-probs of the sampled tokens
            under the student (with gradient) and the teacher.
        mask: ``[B, T]`` bool response-token mask.
        rewards: ``[B]`` sequence rewards; with ``mask_correct`` the responses with
            reward > ``correct_threshold`` get no KD term (reward-guided masking).
        estimator: ``"k1"``, ``"k2"``, ``"k3"`` on sampled tokens, or ``"full"`` for the
            exact reverse KL over the vocabulary (then ``student_logits`` and
            ``teacher_logits`` of shape ``[B, T, V]`` are required).
    """
    if estimator not in KL_ESTIMATORS + ("full",):
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS + ('full',)}, got {estimator!r}")
    if mask_correct:
        if rewards is None:
            raise ValueError("rewards are required when mask_correct=True (reward-guided masking)")
        if rewards.shape != mask.shape[:1]:
            raise ValueError(f"rewards must have shape [{mask.shape[0]}], got {tuple(rewards.shape)}")
        mask = mask & (rewards <= correct_threshold).unsqueeze(1)
    if estimator == "full":
        if student_logits is None or teacher_logits is None:
            raise ValueError("estimator='full' needs student_logits and teacher_logits of shape [B, T, V]")
        import divergent as dv  # the divergence math lives in divergent.functional

        per_token = dv.divergence("reverse_kl", student_logits, teacher_logits, mask=mask, reduction="none")
    else:
        per_token = kl_estimator(student_logp, teacher_logp.detach(), estimator)
    return masked_token_mean(per_token, mask)
