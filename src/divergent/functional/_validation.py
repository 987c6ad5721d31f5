"""Input checks and the one masking/reduction contract shared by every divergence.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right
kind, wrong value) with a message that names the argument, what was received
and what is expected.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

REDUCTIONS = ("none", "sum", "mean")


def check_logits(value: object, argument: str) -> Tensor:
    """A floating-point tensor with at least one dimension (the vocabulary/classes)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor of logits, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{argument} must hold floating-point logits (float16, bfloat16, float32 or float64), "
            f"got dtype {value.dtype}; convert with {argument}.float()"
        )
    if value.ndim == 0:
        raise ValueError(f"{argument} must have a last dimension over classes, got a 0-d tensor")
    if value.device.type == "meta":
        raise ValueError(f"{argument} is on the meta device: it has a shape but no values")
    if value.shape[-1] == 0:
        raise ValueError(f"{argument} has an empty last dimension (0 classes); expected at least 1 class")
    return value


def check_same_shape(student: Tensor, teacher: Tensor) -> None:
    if student.shape == teacher.shape:
        return
    if student.shape[:-1] == teacher.shape[:-1]:
        vs, vt = student.shape[-1], teacher.shape[-1]
        shared = min(vs, vt)
        raise ValueError(
            f"student_logits has vocabulary size {vs} but teacher_logits has {vt}; both must index the "
            f"same classes. If the difference is only padding of the output layer, slice both to the "
            f"shared tokenizer size, e.g. student_logits[..., :{shared}] and teacher_logits[..., :{shared}]; "
            f"models with different tokenizers cannot be compared token by token"
        )
    raise ValueError(
        f"student_logits and teacher_logits must have the same shape, got {tuple(student.shape)} "
        f"and {tuple(teacher.shape)}"
    )


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive number, got {type(temperature).__name__} {temperature!r}")
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def check_mask(mask: object, batch_shape: torch.Size, device: torch.device) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor of shape {tuple(batch_shape)}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must have dtype torch.bool (True = the row counts), got {mask.dtype}; "
            f"for labels use mask=labels != ignore_index"
        )
    if mask.shape != batch_shape:
        raise ValueError(
            f"mask must have shape logits.shape[:-1] = {tuple(batch_shape)}, got {tuple(mask.shape)}"
        )
    if mask.device.type == "meta":  # the logits never are (check_logits)
        raise ValueError(
            f"mask is on the meta device: it has a shape but no values; pass a mask with values "
            f"(on {device}, the logits' device, or any device it can be copied from)"
        )
    return mask.to(device)


def check_normalizer(normalizer: object) -> float | Tensor | None:
    if normalizer is None:
        return None
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a single number, got a tensor of shape {tuple(normalizer.shape)}")
        value = float(normalizer.detach().reshape(()).item())
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"normalizer must be a finite number > 0 (e.g. the global token count), got {value}")
        return normalizer.reshape(())
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise TypeError(f"normalizer must be a positive number, got {type(normalizer).__name__} {normalizer!r}")
    if not (normalizer > 0 and math.isfinite(normalizer)):
        raise ValueError(f"normalizer must be a finite number > 0 (e.g. the global token count), got {normalizer}")
    return float(normalizer)


def check_weight(value: object, argument: str) -> float:
    """A loss weight: a finite number ≥ 0 (``hard_weight``, ``soft_weight``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argument} must be a number ≥ 0, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{argument} must be a finite number ≥ 0, got {value}")
    return value


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def diagnose_nan(student: Tensor, teacher: Tensor | None, spec, temperature: float) -> None:
    """Raise the error that says why divergence ``spec`` came out NaN (``spec``: a registry entry).

    Input problems name the argument: NaN or +inf logits, rows that are all -inf, and logits
    whose magnitude (divided by ``temperature``) overflows the compute dtype. From valid
    inputs, a user-registered function is named; only a built-in left is a bug here.
    """
    for argument, tensor in (("student_logits", student), ("teacher_logits", teacher)):
        if tensor is None:
            continue
        if torch.isnan(tensor).any():
            count = int(torch.isnan(tensor).sum())
            raise ValueError(f"{argument} contains NaN ({count} entries); logits must be real numbers or -inf")
        if torch.isposinf(tensor).any():
            raise ValueError(f"{argument} contains +inf; logits must be finite or -inf (zero probability)")
        all_neg_inf = torch.isneginf(tensor).all(dim=-1)
        if all_neg_inf.any():
            raise ValueError(
                f"{argument} has {int(all_neg_inf.sum())} row(s) whose logits are all -inf, which is no "
                f"distribution; exclude such rows with mask="
            )
    for argument, tensor in (("student_logits", student), ("teacher_logits", teacher)):
        if tensor is not None:
            _check_magnitude(tensor, argument, temperature)
    if not spec.builtin:
        raise ValueError(
            f"divergence {spec.name!r} (fn {spec.function_name}) returned NaN from valid inputs. It receives "
            f"log-probabilities that are -inf where a probability is 0: terms such as 0·log 0 must be written "
            f"to give their limit (torch.xlogy, torch.where), and exp(-inf) = 0 may not be multiplied by inf"
        )
    raise FloatingPointError(
        f"divergence {spec.name!r} produced NaN from valid logits; this is a bug in divergent, please report it"
    )


def diagnose_topk(logprobs: Tensor) -> None:
    """ValueError when a TopK teacher's ``logprobs`` hold NaN or +inf: changed after it was built (it checks then)."""
    bad = torch.isnan(logprobs) | torch.isposinf(logprobs)
    if bad.any():
        raise ValueError(
            f"the TopK teacher's logprobs contain NaN or +inf ({int(bad.sum())} entries), which TopK refuses when it "
            f"is built: they were changed afterwards (in place, or by assigning .logprobs); build the TopK again "
            f"from finite log-probabilities, dv.TopK(indices, logprobs)"
        )


def _check_magnitude(tensor: Tensor, argument: str, temperature: float) -> None:
    """ValueError when ``tensor / temperature`` is too large for its dtype's arithmetic.

    Float arithmetic on the tempered logits overflows when a logit divided by T exceeds the
    dtype's largest number, and the log-softmax and the divergences' terms (differences,
    squares, exponents of differences) overflow well before that: a spread within one row
    beyond the square root of that number (1.8e19 in float32) is reported as the cause.
    """
    tensor = tensor.detach()
    finite = torch.isfinite(tensor)
    if not finite.any():
        return
    limit = torch.finfo(tensor.dtype).max
    largest = float(torch.where(finite, tensor.abs(), 0.0).max())
    spread = float(
        (torch.where(finite, tensor, float("-inf")).amax(-1).double()
         - torch.where(finite, tensor, float("inf")).amin(-1).double()).nan_to_num(nan=0.0, neginf=0.0).max()
    )
    tempered = "" if temperature == 1.0 else f" / temperature (temperature={temperature:g})"
    if largest / temperature > limit:
        raise ValueError(
            f"{argument}{tempered} overflows {tensor.dtype}: the largest |logit| is {largest:.3g}, and "
            f"{largest:.3g} / {temperature:g} exceeds {limit:.3g}; use a larger temperature or smaller logits"
        )
    if spread / temperature > limit**0.5:
        raise ValueError(
            f"{argument}{tempered} spans {spread / temperature:.3g} within a row, beyond what {tensor.dtype} "
            f"arithmetic on log-probabilities can hold (about {limit ** 0.5:.2g}): the divergence overflows. "
            f"Logits this far apart carry no information beyond the top class; "
            + ("use a larger temperature, " if temperature < 1.0 else "")
            + "check where the logits come from, or pass float64 logits"
        )


def reduce_rows(
    rows: Tensor,
    mask: Tensor | None,
    batch_shape: torch.Size,
    reduction: str,
    normalizer: float | Tensor | None,
) -> Tensor:
    """Apply the reduction contract to per-row values of the counted rows.

    ``rows`` holds one value per counted row (all rows when ``mask`` is None, in
    row-major order of ``batch_shape``).
    """
    if reduction == "none":
        if mask is None:
            return rows.reshape(batch_shape)
        out = rows.new_zeros(batch_shape)
        return out.masked_scatter(mask, rows)
    total = rows.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:
        return total / normalizer
    # A fully masked input has no counted rows: 0 / 1 keeps a valid (zero) gradient.
    return total / max(rows.numel(), 1)
