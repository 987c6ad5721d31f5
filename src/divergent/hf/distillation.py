"""``DistillationTrainer``: LLM distillation with any divergence as a ``transformers.Trainer``.

::

    from divergent.hf import DistillationConfig, DistillationTrainer

    args = DistillationConfig(output_dir="out", divergence="skew_kl", divergence_params={"alpha": 0.1},
                              per_device_train_batch_size=8, max_steps=1000)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=rows, processing_class=tokenizer)
    trainer.train()

Rows as TRL's SFT takes them (``messages``, ``prompt`` + ``completion``, ``text``: a
``datasets.Dataset`` or a list of dicts) are tokenized for the user
(:mod:`divergent.data.lm_data`); rows that already hold ``input_ids`` (and ``labels``,
else every token counts) are used as they are. Labels follow Hugging Face's convention
(not shifted, -100 = not counted); the loss shifts them.

The loss of a batch is :class:`divergent.train.lm.LMObjective` — the code that
``divergent distill-lm`` runs — computed inside the student's forward (so under FSDP
the output layer's weight is gathered when the fused loss reads it). The Trainer's
``num_items_in_batch`` (tokens counted over the step's micro-batches, summed over
processes) is the normaliser: batch 8 × 1 and 2 × 4 gradient accumulation, or two
processes, give the same update. Launch with ``accelerate launch`` for DDP, FSDP or
DeepSpeed as any ``Trainer``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from divergent.data.lm_data import collate, pack_examples, tokenize_rows
from divergent.models.hf import check_same_tokenizer, load_causal_lm, load_tokenizer
from divergent.models.served import ServedTeacher, check_topk_divergences, is_served
from divergent.train.lm import Batch, LMObjective, count_targets, generated_batch
from divergent.train import cross_tokenizer

__all__ = ["DistillationConfig", "DistillationTrainer", "DistillationCollator"]


@dataclass
class DistillationConfig(transformers.TrainingArguments):
    """``transformers.TrainingArguments`` plus the distillation settings below (each documented once).

    ``remove_unused_columns`` defaults to False here: the collator needs the rows' own columns.
    """

    divergence: str = field(default="forward_kl", metadata={
        "help": "Registered divergence (divergent.available()): forward_kl = KL(teacher || student), reverse_kl, js, ..."})
    divergence_params: dict | None = field(default=None, metadata={
        "help": "Parameters of the divergence, e.g. {'beta': 0.5} for js or {'alpha': 0.1} for skew_kl."})
    temperature: float = field(default=1.0, metadata={"help": "T: both distributions are softmax(logits / T)."})
    hard_weight: float = field(default=0.0, metadata={"help": "Weight of the cross-entropy on the labels."})
    soft_weight: float = field(default=1.0, metadata={"help": "Weight of T^2 x divergence (0: labels only, no teacher)."})
    t2_scale: bool = field(default=True, metadata={"help": "Multiply the divergence by T^2 (Hinton's convention)."})
    fused: bool = field(default=True, metadata={
        "help": "Fuse the loss with the output layer, chunked over tokens: [tokens, vocab] logits are never formed."})
    chunk_size: int | None = field(default=None, metadata={
        "help": "Tokens per chunk of the fused loss (None: as many as fit 2^27 logits, 2^23 on the CPU)."})
    vocab_size: int | None = field(default=None, metadata={
        "help": "Compare the first vocab_size entries only, when the output layers are padded beyond the tokenizer."})
    teacher_cache: str | None = field(default=None, metadata={
        "help": "Folder written by `divergent cache-teacher`: train on its rows and cached top-k teacher, no teacher model."})
    teacher_top_k: int = field(default=20, metadata={
        "help": "Served teacher (teacher_model='http://HOST:PORT/v1'): log-probs per token asked of the server."})
    teacher_model_name: str | None = field(default=None, metadata={
        "help": "Served teacher: the model's name (None: the one model /v1/models lists)."})
    teacher_api: str = field(default="auto", metadata={"help": "Served teacher: auto, vllm or sglang."})
    on_policy_fraction: float = field(default=0.0, metadata={
        "help": "GKD's lambda: probability that a micro-batch is replaced by the student's own continuations."})
    seq_kd_fraction: float = field(default=0.0, metadata={
        "help": "Probability that a micro-batch is replaced by the teacher's continuations (sequence-level KD)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens generated per continuation."})
    generation_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of continuations (0 = greedy)."})
    prompt_len: int = field(default=16, metadata={
        "help": "Prompt tokens of rows that count from their first token (text rows) when generating."})
    max_length: int = field(default=1024, metadata={"help": "Rows are cut to this many tokens (and counted as truncated)."})
    packing: bool = field(default=False, metadata={"help": "Concatenate training rows into blocks of max_length tokens."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator reads the rows' columns."})
    domain_column: str | None = field(default=None, metadata={
        "help": "Column of the rows naming each row's domain: draw training rows by domain (mixing; divergent.hf.domains)."})
    mixing: str = field(default="", metadata={"help": "With domain_column: ddk (default), uniform or proportional."})
    ddk_interval: int = field(default=1000, metadata={
        "help": "DDK: optimisation steps between per-domain perplexity measurements and weight updates (the paper's K)."})
    ddk_smoothing: float = field(default=0.5, metadata={"help": "DDK: alpha in [0, 1] of the factor-smooth update."})
    domain_eval_fraction: float = field(default=0.05, metadata={
        "help": "With domain_column and no eval_dataset: fraction of each domain's rows held out to measure it."})
    teacher_weights: list[float] | None = field(default=None, metadata={
        "help": "Several teachers (teacher_model=[a, b]): positive weights, one per teacher, normalised (default equal)."})
    cross_tokenizer: str = field(default="", metadata={
        "help": "'' (one shared tokenizer; another is an error), 'uld' or 'gold': the teacher has another tokenizer "
                "(teacher_processing_class); uld (Universal Logit Distillation) replaces the divergence, gold compares "
                "the shared vocabulary with it and the rest by ULD (divergent.train.cross_tokenizer); the teacher may be a "
                "model, served (teacher_model='http://...') or a teacher_cache in its own tokens."})
    gold_strategy: str = field(default="observed", metadata={
        "help": "cross_tokenizer='gold': how a run of tokens merges into one distribution, observed or bayesian."})
    gold_matched_weight: float | None = field(default=None, metadata={
        "help": "cross_tokenizer='gold': fixed weight of the shared vocabulary part (with gold_unmatched_weight; "
                "both None: adaptive, the shared fraction of the teacher's vocabulary)."})
    gold_unmatched_weight: float | None = field(default=None, metadata={
        "help": "cross_tokenizer='gold': fixed weight of the sorted-L1 part on the other entries."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.divergence_params is None:
            self.divergence_params = {}
        for name in ("on_policy_fraction", "seq_kd_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"DistillationConfig.{name} must be in [0, 1], got {value!r}")
        if self.on_policy_fraction + self.seq_kd_fraction > 1.0:
            raise ValueError(f"on_policy_fraction + seq_kd_fraction must be <= 1, got "
                             f"{self.on_policy_fraction} + {self.seq_kd_fraction}")
        for name in ("max_new_tokens", "prompt_len", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DistillationConfig.{name} must be a positive int, got {value!r}")
        if self.hard_weight < 0 or self.soft_weight < 0 or self.hard_weight + self.soft_weight == 0:
            raise ValueError(f"hard_weight and soft_weight must be >= 0 and not both 0, got "
                             f"{self.hard_weight}, {self.soft_weight}")
        LMObjective.from_config(self)  # an unknown divergence or parameter fails here, naming itself
        from divergent.train.ddk import DomainMixingSettings

        DomainMixingSettings(domain_column=self.domain_column or "", mixing=self.mixing, ddk_interval=self.ddk_interval,
                             ddk_smoothing=self.ddk_smoothing)._check_domain_settings()
        if cross_tokenizer.check_mode(self.cross_tokenizer):
            cross_tokenizer.check_trainer_settings(self)


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


class DistillationCollator:
    """Right-pads examples into ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding)
    and, for cached rows, ``teacher_indices``/``teacher_logprobs`` (cached rows in another
    tokenizer: ``teacher_rows``, the teacher's own tokens and top-k collated alike)."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        extra = ("teacher_indices", "teacher_logprobs") if "teacher_indices" in examples[0] else ()
        batch = collate(examples, self.pad_token_id, extra=extra)
        if "teacher_row" in examples[0]:
            batch["teacher_rows"] = collate([e["teacher_row"] for e in examples], 0,
                                            extra=("teacher_indices", "teacher_logprobs"))
        return batch


class _ServedCollator:
    """Adds a served teacher's top-k (``teacher_indices``/``teacher_logprobs``) to each collated batch."""

    def __init__(self, collator: Any, served: ServedTeacher, k: int, vocab_size: int) -> None:
        self.collator, self.served, self.k, self.vocab_size = collator, served, k, vocab_size

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(examples)
        indices, logprobs, _ = self.served.served_topk(batch["input_ids"], batch["attention_mask"], k=self.k,
                                                       vocab_size=self.vocab_size)
        return {**batch, "teacher_indices": indices, "teacher_logprobs": logprobs}


def _rows(dataset: Any) -> list[dict[str, Any]] | None:
    if isinstance(dataset, list):
        return dataset
    if hasattr(dataset, "to_list") and hasattr(dataset, "column_names"):
        return dataset.to_list()
    return None


def _prepare(dataset: Any, tokenizer: Any, args: DistillationConfig, name: str, train: bool):
    """Tokenized examples (and their :class:`DataStats`) from rows; other datasets are used as they are."""
    if dataset is None:
        return None, None
    rows = _rows(dataset)
    if rows is None:
        return dataset, None  # a torch Dataset of ready examples
    if not rows:
        raise ValueError(f"{name} is empty")
    if "input_ids" in rows[0]:
        examples = [{**row, "labels": list(row.get("labels") or row["input_ids"])} for row in rows]
        return _Examples(examples), None
    if tokenizer is None:
        raise ValueError(f"{name} holds raw rows (columns {sorted(rows[0])}); pass processing_class=<the tokenizer> "
                         f"so they can be tokenized")
    examples, stats = tokenize_rows(rows, tokenizer, max_length=2**62 if (train and args.packing) else args.max_length,
                                    source=name)
    if not examples:
        raise ValueError(f"{name}: none of its {stats.rows} rows has anything to learn "
                         f"({stats.skipped_nothing_to_learn} skipped)")
    if train and args.packing:
        examples = pack_examples(examples, args.max_length)
    return _Examples(examples), stats


def _by_domain(teachers: Mapping, args: DistillationConfig, tokenizer: Any) -> dict[str, nn.Module]:
    """``{domain: model}`` of ``teacher_model={domain: model or local folder}`` (one teacher per domain)."""
    if not args.domain_column:
        raise ValueError(f"teacher_model is a dict by domain ({', '.join(map(str, teachers))}): one teacher per "
                         f"domain needs args.domain_column (the rows' column naming their domain)")
    for name in ("teacher_weights", "cross_tokenizer", "seq_kd_fraction", "teacher_cache"):
        if getattr(args, name):
            raise ValueError(f"one teacher per domain cannot be combined with args.{name}={getattr(args, name)!r}")
    models = {}
    for name, teacher in teachers.items():
        if is_served(teacher):
            raise ValueError(f"teacher_model[{name!r}]: the teachers by domain must be local folders or models; the "
                             f"served teacher {teacher} cannot be one of them")
        if isinstance(teacher, nn.Module):
            models[str(name)] = teacher
            continue
        models[str(name)] = load_causal_lm(teacher, what=f"teacher_model[{name!r}]")
        if tokenizer is not None:
            check_same_tokenizer(tokenizer, load_tokenizer(teacher, f"teacher_model[{name!r}]"))
    return models


def _mixture(teachers: Any, args: DistillationConfig, tokenizer: Any) -> nn.Module:
    from divergent.models.mixture import load_teachers

    for name in ("cross_tokenizer", "seq_kd_fraction", "teacher_cache"):
        if getattr(args, name):
            raise ValueError(f"several teachers cannot be combined with args.{name}={getattr(args, name)!r} yet")
    return load_teachers(list(teachers), args.teacher_weights, temperature=args.temperature, tokenizer=tokenizer)


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that distils ``teacher_model`` into ``model`` with any divergence.

    ``model``/``teacher_model``: causal LMs or local folders (loaded without download);
    the teacher is kept as ``trainer.teacher_model`` (eval mode, no grad, on the training
    device, whole on every process). ``args``: a :class:`DistillationConfig`.
    ``train_dataset``/``eval_dataset``: rows (see the module docstring) or ready examples;
    with ``args.teacher_cache`` they default to the cache's ``train``/``eval`` splits and no
    teacher model is needed. ``teacher_processing_class``: the teacher's tokenizer, checked
    to be the student's unless ``args.cross_tokenizer`` is set (then the teacher reads each
    row re-tokenized; see :mod:`divergent.train.cross_tokenizer`).
    ``data_stats``: what became of the rows (truncated, skipped with nothing to learn).
    ``teacher_model=[a, b]``: the weighted mixture of several teachers (``args.teacher_weights``);
    ``teacher_model={"code": a, "prose": b}`` with ``args.domain_column``: one teacher per domain,
    each row distilled from its domain's teacher (:mod:`divergent.models.domain_teachers`).
    ``teacher_model="http://HOST:PORT/v1"``: a served teacher (vLLM/SGLang, :mod:`divergent.models.served`)
    whose top-k log-probs (``args.teacher_top_k``, at temperature 1) are fetched for each batch,
    as a cache's rows are read; ``teacher_processing_class`` is then a local copy of its tokenizer
    (default: the student's). With ``args.cross_tokenizer`` a served teacher is asked for the top-k
    of each batch re-tokenized for it, and a ``teacher_cache`` in the teacher's tokens gives rows
    re-tokenized for the student (``teacher_processing_class``: default the cache's saved copy).
    """

    def __init__(
        self,
        model: nn.Module | str | None = None,
        teacher_model: nn.Module | str | None = None,
        args: DistillationConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Any = None,
        teacher_processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = DistillationConfig(output_dir="distillation-output")
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}")
        if model is None:
            raise ValueError("model (the student) is required: a causal LM or a local folder")
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            path = model
            model = load_causal_lm(path, what="model")
            processing_class = processing_class if processing_class is not None else load_tokenizer(path, "model")
        served = None
        by_domain = None
        if isinstance(teacher_model, Mapping):  # one teacher per domain: made once the data's domains are known
            by_domain, teacher_model = _by_domain(teacher_model, args, processing_class), None
        if isinstance(teacher_model, (list, tuple)):  # several local teachers: their weighted mixture
            teacher_model = _mixture(teacher_model, args, processing_class)
        elif args.teacher_weights:
            raise ValueError("args.teacher_weights is given with one teacher_model: give a list of teachers")
        if is_served(teacher_model):  # a remote cache: each batch's top-k comes from the server
            check_topk_divergences([args.divergence])
            if args.on_policy_fraction + args.seq_kd_fraction > 0:
                raise ValueError("on_policy_fraction / seq_kd_fraction need a local teacher_model to score generated "
                                 "continuations; a served teacher gives log-probs of the data only")
            if args.cross_tokenizer and teacher_processing_class is None:
                raise ValueError("cross_tokenizer with a served teacher needs teacher_processing_class: a local copy "
                                 "of the served model's tokenizer")
            served = ServedTeacher(teacher_model, teacher_processing_class or processing_class,
                                   model=args.teacher_model_name, api=args.teacher_api)
            teacher_processing_class, teacher_model = served.tokenizer, None
        if isinstance(teacher_model, (str, bytes)) or hasattr(teacher_model, "__fspath__"):
            path = teacher_model
            teacher_model = load_causal_lm(path, what="teacher_model")
            if teacher_processing_class is None:
                teacher_processing_class = load_tokenizer(path, "teacher_model")
        generates = args.on_policy_fraction + args.seq_kd_fraction > 0

        cache = None
        if args.teacher_cache is not None:
            from divergent.data.teacher_cache import TeacherCache
            from divergent.models.hf import tokenizer_fingerprint

            if train_dataset is not None:
                raise ValueError("args.teacher_cache holds the training rows; pass no train_dataset with it")
            cache = TeacherCache(args.teacher_cache)
            cache.verify_all()
            if args.cross_tokenizer:  # rows in the teacher's tokens, re-tokenized for the student
                teacher_processing_class = cross_tokenizer.cache_tokenizer(cache, teacher_processing_class)
            elif processing_class is not None and cache.tokenizer and \
                    cache.tokenizer != tokenizer_fingerprint(processing_class):
                raise ValueError(f"the teacher cache {args.teacher_cache} was written with another tokenizer than the "
                                 f"student's; set cross_tokenizer='uld' to distil across tokenizers")

            def rows(split: TeacherCache) -> list[dict[str, Any]]:
                if not args.cross_tokenizer:
                    return split.examples()
                return cross_tokenizer.student_rows(split.examples(), teacher_processing_class, processing_class)

            train_dataset = _Examples(rows(cache))
            if eval_dataset is None and "eval" in cache.index.get("splits", {}):
                eval_dataset = _Examples(rows(TeacherCache(args.teacher_cache, "eval")))
        if args.cross_tokenizer:
            self.objective = cross_tokenizer.objective(args, processing_class, teacher_processing_class, served=served)
        else:
            cross_tokenizer.check_same(processing_class, teacher_processing_class, check_same_tokenizer)
            self.objective = LMObjective.from_config(args)
        if teacher_model is None and by_domain is None and (generates or (self.objective.needs_teacher and cache is None and served is None)):
            raise ValueError(
                "teacher_model is required: soft_weight > 0 needs a teacher (or args.teacher_cache), and "
                "on_policy_fraction / seq_kd_fraction need one to score generated continuations"
            )
        self.data_stats: dict[str, Any] = {}
        domains = None
        if args.domain_column is not None:
            from divergent.hf.domains import domain_data

            domains, train_dataset, eval_dataset = domain_data(train_dataset, eval_dataset, processing_class, args)
            train_dataset, eval_dataset = _Examples(train_dataset), _Examples(eval_dataset)
        if by_domain is not None:
            from divergent.models.domain_teachers import DomainTeachers

            teacher_model = DomainTeachers(by_domain, domains.names)
        train_dataset, self.data_stats["train"] = _prepare(train_dataset, processing_class, args, "train_dataset", True)
        eval_dataset, self.data_stats["eval"] = _prepare(eval_dataset, processing_class, args, "eval_dataset", False)
        self.eos_token_id = getattr(processing_class, "eos_token_id", None)
        pad = getattr(processing_class, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_id or 0))
        data_collator = data_collator or DistillationCollator(self.pad_token_id)
        if served is not None and not args.cross_tokenizer:  # (across tokenizers the objective asks the server)
            data_collator = _ServedCollator(data_collator, served, args.teacher_top_k, len(served.tokenizer))
        self.served_teacher = served
        super().__init__(
            model=model, args=args, data_collator=data_collator,
            train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class, **kwargs,
        )
        # The Trainer counts num_items_in_batch (over labels[..., 1:], all micro-batches of a step,
        # summed over processes) only for models that take loss kwargs; this loss does.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.teacher_model = None
        if teacher_model is not None:
            self.teacher_model = teacher_model.to(self.args.device).eval()
            for parameter in self.teacher_model.parameters():
                parameter.requires_grad_(False)
        self._micro = (-1, 0)  # (global step, micro-batches drawn in it): seeds the on-policy draws
        self.domain_sampler = self.domain_callback = None
        if domains is not None:
            from divergent.hf.domains import mixing_parts

            self.domain_sampler, self.domain_callback = mixing_parts(domains, self)
            self.add_callback(self.domain_callback)

    def _get_train_sampler(self, train_dataset=None):
        if self.domain_sampler is not None:
            return self.domain_sampler
        return super()._get_train_sampler(train_dataset)

    # -- domain mixing: rows drawn when a step takes them, the mixing in every checkpoint ---------

    def get_train_dataloader(self):
        if self.domain_sampler is None:
            return super().get_train_dataloader()
        from divergent.hf.domains import slot_dataloader

        return slot_dataloader(self)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.domain_sampler is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        from divergent.hf.domains import resolve_batches

        from accelerate.utils import send_to_device

        slots = list(itertools.islice(epoch_iterator, num_batches))
        batches = [send_to_device(batch, device) for batch in resolve_batches(self, slots)]  # as the loader would
        return super().get_batch_samples(iter(batches), len(batches), device)

    def _save_checkpoint(self, model, trial):
        if self.domain_callback is not None and self.args.should_save:
            # Written before the Trainer's files: a folder with trainer_state.json holds the mixing too.
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            self.domain_callback.save(folder, self.state.global_step)
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``transformers.Trainer.train``; with domain mixing, a resumed run also continues the mixing
        (weights, per-domain positions, the sampler's generator, the measurements) from the checkpoint."""
        if self.domain_callback is not None and resume_from_checkpoint not in (None, False):
            from divergent.hf.domains import resume_mixing

            resume_from_checkpoint = resume_mixing(self, resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    # -- the loss ---------------------------------------------------------------------

    def _batch(self, inputs: dict[str, torch.Tensor]) -> Batch:
        return Batch(inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                     inputs.get("teacher_indices"), inputs.get("teacher_logprobs"), teacher_rows=inputs.get("teacher_rows"),
                     domains=inputs.get("domain_index"))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = self.accelerator.unwrap_model(model)
        normalizer = num_items_in_batch if num_items_in_batch is not None else \
            max(int(count_targets(inputs["labels"])), 1)
        loss = self.objective(model, student, self._batch(inputs), teacher=self.teacher_model, normalizer=normalizer)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and \
                self.accelerator.num_processes > 1:
            # num_items_in_batch is the count over all processes, whose gradients DDP/FSDP average.
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the distillation loss per counted token of the batch (``eval_loss``)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- on-policy and sequence-level KD ---------------------------------------------

    def _generation_context(self, model):
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        except ImportError:  # pragma: no cover
            FSDP = None
        if FSDP is not None and isinstance(model, FSDP):
            return FSDP.summon_full_params(model, writeback=False)
        return contextlib.nullcontext()

    def training_step(self, model, inputs, num_items_in_batch=None):
        args = self.args
        if args.on_policy_fraction + args.seq_kd_fraction > 0:
            step = self.state.global_step
            self._micro = (step, self._micro[1] + 1 if self._micro[0] == step else 0)
            # The same draw on every process, and again when a run resumes at this step.
            seed = (args.seed * 1_000_003 + step) * 131 + self._micro[1]
            draw = random.Random(seed).random()
            generator = torch.Generator().manual_seed(seed)
            source = None
            if draw < args.on_policy_fraction:
                source, context = self.accelerator.unwrap_model(model), self._generation_context(model)
            elif draw < args.on_policy_fraction + args.seq_kd_fraction:
                source, context = self.teacher_model, contextlib.nullcontext()
            if source is not None:
                with context:
                    batch = generated_batch(
                        source, self._batch(inputs), max_new_tokens=args.max_new_tokens, prompt_len=args.prompt_len,
                        temperature=args.generation_temperature, generator=generator, pad_token_id=self.pad_token_id,
                        eos_token_id=self.eos_token_id, device=args.device)
                inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels,
                          **({} if batch.domains is None else {"domain_index": batch.domains})}
                # The step's token count was taken before generation: this micro-batch is
                # normalised by its own count (and the Trainer divides by the accumulation steps).
                num_items_in_batch = None
        return super().training_step(model, inputs, num_items_in_batch)
