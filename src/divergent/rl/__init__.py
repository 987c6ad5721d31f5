"""RL and preference objectives built from the functional layer.

KL estimators, GRPO advantages and PPO-clip, f-divergence generators (DPH-RL, f-DPO,
f-DPG), KDRL, f-DPO, f-DPG,
balanced difficulty filtering and unbiased pass@k — each defined once here and
imported by the trainers in ``divergent.train`` — and the registry of GRPO regularisers
(:mod:`divergent.rl.registry`). Formulas, defaults and sources: ``docs/methods.md``.
"""

from divergent.rl.estimators import KL_ESTIMATORS, kl_estimator, token_logprobs
from divergent.rl.fdpg import (
    FDPG_DIVERGENCES,
    PseudoRewardBaseline,
    RunningZ,
    fdpg_divergence_estimates,
    fdpg_loss,
    fdpg_pseudo_reward,
    fit_moment_lambda,
)
from divergent.rl.fdpo import FDPO_DIVERGENCES, fdpo_loss, fdpo_psi
from divergent.rl.filtering import BalancedBatch, accuracy_band_mask
from divergent.rl.generators import F_DIVERGENCES, GENERATORS, f_generator, f_prime, generator_value
from divergent.rl.grpo import group_advantages, masked_token_mean, ppo_clip_loss
from divergent.rl.kdrl import kdrl_coefficient, kdrl_kd_loss
from divergent.rl.registry import (
    RegulariserInputs,
    RegulariserParam,
    RegulariserSpec,
    available_regularisers,
    get_regulariser,
    register_regulariser,
    unregister_regulariser,
)
from divergent.metrics.passk import distinct_correct, pass_at_k, pass_at_k_curve

__all__ = [
    "FDPG_DIVERGENCES",
    "F_DIVERGENCES",
    "PseudoRewardBaseline",
    "RunningZ",
    "fdpg_divergence_estimates",
    "fdpg_loss",
    "fdpg_pseudo_reward",
    "fit_moment_lambda",
    "f_prime",
    "generator_value",
    "FDPO_DIVERGENCES",
    "GENERATORS",
    "KL_ESTIMATORS",
    "BalancedBatch",
    "RegulariserInputs",
    "RegulariserParam",
    "RegulariserSpec",
    "available_regularisers",
    "get_regulariser",
    "register_regulariser",
    "unregister_regulariser",
    "accuracy_band_mask",
    "distinct_correct",
    "f_generator",
    "fdpo_loss",
    "fdpo_psi",
    "group_advantages",
    "kdrl_coefficient",
    "kdrl_kd_loss",
    "kl_estimator",
    "masked_token_mean",
    "pass_at_k",
    "pass_at_k_curve",
    "ppo_clip_loss",
    "token_logprobs",
]
