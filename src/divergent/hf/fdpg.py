"""f-DPG inside TRL: :class:`FDPGConfig` and :class:`FDPGTrainer`.

``FDPGTrainer`` is ``trl.GRPOTrainer`` — generation (vLLM included), datasets, ``accelerate``,
logging are TRL's — with the GRPO objective replaced by f-DPG's (Go et al., ICML 2023), whose
math is :mod:`divergent.rl.fdpg` (the same functions ``divergent fdpg`` calls):

- the target is P(x) = a(x) · factor(x) with a = the initial model, kept frozen as TRL's
  reference model (``trainer.ref_model``), and the factor built from TRL's ``reward_funcs``
  (their weighted sum, ``reward_weights``): a pointwise constraint b ∈ {0, 1}
  (factor max(b, ε)), a feature φ with a target moment μ* (factor exp(λ·φ), λ fitted by
  importance-sampled moment matching on the first generation batch, which the initial
  policy a samples, unless ``feature_lambda`` is given), or a reward r (factor exp(r/β));
- each generation batch (gathered over processes) first updates the running Z of its prompts
  with P/q (:class:`~divergent.rl.fdpg.RunningZ`, per prompt text, or one Z with
  ``z_per_prompt=False``) — *before* any gradient on it; the baseline b is the windowed mean
  of earlier pseudo-rewards (:class:`~divergent.rl.fdpg.PseudoRewardBaseline`), its value
  before this batch, then the batch's pseudo-rewards are added;
- the loss of a micro-batch is :func:`~divergent.rl.fdpg.fdpg_loss` on its sequences (summed
  completion log-probs of the policy with gradient, of the sampling policy q, log P, log Z, b),
  divided by the gradient-accumulation steps as TRL divides its own; samples whose prompt has
  no Z > 0 yet are left out, as ``divergent fdpg`` leaves them out;
- ``fdpg/*`` metrics go through TRL's metrics: pseudo_reward, baseline, z, alignment (the mean
  factor value b, φ or r), kl/tv/js of p and π (importance-sampled, disco's formulas) and
  KL(π‖a), plus TRL's own ``reward`` (the same values).

TRL's checkpoints carry ``fdpg_state.json`` (Z, the baseline's window, λ), read back on
``train(resume_from_checkpoint=...)``; with :class:`~divergent.hf.resume.ExactResume` (the epoch's
prompt order, TRL's generation buffer) a resumed run ends exactly where the uninterrupted one ends. Evaluation batches use the training Z and do not add to it.

q is the policy at generation time: TRL's ``old_per_token_logps`` where TRL computes them
(``num_iterations > 1``, misaligned accumulation, vLLM), otherwise one no-grad forward of the
policy on the batch. With vLLM the samples come from vLLM's copy of the policy and q is the
training model's probability of them (vLLM's own log-probs are not used).

Sampling must be the model's own distribution: temperature 1, no top-p/top-k/min-p, no
repetition penalty (π(x) is the model's probability of x). TRL's ``beta`` must be 0.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import trl

from divergent.hf.resume import ExactResume
from divergent.io import read_json, write_json
from divergent.rl.fdpg import PseudoRewardBaseline, RunningZ, fdpg_divergence_estimates, fdpg_loss
from divergent.rl.fdpg import fdpg_pseudo_reward, fit_moment_lambda
from divergent.rl.generators import check_f_divergence
from divergent.train.fdpg import TARGET_KINDS, FDPGTarget

__all__ = ["FDPGConfig", "FDPGTrainer"]


def _scored_by_trl(problems, texts):  # FDPGTarget.score: TRL's reward_funcs score the samples here
    raise RuntimeError("FDPGTrainer scores samples with TRL's reward_funcs")


@dataclass
class FDPGConfig(trl.GRPOConfig):
    """``trl.GRPOConfig`` with f-DPG's settings; TRL's fields keep their meaning.

    divergence: an f-divergence (forward_kl, reverse_kl, js, tvd, chi2, hellinger, alpha).
    divergence_alpha: the order of the ``alpha`` divergence.
    target: "constraint", "feature" or "reward" — what ``reward_funcs`` return (their weighted sum).
    constraint_epsilon: constraint only, P = a·max(b, ε), ε in [0, 1) (reverse_kl needs ε > 0).
    reward_beta: reward only, P = a·exp(r / β), β > 0.
    moment: feature only, the target mean μ* of φ.
    feature_lambda: feature only, λ given instead of fitted on the first generation batch.
    fdpg_baseline: subtract the windowed mean of pseudo-rewards (disco's default).
    baseline_window: its window (disco: 1024).
    z_per_prompt: one running Z per prompt text (conditional targets, CDPG) or one for all.
    max_zero_samples: stop with an error when no sample of this many has P(x) > 0.
    """

    divergence: str = field(default="js", metadata={"help": "f-divergence D_f(pi || p)."})
    divergence_alpha: float = field(default=0.2, metadata={"help": "Order of the alpha divergence."})
    target: str = field(default="constraint", metadata={"help": "constraint, feature or reward."})
    constraint_epsilon: float = field(default=0.0, metadata={"help": "P = a * max(b, epsilon)."})
    reward_beta: float = field(default=0.1, metadata={"help": "P = a * exp(r / beta)."})
    moment: float | None = field(default=None, metadata={"help": "Target mean of the feature."})
    feature_lambda: float | None = field(default=None, metadata={"help": "lambda of exp(lambda * phi), or fitted."})
    fdpg_baseline: bool = field(default=True, metadata={"help": "Subtract the windowed pseudo-reward mean."})
    baseline_window: int = field(default=1024, metadata={"help": "Window of the baseline."})
    z_per_prompt: bool = field(default=True, metadata={"help": "One running Z per prompt."})
    max_zero_samples: int = field(default=1024, metadata={"help": "Samples with Z = 0 before an error."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_f_divergence(self.divergence, alpha=self.divergence_alpha)
        if self.target not in TARGET_KINDS:
            from divergent.config import suggest

            raise ValueError(f"FDPGConfig.target must be one of {', '.join(TARGET_KINDS)}, got {self.target!r}"
                             f"{suggest(self.target, TARGET_KINDS)}")
        if self.target == "reward" and (isinstance(self.reward_beta, bool) or not self.reward_beta > 0):
            raise ValueError(f"FDPGConfig.reward_beta must be > 0 (P = a·exp(r/β)), got {self.reward_beta!r}")
        if self.target == "constraint" and not (isinstance(self.constraint_epsilon, (int, float))
                                                and 0 <= self.constraint_epsilon < 1):
            raise ValueError(f"FDPGConfig.constraint_epsilon must be in [0, 1), got {self.constraint_epsilon!r}")
        if self.target == "feature" and self.moment is None:
            raise ValueError("FDPGConfig.moment is required for target='feature' (the target mean μ* of φ)")
        if self.target != "feature" and (self.moment is not None or self.feature_lambda is not None):
            raise ValueError(f"FDPGConfig.moment/feature_lambda apply to target='feature', not {self.target!r}")
        for name in ("baseline_window", "max_zero_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FDPGConfig.{name} must be an int >= 1, got {value!r}")
        if self.beta != 0.0:
            raise ValueError(f"FDPGConfig.beta={self.beta} would add TRL's KL to the f-DPG loss; set beta=0 "
                             f"(the KL to a(x) is part of the target: use target='reward' with reward_beta)")
        sampling = {"temperature": (self.temperature, 1.0), "top_p": (self.top_p, 1.0),
                    "top_k": (self.top_k, 0), "repetition_penalty": (self.repetition_penalty, 1.0)}
        for name, (value, plain) in sampling.items():
            if value != plain and not (name == "top_k" and value is None):
                raise ValueError(f"FDPGConfig.{name}={value!r}: f-DPG samples the model's own distribution "
                                 f"pi(x); use {name}={plain}")
        if self.min_p is not None:
            raise ValueError(f"FDPGConfig.min_p={self.min_p!r}: f-DPG samples the model's own distribution; "
                             f"use min_p=None")

    def fdpg_target(self, name: str) -> FDPGTarget:
        """The :class:`~divergent.train.fdpg.FDPGTarget` of these settings (``divergent fdpg``'s)."""
        lam = None if self.feature_lambda is None else torch.tensor([float(self.feature_lambda)], dtype=torch.float64)
        return FDPGTarget(kind=self.target, name=name, score=_scored_by_trl, epsilon=self.constraint_epsilon,
                          beta=self.reward_beta, moments=[] if self.moment is None else [float(self.moment)],
                          lam=lam)


class FDPGTrainer(ExactResume, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` training f-DPG (see the module docstring).

    ``reward_funcs`` score the target's factor: a constraint's b ∈ {0, 1}, a feature's φ or a
    reward r (TRL's reward functions, models or lists of them, weighted by ``reward_weights``).
    Other arguments are TRL's.
    """

    def __init__(self, model, reward_funcs=None, args: FDPGConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs) -> None:
        if not isinstance(args, FDPGConfig):
            raise TypeError(f"args must be a divergent.hf.FDPGConfig (a trl.GRPOConfig with f-DPG's fields), "
                            f"got {type(args).__name__}")
        if reward_funcs is None:
            raise ValueError(f"reward_funcs is required: it scores the {args.target} of the target "
                             f"P(x) = a(x)·factor(x)")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        if hasattr(self.accelerator.unwrap_model(self.model), "peft_config"):
            raise ValueError("FDPGTrainer needs a frozen copy of the initial model as a(x); PEFT models are not "
                             "supported yet")
        # a(x): a frozen copy of the initial policy, held where TRL keeps its reference model.
        base = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval().requires_grad_(False)
        self.ref_model = self.accelerator.prepare_model(base, evaluation_mode=True)
        names = "+".join(self.reward_func_names)
        self.fdpg_target = args.fdpg_target(f"{args.target} {names}")
        self.fdpg_z = RunningZ(self.fdpg_target.name)
        self.fdpg_baseline = PseudoRewardBaseline(args.baseline_window) if args.fdpg_baseline else None

    # -- sampling: Z and the baseline, before any gradient --------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._fdpg_rewards_per_func = rewards_per_func
        from accelerate.utils import gather_object

        self._fdpg_prompts = gather_object([str(p) for p in prompts])  # every process's, in gather order
        return rewards_per_func

    def _sequence_logps(self, model, output) -> torch.Tensor:
        """Summed completion log-probs ``[n]`` under ``model`` (TRL's fused forward, no gradient)."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with torch.no_grad():
            logps = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
                                                            output["completion_ids"].size(1))[0]
        return (logps.double() * output["completion_mask"]).sum(-1)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if "tool_mask" in output:
            raise ValueError("FDPGTrainer does not support tool calls (the target scores whole completions)")
        args, device = self.args, output["completion_ids"].device
        mode = "train" if self.model.training else "eval"
        n = output["completion_ids"].shape[0]
        local = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
        weights = self.reward_weights.to(self._fdpg_rewards_per_func.device)
        values = (self._fdpg_rewards_per_func * weights.unsqueeze(0)).nansum(dim=1).double()  # whole batch
        if self.fdpg_target.kind == "feature" and self.fdpg_target.lam is None:
            # GDC: λ from samples of a — the first generation batch, drawn before any update
            try:
                self.fdpg_target.lam = fit_moment_lambda(values.cpu(), self.fdpg_target.moments)
            except ValueError as exc:
                raise ValueError(f"{self.fdpg_target.name}: {exc}") from None
        base_lp = self._sequence_logps(self.ref_model, output)
        old = output.get("old_per_token_logps")
        proposal_lp = (old.double() * output["completion_mask"]).sum(-1) if old is not None else \
            self._sequence_logps(self.model, output)
        target_lp = base_lp + self.fdpg_target.log_factor(values[local].to(device))
        # Z over the whole generation batch (every process sees every sample), then this process's rows.
        all_target = self.accelerator.gather(target_lp)
        all_proposal = self.accelerator.gather(proposal_lp)
        all_keys = self._fdpg_prompts if args.z_per_prompt else None
        if mode == "train":  # evaluation batches are scored with the training Z, not added to it
            self.fdpg_z.update(all_keys, all_target.cpu(), all_proposal.cpu())
        keys = all_keys if all_keys is not None else [None] * all_target.shape[0]
        valid_all = torch.tensor([self.fdpg_z.z(k) > 0 for k in keys])
        if not bool(valid_all.any()):
            seen = sum(self.fdpg_z.weight.values())
            if mode == "train" and seen >= args.max_zero_samples:
                raise ValueError(
                    f"Z = 0 after {seen} samples over {len(self.fdpg_z.value)} prompts: none satisfies "
                    f"{self.fdpg_target.name}; draw more samples (larger generation batches, "
                    f"FDPGConfig.max_zero_samples) or loosen the constraint")
        log_z_all = torch.zeros(len(keys), dtype=torch.float64)
        if bool(valid_all.any()):
            log_z_all[valid_all] = self.fdpg_z.log_z([k for k, v in zip(keys, valid_all.tolist()) if v])
        b = self.fdpg_baseline.value if self.fdpg_baseline is not None else None
        output["fdpg_target_logps"] = target_lp
        output["fdpg_proposal_logps"] = proposal_lp
        output["fdpg_log_z"] = log_z_all[local].to(device)
        output["fdpg_valid"] = valid_all[local].to(device)
        output["fdpg_baseline"] = torch.full((n,), math.nan if b is None else b, dtype=torch.float64, device=device)
        metrics = self._metrics[mode]
        metrics["fdpg/skipped"].append(float((~valid_all).sum()))
        metrics["fdpg/baseline"].append(0.0 if b is None else float(b))
        if bool(valid_all.any()):
            sel = valid_all.to(all_target.device)
            log_z = log_z_all[valid_all].to(all_target.device)
            t, q = all_target[sel], all_proposal[sel]
            # on-policy at sampling time: π = q, so log t = log q - log p
            rewards = fdpg_pseudo_reward(q - (t - log_z), args.divergence, alpha=args.divergence_alpha)
            if self.fdpg_baseline is not None and mode == "train":
                self.fdpg_baseline.update(rewards)
            estimates = fdpg_divergence_estimates(t, q, log_z)
            all_base = self.accelerator.gather(base_lp)
            metrics["fdpg/pseudo_reward"].append(float(rewards.mean()))
            metrics["fdpg/z"].append(float(log_z.exp().mean()))
            for name in ("kl", "tv", "js"):
                metrics[f"fdpg/{name}_target_policy"].append(estimates[name])
            metrics["fdpg/kl_policy_base"].append(float((all_proposal - all_base).mean()))
        metrics["fdpg/alignment"].append(float(values.mean()))
        return output

    # -- the loss ------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
                                                        inputs["completion_ids"].size(1))[0]
        policy_lp = (logps * inputs["completion_mask"]).sum(-1)
        valid = inputs["fdpg_valid"].bool()
        mode = "train" if self.model.training else "eval"
        if not bool(valid.any()):
            return policy_lp.sum() * 0.0  # no prompt of this micro-batch has Z > 0 yet
        baseline = inputs["fdpg_baseline"][valid]
        loss = fdpg_loss(policy_lp[valid], inputs["fdpg_proposal_logps"][valid], inputs["fdpg_target_logps"][valid],
                         inputs["fdpg_log_z"][valid], divergence=self.args.divergence,
                         baseline=None if bool(torch.isnan(baseline).all()) else baseline,
                         alpha=self.args.divergence_alpha)
        if not torch.isfinite(loss):
            raise ValueError(f"the f-DPG loss ({self.args.divergence}) is not finite at step {self.state.global_step}")
        self._metrics[mode]["fdpg/loss"].append(self.accelerator.gather(loss.detach()).mean().item())
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        return loss / accumulation

    # -- checkpoints: the running Z, the baseline and λ travel with TRL's checkpoint ---------------

    STATE_FILE = "fdpg_state.json"

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            lam = self.fdpg_target.lam
            write_json({"z": self.fdpg_z.state_dict(),
                        "baseline": None if self.fdpg_baseline is None else self.fdpg_baseline.state_dict(),
                        "lambda": None if lam is None else lam.reshape(-1).tolist()},
                       os.path.join(folder, self.STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, self.STATE_FILE)
        if not os.path.exists(path):
            raise ValueError(f"checkpoint {checkpoint} has no {self.STATE_FILE} (the running Z and baseline of "
                             f"f-DPG); resume from a checkpoint that FDPGTrainer wrote")
        state = read_json(path, what="f-DPG state")
        self.fdpg_z.load_state_dict(state["z"])
        if self.fdpg_baseline is not None and state["baseline"] is not None:
            self.fdpg_baseline.load_state_dict(state["baseline"])
        if state["lambda"] is not None:
            self.fdpg_target.lam = torch.tensor(state["lambda"], dtype=torch.float64)
