"""f-DPO preference fine-tuning on (prompt, chosen, rejected) data.

One step, top to bottom (:meth:`PreferenceTrainer.step`):

1. Draw ``batch_size`` pairs; build ``prompt + chosen`` and ``prompt + rejected``
   sequences, right-padded (a causal model never looks at later padding).
2. Sequence log-probs = sum of the response tokens' log-probs under the policy
   and under the frozen reference (a copy of the initial policy).
3. Loss = ``divergent.rl.fdpo_loss``: ``-log sigmoid(beta [psi(u_w) - psi(u_l)])``
   with ``u = pi_theta / pi_ref`` and psi from the chosen divergence
   (reverse_kl = standard DPO, forward_kl, js, alpha).
4. Gradient clip and AdamW step; a non-finite loss raises
   :class:`~divergent.train.rl.NonFiniteLossError` before the update.

Checkpoints (model, reference, optimizer, random state, history) are atomic;
``train(resume=True)`` continues from the latest one.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from divergent.rl import FDPO_DIVERGENCES, fdpo_loss, token_logprobs
from divergent.train.checkpoint import latest_checkpoint, load_checkpoint
from divergent.train.rl import NonFiniteLossError, model_logits, run_resumable, save_rotating_checkpoint

__all__ = ["PreferenceConfig", "PreferenceTrainer", "encode_preference_pairs", "sequence_logprobs"]

TokenPair = tuple[Sequence[int], Sequence[int], Sequence[int]]


@dataclass
class PreferenceConfig:
    """Settings of :class:`PreferenceTrainer`.

    steps: total optimizer steps.
    batch_size: preference pairs per step.
    lr: AdamW learning rate (constant).
    beta: f-DPO temperature beta (> 0).
    divergence: "reverse_kl" (standard DPO), "forward_kl", "js" or "alpha".
    alpha: order of the alpha divergence, 0 < alpha < 1 (psi = (1 - u^-alpha) / alpha).
    grad_clip: max global gradient norm (0 = none).
    checkpoint_every: steps between checkpoints (0 = only at the end and on Ctrl-C).
    keep_checkpoints: how many recent checkpoints to keep.
    seed: seeds the order of the pairs.
    """

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    beta: float = 0.1
    divergence: str = "reverse_kl"
    alpha: float = 0.5
    grad_clip: float = 1.0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PreferenceConfig.{name} must be an int >= 1, got {value!r}")
        if self.divergence not in FDPO_DIVERGENCES:
            raise ValueError(f"PreferenceConfig.divergence must be one of {FDPO_DIVERGENCES}, got {self.divergence!r}")
        if self.beta <= 0 or self.lr <= 0:
            raise ValueError(f"PreferenceConfig.beta and lr must be > 0, got beta={self.beta}, lr={self.lr}")
        if self.divergence == "alpha" and not 0 < self.alpha < 1:
            raise ValueError(f"PreferenceConfig.alpha must be in (0, 1), got {self.alpha}")
        if self.grad_clip < 0 or self.checkpoint_every < 0:
            raise ValueError("PreferenceConfig.grad_clip and checkpoint_every must be >= 0")


def encode_preference_pairs(
    triples: Sequence[tuple[str, str, str]],
    encode_prompt: Callable[[str], Sequence[int]],
    encode_response: Callable[[str], Sequence[int]],
) -> list[TokenPair]:
    """Turn ``(prompt, chosen, rejected)`` strings into token-id triples with the given encoders."""
    return [(list(encode_prompt(p)), list(encode_response(c)), list(encode_response(r))) for p, c, r in triples]


def _batch_tensors(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int):
    """Right-padded ``prompt + response`` ids and a mask over the response targets (shifted by one)."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    target_mask = torch.zeros((len(prompts), width - 1), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        if len(prompt) == 0 or len(response) == 0:
            raise ValueError(f"pair {row}: prompt and response must be non-empty token lists")
        ids[row, : lengths[row]] = torch.tensor(list(prompt) + list(response))
        # Target position t predicts token t + 1: response tokens are targets len(prompt)-1 .. end-1.
        target_mask[row, len(prompt) - 1 : lengths[row] - 1] = True
    return ids, target_mask


def sequence_logprobs(model: nn.Module, prompts, responses, pad_id: int, device=None) -> torch.Tensor:
    """``[B]`` sum over response tokens of log pi(token | prefix)."""
    ids, target_mask = _batch_tensors(prompts, responses, pad_id)
    if device is not None:
        ids, target_mask = ids.to(device), target_mask.to(device)
    logp = token_logprobs(model_logits(model, ids[:, :-1]), ids[:, 1:])
    return torch.where(target_mask, logp, torch.zeros_like(logp)).sum(dim=1)


class PreferenceTrainer:
    """f-DPO on token-id preference triples.

    Args:
        policy: causal LM trained in place.
        pairs: ``(prompt_ids, chosen_ids, rejected_ids)`` triples.
        config: :class:`PreferenceConfig`.
        pad_id: id used to right-pad sequences.
        reference: frozen reference; default a copy of the policy at construction.
        run_dir: folder for ``checkpoints/step_N.pt``; None = no checkpoints.
    """

    def __init__(self, policy: nn.Module, pairs: Sequence[TokenPair], config: PreferenceConfig, *, pad_id: int,
                 reference: nn.Module | None = None, run_dir: str | Path | None = None):
        if len(pairs) == 0:
            raise ValueError("pairs is empty: need at least one (prompt, chosen, rejected) triple")
        self.policy, self.pairs, self.config, self.pad_id = policy, list(pairs), config, pad_id
        self.reference = (reference if reference is not None else copy.deepcopy(policy)).eval().requires_grad_(False)
        self.device = next(policy.parameters()).device
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
        self.rng = random.Random(config.seed)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.step_index = 0
        self.history: list[dict[str, Any]] = []

    def step(self) -> dict[str, Any]:
        config = self.config
        batch = self.rng.sample(self.pairs, min(config.batch_size, len(self.pairs)))
        prompts = [p for p, _, _ in batch]
        # One forward for chosen and rejected together: [chosen; rejected].
        responses = [c for _, c, _ in batch] + [r for _, _, r in batch]
        self.policy.train()
        policy_logps = sequence_logprobs(self.policy, prompts + prompts, responses, self.pad_id, self.device)
        with torch.no_grad():
            ref_logps = sequence_logprobs(self.reference, prompts + prompts, responses, self.pad_id, self.device)
        n = len(batch)
        loss, stats = fdpo_loss(policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:],
                                divergence=config.divergence, beta=config.beta, alpha=config.alpha)
        if not torch.isfinite(loss):
            last = latest_checkpoint(self.run_dir / "checkpoints") if self.run_dir is not None else None
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"non-finite f-DPO loss ({float(loss.detach())}) at step {self.step_index + 1} with divergence "
                f"{config.divergence!r}; stopping without updating the model — {where}. "
                "forward_kl and alpha grow like exp(-log u): try a smaller lr or beta."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), config.grad_clip)
        self.optimizer.step()
        self.step_index += 1
        record = {
            "step": self.step_index,
            "loss": float(loss.detach()),
            "accuracy": float(stats["accuracy"]),
            "chosen_reward": float(stats["chosen_rewards"].mean()),
            "rejected_reward": float(stats["rejected_rewards"].mean()),
            "margin": float((stats["chosen_rewards"] - stats["rejected_rewards"]).mean()),
        }
        self.history.append(record)
        return record

    def save(self) -> Path | None:
        if self.run_dir is None:
            return None
        state = {"step": self.step_index, "model": self.policy.state_dict(), "reference": self.reference.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "rng": self.rng.getstate(), "history": self.history,
                 "config": asdict(self.config)}
        return save_rotating_checkpoint(self.run_dir, self.step_index, state, self.config.keep_checkpoints)

    def load(self, path: str | Path) -> None:
        state = load_checkpoint(path, map_location="cpu")
        self.policy.load_state_dict(state["model"])
        self.reference.load_state_dict(state["reference"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.setstate(state["rng"])
        self.step_index = state["step"]
        self.history = list(state["history"])

    def train(self, *, resume: bool = False, on_step: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Run until ``config.steps`` (continuing from the latest checkpoint with ``resume``); Ctrl-C saves."""
        return run_resumable(self, resume=resume, on_step=on_step)
