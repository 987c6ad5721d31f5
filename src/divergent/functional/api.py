"""``divergence(name, student_logits, teacher_logits, ...)`` and one function per registered name.

The per-name functions (``forward_kl``, ``js``, ...) are made from the registry entries:
their signature, docstring and doctest example come from
:mod:`divergent.functional.registry`, and a name registered later with
``dv.register_divergence`` gets the same kind of function (``dv.functional.<name>``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from divergent.functional import _validation as v
from divergent.functional._math import RowDivergence
from divergent.functional.registry import REGISTRY, DivergenceSpec, get_spec
from divergent.functional.topk import TopK, bucket_logprobs


def divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor | TopK,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    **params: Any,
) -> Tensor:
    """The divergence ``name`` between teacher p = softmax(teacher/T) and student q = softmax(student/T).

    Args:
        name: a registered name (see :func:`divergent.available`).
        student_logits: ``[..., V]`` floating-point logits of the student (q). -inf = probability 0.
        teacher_logits: ``[..., V]`` logits of the teacher (p), or a :class:`TopK` sparse teacher.
        temperature: T > 0 divides both logits. No T² factor is applied here.
        mask: bool ``[...]``; True rows count. Rows excluded by the mask are not inspected.
        reduction: ``"none"`` (per-row values, masked rows 0), ``"sum"``, or ``"mean"``
            (sum over counted rows / number of counted rows; 0 when none count).
        normalizer: with ``"mean"``, divide the sum by this instead (e.g. the global token
            count under gradient accumulation or data parallelism).
        **params: the divergence's parameters (see the registry).

    Returns:
        float32 (float64 if an input is float64) tensor: per-row values or a scalar.

    Gradients flow to both arguments: to the student, and to the teacher when its logits
    require grad (online distillation, a trainable teacher); detach the teacher to keep it
    fixed. A :class:`TopK` teacher whose ``logprobs`` require grad receives the gradient
    of the divergence over the k+1 buckets.

    >>> import torch, divergent as dv
    >>> s = torch.tensor([[0.0, 1.0, 2.0]]); t = torch.tensor([[2.0, 1.0, 0.0]])
    >>> round(dv.divergence("js", s, t, beta=0.5).item(), 4)
    0.2476
    """
    spec = get_spec(name)
    resolved = spec.resolve(params)
    reduction = v.check_reduction(reduction)
    temperature = v.check_temperature(temperature)
    normalizer = v.check_normalizer(normalizer)
    if normalizer is not None and reduction != "mean":
        raise ValueError(f"normalizer replaces the denominator of reduction='mean'; got reduction={reduction!r}")
    student_logits = v.check_logits(student_logits, "student_logits")

    if isinstance(teacher_logits, TopK):
        if not spec.accepts_topk:
            raise ValueError(
                f"{name} does not accept a TopK teacher: it compares whole distributions across the batch; "
                f"pass dense teacher_logits"
            )
        if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(
                f"TopK teacher rows {tuple(teacher_logits.shape[:-1])} do not match student_logits rows "
                f"{tuple(student_logits.shape[:-1])}"
            )
    else:
        teacher_logits = v.check_logits(teacher_logits, "teacher_logits")
        v.check_same_shape(student_logits, teacher_logits)

    batch_shape = student_logits.shape[:-1]
    mask = v.check_mask(mask, batch_shape, student_logits.device)
    vocab = student_logits.shape[-1]

    # Select the counted rows once; everything below works on [n, V].
    if mask is None:
        student_rows = student_logits.reshape(-1, vocab)
        teacher_rows = (
            teacher_logits.flatten_rows() if isinstance(teacher_logits, TopK) else teacher_logits.reshape(-1, vocab)
        )
    else:
        student_rows = student_logits[mask]
        teacher_rows = teacher_logits[mask]
    rows = divergence_rows(spec, student_rows, teacher_rows, temperature, resolved)
    return v.reduce_rows(rows, mask, batch_shape, reduction, normalizer)


def divergence_rows(
    spec: DivergenceSpec,
    student_rows: Tensor,
    teacher_rows: Tensor | TopK,
    temperature: float,
    params: dict[str, Any],
) -> Tensor:
    """Per-row values ``[n]`` of already validated rows: logits ``[n, V]`` and a teacher ``[n, V]`` or ``TopK [n, k]``.

    ``params`` are resolved (``spec.resolve``): callers that evaluate many chunks (the fused
    loss) check arguments once and call this per chunk.
    """
    if isinstance(teacher_rows, TopK):
        dtype = v.compute_dtype(student_rows, teacher_rows.logprobs)
        # The buckets are already tempered, normalised log-probabilities (log_softmax is then the identity).
        lp, lq = bucket_logprobs(student_rows, teacher_rows, temperature, dtype)
        if spec.tail_aware:
            params = {**params, "tail": True}
        if spec.kernel is None:
            rows = _call_fn(spec, lq, lp, params)
        else:
            zeros = bool(torch.isneginf(lp).any() or torch.isneginf(lq).any())
            rows = RowDivergence.apply(lq, lp, spec.kernel, 1.0, params, zeros, *_wanted(lq, lp))
        teacher_for_diagnosis = None
    else:
        dtype = v.compute_dtype(student_rows, teacher_rows)
        student_rows = student_rows.to(dtype)
        teacher_rows = teacher_rows.to(dtype)
        teacher_for_diagnosis = teacher_rows
        if spec.kernel is None:
            lq = torch.log_softmax(student_rows / temperature, dim=-1)
            lp = torch.log_softmax(teacher_rows / temperature, dim=-1)
            rows = _call_fn(spec, lq, lp, params)
        else:
            zeros = bool(torch.isneginf(student_rows).any() or torch.isneginf(teacher_rows).any())
            if zeros and (torch.isneginf(student_rows).all(-1).any() or torch.isneginf(teacher_rows).all(-1).any()):
                v.diagnose_nan(student_rows, teacher_rows, spec, temperature)
            rows = RowDivergence.apply(student_rows, teacher_rows, spec.kernel, temperature, params, zeros,
                                       *_wanted(student_rows, teacher_rows))
    if torch.isnan(rows).any():
        if isinstance(teacher_rows, TopK):
            v.diagnose_topk(teacher_rows.logprobs)
        v.diagnose_nan(student_rows, teacher_for_diagnosis, spec, temperature)
    return rows


def _wanted(student: Tensor, teacher: Tensor) -> tuple[bool, bool]:
    """Which gradients autograd will ask for (none under torch.no_grad)."""
    enabled = torch.is_grad_enabled()
    return enabled and student.requires_grad, enabled and teacher.requires_grad


def _call_fn(spec: DivergenceSpec, lq: Tensor, lp: Tensor, params: dict[str, Any]) -> Tensor:
    """``spec.fn(lq, lp, **params)`` with its result checked: a floating tensor ``[n]`` attached to the graph."""
    if lq.shape[0] == 0:  # nothing counts (all masked): no call, an empty result attached to the graph
        return (lq.sum(-1) + lp.sum(-1)) * 0.0
    rows = spec.fn(lq, lp, **params)
    where = f"divergence {spec.name!r} (fn {spec.function_name})"
    n = lq.shape[0]
    if not isinstance(rows, Tensor):
        raise TypeError(f"{where} must return a torch.Tensor of per-row values, got {type(rows).__name__}")
    if rows.shape != (n,):
        raise ValueError(
            f"{where} must return one value per row, shape ({n},) for log-probabilities of shape "
            f"{tuple(lq.shape)}; got shape {tuple(rows.shape)} (reduce over the last dimension only, e.g. .sum(-1))"
        )
    if not rows.is_floating_point():
        raise TypeError(f"{where} must return floating-point values, got dtype {rows.dtype}")
    if rows.device != lq.device:
        raise ValueError(f"{where} returned values on {rows.device} for inputs on {lq.device}")
    if torch.is_grad_enabled() and (lq.requires_grad or lp.requires_grad) and not rows.requires_grad:
        raise ValueError(
            f"{where} returned values with no gradient path to its inputs: compute them with torch "
            f"operations on the log-probabilities it receives (no .detach(), .item(), numpy or torch.no_grad)"
        )
    return rows.to(lq.dtype)


# ---------------------------------------------------------------- one function per name

_CONTRACT = ("temperature", 1.0), ("mask", None), ("reduction", "mean"), ("normalizer", None)


def _docstring(spec: DivergenceSpec) -> str:
    params = "".join(
        f"\n        {p.name}: {p.doc + '; ' if p.doc else ''}{p.range_text()} (default {p.default!r})."
        for p in spec.params
    )
    doc = (
        f"{spec.summary}\n\n    Formula: {spec.formula}\n    Behaviour: {spec.behaviour}; symmetric: {spec.symmetric}; "
        f"bounded: {spec.bounded}.\n    Source: {spec.source}.\n\n    Args:\n        student_logits, teacher_logits, "
        f"temperature, mask, reduction, normalizer: as in :func:`divergent.divergence`.{params}\n"
    )
    if spec.example is not None:
        arguments, value = spec.example
        call = f"{spec.name}(s, t{', ' + arguments if arguments else ''})"
        doc += (
            f"\n    >>> import torch\n    >>> from divergent.functional import {spec.name}"
            "\n    >>> s = torch.tensor([[0.0, 1.0, 2.0]]); t = torch.tensor([[2.0, 1.0, 0.0]])"
            f"\n    >>> round({call}.item(), 4)\n    {value}\n"
        )
    return doc


def named_function(spec: DivergenceSpec) -> Callable[..., Tensor]:
    """``spec.name(student_logits, teacher_logits, *, <params>, temperature, mask, reduction, normalizer)``.

    Its signature (keyword-only parameters with the registry's defaults) and docstring
    come from ``spec``; a call goes through :func:`divergence`, which checks every argument.
    """
    name = spec.name

    def function(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", normalizer=None,
                 **params):
        return divergence(name, student_logits, teacher_logits, temperature=temperature, mask=mask,
                          reduction=reduction, normalizer=normalizer, **params)

    keyword = inspect.Parameter.KEYWORD_ONLY
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    function.__signature__ = inspect.Signature(
        [inspect.Parameter("student_logits", positional), inspect.Parameter("teacher_logits", positional)]
        + [inspect.Parameter(p.name, keyword, default=p.default) for p in spec.params]
        + [inspect.Parameter(argument, keyword, default=default) for argument, default in _CONTRACT],
        return_annotation=Tensor,
    )
    function.__name__ = function.__qualname__ = name
    function.__doc__ = _docstring(spec)
    return function


BUILTIN_NAMES = tuple(name for name, spec in REGISTRY.items() if spec.builtin)
for _name in BUILTIN_NAMES:
    globals()[_name] = named_function(REGISTRY[_name])
del _name

__all__ = ["divergence", *BUILTIN_NAMES]
