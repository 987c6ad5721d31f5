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

The teacher may be local (a model: its logits), served (a
:class:`divergent.models.served.ServedTeacher`: each step's re-tokenized rows are sent to the
server for their top-k log-probs) or cached (``cache-teacher`` in the teacher's tokens: the
rows come from the cache and are re-tokenized for the student by :func:`student_rows`, the
batch carrying the teacher's tokens and top-k as ``Batch.teacher_rows``). A top-k teacher is
made dense over its vocabulary by :func:`divergent.functional.topk.topk_to_dense_logprobs`
(the tail mass spread uniformly; exact at k = V). :meth:`CrossTokenizerObjective.teacher_side`
is the one place that tells these apart.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from divergent.functional.cross_tokenizer import (
    VocabularyMatch,
    answer_spans,
    check_gold_settings,
    gold_sequence_loss,
    uld_sequence_loss,
)
from divergent.functional.topk import TopK, topk_to_dense_logprobs

__all__ = ["MODES", "check_mode", "check_settings", "check_trainer_settings", "check_same", "objective", "teacher_batch",
           "answer_byte_offsets", "decoded_byte_offsets", "gold_options", "student_rows", "cache_tokenizer", "TOKENIZER_DIR",
           "CrossTokenizerObjective"]

# Where cache-teacher saves the teacher's tokenizer in a cache folder (to read its rows as text).
TOKENIZER_DIR = "teacher-tokenizer"

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
    from divergent.models.served import is_served

    mode = config.cross_tokenizer
    if not config.student or not (config.teacher or getattr(config, "teacher_cache", "")):
        raise ValueError(f"cross_tokenizer={mode!r} needs --student PATH and a teacher with its own tokenizer: "
                         f"--teacher PATH (a local folder with its tokenizer), --teacher http://HOST:PORT/v1 with "
                         f"--teacher-tokenizer PATH, or --teacher-cache DIR; the default teacher shares the "
                         f"student's bytes")
    if is_served(config.teacher) and not config.teacher_tokenizer:
        raise ValueError(f"cross_tokenizer={mode!r} with a served teacher needs --teacher-tokenizer PATH: a local copy "
                         f"of the served model's tokenizer (the student's is another one)")
    if len(config.divergences) != 1:
        what = ("with ULD, which replaces the divergence; give no --divergences" if mode == "uld" else
                "that uses one divergence on the shared vocabulary; give one with -d")
        raise ValueError(f"cross_tokenizer={mode!r} trains one distilled student {what}, got {config.divergences}")
    _check_generation(mode, config)
    if config.on_policy_fraction > 0 and (is_served(config.teacher) or not config.teacher):
        raise ValueError(f"cross_tokenizer={mode!r} with on_policy_fraction={config.on_policy_fraction} needs a local "
                         f"--teacher PATH to score the student's generated text (a served teacher is cached before "
                         f"training and a cache holds its own rows only); give one, or set on_policy_fraction to 0")
    gold_options(config)


def _check_generation(mode: str, config: Any) -> None:
    if config.seq_kd_fraction > 0:
        raise ValueError(f"cross_tokenizer={mode!r} cannot train on the teacher's generations (seq_kd_fraction="
                         f"{config.seq_kd_fraction}): they are in its own tokens; set seq_kd_fraction to 0 "
                         f"(on_policy_fraction, the student's generations, works)")


def check_trainer_settings(args: Any) -> None:
    """What ``DistillationConfig(cross_tokenizer=...)`` needs; raises naming the setting."""
    _check_generation(args.cross_tokenizer, args)
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


def objective(config: Any, student_tokenizer: Any, teacher_tokenizer: Any, *, served: Any = None) -> CrossTokenizerObjective:
    """The objective of a distilled row of ``config`` (its temperature and weights; with ``served``, its top-k)."""
    return CrossTokenizerObjective(config.cross_tokenizer, student_tokenizer, teacher_tokenizer,
                                   temperature=config.temperature, hard_weight=config.hard_weight,
                                   soft_weight=config.soft_weight, gold=gold_options(config), served=served,
                                   top_k=getattr(config, "teacher_top_k", 20))


def cache_tokenizer(cache: Any, given: Any = "") -> Any:
    """The tokenizer a teacher cache was written with: ``given`` (a path or tokenizer), else the cache's own copy.

    Either is checked against the fingerprint in the cache's index; a difference is a
    ValueError naming both.
    """
    from divergent.models.hf import load_tokenizer, tokenizer_fingerprint

    where = cache.directory / TOKENIZER_DIR
    if cache.tokenizer in ("", "bytes"):
        raise ValueError(f"the teacher cache {cache.directory} was written by a byte-level teacher; cross-tokenizer "
                         f"distillation needs the teacher's tokenizer (write the cache from a model with one)")
    if given is None or given == "":
        if not where.is_dir():
            raise ValueError(f"the teacher cache {cache.directory} holds no copy of its tokenizer ({where}); give "
                             f"--teacher-tokenizer PATH (the tokenizer it was written with)")
        given, what = str(where), f"the teacher cache's {TOKENIZER_DIR}"
    else:
        what = "--teacher-tokenizer"
    tokenizer = load_tokenizer(given, what) if isinstance(given, str) or hasattr(given, "__fspath__") else given
    if tokenizer is None:
        raise ValueError(f"{what} {given} holds no tokenizer (tokenizer.json / tokenizer_config.json)")
    if tokenizer_fingerprint(tokenizer) != cache.tokenizer:
        raise ValueError(f"the teacher cache {cache.directory} was written with another tokenizer than {what} "
                         f"{given if isinstance(given, str) else type(given).__name__}: its token ids would be read as "
                         f"other strings; give the tokenizer the cache was written with")
    return tokenizer


def student_rows(examples: list[dict[str, Any]], teacher_tokenizer: Any, student_tokenizer: Any) -> list[dict[str, Any]]:
    """A teacher cache's rows (the teacher's tokens and top-k) as the student's examples.

    Each row is re-tokenized the other way round from :func:`teacher_batch` (prompt and answer
    decoded by the teacher's tokenizer, encoded by the student's, the answer's EOS kept); the
    teacher's tokens, labels and cached top-k ride along as ``teacher_row`` (collated into
    ``Batch.teacher_rows``). Rows with nothing left in the student's tokens are dropped.
    """
    out = []
    for example in examples:
        ids = torch.tensor([example["input_ids"]])
        s_ids, s_mask, s_labels = teacher_batch(ids, None, torch.tensor([example["labels"]]), teacher_tokenizer,
                                                student_tokenizer)
        n = int(s_mask.sum())
        if n == 0:
            continue
        out.append({"input_ids": s_ids[0, :n].tolist(), "labels": s_labels[0, :n].tolist(),
                    "teacher_row": {key: example[key] for key in
                                    ("input_ids", "labels", "teacher_indices", "teacher_logprobs")}})
    return out


def teacher_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                  student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's rows re-tokenized by the teacher: ``(input_ids, attention_mask, labels)``, right-padded.

    Each row is cut into runs of uncounted tokens (prompt, a user turn) and counted ones (an
    answer, an assistant turn; :func:`~divergent.functional.cross_tokenizer.answer_spans`);
    each run is decoded on its own and encoded with ``teacher_tokenizer`` (no special tokens
    added). An answer is decoded without special tokens, and one that ends with the student's
    EOS gets the teacher's EOS; the runs between answers keep their special tokens as text (a
    chat template's role and end-of-turn markers, which the teacher's tokenizer maps to its
    own special tokens where it has the same strings, as TRL's GOLD has the teacher read the
    student's rendered template), except the student's BOS and padding; a row that starts
    with the student's BOS starts with the teacher's. The teacher's labels are -100 on the uncounted
    runs and the ids on the answers, so both sides mark the same answers in the same order.
    """
    rows, counted_runs = [], []
    student_eos = getattr(student_tokenizer, "eos_token_id", None)
    teacher_eos = getattr(teacher_tokenizer, "eos_token_id", None)
    student_bos = getattr(student_tokenizer, "bos_token_id", None)
    teacher_bos = getattr(teacher_tokenizer, "bos_token_id", None)
    # Markup between the answers (a chat template's role and end-of-turn tokens) is kept as text, as
    # TRL's GOLD does (the teacher reads the student's rendered template); the row's own BOS and padding are not.
    dropped = {student_bos, getattr(student_tokenizer, "pad_token_id", None)} - {None}
    for b in range(input_ids.shape[0]):
        real = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
        ids = real.tolist()
        bounds, position = [], 0
        for start, size in answer_spans(labels[b][: real.shape[0]]):
            bounds += [(position, start, False), (start, start + size, True)]
            position = start + size
        bounds.append((position, len(ids), False))
        row, runs = [], []
        if ids and student_bos is not None and ids[0] == student_bos and teacher_bos is not None:
            row.append(teacher_bos)
        for start, end, counted in bounds:
            if counted:
                text = student_tokenizer.decode(ids[start:end], skip_special_tokens=True)
            else:
                kept = [i for i in ids[start:end] if i not in dropped]
                text = student_tokenizer.decode(kept, skip_special_tokens=False) if kept else ""
            encoded = teacher_tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if counted and student_eos is not None and teacher_eos is not None and ids[end - 1] == student_eos:
                encoded = encoded + [teacher_eos]
            if counted and encoded:
                runs.append((len(row), len(encoded)))
            row += encoded
        rows.append(row)
        counted_runs.append(runs)
    width = max(1, max(len(r) for r in rows))
    pad = getattr(teacher_tokenizer, "pad_token_id", None) or 0  # any valid id: the mask hides it
    out_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    out_mask = torch.zeros((len(rows), width), dtype=torch.long)
    out_labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, (row, runs) in enumerate(zip(rows, counted_runs)):
        out_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        out_mask[b, : len(row)] = 1
        for start, size in runs:
            out_labels[b, start:start + size] = out_ids[b, start:start + size]
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
    """``[B, L, 2]`` byte offsets of each answer span in its own text (:func:`answer_byte_offsets`), (0, 0) elsewhere."""
    out = torch.zeros((*ids.shape, 2), dtype=torch.long)
    for b in range(ids.shape[0]):
        for start, size in answer_spans(labels[b]):
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
    distance, not a KL); the temperature divides both models' logits (for a top-k teacher:
    its densified log-probs, tempered as logits). ``"gold"``:
    ``gold_sequence_loss(..., reduction="sum")`` (the sum over aligned groups) instead, with
    ``gold`` its settings (:func:`gold_options`: divergence, divergence_params, strategy,
    matched_weight, unmatched_weight).

    ``served``: a :class:`divergent.models.served.ServedTeacher` asked for ``top_k`` log-probs
    of each step's re-tokenized rows (no teacher model then). ``teacher_vocab_size``: the
    vocabulary a served or cached top-k is densified over (default: the teacher tokenizer's size).
    """

    def __init__(self, mode: str, student_tokenizer: Any, teacher_tokenizer: Any, *, temperature: float = 1.0,
                 hard_weight: float = 0.0, soft_weight: float = 1.0, gold: dict[str, Any] | None = None,
                 served: Any = None, top_k: int = 20, teacher_vocab_size: int | None = None) -> None:
        if check_mode(mode) == "":
            raise ValueError("CrossTokenizerObjective needs a mode: one of " + ", ".join(MODES))
        if student_tokenizer is None or teacher_tokenizer is None:
            raise ValueError("cross-tokenizer distillation needs both tokenizers (the student's and the teacher's); "
                             "a byte-level model without a tokenizer is not supported here")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int (log-probs per token asked of a served teacher), got {top_k!r}")
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
        self.served = served
        self.teacher_vocab_size = int(teacher_vocab_size or len(teacher_tokenizer))
        self.top_k = min(top_k, self.teacher_vocab_size)

    @property
    def needs_teacher(self) -> bool:
        return self.soft_weight > 0

    def teacher_side(self, batch: Any, teacher: nn.Module | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch as the teacher sees it: ``(t_ids, t_mask, t_labels, teacher_logits [B, Lt, Vt])``.

        Local ``teacher``: the rows re-tokenized (:func:`teacher_batch`) and its logits. Served
        (``self.served``): the same rows, the server's top-k densified. Cached
        (``batch.teacher_rows``): the cache's tokens and its top-k densified. The dense top-k
        are log-probs (a softmax of them gives the densified distribution back), no gradient.
        """
        rows = getattr(batch, "teacher_rows", None)
        if rows is not None:
            t_ids, t_mask, t_labels = rows["input_ids"], rows["attention_mask"], rows["labels"]
            top = TopK(rows["teacher_indices"], rows["teacher_logprobs"])
            return t_ids, t_mask, t_labels, topk_to_dense_logprobs(top, self.teacher_vocab_size).to(t_ids.device)
        t_ids, t_mask, t_labels = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels,
                                                self.student_tokenizer, self.teacher_tokenizer)
        if self.served is not None:
            indices, logprobs, _ = self.served.served_topk(t_ids.cpu(), t_mask.cpu(), k=self.top_k,
                                                           vocab_size=self.teacher_vocab_size)
            dense = topk_to_dense_logprobs(TopK(indices, logprobs), self.teacher_vocab_size)
            return t_ids, t_mask, t_labels, dense.to(t_ids.device)
        if teacher is None:
            raise ValueError(f"soft_weight={self.soft_weight} needs a teacher for cross-tokenizer distillation: "
                             f"a teacher model, a served teacher or a teacher cache in the teacher's tokens")
        with torch.no_grad():
            return t_ids, t_mask, t_labels, _logits(teacher, t_ids, t_mask)

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
            t_ids, t_mask, t_labels, teacher_logits = self.teacher_side(batch, teacher)
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
