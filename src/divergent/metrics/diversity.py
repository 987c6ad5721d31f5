"""Diversity of a set of samples: distinct-n and self-BLEU.

- distinct-n (Li et al., 2016): the number of distinct n-grams over the number of n-grams,
  pooled over all samples (1.0 = no n-gram repeats anywhere).
- self-BLEU (Zhu et al., 2018, Texygen): the mean over samples of the BLEU of one sample
  against all the others as references, computed with ``sacrebleu`` (0..100; lower = more diverse).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["distinct_n", "self_bleu"]


def distinct_n(samples: Sequence[Sequence], n: int) -> float:
    """Distinct n-grams / n-grams over ``samples`` (each a sequence of tokens); 0.0 when there are none.

    >>> distinct_n([[1, 2, 3], [1, 2, 4]], 2)
    0.75
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    grams = [tuple(s[i : i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: Sequence[str], *, tokenize: str = "13a", max_samples: int | None = 200) -> float:
    """Mean sentence BLEU (sacrebleu, 0..100) of each text against the others; needs >= 2 texts.

    ``tokenize`` is sacrebleu's tokenizer (``"13a"``, ``"char"`` for short or unspaced text, ...);
    only the first ``max_samples`` texts are used (the cost is quadratic).
    """
    from sacrebleu.metrics import BLEU

    texts = [str(t) for t in texts][: max_samples or None]
    if len(texts) < 2:
        raise ValueError(f"self_bleu needs at least 2 texts, got {len(texts)}")
    bleu = BLEU(tokenize=tokenize, effective_order=True)
    scores = [bleu.sentence_score(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)]
    return sum(scores) / len(scores)
