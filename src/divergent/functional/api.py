"""``divergence(name, student_logits, teacher_logits, ...)`` and one function per name."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from divergent.functional import _validation as v
from divergent.functional._math import RowDivergence
from divergent.functional.registry import get_spec
from divergent.functional.topk import TopK, bucket_logprobs

__all__ = [
    "divergence",
    "forward_kl",
    "reverse_kl",
    "js",
    "tvd",
    "skew_kl",
    "skew_reverse_kl",
    "alpha_beta",
    "alpha",
    "hellinger",
    "chi2",
    "cauchy_schwarz",
    "bdkd",
    "sinkhorn",
]


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
        dtype = v.compute_dtype(student_logits, teacher_logits.logprobs)
        teacher_tensor = None
    else:
        teacher_logits = v.check_logits(teacher_logits, "teacher_logits")
        v.check_same_shape(student_logits, teacher_logits)
        dtype = v.compute_dtype(student_logits, teacher_logits)
        teacher_tensor = teacher_logits

    batch_shape = student_logits.shape[:-1]
    mask = v.check_mask(mask, batch_shape, student_logits.device)
    vocab = student_logits.shape[-1]

    # Select the counted rows once; everything below works on [n, V].
    if mask is None:
        student_rows = student_logits.reshape(-1, vocab)
        teacher_rows = (
            teacher_tensor.reshape(-1, vocab) if teacher_tensor is not None else teacher_logits.flatten_rows()
        )
    else:
        student_rows = student_logits[mask]
        teacher_rows = teacher_tensor[mask] if teacher_tensor is not None else teacher_logits[mask]

    if teacher_tensor is not None:
        student_rows = student_rows.to(dtype)
        teacher_rows = teacher_rows.to(dtype)
        zeros = bool(torch.isneginf(student_rows).any() or torch.isneginf(teacher_rows).any())
        if zeros and (torch.isneginf(student_rows).all(-1).any() or torch.isneginf(teacher_rows).all(-1).any()):
            v.diagnose_nan(student_rows, teacher_rows, name)
        if spec.per_row:
            rows = RowDivergence.apply(student_rows, teacher_rows, name, temperature, resolved, zeros,
                                       *_wanted(student_rows, teacher_rows))
        else:
            lq = torch.log_softmax(student_rows / temperature, dim=-1)
            lp = torch.log_softmax(teacher_rows / temperature, dim=-1)
            rows = spec.kernel(lp, lq, zeros, **resolved)
    else:
        # The buckets are already tempered, normalised log-probabilities (log_softmax is then the identity).
        lp, lq = bucket_logprobs(student_rows, teacher_rows, temperature, dtype)
        zeros = bool(torch.isneginf(lp).any() or torch.isneginf(lq).any())
        rows = RowDivergence.apply(lq, lp, name, 1.0, resolved, zeros, *_wanted(lq, lp))
    if torch.isnan(rows).any():
        v.diagnose_nan(student_rows, teacher_rows if teacher_tensor is not None else None, name)
    return v.reduce_rows(rows, mask, batch_shape, reduction, normalizer)


def _wanted(student: Tensor, teacher: Tensor) -> tuple[bool, bool]:
    """Which gradients autograd will ask for (none under torch.no_grad)."""
    enabled = torch.is_grad_enabled()
    return enabled and student.requires_grad, enabled and teacher.requires_grad


def _doc(name: str) -> str:
    spec = get_spec(name)
    params = "".join(
        f"\n        {p.name}: {p.doc}; {p.range_text()} (default {p.default!r})." for p in spec.params
    )
    return (
        f"{spec.summary}\n\n    Formula: {spec.formula}\n    Behaviour: {spec.behaviour}; symmetric: {spec.symmetric}; "
        f"bounded: {spec.bounded}.\n    Source: {spec.source}.\n\n    Args:\n        student_logits, teacher_logits, "
        f"temperature, mask, reduction, normalizer: as in :func:`divergent.divergence`.{params}\n"
    )


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", normalizer=None):
    return divergence("forward_kl", student_logits, teacher_logits, temperature=temperature, mask=mask,
                      reduction=reduction, normalizer=normalizer)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", normalizer=None):
    return divergence("reverse_kl", student_logits, teacher_logits, temperature=temperature, mask=mask,
                      reduction=reduction, normalizer=normalizer)


def js(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, reduction="mean", normalizer=None):
    return divergence("js", student_logits, teacher_logits, temperature=temperature, mask=mask,
                      reduction=reduction, normalizer=normalizer, beta=beta)


def tvd(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", normalizer=None):
    return divergence("tvd", student_logits, teacher_logits, temperature=temperature, mask=mask,
                      reduction=reduction, normalizer=normalizer)


def skew_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, mask=None, reduction="mean",
            normalizer=None):
    return divergence("skew_kl", student_logits, teacher_logits, temperature=temperature, mask=mask,
                      reduction=reduction, normalizer=normalizer, alpha=alpha)


def skew_reverse_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, mask=None, reduction="mean",
                    normalizer=None):
    return divergence("skew_reverse_kl", student_logits, teacher_logits, temperature=temperature, mask=mask,
                      reduction=reduction, normalizer=normalizer, alpha=alpha)


def alpha_beta(student_logits, teacher_logits, *, alpha=0.2, beta=0.7, temperature=1.0, mask=None,
               reduction="mean", normalizer=None):
    return divergence("alpha_beta", student_logits, teacher_logits, temperature=temperature, mask=mask,
                      reduction=reduction, normalizer=normalizer, alpha=alpha, beta=beta)


def alpha(student_logits, teacher_logits, *, alpha=0.5, temperature=1.0, mask=None, reduction="mean",
          normalizer=None):
    return divergence("alpha", student_logits, teacher_logits, temperature=temperature, mask=mask,
                      reduction=reduction, normalizer=normalizer, alpha=alpha)


def hellinger(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", normalizer=None):
    return divergence("hellinger", student_logits, teacher_logits, temperature=temperature, mask=mask,
                      reduction=reduction, normalizer=normalizer)


def chi2(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", normalizer=None):
    return divergence("chi2", student_logits, teacher_logits, temperature=temperature, mask=mask,
                      reduction=reduction, normalizer=normalizer)


def cauchy_schwarz(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean",
                   normalizer=None):
    return divergence("cauchy_schwarz", student_logits, teacher_logits, temperature=temperature, mask=mask,
                      reduction=reduction, normalizer=normalizer)


def bdkd(student_logits, teacher_logits, *, high_weight=3.0, low_weight=1.0, temperature=1.0, mask=None,
         reduction="mean", normalizer=None):
    return divergence("bdkd", student_logits, teacher_logits, temperature=temperature, mask=mask,
                      reduction=reduction, normalizer=normalizer, high_weight=high_weight, low_weight=low_weight)


def sinkhorn(student_logits, teacher_logits, *, epsilon=0.1, n_iters=20, cost="l1", temperature=1.0, mask=None,
             reduction="mean", normalizer=None):
    return divergence("sinkhorn", student_logits, teacher_logits, temperature=temperature, mask=mask,
                      reduction=reduction, normalizer=normalizer, epsilon=epsilon, n_iters=n_iters, cost=cost)


_EXAMPLES = {
    "forward_kl": ("forward_kl(s, t)", "1.1504"),
    "reverse_kl": ("reverse_kl(s, t)", "1.1504"),
    "js": ("js(s, t, beta=0.5)", "0.2476"),
    "tvd": ("tvd(s, t)", "0.5752"),
    "skew_kl": ("skew_kl(s, t, alpha=0.1)", "0.8299"),
    "skew_reverse_kl": ("skew_reverse_kl(s, t, alpha=0.1)", "0.8299"),
    "alpha_beta": ("alpha_beta(s, t, alpha=1.0, beta=0.0)", "1.1504"),
    "alpha": ("alpha(s, t, alpha=0.5)", "1.0633"),
    "hellinger": ("hellinger(s, t)", "0.2658"),
    "chi2": ("chi2(s, t)", "4.1724"),
    "cauchy_schwarz": ("cauchy_schwarz(s, t)", "1.0443"),
    "bdkd": ("bdkd(s, t)", "4.6017"),
    "sinkhorn": ("sinkhorn(s, t)", "1.1504"),
}

for _name, (_call, _value) in _EXAMPLES.items():
    globals()[_name].__doc__ = _doc(_name) + (
        "\n    >>> import torch\n    >>> from divergent.functional import " + _name +
        "\n    >>> s = torch.tensor([[0.0, 1.0, 2.0]]); t = torch.tensor([[2.0, 1.0, 0.0]])"
        f"\n    >>> round({_call}.item(), 4)\n    {_value}\n"
    )
