"""A teacher given only as its top-k log-probabilities (sparse teacher).

Storing a teacher's full distribution over a 128k vocabulary costs 256 KB per
token in bf16; its top-k log-probs cost a few hundred bytes. ``TopK`` keeps the
k largest teacher log-probs per row and puts the remaining mass, 1 − Σ top-k,
in one extra *tail bucket*. The student's distribution is collapsed onto the
same k+1 buckets (its own probabilities at the k indices, and the sum of all
others), and any divergence is then taken between the two (k+1)-bucket
distributions. Merging classes is a coarsening, so by the data-processing
inequality every f-divergence on the buckets is at most the full one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["TopK", "topk_to_dense_logprobs"]


def _stored_dtype(logprobs: Tensor) -> torch.dtype:
    """The coarsest of bf16/fp16 in which every finite value of ``logprobs`` is exact, else its own dtype.

    A bf16 cache read back as float32 (``.float()``) keeps exactly bf16 numbers; their rounding is
    bf16's, not float32's. Genuine float32 log-probs are all exact bf16 numbers only by chance (each
    has 16 low mantissa bits set to 0), and then a bf16 tolerance is still the right one for them.
    """
    if logprobs.dtype not in (torch.float32, torch.float64) or logprobs.numel() == 0:
        return logprobs.dtype
    # -inf (a zero probability) round-trips exactly; NaN and +inf were refused before this is asked.
    # No boolean indexing: it would need the data's shape (a host sync, and no meta-device plan).
    for low in (torch.bfloat16, torch.float16):  # bf16's eps (2^-7) is the larger
        if bool((logprobs.to(low).to(logprobs.dtype) == logprobs).all()):
            return low
    return logprobs.dtype


class TopK:
    """Sparse teacher: ``indices`` [..., k] (integer) and ``logprobs`` [..., k] (teacher log-probs).

    The log-probs are the teacher's full-vocabulary log-softmax at the stored
    indices (temperature 1). Pass a ``TopK`` wherever ``teacher_logits`` is accepted.

    >>> import torch, divergent as dv
    >>> teacher = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    >>> student = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    >>> sparse = dv.TopK.from_logits(teacher, k=2)
    >>> sparse.k, sparse.indices.tolist()
    (2, [[0, 1]])
    >>> full = dv.divergence("forward_kl", student, teacher)
    >>> bucketed = dv.divergence("forward_kl", student, sparse)
    >>> bool(bucketed <= full)
    True
    """

    def __init__(self, indices: Tensor, logprobs: Tensor) -> None:
        if not isinstance(indices, Tensor) or not isinstance(logprobs, Tensor):
            raise TypeError(
                f"TopK(indices, logprobs) takes two tensors, got {type(indices).__name__} and "
                f"{type(logprobs).__name__}"
            )
        if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
            raise TypeError(f"TopK indices must be an integer tensor, got dtype {indices.dtype}")
        if not logprobs.is_floating_point():
            raise TypeError(f"TopK logprobs must be a floating-point tensor, got dtype {logprobs.dtype}")
        if indices.shape != logprobs.shape:
            raise ValueError(
                f"TopK indices and logprobs must have the same shape, got {tuple(indices.shape)} "
                f"and {tuple(logprobs.shape)}"
            )
        if indices.ndim == 0 or indices.shape[-1] == 0:
            raise ValueError(f"TopK needs at least one index per row (shape [..., k], k ≥ 1), got {tuple(indices.shape)}")
        if torch.isnan(logprobs).any() or torch.isposinf(logprobs).any():
            raise ValueError("TopK logprobs contain NaN or +inf; expected log-probabilities ≤ 0")
        # Log-probs stored in a low-precision dtype (a bf16 cache) carry its rounding: each may
        # be off by its relative rounding |log p|·eps/2, plus eps absolute for the rounding of the
        # log-softmax that produced it (at least 1e-4). Values up to that above 0, and sums up to
        # that above 1, are rounding; beyond it they are not log-probabilities. The dtype whose
        # rounding counts is the one the values were *stored* in: float32 values that are all
        # exactly bf16 (or fp16) numbers were read from such a store and carry its rounding.
        stored = _stored_dtype(logprobs)
        finfo = torch.finfo(stored)
        slack = max(finfo.eps, 1e-4)
        where = stored if stored == logprobs.dtype else f"{stored} (the values are {stored} numbers held as {logprobs.dtype})"
        if (logprobs > slack).any():
            raise ValueError(
                f"TopK logprobs must be log-probabilities (≤ 0, or up to {slack:.2g} above for the rounding of "
                f"{where}), got a maximum of {float(logprobs.max()):.4g}; pass log_softmax(teacher_logits) "
                f"values, or build it with TopK.from_logits"
            )
        least = logprobs.double() * (1.0 + finfo.eps / 2) - slack  # each value at the low end of its rounding
        least_mass = torch.logsumexp(least, dim=-1).exp()
        if (least_mass > 1.0).any():
            mass = torch.logsumexp(logprobs.double(), dim=-1).exp()
            raise ValueError(
                f"TopK logprobs sum to more than 1 in probability (max {float(mass.max()):.6g}), beyond the "
                f"rounding of {where}; they must be the teacher's full-vocabulary log-probs at the "
                f"stored indices"
            )
        if (indices < 0).any():
            raise ValueError("TopK indices must be ≥ 0")
        if indices.shape[-1] > 1:
            ordered = indices.sort(dim=-1).values
            if (ordered[..., 1:] == ordered[..., :-1]).any():
                raise ValueError("TopK indices contain a repeated index within a row; each class may appear once")
        self.indices = indices.long()
        self.logprobs = logprobs

    @classmethod
    def from_logits(cls, logits: Tensor, k: int) -> "TopK":
        """Keep the ``k`` most probable classes of ``logits`` (full teacher logits, [..., V])."""
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            raise TypeError("TopK.from_logits needs a floating-point tensor of logits")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
            raise ValueError(f"k must be an integer in [1, {logits.shape[-1]}] (the vocabulary size), got {k!r}")
        logprobs = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
        values, indices = logprobs.topk(k, dim=-1)
        return cls(indices, values)

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """Shape of the rows, ``[..., k]``."""
        return self.indices.shape

    @property
    def device(self) -> torch.device:
        return self.logprobs.device

    @classmethod
    def _trusted(cls, indices: Tensor, logprobs: Tensor) -> "TopK":
        # Views of an already validated TopK skip the checks.
        obj = cls.__new__(cls)
        obj.indices, obj.logprobs = indices, logprobs
        return obj

    def to(self, device: torch.device | str) -> "TopK":
        return TopK._trusted(self.indices.to(device), self.logprobs.to(device))

    def __getitem__(self, item) -> "TopK":
        return TopK._trusted(self.indices[item], self.logprobs[item])

    def flatten_rows(self) -> "TopK":
        """The same teacher with all leading dimensions flattened: ``[n, k]``."""
        return TopK._trusted(self.indices.reshape(-1, self.k), self.logprobs.reshape(-1, self.k))

    def __repr__(self) -> str:
        return f"TopK(shape={tuple(self.shape)}, k={self.k}, dtype={self.logprobs.dtype})"


def bucket_logprobs(student_logits: Tensor, teacher: TopK, temperature: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs over the k+1 buckets (k stored classes, then the tail).

    Student: log-softmax(student_logits / T) gathered at the indices; its tail is the
    logsumexp of all other classes (computed directly, not as 1 − Σ, to stay exact).
    Teacher: the stored log-probs and log(1 − Σ p_topk) for the tail, then tempered as
    softmax(log p_bucket / T) — exact at T = 1; at T ≠ 1 the tail is tempered as if it were
    one class. When k equals the vocabulary size there is no tail (both tails are -inf) and
    the stored log-probs are normalised to sum to 1 (removing a low-precision cache's rounding);
    when they sum to slightly more than 1 at k < V, they are scaled back to 1 and the tail is 0.
    """
    vocab = student_logits.shape[-1]
    if teacher.k > vocab:
        raise ValueError(f"TopK teacher has k={teacher.k} classes per row but the student has only {vocab}")
    if teacher.indices.numel() and int(teacher.indices.max()) >= vocab:
        raise ValueError(
            f"TopK indices go up to {int(teacher.indices.max())} but student_logits has vocabulary size {vocab}"
        )
    indices = teacher.indices.to(student_logits.device)
    lq_full = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    lq_top = lq_full.gather(-1, indices)
    lp_top, lp_tail = _top_and_tail(teacher.logprobs.to(device=student_logits.device, dtype=dtype),
                                     whole=teacher.k == vocab)
    if teacher.k == vocab:
        lq_tail = torch.full_like(lq_top[..., :1], float("-inf"))
    else:
        lq_tail = torch.logsumexp(lq_full.scatter(-1, indices, float("-inf")), dim=-1, keepdim=True)
    lq = torch.cat([lq_top, lq_tail], dim=-1)
    lp = torch.cat([lp_top, lp_tail], dim=-1)
    if temperature != 1.0:
        lp = torch.log_softmax(lp / temperature, dim=-1)
    return lp, lq


def _top_and_tail(lp_top: Tensor, whole: bool) -> tuple[Tensor, Tensor]:
    """The stored top-k log-probs made a distribution with its tail: ``(log p_top, log(1 − Σ p_top))``.

    ``whole`` (k equals the vocabulary size): the stored values are the whole distribution,
    normalised to sum to 1 (removing a low-precision cache's rounding), tail -inf. Otherwise
    values whose sum rounding (see :class:`TopK`) put slightly above 1 are scaled back to 1,
    tail -inf; else the tail is log(1 − Σ p_top), computed with expm1 to stay exact.
    """
    top_mass = torch.logsumexp(lp_top, dim=-1, keepdim=True)
    if whole:
        return lp_top - top_mass, torch.full_like(top_mass, float("-inf"))
    return lp_top - top_mass.clamp_min(0.0), torch.log(-torch.expm1(top_mass.clamp_max(0.0)))


def topk_to_dense_logprobs(teacher: TopK, vocab_size: int) -> Tensor:
    """Dense teacher log-probs ``[..., vocab_size]`` from a top-k teacher: the tail spread uniformly.

    With τ = 1 − Σ_{i∈top-k} p_i the mass outside the stored classes, every one of the
    V − k classes not stored gets τ / (V − k):

        p̂_i = p_i (i in the top-k),   p̂_j = τ / (V − k) (j not in it),   Σ p̂ = 1.

    Of all distributions that agree with the top-k and the tail mass this is the one of
    largest entropy (the stored numbers say nothing about how the tail is split). It is exact
    when k = V (then the stored log-probs are the whole distribution, renormalised to remove
    storage rounding); and since each tail class of the true p is at most p_(k) and so is
    their mean τ / (V − k), the sorted p̂ keeps the top-k in place and
    ‖sort↓(p) − sort↓(p̂)‖₁ ≤ 2τ: a sorted-probability loss such as ULD moves by at most 2τ
    per position. For cross-tokenizer distillation from a served or cached teacher
    (:mod:`divergent.train.cross_tokenizer`), whose losses read the teacher's full
    distribution over its own vocabulary.

    Args:
        teacher: a :class:`TopK` (its log-probs at temperature 1, float32 or float64 out).
        vocab_size: V, the teacher's vocabulary size (≥ k, above every stored index).

    >>> import torch
    >>> from divergent.functional.topk import TopK, topk_to_dense_logprobs
    >>> top = TopK(torch.tensor([[2, 0]]), torch.tensor([0.5, 0.3]).log()[None])
    >>> [round(p, 4) for p in topk_to_dense_logprobs(top, 4).exp()[0].tolist()]  # 0.2 left for ids 1 and 3
    [0.3, 0.1, 0.5, 0.1]
    """
    if not isinstance(teacher, TopK):
        raise TypeError(f"teacher must be a TopK (indices and log-probs), got {type(teacher).__name__}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < teacher.k:
        raise ValueError(f"vocab_size must be an int >= k={teacher.k} (the teacher's vocabulary size), got {vocab_size!r}")
    if teacher.indices.numel() and int(teacher.indices.max()) >= vocab_size:
        raise ValueError(f"TopK indices go up to {int(teacher.indices.max())}, outside vocab_size={vocab_size}")
    dtype = torch.float64 if teacher.logprobs.dtype == torch.float64 else torch.float32
    lp_top, lp_tail = _top_and_tail(teacher.logprobs.to(dtype), whole=teacher.k == vocab_size)
    if teacher.k < vocab_size:
        lp_tail = lp_tail - math.log(vocab_size - teacher.k)  # τ / (V − k) for each class not stored
    dense = lp_tail.expand(*lp_top.shape[:-1], vocab_size).clone()
    return dense.scatter_(-1, teacher.indices.to(dense.device), lp_top)
