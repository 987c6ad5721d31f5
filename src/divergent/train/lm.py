"""Token-level distillation of a causal language model, readable top to bottom.

One optimisation step:

1. Draw the step's batch (``batch_size x grad_accum x world_size`` sequences)
   from the data source; with probability ``on_policy_fraction`` it is
   replaced by sequences the *student* generates from the batch's prompts
   (GKD's on-policy data), with probability ``seq_kd_fraction`` by sequences the
   *teacher* generates (sequence-level KD). Generated prompts are masked (-100)
   so only generated tokens count. Every random choice is seeded by
   ``(seed, step)``, so a resumed run repeats an uninterrupted one.
2. Count the tokens whose label is not -100 over the whole step (all
   micro-batches, all ranks): ``n``. Each micro-batch's loss is a *sum* over its
   tokens divided by ``n``, so the accumulated gradient is the gradient of the
   mean over the step's tokens, whatever the split into micro-batches or ranks.
3. Per micro-batch: student hidden states, teacher hidden states (no grad) or
   cached top-k teacher log-probs, and the loss

       hard_weight * CE(student, labels) + soft_weight * T^2 * D(p_T || q_T)

   computed by ``LinearDistillationLoss`` (output layer fused, chunked over
   tokens; default) or ``DistillationLoss`` on full logits (``fused=False``).
4. Clip, AdamW step, linear-warmup cosine learning rate.

Checkpoints (student, optimiser, schedule, step, history) are written
atomically every ``checkpoint_every`` steps and on Ctrl-C; with ``resume`` the
run continues from the latest one. Under ``torchrun`` the student is wrapped
in ``DistributedDataParallel`` (gloo on CPU, nccl on GPU), or sharded with
``FullyShardedDataParallel`` (``fsdp=True``, with the unfused loss).
"""

from __future__ import annotations

import math
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from divergent.train import distributed
from divergent.train.distributed import init_distributed_from_env  # noqa: F401  (re-exported)
from divergent.functional import divergence
from divergent.losses.linear import LinearDistillationLoss
from divergent.losses.modules import DistillationLoss
from divergent.models.hf import hidden_and_logits, is_hf_model, output_weight
from divergent.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

__all__ = [
    "LMDistillConfig",
    "LMTrainResult",
    "Batch",
    "corpus_sampler",
    "cache_sampler",
    "train_lm_distillation",
    "evaluate_lm",
    "peak_memory_mb",
    "reset_peak_memory",
]


@dataclass
class LMDistillConfig:
    """Every knob of LM distillation; each field is documented once, here.

    divergence: registered divergence name (``dv.available()``); see METHODS.md.
    divergence_params: its parameters, e.g. ``{"beta": 0.5}`` for ``js``.
    temperature: T; both distributions are softmax(logits / T).
    hard_weight: weight of the cross-entropy on the data labels (untempered).
    soft_weight: weight of T^2 * divergence (0 = train on labels only, no teacher).
    t2_scale: multiply the divergence by T^2 (Hinton's convention).
    fused: compute the loss with the output layer fused and chunked over tokens
        (``LinearDistillationLoss``); False materialises the [tokens, vocab] logits.
    chunk_size: tokens per chunk of the fused loss (None: as many as fit 2^27 logits,
        ``divergent.functional.fused_linear.default_chunk_size``).
    vocab_size: compare only the first ``vocab_size`` entries (padding-only
        vocabulary differences; see ``resolve_vocab_size``). None = equal sizes.
    steps: optimisation steps.
    batch_size: sequences per micro-batch on each process.
    grad_accum: micro-batches per step (the step's batch is batch_size * grad_accum per process).
    seq_len: tokens per training sequence.
    optimizer: "adamw" or "sgd" (plain SGD makes gradient-scale errors visible in tests).
    lr, weight_decay, warmup_steps, grad_clip: learning rate, weight decay, linear warmup
        then cosine decay to 10% of ``lr``, gradient-norm clipping (0 = off).
    on_policy_fraction: λ, probability that a step trains on student-generated sequences (GKD).
    seq_kd_fraction: probability that a step trains on teacher-generated sequences (seq-KD).
    prompt_len: tokens of real data kept as the prompt of generated sequences.
    generation_temperature: sampling temperature of generated sequences.
    seed: seeds initial data order, generation and on-policy draws (per step).
    log_every: steps between history entries (loss, learning rate).
    checkpoint_every: steps between checkpoints (0 = only at the end and on Ctrl-C).
    resume: continue from the latest checkpoint in the run folder if there is one.
    fsdp: under torchrun, shard the student with FullyShardedDataParallel instead of
        DistributedDataParallel (needs ``fused=False``).
    """

    divergence: str = "forward_kl"
    divergence_params: dict = field(default_factory=dict)
    temperature: float = 1.0
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    t2_scale: bool = True
    fused: bool = True
    chunk_size: int | None = None
    vocab_size: int | None = None
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 128
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    on_policy_fraction: float = 0.0
    seq_kd_fraction: float = 0.0
    prompt_len: int = 16
    generation_temperature: float = 1.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    resume: bool = True
    fsdp: bool = False

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "chunk_size", "log_every")
        for name in positive:
            value = getattr(self, name)
            if name == "chunk_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LMDistillConfig.{name} must be a positive int, got {value!r}")
        for name in ("on_policy_fraction", "seq_kd_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"LMDistillConfig.{name} must be in [0, 1], got {value!r}")
        if self.on_policy_fraction + self.seq_kd_fraction > 1.0:
            raise ValueError(
                "on_policy_fraction + seq_kd_fraction must be <= 1, got "
                f"{self.on_policy_fraction} + {self.seq_kd_fraction}"
            )
        generates = self.on_policy_fraction + self.seq_kd_fraction > 0
        if generates and not 1 <= self.prompt_len < self.seq_len:
            raise ValueError(f"prompt_len must be in [1, seq_len={self.seq_len}), got {self.prompt_len}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"LMDistillConfig.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.hard_weight < 0 or self.soft_weight < 0 or self.hard_weight + self.soft_weight == 0:
            raise ValueError(
                f"hard_weight and soft_weight must be >= 0 and not both 0, got "
                f"{self.hard_weight}, {self.soft_weight}"
            )


@dataclass
class Batch:
    """``input_ids``/``labels`` ``[B, T]`` (labels -100 = not counted) and an optional cached teacher."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    teacher_topk: Any = None

    def rows(self, start: int, end: int) -> Batch:
        topk = self.teacher_topk[start:end] if self.teacher_topk is not None else None
        return Batch(self.input_ids[start:end], self.labels[start:end], topk)


@dataclass
class LMTrainResult:
    """``student`` is the trained module (under FSDP its parameters are this rank's shards);
    ``state_dict`` is its full, unsharded state on every rank."""

    student: nn.Module
    state_dict: dict
    steps_done: int
    history: list[dict]
    train_seconds: float
    tokens_seen: int
    tokens_per_second: float
    peak_memory_mb: float
    run_dir: Path | None


def _step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + salt)


def corpus_sampler(data: torch.Tensor, seq_len: int, seed: int = 0) -> Callable[[int, int], Batch]:
    """``sample(step, n) -> Batch`` of ``n`` random windows of a token stream, seeded by ``(seed, step)``."""
    from divergent.data.text import random_windows

    def sample(step: int, n: int) -> Batch:
        inputs, labels = random_windows(data, n, seq_len, _step_generator(seed, step))
        return Batch(inputs, labels)

    return sample


def cache_sampler(cache, seed: int = 0) -> Callable[[int, int], Batch]:
    """``sample(step, n) -> Batch`` of ``n`` random cached sequences with their top-k teacher."""

    def sample(step: int, n: int) -> Batch:
        picks = torch.randint(0, len(cache), (n,), generator=_step_generator(seed, step))
        input_ids, labels, topk = cache.get(picks.tolist())
        return Batch(input_ids, labels, topk)

    return sample


class _HiddenStates(nn.Module):
    """Wraps a TinyGPT or HF causal LM so that DDP sees one forward returning hidden states."""

    def __init__(self, model: nn.Module, compute_logits: bool) -> None:
        super().__init__()
        self.model = model
        self.compute_logits = compute_logits

    def forward(self, input_ids: torch.Tensor):
        return hidden_and_logits(self.model, input_ids, compute_logits=self.compute_logits)


@torch.no_grad()
def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, temperature: float, generator) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        if is_hf_model(model):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_k=0,
                pad_token_id=model.config.eos_token_id or 0,
            )
        else:
            out = model.generate(prompt, new_tokens, temperature=temperature, generator=generator)
    finally:
        model.train(was_training)
    return out


def _generated_batch(model: nn.Module, batch: Batch, config: LMDistillConfig, generator) -> Batch:
    """Replace a batch by ``model``'s continuations of its first ``prompt_len`` tokens.

    The sequence is prompt + generated tokens (``seq_len + 1`` tokens); inputs
    and labels are it shifted by one, labels of prompt positions masked so
    only generated tokens are trained on.
    """
    prompt = batch.input_ids[:, : config.prompt_len]
    device = next(model.parameters()).device
    full = _generate(
        model, prompt.to(device), config.seq_len + 1 - config.prompt_len,
        config.generation_temperature, generator,
    ).cpu()
    labels = full[:, 1:].clone()
    labels[:, : config.prompt_len - 1] = -100
    return Batch(full[:, :-1], labels)


def _learning_rate(config: LMDistillConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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


def train_lm_distillation(
    student: nn.Module,
    teacher: nn.Module | None,
    sample: Callable[[int, int], Batch],
    config: LMDistillConfig,
    *,
    run_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
    description: str = "distilling",
) -> LMTrainResult:
    """Distil ``teacher`` into ``student`` on batches from ``sample(step, n)``.

    ``teacher`` may be None when the batches carry a cached top-k teacher or
    when ``soft_weight == 0`` (training on labels only). Returns the trained
    student (unwrapped), the history and throughput figures.
    """
    device = torch.device(device)
    rank, world = distributed.rank(), distributed.world_size()
    reset_peak_memory(device)
    student.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
    use_teacher_model = teacher is not None and config.soft_weight > 0
    if teacher is None and config.on_policy_fraction + config.seq_kd_fraction > 0:
        raise ValueError(
            "on_policy_fraction and seq_kd_fraction need a teacher model: generated sequences "
            "have no cached teacher log-probs"
        )

    loss_kwargs = dict(
        hard_weight=config.hard_weight, soft_weight=config.soft_weight,
        temperature=config.temperature, t2_scale=config.t2_scale, **config.divergence_params,
    )
    if config.fused:
        loss_fn = LinearDistillationLoss(
            config.divergence, chunk_size=config.chunk_size, vocab_size=config.vocab_size, **loss_kwargs
        )
    else:
        loss_fn = DistillationLoss(config.divergence, **loss_kwargs)

    run_dir = Path(run_dir) if run_dir is not None else None
    start_step, history, tokens_seen, train_seconds = 0, [], 0, 0.0
    state = None
    if run_dir is not None and config.resume:
        checkpoint_path = latest_checkpoint(run_dir)
        if checkpoint_path is not None:
            state = load_checkpoint(checkpoint_path, map_location=str(device))
            student.load_state_dict(state["student"])
            start_step, history = state["step"], state["history"]
            tokens_seen, train_seconds = state["tokens_seen"], state["train_seconds"]

    fsdp = world > 1 and config.fsdp
    wrapped: nn.Module = _HiddenStates(student, compute_logits=not config.fused)
    if fsdp:
        if config.fused:
            raise ValueError(
                "fsdp=True needs fused=False: FSDP shards the output layer, which the fused loss "
                "reads outside the forward pass"
            )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = FSDP(wrapped, use_orig_params=True, device_id=device)
    elif world > 1:
        wrapped = nn.parallel.DistributedDataParallel(wrapped)
    # Built after wrapping: FSDP replaces the parameters it shards.
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.SGD
    optimizer = optimizer_class(wrapped.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if state is not None:
        optimizer_state = state["optimizer"]
        if fsdp:
            optimizer_state = FSDP.optim_state_dict_to_load(wrapped, optimizer, optimizer_state)
        optimizer.load_state_dict(optimizer_state)

    def full_states(with_optimizer: bool = True):
        """Unsharded student (and optimiser) state; a collective call under FSDP."""
        if not fsdp:
            return student.state_dict(), optimizer.state_dict() if with_optimizer else None
        from torch.distributed.fsdp import StateDictType

        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT):
            model_state = {key.removeprefix("model."): value for key, value in wrapped.state_dict().items()}
            optimizer_state = FSDP.optim_state_dict(wrapped, optimizer) if with_optimizer else None
        return model_state, optimizer_state

    def save(step: int) -> None:
        if run_dir is None:
            return
        model_state, optimizer_state = full_states()
        if rank != 0:
            return
        save_checkpoint(
            run_dir / f"step_{step}.pt",
            {
                "student": model_state,
                "optimizer": optimizer_state,
                "step": step,
                "history": history,
                "tokens_seen": tokens_seen,
                "train_seconds": train_seconds,
                "config": dict(vars(config)),
            },
        )

    def teacher_for(micro: Batch, ids: torch.Tensor):
        """Teacher side of the loss: a cached TopK, else the teacher's (hidden, weight)
        (fused) or logits (unfused); None when training on labels only."""
        if micro.teacher_topk is not None:
            topk = micro.teacher_topk.to(device)
            return (None, topk) if config.fused else topk
        if not use_teacher_model:
            if config.soft_weight > 0:
                raise ValueError(
                    "soft_weight > 0 needs a teacher: pass a teacher model or batches with a cached "
                    "teacher (cache_sampler)"
                )
            return None
        with torch.no_grad():
            hidden, logits = hidden_and_logits(teacher, ids, compute_logits=not config.fused)
        if config.fused:
            return hidden.reshape(-1, hidden.shape[-1]), output_weight(teacher).detach()
        return logits

    from divergent.train.run import progress

    step = start_step
    sequences_per_rank = config.batch_size * config.grad_accum
    try:
        with progress(transient=True) as bar:
            task = bar.add_task(description, total=config.steps, completed=start_step, visible=show_progress and rank == 0)
            while step < config.steps:
                began = time.perf_counter()
                global_batch = sample(step, sequences_per_rank * world)
                # On-policy / seq-KD: one draw per step, identical on every rank.
                draw = random.Random(config.seed * 1_000_003 + step).random()
                if draw < config.on_policy_fraction:
                    # Under FSDP the student generates with its gathered (unsharded) weights.
                    gather = FSDP.summon_full_params(wrapped, writeback=False) if fsdp else _null_context()
                    with gather:
                        global_batch = _generated_batch(
                            student, global_batch, config, _step_generator(config.seed, step, 1)
                        )
                elif draw < config.on_policy_fraction + config.seq_kd_fraction:
                    global_batch = _generated_batch(teacher, global_batch, config, _step_generator(config.seed, step, 2))
                local = global_batch.rows(rank * sequences_per_rank, (rank + 1) * sequences_per_rank)
                counted = (local.labels != -100).sum().to(torch.float64)
                if world > 1:
                    dist.all_reduce(counted)
                n_counted = max(float(counted), 1.0)

                for group in optimizer.param_groups:
                    group["lr"] = _learning_rate(config, step)
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for micro_index in range(config.grad_accum):
                    micro = local.rows(micro_index * config.batch_size, (micro_index + 1) * config.batch_size)
                    ids, labels = micro.input_ids.to(device), micro.labels.to(device)
                    sync = micro_index == config.grad_accum - 1 or world == 1
                    context = wrapped.no_sync() if (world > 1 and not sync) else _null_context()
                    with context:
                        hidden, logits = wrapped(ids)
                        teacher_side = teacher_for(micro, ids)
                        if teacher_side is None:
                            loss = _ce_only(hidden, student, labels, n_counted, config, logits=logits)
                        elif config.fused:
                            teacher_input, teacher_weight = teacher_side
                            loss = loss_fn(
                                hidden.reshape(-1, hidden.shape[-1]), output_weight(student),
                                teacher_input, teacher_weight, labels.reshape(-1), normalizer=n_counted,
                            )
                        else:
                            loss = loss_fn(logits, teacher_side, labels, normalizer=n_counted)
                        # DDP averages gradients over ranks; the loss is already a share of the
                        # global sum, so undo the average.
                        (loss * world).backward()
                    step_loss += float(loss.detach())
                if world > 1:
                    step_loss_tensor = torch.tensor(step_loss, dtype=torch.float64)
                    dist.all_reduce(step_loss_tensor)
                    step_loss = float(step_loss_tensor)
                if not math.isfinite(step_loss):
                    raise FloatingPointError(f"non-finite loss {step_loss} at step {step}")
                if config.grad_clip > 0:
                    if fsdp:
                        wrapped.clip_grad_norm_(config.grad_clip)
                    else:
                        nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
                optimizer.step()
                step += 1
                train_seconds += time.perf_counter() - began
                tokens_seen += int(counted)
                if step % config.log_every == 0 or step == config.steps:
                    history.append({"step": step, "loss": step_loss, "lr": _learning_rate(config, step - 1)})
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    save(step)
                bar.advance(task)
    except KeyboardInterrupt:
        save(step)
        raise
    if run_dir is not None and (not config.checkpoint_every or step % config.checkpoint_every):
        save(step)
    return LMTrainResult(
        student=student,
        state_dict=full_states(with_optimizer=False)[0],
        steps_done=step,
        history=history,
        train_seconds=train_seconds,
        tokens_seen=tokens_seen,
        tokens_per_second=tokens_seen / train_seconds if train_seconds > 0 else float("nan"),
        peak_memory_mb=peak_memory_mb(device),
        run_dir=run_dir,
    )


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _ce_only(hidden, student, labels, n_counted, config, logits=None) -> torch.Tensor:
    """hard_weight * sum of token CE / n (no teacher: training from labels only)."""
    if logits is None:
        logits = hidden @ output_weight(student).T
    flat = logits.reshape(-1, logits.shape[-1]).float()
    ce = nn.functional.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="sum")
    return config.hard_weight * ce / n_counted


@torch.no_grad()
def evaluate_lm(
    student: nn.Module,
    teacher: nn.Module | None,
    data: torch.Tensor,
    *,
    seq_len: int,
    batch_size: int = 16,
    max_windows: int | None = 64,
    device: str | torch.device = "cpu",
    tokens_per_byte: float = 1.0,
) -> dict[str, float]:
    """Validation metrics over non-overlapping windows of a token stream.

    ``student_bpb``/``teacher_bpb``: bits per byte = mean token cross-entropy (nats) / ln 2
    x ``tokens_per_byte`` (1 for byte-level models; tokens / UTF-8 bytes of the text otherwise);
    ``kl_teacher_student``: mean over tokens of KL(p_teacher || q_student) at T = 1;
    ``top1_agreement``: fraction of tokens where both models' most likely next token agree.
    """
    from divergent.data.text import sequential_windows

    inputs, labels = sequential_windows(data, seq_len, max_windows)
    sums = {"student_nll": 0.0, "teacher_nll": 0.0, "kl": 0.0, "agree": 0.0}
    count = 0
    was_training = student.training
    student.eval()
    if teacher is not None:
        teacher.eval()
    try:
        for start in range(0, len(inputs), batch_size):
            ids = inputs[start : start + batch_size].to(device)
            target = labels[start : start + batch_size].to(device).reshape(-1)
            _, student_logits = hidden_and_logits(student, ids)
            student_logits = student_logits.reshape(-1, student_logits.shape[-1]).float()
            sums["student_nll"] += float(nn.functional.cross_entropy(student_logits, target, reduction="sum"))
            if teacher is not None:
                _, teacher_logits = hidden_and_logits(teacher, ids)
                teacher_logits = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
                vocab = min(teacher_logits.shape[-1], student_logits.shape[-1])
                sums["teacher_nll"] += float(nn.functional.cross_entropy(teacher_logits, target, reduction="sum"))
                sums["kl"] += float(
                    divergence("forward_kl", student_logits[:, :vocab], teacher_logits[:, :vocab], reduction="sum")
                )
                sums["agree"] += float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum())
            count += target.numel()
    finally:
        student.train(was_training)
    bits = tokens_per_byte / count / math.log(2)
    metrics = {"student_bpb": sums["student_nll"] * bits}
    if teacher is not None:
        metrics.update(
            teacher_bpb=sums["teacher_nll"] * bits,
            kl_teacher_student=sums["kl"] / count,
            top1_agreement=sums["agree"] / count,
        )
    return metrics


