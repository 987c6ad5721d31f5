"""The registry: every divergence's name, parameters, properties and source.

``docs/divergences.md`` is generated from this registry by
``python -m divergent.functional.registry > docs/divergences.md``; a test fails
when the two differ.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from divergent.functional import _math

__all__ = ["ParamSpec", "DivergenceSpec", "available", "get_spec", "render_markdown", "REGISTRY"]


@dataclass(frozen=True)
class ParamSpec:
    """One hyperparameter of a divergence: default and valid range (or choices)."""

    name: str
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    kind: type = float
    choices: tuple[str, ...] | None = None
    hint: str = ""  # appended to the out-of-range message

    def range_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.low is None and self.high is None:
            return "any number"
        left = "[" if self.low_inclusive else "("
        right = "]" if self.high_inclusive else ")"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        noun = "an integer" if self.kind is int else "a number"
        return f"{noun} in {left}{low}, {high}{right}"

    def check(self, divergence: str, value: Any) -> Any:
        where = f"{divergence}: parameter {self.name}"
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"{where} must be {self.range_text()}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{where} must be {self.range_text()}, got {type(value).__name__} {value!r}")
        if self.kind is int:
            if not float(value).is_integer():
                raise ValueError(f"{where} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{where} must be finite, got {value}")
        too_low = self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive))
        too_high = self.high is not None and (value > self.high or (value == self.high and not self.high_inclusive))
        if too_low or too_high:
            raise ValueError(f"{where} must be {self.range_text()}, got {value}{self.hint}")
        return value


@dataclass(frozen=True)
class DivergenceSpec:
    """A registered divergence and what a user needs to know to choose it."""

    name: str
    kernel: Callable[..., Any]  # per row: (lp, lq, zeros, want_weights, **params) -> (rows, w, v)
    formula: str
    summary: str
    behaviour: str  # "mode-covering", "mode-seeking", "in between", "set by parameters"
    symmetric: str  # "yes", "no", or a condition
    bounded: str  # "no" or the bound
    source: str
    params: tuple[ParamSpec, ...] = ()
    per_row: bool = True  # False: the value couples the rows of a batch (sinkhorn)
    accepts_topk: bool = True

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults, reject unknown names, check ranges; returns the full parameter dict."""
        known = {p.name for p in self.params}
        unknown = sorted(set(given) - known)
        if unknown:
            valid = ", ".join(sorted(known)) if known else "none"
            raise TypeError(f"{self.name} got unexpected parameter(s) {', '.join(unknown)}; valid parameters: {valid}")
        return {p.name: p.check(self.name, given.get(p.name, p.default)) for p in self.params}


_JS_ENDS_HINT = (
    ". The generalized JSD tends to 0 at both ends of the open interval (0, 1) (TRL and Liger-Kernel "
    "silently switch to other formulas there); call 'forward_kl' for KL(p‖q) (the beta→0 end) or "
    "'reverse_kl' for KL(q‖p) (the beta→1 end)"
)


_ALPHA_SKEW = ParamSpec("alpha", 0.1, "mixture weight of the first argument (DistiLLM default 0.1); 0 gives plain KL", 0.0, 1.0, True, False)

REGISTRY: dict[str, DivergenceSpec] = {}


def _register(spec: DivergenceSpec) -> None:
    REGISTRY[spec.name] = spec


_register(DivergenceSpec(
    "forward_kl", _math.forward_kl,
    "KL(p‖q) = Σ p log(p/q)",
    "Kullback–Leibler from teacher to student; Hinton KD's loss.",
    "mode-covering", "no", "no",
    "Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network",
))
_register(DivergenceSpec(
    "reverse_kl", _math.reverse_kl,
    "KL(q‖p) = Σ q log(q/p)",
    "Kullback–Leibler from student to teacher; concentrates the student on one mode.",
    "mode-seeking", "no", "no",
    "Gu et al. 2024, MiniLLM: Knowledge Distillation of Large Language Models",
))
_register(DivergenceSpec(
    "js", _math.js,
    "β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q",
    "Generalized Jensen–Shannon (GKD); same numbers as TRL's generalized_jsd_loss for β in (0, 1).",
    "in between", "at beta = 0.5", "≤ H(β) = −β log β − (1−β) log(1−β) (log 2 at β = 0.5)",
    "Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD)",
    params=(ParamSpec("beta", 0.5, "teacher weight in the mixture m", 0.0, 1.0, False, False, hint=_JS_ENDS_HINT),),
))
_register(DivergenceSpec(
    "tvd", _math.tvd,
    "½ Σ |p − q|",
    "Total variation distance; a metric, bounded by 1.",
    "in between", "yes", "≤ 1",
    "Wen et al. 2023, f-Divergence Minimization for Sequence-Level Knowledge Distillation",
))
_register(DivergenceSpec(
    "skew_kl", _math.skew_kl,
    "KL(p ‖ α·p + (1−α)·q)",
    "Skew KL (DistiLLM): forward KL against a student smoothed toward the teacher; finite where q = 0.",
    "mode-covering", "no", "≤ −log α for α > 0",
    "Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models",
    params=(_ALPHA_SKEW,),
))
_register(DivergenceSpec(
    "skew_reverse_kl", _math.skew_reverse_kl,
    "KL(q ‖ α·q + (1−α)·p)",
    "Skew reverse KL (DistiLLM): reverse KL against a teacher smoothed toward the student.",
    "mode-seeking", "no", "≤ −log α for α > 0",
    "Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models",
    params=(_ALPHA_SKEW,),
))
_register(DivergenceSpec(
    "alpha_beta", _math.alpha_beta,
    "−1/(αβ) Σ [p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)], with its limits at α, β or α+β = 0",
    "AB-divergence (ABKD); (1, 0) is forward KL, (0, 1) reverse KL, α+β = 1 the α-divergence.",
    "set by parameters", "when α = β", "no",
    "Wang et al. 2025, ABKD: Pursuing a Proper Allocation of the Probability Mass in KD via α-β-Divergence; "
    "Cichocki, Cruces & Amari 2011",
    params=(
        ParamSpec("alpha", 0.2, "exponent on the teacher p (ABKD GPT-2 default 0.2)", 0.0, None),
        ParamSpec("beta", 0.7, "exponent on the student q (ABKD GPT-2 default 0.7)", 0.0, None),
    ),
))
_register(DivergenceSpec(
    "alpha", _math.alpha,
    "(1 − Σ p^α q^(1−α)) / (α(1−α)); α→1 forward KL, α→0 reverse KL",
    "Amari α-divergence, interpolating reverse KL (α=0), Hellinger-like (α=½) and forward KL (α=1).",
    "set by parameters", "at alpha = 0.5", "≤ 1/(α(1−α)) for 0 < α < 1",
    "Amari 1985; Wang et al. 2023, α-divergence knowledge distillation (AlphaNet)",
    params=(ParamSpec("alpha", 0.5, "interpolation exponent; 1 = forward KL, 0 = reverse KL", 0.0, 1.0),),
))
_register(DivergenceSpec(
    "hellinger", _math.hellinger,
    "½ Σ (√p − √q)²",
    "Squared Hellinger distance; symmetric and bounded by 1.",
    "in between", "yes", "≤ 1",
    "Hellinger 1909; used for distillation in Wen et al. 2023",
))
_register(DivergenceSpec(
    "chi2", _math.chi2,
    "Σ (p − q)² / q",
    "Pearson χ² of p from q; penalises a student that misses teacher mass very strongly.",
    "mode-covering", "no", "no",
    "Pearson 1900; f-divergence family (Wen et al. 2023)",
))
_register(DivergenceSpec(
    "cauchy_schwarz", _math.cauchy_schwarz,
    "−log( Σ p·q / √(Σ p² · Σ q²) )",
    "Cauchy–Schwarz divergence; symmetric and scale-invariant.",
    "in between", "yes", "no",
    "Yu et al. 2024, Cauchy–Schwarz Divergence Information Bottleneck (CS-IB)",
))
_register(DivergenceSpec(
    "bdkd", _math.bdkd,
    "w_f·KL(p‖q) + w_r·KL(q‖p); (w_f, w_r) = (low, high) if H(q) > H(p) else (high, low)",
    "Entropy-balanced forward/reverse KL (BD-KD): weights set per row by the entropy gap. "
    "Weights follow a third-party reimplementation (3 and 1); unverified against the paper.",
    "set by entropy gap", "no", "no",
    "Amara et al. 2022, BD-KD: Balancing the Divergences for Online Knowledge Distillation",
    params=(
        ParamSpec("high_weight", 3.0, "weight of the direction the entropy gap favours", 0.0, None),
        ParamSpec("low_weight", 1.0, "weight of the other direction", 0.0, None),
    ),
))
_register(DivergenceSpec(
    "sinkhorn", _math.sinkhorn_rows,
    "⟨P, W⟩, P = entropic OT plan between student rows and teacher rows, W_ij = ‖q_i − p_j‖₁, K = exp(−W/ε)",
    "Batch-wise Sinkhorn distance (SinKD): couples the rows of a batch; plain scalings, log domain when exp(−W/ε) nears underflow.",
    "batch-level", "no", "≤ 2 for cost l1",
    "Cui et al. 2024, SinKD: Sinkhorn Distance Minimization for Knowledge Distillation",
    params=(
        ParamSpec("epsilon", 0.1, "entropic regularisation ε > 0 (SinKD default 0.1)", 0.0, None, False),
        ParamSpec("n_iters", 20, "alternating row/column normalisations (SinKD default 20)", 1, 100000, kind=int),
        ParamSpec("cost", "l1", "ground cost between rows", choices=("l1", "l2", "sqeuclidean")),
    ),
    per_row=False,
    accepts_topk=False,
))


def available() -> tuple[str, ...]:
    """Names of all registered divergences, in registry order.

    >>> import divergent as dv
    >>> dv.available()[:3]
    ('forward_kl', 'reverse_kl', 'js')
    """
    return tuple(REGISTRY)


def get_spec(name: str) -> DivergenceSpec:
    """The registry entry for ``name``; an unknown name raises ``ValueError`` listing the valid ones.

    >>> import divergent as dv
    >>> spec = dv.get_spec("js")
    >>> spec.behaviour, spec.symmetric, [(p.name, p.default) for p in spec.params]
    ('in between', 'at beta = 0.5', [('beta', 0.5)])
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string naming a divergence, got {type(name).__name__} {name!r}")
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(REGISTRY)}") from None


def render_markdown() -> str:
    """The table of divergences for ``docs/divergences.md`` and the README."""
    lines = [
        "# Divergences",
        "",
        "Generated from `divergent.functional.registry` by",
        "`python -m divergent.functional.registry > docs/divergences.md`; do not edit by hand.",
        "",
        "p = teacher distribution, q = student distribution, both softmax(logits / T).",
        "",
        "| name | formula | parameters | behaviour | symmetric | bounded | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in REGISTRY.values():
        params = "; ".join(f"`{p.name}={p.default!r}` ({p.range_text()})" for p in spec.params) or "—"
        cells = [f"`{spec.name}`", spec.formula, params, spec.behaviour, spec.symmetric, spec.bounded, spec.source]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "## Notes", ""]
    for spec in REGISTRY.values():
        extra = "" if spec.per_row else " Not per-row: `reduction=\"none\"` gives each row's share n·Σ_j P_ij W_ij."
        topk = "" if spec.accepts_topk else " Does not accept a `TopK` teacher."
        lines.append(f"- `{spec.name}`: {spec.summary}{extra}{topk}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
