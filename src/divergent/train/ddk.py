"""Domain mixing in the LM trainer: DDK's schedule (Liu et al., NeurIPS 2024, Algorithm 1) and fixed mixings.

:class:`DomainMixingTrainer` is :class:`divergent.train.lm.LMTrainer` whose batches come
from a :class:`divergent.data.domains.DomainSampler`:

- ``mixing="ddk"``: at step 0 each domain's perplexity of the student ℓ_S and of the
  teacher ℓ_T (on that domain's evaluation rows) give the weights r = softmax(ℓ_S/ℓ_T)
  (Eq. 1); every ``interval`` steps the student is measured again and
  r ← :func:`~divergent.data.domains.ddk_update` (Eq. 2, smoothing α); the next
  ``interval`` steps draw their examples' domains with probabilities r.
- ``mixing="uniform"`` / ``"proportional"``: fixed weights (1/N, or each domain's share
  of the training rows); the student is measured at the start and the end only.

The loss is the trainer's (``hard_weight`` · CE + ``soft_weight`` · T² · D); DDK's paper
uses CE + 0.2 · forward KL at T = 1, i.e. ``hard_weight=1, soft_weight=0.2, temperature=1``.

Everything the schedule needs to continue exactly — the weights, each domain's position,
the sampler's generator and the per-domain measurements so far — is in
:meth:`DomainMixingTrainer.state_dict`, so :func:`divergent.train.run.drive`'s checkpoints
and resume cover it. Under ``torch.distributed`` rank 0's weights are broadcast, so every
rank draws the same domains (the sampler is seeded identically).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from divergent.data.domains import MIXINGS, DomainSampler, ddk_initial_weights, ddk_update, mixing_weights
from divergent.train import distributed
from divergent.train.lm import Batch, LMDistillConfig, LMTrainer, evaluate_lm

__all__ = [
    "DomainMixingSettings",
    "DomainSource",
    "DomainMixingTrainer",
    "domain_perplexities",
]


@dataclass
class DomainMixingSettings:
    """Which domains a student trains on, and how often each (the ``distill-lm`` keys).

    domain_column: the data's column naming each row's domain ("" = no domains: plain shuffling).
    mixing: how domains are drawn: ddk, uniform or proportional ("" = ddk when there is a
        domain column).
    ddk_interval: K, steps between DDK's re-measurements and weight updates (the paper: 1000).
    ddk_smoothing: α of DDK's factor-smooth update, in [0, 1] (the paper: 0.5; 1 = no smoothing).
    """

    domain_column: str = ""
    mixing: str = ""
    ddk_interval: int = 50
    ddk_smoothing: float = 0.5

    def _check_domain_settings(self) -> None:
        if self.mixing and self.mixing not in MIXINGS:
            from difflib import get_close_matches

            close = get_close_matches(self.mixing, list(MIXINGS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"mixing must be one of {', '.join(MIXINGS)}, got {self.mixing!r}{hint}")
        if self.domain_column and getattr(self, "teacher_cache", ""):
            raise ValueError("domain_column with teacher_cache is not supported: a teacher cache keeps no domain "
                             "column; give --data FILE with the domain column instead")
        if self.domain_column and hasattr(self, "data") and not self.data:
            raise ValueError(f"domain_column {self.domain_column!r} needs --data FILE with that column (the embedded "
                             f"standard-library corpus has no domains)")
        if self.mixing and not self.domain_column:
            raise ValueError(f"mixing {self.mixing!r} draws rows by domain and needs a domain column: give "
                             f"--domain-column COL (domain_column: the column of the data naming each row's domain)")
        if isinstance(self.ddk_interval, bool) or not isinstance(self.ddk_interval, int) or self.ddk_interval < 1:
            raise ValueError(f"ddk_interval must be an int >= 1 (steps between DDK updates), got {self.ddk_interval!r}")
        if isinstance(self.ddk_smoothing, bool) or not 0.0 <= float(self.ddk_smoothing) <= 1.0:
            raise ValueError(f"ddk_smoothing must be in [0, 1] (DDK's α; the paper uses 0.5), got {self.ddk_smoothing!r}")

    def mixing_rule(self) -> str:
        """The mixing in force: "" without a domain column, else the one asked for (ddk by default)."""
        return (self.mixing or "ddk") if self.domain_column else ""


class DomainSource:
    """The trainer's data source drawing from a :class:`DomainSampler`: ``batch(step, n)`` as
    :class:`divergent.train.lm.ExampleSource` has it, but stateful (the state is the sampler's)."""

    def __init__(self, sampler: DomainSampler, pad_token_id: int = 0) -> None:
        self.sampler = sampler
        self.pad_token_id = pad_token_id
        self.drawn = [0] * len(sampler.names)  # examples drawn from each domain

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.sampler.examples)

    def batch(self, step: int, n: int) -> Batch:
        pairs = self.sampler.draw(n)
        for domain, _ in pairs:
            self.drawn[domain] += 1
        batch = Batch.from_examples([example for _, example in pairs], self.pad_token_id)
        batch.domains = torch.tensor([domain for domain, _ in pairs], dtype=torch.long)  # for one teacher per domain
        return batch


def domain_perplexities(model: nn.Module, domains: Sequence[Sequence[dict]], *, batch_size: int = 16,
                        device: str | torch.device = "cpu", pad_token_id: int = 0,
                        vocab_size: int | None = None) -> list[float]:
    """Perplexity (exp of the mean cross-entropy per counted token) of ``model`` on each domain's examples."""
    return [evaluate_lm(model, examples, batch_size=batch_size, device=device, pad_token_id=pad_token_id,
                        vocab_size=vocab_size)["perplexity"] for examples in domains]


class DomainMixingTrainer(LMTrainer):
    """:class:`LMTrainer` drawing its batches by domain weights, re-weighted by DDK every ``interval`` steps.

    train_domains / eval_domains: ``{name: examples}`` with the same names (eval rows measure
        each domain's perplexity).
    teacher_ppl: the teacher's perplexity per domain (in the order of ``train_domains``);
        needed by ``mixing="ddk"``, reported by every mixing.
    mixing, interval, smoothing: see :class:`DomainMixingSettings` (ddk, uniform, proportional).
    The other arguments are :class:`LMTrainer`'s. :attr:`domain_history` lists every
    measurement: ``{"step", "weights", "student_ppl", "drawn"}`` (the weights in force from
    that step on; ``drawn``: examples drawn per domain so far), the last one after the final step.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, train_domains: dict[str, Sequence[dict]],
                 eval_domains: dict[str, Sequence[dict]], config: LMDistillConfig, *, mixing: str = "ddk",
                 interval: int = 50, smoothing: float = 0.5, teacher_ppl: Sequence[float] | None = None,
                 eval_batch_size: int = 16, device: str | torch.device = "cpu",
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None, pad_token_id: int = 0,
                 eos_token_id: int | None = None) -> None:
        DomainMixingSettings(domain_column="-", mixing=mixing, ddk_interval=interval,
                             ddk_smoothing=smoothing)._check_domain_settings()
        names = list(train_domains)
        if sorted(eval_domains) != sorted(names):
            raise ValueError(f"eval_domains must have the domains of train_domains {names}, got {list(eval_domains)}")
        if teacher_ppl is not None and len(teacher_ppl) != len(names):
            raise ValueError(f"teacher_ppl has {len(teacher_ppl)} values; expected one per domain ({len(names)})")
        if mixing == "ddk" and teacher_ppl is None:
            raise ValueError("mixing 'ddk' needs teacher_ppl: the teacher's perplexity on each domain's evaluation rows")
        sizes = [len(train_domains[name]) for name in names]
        weights = None if mixing == "ddk" else mixing_weights(mixing, sizes)  # ddk: Eq. 1 at step 0
        sampler = DomainSampler(train_domains, weights, seed=config.seed)
        super().__init__(student, teacher, DomainSource(sampler, pad_token_id), config, device=device,
                         evaluate=evaluate, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
        self.sampler = sampler
        self.names = names
        self.eval_domains = [eval_domains[name] for name in names]
        self.mixing, self.interval, self.smoothing = mixing, interval, float(smoothing)
        self.teacher_ppl = None if teacher_ppl is None else [float(v) for v in teacher_ppl]
        self.eval_batch_size = eval_batch_size
        self.vocab_size = config.vocab_size
        self.domain_history: list[dict[str, Any]] = []
        self.measure_seconds = 0.0

    def _measure(self) -> list[float]:
        began = time.perf_counter()
        with self._gathered():
            ppl = domain_perplexities(self.student, self.eval_domains, batch_size=self.eval_batch_size,
                                      device=self.device, pad_token_id=self.pad_token_id, vocab_size=self.vocab_size)
        self.measure_seconds += time.perf_counter() - began
        return ppl

    def _agreed(self, weights: list[float]) -> list[float]:
        """Rank 0's weights on every rank (so that every rank draws the same domains)."""
        if self.world == 1:
            return weights
        values = torch.tensor(weights, dtype=torch.float64, device=distributed.collective_device())
        dist.broadcast(values, src=0)
        return values.cpu().tolist()

    def _record(self, student_ppl: list[float]) -> None:
        self.domain_history.append({"step": self.step_index, "weights": list(self.sampler.weights),
                                    "student_ppl": student_ppl, "drawn": list(self.source.drawn)})

    def step(self) -> dict[str, Any]:
        step = self.step_index
        measured = step == 0 or (self.mixing == "ddk" and step % self.interval == 0)
        if measured:
            student_ppl = self._measure()
            if self.mixing == "ddk":
                weights = (ddk_initial_weights(student_ppl, self.teacher_ppl) if step == 0 else
                           ddk_update(self.sampler.weights, student_ppl, self.teacher_ppl, self.smoothing))
                self.sampler.set_weights(self._agreed(weights))
            self._record(student_ppl)
        record = super().step()
        if measured:  # in the history when the step is logged (the record is the history's entry)
            record.update(domain_weights=list(self.sampler.weights), domain_student_ppl=student_ppl)
        if self.step_index == self.total_steps:
            self._record(self._measure())
        return record

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["domains"] = {"sampler": self.sampler.state_dict(), "history": [dict(h) for h in self.domain_history],
                            "drawn": list(self.source.drawn), "mixing": self.mixing, "interval": self.interval,
                            "smoothing": self.smoothing, "measure_seconds": self.measure_seconds}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("domains")
        if saved is None:
            raise ValueError("the checkpoint holds no domain-mixing state (it was written without domains); "
                             "resume with the run's own settings")
        for key in ("mixing", "interval", "smoothing"):
            if saved[key] != getattr(self, key):
                raise ValueError(f"the checkpoint was written with {key}={saved[key]!r}, this run has {key}="
                                 f"{getattr(self, key)!r}; resume with the run's own settings")
        super().load_state_dict(state)
        self.sampler.load_state_dict(saved["sampler"])
        self.domain_history = [dict(h) for h in saved["history"]]
        self.source.drawn = [int(v) for v in saved["drawn"]]
        self.measure_seconds = float(saved["measure_seconds"])
