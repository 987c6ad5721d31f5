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
on all evaluation rows (with DDP; FSDP-sharded students are not supported here).

The data loader runs ahead of training (accelerate holds the next batch, workers more), so
it carries only *draw numbers* ("slots", :meth:`DomainMixingSampler.__iter__`): the Trainer
turns the slots of an optimisation step into rows (:meth:`DomainMixingSampler.resolve`) when
the step takes them (``DistillationTrainer.get_batch_samples``). A new weight therefore
applies from the next optimisation step's rows, with no lag, and the sampler's state at a
checkpoint is exactly the rows trained on. Each checkpoint folder holds that state
(:data:`STATE_FILE`: weights, every domain's position, the generator, the draws so far, the
measurements), written checksummed and atomically before the Trainer's own files;
``trainer.train(resume_from_checkpoint=...)`` loads it, the Trainer skips the slots already
trained on, and the resumed run draws the rows the uninterrupted run would have.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import transformers

from divergent.data.domains import DomainData, DomainSampler, ddk_initial_weights, ddk_update, mixing_weights
from divergent.train.ddk import domain_perplexities

__all__ = ["DomainMixingSampler", "DomainMixingCallback", "domain_index_lists", "domain_data", "mixing_parts",
           "slot_dataloader", "resolve_batches", "resume_mixing", "STATE_FILE"]

STATE_FILE = "domain_mixing.pt"  # in each checkpoint folder, next to trainer_state.json


def domain_index_lists(data: DomainData) -> tuple[list[dict], dict[str, list[int]]]:
    """All training examples (domains in order) and each domain's positions among them."""
    examples, indices = [], {}
    for name in data.names:
        indices[name] = list(range(len(examples), len(examples) + len(data.train[name])))
        examples.extend(data.train[name])
    return examples, indices


class DomainMixingSampler(torch.utils.data.Sampler):
    """Draw numbers ("slots") of a stream of dataset indices drawn by domain weights; ``len`` draws per pass
    (default: the dataset's size).

    ``domain_indices``: ``{domain: [dataset indices]}``. Iterating yields the slots of the
    current pass (``epoch * len + j``, the pass set by :meth:`set_epoch`); :meth:`resolve`
    turns a slot into a dataset index, drawing the domain with the weights in force then, so
    a :class:`DomainMixingCallback` that changes the weights steers every later slot. Slots
    are resolved in increasing order; skipped ones (other processes' shares, dropped last
    batches) are drawn and discarded, so every process stays on the same stream.
    """

    def __init__(self, domain_indices: dict[str, Sequence[int]], weights: Any = None, *, seed: int = 0,
                 length: int | None = None, group: int = 1) -> None:
        self.domains = DomainSampler(domain_indices, weights, seed=seed)
        self.length = length if length is not None else sum(len(v) for v in domain_indices.values())
        if self.length % group:
            raise ValueError(f"DomainMixingSampler: length ({self.length}) must be a multiple of group ({group})")
        self.group = group  # slots of one batch over all processes: resolved together, so every process agrees
        self.epoch = 0
        self.drawn = 0  # slots resolved (or skipped) so far, over all passes

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        return iter(range(self.epoch * self.length, (self.epoch + 1) * self.length))

    def _draw(self) -> int:
        self.drawn += 1
        return self.domains.next_example(self.domains.draw_domains(1)[0])

    def resolve(self, slot: int) -> int:
        """The dataset index of draw number ``slot`` (drawing and discarding the slots before it)."""
        slot = int(slot)
        if slot < self.drawn:
            raise RuntimeError(f"domain mixing: slot {slot} asked after slot {self.drawn - 1} was drawn; slots must "
                               f"be resolved in order (was the sampler's state loaded from another point of the run?)")
        while self.drawn < slot:
            self._draw()
        return self._draw()

    def finish_group(self) -> None:
        """Draw (and discard) the rest of the current batch over all processes: the other processes' shares.
        Every process then stands at the same draw before the weights can change."""
        while self.drawn % self.group:
            self._draw()

    def state_dict(self) -> dict[str, Any]:
        return {**self.domains.state_dict(), "drawn": self.drawn, "length": self.length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["length"]) != self.length:
            raise ValueError(f"the sampler state was saved with {state['length']} draws per pass, this sampler makes "
                             f"{self.length}; resume with the run's own data and batch settings")
        self.domains.load_state_dict(state)
        self.drawn = int(state["drawn"])


class _Slots(torch.utils.data.Dataset):
    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, slot: int) -> int:
        return slot


def _collate_slots(slots: list[int]) -> dict[str, torch.Tensor]:
    return {"slot": torch.tensor(slots, dtype=torch.long)}


def slot_dataloader(trainer: Any) -> Any:
    """The training data loader of a trainer with domain mixing: batches of slots, prepared by accelerate
    (so each process gets its share); the trainer resolves them into rows when a step takes them."""
    sampler, args = trainer.domain_sampler, trainer.args
    loader = torch.utils.data.DataLoader(_Slots(sampler.length), batch_size=trainer._train_batch_size, sampler=sampler,
                                         collate_fn=_collate_slots, drop_last=args.dataloader_drop_last)
    return trainer.accelerator.prepare(loader)


def resolve_batches(trainer: Any, slot_batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The collated rows of batches of slots, drawn now (with the weights in force)."""
    sampler, dataset = trainer.domain_sampler, trainer.train_dataset
    batches = []
    for batch in slot_batches:
        batches.append(trainer.data_collator([dataset[sampler.resolve(slot)] for slot in batch["slot"].tolist()]))
        sampler.finish_group()
    return batches


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
        self.resumed = False  # set by load(): the measurements so far came from a checkpoint
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

    def state_dict(self, step: int) -> dict[str, Any]:
        """The mixing's state after optimisation step ``step``: the sampler's and the measurements."""
        return {"step": int(step), "mixing": self.mixing, "interval": self.interval, "smoothing": float(self.smoothing),
                "sampler": self.sampler.state_dict(), "teacher_ppl": self.teacher_ppl,
                "history": [dict(entry) for entry in self.history]}

    def save(self, folder: str, step: int) -> None:
        """Write the state into a checkpoint folder (checksummed, atomically)."""
        from divergent.io import save_state

        save_state(os.path.join(folder, STATE_FILE), self.state_dict(step))

    def load(self, folder: str, step: int) -> None:
        """Load the state a checkpoint folder holds (it must be that of optimisation step ``step``)."""
        from divergent.io import load_state

        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"cannot resume the domain mixing: the checkpoint {folder} holds no {STATE_FILE} (it was "
                             f"written without domain_column or by an older version); resume from a checkpoint of "
                             f"this run, or start afresh")
        state = load_state(path, what="domain-mixing state")
        for key, ours in (("mixing", self.mixing), ("interval", self.interval), ("smoothing", float(self.smoothing))):
            if state.get(key) != ours:
                raise ValueError(f"the checkpoint's domain mixing ({path}) was written with {key}={state.get(key)!r}, "
                                 f"this trainer has {key}={ours!r}; resume with the run's own settings")
        if int(state["step"]) != int(step):
            raise ValueError(f"{path} holds the domain mixing of step {state['step']}, the checkpoint is of step "
                             f"{step}; the folder mixes two runs")
        self.sampler.load_state_dict(state["sampler"])
        self.teacher_ppl = None if state["teacher_ppl"] is None else [float(v) for v in state["teacher_ppl"]]
        self.history = [dict(entry) for entry in state["history"]]
        self.resumed = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.resumed:
            return
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


def resume_mixing(trainer: Any, checkpoint: Any) -> str:
    """Load the mixing state of ``checkpoint`` (a folder, or True: the output folder's last checkpoint)
    into ``trainer``'s sampler and callback; returns the folder."""
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import get_last_checkpoint

    args = trainer.args
    if checkpoint is True:
        checkpoint = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if checkpoint is None:
            raise ValueError(f"resume_from_checkpoint=True: no checkpoint found in the output folder {args.output_dir}")
    checkpoint = os.fspath(checkpoint)
    if args.ignore_data_skip:
        raise ValueError("ignore_data_skip=True with domain_column: the mixing resumes where the checkpoint's run "
                         "stopped drawing, so the Trainer must skip the batches already trained on (leave "
                         "ignore_data_skip False)")
    state_path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    step = transformers.TrainerState.load_from_json(state_path).global_step if os.path.isfile(state_path) else 0
    trainer.domain_callback.load(checkpoint, step)
    return checkpoint


def mixing_parts(data: DomainData, trainer: Any) -> tuple[DomainMixingSampler, DomainMixingCallback]:
    """The sampler and callback of a :class:`divergent.hf.DistillationTrainer` built with ``domain_column``."""
    args = trainer.args
    examples, indices = domain_index_lists(data)
    length, group = len(examples), 1
    if args.world_size > 1:  # whole batches on every process: accelerate then never pads a pass with its first slots
        if args.accelerator_config.split_batches:
            raise ValueError("domain_column with accelerator_config.split_batches=True is not supported: each "
                             "process must take whole batches of the mixed stream (leave split_batches False)")
        group = args.train_batch_size * args.world_size
        length = -(-length // group) * group
    sampler = DomainMixingSampler(indices, seed=args.seed, length=length, group=group)
    callback = DomainMixingCallback(
        sampler, [data.eval[name] for name in data.names], mixing=args.mixing or "ddk", interval=args.ddk_interval,
        smoothing=args.ddk_smoothing, teacher=trainer.teacher_model, batch_size=args.per_device_eval_batch_size,
        pad_token_id=trainer.pad_token_id, vocab_size=args.vocab_size,
        train_sizes=[len(data.train[name]) for name in data.names])
    return sampler, callback
