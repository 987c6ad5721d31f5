"""The RL-regulariser registry: what GRPO adds to its policy loss, written once per name.

Each entry holds its parameters with their defaults and valid values, what it needs
from the trainer (a frozen ``reference`` copy of the initial policy, a ``rehearsal`` set
of the initial policy's own correct answers, or a ``teacher``), a function computing its
value from the step's tensors, and the coefficient that multiplies it:

    loss = PPO-clip policy loss + coefficient(step, **params) * value(inputs, **params)

``GRPOTrainer`` dispatches through it; ``GRPOConfig``'s list of names, its defaults for
the built-in parameters (which are ``GRPOConfig`` fields of the same names) and their
validation are read from here; ``docs/methods.md`` carries the table this module prints
(``python -m divergent.rl``; a test fails when the two differ).

>>> from divergent.rl import get_regulariser
>>> spec = get_regulariser("reverse_kl")
>>> sorted(spec.needs), spec.defaults["kl_estimator"], spec.defaults["kl_beta"]
(['reference'], 'k3', 0.05)
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from divergent.rl import estimators
from divergent.rl.estimators import KL_ESTIMATORS
from divergent.rl.generators import GENERATORS, f_generator
from divergent.rl.grpo import masked_token_mean
from divergent.rl.kdrl import kdrl_coefficient, kdrl_kd_loss

__all__ = [
    "NEEDS",
    "RegulariserInputs",
    "RegulariserParam",
    "RegulariserSpec",
    "available_regularisers",
    "builtin_defaults",
    "get_regulariser",
    "register_regulariser",
    "render_markdown",
    "unregister_regulariser",
]

NEEDS = ("reference", "rehearsal", "teacher")
_KIND_TEXT = {bool: "True or False", str: "a string", int: "an integer", float: "a number"}


@dataclass(frozen=True)
class RegulariserParam:
    """One parameter of a regulariser: name (a ``GRPOConfig`` field for built-ins), default, valid values."""

    name: str
    default: Any
    doc: str = ""
    kind: type = float
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    optional: bool = False  # None is allowed (and means "off")

    def expected(self) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.low is None and self.high is None:
            text = _KIND_TEXT.get(self.kind, self.kind.__name__)
        else:
            left = "[" if self.low_inclusive and self.low is not None else "("
            right = "]" if self.high_inclusive and self.high is not None else ")"
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            text = f"{_KIND_TEXT.get(self.kind, 'a number')} in {left}{low}, {high}{right}"
        return text + (" or None" if self.optional else "")

    def check(self, value: Any, where: str) -> Any:
        """``value`` if valid (ints given for floats become floats); else ``ValueError``/``TypeError`` naming ``where``."""
        if value is None and self.optional:
            return None
        if self.choices is not None:
            if value not in self.choices or isinstance(value, bool) != isinstance(self.choices[0], bool):
                hint = _did_you_mean(value, map(str, self.choices)) if isinstance(value, str) else ""
                raise ValueError(f"{where} must be {self.expected()}, got {value!r}{hint}")
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{where} must be True or False, got {type(value).__name__} {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise TypeError(f"{where} must be a string, got {type(value).__name__} {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{where} must be {self.expected()}, got {type(value).__name__} {value!r}")
        if self.kind is int:
            if not isinstance(value, numbers.Integral):
                raise TypeError(f"{where} must be {self.expected()}, got {value!r}")
            value = int(value)
        elif not math.isfinite(value):
            raise ValueError(f"{where} must be finite, got {value}")
        else:
            value = float(value)
        too_low = self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive))
        too_high = self.high is not None and (value > self.high or (value == self.high and not self.high_inclusive))
        if too_low or too_high:
            raise ValueError(f"{where} must be {self.expected()}, got {value}")
        return value


@dataclass(frozen=True)
class RegulariserInputs:
    """The tensors of one GRPO step a regulariser may read (``None`` where not needed).

    logp: ``[B, T]`` log pi_theta of the sampled tokens (with gradient).
    logits: ``[B, T, V]`` the policy's logits behind them (with gradient).
    mask: ``[B, T]`` bool, the response tokens that count.
    rewards: ``[B]`` sequence rewards.
    step: the optimizer step, counted from 0.
    ref_logp: ``[B, T]`` log pi_ref of the same tokens (needs ``reference``).
    teacher_logp, teacher_logits: the teacher's log-probs ``[B, T]`` and logits ``[B, T, V]`` (needs ``teacher``).
    rehearsal_logp: ``[R, T']`` log pi_theta of the stored rehearsal tokens (with gradient; needs ``rehearsal``);
        ``None`` when the rehearsal set is empty.
    rehearsal_logp0: ``[R, T']`` the stored log pi_0 of the same tokens; rehearsal_mask: ``[R, T']`` bool.
    """

    logp: torch.Tensor
    logits: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    step: int
    ref_logp: torch.Tensor | None = None
    teacher_logp: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    rehearsal_logp: torch.Tensor | None = None
    rehearsal_logp0: torch.Tensor | None = None
    rehearsal_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class RegulariserSpec:
    """A registered regulariser.

    value: ``value(inputs: RegulariserInputs, **params) -> scalar tensor`` (before the coefficient).
    coefficient: ``coefficient(step, **params) -> float`` (step from 0).
    params: its parameters; built-ins' are ``GRPOConfig`` fields of the same names.
    needs: what the trainer must prepare, a subset of :data:`NEEDS`.
    log_coefficient_as: history key under which the trainer logs the coefficient each step (or None).
    """

    name: str
    value: Callable[..., torch.Tensor]
    coefficient: Callable[..., float]
    params: tuple[RegulariserParam, ...] = ()
    needs: frozenset[str] = field(default_factory=frozenset)
    summary: str = ""
    formula: str = ""
    source: str = ""
    log_coefficient_as: str | None = None
    builtin: bool = True

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def resolve(self, given: Mapping[str, Any] | None = None, *, prefix: str | None = None) -> dict[str, Any]:
        """The defaults with ``given`` applied and checked; unknown names raise ``ValueError`` naming the valid ones.

        ``prefix`` starts each error message about a value (default ``"regulariser 'name': parameter "``).
        """
        given = {} if given is None else dict(given)
        known = [p.name for p in self.params]
        unknown = [k for k in given if k not in known]
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for regulariser {self.name!r}; valid: {known or 'none'}"
                f"{_did_you_mean(str(unknown[0]), known)}"
            )
        prefix = f"regulariser {self.name!r}: parameter " if prefix is None else prefix
        return {p.name: p.check(given.get(p.name, p.default), f"{prefix}{p.name}") for p in self.params}


_REGISTRY: dict[str, RegulariserSpec] = {}


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _as_params(params: Iterable[RegulariserParam] | Mapping[str, Any] | None) -> tuple[RegulariserParam, ...]:
    if params is None:
        return ()
    if isinstance(params, Mapping):
        out = []
        for name, default in params.items():
            kind = type(default) if isinstance(default, (bool, int, float, str)) else float
            out.append(RegulariserParam(name, default, kind=kind, optional=default is None))
        return tuple(out)
    params = tuple(params)
    for p in params:
        if not isinstance(p, RegulariserParam):
            raise TypeError(f"params must be a mapping name -> default or RegulariserParam objects, got {type(p).__name__}")
    return params


def register_regulariser(
    name: str,
    value: Callable[..., torch.Tensor],
    *,
    coefficient: Callable[..., float] | str | float,
    params: Iterable[RegulariserParam] | Mapping[str, Any] | None = None,
    needs: Iterable[str] = (),
    log_coefficient_as: str | None = None,
    summary: str = "",
    formula: str = "",
    source: str = "",
) -> RegulariserSpec:
    """Register a regulariser under ``name``; returns its :class:`RegulariserSpec`.

    ``value(inputs, **params)`` returns the scalar term from a :class:`RegulariserInputs`;
    ``coefficient`` is a function ``(step, **params) -> float``, the name of one of the
    parameters, or a constant. ``params``: name → default (or :class:`RegulariserParam`
    objects with ranges); users set them with ``GRPOConfig(regulariser=name,
    regulariser_params={...})``. ``needs``: any of ``"reference"``, ``"rehearsal"``
    (built with the ``dph_probe_*`` settings), ``"teacher"``.

    >>> import torch
    >>> def sq_log_ratio(inputs, *, scale=1.0):
    ...     return scale * (inputs.logp - inputs.ref_logp).square().mean()
    >>> spec = register_regulariser("sq", sq_log_ratio, coefficient="sq_beta",
    ...                             params={"scale": 1.0, "sq_beta": 0.1}, needs=("reference",))
    >>> spec.coefficient(0, **spec.defaults)
    0.1
    >>> unregister_regulariser("sq")
    """
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"regulariser {name!r} is already registered; choose another name")
    if not callable(value):
        raise TypeError(f"value must be callable (inputs, **params) -> tensor, got {type(value).__name__}")
    needs = frozenset(needs)
    if not needs <= set(NEEDS):
        raise ValueError(f"needs must be a subset of {NEEDS}, got {sorted(needs)}")
    params = _as_params(params)
    names = [p.name for p in params]
    if isinstance(coefficient, str):
        if coefficient not in names:
            raise ValueError(f"coefficient {coefficient!r} is not one of the parameters {names}")
        key = coefficient

        def coefficient(step: int, **values: Any) -> float:  # noqa: F811 - the named parameter's value
            return float(values[key])
    elif isinstance(coefficient, numbers.Real) and not isinstance(coefficient, bool):
        constant = float(coefficient)

        def coefficient(step: int, **values: Any) -> float:  # noqa: F811
            return constant
    elif not callable(coefficient):
        raise TypeError(f"coefficient must be a function, a parameter name or a number, got {coefficient!r}")
    spec = RegulariserSpec(name, value, coefficient, params, needs, summary, formula, source, log_coefficient_as,
                           builtin=False)
    _REGISTRY[name] = spec
    return spec


def unregister_regulariser(name: str) -> None:
    """Remove a regulariser added with :func:`register_regulariser` (built-ins cannot be removed)."""
    spec = get_regulariser(name)
    if spec.builtin:
        raise ValueError(f"{name!r} is a built-in regulariser and cannot be unregistered")
    del _REGISTRY[name]


def available_regularisers() -> tuple[str, ...]:
    """Names of the registered regularisers, in registry order."""
    return tuple(_REGISTRY)


def get_regulariser(name: str) -> RegulariserSpec:
    """The spec of ``name``; an unknown name raises ``ValueError`` with a "did you mean" and the valid names."""
    if not isinstance(name, str):
        raise TypeError(f"regulariser must be a string, got {type(name).__name__} {name!r}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown regulariser {name!r}{_did_you_mean(name, _REGISTRY)}; valid: {', '.join(_REGISTRY)}"
        ) from None


def builtin_defaults() -> dict[str, Any]:
    """``{parameter: default}`` over every built-in regulariser (the ``GRPOConfig`` field defaults)."""
    return {p.name: p.default for spec in _REGISTRY.values() if spec.builtin for p in spec.params}


# ----------------------------------------------------------------------------------- built-ins


def _none_value(inputs: RegulariserInputs) -> torch.Tensor:
    return inputs.logp.new_zeros(())


def _reverse_kl_value(inputs, *, kl_estimator: str, kl_log_ratio_clamp, kl_value_clamp, **_coefficient) -> torch.Tensor:
    # Token mean of k(log pi_theta - log pi_ref) over the sampled response tokens.
    per_token = estimators.kl_estimator(inputs.logp, inputs.ref_logp, kl_estimator,
                                        log_ratio_clamp=kl_log_ratio_clamp, value_clamp=kl_value_clamp)
    return masked_token_mean(per_token, inputs.mask)


def _dph_value(inputs, *, dph_divergence: str, dph_alpha: float, **_settings) -> torch.Tensor:
    # Token mean of f(pi_theta / pi_0) over a minibatch of stored rehearsal responses.
    if inputs.rehearsal_logp is None:
        return inputs.logp.new_zeros(())
    values = f_generator(inputs.rehearsal_logp - inputs.rehearsal_logp0, dph_divergence, alpha=dph_alpha)
    return masked_token_mean(values, inputs.rehearsal_mask)


def _kdrl_value(inputs, *, kdrl_estimator: str, kdrl_mask_correct: bool, **_schedule) -> torch.Tensor:
    return kdrl_kd_loss(
        inputs.logp, inputs.teacher_logp, inputs.mask, inputs.rewards, estimator=kdrl_estimator,
        mask_correct=kdrl_mask_correct, student_logits=inputs.logits, teacher_logits=inputs.teacher_logits,
    )


def _builtin(spec: RegulariserSpec) -> None:
    _REGISTRY[spec.name] = spec


_builtin(RegulariserSpec(
    "none", _none_value, lambda step: 0.0,
    summary="plain GRPO: the policy loss alone", formula="0", source="Shao et al. 2024 (GRPO)",
))
_builtin(RegulariserSpec(
    "reverse_kl", _reverse_kl_value, lambda step, *, kl_beta, **_: kl_beta,
    params=(
        RegulariserParam("kl_estimator", "k3", "KL estimator on sampled tokens", kind=str, choices=KL_ESTIMATORS),
        RegulariserParam("kl_beta", 0.05, "coefficient of the KL term", low=0.0),
        RegulariserParam("kl_log_ratio_clamp", None, "clamp log(pi_theta/pi_ref) to [-x, x] (verl: 20)",
                         low=0.0, low_inclusive=False, optional=True),
        RegulariserParam("kl_value_clamp", None, "clamp the per-token estimate to [-x, x] (verl: 10 for k3)",
                         low=0.0, low_inclusive=False, optional=True),
    ),
    needs=frozenset({"reference"}),
    summary="KL to a frozen copy of the initial policy, estimated on the sampled tokens",
    formula="kl_beta · token-mean k(log π_θ − log π_ref), k ∈ {k1, k2, k3}",
    source="Schulman 2020 (k1/k2/k3); Shao et al. 2024 (GRPO, k3)",
))
_builtin(RegulariserSpec(
    "dph", _dph_value, lambda step, *, dph_eta, **_: dph_eta,
    params=(
        RegulariserParam("dph_divergence", "js", "generator f", kind=str, choices=GENERATORS),
        RegulariserParam("dph_eta", 0.1, "coefficient of the DPH term (paper: 0.01-0.05 forward KL, 0.05-0.2 JS)", low=0.0),
        RegulariserParam("dph_alpha", 0.2, "order of the alpha generator", low=0.0, high=1.0,
                         low_inclusive=False, high_inclusive=False),
        RegulariserParam("dph_probe_prompts", 512, "training prompts probed with pi_0 to build the rehearsal set",
                         kind=int, low=1),
        RegulariserParam("dph_probe_samples", 8, "samples per probed prompt", kind=int, low=1),
        RegulariserParam("dph_solved_fraction", 0.5, "a probed prompt is solved when this share of its samples is correct",
                         low=0.0, high=1.0, low_inclusive=False),
        RegulariserParam("dph_batch_size", 32, "rehearsal responses per step", kind=int, low=1),
    ),
    needs=frozenset({"rehearsal"}),
    summary="DPH-RL: an f-divergence to the initial policy on its own stored correct answers",
    formula="dph_eta · token-mean over rehearsal tokens of f(π_θ/π₀)",
    source="DPH-RL (2025); the rule for a solved prompt is unverified",
))
_builtin(RegulariserSpec(
    "kdrl", _kdrl_value,
    lambda step, *, kdrl_beta0, kdrl_delta, kdrl_beta_min, **_: kdrl_coefficient(step, kdrl_beta0, kdrl_delta, kdrl_beta_min),
    params=(
        RegulariserParam("kdrl_beta0", 0.02, "initial KD coefficient", low=0.0),
        RegulariserParam("kdrl_delta", 0.0001, "linear decay of the coefficient per step", low=0.0),
        RegulariserParam("kdrl_beta_min", 0.005, "floor of the coefficient", low=0.0),
        RegulariserParam("kdrl_estimator", "k2", "reverse-KL estimator, or 'full' over the vocabulary", kind=str,
                         choices=KL_ESTIMATORS + ("full",)),
        RegulariserParam("kdrl_mask_correct", True, "no KD term on responses with reward > 0", kind=bool),
    ),
    needs=frozenset({"teacher"}),
    log_coefficient_as="kdrl_beta",
    summary="KDRL: reverse KL to a teacher on the policy's own rollouts, annealed, correct answers masked",
    formula="max(β₀ − δ·t, β_min) · token-mean k(log π_θ − log π_teacher)",
    source="KDRL (2025); recipe details unverified",
))


def render_markdown() -> str:
    """The table of built-in regularisers for ``docs/methods.md``."""
    lines = ["| regulariser | needs | parameters (defaults) | added to the loss |", "|---|---|---|---|"]
    for spec in _REGISTRY.values():
        if not spec.builtin:
            continue
        params = ", ".join(f"`{p.name}={p.default!r}`" for p in spec.params) or "—"
        needs = ", ".join(sorted(spec.needs)) or "—"
        lines.append(f"| `{spec.name}` | {needs} | {params} | {spec.formula} |")
    return "\n".join(lines) + "\n"

