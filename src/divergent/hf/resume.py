"""Exact resume of TRL's GRPO-family trainers: :class:`ExactResume`, mixed into
:class:`~divergent.hf.FDPGTrainer` and :class:`~divergent.hf.GRPOTrainer`.

Two pieces of TRL 1.16's GRPO state are not in its checkpoints; with both restored, a run
resumed from a checkpoint takes the uninterrupted run's steps exactly (same samples, same
losses, same parameters on CPU; tests/test_hf_resume.py).

1. The prompt order of epochs after the first (:class:`EpochSeededRepeatSampler`).

TRL 1.16's ``RepeatSampler`` (``trl/trainer/utils.py`` of 1.16.0, lines 925-933) seeds
one ``torch.Generator`` with ``args.seed`` when it is built and draws each epoch's prompt
permutation from it, so epoch e's order is the (e+1)-th permutation of that generator. It has
no ``set_epoch``, and a checkpoint does not carry the generator: a trainer rebuilt to resume
from a checkpoint at epoch e >= 1 starts the generator afresh and trains the rest of the run on
epoch 0's order (``transformers.Trainer`` restores the global RNGs and skips the batches already
trained, but asks the sampler for the epoch only through ``set_epoch``: ``trainer.py`` of
5.25.0, lines 1887-1903).

:class:`EpochSeededRepeatSampler` is TRL's sampler with a ``set_epoch`` that re-seeds the
generator and draws the permutations of the epochs before — :class:`ExactResume` calls it at
the start of every epoch (``Trainer._run_epoch``), resumed or not — so the uninterrupted run
keeps TRL's order exactly and a resumed one continues it.

2. The generation buffer. TRL generates once per ``steps_per_generation * num_iterations``
micro-steps and serves the micro-steps in between from ``_buffered_inputs``, counting them in
``_step`` (``trl/trainer/grpo_trainer.py`` of 1.16.0, lines 948-951 and 1538-1546); neither is
saved, so a run resumed from a checkpoint inside that window (``num_iterations > 1``, or
``steps_per_generation`` above the accumulation steps) generates afresh where the uninterrupted
run reused its samples. :class:`ExactResume` saves both with each such checkpoint
(``resume_state_<process>.ckpt``, checksummed, one per process) and reads them back; a subclass
adds its own state of a process there (:class:`~divergent.hf.GRPOTrainer`: DPH's rehearsal set).

Shown with a map-style dataset on one CPU process and on two (``accelerate launch``, gloo; a slow
test). Not shown: GPUs, vLLM generation, iterable datasets (TRL shuffles those with ``datasets``'
own seeded shuffle). The first log after a checkpoint that is
not on a logging step averages only the resumed steps (``transformers.Trainer`` keeps its loss
and TRL its metrics in memory between logs); parameters and later logs are exact.
"""

from __future__ import annotations

import copy
import os

from trl.trainer.utils import RepeatSampler

from divergent.io import load_state, save_state

__all__ = ["EpochSeededRepeatSampler", "ExactResume", "epoch_seeded"]


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's ``RepeatSampler`` whose epoch-e order does not depend on how many passes it made."""

    def set_epoch(self, epoch: int) -> None:
        if not self.shuffle or self.seed is None:  # no order to restore (unshuffled, or unseeded by the user)
            return
        self.generator.manual_seed(self.seed)
        for _ in range(epoch):  # a pass draws its permutation on its first item, as TRL's does
            next(RepeatSampler.__iter__(self), None)


def epoch_seeded(sampler):
    """``sampler`` as an :class:`EpochSeededRepeatSampler` when it is TRL's ``RepeatSampler``, else itself."""
    if type(sampler) is not RepeatSampler:
        return sampler
    seeded = copy.copy(sampler)  # same fields and the same generator object: TRL's order until set_epoch
    seeded.__class__ = EpochSeededRepeatSampler
    return seeded


class ExactResume:
    """Mixin for a ``trl.GRPOTrainer`` subclass (listed before it): the epoch order and the
    generation buffer travel with its checkpoints (see the module docstring).

    A subclass with more state of one process adds it in :meth:`_process_state` and reads it back in
    :meth:`_restore_process_state` (both call ``super()``); it is saved in ``PROCESS_FILE``.
    """

    PROCESS_FILE = "resume_state_{}.ckpt"

    def _get_train_sampler(self, dataset=None):
        self._epoch_sampler = epoch_seeded(super()._get_train_sampler(dataset))
        return self._epoch_sampler

    def _run_epoch(self, *args, epoch, **kwargs):
        # accelerate's loaders do not always pass set_epoch down to the sampler (a resumed loader on several
        # processes: SkipBatchSampler over BatchSamplerShard, neither of which forwards it), so the epoch is
        # set here, before the epoch's first batch; the loaders' own calls, where they arrive, set the same.
        sampler = getattr(self, "_epoch_sampler", None)
        if isinstance(sampler, EpochSeededRepeatSampler):
            sampler.set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    def _inside_generation_window(self, step: int) -> bool:
        return step % (self.args.steps_per_generation * self.num_iterations) != 0

    def _process_file(self, folder) -> str:
        return os.path.join(folder, self.PROCESS_FILE.format(self.accelerator.process_index))

    def _process_state(self) -> dict:
        """This process's state a checkpoint needs beyond TRL's (tensors, numbers, strings, lists, dicts)."""
        if self._buffered_inputs is None or not self._inside_generation_window(self._step):
            return {}  # the next micro-step generates anyway: nothing to carry
        return {"generation": {"step": self._step, "buffer": self._buffered_inputs}}

    def _restore_process_state(self, state: dict, checkpoint: str) -> None:
        if "generation" in state:
            self._step, self._buffered_inputs = state["generation"]["step"], state["generation"]["buffer"]
        elif self._inside_generation_window(self.state.global_step * self.args.gradient_accumulation_steps):
            raise ValueError(
                f"checkpoint {checkpoint} is inside a generation window (step {self.state.global_step}, "
                f"steps_per_generation={self.args.steps_per_generation}, num_iterations={self.num_iterations}) "
                f"and has no generation buffer in {os.path.basename(self._process_file(checkpoint))}: resuming "
                f"would draw new samples where the run reused its own; resume from a checkpoint whose step "
                f"starts a generation, or one this trainer wrote")

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        state = self._process_state()
        if state:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            save_state(self._process_file(folder), state)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = self._process_file(checkpoint)
        device = self.accelerator.device  # "cpu:0" on a CPU rank, which torch.load cannot map to
        state = load_state(path, map_location="cpu" if device.type == "cpu" else device, what="resume state") \
            if os.path.exists(path) else {}
        self._restore_process_state(state, checkpoint)
