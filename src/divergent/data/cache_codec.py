"""Compact storage of a top-k teacher: bit-packed token ids and quantised log-probs with a KL bound.

**Ids.** Each id of a vocabulary of V tokens takes ``ceil(log2 V)`` bits; a token's k ids are
packed little-endian into ``ceil(k · bits / 8)`` bytes (:func:`pack_bits`, :func:`unpack_bits`).

**Log-probs.** A token's teacher is read as k + 1 buckets (its top k and the tail holding the
rest of the mass, as ``dv.TopK`` reads it). Their log-probs ℓ_b ≤ 0 are stored on a grid of
``2^bits − 1`` levels from the token's smallest finite ℓ (``lo``, kept as float32) to 0, step
Δ = −lo / (2^bits − 2), rounded to the nearest level; code 0 is probability exactly 0. Read
back, the levels are renormalised over the k + 1 buckets: p̂_b = e^{ℓ̂_b} / Σ_c e^{ℓ̂_c}.

**Bound.** Every finite ℓ_b is off by e_b = ℓ_b − ℓ̂_b ∈ [−Δ/2, Δ/2], and

    KL(p ‖ p̂) = E_p[e] + log E_p[e^{−e}] ≤ Δ² / 8

by Hoeffding's lemma (log E e^{−e} ≤ −E e + (range)²/8, range Δ). :func:`kl_bound` gives
Δ²/8 per token; the cache's index records its largest value.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["id_bits", "pack_bits", "unpack_bits", "quantize_logprobs", "dequantize_logprobs", "kl_bound"]


def id_bits(vocab_size: int) -> int:
    """Bits per token id: ceil(log2 V), at least 1."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    return max(1, math.ceil(math.log2(vocab_size)))


def _check_bits(bits: int, argument: str, high: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= high:
        raise ValueError(f"{argument} must be an int in [1, {high}], got {bits!r}")


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Non-negative integers ``[..., n]`` below 2^bits as uint8 ``[..., ceil(n·bits/8)]`` (little-endian bits).

    >>> v = torch.tensor([[5, 0, 7, 3]])
    >>> p = pack_bits(v, 3); p.shape, unpack_bits(p, 3, 4).tolist()
    (torch.Size([1, 2]), [[5, 0, 7, 3]])
    """
    _check_bits(bits, "bits", 32)
    values = values.long()
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"pack_bits: values must be in [0, {(1 << bits) - 1}] for {bits} bits, got "
                         f"[{int(values.min())}, {int(values.max())}]")
    n = values.shape[-1]
    shifts = torch.arange(bits, device=values.device)
    stream = ((values.unsqueeze(-1) >> shifts) & 1).reshape(*values.shape[:-1], n * bits)
    width = math.ceil(n * bits / 8)
    stream = torch.nn.functional.pad(stream, (0, width * 8 - n * bits))
    weights = 1 << torch.arange(8, device=values.device)
    return (stream.reshape(*values.shape[:-1], width, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: int64 ``[..., n]``."""
    _check_bits(bits, "bits", 32)
    if packed.dtype != torch.uint8 or packed.shape[-1] != math.ceil(n * bits / 8):
        raise ValueError(f"unpack_bits: expected uint8 [..., {math.ceil(n * bits / 8)}] for {n} values of {bits} "
                         f"bits, got {packed.dtype} {tuple(packed.shape)}")
    stream = (packed.long().unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(*packed.shape[:-1], -1)[..., : n * bits].reshape(*packed.shape[:-1], n, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(-1)


def _buckets(top_logprobs: Tensor) -> Tensor:
    """The k + 1 bucket log-probs (top k, then log(1 − Σ top) for the tail; −inf when the top holds it all)."""
    top = top_logprobs.double()
    mass = torch.logsumexp(top, dim=-1, keepdim=True).clamp_max(0.0)
    tail = torch.log(-torch.expm1(mass))
    return torch.cat([top - torch.logsumexp(torch.cat([top, tail], -1), -1, keepdim=True).clamp_min(0.0), tail], -1)


def _step(lo: Tensor, bits: int) -> Tensor:
    # 2^bits − 1 finite levels (code 0 is probability 0): lo + (c − 1)·Δ for c = 1 … 2^bits − 1.
    return (-lo / ((1 << bits) - 2)).clamp_min(torch.finfo(torch.float32).tiny)


def quantize_logprobs(top_logprobs: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``(codes [..., k + 1] int64, lo [...] float32)`` of a top-k teacher's log-probs ``[..., k]`` (see the module)."""
    _check_bits(bits, "logprob_bits", 16)
    if bits < 2:
        raise ValueError(f"logprob_bits must be at least 2 (one level for 0, one for log-probs), got {bits}")
    buckets = _buckets(top_logprobs)
    finite = torch.isfinite(buckets)
    lo = torch.where(finite, buckets, 0.0).amin(-1).float()
    step = _step(lo.double(), bits).unsqueeze(-1)
    codes = torch.round((buckets - lo.double().unsqueeze(-1)) / step).clamp(0, (1 << bits) - 2).long() + 1
    return torch.where(finite, codes, 0), lo


def dequantize_logprobs(codes: Tensor, lo: Tensor, bits: int) -> Tensor:
    """The top-k log-probs ``[..., k]`` (float32), renormalised with the stored tail over the k + 1 buckets."""
    _check_bits(bits, "logprob_bits", 16)
    step = _step(lo.double(), bits).unsqueeze(-1)
    levels = lo.double().unsqueeze(-1) + (codes.double() - 1.0) * step
    levels = torch.where(codes == 0, float("-inf"), levels)
    normalised = levels - torch.logsumexp(levels, dim=-1, keepdim=True)
    return normalised[..., :-1].float()


def kl_bound(lo: Tensor, bits: int) -> Tensor:
    """Δ²/8 per token: the largest KL(p ‖ p̂) between the true and the stored k + 1 buckets."""
    return _step(lo.double(), bits) ** 2 / 8.0
