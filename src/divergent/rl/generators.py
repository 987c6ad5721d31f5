"""The f-divergence generator table, for the sequence-level objectives (DPH-RL, f-DPO, f-DPG).

The table is pure tensor math and lives in :mod:`divergent.functional.generators` (the
cross-tokenizer loss of :mod:`divergent.functional.cross_tokenizer` uses it too); this
module keeps the names the ``rl`` layer has always imported.
"""

from divergent.functional.generators import (  # noqa: F401
    F_DIVERGENCES,
    GENERATORS,
    check_f_divergence,
    f_generator,
    f_prime,
    f_prime_at_one,
    generator_value,
)

__all__ = ["F_DIVERGENCES", "GENERATORS", "f_generator", "f_prime", "generator_value", "check_f_divergence"]
