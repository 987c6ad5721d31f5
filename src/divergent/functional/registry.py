"""The registry: every divergence's name, math, parameters, properties and source.

Everything else is derived from it: ``dv.available()``, the per-name functions of
``divergent.functional`` (signature, docstring and its doctest example), ``__all__``,
``docs/divergences.md`` (``python -m divergent.functional.registry > docs/divergences.md``;
a test fails when the two differ) and the list of divergences the Triton kernel computes
(``triton_divergence.SUPPORTED_NAMES``, the specs with a ``triton_kernel``).

A divergence is computed by one of two kinds of function:

- ``kernel`` (built-ins): ``(lp, lq, zeros, want_weights, **params) -> (rows, w, v)``,
  the value and closed-form gradient weights per row (see :mod:`divergent.functional._math`);
- ``fn`` (users, and built-ins that couple rows): ``fn(student_logprobs, teacher_logprobs,
  **params) -> rows`` in torch; autograd supplies the gradient.

:func:`register_divergence` adds an ``fn`` divergence under a new name; it then works
everywhere a built-in does.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from divergent.functional import _math

_FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: parameters meet float32 logits

__all__ = [
    "ParamSpec",
    "DivergenceSpec",
    "available",
    "get_spec",
    "register_divergence",
    "unregister_divergence",
    "render_markdown",
    "REGISTRY",
    "METADATA_KEYS",
    "RESERVED_PARAMETER_NAMES",
    "reserve_name",
    "release_name",
]

_KINDS = {bool: "True or False", str: "a string"}


@dataclass(frozen=True)
class ParamSpec:
    """One hyperparameter of a divergence: default, kind and valid range (or choices).

    ``kind`` is ``float``, ``int``, ``bool`` or ``str``; numbers may carry a range
    (``low``/``high``), strings a tuple of ``choices``.
    """

    name: str
    default: Any
    doc: str = ""
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
        if self.kind in _KINDS:
            return _KINDS[self.kind]
        noun = "an integer" if self.kind is int else "a number"
        if self.low is None and self.high is None:
            return noun if self.kind is int else "any finite number"
        left = "[" if self.low_inclusive else "("
        right = "]" if self.high_inclusive else ")"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{noun} in {left}{low}, {high}{right}"

    def check(self, divergence: str, value: Any) -> Any:
        """``value`` converted to the parameter's kind; raises naming the parameter when invalid."""
        where = f"{divergence}: parameter {self.name}"
        if self.choices is not None:
            if not isinstance(value, str) or value not in self.choices:
                raise ValueError(f"{where} must be {self.range_text()}, got {value!r}")
            return value
        if self.kind is bool or self.kind is str:
            if not isinstance(value, self.kind):
                raise TypeError(f"{where} must be {self.range_text()}, got {type(value).__name__} {value!r}")
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
            if abs(value) > _FLOAT32_MAX:
                raise ValueError(
                    f"{where} must be finite in float32 (|value| ≤ {_FLOAT32_MAX:.4g}), the dtype divergences "
                    f"compute in, got {value:g}"
                )
        too_low = self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive))
        too_high = self.high is not None and (value > self.high or (value == self.high and not self.high_inclusive))
        if too_low or too_high:
            raise ValueError(f"{where} must be {self.range_text()}, got {value}{self.hint}")
        return value


@dataclass(frozen=True)
class DivergenceSpec:
    """A registered divergence: how it is computed and what a user needs to know to choose it.

    Exactly one of ``kernel`` and ``fn`` is set (see the module docstring).
    ``example`` is the per-name function's doctest: a call on
    ``s = [[0, 1, 2]]``, ``t = [[2, 1, 0]]`` and its value rounded to 4 digits.
    ``triton_kernel`` names the fused Triton kernel that computes this divergence
    (a key of ``triton_divergence.KERNEL_CONSTANTS``); None means the chunked torch path.
    """

    name: str
    kernel: Callable[..., Any] | None = None
    fn: Callable[..., Any] | None = None
    formula: str = ""
    summary: str = ""
    behaviour: str = ""  # "mode-covering", "mode-seeking", "in between", "set by parameters"
    symmetric: str = ""  # "yes", "no", or a condition
    bounded: str = ""  # "no" or the bound
    source: str = ""
    params: tuple[ParamSpec, ...] = ()
    per_row: bool = True  # False: the value couples the rows of a batch (sinkhorn)
    accepts_topk: bool = True
    example: tuple[str, str] | None = None
    triton_kernel: str | None = None
    builtin: bool = False
    # True: on a TopK teacher's k+1 buckets the kernel is called with ``tail=True`` (the last
    # column is the tail bucket, not a class); kl_top then picks its top k among the stored classes.
    tail_aware: bool = False

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults, reject unknown names, check ranges; returns the full parameter dict."""
        if not given:
            if not self.params:
                return {}
            return {p.name: p.default for p in self.params}  # defaults were checked when registered
        known = [p.name for p in self.params]
        unknown = sorted(set(given) - set(known))
        if unknown:
            valid = ", ".join(sorted(known)) if known else "none"
            hint = "".join(_did_you_mean(name, known) for name in unknown)
            raise TypeError(
                f"{self.name} got unexpected parameter(s) {', '.join(unknown)}{hint}; valid parameters: {valid}"
            )
        return {p.name: p.check(self.name, given.get(p.name, p.default)) for p in self.params}

    @property
    def function_name(self) -> str:
        """How ``fn``/``kernel`` is named in messages."""
        compute = self.fn if self.fn is not None else self.kernel
        module = getattr(compute, "__module__", None)
        qualname = getattr(compute, "__qualname__", None) or repr(compute)
        return f"{module}.{qualname}" if module else qualname


def _did_you_mean(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


REGISTRY: dict[str, DivergenceSpec] = {}

# Names other registries hold in the same namespace (a ``compare`` row or a trainer's
# ``method`` is a divergence or a classifier method): name -> what holds it. Filled by
# :func:`reserve_name` (the method registry calls it), checked by :func:`register_divergence`.
_RESERVED: dict[str, str] = {}


def reserve_name(name: str, holder: str) -> None:
    """Keep ``name`` from being registered as a divergence; ``holder`` says what it is (for the error)."""
    _RESERVED[name] = holder


def release_name(name: str) -> None:
    """Undo :func:`reserve_name` (when that method is unregistered)."""
    _RESERVED.pop(name, None)

# Keyword arguments that the functions and loss modules take next to a divergence's
# parameters; a parameter of that name could never be passed.
RESERVED_PARAMETER_NAMES = frozenset({
    "name", "student_logits", "teacher_logits", "temperature", "mask", "reduction", "normalizer",
    "t2_scale", "hard_weight", "soft_weight", "ignore_index", "chunk_size", "vocab_size",
    "accumulation_dtype", "labels", "student_input", "student_weight", "teacher_input", "teacher_weight",
    "overwrite", "params",
})

# Metadata a user may give to register_divergence (the rest of DivergenceSpec is derived).
METADATA_KEYS = ("formula", "summary", "behaviour", "symmetric", "bounded", "source", "per_row", "accepts_topk")


def _register_builtin(**fields: Any) -> None:
    spec = DivergenceSpec(builtin=True, **fields)
    if (spec.kernel is None) == (spec.fn is None):
        raise AssertionError(f"{spec.name}: give exactly one of kernel and fn")
    for param in spec.params:
        param.check(spec.name, param.default)
    REGISTRY[spec.name] = spec


_JS_ENDS_HINT = (
    ". The generalized JSD tends to 0 at both ends of the open interval (0, 1) (TRL and Liger-Kernel "
    "silently switch to other formulas there); call 'forward_kl' for KL(p‖q) (the beta→0 end) or "
    "'reverse_kl' for KL(q‖p) (the beta→1 end)"
)
_ALPHA_SKEW = ParamSpec("alpha", 0.1, "mixture weight of the first argument (DistiLLM default 0.1); 0 gives plain KL",
                        0.0, 1.0, True, False)

_register_builtin(
    name="forward_kl", kernel=_math.forward_kl, triton_kernel="forward_kl", example=("", "1.1504"),
    formula="KL(p‖q) = Σ p log(p/q)",
    summary="Kullback–Leibler from teacher to student; Hinton KD's loss.",
    behaviour="mode-covering", symmetric="no", bounded="no",
    source="Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network",
)
_register_builtin(
    name="reverse_kl", kernel=_math.reverse_kl, triton_kernel="reverse_kl", example=("", "1.1504"),
    formula="KL(q‖p) = Σ q log(q/p)",
    summary="Kullback–Leibler from student to teacher; concentrates the student on one mode.",
    behaviour="mode-seeking", symmetric="no", bounded="no",
    source="Gu et al. 2024, MiniLLM: Knowledge Distillation of Large Language Models",
)
_register_builtin(
    name="js", kernel=_math.js, triton_kernel="js", example=("beta=0.5", "0.2476"),
    formula="β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q",
    summary="Generalized Jensen–Shannon (GKD); same numbers as TRL's generalized_jsd_loss for β in (0, 1).",
    behaviour="in between", symmetric="at beta = 0.5",
    bounded="≤ H(β) = −β log β − (1−β) log(1−β) (log 2 at β = 0.5)",
    source="Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD)",
    params=(ParamSpec("beta", 0.5, "teacher weight in the mixture m", 0.0, 1.0, False, False, hint=_JS_ENDS_HINT),),
)
_register_builtin(
    name="tvd", kernel=_math.tvd, triton_kernel="tvd", example=("", "0.5752"),
    formula="½ Σ |p − q|",
    summary="Total variation distance; a metric, bounded by 1.",
    behaviour="in between", symmetric="yes", bounded="≤ 1",
    source="Wen et al. 2023, f-Divergence Minimization for Sequence-Level Knowledge Distillation",
)
_register_builtin(
    name="skew_kl", kernel=_math.skew_kl, triton_kernel="skew_kl", example=("alpha=0.1", "0.8299"),
    formula="KL(p ‖ α·p + (1−α)·q)",
    summary="Skew KL (DistiLLM): forward KL against a student smoothed toward the teacher; finite where q = 0.",
    behaviour="mode-covering", symmetric="no", bounded="≤ −log α for α > 0",
    source="Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models",
    params=(_ALPHA_SKEW,),
)
_register_builtin(
    name="skew_reverse_kl", kernel=_math.skew_reverse_kl, triton_kernel="skew_reverse_kl",
    example=("alpha=0.1", "0.8299"),
    formula="KL(q ‖ α·q + (1−α)·p)",
    summary="Skew reverse KL (DistiLLM): reverse KL against a teacher smoothed toward the student.",
    behaviour="mode-seeking", symmetric="no", bounded="≤ −log α for α > 0",
    source="Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models",
    params=(_ALPHA_SKEW,),
)
_register_builtin(
    name="alpha_beta", kernel=_math.alpha_beta, triton_kernel="alpha_beta", example=("alpha=1.0, beta=0.0", "1.1504"),
    formula="−1/(αβ) Σ [p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)], with its limits at α, β or α+β = 0",
    summary="AB-divergence (ABKD); (1, 0) is forward KL, (0, 1) reverse KL, α+β = 1 the α-divergence. "
            "Continuous in α and β down to 0 (computed without cancellation there).",
    behaviour="set by parameters", symmetric="when α = β", bounded="no",
    source="Wang et al. 2025, ABKD: Pursuing a Proper Allocation of the Probability Mass in KD via α-β-Divergence; "
           "Cichocki, Cruces & Amari 2011",
    params=(
        ParamSpec("alpha", 0.2, "exponent on the teacher p (ABKD GPT-2 default 0.2)", 0.0, None),
        ParamSpec("beta", 0.7, "exponent on the student q (ABKD GPT-2 default 0.7)", 0.0, None),
    ),
)
_register_builtin(
    name="alpha", kernel=_math.alpha, triton_kernel="alpha", example=("alpha=0.5", "1.0633"),
    formula="(1 − Σ p^α q^(1−α)) / (α(1−α)); α→1 forward KL, α→0 reverse KL",
    summary="Amari α-divergence, interpolating reverse KL (α=0), Hellinger-like (α=½) and forward KL (α=1).",
    behaviour="set by parameters", symmetric="at alpha = 0.5", bounded="≤ 1/(α(1−α)) for 0 < α < 1",
    source="Amari 1985; Wang et al. 2023, α-divergence knowledge distillation (AlphaNet)",
    params=(ParamSpec("alpha", 0.5, "interpolation exponent; 1 = forward KL, 0 = reverse KL", 0.0, 1.0),),
)
_register_builtin(
    name="hellinger", kernel=_math.hellinger, triton_kernel="hellinger", example=("", "0.2658"),
    formula="½ Σ (√p − √q)²",
    summary="Squared Hellinger distance; symmetric and bounded by 1.",
    behaviour="in between", symmetric="yes", bounded="≤ 1",
    source="Hellinger 1909; used for distillation in Wen et al. 2023",
)
_register_builtin(
    name="chi2", kernel=_math.chi2, triton_kernel="chi2", example=("", "4.1724"),
    formula="Σ (p − q)² / q",
    summary="Pearson χ² of p from q; penalises a student that misses teacher mass very strongly.",
    behaviour="mode-covering", symmetric="no", bounded="no",
    source="Pearson 1900; f-divergence family (Wen et al. 2023)",
)
_register_builtin(
    name="cauchy_schwarz", kernel=_math.cauchy_schwarz, triton_kernel="cauchy_schwarz", example=("", "1.0443"),
    formula="−log( Σ p·q / √(Σ p² · Σ q²) )",
    summary="Cauchy–Schwarz divergence; symmetric and scale-invariant.",
    behaviour="in between", symmetric="yes", bounded="no",
    source="Yu et al. 2024, Cauchy–Schwarz Divergence Information Bottleneck (CS-IB)",
)
_register_builtin(
    name="bdkd", kernel=_math.bdkd, triton_kernel="bdkd", example=("", "4.6017"),
    formula="w_f·KL(p‖q) + w_r·KL(q‖p); (w_f, w_r) = (low, high) if H(q) > H(p) else (high, low)",
    summary="Entropy-balanced forward/reverse KL (BD-KD): weights set per row by the entropy gap. "
            "Weights follow a third-party reimplementation (3 and 1); unverified against the paper. "
            "A direction with weight 0 adds nothing, even where its KL is infinite.",
    behaviour="set by entropy gap", symmetric="no", bounded="no",
    source="Amara et al. 2022, BD-KD: Balancing the Divergences for Online Knowledge Distillation",
    params=(
        ParamSpec("high_weight", 3.0, "weight of the direction the entropy gap favours", 0.0, None),
        ParamSpec("low_weight", 1.0, "weight of the other direction", 0.0, None),
    ),
)
_register_builtin(
    name="sinkhorn", fn=_math.sinkhorn_rows, example=("", "1.1504"),
    formula="⟨P, W⟩, P = entropic OT plan between student rows and teacher rows, W_ij = ‖q_i − p_j‖₁, K = exp(−W/ε)",
    summary="Batch-wise Sinkhorn distance (SinKD): couples the rows of a batch; plain scalings, log domain when "
            "exp(−W/ε) nears underflow.",
    behaviour="batch-level", symmetric="no", bounded="≤ 2 for cost l1",
    source="Cui et al. 2024, SinKD: Sinkhorn Distance Minimization for Knowledge Distillation",
    params=(
        ParamSpec("epsilon", 0.1, "entropic regularisation ε > 0 (SinKD default 0.1)", 0.0, None, False),
        ParamSpec("n_iters", 20, "alternating row/column normalisations (SinKD default 20)", 1, 100000, kind=int),
        ParamSpec("cost", "l1", "ground cost between rows", kind=str, choices=("l1", "l2", "sqeuclidean")),
    ),
    per_row=False,
    accepts_topk=False,
)
_register_builtin(
    name="kl_top", kernel=_math.kl_top, example=("k=2", "1.3305"), tail_aware=True,
    formula="Σ_{i∈TopK(p)} p_i (log p_i − log q_i), full-vocabulary p and q; renormalize: KL(p̃‖q̃) over TopK(p)",
    summary="OSTQuant's KL-Top: forward KL restricted to the teacher's (full-precision model's) top-k classes, "
            "as the partial sum with full-vocabulary probabilities (the released scripts' post_attn=True) or, "
            "with renormalize=True, renormalised over the k classes. The partial sum is not a divergence in the "
            "strict sense: it is negative where the student puts more mass than the teacher on those classes "
            "(it is ≥ P log P ≥ −1/e, P = the teacher's top-k mass); renormalised it is a KL, ≥ 0. k above the vocabulary takes every class "
            "(plain forward KL; the official torch.topk would raise). On a TopK teacher the top k are taken among "
            "its stored classes (k is at most the stored k; the tail bucket is never one of them). "
            "No fused Triton kernel: the output-layer loss takes its chunked PyTorch path.",
    behaviour="mode-covering", symmetric="no", bounded="no",
    source="Hu et al. 2025, OSTQuant: Refining Large Language Model Quantization with Orthogonal and Scaling "
           "Transformations for Better Distribution Fitting (ICLR 2025), quant/trainer.py compute_loss",
    params=(
        ParamSpec("k", 1000, "number of the teacher's most probable classes kept (OSTQuant default 1000)", 1, None,
                  kind=int),
        ParamSpec("renormalize", False, "renormalise p and q over the k classes (the released scripts do not)",
                  kind=bool),
    ),
)



def available() -> tuple[str, ...]:
    """Names of all registered divergences: the built-ins in registry order, then the user's.

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
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        pass
    if not isinstance(name, str):
        raise TypeError(f"name must be a string naming a divergence, got {type(name).__name__} {name!r}")
    raise ValueError(
        f"unknown divergence {name!r}{_did_you_mean(name, REGISTRY)}; valid names: {', '.join(REGISTRY)}"
    )


def _param_specs(divergence: str, params: Mapping[str, Any] | None) -> tuple[ParamSpec, ...]:
    """ParamSpecs from ``{name: default}`` (kind from the default's type) or ``{name: ParamSpec}``."""
    if params is None:
        return ()
    if not isinstance(params, Mapping):
        raise TypeError(
            f"register_divergence({divergence!r}): params must map parameter names to defaults, e.g. "
            f"{{'gamma': 2.0}}, got {type(params).__name__}"
        )
    specs = []
    for name, default in params.items():
        where = f"register_divergence({divergence!r}): parameter {name!r}"
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{where}: a parameter name must be a Python identifier")
        if name in RESERVED_PARAMETER_NAMES:
            raise ValueError(
                f"{where}: the name is taken by an argument of the functions and losses that take "
                f"divergence parameters ({', '.join(sorted(RESERVED_PARAMETER_NAMES))}); choose another"
            )
        if isinstance(default, ParamSpec):
            if default.name != name:
                raise ValueError(f"{where}: its ParamSpec is named {default.name!r}")
            spec = default
        elif isinstance(default, bool):
            spec = ParamSpec(name, default, kind=bool)
        elif isinstance(default, numbers.Integral):
            spec = ParamSpec(name, int(default), kind=int)
        elif isinstance(default, numbers.Real):
            spec = ParamSpec(name, float(default), kind=float)
        elif isinstance(default, str):
            spec = ParamSpec(name, default, kind=str)
        else:
            raise TypeError(
                f"{where}: the default must be a bool, int, float or str (its type is the parameter's type), "
                f"or a ParamSpec; got {type(default).__name__} {default!r}"
            )
        spec.check(divergence, spec.default)
        specs.append(spec)
    return tuple(specs)


def _check_callable(divergence: str, fn: Any, params: tuple[ParamSpec, ...]) -> None:
    if not callable(fn):
        raise TypeError(
            f"register_divergence({divergence!r}): fn must be callable as fn(student_logprobs, teacher_logprobs, "
            f"**params), got {type(fn).__name__} {fn!r}"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C functions have none; they are checked when called
        return
    try:
        signature.bind(None, None, **{p.name: p.default for p in params})
    except TypeError as exc:
        call = ", ".join(["student_logprobs", "teacher_logprobs", *(f"{p.name}=..." for p in params)])
        raise TypeError(
            f"register_divergence({divergence!r}): fn {getattr(fn, '__qualname__', fn)}{signature} cannot be "
            f"called as fn({call}): {exc}"
        ) from None


def register_divergence(
    name: str,
    fn: Callable[..., Any],
    *,
    params: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    **metadata: Any,
) -> DivergenceSpec:
    """Register a divergence under ``name``; it then works everywhere a built-in does.

    ``fn(student_logprobs, teacher_logprobs, **params)`` receives ``[n, V]`` tempered
    log-probabilities (float32, or float64 for float64 logits; ``-inf`` where a probability
    is 0) and returns the divergence of each row, a tensor of shape ``[n]``; autograd
    supplies the gradient. ``params`` maps each parameter name to its default; a value
    passed later must have the default's type (``2.0``: a float, ``3``: an int) — or give
    a :class:`ParamSpec` for a range. ``metadata``: any of ``formula``, ``summary``,
    ``behaviour``, ``symmetric``, ``bounded``, ``source`` (text for the docs) and
    ``per_row`` (False when a row's value depends on other rows: no chunked fused loss),
    ``accepts_topk`` (False: a ``dv.TopK`` teacher is refused). A taken name raises
    unless ``overwrite=True``; built-in names can never be replaced.

    The name then works in ``dv.divergence``, ``dv.functional.<name>``, ``dv.DivergenceLoss``,
    ``dv.DistillationLoss``, ``dv.LinearDistillationLoss`` (on the chunked torch path; the
    fused Triton kernel covers built-ins only) and wherever a trainer takes a divergence name.

    >>> import torch, divergent as dv
    >>> def squared_logratio(lq, lp, gamma):
    ...     return gamma * ((lp - lq) ** 2 * lp.exp()).sum(-1)
    >>> spec = dv.register_divergence("weighted_sq", squared_logratio, params={"gamma": 1.0},
    ...                               summary="teacher-weighted squared log-ratio")
    >>> s = torch.tensor([[0.0, 1.0, 2.0]]); t = torch.tensor([[2.0, 1.0, 0.0]])
    >>> round(dv.divergence("weighted_sq", s, t, gamma=0.5).item(), 4)
    1.5105
    >>> dv.functional.registry.unregister_divergence("weighted_sq")
    """
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise ValueError(
            f"register_divergence: name must be a Python identifier not starting with '_' (it becomes "
            f"divergent.functional.<name>), got {name!r}"
        )
    if not isinstance(overwrite, bool):
        raise TypeError(f"register_divergence({name!r}): overwrite must be True or False, got {overwrite!r}")
    # The classifier methods share this namespace; importing their registry (at call time: it
    # sits above this layer) reserves their names, also when divergent.methods was not imported yet.
    importlib.import_module("divergent.methods.registry")
    if name in _RESERVED:
        raise ValueError(
            f"{name!r} is already {_RESERVED[name]}; a divergence of that name would make compare rows and "
            f"ClassifierTrainConfig(method=...) ambiguous — register yours under another name"
        )
    existing = REGISTRY.get(name)
    if existing is not None and existing.builtin:
        raise ValueError(f"{name!r} is a built-in divergence and cannot be replaced; register yours under another name")
    if existing is not None and not overwrite:
        raise ValueError(
            f"divergence {name!r} is already registered (computed by {existing.function_name}); pass "
            f"overwrite=True to replace it, or call divergent.functional.registry.unregister_divergence({name!r})"
        )
    unknown = sorted(set(metadata) - set(METADATA_KEYS))
    if unknown:
        hint = "".join(_did_you_mean(key, METADATA_KEYS) for key in unknown)
        raise TypeError(
            f"register_divergence({name!r}) got unknown metadata {', '.join(unknown)}{hint}; "
            f"valid keys: {', '.join(METADATA_KEYS)}"
        )
    for key, value in metadata.items():
        kind = bool if key in ("per_row", "accepts_topk") else str
        if not isinstance(value, kind):
            raise TypeError(
                f"register_divergence({name!r}): {key} must be {'True or False' if kind is bool else 'a string'}, "
                f"got {type(value).__name__} {value!r}"
            )
    param_specs = _param_specs(name, params)
    _check_callable(name, fn, param_specs)
    described = {key: "not stated" for key in ("formula", "behaviour", "symmetric", "bounded", "source")}
    described["summary"] = f"User-registered divergence, computed by {getattr(fn, '__qualname__', repr(fn))}."
    spec = DivergenceSpec(name=name, fn=fn, params=param_specs, **{**described, **metadata})
    REGISTRY[name] = spec
    return spec


def unregister_divergence(name: str) -> None:
    """Remove a divergence added by :func:`register_divergence` (for tests and plugins).

    Built-in names cannot be removed; an unknown name raises like :func:`get_spec`.
    """
    if get_spec(name).builtin:
        raise ValueError(f"{name!r} is a built-in divergence and cannot be unregistered")
    del REGISTRY[name]


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
    fused = ", ".join(f"`{spec.name}`" for spec in REGISTRY.values() if spec.triton_kernel)
    lines += [
        "",
        f"`dv.LinearDistillationLoss` on CUDA runs a fused Triton kernel for {fused}; other per-row",
        "divergences take its chunked PyTorch path.",
        "",
        "Add your own with `dv.register_divergence(name, fn, params={...})` (see its docstring);",
        "to add a built-in, follow CONTRIBUTING.md.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
