"""The classifier-method registry: every method's name, kind, loss, parameters and source.

One entry per method, written once here; everything else is derived from it: the names
``train_classifier`` and ``divergent compare`` accept, the defaults (read from the loss
function's own keyword defaults with :func:`inspect.signature`, plus a few declared
objective-level knobs), the "did you mean" of an unknown name, and the table in
``docs/methods.md`` (``python -m divergent.methods`` prints it; a test fails when
the two differ). A registered divergence name (``divergent.available()``) is a method too:
offline KD with that divergence.

An entry's ``adapter`` tells the classifier trainer how to feed its loss:

=================== =====================================================================
``logits``          ``fn(student_logits, teacher_logits, labels, **params)`` → scalar, or a
                    tuple of scalars that is summed (online methods: one loss per network);
                    ``epoch=`` (from 0) is passed too when ``fn`` has that parameter.
                    What :func:`register_method` is for.
``divergence``      hard_weight · CE + soft_weight · T² · D(p_T ‖ q_T) with a registered divergence
``ce``              cross-entropy on the labels alone (no ``fn``)
``nd``              Hinton KD + ``nd_weight`` · ``fn`` on penultimate features and class centres
``ofa``             CE + ``ofa_weight`` · ``fn`` on the logits and on projector branches
``mcmi-teacher``    ``fn(logits, labels, centroids=…, **params)`` on the model being fine-tuned
``pskd``            ``fn(logits, labels, previous_probs, alpha_t)`` with per-sample memory
``uskd``            ``fn(logits, labels, weak_logits=…, **params)`` with a weak mid-level head
=================== =====================================================================

>>> from divergent.methods import get_method
>>> spec = get_method("kd")            # an alias
>>> spec.name, spec.kind, dict(spec.defaults)
('hinton', 'offline', {'temperature': 4.0, 'hard_weight': 0.1, 'soft_weight': 0.9})
>>> get_method("dkd").resolve({"beta": 4.0})["beta"]
4.0
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from divergent.functional import available as available_divergences
from divergent.functional import get_spec as get_divergence_spec
from divergent.functional.registry import release_name, reserve_name
from divergent.methods import dkd, kd, mcmi, nd, nkd, ofa, online, self_kd

__all__ = [
    "ADAPTERS",
    "KINDS",
    "MethodSpec",
    "available_methods",
    "get_method",
    "method_aliases",
    "method_kind",
    "register_method",
    "render_markdown",
    "resolve_method_params",
    "unregister_method",
]

KINDS = ("offline", "online", "self", "plain")
ADAPTERS = ("logits", "divergence", "ce", "nd", "ofa", "mcmi-teacher", "pskd", "uskd")
METADATA_KEYS = ("summary", "source", "formula")

# Inputs the trainer supplies to each special adapter's function (not parameters a user sets).
_ADAPTER_INPUTS = {
    "ce": (),
    "nd": ("student_features", "teacher_features", "labels", "centers"),
    "ofa": ("student_logits", "teacher_logits", "labels"),
    "mcmi-teacher": ("teacher_logits", "labels", "centroids"),
    "pskd": ("logits", "labels", "previous_probs", "alpha_t", "epoch", "epochs"),
    "uskd": ("logits", "labels", "weak_logits"),
}


@dataclass(frozen=True)
class MethodSpec:
    """A registered classifier method and what a user needs to know to choose it.

    name: the name ``ClassifierTrainConfig(method=...)`` takes.
    kind: ``"offline"`` (frozen teacher), ``"online"`` (teacher trained alongside),
        ``"self"`` (no teacher) or ``"plain"`` (hard labels / the given model alone).
    adapter: how the classifier trainer feeds ``fn`` (see the module docs).
    fn: the loss function (``None`` for ``ce``).
    defaults: every parameter and its default — the keyword defaults of ``fn`` (and of
        ``params_from``) followed by ``extra_params``; read-only.
    extra_params: objective-level knobs that are not arguments of ``fn`` (e.g. ``nd_weight``).
    aliases: other names that resolve to this method.
    takes_epoch: ``fn`` has an ``epoch`` parameter (the trainer passes the epoch, from 0).
    summary, source, formula: one line each, for the docs.
    builtin: False for methods added with :func:`register_method`.
    """

    name: str
    kind: str
    adapter: str
    fn: Callable[..., Any] | None
    defaults: Mapping[str, Any]
    extra_params: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    takes_epoch: bool = False
    summary: str = ""
    source: str = ""
    formula: str = ""
    builtin: bool = True

    @property
    def noun(self) -> str:
        return "divergence" if self.adapter == "divergence" else "method"

    def resolve(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults with ``overrides`` applied; an unknown name raises ``ValueError`` naming the valid ones.

        Values are checked where they are used (the loss function or the divergence).
        """
        overrides = {} if overrides is None else overrides
        if not isinstance(overrides, Mapping):
            raise TypeError(f"params for {self.noun} {self.name!r} must be a mapping, got {type(overrides).__name__}")
        unknown = [k for k in overrides if k not in self.defaults]
        if unknown:
            hint = _did_you_mean(str(unknown[0]), self.defaults)
            raise ValueError(
                f"unknown parameter(s) {unknown} for {self.noun} {self.name!r}; valid: {list(self.defaults)}{hint}"
            )
        return {**self.defaults, **overrides}


_REGISTRY: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def keyword_defaults(fn: Callable[..., Any], skip: Iterable[str] = ()) -> dict[str, Any]:
    """``{name: default}`` of ``fn``'s parameters that have a default, minus ``skip``."""
    skip = set(skip)
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in skip
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def _logits_signature(name: str, fn: Callable[..., Any]) -> tuple[dict[str, Any], bool]:
    """Parameters (with defaults) and whether ``fn`` takes ``epoch``, for the ``logits`` adapter."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as error:
        raise TypeError(f"register_method({name!r}): cannot read the signature of fn ({error})") from None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in parameters):
        raise TypeError(
            f"register_method({name!r}): fn must take (student_logits, teacher_logits, labels, **params), "
            f"got parameters {[p.name for p in parameters]}"
        )
    inputs = {p.name for p in positional[:3]} | {"epoch"}
    missing = [
        p.name for p in parameters
        if p.name not in inputs and p.default is inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if missing:
        raise TypeError(
            f"register_method({name!r}): parameter(s) {missing} of fn need a default (the method's "
            "defaults are read from fn's signature)"
        )
    names = [p.name for p in parameters]
    return keyword_defaults(fn, skip=inputs), "epoch" in names


def _make_spec(
    name: str,
    fn: Callable[..., Any] | None,
    *,
    kind: str,
    adapter: str,
    aliases: Iterable[str] = (),
    extra_params: Mapping[str, Any] | None = None,
    params_from: Iterable[Callable[..., Any]] = (),
    builtin: bool,
    metadata: Mapping[str, Any],
) -> MethodSpec:
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if adapter not in ADAPTERS or adapter == "divergence":
        valid = [a for a in ADAPTERS if a != "divergence"]
        raise ValueError(f"adapter must be one of {', '.join(valid)}, got {adapter!r} "
                         "(a divergence is registered with divergent.register_divergence)")
    if fn is None and adapter != "ce":
        raise TypeError(f"method {name!r}: fn must be a callable loss function, got None")
    if fn is not None and not callable(fn):
        raise TypeError(f"method {name!r}: fn must be callable, got {type(fn).__name__}")
    unknown_meta = sorted(set(metadata) - set(METADATA_KEYS))
    if unknown_meta:
        raise TypeError(f"register_method got unexpected keyword(s) {unknown_meta}; metadata keys: {list(METADATA_KEYS)}")
    extra = dict(extra_params or {})
    if adapter == "logits":
        if kind not in ("offline", "online"):
            raise ValueError(f"method {name!r}: the 'logits' adapter needs a teacher, so kind must be "
                             f"'offline' or 'online', got {kind!r}")
        defaults, takes_epoch = _logits_signature(name, fn)
    else:
        skip = _ADAPTER_INPUTS[adapter]
        defaults = {}
        for source in (*params_from, *([fn] if fn is not None else [])):
            defaults.update(keyword_defaults(source, skip=skip))
        takes_epoch = False
    clash = sorted(set(extra) & set(defaults))
    if clash:
        raise ValueError(f"method {name!r}: extra_params {clash} are already parameters of fn")
    defaults.update(extra)
    return MethodSpec(
        name=name, kind=kind, adapter=adapter, fn=fn,
        defaults=MappingProxyType(defaults), extra_params=MappingProxyType(extra),
        aliases=tuple(aliases), takes_epoch=takes_epoch, builtin=builtin,
        summary=str(metadata.get("summary", "")), source=str(metadata.get("source", "")),
        formula=str(metadata.get("formula", "")),
    )


def _add(spec: MethodSpec) -> None:
    taken = set(_REGISTRY) | set(_ALIASES)
    for new in (spec.name, *spec.aliases):
        if new in taken:
            raise ValueError(f"method name {new!r} is already registered; choose another name "
                             "(or unregister_method it first)")
        if new in available_divergences():
            raise ValueError(f"{new!r} is a registered divergence (offline KD with it is already a method); "
                             "choose another name")
    _REGISTRY[spec.name] = spec
    reserve_name(spec.name, f"a classifier method ({spec.kind})")
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
        reserve_name(alias, f"an alias of the classifier method {spec.name!r}")


def register_method(
    name: str,
    fn: Callable[..., Any],
    *,
    kind: str = "offline",
    adapter: str = "logits",
    aliases: Iterable[str] = (),
    extra_params: Mapping[str, Any] | None = None,
    **metadata: Any,
) -> MethodSpec:
    """Register a classifier method under ``name``; returns its :class:`MethodSpec`.

    With the default ``adapter="logits"``, ``fn(student_logits, teacher_logits, labels, **params)``
    returns the scalar loss (or a tuple of scalars, summed — an online method's two losses),
    and gets ``epoch=`` (counted from 0) when it has that parameter. Its parameters are its
    keyword arguments with defaults; ``extra_params`` (name → default) adds parameters that
    ``fn`` takes through ``**kwargs``. ``kind`` is ``"offline"`` (frozen teacher) or
    ``"online"`` (teacher trained too). ``metadata``: ``summary``, ``source``, ``formula``.

    The name then works wherever a built-in method does: ``ClassifierTrainConfig(method=name,
    params={...})``, ``train_classifier`` and ``divergent compare`` rows.

    >>> import torch.nn.functional as F
    >>> def mse_kd(student_logits, teacher_logits, labels, *, weight=1.0):
    ...     return F.cross_entropy(student_logits, labels) + weight * F.mse_loss(student_logits, teacher_logits)
    >>> spec = register_method("mse-kd", mse_kd, summary="CE + logit MSE")
    >>> dict(spec.defaults), spec.kind
    ({'weight': 1.0}, 'offline')
    >>> unregister_method("mse-kd")
    """
    spec = _make_spec(name, fn, kind=kind, adapter=adapter, aliases=aliases, extra_params=extra_params,
                      builtin=False, metadata=metadata)
    _add(spec)
    return spec


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (built-ins cannot be removed)."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"no registered method {name!r}; registered: {', '.join(_REGISTRY)}")
    if spec.builtin:
        raise ValueError(f"{name!r} is a built-in method and cannot be unregistered")
    del _REGISTRY[name]
    release_name(name)
    for alias in spec.aliases:
        _ALIASES.pop(alias, None)
        release_name(alias)


def available_methods(*, aliases: bool = False) -> tuple[str, ...]:
    """Names of the registered classifier methods, in registry order (then aliases if asked).

    Every divergence name (``divergent.available()``) is accepted as a method too.
    """
    return tuple(_REGISTRY) + (tuple(_ALIASES) if aliases else ())


def method_aliases() -> dict[str, str]:
    """``{alias: method name}`` of every registered alias."""
    return dict(_ALIASES)


def get_method(name: str) -> MethodSpec:
    """The spec of a method, an alias or a registered divergence (offline KD with it).

    An unknown name raises ``ValueError`` with a "did you mean" and the valid names.
    """
    if not isinstance(name, str):
        raise TypeError(f"method must be a string naming a method or a divergence, got {type(name).__name__} {name!r}")
    name = _ALIASES.get(name, name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in available_divergences():
        return _divergence_method(name)
    hint = _did_you_mean(name, [*available_divergences(), *_REGISTRY, *_ALIASES])
    raise ValueError(
        f"unknown method {name!r}{hint}; valid: a divergence "
        f"({', '.join(available_divergences())}) or a method ({', '.join([*_REGISTRY, *_ALIASES])})"
    )


def _divergence_method(name: str) -> MethodSpec:
    divergence = get_divergence_spec(name)
    return MethodSpec(
        name=name, kind="offline", adapter="divergence", fn=kd.divergence_kd_loss,
        defaults=MappingProxyType({p.name: p.default for p in divergence.params}),
        summary=f"offline KD with {name}: hard_weight · CE + soft_weight · T² · {divergence.formula}",
        source=divergence.source, formula=divergence.formula,
    )


def method_kind(name: str) -> str:
    """``"offline"``, ``"online"``, ``"self"`` or ``"plain"`` for a method, alias or divergence name."""
    return get_method(name).kind


def resolve_method_params(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults of method ``name`` with ``overrides`` applied (unknown names raise ``ValueError``)."""
    return get_method(name).resolve(overrides)


def _builtin(name, fn, *, kind, adapter="logits", aliases=(), extra_params=None, params_from=(), **metadata) -> None:
    _add(_make_spec(name, fn, kind=kind, adapter=adapter, aliases=aliases, extra_params=extra_params,
                    params_from=params_from, builtin=True, metadata=metadata))


# ----------------------------------------------------------------------------------- built-ins

_builtin(
    "ce", None, kind="plain", adapter="ce",
    summary="the student alone on hard labels (the no-teacher baseline)",
    formula="CE(q, y)", source="—",
)
_builtin(
    "hinton", kd.hinton_kd_loss, kind="offline", aliases=("kd",),
    summary="Hinton KD; defaults are mdistiller's CIFAR recipe",
    formula="hard_weight · CE + soft_weight · T² · KL(p_T ‖ q_T)",
    source="Hinton et al. 2015; megvii-research/mdistiller (KD)",
)
_builtin(
    "dkd", dkd.dkd_loss, kind="offline",
    summary="Decoupled KD: target-class and non-target-class terms weighted separately, warm-up",
    formula="ce_weight · CE + min((epoch+1)/warmup, 1) · T² · (α · TCKD + β · NCKD)",
    source="Zhao et al. 2022; megvii-research/mdistiller (DKD.py)",
)
_builtin(
    "nkd", nkd.nkd_loss, kind="offline",
    summary="Normalized KD: teacher-weighted target term plus normalised non-target KD",
    formula="ce_weight · CE − mean(t_y log s_y) − γ · T² · mean Σ N(t)_i log N(s)_i",
    source="Yang et al. 2023; yzd-v/cls_KD (nkd.py)",
)
_builtin(
    "abkd", kd.abkd_loss, kind="offline",
    summary="CE + α-β divergence",
    formula="hard_weight · CE + soft_weight · T² · D_AB^(α,β)(p_T ‖ q_T)",
    source="Wang et al. 2025 (ABKD)",
)
_builtin(
    "sinkd", kd.sinkd_loss, kind="offline", aliases=("sinkhorn-with-KD", "sinkhorn-with-kd"),
    summary="CE + KD + batch-wise Sinkhorn transport cost, scaled as the official code",
    formula="(1 − α) · CE + α · KL(p_T ‖ q_T) + β · 0.001 · Σ_ij P_ij W_ij",
    source="Cui et al. 2024 (SinKD); 2018cx/SinKD (loss.py, glue_train.py)",
)
_builtin(
    "nd", nd.nd_loss, kind="offline", adapter="nd", params_from=(kd.hinton_kd_loss,),
    extra_params={"nd_weight": 1.0},
    summary="KD++: Hinton KD plus the norm-and-direction loss on penultimate features",
    formula="Hinton KD + nd_weight · mean[1 − ⟨f_s, e_y⟩ / max(‖f_s‖, ‖f_t‖)]",
    source="Wang et al. 2023 (KD++)",
)
_builtin(
    "ofa", ofa.ofa_loss, kind="offline", adapter="ofa",
    extra_params={"ofa_weight": 1.0, "branches": True},
    summary="OFA-KD's target-enhanced loss on the logits and on projector branches of earlier stages",
    formula="CE + ofa_weight · Σ_branches −Σ_c [(p_c + 1[c=y])^ε − 1[c=y]] log q_c",
    source="Hao et al. 2023 (OFA-KD)",
)
_builtin(
    "mcmi-teacher", mcmi.mcmi_teacher_loss, kind="plain", adapter="mcmi-teacher",
    extra_params={"centroids": "once"},
    summary="fine-tunes the given model (a teacher copy) to maximise conditional mutual information",
    formula="CE − λ · mean_x KL(p(x) ‖ Q_y)",
    source="Ye et al. 2024 (MCMI); iclr2024mcmi/ICLRMCMI (FineTuneTeacher.py, centroid.py)",
)
_builtin(
    "dml", online.dml_losses, kind="online",
    summary="deep mutual learning: both networks trained, each toward the other",
    formula="CE + T² · KL(p_other ‖ q_self) for each network",
    source="Zhang et al. 2018 (DML)",
)
_builtin(
    "bdkd-online", online.bdkd_online_losses, kind="online",
    summary="BD-KD online: entropy-balanced forward/reverse KL for the student, teacher toward the student",
    formula="student: CE + T² · BD(p_t, q_s); teacher: CE + w · T² · D(q_s ‖ p_t)",
    source="Amara et al. 2022 (BD-KD); weights unverified",
)
_builtin(
    "pskd", self_kd.pskd_loss, kind="self", adapter="pskd", params_from=(self_kd.pskd_alpha,),
    summary="progressive self-KD on the model's own previous-epoch predictions",
    formula="H((1 − α_t) · onehot(y) + α_t · p_prev(x), q), α_t = α_T · (epoch+1)/epochs",
    source="Kim et al. 2021 (PS-KD)",
)
_builtin(
    "uskd", self_kd.uskd_loss, kind="self", adapter="uskd",
    summary="self-KD with customised target and Zipf non-target soft labels and a weak mid-level head",
    formula="CE + α · L_target + β · L_non-target + μ · L_weak",
    source="Yang et al. 2023 (USKD); yzd-v/cls_KD (uskd.py)",
)


def _format(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def render_markdown() -> str:
    """The table of classifier methods for ``docs/methods.md`` (built-ins only)."""
    lines = [
        "| method | kind | parameters (defaults) | loss | source |",
        "|---|---|---|---|---|",
    ]
    for spec in _REGISTRY.values():
        if not spec.builtin:
            continue
        names = f"`{spec.name}`" + (f" (alias {', '.join(f'`{a}`' for a in spec.aliases)})" if spec.aliases else "")
        params = ", ".join(f"`{k}={_format(v)}`" for k, v in spec.defaults.items()) or "—"
        lines.append(f"| {names} | {spec.kind} | {params} | {spec.formula} | {spec.source} |")
    return "\n".join(lines) + "\n"

