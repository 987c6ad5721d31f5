"""A teacher with another tokenizer: the plumbing of cross-tokenizer distillation.

The student's batches are in the student's tokens. Each step, :func:`teacher_batch`
decodes every row's prompt and answer (the positions whose label is -100 before the
first counted one, then the counted ones) back to text and encodes them with the
teacher's tokenizer, so the teacher reads the same text in its own tokens, its labels
marking the same answer. :class:`CrossTokenizerObjective` then scores the student
against the teacher with the math of :mod:`divergent.functional.cross_tokenizer`
(``"uld"``: Universal Logit Distillation, positions aligned by truncation as TRL's
``ULDLoss`` does; ``"gold"``: GOLD's hybrid loss, positions aligned by the byte offsets of
each answer token in the answer text (:func:`answer_byte_offsets`), the shared vocabulary
compared by the run's divergence, the rest by ULD, as TRL's ``ULDLoss`` with
``use_extended_uld`` and ``uld_use_hybrid_loss``), plus ``hard_weight`` × the cross-entropy
on the student's own labels.
It has :class:`divergent.train.lm.LMObjective`'s call signature, so the LM trainer runs
it unchanged.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from divergent.functional.cross_tokenizer import (
    VocabularyMatch,
    answer_span,
    check_gold_settings,
    gold_sequence_loss,
    uld_sequence_loss,
)

__all__ = ["MODES", "check_mode", "check_settings", "check_trainer_settings", "check_same", "objective", "teacher_batch",
           "answer_byte_offsets", "decoded_byte_offsets", "gold_options", "CrossTokenizerObjective"]

# How the two tokenizations are compared; "" = not at all (one shared tokenizer required).
MODES = ("uld", "gold")
# The settings of "gold" in DistillLMConfig and DistillationConfig, and their defaults.
GOLD_SETTINGS = {"gold_strategy": "observed", "gold_matched_weight": None, "gold_unmatched_weight": None}


def check_mode(mode: Any) -> str:
    """``mode`` if it is "" or one of :data:`MODES`; otherwise a ValueError naming the valid ones."""
    if mode == "" or mode in MODES:
        return mode
    close = difflib.get_close_matches(str(mode).lower(), MODES, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"cross_tokenizer must be one of {', '.join(MODES)} (or empty: one shared tokenizer), "
                     f"got {mode!r}{hint}")


_HINT = ("give --cross-tokenizer uld or gold (cross_tokenizer='uld' or 'gold' in a config or DistillationConfig) "
         "to distil across tokenizers")


def check_settings(config: Any) -> None:
    """What a run with ``config.cross_tokenizer`` set needs (distill-lm's DistillLMConfig); raises naming the setting."""
    mode = config.cross_tokenizer
    if not (config.teacher and config.student) or getattr(config, "teacher_cache", ""):
        raise ValueError(f"cross_tokenizer={mode!r} needs --teacher PATH and --student PATH (local Hugging Face "
                         f"folders, each with its tokenizer); a teacher cache holds the teacher's top-k in its own "
                         f"tokens, which cannot be realigned, and the default teacher shares the student's bytes")
    if len(config.divergences) != 1:
        what = ("with ULD, which replaces the divergence; give no --divergences" if mode == "uld" else
                "that uses one divergence on the shared vocabulary; give one with -d")
        raise ValueError(f"cross_tokenizer={mode!r} trains one distilled student {what}, got {config.divergences}")
    if config.on_policy_fraction + config.seq_kd_fraction > 0:
        raise ValueError(f"cross_tokenizer={mode!r} trains on the data's text only: set on_policy_fraction and "
                         f"seq_kd_fraction to 0")
    gold_options(config)


def check_trainer_settings(args: Any) -> None:
    """What ``DistillationConfig(cross_tokenizer=...)`` needs; raises naming the setting."""
    mode = args.cross_tokenizer
    if args.teacher_cache is not None:
        raise ValueError(f"cross_tokenizer={mode!r} needs the teacher model: a teacher cache holds its top-k in its "
                         f"own tokens, which cannot be realigned; set teacher_cache=None")
    if args.on_policy_fraction + args.seq_kd_fraction > 0:
        raise ValueError(f"cross_tokenizer={mode!r} trains on the data's text only: set on_policy_fraction and "
                         f"seq_kd_fraction to 0")
    gold_options(args)


def gold_options(config: Any) -> dict[str, Any]:
    """The keyword arguments of :class:`CrossTokenizerObjective` for ``"gold"`` from a config (checked); {} otherwise.

    The divergence is the run's: ``config.divergences[0]`` with ``config.divergence_params[name]``
    (DistillLMConfig) or ``config.divergence`` with ``config.divergence_params`` (DistillationConfig).
    With another mode, a ``gold_*`` setting changed from its default is an error.
    """
    values = {name: getattr(config, name, default) for name, default in GOLD_SETTINGS.items()}
    if config.cross_tokenizer != "gold":
        changed = [name for name, default in GOLD_SETTINGS.items() if values[name] != default]
        if changed:
            raise ValueError(f"{', '.join(changed)} set, but cross_tokenizer={config.cross_tokenizer!r}: the gold_* "
                             f"settings belong to cross_tokenizer='gold'")
        return {}
    if hasattr(config, "divergences"):
        divergence = config.divergences[0]
        params = dict((config.divergence_params or {}).get(divergence, {}))
    else:
        divergence, params = config.divergence, dict(config.divergence_params or {})
    check_gold_settings(divergence, params, values["gold_strategy"], values["gold_matched_weight"],
                        values["gold_unmatched_weight"], prefix="gold_")
    return {"divergence": divergence, "divergence_params": params, "strategy": values["gold_strategy"],
            "matched_weight": values["gold_matched_weight"], "unmatched_weight": values["gold_unmatched_weight"]}


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
                                   soft_weight=config.soft_weight, gold=gold_options(config))


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


def answer_byte_offsets(ids: list[int], tokenizer: Any) -> list[tuple[int, int]]:
    """UTF-8 byte ``(start, end)`` of each of ``ids`` in ``tokenizer.decode(ids)``, special tokens zero-width.

    Offsets relative to the answer text, as TRL's ``encode_with_byte_offsets`` gives for the
    completion (TRL 1.16, ``trl/experimental/utils.py``), for the tokens the model actually
    read. A byte-level BPE (Llama 3, Qwen, GPT-2, ...) counts one byte per character of each
    token's piece (as TRL does), checked against the decoded text's length; any other
    tokenizer, or a mismatch, takes :func:`decoded_byte_offsets`.
    """
    lengths = _byte_level_lengths(ids, tokenizer)
    if lengths is None:
        return decoded_byte_offsets(ids, tokenizer)
    offsets, end = [], 0
    for length in lengths:
        offsets.append((end, end + length))
        end += length
    return offsets


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(backend.decoder)


def _byte_level_lengths(ids: list[int], tokenizer: Any) -> list[int] | None:
    """Bytes per token of a byte-level BPE, or None (not byte-level, an added non-special token, or no match)."""
    if not _is_byte_level(tokenizer):
        return None
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.get_added_vocab().values()) - special
    if any(i in added for i in ids):
        return None
    lengths = [0 if i in special else len(piece) for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids))]
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return lengths if sum(lengths) == len(text.encode("utf-8")) else None


def decoded_byte_offsets(ids: list[int], tokenizer: Any) -> list[tuple[int, int]]:
    """:func:`answer_byte_offsets` for any tokenizer that decodes, from the decoded prefixes (quadratic in len(ids)).

    Token k ends where the decoded prefix ``ids[:k + 1]`` ends and starts where token k - 1
    ends. A prefix that stops inside a multi-byte character (it decodes to U+FFFD) ends one
    byte per character of the token's piece later for a byte-level BPE, else where its
    complete characters end.
    """
    byte_level = _is_byte_level(tokenizer)
    offsets, end = [], 0
    for k in range(len(ids)):
        text = tokenizer.decode(ids[:k + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        start = end
        if byte_level and text.endswith("\ufffd"):
            end += len(tokenizer.convert_ids_to_tokens(ids[k]))
        else:
            end = max(end, len(text.rstrip("\ufffd").encode("utf-8")))
        offsets.append((start, end))
    return offsets


def _offsets(ids: torch.Tensor, labels: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """``[B, L, 2]`` byte offsets of each row's answer span (:func:`answer_byte_offsets`), (0, 0) elsewhere."""
    out = torch.zeros((*ids.shape, 2), dtype=torch.long)
    for b in range(ids.shape[0]):
        start, size = answer_span(labels[b])
        if size:
            answer = ids[b, start:start + size].tolist()
            out[b, start:start + size] = torch.tensor(answer_byte_offsets(answer, tokenizer))
    return out.to(ids.device)


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    output = model(input_ids=input_ids, attention_mask=attention_mask)
    return output.logits if hasattr(output, "logits") else output


class CrossTokenizerObjective:
    """hard_weight · CE(student, labels) + soft_weight · ULD or GOLD(student, teacher in its tokens), per counted token.

    Called as ``objective(model, student, batch, teacher=teacher, normalizer=n)`` like
    :class:`divergent.train.lm.LMObjective`: the cross-entropy is summed over the counted
    tokens, the ULD over the aligned answer positions (``uld_sequence_loss(...,
    reduction="sum")``), both divided by ``n`` (the step's counted tokens), so gradient
    accumulation gives the same step as one large batch. No T² factor (ULD is an L1
    distance, not a KL); the temperature divides both models' logits. ``"gold"``:
    ``gold_sequence_loss(..., reduction="sum")`` (the sum over aligned groups) instead, with
    ``gold`` its settings (:func:`gold_options`: divergence, divergence_params, strategy,
    matched_weight, unmatched_weight).
    """

    def __init__(self, mode: str, student_tokenizer: Any, teacher_tokenizer: Any, *, temperature: float = 1.0,
                 hard_weight: float = 0.0, soft_weight: float = 1.0, gold: dict[str, Any] | None = None) -> None:
        if check_mode(mode) == "":
            raise ValueError("CrossTokenizerObjective needs a mode: one of " + ", ".join(MODES))
        if student_tokenizer is None or teacher_tokenizer is None:
            raise ValueError("cross-tokenizer distillation needs both tokenizers (the student's and the teacher's); "
                             "a byte-level model without a tokenizer is not supported here")
        self.mode = mode
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.temperature = float(temperature)
        self.hard_weight, self.soft_weight = float(hard_weight), float(soft_weight)
        if gold and mode != "gold":
            raise ValueError(f"CrossTokenizerObjective: gold={gold!r} holds the settings of mode 'gold', "
                             f"got mode {mode!r}")
        self.gold = dict(gold or {})
        unknown = sorted(set(self.gold) - {"divergence", "divergence_params", "strategy", "matched_weight",
                                           "unmatched_weight"})
        if unknown:
            raise ValueError(f"CrossTokenizerObjective: gold has unknown settings {unknown}; it takes divergence, "
                             f"divergence_params, strategy, matched_weight, unmatched_weight")
        if mode == "gold":
            check_gold_settings(self.gold.get("divergence", "js"), self.gold.get("divergence_params"),
                                self.gold.get("strategy", "observed"), self.gold.get("matched_weight"),
                                self.gold.get("unmatched_weight"))
            self.match = VocabularyMatch.from_tokenizers(student_tokenizer, teacher_tokenizer)

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
            t_ids, t_mask, t_labels, teacher_logits = self.teacher_side(teacher, batch)
            if self.mode == "gold":
                soft = gold_sequence_loss(
                    student_logits, teacher_logits, batch.labels, t_labels, batch.input_ids, t_ids,
                    _offsets(batch.input_ids, batch.labels, self.student_tokenizer),
                    _offsets(t_ids, t_labels, self.teacher_tokenizer), self.match, student_temperature=self.temperature,
                    teacher_temperature=self.temperature, reduction="sum", **self.gold)
            else:
                soft = uld_sequence_loss(student_logits, teacher_logits, batch.labels, t_labels,
                                         student_temperature=self.temperature, teacher_temperature=self.temperature,
                                         reduction="sum")
            loss = loss + self.soft_weight * soft / n
        return loss

    def teacher_side(self, teacher: nn.Module, batch: Any) -> tuple[torch.Tensor, ...]:
        """``(t_ids, t_mask, t_labels, teacher_logits)``: the batch in the teacher's tokens and its logits.

        ``teacher_logits`` is dense, ``[B, Lt, Vt]``. The one place the teacher is read: another
        kind of teacher (cached, served) gives the same four.
        """
        t_ids, t_mask, t_labels = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels,
                                                self.student_tokenizer, self.teacher_tokenizer)
        with torch.no_grad():
            teacher_logits = _logits(teacher, t_ids, t_mask)
        return t_ids, t_mask, t_labels, teacher_logits
