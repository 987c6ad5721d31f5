"""Domain mixing for distillation: DDK's domain weights and a sampler that draws domains by them.

DDK (Liu et al., "DDK: Distilling Domain Knowledge for Efficient Large Language Models",
NeurIPS 2024, arXiv 2407.16154; no official code) splits the training data into N domains
and measures, on a fixed evaluation set per domain, the perplexity of the student ℓ_S[i]
and of the teacher ℓ_T[i]. The *domain discrepancy factor* is

    r = softmax(ℓ_S / ℓ_T)                                   (Eq. 1, the initial weights)

and every K steps it is updated with the *factor-smooth* rule

    ψ = r ⊙ exp(ℓ_S / ℓ_T),   r ← α · ψ / Σψ + (1 − α) / N     (Eq. 2, α = 0.5 in the paper)

after which the next K steps draw their examples' domains with probabilities r
(Algorithm 1). The (1 − α)/N floor keeps every domain in the mixture; α = 1 is the
unsmoothed update (−0.9 points in the paper's ablation), uniform mixing −2.4.

:func:`ddk_initial_weights` and :func:`ddk_update` are the math (computed in float64, in
log space, so a large ratio never overflows); :class:`DomainSampler` draws examples by
domain weights with one iterator per domain (a domain's rows cycle, in a fresh seeded
order, when used up) and a seeded generator, all of it in :meth:`DomainSampler.state_dict`.
:func:`load_domain_data` reads the user's data grouped by a domain column.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "MIXINGS",
    "ddk_initial_weights",
    "ddk_update",
    "mixing_weights",
    "DomainSampler",
    "DomainData",
    "split_domains",
    "tokenize_domains",
    "load_domain_data",
]

# The mixing rules a run can ask for; the text is what help and errors list.
MIXINGS = {
    "ddk": "DDK: weights from the student/teacher perplexity ratio per domain, updated every K steps",
    "uniform": "every domain equally often",
    "proportional": "each domain in proportion to its training rows (plain shuffling, in expectation)",
}


def _vector(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__} {str(values)[:80]}") from None
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d sequence (one value per domain), got shape {array.shape}")
    return array


def _ratios(student_ppl: Any, teacher_ppl: Any) -> np.ndarray:
    student = _vector(student_ppl, "student_ppl")
    teacher = _vector(teacher_ppl, "teacher_ppl")
    if student.shape != teacher.shape:
        raise ValueError(f"student_ppl and teacher_ppl must have one value per domain each, got "
                         f"{student.size} and {teacher.size} values")
    for name, values in (("student_ppl", student), ("teacher_ppl", teacher)):
        bad = ~(np.isfinite(values) & (values > 0))
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name} must be finite perplexities > 0, got {values[index]!r} for domain {index}")
    return student / teacher


def _like(result: np.ndarray, template: Any) -> Any:
    """The result in the caller's kind: a float64 tensor for a tensor, an array for an array, else a list."""
    if isinstance(template, torch.Tensor):
        return torch.as_tensor(result, dtype=torch.float64, device=template.device)
    if isinstance(template, np.ndarray):
        return result
    return result.tolist()


def _normalised_exp(log_values: np.ndarray) -> np.ndarray:
    # softmax in log space: exp(x - logsumexp(x)); -inf entries give exactly 0
    top = np.max(log_values)
    shifted = np.exp(log_values - top)
    return shifted / shifted.sum()


def ddk_initial_weights(student_ppl: Any, teacher_ppl: Any) -> Any:
    """DDK's initial domain weights, Eq. 1: ``r = softmax(ppl_S / ppl_T)``.

    ``student_ppl``, ``teacher_ppl``: one perplexity per domain (finite, > 0). Returns the
    weights in the kind of ``student_ppl`` (tensor, array, else a list of floats).

    >>> [round(w, 4) for w in ddk_initial_weights([2.0, 1.0], [1.0, 1.0])]
    [0.7311, 0.2689]
    """
    return _like(_normalised_exp(_ratios(student_ppl, teacher_ppl)), student_ppl)


def ddk_update(weights: Any, student_ppl: Any, teacher_ppl: Any, smoothing: float = 0.5) -> Any:
    """DDK's factor-smooth update, Eq. 2: the next domain weights.

    ψ = r ⊙ exp(ppl_S / ppl_T),  r ← α · ψ / Σψ + (1 − α) / N,  with α = ``smoothing``.

    weights: the current domain weights r (non-negative, summing to 1), one per domain.
    student_ppl, teacher_ppl: each domain's perplexity of the student and the teacher on
        that domain's evaluation rows (finite, > 0).
    smoothing: α in [0, 1]; 1 = no smoothing, 0 = uniform weights.

    Returns the new weights in the kind of ``weights`` (a float64 tensor for a tensor, an
    array for an array, else a list of floats). Computed in float64 and in log space.

    >>> [round(w, 4) for w in ddk_update([0.5, 0.5], [2.0, 1.0], [1.0, 1.0])]
    [0.6155, 0.3845]
    """
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or not 0.0 <= float(smoothing) <= 1.0:
        raise ValueError(f"smoothing must be a number in [0, 1] (DDK's α; the paper uses 0.5), got {smoothing!r}")
    r = _vector(weights, "weights")
    ratios = _ratios(student_ppl, teacher_ppl)
    if r.shape != ratios.shape:
        raise ValueError(f"weights has {r.size} values and the perplexities {ratios.size}: give one weight per domain")
    if not np.isfinite(r).all() or (r < 0).any() or abs(r.sum() - 1.0) > 1e-6:
        raise ValueError(f"weights must be a distribution over the domains (non-negative, summing to 1), got "
                         f"{r.tolist()} (sum {r.sum():.6g})")
    with np.errstate(divide="ignore"):
        log_psi = np.log(r) + ratios  # log ψ = log r + ℓ_S/ℓ_T; a zero weight stays zero
    alpha = float(smoothing)
    updated = alpha * _normalised_exp(log_psi) + (1.0 - alpha) / r.size
    return _like(updated, weights)


def mixing_weights(mixing: str, train_sizes: Sequence[int]) -> list[float]:
    """Fixed weights of ``uniform`` and ``proportional`` mixing (``ddk`` starts from Eq. 1 instead)."""
    n = len(train_sizes)
    if mixing == "uniform":
        return [1.0 / n] * n
    if mixing == "proportional":
        total = float(sum(train_sizes))
        return [size / total for size in train_sizes]
    raise ValueError(f"mixing {mixing!r} has no fixed weights; expected one of uniform, proportional")


def _check_distribution(weights: Any, n: int, what: str = "weights") -> list[float]:
    values = _vector(weights, what)
    if values.size != n:
        raise ValueError(f"{what} has {values.size} values; expected one per domain ({n})")
    if not np.isfinite(values).all() or (values < 0).any() or abs(values.sum() - 1.0) > 1e-6:
        raise ValueError(f"{what} must be a distribution over the domains (non-negative, summing to 1), got "
                         f"{values.tolist()}")
    return values.tolist()


class DomainSampler:
    """Examples drawn by domain weights: each draw picks a domain with probability ``weights[i]``
    and takes that domain's next example.

    Each domain has its own iterator: epoch ``e`` of domain ``i`` visits its examples in a
    permutation seeded by ``(seed, i, e)`` (in order when ``shuffle=False``), so a domain's
    rows cycle when used up. The domains are drawn with a ``torch.Generator`` seeded by
    ``seed``. :meth:`state_dict` holds the weights, every domain's position and the
    generator's state: a sampler loaded from it continues exactly as the original would.
    Every process built with the same seed draws the same domains.
    """

    def __init__(self, domains: dict[str, Sequence[Any]], weights: Any = None, *, seed: int = 0,
                 shuffle: bool = True) -> None:
        if not domains:
            raise ValueError("DomainSampler needs at least one domain")
        empty = [name for name, rows in domains.items() if len(rows) == 0]
        if empty:
            raise ValueError(f"DomainSampler: domain {empty[0]!r} has no examples")
        self.names = list(domains)
        self.examples = [domains[name] for name in self.names]
        self.seed = int(seed)
        self.shuffle = shuffle
        self.weights = ([1.0 / len(self.names)] * len(self.names) if weights is None
                        else _check_distribution(weights, len(self.names)))
        self.positions = [0] * len(self.names)  # examples taken from each domain so far
        self.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 17)
        self._orders: dict[tuple[int, int], list[int]] = {}

    def set_weights(self, weights: Any) -> None:
        """The weights of the next draws (a distribution over :attr:`names`)."""
        self.weights = _check_distribution(weights, len(self.names))

    def _order(self, domain: int, epoch: int) -> list[int]:
        key = (domain, epoch)
        if key not in self._orders:
            if len(self._orders) > 4 * len(self.names):
                self._orders.pop(next(iter(self._orders)))
            n = len(self.examples[domain])
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + domain) * 7919 + epoch)
            self._orders[key] = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        return self._orders[key]

    def draw_domains(self, n: int) -> list[int]:
        """The domain indices of the next ``n`` draws (advances the generator, not the iterators)."""
        probabilities = torch.tensor(self.weights, dtype=torch.float64)
        return torch.multinomial(probabilities, n, replacement=True, generator=self.generator).tolist()

    def next_example(self, domain: int) -> Any:
        """The next example of ``domain`` (its iterator advances; a new epoch reshuffles)."""
        size = len(self.examples[domain])
        position = self.positions[domain]
        self.positions[domain] = position + 1
        return self.examples[domain][self._order(domain, position // size)[position % size]]

    def draw(self, n: int) -> list[tuple[int, Any]]:
        """``n`` pairs ``(domain index, example)``."""
        return [(domain, self.next_example(domain)) for domain in self.draw_domains(n)]

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "weights": list(self.weights), "positions": list(self.positions),
                "generator": self.generator.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names or int(state["seed"]) != self.seed:
            raise ValueError(f"the sampler state was saved for the domains {list(state['names'])} with seed "
                             f"{state['seed']}, this sampler has {self.names} with seed {self.seed}")
        self.weights = _check_distribution(state["weights"], len(self.names))
        self.positions = [int(p) for p in state["positions"]]
        self.generator.set_state(state["generator"])


@dataclass
class DomainData:
    """Training and evaluation examples per domain (in :attr:`names` order) and what became of the rows.

    ``train_stats``/``eval_stats``: totals over the domains; ``domain_stats``: per domain,
    ``{"train": DataStats, "eval": DataStats}``.
    """

    names: list[str]
    train: dict[str, list]
    eval: dict[str, list]
    train_stats: Any
    eval_stats: Any
    domain_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def all_train(self) -> list:
        return [example for name in self.names for example in self.train[name]]

    def all_eval(self) -> list:
        return [example for name in self.names for example in self.eval[name]]


def _by_domain(rows: list[dict[str, Any]], column: str, source: str) -> dict[str, list[dict[str, Any]]]:
    from divergent.data.lm_data import _columns

    columns = _columns(rows)
    if column not in columns:
        raise ValueError(f"{source}: no domain column {column!r}; found columns {columns}")
    groups: dict[str, list[dict[str, Any]]] = {}
    for number, row in enumerate(rows, start=1):
        value = row.get(column)
        if value is None or value == "":
            raise ValueError(f"{source} row {number}: the domain column {column!r} is empty")
        groups.setdefault(str(value), []).append(row)
    return groups


def _total(stats: list[Any], source: str, fmt: str) -> Any:
    from divergent.data.lm_data import DataStats

    total = DataStats(source=source, format=fmt)
    for s in stats:
        for key in ("rows", "used", "truncated", "skipped_nothing_to_learn", "tokens", "counted_tokens"):
            setattr(total, key, getattr(total, key) + getattr(s, key))
    return total


def split_domains(train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]] | None, domain_column: str, *,
                  eval_fraction: float = 0.05, seed: int = 0, source: str = "data",
                  eval_source: str = "eval data") -> tuple[dict[str, list], dict[str, list], str]:
    """Rows grouped by ``domain_column``: ``(train groups, eval groups, eval source)``.

    Without ``eval_rows`` a seeded ``eval_fraction`` of each domain's rows is held out
    (stratified, so every domain has evaluation rows). A domain without evaluation rows, or
    with evaluation rows but no training rows, is an error naming it.
    """
    from divergent.data.lm_data import split_rows

    if not isinstance(domain_column, str) or not domain_column:
        raise ValueError(f"domain_column must be a column name, got {domain_column!r}")
    train_groups = _by_domain(train_rows, domain_column, source)
    if eval_rows is not None:
        eval_groups = _by_domain(eval_rows, domain_column, eval_source)
    else:
        eval_source = f"{source} (held-out {eval_fraction:g} of each domain)"
        eval_groups = {}
        for name, rows in train_groups.items():
            if len(rows) < 2:
                raise ValueError(f"{source}: domain {name!r} has {len(rows)} row, too few to hold evaluation rows "
                                 f"out; give evaluation data (--eval-data) with rows of every domain")
            train_groups[name], eval_groups[name] = split_rows(rows, eval_fraction, seed, f"{source} [{name}]")
    missing = [name for name in train_groups if name not in eval_groups]
    if missing:
        raise ValueError(f"{eval_source}: domain {missing[0]!r} has no evaluation rows (DDK measures each domain's "
                         f"perplexity on its own evaluation rows); evaluation domains found: {sorted(eval_groups)}")
    extra = [name for name in eval_groups if name not in train_groups]
    if extra:
        raise ValueError(f"{eval_source}: domain {extra[0]!r} has evaluation rows but no training rows in {source}")
    return train_groups, eval_groups, eval_source


def tokenize_domains(train_groups: dict[str, list], eval_groups: dict[str, list], tokenizer: Any, *,
                     max_length: int = 512, packing: bool = False, max_eval_examples: int | None = None,
                     source: str = "data", eval_source: str = "eval data", column: str = "domain") -> DomainData:
    """Tokenize each domain's rows (:func:`divergent.data.lm_data.tokenize_rows`); domains sorted by name.

    Each example holds ``domain_index``, its domain's position in the result's ``names``."""
    from divergent.data.lm_data import _columns, detect_format, pack_examples, tokenize_rows

    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (tokens per example), got {max_length!r}")
    fmt = detect_format(_columns([row for rows in train_groups.values() for row in rows]), source)
    names = sorted(train_groups)
    train, evaluation, per_domain = {}, {}, {}
    for name in names:
        examples, train_stats = tokenize_rows(train_groups[name], tokenizer, max_length=2**62 if packing else max_length,
                                              source=f"{source} [{name}]", format=fmt)
        held_out, eval_stats = tokenize_rows(eval_groups[name], tokenizer, max_length=max_length,
                                             source=f"{eval_source} [{name}]", format=fmt)
        if not examples:
            raise ValueError(f"{source}: domain {name!r} has no training row with anything to learn")
        if not held_out:
            raise ValueError(f"{eval_source}: domain {name!r} has no evaluation row with anything to learn")
        train[name] = pack_examples(examples, max_length) if packing else examples
        evaluation[name] = held_out[:max_eval_examples] if max_eval_examples is not None else held_out
        per_domain[name] = {"train": train_stats, "eval": eval_stats}
        for example in (*train[name], *evaluation[name]):  # which domain (of ``names``) each row is from
            example["domain_index"] = len(per_domain) - 1
    notes = [f"{len(names)} domains by {column!r}: "
             + ", ".join(f"{name} ({len(train[name])} / {len(evaluation[name])})" for name in names)
             + " train / eval examples"]
    if packing:
        notes.append(f"each domain packed into blocks of up to {max_length} tokens")
    return DomainData(names=names, train=train, eval=evaluation,
                      train_stats=_total([s["train"] for s in per_domain.values()], source, fmt),
                      eval_stats=_total([s["eval"] for s in per_domain.values()], eval_source, fmt),
                      domain_stats=per_domain, notes=notes)


def load_domain_data(
    data: str | Path,
    tokenizer: Any,
    domain_column: str,
    *,
    eval_data: str | Path | None = None,
    eval_fraction: float = 0.05,
    max_length: int = 512,
    packing: bool = False,
    seed: int = 0,
    max_eval_examples: int | None = None,
) -> DomainData:
    """The user's data (as :func:`divergent.data.lm_data.load_lm_data` reads it) grouped by ``domain_column``.

    Evaluation rows: ``eval_data`` if given; else a ``save_to_disk`` DatasetDict's
    ``validation``/``test`` split; else a seeded ``eval_fraction`` of each domain's rows
    (see :func:`split_domains`). Every training domain needs evaluation examples (DDK
    measures each domain's perplexities on them), at most ``max_eval_examples`` per domain.
    """
    from divergent.data.lm_data import read_splits

    train_rows, source, eval_rows, eval_source = read_splits(data, eval_data)
    train_groups, eval_groups, eval_source = split_domains(
        train_rows, eval_rows, domain_column, eval_fraction=eval_fraction, seed=seed, source=source,
        eval_source=eval_source or "eval data")
    return tokenize_domains(train_groups, eval_groups, tokenizer, max_length=max_length, packing=packing,
                            max_eval_examples=max_eval_examples, source=source, eval_source=eval_source,
                            column=domain_column)
