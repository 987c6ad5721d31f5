"""Weight fake-quantization of a student's linear layers (int8/int4, per output channel, straight-through).

The use case of KL-Top (OSTQuant): a weight-quantized copy of a model distilled from its full-precision
self. Each ``nn.Linear`` of the student keeps its full-precision weight ``w`` (what the optimiser updates
and what checkpoints store; :func:`quantized_state` gives the exported weights) and computes its forward with

    s_c = max_j |w_cj| / (2^(b-1) - 1)          (one scale per output channel c, symmetric)
    q(w)_cj = s_c * clamp(round(w_cj / s_c), -2^(b-1), 2^(b-1) - 1)

and the straight-through estimator (Bengio et al. 2013): the backward treats ``q`` as the identity,
``d loss / d w = d loss / d q(w)``. Written with torch ops (no torchao).
"""

from __future__ import annotations

import difflib

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["QUANT_BITS", "fake_quantize", "FakeQuantLinear", "quantize_linears", "quant_bits", "quantized_state"]

QUANT_BITS = {"int8": 8, "int4": 4}


def quant_bits(name: str) -> int:
    """The bit width of a ``--student-quant`` name (``int8``, ``int4``); anything else is refused by name."""
    if name not in QUANT_BITS:
        close = difflib.get_close_matches(str(name), list(QUANT_BITS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"student_quant (--student-quant) must be one of {sorted(QUANT_BITS)}, got {name!r}{hint}")
    return QUANT_BITS[name]


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``q(weight)`` per output channel (rows) with ``bits`` bits; the gradient passes straight through."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in [2, 16], got {bits!r}")
    if weight.dim() < 2:
        raise ValueError(f"weight must have an output-channel dimension (2-D or more), got shape {tuple(weight.shape)}")
    levels = 2 ** (bits - 1) - 1
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny) / levels
    quantized = (torch.clamp(torch.round(flat / scale), -levels - 1, levels) * scale).reshape(weight.shape)
    return weight + (quantized - weight).detach()


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses ``fake_quantize(weight, bits)``; parameters and state dict unchanged."""

    quant_bits: int = 8

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name)
        return F.linear(input, fake_quantize(self.weight, self.quant_bits), self.bias)


def quantize_linears(model: nn.Module, bits: int, *, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Turn every ``nn.Linear`` of ``model`` (in place; not those named in ``skip``) into a
    :class:`FakeQuantLinear` with ``bits``; returns how many. The output layer is kept in full precision
    by default (as weight-only quantization of LLMs usually does)."""
    fake_quantize(torch.zeros(1, 1), bits)  # checks bits
    count = 0
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.split(".")[-1] not in skip:
            module.__class__ = FakeQuantLinear
            module.quant_bits = bits
            count += 1
    if count == 0:
        raise ValueError(f"the model has no nn.Linear layer to quantize (skipping {list(skip)})")
    return count


def quantized_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (``model``'s full state dict) with each :class:`FakeQuantLinear` weight replaced by its
    quantized values: what the exported model computes with, loaded as plain ``nn.Linear`` layers."""
    out = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantLinear):
            key = f"{name}.weight"
            out[key] = fake_quantize(state[key], module.quant_bits).detach()
    return out
