"""GRPO fine-tuning with verifiable rewards and a chosen regulariser.

One training step, top to bottom (:meth:`GRPOTrainer.step`):

1. Pick ``prompts_per_step`` training prompts; sample ``group_size`` responses
   for each from the current policy (length capped at ``max_new_tokens``).
   With difficulty filtering, only prompts whose group accuracy lies in
   ``[filter_low, filter_high]`` are kept and more prompts are drawn until the
   batch is full (or ``filter_max_rounds`` draws were made).
2. Score each response with the task's reward; a reward function that raises
   gives 0 for that response and is counted in ``reward_errors``.
3. Advantages: rewards standardised within each group (``divergent.rl.group_advantages``,
   sample standard deviation by default as in TRL and verl; ``advantage_std``).
4. Loss = PPO-clip token-mean (``divergent.rl.ppo_clip_loss``; verl's dual clip and
   log-ratio clamp are options) plus ``coefficient * value`` of the regulariser named by
   ``config.regulariser``, looked up in :mod:`divergent.rl.registry` (table in
   ``docs/methods.md``). The built-ins:

   - ``none``: nothing;
   - ``reverse_kl``: ``kl_beta`` * token-mean KL estimator (k1/k2/k3) between the
     policy and a frozen copy of the initial policy, on the sampled tokens;
   - ``dph`` (DPH-RL): ``dph_eta`` * token-mean generator f(pi_theta/pi_0) over a
     minibatch of stored rehearsal responses (``divergent.rl.f_generator``); the
     rehearsal set is built once by sampling the initial policy, prompts it
     solves leave the GRPO pool, and no reference model is kept;
   - ``kdrl``: beta_t * reverse-KL-to-teacher estimate on the policy's own rollouts,
     beta_t annealed, correct responses masked (``divergent.rl.kdrl_kd_loss``).

   What a regulariser needs (reference copy, rehearsal set, teacher) is prepared from
   its registry entry; one added with ``divergent.rl.register_regulariser`` works the same.
5. Gradient clip, optimizer step. A non-finite loss or gradient stops the run
   with :class:`NonFiniteLossError`; the last checkpoint on disk is the last good one.

The trainer runs on the shared run layer (:func:`divergent.train.run.drive`): it has
``step_index``, ``total_steps``, ``step()``, ``state_dict()`` and ``load_state_dict()``.
The state holds the weights, the optimizer, every random state (prompt choice, the
sampling generator, torch's global generator), the history, the reference weights, the
rehearsal set and the prompt pool, so a run interrupted (Ctrl-C, SIGKILL) and resumed from
its checkpoint reproduces the uninterrupted run exactly on CPU. ``train(resume=True)``
is the short form of ``drive`` with checkpoints in ``run_dir/checkpoints``.

The policy is any causal LM called as ``model(input_ids)`` returning logits
``[B, T, V]`` (the project's TinyGPT) or a Hugging Face model (``.logits``); a Hugging
Face policy samples with ``generate`` (KV cache, left-padded prompts with their attention
mask, ``top_p``), seeded from the trainer's own generator. The task provides
``train``/``test`` problem lists, ``encode_prompts`` (a ``[N, L]`` tensor of
equal-length prompts, or ``(ids, attention_mask)`` of left-padded ones), ``decode``,
``eos_id``, ``pad_id`` and either ``reward(problem, text) -> float`` or
``score(problems, texts) -> (rewards [N], counts)`` — see
:class:`divergent.data.arithmetic.ArithmeticTask` and :class:`divergent.data.prompts.PromptTask`.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from divergent.rl import (
    BalancedBatch,
    RegulariserInputs,
    available_regularisers,
    distinct_correct,
    get_regulariser,
    group_advantages,
    masked_token_mean,
    pass_at_k_curve,
    ppo_clip_loss,
    token_logprobs,
)
from divergent.models.hf import is_hf_model
from divergent.rl.registry import builtin_defaults
from divergent.train.run import Checkpointer, NonFiniteLossError, check_finite, drive

__all__ = [
    "GRPOConfig",
    "GRPOTrainer",
    "NonFiniteLossError",
    "REGULARISERS",
    "build_rehearsal_set",
    "evaluate_policy",
    "model_logits",
    "response_logprobs",
    "response_mask",
    "sample_responses",
    "score_batch",
    "score_responses",
    "supervised_warm_start",
]

class _RegulariserNames(Sequence):
    """The registered regulariser names, read from :mod:`divergent.rl.registry` on every access."""

    def __getitem__(self, index):
        return available_regularisers()[index]

    def __len__(self) -> int:
        return len(available_regularisers())

    def __repr__(self) -> str:
        return repr(available_regularisers())


REGULARISERS: Sequence[str] = _RegulariserNames()
# Defaults of the built-in regularisers' parameters (GRPOConfig fields of the same names), read from the registry.
_DEFAULT = builtin_defaults()


@dataclass
class GRPOConfig:
    """Settings of :class:`GRPOTrainer`. Every field is documented once, here.

    steps: total optimizer steps of the run (a resumed run continues up to this).
    prompts_per_step: prompts per step (groups in the batch).
    group_size: G, responses sampled per prompt (>= 2).
    max_new_tokens: generation length cap; a response without EOS by then is cut and scored as is.
    temperature: sampling temperature of the rollouts.
    top_p: nucleus sampling: sample among the most likely tokens whose probabilities add up to top_p
        (1.0 = the whole vocabulary).
    lr: AdamW learning rate (constant).
    weight_decay: AdamW weight decay.
    grad_clip: max global gradient norm (0 = no clipping).
    clip_eps: PPO clip range (ratio kept in [1 - clip_eps, 1 + clip_eps]).
    dual_clip: dual-clip PPO bound c > 1 for tokens with a negative advantage (verl's clip_ratio_c,
        3 there); None = off (TRL has none).
    log_ratio_clamp: clamp log(pi_theta/pi_old) to [-x, x] before the ratio (verl: 20); None = off.
    advantage_std: "sample" (divide by G - 1, as TRL and verl) or "population" (divide by G) for the
        group standard deviation of the advantages.
    num_iterations: optimizer passes over each rollout batch (1 = on-policy; >1 makes PPO clipping active).
    regulariser: a name registered in ``divergent.rl.registry``: "none", "reverse_kl", "dph", "kdrl",
        or one added with ``divergent.rl.register_regulariser``.
    regulariser_params: values of a user-registered regulariser's parameters (the built-ins'
        parameters are the fields below).
    kl_estimator: k1, k2 or k3 for ``reverse_kl``.
    kl_beta: coefficient of the reverse-KL term.
    kl_log_ratio_clamp: clamp log(pi_theta/pi_ref) to [-x, x] in the estimator (verl: 20); None = off.
    kl_value_clamp: clamp the per-token KL estimate to [-x, x] (verl: 10 for k3); None = off.
    dph_divergence: DPH-RL generator: "forward_kl", "js" or "alpha".
    dph_eta: coefficient of the DPH term (paper: 0.01-0.05 forward KL, 0.05-0.2 JS).
    dph_alpha: order of the alpha generator, in (0, 1).
    dph_probe_prompts: training prompts sampled from the initial policy to build the rehearsal set.
    dph_probe_samples: samples per probed prompt.
    dph_solved_fraction: a probed prompt is "solved" (goes to rehearsal) when at least this fraction
        of its samples are correct (1.0 = all of them; the paper's exact rule is unverified, see docs/rl.md).
    dph_batch_size: rehearsal responses per step.
    kdrl_beta0, kdrl_delta, kdrl_beta_min: KD coefficient max(beta0 - delta * step, beta_min).
    kdrl_estimator: "k1", "k2", "k3" or "full" (exact reverse KL over the vocabulary).
    kdrl_mask_correct: reward-guided masking — no KD term on responses with reward > 0.
    filter_low, filter_high: balanced difficulty band on group accuracy; filtering is off when
        filter_low is None.
    filter_max_rounds: at most this many prompt draws per step while refilling the batch.
    checkpoint_every: steps between checkpoints (0 = only at the end and on Ctrl-C).
    keep_checkpoints: how many recent checkpoints to keep on disk.
    seed: seeds prompt selection and sampling.

    The regularisers' parameters take their defaults and valid values from
    :mod:`divergent.rl.registry`.
    """

    steps: int = 150
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 6
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    dual_clip: float | None = None
    log_ratio_clamp: float | None = None
    advantage_std: str = "sample"
    num_iterations: int = 1
    regulariser: str = "none"
    regulariser_params: dict = field(default_factory=dict)
    kl_estimator: str = _DEFAULT["kl_estimator"]
    kl_beta: float = _DEFAULT["kl_beta"]
    kl_log_ratio_clamp: float | None = _DEFAULT["kl_log_ratio_clamp"]
    kl_value_clamp: float | None = _DEFAULT["kl_value_clamp"]
    dph_divergence: str = _DEFAULT["dph_divergence"]
    dph_eta: float = _DEFAULT["dph_eta"]
    dph_alpha: float = _DEFAULT["dph_alpha"]
    dph_probe_prompts: int = _DEFAULT["dph_probe_prompts"]
    dph_probe_samples: int = _DEFAULT["dph_probe_samples"]
    dph_solved_fraction: float = _DEFAULT["dph_solved_fraction"]
    dph_batch_size: int = _DEFAULT["dph_batch_size"]
    kdrl_beta0: float = _DEFAULT["kdrl_beta0"]
    kdrl_delta: float = _DEFAULT["kdrl_delta"]
    kdrl_beta_min: float = _DEFAULT["kdrl_beta_min"]
    kdrl_estimator: str = _DEFAULT["kdrl_estimator"]
    kdrl_mask_correct: bool = _DEFAULT["kdrl_mask_correct"]
    filter_low: float | None = None
    filter_high: float = 0.75
    filter_max_rounds: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("steps", "prompts_per_step", "max_new_tokens", "num_iterations", "filter_max_rounds",
                    "keep_checkpoints")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GRPOConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size must be an int >= 2, got {self.group_size!r}")
        spec = get_regulariser(self.regulariser)  # unknown name: ValueError with the valid ones
        # Every built-in regulariser's fields are checked (a typo is caught even when another one is chosen).
        for name in available_regularisers():
            builtin = get_regulariser(name)
            if builtin.builtin:
                builtin.resolve({p.name: getattr(self, p.name) for p in builtin.params}, prefix="GRPOConfig.")
        if not isinstance(self.regulariser_params, dict):
            raise TypeError(f"GRPOConfig.regulariser_params must be a mapping, got {type(self.regulariser_params).__name__}")
        if self.regulariser_params:
            if spec.builtin:
                raise ValueError(
                    f"GRPOConfig.regulariser_params is for user-registered regularisers; set the built-in "
                    f"{spec.name!r}'s parameters as GRPOConfig fields ({', '.join(spec.defaults) or 'it has none'})"
                )
            spec.resolve(self.regulariser_params, prefix="GRPOConfig.regulariser_params.")
        if self.advantage_std not in ("sample", "population"):
            raise ValueError(f"GRPOConfig.advantage_std must be 'sample' or 'population', got {self.advantage_std!r}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"GRPOConfig.dual_clip must be > 1 or None, got {self.dual_clip!r}")
        if self.log_ratio_clamp is not None and not self.log_ratio_clamp > 0:
            raise ValueError(f"GRPOConfig.log_ratio_clamp must be > 0 or None, got {self.log_ratio_clamp!r}")
        if self.temperature <= 0:
            raise ValueError(f"GRPOConfig.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GRPOConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.lr <= 0:
            raise ValueError(f"GRPOConfig.lr must be > 0, got {self.lr}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"GRPOConfig.clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.filter_low is not None and not 0 <= self.filter_low <= self.filter_high <= 1:
            raise ValueError(
                f"GRPOConfig needs 0 <= filter_low <= filter_high <= 1, got {self.filter_low}, {self.filter_high}"
            )
        for name in ("grad_clip", "weight_decay", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"GRPOConfig.{name} must be >= 0, got {getattr(self, name)}")

    def regulariser_values(self) -> dict[str, Any]:
        """The chosen regulariser's parameter values: its GRPOConfig fields, or ``regulariser_params``."""
        spec = get_regulariser(self.regulariser)
        if spec.builtin:
            return spec.resolve({p.name: getattr(self, p.name) for p in spec.params}, prefix="GRPOConfig.")
        return spec.resolve(self.regulariser_params, prefix="GRPOConfig.regulariser_params.")


# ---------------------------------------------------------------------- model helpers


def model_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T, V]`` logits of a TinyGPT-style model (returns a tensor) or a HF model (``.logits``).

    With an ``attention_mask`` of left-padded rows (0 = padding), a Hugging Face model gets
    it with ``position_ids`` counted from each row's first real token, so a padded row has
    the logits of the same row without padding.
    """
    if attention_mask is None or (not is_hf_model(model) and bool(attention_mask.all())):
        output = model(input_ids)
    else:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if logits is None:
        raise TypeError(f"model output must be a logits tensor or have .logits, got {type(output).__name__}")
    return logits


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_prompts(task, problems: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ids [N, L], attention_mask [N, L] or None)`` of ``problems`` from ``task.encode_prompts``."""
    encoded = task.encode_prompts(problems)
    if isinstance(encoded, tuple):
        return encoded
    return encoded, None


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` restricted to the smallest set of most likely tokens whose mass reaches ``top_p``, renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Sample ``[N, max_new_tokens]`` response ids; positions after a row's EOS hold ``pad_id``.

    A Hugging Face model samples with ``generate`` (KV cache; ``attention_mask`` marks
    left padding), with torch's random state seeded from ``generator`` inside
    ``torch.random.fork_rng`` so that the draws depend on ``generator`` alone (and the
    global state is left as it was). Any other model (TinyGPT) takes equal-length prompts
    without padding; the whole sequence is re-run at each position (no KV cache: responses
    are a few tokens long) and sampling draws on CPU from ``generator``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    try:
        if is_hf_model(model):
            responses = _generate(model, prompt_ids, attention_mask, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                  pad_id=pad_id, temperature=temperature, top_p=top_p, generator=generator)
        else:
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError("left-padded prompts (attention_mask with zeros) need a Hugging Face model; "
                                 f"{type(model).__name__} takes equal-length prompts without padding")
            responses = _sample_loop(model, prompt_ids, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                     temperature=temperature, top_p=top_p, generator=generator)
        if responses.shape[1] < max_new_tokens:
            fill = torch.full((responses.shape[0], max_new_tokens - responses.shape[1]), pad_id,
                              dtype=responses.dtype, device=responses.device)
            responses = torch.cat([responses, fill], dim=1)
        return responses
    finally:
        model.train(was_training)


def _sample_loop(model, prompt_ids, *, max_new_tokens, eos_id, pad_id, temperature, top_p, generator) -> torch.Tensor:
    ids = prompt_ids
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    new_tokens = []
    for _ in range(max_new_tokens):
        logits = model_logits(model, ids)[:, -1, :].float() / temperature
        if not torch.isfinite(logits).all():
            raise NonFiniteLossError("the policy produced non-finite logits while sampling")
        probs = _nucleus(torch.softmax(logits, dim=-1).cpu(), top_p)
        next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(ids.device)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
        finished |= next_ids == eos_id
        new_tokens.append(next_ids)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        if bool(finished.all()):
            break
    return torch.stack(new_tokens, dim=1)


def _generate(model, prompt_ids, attention_mask, *, max_new_tokens, eos_id, pad_id, temperature, top_p,
              generator) -> torch.Tensor:
    """Hugging Face ``generate`` with exactly the sampling asked for (no top-k, no model defaults)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(prompt_ids)
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    device = prompt_ids.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=prompt_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=True,
            temperature=temperature, top_p=top_p, top_k=0, pad_token_id=pad_id, eos_token_id=eos_id,
        )
    responses = out[:, prompt_ids.shape[1]:]
    # generate pads finished rows with pad_token_id; the first EOS ends a response (pad may equal EOS).
    after_eos = (responses == eos_id).long().cumsum(1) - (responses == eos_id).long() > 0
    return responses.masked_fill(after_eos, pad_id)


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True on response tokens up to and including the first EOS (all tokens when there is none)."""
    is_eos = responses == eos_id
    # A position counts if no EOS occurred strictly before it.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return eos_before == 0


def response_logprobs(model: nn.Module, prompt_ids: torch.Tensor, responses: torch.Tensor,
                      prompt_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs ``[N, R]`` of ``responses`` after ``prompt_ids`` and the logits ``[N, R, V]`` behind them.

    ``prompt_mask``: the prompts' attention mask (0 = left padding), or None for unpadded prompts.
    """
    sequence = torch.cat([prompt_ids, responses], dim=1)
    mask = None if prompt_mask is None else torch.cat([prompt_mask, torch.ones_like(responses)], dim=1)
    logits = model_logits(model, sequence, mask)[:, prompt_ids.shape[1] - 1 : -1, :]
    return token_logprobs(logits, responses), logits


def score_responses(reward_fn: Callable[[Any, str], float], problems: Sequence[Any], texts: Sequence[str]) -> tuple[torch.Tensor, int]:
    """Rewards ``[N]`` for (problem, text) pairs; a reward that raises or is not finite counts as an error and scores 0."""
    rewards, errors = [], 0
    for problem, text in zip(problems, texts):
        try:
            value = float(reward_fn(problem, text))
            if not math.isfinite(value):
                raise ValueError(f"reward is not finite: {value}")
        except Exception:  # a user reward function may fail in any way; count it, don't crash the run
            value, errors = 0.0, errors + 1
        rewards.append(value)
    return torch.tensor(rewards, dtype=torch.float32), errors


REWARD_COUNTS = ("reward_errors", "reward_timeouts", "reward_skipped")


def score_batch(task, reward_fn: Callable[[Any, str], float] | None, problems: Sequence[Any],
                texts: Sequence[str]) -> tuple[torch.Tensor, dict[str, int]]:
    """Rewards ``[N]`` and the counts of :data:`REWARD_COUNTS`.

    ``reward_fn(problem, text)`` when given, else ``task.score(problems, texts)`` when the
    task has it (a batch reward with its own error, time-out and skip counts), else
    ``task.reward`` per response.
    """
    if reward_fn is None and hasattr(task, "score"):
        rewards, counts = task.score(list(problems), list(texts))
        return rewards, {key: int(counts.get(key, 0)) for key in REWARD_COUNTS}
    rewards, errors = score_responses(reward_fn if reward_fn is not None else task.reward, problems, texts)
    return rewards, {"reward_errors": errors, "reward_timeouts": 0, "reward_skipped": 0}


def _decode_all(task, responses: torch.Tensor) -> tuple[list[str], list[int]]:
    texts, lengths = [], []
    for row in responses.tolist():
        text, length, _ = task.decode(row)
        texts.append(text)
        lengths.append(length)
    return texts, lengths


# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_policy(
    model: nn.Module,
    task,
    problems: Sequence[Any],
    *,
    n_samples: int = 16,
    max_new_tokens: int = 6,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_prompts: int = 64,
) -> dict[str, Any]:
    """Sample ``n_samples`` responses per problem and measure them.

    Returns a dict with ``pass_at_k`` ({k: unbiased pass@k, k = 1..n_samples}; a response
    is correct when its reward is > 0), ``distinct_correct`` (distinct correct responses
    summed over problems), ``solved`` (problems with at least one correct sample),
    ``mean_reward``, ``mean_length`` (response tokens incl. EOS), ``reward_errors``,
    ``reward_timeouts``, ``reward_skipped`` and ``n_samples``.
    """
    generator = torch.Generator().manual_seed(seed)
    device = _device(model)
    correct_counts, all_texts, all_correct = [], [], []
    reward_sum, length_sum = 0.0, 0
    counts = dict.fromkeys(REWARD_COUNTS, 0)
    for start in range(0, len(problems), batch_prompts):
        chunk = list(problems[start : start + batch_prompts])
        prompts, prompt_mask = encode_prompts(task, chunk)
        prompts = prompts.to(device).repeat_interleave(n_samples, dim=0)
        if prompt_mask is not None:
            prompt_mask = prompt_mask.to(device).repeat_interleave(n_samples, dim=0)
        responses = sample_responses(model, prompts, max_new_tokens=max_new_tokens, eos_id=task.eos_id,
                                     pad_id=task.pad_id, temperature=temperature, generator=generator,
                                     attention_mask=prompt_mask, top_p=top_p)
        texts, lengths = _decode_all(task, responses)
        expanded = [p for p in chunk for _ in range(n_samples)]
        rewards, batch_counts = score_batch(task, None, expanded, texts)
        for key, value in batch_counts.items():
            counts[key] += value
        reward_sum += float(rewards.sum())
        length_sum += sum(lengths)
        correct = (rewards > 0).view(len(chunk), n_samples)
        correct_counts.extend(correct.sum(1).tolist())
        for i in range(len(chunk)):
            all_texts.append(texts[i * n_samples : (i + 1) * n_samples])
            all_correct.append(correct[i].tolist())
    total = len(problems) * n_samples
    return {
        "pass_at_k": pass_at_k_curve(correct_counts, n_samples),
        "distinct_correct": distinct_correct(all_texts, all_correct),
        "solved": int(sum(c > 0 for c in correct_counts)),
        "mean_reward": reward_sum / total,
        "mean_length": length_sum / total,
        **counts,
        "n_samples": n_samples,
        "n_problems": len(problems),
    }


# ---------------------------------------------------------------------- warm start


def supervised_warm_start(
    model: nn.Module,
    task,
    *,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Teacher-forced cross-entropy on the answers of random training problems.

    Returns the loss per step. ``on_step(step, loss)`` is called after each step
    (for a progress bar).
    """
    rng = random.Random(seed)
    device = _device(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        problems = rng.sample(task.train, min(batch_size, len(task.train)))
        ids, target_mask = task.supervised_batch(problems)
        ids, target_mask = ids.to(device), target_mask.to(device)
        logits = model_logits(model, ids[:, :-1])
        logp = token_logprobs(logits, ids[:, 1:])
        loss = -masked_token_mean(logp, target_mask[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


# ---------------------------------------------------------------------- DPH rehearsal set


def _left_pad(rows: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None, pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack 1-D prompt rows of possibly different widths, left-padding with ``pad_id`` (mask 0 there)."""
    if masks is None:
        return torch.stack(list(rows)), None
    width = max(int(r.shape[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), width), dtype=masks[0].dtype)
    for i, (row, row_mask) in enumerate(zip(rows, masks)):
        ids[i, width - row.shape[0]:] = row.cpu()
        mask[i, width - row.shape[0]:] = row_mask.cpu()
    return ids, mask


@torch.no_grad()
def build_rehearsal_set(
    model: nn.Module,
    task,
    problems: Sequence[Any],
    *,
    n_samples: int,
    solved_fraction: float,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
    top_p: float = 1.0,
    batch_prompts: int = 64,
) -> dict[str, Any]:
    """Sample the initial policy pi_0 on ``problems``; keep one correct response per solved prompt.

    A prompt is solved when at least ``solved_fraction`` of its ``n_samples`` are correct.
    Returns ``{"indices": [i into problems], "prompts": [N, L], "prompt_mask": [N, L] or None
    (left padding of prompts of different lengths), "responses": [N, R], "logprobs": [N, R]
    (log pi_0 per token), "mask": [N, R]}``.
    """
    device = _device(model)
    keep_idx, keep_prompts, keep_masks, keep_responses = [], [], [], []
    padded = False
    for start in range(0, len(problems), batch_prompts):
        chunk = list(problems[start : start + batch_prompts])
        prompts, prompt_mask = encode_prompts(task, chunk)
        prompts = prompts.to(device)
        padded = padded or prompt_mask is not None
        repeated = prompts.repeat_interleave(n_samples, dim=0)
        repeated_mask = None if prompt_mask is None else prompt_mask.to(device).repeat_interleave(n_samples, dim=0)
        responses = sample_responses(model, repeated, max_new_tokens=max_new_tokens, eos_id=task.eos_id,
                                     pad_id=task.pad_id, temperature=temperature, generator=generator,
                                     attention_mask=repeated_mask, top_p=top_p)
        texts, _ = _decode_all(task, responses)
        rewards, _ = score_batch(task, None, [p for p in chunk for _ in range(n_samples)], texts)
        correct = (rewards > 0).view(len(chunk), n_samples)
        for i in range(len(chunk)):
            if float(correct[i].float().mean()) >= solved_fraction - 1e-9:
                first = int(torch.nonzero(correct[i])[0])
                keep_idx.append(start + i)
                if prompt_mask is None:
                    keep_prompts.append(prompts[i])
                else:  # without this chunk's padding, re-padded to the set's width below
                    real = prompt_mask[i].bool()
                    keep_prompts.append(prompts[i][real.to(device)])
                    keep_masks.append(prompt_mask[i][real])
                keep_responses.append(responses[i * n_samples + first])
    if not keep_idx:
        first_ids, first_mask = encode_prompts(task, problems[:1])
        empty = torch.zeros(0, max_new_tokens, dtype=torch.long)
        return {"indices": [], "prompts": torch.zeros(0, first_ids.shape[1], dtype=torch.long),
                "prompt_mask": None if first_mask is None else torch.zeros(0, first_mask.shape[1], dtype=torch.long),
                "responses": empty, "logprobs": torch.zeros(0, max_new_tokens), "mask": empty.bool()}
    prompts, prompt_mask = _left_pad(keep_prompts, keep_masks if padded else None, task.pad_id)
    prompts = prompts.to(device)
    prompt_mask = None if prompt_mask is None else prompt_mask.to(device)
    responses = torch.stack(keep_responses)
    was_training = model.training
    model.eval()
    logprobs, _ = response_logprobs(model, prompts, responses, prompt_mask)
    model.train(was_training)
    return {"indices": keep_idx, "prompts": prompts.cpu(),
            "prompt_mask": None if prompt_mask is None else prompt_mask.cpu(), "responses": responses.cpu(),
            "logprobs": logprobs.cpu(), "mask": response_mask(responses, task.eos_id).cpu()}


# ---------------------------------------------------------------------- trainer


class GRPOTrainer:
    """GRPO with a pluggable regulariser; see the module docstring for one step.

    Args:
        policy: the causal LM being trained (modified in place).
        task: provides problems, prompt encoding, decoding and the reward.
        config: :class:`GRPOConfig`.
        teacher: frozen teacher for a regulariser that needs one (``kdrl``).
        run_dir: folder for checkpoints (``checkpoints/step_N.ckpt``) of :meth:`train`; None = no checkpoints.
        reward_fn: overrides the task's reward (``reward_fn(problem, text) -> float``).
    """

    def __init__(self, policy: nn.Module, task, config: GRPOConfig, *, teacher: nn.Module | None = None,
                 run_dir: str | Path | None = None, reward_fn: Callable[[Any, str], float] | None = None):
        self.regulariser = get_regulariser(config.regulariser)
        if "teacher" in self.regulariser.needs and teacher is None:
            raise ValueError(f"regulariser={config.regulariser!r} needs a teacher model (teacher=...)")
        self.policy, self.task, self.config, self.teacher = policy, task, config, teacher
        self.reward_fn = reward_fn
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.device = _device(policy)
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.rng = random.Random(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step_index = 0
        self.history: list[dict[str, Any]] = []
        self.reference: nn.Module | None = None
        self.rehearsal: dict[str, Any] | None = None
        self.pool: list[Any] = list(task.train)
        self._prepared = False
        if hasattr(teacher, "served_topk"):  # a served teacher (divergent.models.served): sampled-token log-probs
            if config.regulariser_values().get("kdrl_estimator") == "full":
                raise ValueError("kdrl_estimator='full' needs the teacher's full logits; a served teacher gives "
                                 "log-probs of the sampled tokens: use k1, k2 or k3, or a local teacher folder")
        elif teacher is not None:
            teacher.eval().requires_grad_(False)

    @property
    def total_steps(self) -> int:
        return self.config.steps

    # ---------------------------------------------------------------- setup
    def _prepare(self) -> None:
        """Build what the regulariser needs from the initial policy (reference copy or rehearsal set)."""
        config = self.config
        if "reference" in self.regulariser.needs:
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        if "rehearsal" in self.regulariser.needs:
            probe = self.rng.sample(self.pool, min(config.dph_probe_prompts, len(self.pool)))
            self.rehearsal = build_rehearsal_set(
                self.policy, self.task, probe, n_samples=config.dph_probe_samples,
                solved_fraction=config.dph_solved_fraction, max_new_tokens=config.max_new_tokens,
                temperature=config.temperature, top_p=config.top_p, generator=self.generator,
            )
            # Prompts pi_0 already solves are rehearsed, not explored: GRPO runs on the rest.
            solved = {probe[i] for i in self.rehearsal["indices"]}
            self.pool = [p for p in self.pool if p not in solved]
        self._prepared = True

    # ---------------------------------------------------------------- state (for divergent.train.run.drive)
    _CHECKED = ("regulariser", "seed", "prompts_per_step", "group_size", "max_new_tokens", "lr")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, random states, history, rehearsal, pool."""
        pool = set(self.pool)
        version, python_state, gauss = self.rng.getstate()
        return {
            "step": self.step_index,
            "model": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "python_rng": [version, list(python_state), gauss],
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),  # dropout in the policy's forward passes
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "history": [dict(h) for h in self.history],
            "config": asdict(self.config),
            "n_train": len(self.task.train),
            "prepared": self._prepared,
            "reference": None if self.reference is None else self.reference.state_dict(),
            "rehearsal": self.rehearsal,
            # Positions in task.train of the prompts moved to rehearsal (problems need only be hashable).
            "solved_indices": None if self.rehearsal is None else [
                i for i, p in enumerate(self.task.train) if p not in pool
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict` (a checkpoint of a run with the same settings and data)."""
        saved = state.get("config", {})
        for key in self._CHECKED:
            if key in saved and saved[key] != getattr(self.config, key):
                raise ValueError(f"the checkpoint was written with {key}={saved[key]!r}, this run has {key}="
                                 f"{getattr(self.config, key)!r}; resume with the run's own settings")
        if state.get("n_train", len(self.task.train)) != len(self.task.train):
            raise ValueError(f"the checkpoint was written for {state['n_train']} training prompts, this run has "
                             f"{len(self.task.train)}; resume with the run's own data")
        self.policy.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        version, python_state, gauss = state["python_rng"]
        self.rng.setstate((version, tuple(python_state), gauss))
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step_index = int(state["step"])
        self.history = [dict(h) for h in state["history"]]
        if state["reference"] is not None:
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
            self.reference.load_state_dict(state["reference"])
        self.rehearsal = state["rehearsal"]
        self.pool = list(self.task.train)
        if state.get("solved_indices") is not None:
            solved = set(state["solved_indices"])
            self.pool = [p for i, p in enumerate(self.task.train) if i not in solved]
        self._prepared = bool(state.get("prepared", True))

    # ---------------------------------------------------------------- one step
    def _rollouts(self) -> tuple[list[Any], torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Sample groups (with difficulty filtering if on); returns problems, prompts, their mask, responses, rewards [P, G]."""
        config, task = self.config, self.task
        G = config.group_size
        rounds = config.filter_max_rounds if config.filter_low is not None else 1
        batch = BalancedBatch(config.prompts_per_step, low=config.filter_low or 0.0, high=config.filter_high) \
            if config.filter_low is not None else None
        kept: list[tuple[Any, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
        counts = dict.fromkeys(REWARD_COUNTS, 0)
        for _ in range(rounds):
            problems = self.rng.sample(self.pool, min(config.prompts_per_step, len(self.pool)))
            prompts, prompt_mask = encode_prompts(task, problems)
            prompts = prompts.to(self.device).repeat_interleave(G, dim=0)
            if prompt_mask is not None:
                prompt_mask = prompt_mask.to(self.device).repeat_interleave(G, dim=0)
            responses = sample_responses(self.policy, prompts, max_new_tokens=config.max_new_tokens,
                                         eos_id=task.eos_id, pad_id=task.pad_id, temperature=config.temperature,
                                         generator=self.generator, attention_mask=prompt_mask, top_p=config.top_p)
            texts, _ = _decode_all(task, responses)
            rewards, batch_counts = score_batch(task, self.reward_fn, [p for p in problems for _ in range(G)], texts)
            for key, value in batch_counts.items():
                counts[key] += value
            groups = [(problems[i], prompts[i * G:(i + 1) * G],
                       None if prompt_mask is None else prompt_mask[i * G:(i + 1) * G],
                       responses[i * G:(i + 1) * G], rewards[i * G:(i + 1) * G]) for i in range(len(problems))]
            if batch is None:
                kept = groups
                break
            batch.offer(groups, rewards.view(len(problems), G))
            if batch.full:
                break
        if batch is not None:
            kept = batch.items
        stats = {**counts, "groups_kept": len(kept),
                 "groups_offered": batch.offered if batch is not None else len(kept)}
        if not kept:
            return [], torch.empty(0), None, torch.empty(0), torch.empty(0, G), stats
        problems = [g[0] for g in kept]
        masks = [g[2] for g in kept]
        if masks[0] is None:
            prompts, prompt_mask = torch.cat([g[1] for g in kept]), None
        else:  # groups of different rounds may be padded to different widths
            rows = [row[m.bool()] for g in kept for row, m in zip(g[1], g[2])]
            prompts, prompt_mask = _left_pad(rows, [torch.ones_like(r) for r in rows], task.pad_id)
            prompts, prompt_mask = prompts.to(self.device), prompt_mask.to(self.device)
        responses = torch.cat([g[3] for g in kept])
        rewards = torch.stack([g[4] for g in kept])
        return problems, prompts, prompt_mask, responses, rewards, stats

    def _rehearsal_minibatch(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        rehearsal = self.rehearsal
        if rehearsal is None or rehearsal["prompts"].shape[0] == 0:
            return None
        n = rehearsal["prompts"].shape[0]
        rows = torch.tensor(self.rng.sample(range(n), min(self.config.dph_batch_size, n)))
        mask = rehearsal.get("prompt_mask")
        return (rehearsal["prompts"][rows].to(self.device), None if mask is None else mask[rows].to(self.device),
                *(rehearsal[key][rows].to(self.device) for key in ("responses", "logprobs", "mask")))

    def step(self) -> dict[str, Any]:
        """One GRPO step; returns the logged metrics. Raises NonFiniteLossError before updating on NaN/inf."""
        if not self._prepared:
            self._prepare()
        config, task = self.config, self.task
        started = time.perf_counter()
        problems, prompts, prompt_mask, responses, rewards, stats = self._rollouts()
        record: dict[str, Any] = {"step": self.step_index + 1, **stats}
        if problems:
            mask = response_mask(responses, task.eos_id)
            advantages = group_advantages(rewards, std=config.advantage_std).flatten().to(self.device)
            flat_rewards = rewards.flatten().to(self.device)
            regulariser, params = self.regulariser, config.regulariser_values()
            with torch.no_grad():
                old_logp, _ = response_logprobs(self.policy, prompts, responses, prompt_mask)
                ref_logp = teacher_logp = teacher_logits = None
                if "reference" in regulariser.needs:
                    ref_logp, _ = response_logprobs(self.reference, prompts, responses, prompt_mask)
                if "teacher" in regulariser.needs and hasattr(self.teacher, "served_topk"):
                    from divergent.models.served import served_response_logprobs

                    teacher_logp = served_response_logprobs(self.teacher, prompts, responses, prompt_mask)
                elif "teacher" in regulariser.needs:
                    teacher_logp, teacher_logits = response_logprobs(self.teacher, prompts, responses, prompt_mask)
            rehearsal = self._rehearsal_minibatch() if "rehearsal" in regulariser.needs else None
            coefficient = regulariser.coefficient(self.step_index, **params)
            context = f"regulariser {config.regulariser!r}"
            for _ in range(config.num_iterations):
                self.policy.train()
                logp, logits = response_logprobs(self.policy, prompts, responses, prompt_mask)
                policy_loss, clip_stats = ppo_clip_loss(
                    logp, old_logp, advantages, mask, clip_eps=config.clip_eps,
                    dual_clip=config.dual_clip, log_ratio_clamp=config.log_ratio_clamp,
                )
                r_logp = r_logp0 = r_mask = None
                if rehearsal is not None:
                    r_prompts, r_prompt_mask, r_responses, r_logp0, r_mask = rehearsal
                    r_logp, _ = response_logprobs(self.policy, r_prompts, r_responses, r_prompt_mask)
                regulariser_value = regulariser.value(RegulariserInputs(
                    logp=logp, logits=logits, mask=mask, rewards=flat_rewards, step=self.step_index,
                    ref_logp=ref_logp, teacher_logp=teacher_logp, teacher_logits=teacher_logits,
                    rehearsal_logp=r_logp, rehearsal_logp0=r_logp0, rehearsal_mask=r_mask,
                ), **params)
                loss = policy_loss + coefficient * regulariser_value
                self.optimizer.zero_grad(set_to_none=True)
                check_finite(loss, "loss", step=self.step_index + 1, context=context)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.policy.parameters(), config.grad_clip if config.grad_clip > 0 else float("inf")
                )
                check_finite(grad_norm, "gradient norm", step=self.step_index + 1, context=context)
                self.optimizer.step()
            lengths = mask.sum(1).float()
            record.update({
                "mean_reward": float(rewards.mean()),
                "mean_length": float(lengths.mean()),
                "loss": float(loss.detach()),
                "policy_loss": float(policy_loss.detach()),
                "regulariser": float(regulariser_value.detach()),
                **clip_stats,
                "grad_norm": float(grad_norm),
            })
            if regulariser.log_coefficient_as:
                record[regulariser.log_coefficient_as] = coefficient
        else:
            # Every group was filtered out: nothing to learn from this step.
            record.update({"mean_reward": float("nan"), "mean_length": float("nan"), "loss": 0.0,
                           "policy_loss": 0.0, "regulariser": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0})
        self.step_index += 1
        record["seconds"] = time.perf_counter() - started
        self.history.append(record)
        return record

    # ---------------------------------------------------------------- loop
    def train(self, *, resume: bool = False, on_step: Callable[[dict[str, Any]], None] | None = None,
              on_save: Callable[[int, Path], None] | None = None) -> list[dict[str, Any]]:
        """Run until ``config.steps`` under :func:`divergent.train.run.drive`; returns the whole history.

        Checkpoints go to ``run_dir/checkpoints`` every ``checkpoint_every`` steps, at the end and
        on Ctrl-C (which then raises :class:`divergent.train.run.RunInterrupted`); ``resume``
        continues from the newest one. ``on_save(step, path)`` runs after each checkpoint.
        """
        checkpointer = None if self.run_dir is None else Checkpointer(
            self.run_dir / "checkpoints", keep=self.config.keep_checkpoints, on_save=on_save)
        drive(self, checkpointer=checkpointer, checkpoint_every=self.config.checkpoint_every, resume=resume,
              on_step=on_step)
        return self.history
