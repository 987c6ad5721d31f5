"""Token-level distillation of a causal language model, readable top to bottom.

Labels follow Hugging Face's convention everywhere: ``labels[t]`` is the token at
position ``t`` (not shifted) or -100 where it does not count; the prediction at
position ``t`` is scored against ``labels[t + 1]``, and the shift happens in one
place, :class:`LMObjective`.

One optimisation step of :class:`LMTrainer`:

1. Draw the step's batch (``batch_size x grad_accum x world_size`` examples) from
   the data source, deterministically in ``(seed, step)``. With probability
   ``on_policy_fraction`` it is replaced by continuations the *student* samples
   from the examples' prompts (GKD's on-policy data), with probability
   ``seq_kd_fraction`` by the *teacher's* (sequence-level KD); only generated
   tokens count. Every random choice is seeded by ``(seed, step)``.
2. Count the tokens the loss counts over the whole step (all micro-batches, all
   ranks): ``n``. Each micro-batch's loss is a *sum* over its tokens divided by
   ``n``, so the accumulated gradient is the gradient of the mean over the
   step's tokens, whatever the split into micro-batches or ranks.
3. Per micro-batch, :class:`LMObjective` — the one definition of the loss, also
   run by :class:`divergent.hf.DistillationTrainer` —

       sum over counted tokens of  hard_weight * CE(student, label)
                                  + soft_weight * T^2 * D(p_T || q_T)      / n

   computed *inside* the student's forward (:func:`divergent.models.hf.replace_output`)
   from the output layer's input and weight, by ``LinearDistillationLoss`` (output
   layer fused, chunked over tokens; default) or ``DistillationLoss`` on full logits
   (``fused=False``). The teacher side is the teacher's output-layer input and
   weight (no grad), the logits of a teacher that gives them (a mixture of teachers,
   :func:`divergent.models.hf.gives_logits`), or a cached top-k teacher (``dv.TopK``); with
   one teacher per domain (:class:`divergent.models.domain_teachers.DomainTeachers`) each
   domain's rows of the batch against their own teacher, summed under the one ``n``.
4. Stop with :class:`~divergent.train.run.NonFiniteLossError` (before any update)
   on a non-finite loss or gradient; clip; AdamW/SGD step; linear warm-up then
   cosine (or constant) learning rate.

:func:`divergent.train.run.drive` runs the trainer: Ctrl-C between steps,
checksummed checkpoints with everything an exact resume needs (weights,
optimiser, step, history, RNG states). Under ``torchrun``/``accelerate launch``
the student is wrapped in ``DistributedDataParallel`` or, with ``fsdp=True``,
``FullyShardedDataParallel`` — with the fused loss too, since the loss is
computed within the wrapped forward, where FSDP has gathered the weights.
"""

from __future__ import annotations

import contextlib
import math
import random
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from divergent.data.lm_data import Example, collate
from divergent.functional import divergence
from divergent.functional.topk import TopK
from divergent.functional.fused_linear import default_chunk_size
from divergent.losses.linear import LinearDistillationLoss
from divergent.losses.modules import DistillationLoss
from divergent.models.domain_teachers import DomainTeachers
from divergent.models.hf import check_plain_output_layer, gives_logits, is_hf_model, replace_output, teacher_side
from divergent.train import distributed
from divergent.train.distributed import init_distributed_from_env  # noqa: F401  (re-exported)
from divergent.train.run import NonFiniteLossError, check_finite

__all__ = [
    "LMTrainingSettings",
    "LMDistillConfig",
    "Batch",
    "ExampleSource",
    "LMObjective",
    "LMTrainer",
    "LMTrainResult",
    "count_targets",
    "generated_batch",
    "train_lm_distillation",
    "evaluate_lm",
    "peak_memory_mb",
    "reset_peak_memory",
]


@dataclass
class LMTrainingSettings:
    """How a student is trained: the loss's hyperparameters, the optimiser, the data it sees.

    Shared by :class:`LMDistillConfig` (one run) and the ``distill-lm`` command's config;
    each field is documented once, here.

    temperature: T; both distributions are softmax(logits / T).
    hard_weight: weight of the cross-entropy on the data labels (untempered).
    soft_weight: weight of T^2 * divergence (0 = train on labels only, no teacher).
    t2_scale: multiply the divergence by T^2 (Hinton's convention).
    fused: compute the loss with the output layer fused and chunked over tokens
        (``LinearDistillationLoss``): the [tokens, vocab] logits are never formed.
    chunk_size: tokens per chunk of the fused loss (None: as many as fit 2^27 logits, 2^23 on the CPU).
    vocab_size: compare only the first ``vocab_size`` entries (output layers padded beyond
        the tokenizer's vocabulary); None = both output layers have the same size.
    steps: optimisation steps.
    batch_size: examples per micro-batch on each process.
    grad_accum: micro-batches per step (the step's batch is batch_size * grad_accum per process).
    optimizer: "adamw" or "sgd" (plain SGD makes gradient-scale errors visible in tests).
    lr: peak learning rate.
    weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
    warmup_steps: steps of linear warm-up to ``lr``.
    lr_schedule: "cosine" (after warm-up, cosine decay to 10% of ``lr``) or "constant".
    grad_clip: gradient-norm clipping (0 = off; the norm is checked for NaN/inf either way).
    on_policy_fraction: GKD's λ: probability that a step trains on student-generated continuations.
    seq_kd_fraction: probability that a step trains on teacher-generated continuations (seq-KD).
    max_new_tokens: tokens generated per continuation (on-policy and seq-KD steps).
    prompt_len: prompt tokens of examples that count from their first token (``text`` rows);
        other examples are prompted with everything before their first counted token.
    generation_temperature: sampling temperature of generated continuations (0 = greedy).
    """

    temperature: float = 1.0
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    t2_scale: bool = True
    fused: bool = True
    chunk_size: int | None = None
    vocab_size: int | None = None
    steps: int = 150
    batch_size: int = 16
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: str = "cosine"
    grad_clip: float = 1.0
    on_policy_fraction: float = 0.0
    seq_kd_fraction: float = 0.0
    max_new_tokens: int = 32
    prompt_len: int = 16
    generation_temperature: float = 1.0


@dataclass
class LMDistillConfig(LMTrainingSettings):
    """One LM distillation run: the :class:`LMTrainingSettings`, and

    divergence: registered divergence name (``dv.available()``); see docs/divergences.md.
    divergence_params: its parameters, e.g. ``{"beta": 0.5}`` for ``js``.
    seed: seeds the data order, generation and on-policy draws (per step).
    log_every: steps between history entries (loss, learning rate, tokens).
    eval_every: steps between evaluations recorded in the history (0 = only at the end).
    fsdp: under torchrun/accelerate, shard the student with FullyShardedDataParallel
        instead of replicating it with DistributedDataParallel.
    """

    divergence: str = "forward_kl"
    divergence_params: dict = field(default_factory=dict)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    fsdp: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "max_new_tokens", "prompt_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LMDistillConfig.{name} must be a positive int, got {value!r}")
        for name in ("chunk_size", "vocab_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"LMDistillConfig.{name} must be a positive int or None, got {value!r}")
        for name in ("warmup_steps", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LMDistillConfig.{name} must be an int >= 0, got {value!r}")
        for name in ("on_policy_fraction", "seq_kd_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"LMDistillConfig.{name} must be in [0, 1], got {value!r}")
        if self.on_policy_fraction + self.seq_kd_fraction > 1.0:
            raise ValueError(
                "on_policy_fraction + seq_kd_fraction must be <= 1, got "
                f"{self.on_policy_fraction} + {self.seq_kd_fraction}"
            )
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"LMDistillConfig.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"LMDistillConfig.lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"lr must be > 0 and weight_decay, grad_clip >= 0; got lr={self.lr}, "
                             f"weight_decay={self.weight_decay}, grad_clip={self.grad_clip}")
        if self.hard_weight < 0 or self.soft_weight < 0 or self.hard_weight + self.soft_weight == 0:
            raise ValueError(
                f"hard_weight and soft_weight must be >= 0 and not both 0, got "
                f"{self.hard_weight}, {self.soft_weight}"
            )
        # Builds the loss once so that an unknown divergence or parameter fails here, naming itself.
        LMObjective.from_config(self)


# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """``input_ids``/``attention_mask``/``labels`` ``[B, T]`` (HF convention) and an optional cached teacher.

    ``teacher_indices``/``teacher_logprobs`` ``[B, T, k]``: a cached top-k teacher at every
    position (what the teacher predicts for the next token). ``teacher_rows``: a cached
    teacher with another tokenizer (:mod:`divergent.train.cross_tokenizer`): the same rows in
    the teacher's tokens, ``input_ids``/``attention_mask``/``labels`` ``[B, Tt]`` and its
    ``teacher_indices``/``teacher_logprobs`` ``[B, Tt, k]``. ``domains`` ``[B]``: each
    row's domain index (data grouped by a domain column; one teacher per domain reads it).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    teacher_indices: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None
    teacher_rows: dict[str, torch.Tensor] | None = None
    domains: torch.Tensor | None = None

    _TENSORS = ("input_ids", "attention_mask", "labels", "teacher_indices", "teacher_logprobs", "domains")

    def _map(self, change) -> Batch:
        def apply(t):
            return None if t is None else change(t)

        rows = None if self.teacher_rows is None else {key: change(t) for key, t in self.teacher_rows.items()}
        return Batch(**{name: apply(getattr(self, name)) for name in self._TENSORS}, teacher_rows=rows)

    def rows(self, start: int, end: int) -> Batch:
        return self._map(lambda t: t[start:end])

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device))

    @classmethod
    def from_examples(cls, examples: Sequence[Example], pad_token_id: int = 0) -> Batch:
        cached = "teacher_indices" in examples[0]
        data = collate(examples, pad_token_id, extra=("teacher_indices", "teacher_logprobs") if cached else ())
        rows = None
        if "teacher_row" in examples[0]:  # the teacher's own tokens (cross-tokenizer, cached teacher)
            rows = collate([e["teacher_row"] for e in examples], 0, extra=("teacher_indices", "teacher_logprobs"))
        return cls(data["input_ids"], data["attention_mask"], data["labels"],
                   data.get("teacher_indices"), data.get("teacher_logprobs"), teacher_rows=rows,
                   domains=data.get("domain_index"))


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Tokens the loss counts: predicted positions whose (shifted) label is not -100."""
    return (labels[..., 1:] != -100).sum()


def _step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + salt)


class ExampleSource:
    """Batches of examples for a step, deterministic in ``(seed, step)``: no state to save for a resume.

    Epoch ``e`` visits the examples in a permutation seeded by ``(seed, e)`` (in order when
    ``shuffle=False``); step ``s`` with ``n`` examples per step takes positions
    ``s * n ... s * n + n - 1`` of the concatenated epochs.
    """

    def __init__(self, examples: Sequence[Example], *, seed: int = 0, shuffle: bool = True, pad_token_id: int = 0) -> None:
        if not examples:
            raise ValueError("ExampleSource needs at least one example")
        self.examples = examples
        self.seed = seed
        self.shuffle = shuffle
        self.pad_token_id = pad_token_id
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.pop(next(iter(self._orders)))
            n = len(self.examples)
            self._orders[epoch] = (torch.randperm(n, generator=_step_generator(self.seed, epoch, 3)).tolist()
                                   if self.shuffle else list(range(n)))
        return self._orders[epoch]

    def batch(self, step: int, n: int) -> Batch:
        size = len(self.examples)
        picks = [self._order(position // size)[position % size] for position in range(step * n, step * n + n)]
        return Batch.from_examples([self.examples[i] for i in picks], self.pad_token_id)


# ----------------------------------------------------------------------------- the loss


def _call(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    return model(input_ids=input_ids, attention_mask=attention_mask)


def _check_finite_states(hidden: torch.Tensor, side: str) -> None:
    """NonFiniteLossError when a model's final hidden states hold NaN/inf (its weights diverged)."""
    if hidden.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(hidden.detach()))).all()):
        raise NonFiniteLossError(f"non-finite {side} hidden states (the output layer's input)")


def _as_autocast(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under autocast (mixed precision), both in the autocast dtype, as the output layer's matmul would be."""
    if hidden.dtype != weight.dtype and torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        return hidden.to(dtype), weight.to(dtype)
    return hidden, weight


def _ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100, reduction="sum")


class LMObjective:
    """The LM distillation loss of one micro-batch; the only place where it is defined.

    ``objective(model, student, batch, teacher=None, normalizer=n)`` runs the student's
    forward through ``model`` (the student itself, or its DDP/FSDP wrapper) and returns

        sum over counted tokens t of [ hard_weight * CE(s_t, y_{t+1}) + soft_weight * T^2 * D_t ] / n

    with ``s_t`` the student's logits at position ``t``, ``y_{t+1} = labels[t + 1]`` (tokens
    whose label is -100 do not count) and ``D_t`` the divergence between the tempered
    teacher and student distributions at ``t``. The teacher is ``teacher`` (a causal LM,
    run without grad; a module that gives its logits; or :class:`DomainTeachers`, whose
    domain ``d`` teacher scores the rows with ``batch.domains == d``) or the batch's cached
    top-k. ``n`` is ``normalizer`` — the step's global count of counted tokens under
    accumulation and data parallelism — or the batch's own count. With ``soft_weight == 0`` no teacher is needed (plain cross-entropy, computed
    in chunks so the logits are never whole).
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        divergence_params: dict | None = None,
        *,
        temperature: float = 1.0,
        hard_weight: float = 0.0,
        soft_weight: float = 1.0,
        t2_scale: bool = True,
        fused: bool = True,
        chunk_size: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        params = dict(divergence_params or {})
        self.divergence = divergence
        self.hard_weight, self.soft_weight = float(hard_weight), float(soft_weight)
        self.fused = bool(fused)
        self.chunk_size = chunk_size
        self.vocab_size = vocab_size
        common = dict(hard_weight=hard_weight, soft_weight=soft_weight, temperature=temperature, t2_scale=t2_scale)
        # Both modules validate the name and parameters; the one that is used depends on `fused`.
        self.unfused_loss = DistillationLoss(divergence, **common, **params)
        self.fused_loss = LinearDistillationLoss(divergence, chunk_size=chunk_size, vocab_size=vocab_size,
                                                 **common, **params)

    @classmethod
    def from_config(cls, config: Any) -> LMObjective:
        """From any config with the loss fields of :class:`LMDistillConfig` (also ``DistillationConfig``)."""
        return cls(config.divergence, config.divergence_params, temperature=config.temperature,
                   hard_weight=config.hard_weight, soft_weight=config.soft_weight,
                   t2_scale=getattr(config, "t2_scale", True), fused=config.fused, chunk_size=config.chunk_size,
                   vocab_size=config.vocab_size)

    @property
    def needs_teacher(self) -> bool:
        return self.soft_weight > 0

    def __call__(
        self,
        model: nn.Module,
        student: nn.Module,
        batch: Batch,
        *,
        teacher: nn.Module | None = None,
        normalizer: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        labels = batch.labels[:, 1:]  # the one shift: position t is scored against the token at t + 1
        if normalizer is None:
            normalizer = max(int(count_targets(batch.labels)), 1)
        elif isinstance(normalizer, torch.Tensor):
            normalizer = float(normalizer.detach())
        # The teacher side in parts: (rows of the batch or None for all, teacher_input, teacher_weight);
        # one part, or with one teacher per domain one part per domain present in the batch.
        parts: list[tuple[torch.Tensor | None, Any, Any]] = [(None, None, None)]
        if self.needs_teacher:
            if batch.teacher_indices is not None:
                k = batch.teacher_indices.shape[-1]
                parts = [(None, None, TopK(batch.teacher_indices[:, :-1].reshape(-1, k),
                                           batch.teacher_logprobs[:, :-1].reshape(-1, k).float()))]
            elif isinstance(teacher, DomainTeachers):
                parts = [(rows, *self._teacher_pair(member, batch.input_ids[rows], batch.attention_mask[rows]))
                         for member, rows in teacher.groups(batch.domains)]
            elif teacher is not None:
                parts = [(None, *self._teacher_pair(teacher, batch.input_ids, batch.attention_mask))]
            else:
                raise ValueError(
                    f"soft_weight={self.soft_weight} needs a teacher: pass a teacher model or batches with a "
                    f"cached teacher (divergent cache-teacher); soft_weight=0 trains on the labels alone"
                )

        def at_output_layer(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            _check_finite_states(hidden, "student")
            hidden, weight = _as_autocast(hidden, weight)
            if not self.needs_teacher:
                student_input = hidden[:, :-1].reshape(-1, hidden.shape[-1])
                return self.hard_weight * self._chunked_ce(student_input, weight, labels.reshape(-1)) / normalizer
            total = None
            for rows, teacher_input, teacher_weight in parts:
                part_hidden, part_labels = (hidden, labels) if rows is None else (hidden[rows], labels[rows])
                student_input = part_hidden[:, :-1].reshape(-1, hidden.shape[-1])
                loss = self._soft_loss(student_input, weight, teacher_input, teacher_weight,
                                       part_labels.reshape(-1), normalizer)
                total = loss if total is None else total + loss
            return total

        with replace_output(student, at_output_layer):
            return _call(model, batch.input_ids, batch.attention_mask)

    @staticmethod
    def _teacher_pair(teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[Any, Any]:
        """``(teacher_input [N, H], weight [V, H])`` or ``(None, logits [N, V])`` of the predicted positions."""
        with torch.no_grad():
            hidden, teacher_weight = teacher_side(teacher, input_ids, attention_mask)
        if hidden is None:  # a teacher that gives its logits [B, T, V]
            return None, teacher_weight[:, :-1].reshape(-1, teacher_weight.shape[-1]).detach()
        hidden, teacher_weight = _as_autocast(hidden, teacher_weight)
        teacher_input = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        _check_finite_states(teacher_input, "teacher")
        return teacher_input, teacher_weight.detach()

    def _soft_loss(self, student_input: torch.Tensor, weight: torch.Tensor, teacher_input: Any, teacher_weight: Any,
                   flat_labels: torch.Tensor, normalizer: float) -> torch.Tensor:
        """The loss of these rows (summed over their counted tokens, divided by ``normalizer``)."""
        if self.fused:
            return self.fused_loss(student_input, weight, teacher_input, teacher_weight, flat_labels,
                                   normalizer=normalizer)
        vocab = self.vocab_size or weight.shape[0]
        student_logits = (student_input @ weight.T)[:, :vocab]
        if isinstance(teacher_weight, TopK):
            teacher_logits = teacher_weight
        else:
            dense = teacher_weight if teacher_input is None else teacher_input @ teacher_weight.T
            teacher_logits = dense[:, :vocab]
            if teacher_logits.shape[-1] != student_logits.shape[-1]:
                raise ValueError(
                    f"student vocabulary ({student_logits.shape[-1]}) and teacher vocabulary "
                    f"({teacher_logits.shape[-1]}) differ; set vocab_size when it is only padding — "
                    f"different tokenizers are not supported"
                )
        return self.unfused_loss(student_logits, teacher_logits, flat_labels, normalizer=normalizer)

    def _chunked_ce(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        vocab = self.vocab_size or weight.shape[0]
        weight = weight[:vocab]
        rows = self.chunk_size or default_chunk_size(vocab, device=hidden.device)
        if hidden.shape[0] <= rows:
            return _ce_sum(hidden, weight, labels)
        # Each chunk's logits are recomputed in the backward pass instead of kept.
        return sum(checkpoint(_ce_sum, hidden[i : i + rows], weight, labels[i : i + rows], use_reentrant=False)
                   for i in range(0, hidden.shape[0], rows))


# ----------------------------------------------------------------------------- generated continuations


@torch.no_grad()
def _sample(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float,
            generator: torch.Generator, pad_token_id: int, eos_token_id: int | None, device) -> list[list[int]]:
    """``max_new_tokens`` sampled tokens after each prompt (cut after the first EOS)."""
    was_training = model.training
    model.eval()
    out: list[list[int] | None] = [None] * len(prompts)
    try:
        if is_hf_model(model):
            # Left padding: the continuation starts at the same column for every row.
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, prompt in enumerate(prompts):
                ids[row, width - len(prompt):] = torch.tensor(prompt)
                mask[row, width - len(prompt):] = 1
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            sampled = model.generate(
                ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_k=0, top_p=1.0, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
            )[:, width:].cpu().tolist()
            for row, tokens in enumerate(sampled):
                out[row] = tokens
        else:
            by_length: dict[int, list[int]] = {}
            for row, prompt in enumerate(prompts):
                by_length.setdefault(len(prompt), []).append(row)
            for length, rows in sorted(by_length.items()):
                ids = torch.tensor([prompts[r] for r in rows], dtype=torch.long, device=device)
                sampled = model.generate(ids, max_new_tokens, temperature=temperature, generator=generator,
                                         eos_id=eos_token_id)[:, length:].cpu().tolist()
                for row, tokens in zip(rows, sampled):
                    out[row] = tokens
    finally:
        model.train(was_training)
    result = []
    for tokens in out:
        if eos_token_id is not None and eos_token_id in tokens:
            tokens = tokens[: tokens.index(eos_token_id) + 1]
        result.append(tokens)
    return result


def _prompt(ids: list[int], labels: list[int], prompt_len: int) -> list[int]:
    """Everything before the first counted token; ``prompt_len`` tokens when the first token counts."""
    first = next((t for t in range(1, len(labels)) if labels[t] != -100), len(labels))
    if first <= 1:
        return ids[: max(1, min(prompt_len, len(ids) - 1))]
    return ids[:first]


def generated_batch(
    model: nn.Module,
    batch: Batch,
    *,
    max_new_tokens: int,
    prompt_len: int,
    temperature: float,
    generator: torch.Generator,
    pad_token_id: int = 0,
    eos_token_id: int | None = None,
    device: torch.device | str = "cpu",
) -> Batch:
    """``batch`` with each example replaced by its prompt and ``model``'s sampled continuation.

    The prompt is everything before an example's first counted token (the prompt of a
    prompt/completion or chat row), or its first ``prompt_len`` tokens when every token
    counts. Only the generated tokens count (prompt labels -100); generation stops at EOS.
    """
    examples = []
    prompts = []
    lengths = batch.attention_mask.sum(1).tolist()
    for row, length in enumerate(lengths):
        ids = batch.input_ids[row, :length].tolist()
        labels = batch.labels[row, :length].tolist()
        prompts.append(_prompt(ids, labels, prompt_len))
    continuations = _sample(model, prompts, max_new_tokens, temperature, generator, pad_token_id, eos_token_id, device)
    for prompt, tokens in zip(prompts, continuations):
        examples.append({"input_ids": prompt + tokens, "labels": [-100] * len(prompt) + tokens})
    generated = Batch.from_examples(examples, pad_token_id)
    generated.domains = batch.domains  # the same rows, in the same order
    return generated


# ----------------------------------------------------------------------------- memory


def reset_peak_memory(device: str | torch.device = "cpu") -> None:
    """Start a new peak-memory window (CUDA: allocator peak; Linux CPU: the RSS high-water mark)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets VmHWM, the peak resident set size.
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_mb(device: str | torch.device = "cpu") -> float:
    """Peak memory since :func:`reset_peak_memory`: CUDA allocator peak, or the process's peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- the trainer


@dataclass
class LMTrainResult:
    """``student``: the trained module (unwrapped); ``state_dict``: its full state (gathered under FSDP)."""

    student: nn.Module
    state_dict: dict
    steps_done: int
    history: list[dict]
    train_seconds: float
    tokens_seen: int
    tokens_per_second: float
    peak_memory_mb: float


def _learning_rate(config: LMDistillConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class LMTrainer:
    """Distil ``teacher`` into ``student`` on ``source``'s batches, one :meth:`step` at a time.

    Run it with :func:`divergent.train.run.drive` (Ctrl-C, checkpoints, resume). ``teacher``
    may be None when the examples carry a cached top-k teacher (and nothing is generated)
    or when ``soft_weight == 0``. ``evaluate(student) -> dict`` is called every
    ``config.eval_every`` steps and after the last; its numbers go into the history.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        source: ExampleSource,
        config: LMDistillConfig,
        *,
        device: str | torch.device = "cpu",
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        pad_token_id: int = 0,
        eos_token_id: int | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.source = source
        self.evaluate = evaluate
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.objective = LMObjective.from_config(config)
        check_plain_output_layer(student)
        if teacher is None and config.on_policy_fraction + config.seq_kd_fraction > 0:
            raise ValueError(
                "on_policy_fraction and seq_kd_fraction need a teacher model: the teacher scores generated "
                "continuations, which a cache does not hold"
            )
        self.student = student.to(self.device).train()
        self.teacher = None
        if teacher is not None and (self.objective.needs_teacher or config.seq_kd_fraction > 0):
            if gives_logits(teacher) and config.seq_kd_fraction > 0:
                raise ValueError(f"seq_kd_fraction={config.seq_kd_fraction} needs a teacher that generates; the "
                                 f"{type(teacher).__name__} teacher gives logits only (set seq_kd_fraction=0)")
            if not gives_logits(teacher):
                check_plain_output_layer(teacher)
            self.teacher = teacher.to(self.device).eval()
            for parameter in self.teacher.parameters():
                parameter.requires_grad_(False)

        self.fsdp = self.world > 1 and config.fsdp
        self.model: nn.Module = self.student
        if self.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            self.model = FSDP(self.student, use_orig_params=True, device_id=self.device)
        elif self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(self.student)
        # Built after wrapping: FSDP replaces the parameters it shards.
        optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.SGD
        self.optimizer = optimizer_class(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

        self.step_index = 0
        self.total_steps = config.steps
        self.history: list[dict[str, Any]] = []
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self._full_state: dict[str, torch.Tensor] | None = None
        reset_peak_memory(self.device)

    # -- one step ---------------------------------------------------------------------

    def _gathered(self):
        """Full (unsharded) weights for generation and evaluation under FSDP."""
        if not self.fsdp:
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(self.model, writeback=False)

    def _draw_batch(self, step: int) -> Batch:
        config = self.config
        per_rank = config.batch_size * config.grad_accum
        batch = self.source.batch(step, per_rank * self.world)
        # On-policy / seq-KD: one draw per step, identical on every rank; the whole step's
        # batch is generated on every rank (the same sequences), then each takes its rows.
        draw = random.Random(config.seed * 1_000_003 + step).random()
        generator = None
        if draw < config.on_policy_fraction:
            model, context, generator = self.student, self._gathered(), _step_generator(config.seed, step, 1)
        elif draw < config.on_policy_fraction + config.seq_kd_fraction:
            model, context, generator = self.teacher, contextlib.nullcontext(), _step_generator(config.seed, step, 2)
        if generator is not None:
            with context:
                batch = generated_batch(
                    model, batch, max_new_tokens=config.max_new_tokens, prompt_len=config.prompt_len,
                    temperature=config.generation_temperature, generator=generator,
                    pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id, device=self.device)
        return batch.rows(self.rank * per_rank, (self.rank + 1) * per_rank)

    def step(self) -> dict[str, Any]:
        config = self.config
        step = self.step_index
        began = time.perf_counter()
        local = self._draw_batch(step)
        counted = count_targets(local.labels).to(torch.float64)
        if self.world > 1:
            counted = counted.to(distributed.collective_device())
            dist.all_reduce(counted)
        n_counted = max(float(counted), 1.0)

        lr = _learning_rate(config, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), dtype=torch.float64)
        for micro_index in range(config.grad_accum):
            micro = local.rows(micro_index * config.batch_size, (micro_index + 1) * config.batch_size).to(self.device)
            last = micro_index == config.grad_accum - 1
            sync = contextlib.nullcontext() if (self.world == 1 or last) else self.model.no_sync()
            with sync:
                try:
                    loss = self.objective(self.model, self.student, micro, teacher=self.teacher, normalizer=n_counted)
                except NonFiniteLossError as exc:
                    raise NonFiniteLossError(f"{exc} at step {step + 1}; stopped without updating the weights. "
                                             f"Try a lower learning rate or gradient clipping") from None
                # DDP/FSDP average gradients over ranks; the loss is already a share of the
                # global sum, so undo the average.
                (loss * self.world).backward()
            step_loss += loss.detach().double().cpu()
        if self.world > 1:
            step_loss = step_loss.to(distributed.collective_device())
            dist.all_reduce(step_loss)
        context = f"divergence {config.divergence!r}" if self.objective.needs_teacher else "cross-entropy"
        check_finite(step_loss, "loss", step=step + 1, context=context)
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        if self.fsdp:
            grad_norm = self.model.clip_grad_norm_(max_norm)
        else:
            grad_norm = nn.utils.clip_grad_norm_(self.student.parameters(), max_norm)
        check_finite(grad_norm, "gradient norm", step=step + 1, context=context)
        self.optimizer.step()
        self.step_index = step + 1
        self.train_seconds += time.perf_counter() - began
        self.tokens_seen += int(counted)
        record: dict[str, Any] = {"step": self.step_index, "loss": float(step_loss), "lr": lr, "tokens": int(counted),
                                  "grad_norm": float(grad_norm)}
        final = self.step_index == self.total_steps
        evaluate_now = self.evaluate is not None and (
            final or (config.eval_every and self.step_index % config.eval_every == 0))
        if evaluate_now:
            with self._gathered():
                record.update({f"eval_{k}": v for k, v in self.evaluate(self.student).items()})
        if evaluate_now or final or self.step_index % config.log_every == 0:
            self.history.append(record)
        return record

    # -- state --------------------------------------------------------------------------

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The student's full state (a collective call under FSDP; every rank must call it)."""
        if not self.fsdp:
            return {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType

        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT):
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        model_state = self.full_model_state()
        if self.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType

            with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT):
                optimizer_state = FSDP.optim_state_dict(self.model, self.optimizer)
        else:
            optimizer_state = self.optimizer.state_dict()
        self._full_state = model_state
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "step": self.step_index,
            "history": [dict(h) for h in self.history],
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "python_rng": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
            "config": {k: v for k, v in asdict(self.config).items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("config", {})
        for key in ("divergence", "steps", "batch_size", "grad_accum", "seed"):
            if key in saved and saved[key] != getattr(self.config, key):
                raise ValueError(
                    f"the checkpoint was written with {key}={saved[key]!r}, this run has {key}="
                    f"{getattr(self.config, key)!r}; resume with the run's own settings"
                )
        if self.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType

            with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT):
                self.model.load_state_dict(state["model"])
                optimizer_state = FSDP.optim_state_dict_to_load(self.model, self.optimizer, state["optimizer"])
            self.optimizer.load_state_dict(optimizer_state)
        else:
            self.student.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.step_index = int(state["step"])
        self.history = [dict(h) for h in state["history"]]
        self.tokens_seen = int(state["tokens_seen"])
        self.train_seconds = float(state["train_seconds"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        python = state["python_rng"]
        random.setstate((python[-2], tuple(python[:-2]), python[-1]))

    @property
    def exported_state(self) -> dict[str, torch.Tensor]:
        """The full student state of the latest :meth:`state_dict` call (what a checkpoint holds)."""
        return self._full_state if self._full_state is not None else self.full_model_state()

    def result(self) -> LMTrainResult:
        return LMTrainResult(
            student=self.student,
            state_dict=self.full_model_state(),
            steps_done=self.step_index,
            history=self.history,
            train_seconds=self.train_seconds,
            tokens_seen=self.tokens_seen,
            tokens_per_second=self.tokens_seen / self.train_seconds if self.train_seconds > 0 else float("nan"),
            peak_memory_mb=peak_memory_mb(self.device),
        )


def train_lm_distillation(
    student: nn.Module,
    teacher: nn.Module | None,
    source: ExampleSource,
    config: LMDistillConfig,
    *,
    checkpoints: str | None = None,
    checkpoint_every: int = 0,
    resume: bool = True,
    device: str | torch.device = "cpu",
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    show_progress: bool = False,
    description: str = "distilling",
    pad_token_id: int = 0,
    eos_token_id: int | None = None,
) -> LMTrainResult:
    """Build an :class:`LMTrainer` and :func:`~divergent.train.run.drive` it to the end.

    ``checkpoints``: folder of checksummed ``step_N.ckpt`` files (None: no checkpoints);
    with ``resume`` the run continues from the newest one.
    """
    from divergent.train.run import Checkpointer, drive, progress

    trainer = LMTrainer(student, teacher, source, config, device=device, evaluate=evaluate,
                        pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    checkpointer = Checkpointer(checkpoints) if checkpoints is not None else None
    with progress(transient=True) as bar:
        task = bar.add_task(description, total=config.steps, visible=show_progress and trainer.rank == 0)
        drive(trainer, checkpointer=checkpointer, checkpoint_every=checkpoint_every, resume=resume,
              on_step=lambda record: bar.update(task, completed=record["step"]))
    return trainer.result()


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    teacher: nn.Module | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    pad_token_id: int = 0,
    vocab_size: int | None = None,
    byte_level: bool = False,
) -> dict[str, float]:
    """Metrics of ``model`` on ``examples`` (HF label convention), per counted token.

    ``loss``: mean cross-entropy in nats; ``perplexity``: exp(loss); ``bits_per_byte``:
    loss / ln 2 when the tokens are bytes. With a ``teacher`` (a causal LM, or examples that
    carry a cached top-k teacher): ``kl_teacher`` = mean KL(p_teacher ‖ q_model) at T = 1
    (over the cached top-k buckets for a cache: a lower bound of the full KL),
    ``top1_agreement`` = fraction of tokens where both predict the same next token, and
    ``teacher_loss`` = the teacher's own cross-entropy. ``vocab_size``: compare the first
    entries only (padded output layers).
    """
    device = torch.device(device)
    sums = {"nll": 0.0, "kl": 0.0, "agree": 0.0, "teacher_nll": 0.0}
    count = 0
    cached = bool(examples) and "teacher_indices" in examples[0]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = Batch.from_examples(examples[start : start + batch_size], pad_token_id).to(device)
            targets = batch.labels[:, 1:]
            counted = targets != -100
            teacher_logits = None
            if teacher is not None:
                hidden, weight = teacher_side(teacher, batch.input_ids, batch.attention_mask, batch.domains,
                                              temperature=1.0)  # a mixture: of the teachers themselves, at T = 1
                teacher_logits = (weight[:, :-1][counted] if hidden is None
                                  else hidden[:, :-1][counted] @ weight.T).float()
            model_hidden, model_weight = teacher_side(model, batch.input_ids, batch.attention_mask, batch.domains,
                                                      temperature=1.0)
            logits = (model_weight[:, :-1][counted] if model_hidden is None
                      else model_hidden[:, :-1][counted] @ model_weight.T).float()
            vocab = vocab_size or logits.shape[-1]
            logits = logits[:, :vocab]
            y = targets[counted]
            sums["nll"] += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            if teacher_logits is not None:
                teacher_logits = teacher_logits[:, :vocab]
                sums["teacher_nll"] += float(nn.functional.cross_entropy(teacher_logits, y, reduction="sum"))
                sums["kl"] += float(divergence("forward_kl", logits, teacher_logits, reduction="sum"))
                sums["agree"] += float((logits.argmax(-1) == teacher_logits.argmax(-1)).sum())
            elif cached:
                indices = batch.teacher_indices[:, :-1][counted]
                logprobs = batch.teacher_logprobs[:, :-1][counted].float()
                sparse = TopK(indices, logprobs)
                sums["kl"] += float(divergence("forward_kl", logits, sparse, reduction="sum"))
                sums["agree"] += float((logits.argmax(-1) == indices[:, 0]).sum())
                next_logprob = collate(examples[start : start + batch_size], pad_token_id,
                                       extra=("teacher_next_logprob",))["teacher_next_logprob"][:, :-1].to(device)
                sums["teacher_nll"] -= float(next_logprob[counted].sum())
            count += int(counted.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_lm: the examples have no counted token")
    loss = sums["nll"] / count
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    if byte_level:
        metrics["bits_per_byte"] = loss / math.log(2)
    if teacher is not None or cached:
        metrics.update(kl_teacher=sums["kl"] / count, top1_agreement=sums["agree"] / count,
                       teacher_loss=sums["teacher_nll"] / count)
    return metrics
