"""divergent.functional: every divergence as pure tensor math.

Student first, teacher second, both logits over the last dimension.
"""

from divergent.functional.api import (
    alpha,
    alpha_beta,
    bdkd,
    cauchy_schwarz,
    chi2,
    divergence,
    forward_kl,
    hellinger,
    js,
    reverse_kl,
    sinkhorn,
    skew_kl,
    skew_reverse_kl,
    tvd,
)
from divergent.functional.registry import DivergenceSpec, ParamSpec, available, get_spec, render_markdown
from divergent.functional.topk import TopK

__all__ = [
    "divergence",
    "available",
    "get_spec",
    "render_markdown",
    "DivergenceSpec",
    "ParamSpec",
    "TopK",
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
