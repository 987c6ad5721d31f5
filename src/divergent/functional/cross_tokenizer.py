"""Distillation between models with different tokenizers: Universal Logit Distillation (ULD).

The student's and the teacher's vocabularies index different strings, so no divergence
of the registry applies token by token. ULD (Boizard et al. 2024, "Towards Cross-Tokenizer
Distillation: the Universal Logit Distillation Loss for LLMs") compares the two
distributions up to a relabelling of the classes: sort each row's probabilities in
descending order, pad the shorter vocabulary with zeros, and take the L1 distance

    ULD(p, q) = Σ_i | q_(i) − p_(i) |,   q_(1) ≥ q_(2) ≥ …,  p_(1) ≥ p_(2) ≥ …

(the closed-form Wasserstein-1 distance between the two sorted distributions with a
uniform cost). Positions are aligned by truncation: the i-th answer token of the
student's tokenization against the i-th of the teacher's, over the shorter of the two,
as TRL's ``ULDLoss`` (``trl/experimental/gold/gold_trainer.py``) computes it with
``use_extended_uld=False``.

GOLD (TRL's ``ULDLoss`` with ``use_extended_uld=True`` and ``uld_use_hybrid_loss=True``, TRL
1.16, ``trl/experimental/gold/gold_trainer.py``) aligns the two answers by their text instead
(:func:`byte_offset_groups`: runs of tokens that end on a byte boundary both tokenizers
share), merges each run into one unnormalised distribution (:func:`merge_groups`: the
chain rule with the observed tokens' probabilities), and splits each vocabulary in two
(:class:`VocabularyMatch`): token strings present in both vocabularies are compared
entry by entry with an f-divergence on the unnormalised vectors, ``Σ_j t_j f(s_j / t_j)``
(TRL's ``generalized_jsd_loss(..., logits_are_probs=True)``; here any divergence of
:data:`divergent.functional.generators.MEASURE_DIVERGENCES`), the rest by the sorted L1
of ULD. :func:`gold_sequence_loss` puts them together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from divergent.functional import _validation as v
from divergent.functional.generators import MEASURE_DIVERGENCES, check_f_divergence, registry_f

__all__ = ["uld_distance", "uld_sequence_loss", "answer_spans", "VocabularyMatch", "byte_offset_groups", "merge_groups",
           "gold_sequence_loss", "check_gold_settings", "MERGE_STRATEGIES", "MEASURE_DIVERGENCES"]

# How a run of several tokens becomes one distribution (merge_groups).
MERGE_STRATEGIES = ("observed", "bayesian")
# TRL's floor on every probability that is multiplied in or taken the log of.
_EPS = 1e-8


def uld_distance(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """ULD between rows of two vocabularies: Σ_i |sort↓(q)_i − sort↓(p)_i|, the shorter padded with 0.

    Args:
        student_logits: ``[..., Vs]`` student logits (q = softmax(student / student_temperature)).
        teacher_logits: ``[..., Vt]`` teacher logits (p = softmax(teacher / teacher_temperature));
            the leading dimensions are the student's, the vocabulary sizes may differ.
        mask, reduction, normalizer: as in :func:`divergent.divergence`.

    Returns:
        float32 (float64 for float64 input) per-row values or their reduction; between 0 and 2.

    >>> import torch
    >>> from divergent.functional.cross_tokenizer import uld_distance
    >>> s = torch.tensor([[0.0, 1.0, 2.0]]); t = torch.tensor([[2.0, 1.0, 0.0, -2.0]])
    >>> round(uld_distance(s, t).item(), 4)  # the same logits, reordered, plus one teacher class
    0.0241
    """
    student_logits = v.check_logits(student_logits, "student_logits")
    teacher_logits = v.check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student_logits and teacher_logits must have the same leading dimensions (one row per aligned "
            f"position; the vocabularies may differ), got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    student_temperature = _temperature(student_temperature, "student_temperature")
    teacher_temperature = _temperature(teacher_temperature, "teacher_temperature")
    reduction = v.check_reduction(reduction)
    normalizer = v.check_normalizer(normalizer)
    batch_shape = student_logits.shape[:-1]
    mask = v.check_mask(mask, batch_shape, student_logits.device)
    dtype = v.compute_dtype(student_logits, teacher_logits)
    student_rows = student_logits.reshape(-1, student_logits.shape[-1]) if mask is None else student_logits[mask]
    teacher_rows = teacher_logits.reshape(-1, teacher_logits.shape[-1]) if mask is None else teacher_logits[mask]
    q = torch.softmax(student_rows.to(dtype) / student_temperature, dim=-1)
    p = torch.softmax(teacher_rows.to(dtype) / teacher_temperature, dim=-1)
    rows = _sorted_l1(q, p)
    if torch.isnan(rows).any():
        raise ValueError("uld_distance: NaN in the result; student_logits or teacher_logits hold NaN or rows of -inf only")
    return v.reduce_rows(rows, mask, batch_shape, reduction, normalizer)


def _sorted_l1(q: Tensor, p: Tensor) -> Tensor:
    """Σ_i |q_(i) − p_(i)| per row of two probability tensors ``[n, Vs]``, ``[n, Vt]``, sorted descending."""
    q_sorted = q.sort(dim=-1, descending=True).values
    p_sorted = p.sort(dim=-1, descending=True).values
    width = max(q_sorted.shape[-1], p_sorted.shape[-1])
    q_sorted = F.pad(q_sorted, (0, width - q_sorted.shape[-1]))
    p_sorted = F.pad(p_sorted, (0, width - p_sorted.shape[-1]))
    return (q_sorted - p_sorted).abs().sum(-1)


def _temperature(value: object, argument: str) -> float:
    try:
        return v.check_temperature(value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("temperature", argument, 1)) from None


def answer_spans(labels: Tensor, ignore_index: int = -100) -> list[tuple[int, int]]:
    """``(start, size)`` of each maximal run of counted positions of one row of labels, in order.

    One run for a prompt/completion row; one per assistant turn for a conversation. Empty
    when nothing counts.

    >>> import torch
    >>> answer_spans(torch.tensor([-100, 5, 6, -100, -100, 7, -100]))
    [(1, 2), (5, 1)]
    """
    counted = labels.ne(ignore_index).tolist()
    spans, start = [], None
    for position, flag in enumerate([*counted, False]):
        if flag and start is None:
            start = position
        elif not flag and start is not None:
            spans.append((start, position - start))
            start = None
    return spans


def _span_pairs(student_labels: Tensor, teacher_labels: Tensor, row: int,
                ignore_index: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The answer spans of row ``row`` on both sides, paired in order (none when either side has none).

    A row with several answers (a conversation's assistant turns) is compared answer by
    answer; the two sides must mark the same number of answers.
    """
    student, teacher = answer_spans(student_labels, ignore_index), answer_spans(teacher_labels, ignore_index)
    if not student or not teacher:
        return []
    if len(student) != len(teacher):
        raise ValueError(f"row {row}: the student's labels mark {len(student)} answer span(s) and the teacher's "
                         f"{len(teacher)}; both tokenizations must mark the same answers (re-tokenize the teacher's "
                         f"rows with divergent.train.cross_tokenizer.teacher_batch)")
    return list(zip(student, teacher))


def _check_sequences(student_logits: Tensor, teacher_logits: Tensor, **per_position) -> tuple[Tensor, Tensor]:
    """Checked ``[B, L, V]`` logits of both sides; each ``per_position`` pair (student's, teacher's) ``[B, L]``."""
    student_logits = v.check_logits(student_logits, "student_logits")
    teacher_logits = v.check_logits(teacher_logits, "teacher_logits")
    for side, (name, logits) in enumerate((("student", student_logits), ("teacher", teacher_logits))):
        if logits.ndim != 3:
            raise ValueError(f"{name}_logits must be [batch, length, vocab], got shape {tuple(logits.shape)}")
        for what, pair in per_position.items():
            x = pair[side]
            if not isinstance(x, Tensor) or x.shape != logits.shape[:2]:
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{name}_{what} must be a tensor of shape {tuple(logits.shape[:2])} (the logits' "
                                 f"batch and length), got {got}")
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student_logits and teacher_logits must hold the same sequences, got batch sizes "
                         f"{student_logits.shape[0]} and {teacher_logits.shape[0]}")
    return student_logits, teacher_logits


def uld_sequence_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_labels: Tensor,
    teacher_labels: Tensor,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    skip_student_eos: bool = True,
    skip_teacher_eos: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """ULD over a batch of sequences in two tokenizations, positions aligned by truncation.

    For each sequence b: the answer span of each side is its labels that are not
    ``ignore_index`` (start = the first such position, size = their number, minus 1 with
    ``skip_*_eos``); the logits at those positions (``logits[b, start:start + size]``, labels
    in the Hugging Face convention, aligned with the input ids) are truncated to the shorter
    span ``m``; ``loss_b = Σ_{i<m} ULD(q_i, p_i) / m``. The result is the mean of ``loss_b``
    over the batch (a sequence with nothing to compare counts as 0) — TRL's ``ULDLoss`` with
    ``use_extended_uld=False``, ``uld_token_merge_strategy="observed"``, no cross-entropy term.
    ``reduction="sum"``: Σ_b Σ_{i<m_b} ULD(q_i, p_i) instead, the sum over every aligned
    position (for a loss divided by a token count, as the LM trainer's).

    A row whose labels mark several answers (:func:`answer_spans`: a conversation's assistant
    turns) is compared answer by answer, the k-th span of one side with the k-th of the other
    (each truncated and EOS-skipped on its own), and ``loss_b`` is the sum over all of them
    divided by the number of aligned positions; both sides must mark the same number of
    answers. (TRL takes one span from the first counted label, which mixes turns.)

    Args:
        student_logits: ``[B, Ls, Vs]``; teacher_logits: ``[B, Lt, Vt]`` (lengths and vocabularies may differ).
        student_labels: ``[B, Ls]``; teacher_labels: ``[B, Lt]`` (``ignore_index`` = not an answer token).
    """
    student_logits, teacher_logits = _check_sequences(student_logits, teacher_logits,
                                                      labels=(student_labels, teacher_labels))
    student_temperature = _temperature(student_temperature, "student_temperature")
    teacher_temperature = _temperature(teacher_temperature, "teacher_temperature")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' (TRL's: the mean over sequences of each one's mean) or 'sum' "
                         f"(over every aligned position), got {reduction!r}")
    dtype = v.compute_dtype(student_logits, teacher_logits)
    losses = []
    for b in range(student_logits.shape[0]):
        total, count = student_logits[b].sum().to(dtype) * 0.0, 0
        for (s_start, s_size), (t_start, t_size) in _span_pairs(student_labels[b], teacher_labels[b], b, ignore_index):
            s_size -= int(skip_student_eos and s_size > 0)
            t_size -= int(skip_teacher_eos and t_size > 0)
            length = min(s_size, t_size)
            if length <= 0:
                continue
            q = torch.softmax(student_logits[b, s_start:s_start + length].to(dtype) / student_temperature, dim=-1)
            p = torch.softmax(teacher_logits[b, t_start:t_start + length].to(dtype) / teacher_temperature, dim=-1)
            total, count = total + _sorted_l1(q, p).sum(), count + length
        losses.append(total / count if reduction == "mean" and count else total)
    total = torch.stack(losses)
    return total.mean() if reduction == "mean" else total.sum()


@dataclass(frozen=True)
class VocabularyMatch:
    """The token strings two vocabularies share: ``teacher_ids[j]`` and ``student_ids[j]`` spell the same string.

    ``teacher_ids`` ascending (TRL's order: ``sorted(teacher_matched_ids)``). Build it with
    :meth:`from_vocabularies` (``tokenizer.get_vocab()`` of each side) or
    :meth:`from_tokenizers`.

    >>> m = VocabularyMatch.from_vocabularies({"a": 0, "b": 1, "x": 2}, {"b": 0, "y": 1, "a": 2})
    >>> m.teacher_ids.tolist(), m.student_ids.tolist()
    ([0, 2], [1, 0])
    """

    teacher_ids: Tensor
    student_ids: Tensor

    @classmethod
    def from_vocabularies(cls, student_vocab: Mapping[str, int], teacher_vocab: Mapping[str, int]) -> VocabularyMatch:
        for name, vocab in (("student_vocab", student_vocab), ("teacher_vocab", teacher_vocab)):
            if not isinstance(vocab, Mapping):
                raise TypeError(f"{name} must be a mapping token string -> id (tokenizer.get_vocab()), "
                                f"got {type(vocab).__name__}")
        pairs = sorted((int(t_id), int(student_vocab[token])) for token, t_id in teacher_vocab.items()
                       if token in student_vocab)
        teacher_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
        student_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)
        if student_ids.unique().numel() != student_ids.numel():
            raise ValueError("student_vocab gives one id to several shared token strings; a vocabulary must map "
                             "each id to one string")
        return cls(teacher_ids, student_ids)

    @classmethod
    def from_tokenizers(cls, student_tokenizer, teacher_tokenizer) -> VocabularyMatch:
        return cls.from_vocabularies(student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab())

    def __len__(self) -> int:
        return int(self.teacher_ids.numel())

    def masks(self, student_size: int, teacher_size: int, device=None) -> tuple[Tensor, Tensor]:
        """Boolean ``[student_size]``, ``[teacher_size]``: True where the entry is shared."""
        for name, size, ids in (("student", student_size, self.student_ids),
                                ("teacher", teacher_size, self.teacher_ids)):
            if len(self) and int(ids.max()) >= size:
                raise ValueError(f"the vocabulary match holds {name} id {int(ids.max())}, but the {name} logits have "
                                 f"{size} entries; build it from the tokenizers of these two models")
        s_mask = torch.zeros(student_size, dtype=torch.bool, device=device)
        t_mask = torch.zeros(teacher_size, dtype=torch.bool, device=device)
        s_mask[self.student_ids.to(device)] = True
        t_mask[self.teacher_ids.to(device)] = True
        return s_mask, t_mask


def _offset_ends(offsets, name: str) -> list[int]:
    rows = offsets.tolist() if isinstance(offsets, Tensor) else list(offsets)
    try:
        ends = [int(row[1]) for row in rows]
    except (TypeError, IndexError, ValueError):
        raise TypeError(f"{name} must be a sequence of (start, end) byte offsets (or a [n, 2] tensor), "
                        f"got {offsets!r:.80}") from None
    if any(b < a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"{name} must have non-decreasing end offsets (byte positions in one text), got ends {ends}")
    return ends


def byte_offset_groups(student_offsets, teacher_offsets) -> tuple[list[list[int]], list[list[int]]]:
    """Pair runs of student and teacher tokens that end on the same byte: ``(student_groups, teacher_groups)``.

    Walk both tokenizations of one text from the start; a group closes where a student
    token and a teacher token end at the same byte offset (the points where the two
    tokenizers agree on a split). Tokens left over at the end of either side form a last
    group (the other side's part may then be empty). Only the end offsets are read.
    TRL 1.16's ``ULDLoss._align_by_byte_offsets`` (``trl/experimental/gold/gold_trainer.py``).

    >>> byte_offset_groups([(0, 3), (3, 5), (5, 8)], [(0, 5), (5, 6), (6, 8)])
    ([[0, 1], [2]], [[0], [1, 2]])
    """
    s_ends = _offset_ends(student_offsets, "student_offsets")
    t_ends = _offset_ends(teacher_offsets, "teacher_offsets")
    s_groups: list[list[int]] = []
    t_groups: list[list[int]] = []
    s = t = s_first = t_first = 0
    while s < len(s_ends) and t < len(t_ends):
        if s_ends[s] == t_ends[t]:
            s, t = s + 1, t + 1
            s_groups.append(list(range(s_first, s)))
            t_groups.append(list(range(t_first, t)))
            s_first, t_first = s, t
        elif s_ends[s] < t_ends[t]:
            s += 1
        else:
            t += 1
    if s < len(s_ends) or t < len(t_ends):
        s_groups.append(list(range(s_first, len(s_ends))))
        t_groups.append(list(range(t_first, len(t_ends))))
    return s_groups, t_groups


def merge_groups(probs: Tensor, groups: Sequence[Sequence[int]], token_ids: Sequence[int] | Tensor,
                 strategy: str = "observed") -> Tensor:
    """One unnormalised distribution per group of positions: ``[len(groups), V]``.

    For a group of positions ``i_1 < … < i_k`` (``probs[i]`` the distribution at position
    i, ``token_ids[i]`` the token there):

    - ``"observed"``: ``probs[i_1] · Π_{j>1} max(probs[i_j, token_ids[i_j]], 1e-8)``;
    - ``"bayesian"``: ``probs[i_k] · Π_{j<k} max(probs[i_j, token_ids[i_j]], 1e-8)`` (with
      probs[i] the distribution that predicts token i: the chain rule).

    A one-position group is that row; an empty group a row of zeros. TRL 1.16's
    ``ULDLoss._merge_probabilities_with_alignment_groups``.
    """
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(MERGE_STRATEGIES)}, got {strategy!r}")
    if not isinstance(probs, Tensor) or probs.ndim != 2:
        raise ValueError(f"probs must be a [positions, vocab] tensor, got {getattr(probs, 'shape', type(probs))}")
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=probs.device).reshape(-1)
    n = probs.shape[0]
    if ids.numel() != n:
        raise ValueError(f"token_ids must hold one id per row of probs ({n}), got {ids.numel()}")
    if any(i < 0 or i >= n for group in groups for i in group):
        raise ValueError(f"groups must hold positions in [0, {n}), got {[list(g) for g in groups]}")
    base, scalar_rows, scalar_group = [], [], []
    for g, group in enumerate(groups):
        group = list(group)
        if not group:
            base.append(-1)
            continue
        head, rest = (group[0], group[1:]) if strategy == "observed" else (group[-1], group[:-1])
        base.append(head)
        scalar_rows += rest
        scalar_group += [g] * len(rest)
    base_t = torch.tensor(base, dtype=torch.long, device=probs.device)
    merged = probs[base_t.clamp_min(0)] * base_t.ge(0).unsqueeze(-1).to(probs.dtype)
    if scalar_rows:
        rows = torch.tensor(scalar_rows, dtype=torch.long, device=probs.device)
        chosen = probs[rows, ids[rows]].clamp_min(_EPS)
        log_factor = probs.new_zeros(len(base)).index_add(0, torch.tensor(scalar_group, device=probs.device),
                                                          chosen.log())
        merged = merged * log_factor.exp().unsqueeze(-1)
    return merged


def check_gold_settings(divergence: str, divergence_params: Mapping | None, strategy: str,
                        matched_weight: float | None, unmatched_weight: float | None, *,
                        prefix: str = "") -> tuple[float, float] | None:
    """Raise naming the setting (``prefix`` + its name) when :func:`gold_sequence_loss` cannot use these.

    Returns the fixed ``(matched_weight, unmatched_weight)``, or None (adaptive).
    """
    check_f_divergence(divergence, valid=MEASURE_DIVERGENCES)
    if divergence_params is not None and not isinstance(divergence_params, Mapping):
        raise TypeError(f"divergence_params must be a mapping of {divergence}'s parameters, "
                        f"got {type(divergence_params).__name__}")
    registry_f(torch.zeros(1), divergence, **dict(divergence_params or {}))  # unknown or out-of-range parameters
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"{prefix}strategy must be one of {', '.join(MERGE_STRATEGIES)}, got {strategy!r}")
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError(f"{prefix}matched_weight and {prefix}unmatched_weight are both None (adaptive: the shared "
                         f"fraction of the teacher's vocabulary) or both numbers, got {matched_weight!r} and "
                         f"{unmatched_weight!r}")
    if matched_weight is None:
        return None
    for name, value in (("matched_weight", matched_weight), ("unmatched_weight", unmatched_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"{prefix}{name} must be a finite number >= 0, got {value!r}")
    return float(matched_weight), float(unmatched_weight)


def _check_offsets(offsets, logits: Tensor, name: str) -> Tensor:
    if not isinstance(offsets, Tensor) or offsets.shape != (*logits.shape[:2], 2):
        got = tuple(offsets.shape) if isinstance(offsets, Tensor) else type(offsets).__name__
        raise ValueError(f"{name} must be a tensor of shape {(*logits.shape[:2], 2)} (one (start, end) byte pair per "
                         f"position of the logits, relative to the answer text), got {got}")
    return offsets


def gold_sequence_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_labels: Tensor,
    teacher_labels: Tensor,
    student_ids: Tensor,
    teacher_ids: Tensor,
    student_offsets: Tensor,
    teacher_offsets: Tensor,
    match: VocabularyMatch,
    *,
    divergence: str = "js",
    divergence_params: Mapping | None = None,
    strategy: str = "observed",
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    skip_student_eos: bool = True,
    skip_teacher_eos: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """GOLD's hybrid cross-tokenizer loss over a batch of sequences in two tokenizations.

    For each sequence b, on each side: the answer span (labels that are not
    ``ignore_index``; minus its last token with ``skip_*_eos``) and its byte offsets
    relative to the answer text (several answers, :func:`answer_spans`, are paired in order
    and each is aligned on its own, the offsets relative to its text; ``loss_b`` divides by
    all their groups). The spans are grouped by :func:`byte_offset_groups`
    (pairs with an empty side dropped), the softmax rows (``logits / temperature``) of each
    group merged by :func:`merge_groups`; with ``"observed"`` the rows are the logits at the
    answer positions, with ``"bayesian"`` one position earlier (the row that predicts each
    token), and a span starting at position 0 loses its first group pair (no row predicts it).
    On the G merged rows ``s`` (student) and ``t`` (teacher):

    - matched: ``M_b = Σ_g Σ_j t'_gj f(s'_gj / t'_gj) / G`` over the shared entries
      (``match``), ``x' = max(x, 1e-8)``, f the registry ``divergence``'s generator
      (:func:`divergent.functional.generators.registry_f`: ``forward_kl`` = TRL's β = 0,
      ``reverse_kl`` = β = 1, ``js`` with ``beta`` = TRL's 0 < β < 1);
    - unmatched: ``U_b = Σ_g ULD(s_g, t_g) / G`` over the other entries (sorted L1, shorter
      side padded with 0; 0 when either side has none);
    - ``loss_b = w_m M_b + w_u U_b`` with ``w_m = len(match) / Vt``, ``w_u = 1 − w_m``
      (adaptive) or the given ``matched_weight``/``unmatched_weight``.

    The result is the mean of ``loss_b`` (a sequence with nothing to compare counts 0) —
    TRL 1.16's ``ULDLoss`` with ``use_extended_uld=True``, ``uld_use_hybrid_loss=True``,
    no cross-entropy term. ``reduction="sum"``: ``Σ_b G_b loss_b`` (the sum over every
    aligned group, for a loss divided by a token count).

    Args:
        student_logits ``[B, Ls, Vs]``, teacher_logits ``[B, Lt, Vt]`` (dense over each vocabulary).
        student_labels ``[B, Ls]``, teacher_labels ``[B, Lt]``; student_ids, teacher_ids: the
            input ids (the observed tokens), same shapes.
        student_offsets ``[B, Ls, 2]``, teacher_offsets ``[B, Lt, 2]``: UTF-8 byte (start, end)
            of each answer token in the answer text (other positions are not read).
        match: the shared vocabulary entries (:class:`VocabularyMatch`).
    """
    student_logits, teacher_logits = _check_sequences(student_logits, teacher_logits,
                                                      labels=(student_labels, teacher_labels),
                                                      ids=(student_ids, teacher_ids))
    _check_offsets(student_offsets, student_logits, "student_offsets")
    _check_offsets(teacher_offsets, teacher_logits, "teacher_offsets")
    if not isinstance(match, VocabularyMatch):
        raise TypeError(f"match must be a VocabularyMatch (VocabularyMatch.from_tokenizers(student_tokenizer, "
                        f"teacher_tokenizer)), got {type(match).__name__}")
    fixed = check_gold_settings(divergence, divergence_params, strategy, matched_weight, unmatched_weight)
    params = dict(divergence_params or {})
    student_temperature = _temperature(student_temperature, "student_temperature")
    teacher_temperature = _temperature(teacher_temperature, "teacher_temperature")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' (TRL's: the mean over sequences of each one's mean) or 'sum' "
                         f"(over every aligned group), got {reduction!r}")
    dtype = v.compute_dtype(student_logits, teacher_logits)
    device = student_logits.device
    s_shared, t_shared = match.masks(student_logits.shape[-1], teacher_logits.shape[-1], device)
    s_cols, t_cols = match.student_ids.to(device), match.teacher_ids.to(device)
    w_m, w_u = fixed if fixed is not None else (len(match) / max(1, teacher_logits.shape[-1]),
                                                1.0 - len(match) / max(1, teacher_logits.shape[-1]))
    shift = 1 if strategy == "bayesian" else 0
    losses = []
    for b in range(student_logits.shape[0]):
        total, count = student_logits[b].sum().to(dtype) * 0.0, 0
        for (s_start, s_size), (t_start, t_size) in _span_pairs(student_labels[b], teacher_labels[b], b, ignore_index):
            s_size -= int(skip_student_eos and s_size > 0)
            t_size -= int(skip_teacher_eos and t_size > 0)
            if s_size <= 0 or t_size <= 0:
                continue
            if shift and (s_start == 0 or t_start == 0):  # nothing predicts the first token: drop the first group pair
                s_groups, t_groups = byte_offset_groups(student_offsets[b, s_start:s_start + s_size],
                                                        teacher_offsets[b, t_start:t_start + t_size])
                s_start, s_size = s_start + len(s_groups[0]), s_size - len(s_groups[0])
                t_start, t_size = t_start + len(t_groups[0]), t_size - len(t_groups[0])
                if s_size <= 0 or t_size <= 0:
                    continue
            s_groups, t_groups = byte_offset_groups(student_offsets[b, s_start:s_start + s_size],
                                                    teacher_offsets[b, t_start:t_start + t_size])
            pairs = [(sg, tg) for sg, tg in zip(s_groups, t_groups) if sg and tg]
            if not pairs:
                continue
            s_probs = torch.softmax(student_logits[b, s_start - shift:s_start + s_size - shift].to(dtype)
                                    / student_temperature, dim=-1)
            t_probs = torch.softmax(teacher_logits[b, t_start - shift:t_start + t_size - shift].to(dtype)
                                    / teacher_temperature, dim=-1)
            s = merge_groups(s_probs, [sg for sg, _ in pairs], student_ids[b, s_start:s_start + s_size], strategy)
            t = merge_groups(t_probs, [tg for _, tg in pairs], teacher_ids[b, t_start:t_start + t_size], strategy)
            if len(match):
                s_m, t_m = s[:, s_cols].clamp_min(_EPS), t[:, t_cols].clamp_min(_EPS)
                total = total + w_m * (t_m * registry_f(s_m.log() - t_m.log(), divergence, **params)).sum()
            s_u, t_u = s[:, ~s_shared], t[:, ~t_shared]
            if s_u.shape[-1] and t_u.shape[-1]:
                total = total + w_u * _sorted_l1(s_u, t_u).sum()
            count += len(pairs)
        losses.append(total / count if reduction == "mean" and count else total)
    stacked = torch.stack(losses)
    if torch.isnan(stacked).any():
        raise ValueError("gold_sequence_loss: NaN in the result; student_logits or teacher_logits hold NaN or rows "
                         "of -inf only")
    return stacked.mean() if reduction == "mean" else stacked.sum()
