"""f-DPO preference fine-tuning on (prompt, chosen, rejected) token triples, readable top to bottom.

One step of :class:`PreferenceTrainer`:

1. Take the step's ``batch_size`` pairs, deterministically in ``(seed, step)``: epoch ``e``
   visits the pairs in a permutation seeded by ``(seed, e)``, so every pair is seen once
   per epoch and a resumed run draws what the uninterrupted one would.
2. Build ``prompt + chosen`` and ``prompt + rejected`` sequences, right-padded with the
   tokenizer's pad id and an attention mask (Hugging Face causal LMs and TinyGPT alike).
   Sequence log-prob = sum over the *response* tokens of log pi(token | prefix), under the
   policy and under the frozen reference (a copy of the initial policy).
3. Loss = :func:`divergent.rl.fdpo_loss`: ``-log sigmoid(beta [psi(u_w) - psi(u_l)])`` with
   ``u = pi_theta / pi_ref`` and psi = f' of the chosen divergence (reverse_kl = standard
   DPO, forward_kl, js, alpha). Implicit reward of a response: ``beta * psi(u)``.
4. Stop with :class:`~divergent.train.run.NonFiniteLossError` (before any update) on a
   non-finite loss or gradient; clip; AdamW step.

:func:`divergent.train.run.drive` runs it (Ctrl-C between steps, checksummed checkpoints
with policy, reference, optimiser, RNG state and history; resume equals the uninterrupted
run)::

    trainer = PreferenceTrainer(policy, pairs, PreferenceConfig(steps=100), pad_id=tokenizer.pad_token_id)
    drive(trainer, checkpointer=Checkpointer("run/checkpoints"), checkpoint_every=50, resume=True)
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from divergent.rl import FDPO_DIVERGENCES, fdpo_loss, token_logprobs
from divergent.train.run import Checkpointer, check_finite, drive

__all__ = [
    "PreferenceConfig",
    "PreferenceTrainer",
    "encode_preference_pairs",
    "sequence_logprobs",
    "evaluate_preferences",
]

TokenPair = tuple[Sequence[int], Sequence[int], Sequence[int]]


@dataclass
class PreferenceConfig:
    """Settings of :class:`PreferenceTrainer`.

    steps: total optimizer steps.
    batch_size: preference pairs per step.
    lr: AdamW learning rate (constant).
    beta: f-DPO temperature beta (> 0); the implicit reward of a response is beta * psi(pi/pi_ref).
    divergence: "reverse_kl" (standard DPO), "forward_kl", "js" or "alpha".
    alpha: order of the alpha divergence, 0 < alpha < 1 (psi = (1 - u^-alpha) / alpha); TRL's
        ``f_alpha_divergence_coef`` c is 1 - alpha.
    grad_clip: max global gradient norm (0 = none; the norm is checked for NaN/inf either way).
    seed: seeds the order of the pairs.
    """

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    beta: float = 0.1
    divergence: str = "reverse_kl"
    alpha: float = 0.5
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PreferenceConfig.{name} must be an int >= 1, got {value!r}")
        if self.divergence not in FDPO_DIVERGENCES:
            from divergent.config import suggest

            raise ValueError(f"PreferenceConfig.divergence must be one of {', '.join(FDPO_DIVERGENCES)}, got "
                             f"{self.divergence!r}{suggest(str(self.divergence), FDPO_DIVERGENCES)}")
        for name in ("beta", "lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"PreferenceConfig.{name} must be a number > 0, got {value!r}")
        if self.divergence == "alpha" and not 0 < self.alpha < 1:
            raise ValueError(f"PreferenceConfig.alpha must be in (0, 1), got {self.alpha}")
        if not self.grad_clip >= 0:
            raise ValueError(f"PreferenceConfig.grad_clip must be >= 0, got {self.grad_clip}")


def encode_preference_pairs(
    triples: Sequence[tuple[str, str, str]],
    encode_prompt: Callable[[str], Sequence[int]],
    encode_response: Callable[[str], Sequence[int]],
) -> list[TokenPair]:
    """Turn ``(prompt, chosen, rejected)`` strings into token-id triples with the given encoders."""
    return [(list(encode_prompt(p)), list(encode_response(c)), list(encode_response(r))) for p, c, r in triples]


def _batch_tensors(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int):
    """Right-padded ``prompt + response`` ids, their attention mask, and a mask over the response targets.

    The target mask is over the shifted positions: target ``t`` is token ``t + 1``.
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    target_mask = torch.zeros((len(prompts), width - 1), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        if len(prompt) == 0 or len(response) == 0:
            raise ValueError(f"pair {row}: prompt and response must be non-empty token lists")
        ids[row, : lengths[row]] = torch.tensor(list(prompt) + list(response))
        attention[row, : lengths[row]] = 1
        # Response tokens sit at positions len(prompt) .. end-1, i.e. targets len(prompt)-1 .. end-2.
        target_mask[row, len(prompt) - 1 : lengths[row] - 1] = True
    return ids, attention, target_mask


def _logits(model: nn.Module, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=ids, attention_mask=attention)
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if logits is None:
        raise TypeError(f"model output must be a logits tensor or have .logits, got {type(output).__name__}")
    return logits


def sequence_logprobs(model: nn.Module, prompts, responses, pad_id: int, device=None) -> torch.Tensor:
    """``[B]`` sum over response tokens of log pi(token | prefix) (right padding, with an attention mask)."""
    ids, attention, target_mask = _batch_tensors(prompts, responses, pad_id)
    if device is not None:
        ids, attention, target_mask = ids.to(device), attention.to(device), target_mask.to(device)
    logp = token_logprobs(_logits(model, ids, attention)[:, :-1], ids[:, 1:])
    return torch.where(target_mask, logp, torch.zeros_like(logp)).sum(dim=1)


def _pair_logprobs(policy: nn.Module, reference: nn.Module, batch: Sequence[TokenPair], pad_id: int, device):
    """Summed response log-probs ``(policy chosen, policy rejected, ref chosen, ref rejected)``, each ``[B]``."""
    prompts = [p for p, _, _ in batch]
    # One forward for chosen and rejected together: [chosen; rejected].
    responses = [c for _, c, _ in batch] + [r for _, _, r in batch]
    policy_logps = sequence_logprobs(policy, prompts + prompts, responses, pad_id, device)
    with torch.no_grad():
        ref_logps = sequence_logprobs(reference, prompts + prompts, responses, pad_id, device)
    n = len(batch)
    return policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:]


def _stats_record(loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> dict[str, float]:
    chosen, rejected = stats["chosen_rewards"].double(), stats["rejected_rewards"].double()
    return {"loss": float(loss.detach()), "accuracy": float(stats["accuracy"]),
            "chosen_reward": float(chosen.mean()), "rejected_reward": float(rejected.mean()),
            "margin": float((chosen - rejected).mean())}


@torch.no_grad()
def evaluate_preferences(policy: nn.Module, reference: nn.Module, pairs: Sequence[TokenPair], *, pad_id: int,
                         divergence: str = "reverse_kl", beta: float = 0.1, alpha: float = 0.5, batch_size: int = 16,
                         device=None) -> dict[str, float]:
    """f-DPO loss and implicit-reward statistics over all ``pairs`` (means over pairs).

    accuracy: share of pairs whose chosen implicit reward ``beta * psi(pi/pi_ref)`` is above the
    rejected one's (a tie counts as wrong); margin: mean chosen - rejected reward.
    """
    if len(pairs) == 0:
        raise ValueError("pairs is empty: need at least one (prompt, chosen, rejected) triple to evaluate")
    was_training = policy.training
    policy.eval()
    losses, chosen, rejected = [], [], []
    try:
        for start in range(0, len(pairs), batch_size):
            logps = _pair_logprobs(policy, reference, pairs[start : start + batch_size], pad_id, device)
            loss, stats = fdpo_loss(*logps, divergence=divergence, beta=beta, alpha=alpha, reduction="none")
            losses.append(loss.double().cpu())
            chosen.append(stats["chosen_rewards"].double().cpu())
            rejected.append(stats["rejected_rewards"].double().cpu())
    finally:
        policy.train(was_training)
    loss, chosen_t, rejected_t = torch.cat(losses), torch.cat(chosen), torch.cat(rejected)
    return {"loss": float(loss.mean()), "accuracy": float((chosen_t > rejected_t).double().mean()),
            "chosen_reward": float(chosen_t.mean()), "rejected_reward": float(rejected_t.mean()),
            "margin": float((chosen_t - rejected_t).mean()), "pairs": len(pairs)}


class PreferenceTrainer:
    """f-DPO on token-id preference triples, one :meth:`step` at a time (run it with :func:`drive`).

    Args:
        policy: causal LM (Hugging Face or TinyGPT) trained in place.
        pairs: ``(prompt_ids, chosen_ids, rejected_ids)`` triples.
        config: :class:`PreferenceConfig`.
        pad_id: id used to right-pad sequences (the tokenizer's pad token; masked by the attention mask).
        reference: frozen reference; default a copy of the policy at construction.
        device: where the models run (default: the policy's device).
    """

    def __init__(self, policy: nn.Module, pairs: Sequence[TokenPair], config: PreferenceConfig, *, pad_id: int,
                 reference: nn.Module | None = None, device: str | torch.device | None = None):
        if len(pairs) == 0:
            raise ValueError("pairs is empty: need at least one (prompt, chosen, rejected) triple")
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
            raise ValueError(f"pad_id must be a token id (int >= 0), got {pad_id!r}")
        self.config, self.pad_id = config, pad_id
        self.pairs = [(list(p), list(c), list(r)) for p, c, r in pairs]
        self.device = torch.device(device) if device is not None else next(policy.parameters()).device
        self.policy = policy.to(self.device).train()
        reference = copy.deepcopy(policy) if reference is None else reference
        self.reference = reference.to(self.device).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=config.lr, weight_decay=0.0)
        self.step_index = 0
        self.total_steps = config.steps
        self.history: list[dict[str, Any]] = []
        self._orders: dict[int, list[int]] = {}

    def _batch(self, step: int) -> list[TokenPair]:
        n, size = min(self.config.batch_size, len(self.pairs)), len(self.pairs)
        picks = []
        for position in range(step * n, step * n + n):
            epoch = position // size
            if epoch not in self._orders:
                order = list(range(size))
                random.Random(self.config.seed * 1_000_003 + epoch).shuffle(order)
                self._orders = {epoch: order}  # epochs are visited in order: keep the current one
            picks.append(self.pairs[self._orders[epoch][position % size]])
        return picks

    def step(self) -> dict[str, Any]:
        config = self.config
        step = self.step_index
        self.policy.train()
        logps = _pair_logprobs(self.policy, self.reference, self._batch(step), self.pad_id, self.device)
        loss, stats = fdpo_loss(*logps, divergence=config.divergence, beta=config.beta, alpha=config.alpha)
        context = f"f-DPO divergence {config.divergence!r} (forward_kl and alpha grow like exp(-log u): " \
                  f"try a smaller lr or beta)"
        check_finite(loss, "f-DPO loss", step=step + 1, context=context)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
        check_finite(grad_norm, "gradient norm", step=step + 1, context=context)
        self.optimizer.step()
        self.step_index = step + 1
        record = {"step": self.step_index, **_stats_record(loss, stats), "grad_norm": float(grad_norm)}
        self.history.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()},
            "reference": {k: v.detach().cpu().clone() for k, v in self.reference.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_index,
            "history": [dict(h) for h in self.history],
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("config", {})
        for key in ("divergence", "beta", "alpha", "steps", "batch_size", "seed"):
            if key in saved and saved[key] != getattr(self.config, key):
                raise ValueError(f"the checkpoint was written with {key}={saved[key]!r}, this run has {key}="
                                 f"{getattr(self.config, key)!r}; resume with the run's own settings")
        self.policy.load_state_dict(state["model"])
        self.reference.load_state_dict(state["reference"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_index = int(state["step"])
        self.history = [dict(h) for h in state["history"]]
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def evaluate(self, pairs: Sequence[TokenPair], batch_size: int = 16) -> dict[str, float]:
        """:func:`evaluate_preferences` of the current policy against the reference on ``pairs``."""
        config = self.config
        return evaluate_preferences(self.policy, self.reference, pairs, pad_id=self.pad_id,
                                    divergence=config.divergence, beta=config.beta, alpha=config.alpha,
                                    batch_size=batch_size, device=self.device)

    def train(self, *, checkpointer: Checkpointer | None = None, checkpoint_every: int = 0, resume: bool = False,
              on_step: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Run to ``config.steps`` with :func:`drive`; returns the whole history."""
        drive(self, checkpointer=checkpointer, checkpoint_every=checkpoint_every, resume=resume, on_step=on_step)
        return self.history
