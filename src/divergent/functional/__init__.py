"""divergent.functional: every divergence as pure tensor math.

Student first, teacher second, both logits over the last dimension. One function per
registered name (``forward_kl``, ``js``, ...), made from the registry; a name added with
:func:`register_divergence` is reachable here too, as ``divergent.functional.<name>``.
"""

from divergent.functional import api, registry
from divergent.functional.api import BUILTIN_NAMES, divergence
from divergent.functional.registry import (
    DivergenceSpec,
    ParamSpec,
    available,
    get_spec,
    register_divergence,
    render_markdown,
    unregister_divergence,
)
from divergent.functional.topk import TopK

globals().update({name: getattr(api, name) for name in BUILTIN_NAMES})

__all__ = [
    "divergence",
    "available",
    "get_spec",
    "register_divergence",
    "unregister_divergence",
    "render_markdown",
    "DivergenceSpec",
    "ParamSpec",
    "TopK",
    *BUILTIN_NAMES,
]


_registered_functions: dict[str, tuple[DivergenceSpec, object]] = {}


def __getattr__(attribute: str):
    """``divergent.functional.<name>`` for a divergence registered after import (made once per entry)."""
    spec = registry.REGISTRY.get(attribute)
    if spec is None:
        raise AttributeError(f"module 'divergent.functional' has no attribute {attribute!r}")
    made = _registered_functions.get(attribute)
    if made is None or made[0] is not spec:
        made = _registered_functions[attribute] = (spec, api.named_function(spec))
    return made[1]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(registry.REGISTRY))
