"""A teacher with another tokenizer: the plumbing of cross-tokenizer distillation.

The student's batches are in the student's tokens. Each step, :func:`teacher_batch`
decodes every row's prompt and answer (the positions whose label is -100 before the
first counted one, then the counted ones) back to text and encodes them with the
teacher's tokenizer, so the teacher reads the same text in its own tokens, its labels
marking the same answer. :class:`CrossTokenizerObjective` then scores the student
against the teacher with the math of :mod:`divergent.functional.cross_tokenizer`
(``"uld"``: Universal Logit Distillation, positions aligned by truncation as TRL's
``ULDLoss`` does), plus ``hard_weight`` × the cross-entropy on the student's own labels.
It has :class:`divergent.train.lm.LMObjective`'s call signature, so the LM trainer runs
it unchanged.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from divergent.functional.cross_tokenizer import answer_span, uld_sequence_loss

__all__ = ["MODES", "check_mode", "check_settings", "check_trainer_settings", "check_same", "objective", "teacher_batch",
           "CrossTokenizerObjective"]

# How the two tokenizations are compared; "" = not at all (one shared tokenizer required).
MODES = ("uld",)


def check_mode(mode: Any) -> str:
    """``mode`` if it is "" or one of :data:`MODES`; otherwise a ValueError naming the valid ones."""
    if mode == "" or mode in MODES:
        return mode
    close = difflib.get_close_matches(str(mode).lower(), MODES, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"cross_tokenizer must be one of {', '.join(MODES)} (or empty: one shared tokenizer), "
                     f"got {mode!r}{hint}")


_HINT = ("give --cross-tokenizer uld (cross_tokenizer='uld' in a config or DistillationConfig) to distil "
         "across tokenizers")


def check_settings(config: Any) -> None:
    """What a run with ``config.cross_tokenizer`` set needs (distill-lm's DistillLMConfig); raises naming the setting."""
    mode = config.cross_tokenizer
    if not (config.teacher and config.student) or getattr(config, "teacher_cache", ""):
        raise ValueError(f"cross_tokenizer={mode!r} needs --teacher PATH and --student PATH (local Hugging Face "
                         f"folders, each with its tokenizer); a teacher cache holds the teacher's top-k in its own "
                         f"tokens, which cannot be realigned, and the default teacher shares the student's bytes")
    if len(config.divergences) != 1:
        raise ValueError(f"cross_tokenizer={mode!r} trains one distilled student with ULD, which replaces the "
                         f"divergence; give no --divergences, got {config.divergences}")
    if config.on_policy_fraction + config.seq_kd_fraction > 0:
        raise ValueError(f"cross_tokenizer={mode!r} trains on the data's text only: set on_policy_fraction and "
                         f"seq_kd_fraction to 0")


def check_trainer_settings(args: Any) -> None:
    """What ``DistillationConfig(cross_tokenizer=...)`` needs; raises naming the setting."""
    mode = args.cross_tokenizer
    if args.teacher_cache is not None:
        raise ValueError(f"cross_tokenizer={mode!r} needs the teacher model: a teacher cache holds its top-k in its "
                         f"own tokens, which cannot be realigned; set teacher_cache=None")
    if args.on_policy_fraction + args.seq_kd_fraction > 0:
        raise ValueError(f"cross_tokenizer={mode!r} trains on the data's text only: set on_policy_fraction and "
                         f"seq_kd_fraction to 0")


def check_same(student_tokenizer: Any, teacher_tokenizer: Any, check_same_tokenizer, is_byte_tokenizer=None) -> None:
    """The check without ``cross_tokenizer``: one shared tokenizer, else an error that says how to go on."""
    if is_byte_tokenizer is not None and is_byte_tokenizer(student_tokenizer) != is_byte_tokenizer(teacher_tokenizer):
        raise ValueError("one of --teacher/--student is byte-level and the other has a tokenizer: they do not share "
                         "one vocabulary; save a tokenizer beside the byte-level model and " + _HINT)
    try:
        check_same_tokenizer(student_tokenizer, teacher_tokenizer)
    except ValueError as exc:
        message = str(exc).replace("cross-tokenizer distillation is not supported yet.", _HINT + ".")
        raise ValueError(message if _HINT in message else f"{message}; {_HINT}") from None


def objective(config: Any, student_tokenizer: Any, teacher_tokenizer: Any) -> CrossTokenizerObjective:
    """The objective of a distilled row of ``config`` (its temperature and weights)."""
    return CrossTokenizerObjective(config.cross_tokenizer, student_tokenizer, teacher_tokenizer,
                                   temperature=config.temperature, hard_weight=config.hard_weight,
                                   soft_weight=config.soft_weight)


def teacher_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                  student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's rows re-tokenized by the teacher: ``(input_ids, attention_mask, labels)``, right-padded.

    Row b's prompt (tokens before its first counted label) and answer (the counted tokens)
    are decoded separately (special tokens dropped) and encoded with ``teacher_tokenizer``
    (no special tokens added); an answer that ends with the student's EOS gets the
    teacher's EOS. The teacher's labels are -100 on the prompt and the answer's ids on it.
    """
    rows, answers = [], []
    student_eos = getattr(student_tokenizer, "eos_token_id", None)
    teacher_eos = getattr(teacher_tokenizer, "eos_token_id", None)
    for b in range(input_ids.shape[0]):
        real = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
        start, size = answer_span(labels[b][: real.shape[0]])
        ids = real.tolist()
        prompt_text = student_tokenizer.decode(ids[:start], skip_special_tokens=True)
        answer_ids = ids[start:start + size]
        answer_text = student_tokenizer.decode(answer_ids, skip_special_tokens=True)
        prompt = teacher_tokenizer(prompt_text, add_special_tokens=False)["input_ids"] if prompt_text else []
        answer = teacher_tokenizer(answer_text, add_special_tokens=False)["input_ids"] if answer_text else []
        if answer_ids and student_eos is not None and answer_ids[-1] == student_eos and teacher_eos is not None:
            answer = answer + [teacher_eos]
        rows.append(prompt + answer)
        answers.append((len(prompt), len(answer)))
    width = max(1, max(len(r) for r in rows))
    pad = getattr(teacher_tokenizer, "pad_token_id", None) or 0  # any valid id: the mask hides it
    out_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    out_mask = torch.zeros((len(rows), width), dtype=torch.long)
    out_labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, (row, (prompt_len, answer_len)) in enumerate(zip(rows, answers)):
        out_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        out_mask[b, : len(row)] = 1
        out_labels[b, prompt_len:prompt_len + answer_len] = out_ids[b, prompt_len:prompt_len + answer_len]
    device = input_ids.device
    return out_ids.to(device), out_mask.to(device), out_labels.to(device)


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    output = model(input_ids=input_ids, attention_mask=attention_mask)
    return output.logits if hasattr(output, "logits") else output


class CrossTokenizerObjective:
    """hard_weight · CE(student, labels) + soft_weight · ULD(student, teacher in its own tokens), per counted token.

    Called as ``objective(model, student, batch, teacher=teacher, normalizer=n)`` like
    :class:`divergent.train.lm.LMObjective`: the cross-entropy is summed over the counted
    tokens, the ULD over the aligned answer positions (``uld_sequence_loss(...,
    reduction="sum")``), both divided by ``n`` (the step's counted tokens), so gradient
    accumulation gives the same step as one large batch. No T² factor (ULD is an L1
    distance, not a KL); the temperature divides both models' logits.
    """

    def __init__(self, mode: str, student_tokenizer: Any, teacher_tokenizer: Any, *, temperature: float = 1.0,
                 hard_weight: float = 0.0, soft_weight: float = 1.0) -> None:
        if check_mode(mode) == "":
            raise ValueError("CrossTokenizerObjective needs a mode: one of " + ", ".join(MODES))
        if student_tokenizer is None or teacher_tokenizer is None:
            raise ValueError("cross-tokenizer distillation needs both tokenizers (the student's and the teacher's); "
                             "a byte-level model without a tokenizer is not supported here")
        self.mode = mode
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.temperature = float(temperature)
        self.hard_weight, self.soft_weight = float(hard_weight), float(soft_weight)

    @property
    def needs_teacher(self) -> bool:
        return self.soft_weight > 0

    def __call__(self, model: nn.Module, student: nn.Module, batch: Any, *, teacher: nn.Module | None = None,
                 normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
        counted = int((batch.labels[:, 1:] != -100).sum())
        n = float(normalizer) if normalizer is not None else float(max(counted, 1))
        student_logits = _logits(model, batch.input_ids, batch.attention_mask)
        loss = student_logits.new_zeros((), dtype=torch.float32)
        if self.hard_weight > 0:
            loss = loss + self.hard_weight * nn.functional.cross_entropy(
                student_logits[:, :-1].reshape(-1, student_logits.shape[-1]).float(), batch.labels[:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum") / n
        if self.needs_teacher:
            if teacher is None:
                raise ValueError(f"soft_weight={self.soft_weight} needs a teacher model for cross-tokenizer "
                                 f"distillation (a teacher cache holds the teacher's tokens, not the text)")
            t_ids, t_mask, t_labels = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels,
                                                    self.student_tokenizer, self.teacher_tokenizer)
            with torch.no_grad():
                teacher_logits = _logits(teacher, t_ids, t_mask)
            uld = uld_sequence_loss(student_logits, teacher_logits, batch.labels, t_labels,
                                    student_temperature=self.temperature, teacher_temperature=self.temperature,
                                    reduction="sum")
            loss = loss + self.soft_weight * uld / n
        return loss
