"""f-DPG: train a causal LM towards a target p(x) ∝ P(x) with an f-divergence, one step at a time.

The math (pseudo-reward, loss, running Z, baseline, importance-sampled metrics, moment matching)
is :mod:`divergent.rl.fdpg`; this is the loop, readable top to bottom, on the shared run layer
(:func:`divergent.train.run.drive`: interrupts, checkpoints, non-finite losses, resume).

One step (disco's ``Tuner._step``):

1. pick ``prompts_per_step`` prompts and draw ``samples_per_prompt`` responses each from the
   proposal q (the policy itself, or a frozen copy when ``offline``);
2. score them: log a(x) under the initial model, the target factor (constraint b, features φ,
   reward r), log P = log a + log-factor;
3. update the running Z of every prompt with P/q — *before* the gradient;
4. the f-DPG loss on the samples whose prompt has Z > 0, with the baseline's value from
   before this batch, then add the batch's pseudo-rewards to the baseline;
5. offline: every ``proposal_update_every`` steps replace q by π when the windowed estimate
   of KL(p‖π) is below that of KL(p‖q) (DPG).

Targets (:class:`FDPGTarget`): a pointwise constraint P = a·max(b, ε) with b ∈ {0, 1}; a
distributional one P = a·exp(λ·φ) with λ fitted so that E_p[φ] = μ*; a reward P = a·exp(r/β).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from divergent.metrics.diversity import distinct_n, self_bleu
from divergent.rl.fdpg import (
    PseudoRewardBaseline,
    RunningZ,
    fdpg_divergence_estimates,
    fdpg_loss,
    fdpg_pseudo_reward,
    fit_moment_lambda,
)
from divergent.rl.generators import check_f_divergence
from divergent.train.rl import (
    REWARD_COUNTS,
    _decode_all,
    encode_prompts,
    response_logprobs,
    response_mask,
    sample_responses,
)
from divergent.train.run import Checkpointer, check_finite, drive

__all__ = ["FDPGConfig", "FDPGTarget", "FDPGTrainer", "TARGET_KINDS", "sequence_logprobs"]

TARGET_KINDS = ("constraint", "feature", "reward")


@dataclass
class FDPGConfig:
    """Settings of one f-DPG run (every field is a ``--set`` key of ``divergent fdpg``)."""

    divergence: str = "js"  # an f-divergence of divergent.rl.generators (forward_kl, reverse_kl, js, tvd, ...)
    alpha: float = 0.2  # order of the alpha divergence
    steps: int = 80
    prompts_per_step: int = 4
    samples_per_prompt: int = 16
    lr: float = 1e-4
    grad_clip: float = 1.0  # 0 = off
    max_new_tokens: int = 6
    temperature: float = 1.0
    baseline: bool = True  # subtract the windowed mean of pseudo-rewards (disco's default)
    baseline_window: int = 1024
    offline: bool = False  # sample from a frozen proposal q, replaced by π when KL(p‖π) < KL(p‖q)
    proposal_update_every: int = 16
    estimate_window: int = 256  # samples in the windowed KL estimates that decide a proposal update
    max_zero_samples: int = 1024  # Z still 0 after this many samples: stop with an error
    moment_samples: int = 512  # samples of a(x) that λ is fitted on (feature targets)
    eval_every: int = 10  # evaluate (fresh samples of π on the evaluation prompts) every this many steps
    eval_samples: int = 16  # samples per evaluation prompt
    bleu_tokenize: str = "13a"  # sacrebleu tokenizer of self-BLEU ("char" for short unspaced text)
    seed: int = 0

    def __post_init__(self) -> None:
        check_f_divergence(self.divergence, alpha=self.alpha)
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "baseline_window",
                     "proposal_update_every", "estimate_window", "max_zero_samples", "moment_samples",
                     "eval_every", "eval_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not isinstance(self.grad_clip, (int, float)) or self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip!r}")


@dataclass
class FDPGTarget:
    """The unnormalised target P(x) = a(x) · factor(x) over responses, a = the initial model.

    Args:
        kind: ``constraint`` (factor max(b, epsilon), b ∈ {0, 1}), ``feature`` (exp(λ·φ)) or
            ``reward`` (exp(r / beta)).
        name: how messages name it (``--constraint regex:7$``).
        score: ``score(problems, texts) -> (values [n], counts)`` — b, φ or r per response and
            the counts of :data:`divergent.train.rl.REWARD_COUNTS` (a failed call scores 0).
        epsilon: constraint only: P = a·max(b, epsilon); 0 = the exact constraint.
        beta: reward only, > 0.
        moments: feature only: μ*, the target mean of φ.
    """

    kind: str
    name: str
    score: Callable[[Sequence[Any], Sequence[str]], tuple[torch.Tensor, dict[str, int]]]
    epsilon: float = 0.0
    beta: float = 0.1
    moments: list[float] = field(default_factory=list)
    lam: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            from divergent.config import suggest

            raise ValueError(f"target kind must be one of {', '.join(TARGET_KINDS)}, got {self.kind!r}"
                             f"{suggest(self.kind, TARGET_KINDS)}")
        if self.kind == "reward" and not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ValueError(f"--beta must be > 0 for a reward target (P = a·exp(r/β)), got {self.beta!r}")
        if self.kind == "constraint" and not (isinstance(self.epsilon, (int, float)) and 0 <= self.epsilon < 1):
            raise ValueError(f"epsilon must be in [0, 1) for a pointwise constraint, got {self.epsilon!r}")
        if self.kind == "feature" and len(self.moments) != 1:
            raise ValueError(f"a feature target needs one --moment (the target mean of the feature), got {self.moments!r}")

    def log_factor(self, values: torch.Tensor) -> torch.Tensor:
        """log P − log a per response, float64; a non-binary constraint value raises naming the target."""
        values = values.detach().double()
        if self.kind == "constraint":
            bad = ~((values == 0) | (values == 1))
            if bad.any():
                raise ValueError(f"{self.name} returned {float(values[bad][0])!r} for a sample; a pointwise "
                                 f"constraint must return 0 or 1 (False/True) — use --feature for graded scores")
            return torch.log(values.clamp(min=self.epsilon)) if self.epsilon > 0 else torch.log(values)
        if self.kind == "reward":
            return values / self.beta
        if self.lam is None:
            raise RuntimeError("the feature target's λ is not fitted yet")
        return values * float(self.lam.reshape(-1)[0])


def sequence_logprobs(model: nn.Module, prompt_ids: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor,
                      prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Summed log-probs ``[N]`` of the response tokens under ``mask`` (up to and with the first EOS)."""
    logps, _ = response_logprobs(model, prompt_ids, responses, prompt_mask)
    return (logps.float() * mask).sum(-1)


class FDPGTrainer:
    """f-DPG on a task's prompts (run it with :func:`drive`, or :meth:`train`).

    Args:
        policy: causal LM (Hugging Face or TinyGPT), trained in place; its initial copy is a(x).
        task: encodes prompts and decodes responses (``encode_prompts``, ``decode``, ``eos_id``, ``pad_id``).
        prompts: the problems of ``task`` to condition on (one entry = unconditional).
        target: :class:`FDPGTarget`.
        config: :class:`FDPGConfig`.
        eval_prompts: prompts of :meth:`evaluate` (default ``prompts``).
    """

    def __init__(self, policy: nn.Module, task: Any, prompts: Sequence[Any], target: FDPGTarget, config: FDPGConfig,
                 *, eval_prompts: Sequence[Any] | None = None) -> None:
        if len(prompts) == 0:
            raise ValueError("prompts is empty: give at least one prompt (one fixed prompt = unconditional)")
        self.task, self.prompts, self.target, self.config = task, list(prompts), target, config
        self.eval_prompts = list(eval_prompts) if eval_prompts is not None else self.prompts
        self.device = next(policy.parameters()).device
        self.policy = policy.train()
        self.base = copy.deepcopy(policy).eval().requires_grad_(False)
        self.proposal = copy.deepcopy(policy).eval().requires_grad_(False) if config.offline else None
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=config.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.z = RunningZ(target.name)
        self.baseline = PseudoRewardBaseline(config.baseline_window) if config.baseline else None
        self.kl_policy = PseudoRewardBaseline(config.estimate_window)  # windowed means of KL(p‖π) estimates
        self.kl_proposal = PseudoRewardBaseline(config.estimate_window)  # and of KL(p‖q)
        self.counts = {key: 0 for key in REWARD_COUNTS}
        self.step_index = 0
        self.total_steps = config.steps
        self.history: list[dict[str, Any]] = []
        self.samples_seen = 0
        self.proposal_updates = 0
        self.evaluations: list[dict[str, Any]] = []
        if target.kind == "feature" and target.lam is None:
            self._fit_lambda()

    # ------------------------------------------------------------------ sampling and scoring

    def _batch_prompts(self, step: int) -> list[int]:
        """Indices into ``prompts`` for ``step``: a seeded permutation, walked through in order."""
        n = len(self.prompts)
        picks = []
        for position in range(step * self.config.prompts_per_step, (step + 1) * self.config.prompts_per_step):
            epoch, offset = divmod(position, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch))
            picks.append(int(order[offset]))
        return picks

    def _sample(self, model: nn.Module, indices: Sequence[int], per_prompt: int, generator: torch.Generator):
        problems = [self.prompts[i] for i in indices for _ in range(per_prompt)] if indices is not None else []
        ids, prompt_mask = encode_prompts(self.task, problems)
        ids = ids.to(self.device)
        prompt_mask = prompt_mask.to(self.device) if prompt_mask is not None else None
        responses = sample_responses(model, ids, max_new_tokens=self.config.max_new_tokens, eos_id=self.task.eos_id,
                                     pad_id=self.task.pad_id, temperature=self.config.temperature,
                                     generator=generator, attention_mask=prompt_mask)
        mask = response_mask(responses, self.task.eos_id)
        texts, _ = _decode_all(self.task, responses)
        return problems, ids, prompt_mask, responses, mask, texts

    def _score(self, problems, texts) -> torch.Tensor:
        values, counts = self.target.score(problems, texts)
        for key in REWARD_COUNTS:
            self.counts[key] += int(counts.get(key, 0))
        return values.to(torch.float64).reshape(-1)

    def _fit_lambda(self) -> None:
        """GDC: λ from ``moment_samples`` draws of a(x) (importance weights 1), before training."""
        generator = torch.Generator().manual_seed(self.config.seed + 7919)
        per_prompt = max(1, math.ceil(self.config.moment_samples / len(self.prompts)))
        features = []
        for start in range(0, len(self.prompts), max(1, 256 // per_prompt)):
            indices = list(range(start, min(len(self.prompts), start + max(1, 256 // per_prompt))))
            problems, _, _, _, _, texts = self._sample(self.base, indices, per_prompt, generator)
            features.append(self._score(problems, texts))
        phi = torch.cat(features)
        try:
            self.target.lam = fit_moment_lambda(phi, self.target.moments)
        except ValueError as exc:
            raise ValueError(f"{self.target.name}: {exc}") from None

    # ------------------------------------------------------------------ one step

    def _evaluate_now(self) -> None:
        config = self.config
        result = self.evaluate(samples_per_prompt=config.eval_samples, seed=config.seed + 10_000,
                               bleu_tokenize=config.bleu_tokenize)
        self.evaluations.append({"step": self.step_index, **result})

    def step(self) -> dict[str, Any]:
        config, step = self.config, self.step_index
        if not self.evaluations and step == 0:
            self._evaluate_now()  # the initial policy a (its Z-based metrics need Z: left out here)
        indices = self._batch_prompts(step)
        proposal = self.proposal if self.proposal is not None else self.policy
        problems, ids, prompt_mask, responses, mask, texts = self._sample(proposal, indices, config.samples_per_prompt,
                                                                           self.generator)
        keys = [i for i in indices for _ in range(config.samples_per_prompt)]
        with torch.no_grad():
            base_lp = sequence_logprobs(self.base, ids, responses, mask, prompt_mask).double()
            proposal_lp = None if self.proposal is None else \
                sequence_logprobs(self.proposal, ids, responses, mask, prompt_mask).double()
        values = self._score(problems, texts)
        target_log = base_lp + self.target.log_factor(values)
        self.policy.train()
        policy_lp = sequence_logprobs(self.policy, ids, responses, mask, prompt_mask)
        if proposal_lp is None:
            proposal_lp = policy_lp.detach().double()
        # 3. Z before the gradient (disco: _update_moving_z, then the loss)
        self.z.update(keys, target_log, proposal_lp)
        self.samples_seen += len(keys)
        valid = torch.tensor([self.z.z(k) > 0 for k in keys])
        record: dict[str, Any] = {"step": step + 1, "samples": self.samples_seen}
        if not bool(valid.any()):
            seen = sum(self.z.weight.values())
            if seen >= config.max_zero_samples and not any(v > 0 for v in self.z.value.values()):
                failed = self.counts["reward_errors"] + self.counts["reward_timeouts"]
                why = f" ({failed} target calls failed and scored 0)" if failed else ""
                raise ValueError(
                    f"Z = 0 after {seen} samples over {len(self.z.value)} prompts: none satisfies {self.target.name}"
                    f"{why}; draw more samples (--set max_zero_samples=N, more prompts_per_step or "
                    f"samples_per_prompt) or loosen the constraint")
            record.update({"loss": math.nan, "skipped": len(keys)})
        else:
            kept = [k for k, v in zip(keys, valid.tolist()) if v]
            log_z = self.z.log_z(kept)
            b = self.baseline.value if self.baseline is not None else None
            loss = fdpg_loss(policy_lp[valid], proposal_lp[valid], target_log[valid], log_z,
                             divergence=config.divergence, baseline=b, alpha=config.alpha)
            context = f"f-DPG divergence {config.divergence!r}"
            check_finite(loss, "f-DPG loss", step=step + 1, context=context)
            rewards = fdpg_pseudo_reward(policy_lp.detach()[valid].double() - (target_log[valid] - log_z),
                                         config.divergence, alpha=config.alpha)
            if self.baseline is not None:
                self.baseline.update(rewards)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
            grad_norm = nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
            check_finite(grad_norm, "gradient norm", step=step + 1, context=context)
            self.optimizer.step()
            estimates = fdpg_divergence_estimates(target_log[valid], policy_lp.detach()[valid], log_z,
                                                  proposal_lp[valid])
            weights = torch.exp(policy_lp.detach().double() - proposal_lp)
            record.update({
                "loss": float(loss.detach()), "grad_norm": float(grad_norm), "pseudo_reward": float(rewards.mean()),
                "baseline": b if b is not None else 0.0, "skipped": int((~valid).sum()),
                "z": float(log_z.exp().mean()), "alignment": float((weights * values).mean()),
                "kl_target_policy": estimates["kl"], "tv_target_policy": estimates["tv"],
                "js_target_policy": estimates["js"],
                "kl_policy_base": float((weights * (policy_lp.detach().double() - base_lp)).mean()),
            })
            if self.proposal is not None:
                self._maybe_update_proposal(target_log[valid], policy_lp.detach()[valid], proposal_lp[valid], log_z, step)
                record["proposal_updates"] = self.proposal_updates
        self.step_index = step + 1
        self.history.append(record)
        if self.step_index % config.eval_every == 0 or self.step_index == self.total_steps:
            self._evaluate_now()
        return record

    def _maybe_update_proposal(self, target_log, policy_lp, proposal_lp, log_z, step) -> None:
        """DPG: replace q by π when the windowed IS estimate of KL(p‖π) is below that of KL(p‖q)."""
        self.kl_policy.update([fdpg_divergence_estimates(target_log, policy_lp, log_z, proposal_lp)["kl"]])
        self.kl_proposal.update([fdpg_divergence_estimates(target_log, proposal_lp, log_z, proposal_lp)["kl"]])
        if (step + 1) % self.config.proposal_update_every == 0 and self.kl_policy.value < self.kl_proposal.value:
            self.proposal.load_state_dict(self.policy.state_dict())
            self.proposal_updates += 1
            self.kl_policy = PseudoRewardBaseline(self.config.estimate_window)
            self.kl_proposal = PseudoRewardBaseline(self.config.estimate_window)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, *, samples_per_prompt: int = 8, seed: int = 12345, bleu_tokenize: str = "13a") -> dict[str, float]:
        """Fresh samples of π on ``eval_prompts``: alignment E_π[b] (or E_π[φ], E_π[r]), KL(p‖π),
        TV, JS with the current Z (prompts without Z > 0 left out), KL(π‖a), and distinct-1/2/3 and
        self-BLEU among the samples of each prompt, averaged over prompts."""
        generator = torch.Generator().manual_seed(seed)
        indices = list(range(len(self.eval_prompts)))
        saved, self.prompts = self.prompts, self.eval_prompts
        try:
            problems, ids, prompt_mask, responses, mask, texts = self._sample(self.policy, indices, samples_per_prompt,
                                                                               generator)
        finally:
            self.prompts = saved
        keys = [self.prompts.index(p) if p in self.prompts else None for p in problems]
        policy_lp = sequence_logprobs(self.policy, ids, responses, mask, prompt_mask).double()
        base_lp = sequence_logprobs(self.base, ids, responses, mask, prompt_mask).double()
        counts_before = dict(self.counts)
        values = self._score(problems, texts)
        self.counts = counts_before  # evaluation failures are reported by the caller, not counted as training's
        target_log = base_lp + self.target.log_factor(values)
        out = {"alignment": float(values.mean()), "kl_policy_base": float((policy_lp - base_lp).mean())}
        known = [i for i, k in enumerate(keys) if k is not None and self.z.z(k) > 0]
        if known:
            log_z = self.z.log_z([keys[i] for i in known])
            sel = torch.tensor(known)
            out.update({f"{name}_target_policy": value for name, value in
                        fdpg_divergence_estimates(target_log[sel], policy_lp[sel], log_z).items()})
        # diversity among the samples of one prompt (as CDPG reports it), averaged over prompts
        tokens = [row[: int(m.sum())] for row, m in zip(responses.tolist(), mask)]
        groups = [range(i * samples_per_prompt, (i + 1) * samples_per_prompt) for i in indices]
        for n in (1, 2, 3):
            out[f"distinct_{n}"] = sum(distinct_n([tokens[j] for j in g], n) for g in groups) / len(groups)
        out["self_bleu"] = (sum(self_bleu([texts[j] for j in g], tokenize=bleu_tokenize) for g in groups) / len(groups)
                            if samples_per_prompt >= 2 else math.nan)
        return out

    # ------------------------------------------------------------------ run layer

    def state_dict(self) -> dict[str, Any]:
        def weights(model):
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

        return {
            "model": weights(self.policy),
            "base": weights(self.base),
            "proposal": weights(self.proposal) if self.proposal is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_index,
            "history": [dict(h) for h in self.history],
            "generator": self.generator.get_state(),
            "rng": torch.get_rng_state(),
            "z": self.z.state_dict(),
            "baseline": self.baseline.state_dict() if self.baseline is not None else None,
            "kl_policy": self.kl_policy.state_dict(),
            "kl_proposal": self.kl_proposal.state_dict(),
            "counts": dict(self.counts),
            "samples_seen": self.samples_seen,
            "proposal_updates": self.proposal_updates,
            "evaluations": [dict(e) for e in self.evaluations],
            "lam": self.target.lam,
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("config", {})
        for key in ("divergence", "steps", "prompts_per_step", "samples_per_prompt", "seed", "offline", "baseline"):
            if key in saved and saved[key] != getattr(self.config, key):
                raise ValueError(f"the checkpoint was written with {key}={saved[key]!r}, this run has {key}="
                                 f"{getattr(self.config, key)!r}; resume with the run's own settings")
        self.policy.load_state_dict(state["model"])
        self.base.load_state_dict(state["base"])
        if self.proposal is not None and state["proposal"] is not None:
            self.proposal.load_state_dict(state["proposal"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_index = int(state["step"])
        self.history = [dict(h) for h in state["history"]]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        self.z.load_state_dict(state["z"])
        if self.baseline is not None and state["baseline"] is not None:
            self.baseline.load_state_dict(state["baseline"])
        self.kl_policy.load_state_dict(state["kl_policy"])
        self.kl_proposal.load_state_dict(state["kl_proposal"])
        self.counts = dict(state["counts"])
        self.samples_seen = int(state["samples_seen"])
        self.proposal_updates = int(state["proposal_updates"])
        self.evaluations = [dict(e) for e in state["evaluations"]]
        if state.get("lam") is not None:
            self.target.lam = state["lam"]

    def train(self, *, checkpointer: Checkpointer | None = None, checkpoint_every: int = 0, resume: bool = False,
              on_step: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Run to ``config.steps`` with :func:`drive`; returns the whole history."""
        drive(self, checkpointer=checkpointer, checkpoint_every=checkpoint_every, resume=resume, on_step=on_step)
        return self.history
