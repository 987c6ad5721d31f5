"""Domain mixing (DDK, uniform, proportional) in :class:`divergent.hf.DistillationTrainer`.

A ``transformers.Trainer`` draws its training rows through a sampler; here
:class:`DomainMixingSampler` draws dataset indices by domain weights (one cycling iterator
per domain, :class:`divergent.data.domains.DomainSampler`), and
:class:`DomainMixingCallback` measures each domain's perplexity of the student (and once of
the teacher) on that domain's evaluation rows and sets the weights: DDK's Eq. 1 at the start
of training, Eq. 2 (:func:`divergent.data.ddk_update`) every ``ddk_interval`` optimisation
steps (Liu et al., NeurIPS 2024, Algorithm 1).

Under ``accelerate launch`` every process builds the sampler with the same seed and, after
each measurement, takes rank 0's weights (a broadcast), so every process draws the same
index stream and ``accelerate`` hands each its share of every batch. Every process measures
on all evaluation rows (with DDP; FSDP-sharded students are not supported here). A new
weight applies to the rows drawn after it: the data loader may already hold the next batch
(more with ``dataloader_num_workers > 0``), so the change can lag by that many batches.
The mixing's own state (weights, per-domain positions, the sampler's generator) is not in
the Trainer's checkpoints: ``resume_from_checkpoint`` restarts the mixing from Eq. 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import transformers

from divergent.data.domains import DomainData, DomainSampler, ddk_initial_weights, ddk_update, mixing_weights
from divergent.train.ddk import domain_perplexities

__all__ = ["DomainMixingSampler", "DomainMixingCallback", "domain_index_lists", "domain_data", "mixing_parts"]


def domain_index_lists(data: DomainData) -> tuple[list[dict], dict[str, list[int]]]:
    """All training examples (domains in order) and each domain's positions among them."""
    examples, indices = [], {}
    for name in data.names:
        indices[name] = list(range(len(examples), len(examples) + len(data.train[name])))
        examples.extend(data.train[name])
    return examples, indices


class DomainMixingSampler(torch.utils.data.Sampler):
    """Dataset indices drawn by domain weights; ``len`` draws per pass (default: the dataset's size).

    ``domain_indices``: ``{domain: [dataset indices]}``. The weights are read at every draw,
    so a :class:`DomainMixingCallback` that changes them steers the rest of the pass.
    """

    def __init__(self, domain_indices: dict[str, Sequence[int]], weights: Any = None, *, seed: int = 0,
                 length: int | None = None) -> None:
        self.domains = DomainSampler(domain_indices, weights, seed=seed)
        self.length = length if length is not None else sum(len(v) for v in domain_indices.values())

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for _ in range(self.length):
            domain = self.domains.draw_domains(1)[0]
            yield self.domains.next_example(domain)


class DomainMixingCallback(transformers.TrainerCallback):
    """Measures per-domain perplexities and sets the sampler's weights (DDK) during ``Trainer.train``.

    ``history``: one entry per measurement, ``{"step", "weights", "student_ppl"}``; the last
    after the final step. ``teacher_ppl``: the teacher's perplexity per domain (measured at
    the start of training).
    """

    def __init__(self, sampler: DomainMixingSampler, eval_domains: Sequence[Sequence[dict]], *, mixing: str,
                 interval: int, smoothing: float, teacher: torch.nn.Module | None, batch_size: int = 8,
                 pad_token_id: int = 0, vocab_size: int | None = None, train_sizes: Sequence[int] = ()) -> None:
        if mixing == "ddk" and teacher is None:
            raise ValueError("mixing 'ddk' needs the teacher model: it weighs domains by the student/teacher "
                             "perplexity ratio (pass teacher_model=)")
        self.sampler, self.eval_domains = sampler, list(eval_domains)
        self.mixing, self.interval, self.smoothing = mixing, interval, smoothing
        self.teacher, self.batch_size, self.pad_token_id, self.vocab_size = teacher, batch_size, pad_token_id, vocab_size
        self.teacher_ppl: list[float] | None = None
        self.history: list[dict[str, Any]] = []
        if mixing != "ddk":
            sampler.domains.set_weights(mixing_weights(mixing, list(train_sizes)))

    def _perplexities(self, model: torch.nn.Module, device: torch.device) -> list[float]:
        return domain_perplexities(model, self.eval_domains, batch_size=self.batch_size, device=device,
                                   pad_token_id=self.pad_token_id, vocab_size=self.vocab_size)

    @staticmethod
    def _from_rank0(weights: list[float], device: torch.device) -> list[float]:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return weights
        values = torch.tensor(weights, dtype=torch.float64,
                              device=device if dist.get_backend() == "nccl" else torch.device("cpu"))
        dist.broadcast(values, src=0)
        return values.cpu().tolist()

    def _measure(self, step: int, model: torch.nn.Module, device: torch.device, update: bool) -> None:
        student_ppl = self._perplexities(model, device)
        if update and self.mixing == "ddk":
            weights = (ddk_initial_weights(student_ppl, self.teacher_ppl) if not self.history else
                       ddk_update(self.sampler.domains.weights, student_ppl, self.teacher_ppl, self.smoothing))
            self.sampler.domains.set_weights(self._from_rank0(weights, device))
        self.history.append({"step": step, "weights": list(self.sampler.domains.weights), "student_ppl": student_ppl})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.teacher is not None and self.teacher_ppl is None:
            self.teacher_ppl = self._perplexities(self.teacher, args.device)
        self._measure(state.global_step, model, args.device, update=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step >= state.max_steps:
            self._measure(step, model, args.device, update=False)
        elif self.mixing == "ddk" and step % self.interval == 0:
            self._measure(step, model, args.device, update=True)


def domain_data(train_dataset: Any, eval_dataset: Any, tokenizer: Any, args: Any) -> tuple[DomainData, list, list]:
    """The rows of ``train_dataset``/``eval_dataset`` by ``args.domain_column``, tokenized per domain:
    ``(domains, training examples in domain order, evaluation examples)``."""
    from divergent.data.domains import split_domains, tokenize_domains

    def rows(dataset: Any, name: str) -> list[dict] | None:
        if dataset is None:
            return None
        if isinstance(dataset, list):
            return dataset
        if hasattr(dataset, "to_list") and hasattr(dataset, "column_names"):
            return dataset.to_list()
        raise TypeError(f"with domain_column, {name} must be rows (a list of dicts or a datasets.Dataset) holding "
                        f"the column {args.domain_column!r}, got {type(dataset).__name__}")

    train_rows = rows(train_dataset, "train_dataset")
    if not train_rows:
        raise ValueError("with domain_column, train_dataset must hold rows (it is empty or missing)")
    if tokenizer is None:
        raise ValueError("with domain_column, pass processing_class=<the tokenizer>: the rows are tokenized per domain")
    train_groups, eval_groups, eval_source = split_domains(
        train_rows, rows(eval_dataset, "eval_dataset"), args.domain_column, eval_fraction=args.domain_eval_fraction,
        seed=args.seed, source="train_dataset", eval_source="eval_dataset")
    data = tokenize_domains(train_groups, eval_groups, tokenizer, max_length=args.max_length, packing=args.packing,
                            source="train_dataset", eval_source=eval_source, column=args.domain_column)
    examples, _ = domain_index_lists(data)
    return data, examples, data.all_eval()


def mixing_parts(data: DomainData, trainer: Any) -> tuple[DomainMixingSampler, DomainMixingCallback]:
    """The sampler and callback of a :class:`divergent.hf.DistillationTrainer` built with ``domain_column``."""
    args = trainer.args
    _, indices = domain_index_lists(data)
    sampler = DomainMixingSampler(indices, seed=args.seed)
    callback = DomainMixingCallback(
        sampler, [data.eval[name] for name in data.names], mixing=args.mixing or "ddk", interval=args.ddk_interval,
        smoothing=args.ddk_smoothing, teacher=trainer.teacher_model, batch_size=args.per_device_eval_batch_size,
        pad_token_id=trainer.pad_token_id, vocab_size=args.vocab_size,
        train_sizes=[len(data.train[name]) for name in data.names])
    return sampler, callback
