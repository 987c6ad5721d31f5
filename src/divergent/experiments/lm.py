"""``divergent distill-lm`` and ``divergent cache-teacher``: LLM distillation runs a user asks for.

``distill-lm`` trains one student per requested divergence (plus a student trained on
the data alone, "scratch"), all from the same initial weights on the same batches, and
reports per model: evaluation loss (cross-entropy, nats per counted token) and
perplexity (bits per byte when the tokens are bytes), KL(teacher ‖ student) and top-1
agreement with the teacher, training tokens/s and peak memory, with curves of those
comparable quantities in ``curves.png``. Each distilled student is written with
``save_pretrained`` (with its tokenizer) to ``runs/<row>/model`` at every checkpoint and
at the end.

With no teacher, student or data it runs on embedded data: the Python standard
library's own source as bytes, a small GPT teacher trained once and cached, and a
smaller GPT student (under a minute on two CPU cores, the teacher training included). With ``teacher``, ``student``
(local Hugging Face or TinyGPT folders) and ``data`` (the user's files, see
:mod:`divergent.data.lm_data`) it runs on those. With ``teacher_cache`` (written by
``cache-teacher``) it trains with no teacher in memory.

Python API::

    from divergent.experiments.lm import DistillLMConfig, run_distill_lm
    results = run_distill_lm(DistillLMConfig(teacher="t", student="s", data="rows.jsonl", steps=500))
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shlex
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from divergent.config import config_to_dict, load_run_config, save_config
from divergent.experiments import report
from divergent.io import read_json, write_json
from divergent.train.ddk import DomainMixingSettings
from divergent.train import cross_tokenizer
from divergent.train.lm import LMTrainingSettings
from divergent.train.run import Checkpointer, NonFiniteLossError, RunInterrupted, drive

__all__ = [
    "DistillLMConfig",
    "CacheTeacherConfig",
    "run_distill_lm",
    "resume_distill_lm",
    "run_cache_teacher",
    "default_teacher",
    "TEACHER_CONFIG",
    "STUDENT_CONFIG",
]

# The default models: on two CPU cores the teacher trains in about 10 s and each student in
# a few seconds (measured in docs/llm.md).
TEACHER_CONFIG = dict(vocab_size=256, d_model=128, n_layers=2, n_heads=4, max_seq_len=128)
STUDENT_CONFIG = dict(vocab_size=256, d_model=64, n_layers=1, n_heads=2, max_seq_len=128)
_TEACHER_RECIPE_VERSION = 2  # bump when the default teacher's training changes
_DEFAULT_CORPUS_LENGTH = 65  # tokens per example: 64 predicted bytes
_DEFAULT_DATA_LENGTH = 512
SCRATCH = "scratch"
# The embedded default (no arguments) compares these rows over these seeds (experiments/lm_compare.py).
DEFAULT_COMPARISON_ROWS = ("forward_kl", "reverse_kl", "js", "tvd", "skew_kl", "alpha_beta")
DEFAULT_COMPARISON_SEEDS = (0, 1, 2)


@dataclass
class LMDataSettings:
    """The models and data of ``distill-lm`` and ``cache-teacher`` (shared by both configs).

    teacher: local Hugging Face (or TinyGPT) folder of the teacher; "" = the default byte-level
        GPT teacher, trained on the standard-library corpus once and cached; or a served teacher,
        ``http://HOST:PORT/v1`` (vLLM or SGLang; :mod:`divergent.models.served`), read as a
        top-k teacher (log-probs at temperature 1; the distillation temperature is applied locally).
    teacher_tokenizer: a served teacher's tokenizer (a local copy; distill-lm: default the student's);
        with teacher_cache and cross_tokenizer, the tokenizer the cache was written with
        (default: the copy cache-teacher saves in it).
    teacher_model: the served model's name ("" = the one model the server lists).
    teacher_api: auto, vllm or sglang (auto: from the server's /v1/models).
    teacher_in_flight: requests sent to a served teacher at once.
    teacher_top_k: log-probs per token asked of a served teacher by distill-lm (cache-teacher: k).
    data: the training data: a .jsonl/.json/.csv/.parquet/.txt file or a save_to_disk folder,
        rows of 'messages', 'prompt' + 'completion' or 'text'; "" = the Python standard
        library's source files (as bytes, or tokenized with the models' tokenizer).
    eval_data: evaluation data in the same formats; "" = the data's validation/test split if
        it has one, else a held-out eval_fraction of its rows.
    eval_fraction: fraction of the data's rows held out for evaluation when there is no eval_data.
    max_length: tokens per example: longer rows are truncated (and counted in the report);
        0 = 65 on the standard-library corpus, 512 on data files.
    packing: concatenate training rows into blocks of max_length tokens.
    max_eval_examples: evaluation examples used (the first ones).
    teacher_steps: steps of training of the default teacher (when it is not cached yet; the same
        value in distill-lm and cache-teacher shares one cached teacher).
    max_train_bytes: cap on the standard-library training text.
    max_val_bytes: cap on the standard-library evaluation text.
    seed: seed of the default models' initialisation, the data order, splits and generation.
    device: cpu, cuda or auto.
    num_threads: CPU threads for torch (0 = torch's default).
    """

    teacher: str = ""
    teacher_tokenizer: str = ""
    teacher_model: str = ""
    teacher_api: str = "auto"
    teacher_in_flight: int = 4
    teacher_top_k: int = 20
    data: str = ""
    eval_data: str = ""
    eval_fraction: float = 0.05
    max_length: int = 0
    packing: bool = False
    max_eval_examples: int = 64
    teacher_steps: int = 300
    max_train_bytes: int = 1_000_000
    max_val_bytes: int = 100_000
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0

    def _check_data_settings(self) -> None:
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.max_length < 0 or self.max_length == 1:
            raise ValueError(f"max_length must be 0 (automatic) or >= 2, got {self.max_length}")
        for name in ("teacher_steps", "max_eval_examples", "max_train_bytes", "max_val_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available; use cpu or auto")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
        from divergent.experiments.served_teacher import check_served_settings

        check_served_settings(self)

    def length(self) -> int:
        if self.max_length:
            return self.max_length
        return _DEFAULT_DATA_LENGTH if (self.data or getattr(self, "teacher_cache", "")) else _DEFAULT_CORPUS_LENGTH

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class DistillLMConfig(LMDataSettings, LMTrainingSettings, DomainMixingSettings):
    """Settings of ``divergent distill-lm`` (every key can be set in YAML or with ``--set``):
    the models and data of :class:`LMDataSettings`, how each student is trained
    (:class:`divergent.train.lm.LMTrainingSettings`; ``hard_weight``, ``soft_weight`` and the
    generation settings apply to the distilled students, the scratch student trains on the
    data alone), the domain mixing of :class:`divergent.train.ddk.DomainMixingSettings`
    (every student), and

    student: local folder of the student's initial weights (with its tokenizer); "" = a new
        byte-level GPT student (only with the default teacher or its cache).
    teacher_cache: folder written by `divergent cache-teacher`: train from its rows and cached
        top-k teacher with no teacher in memory (replaces data and eval_data).
    divergences: one distilled student per registered divergence (divergent.available()); unset (null):
        forward_kl, reverse_kl, js, tvd, skew_kl, alpha_beta in the embedded comparison, else forward_kl.
    divergence_params: parameters per divergence, e.g. {js: {beta: 0.3}}.
    cross_tokenizer: "" (teacher and student share one tokenizer; another is an error), "uld" or
        "gold": the teacher has another tokenizer (divergent.train.cross_tokenizer); uld (Universal
        Logit Distillation) replaces the divergence, gold compares the shared vocabulary with it; the
        teacher may be a local folder, a served teacher or a cache in its own tokens.
    gold_strategy, gold_matched_weight, gold_unmatched_weight: with cross_tokenizer gold: how a
        run of tokens merges (observed | bayesian), and fixed weights of the shared and the other
        vocabulary entries (both null: adaptive, the shared fraction of the teacher's vocabulary).
    include_scratch: also train the student on the data alone (cross-entropy), the baseline.
    evaluations: evaluations per student run, evenly spaced, the last at the end (curves.png).
    eval_batch_size: examples per evaluation batch.
    checkpoint_every: steps between checkpoints (and save_pretrained exports) of each student.
    keep_checkpoints: checkpoints kept per student.
    output_dir: folder in which the run folder is created.
    seeds: several seeds = a comparison (:mod:`divergent.experiments.lm_compare`): every row on every
        seed, paired differences with the student alone and ``baseline``, a verdict; [] = one run with ``seed``.
        Unset (null): [0, 1, 2] on the embedded default (no teacher, student or data given), else [].
    baseline: the divergence every row is compared with, seed by seed ("" = the first of divergences).
    on_policy_fractions: with seeds, one row per divergence and GKD λ (e.g. [0, 0.5, 1]); [] = ``on_policy_fraction``.
    generation_prompts: with seeds, held-out prompts each student generates from (ROUGE-L, distinct-n, reward; 0 = none).
    reward: with seeds, a reward scored on the generations: exact | math | regex:PATTERN | module:function (as ``rl``).
    reward_timeout: seconds a call of a module:function reward may take (0 = no limit, in this process).
    student_quant: "" or int8 / int4: every student (scratch included) trains with its linear layers'
        weights fake-quantized per output channel, straight-through (:mod:`divergent.models.fake_quant`;
        the output layer stays full precision); give --student the teacher's folder to distil a model
        into its quantized self. Saved model folders hold the quantized weights (checkpoints the latent ones).
    """

    student: str = ""
    teachers: list[str] = field(default_factory=list)
    teacher_weights: list[float] = field(default_factory=list)
    teacher_cache: str = ""
    divergences: list[str] | None = None
    divergence_params: dict = field(default_factory=dict)
    cross_tokenizer: str = ""
    gold_strategy: str = "observed"
    gold_matched_weight: float | None = None
    gold_unmatched_weight: float | None = None
    include_scratch: bool = True
    evaluations: int = 5
    eval_batch_size: int = 16
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    output_dir: str = "runs"
    seeds: list[int] | None = None
    baseline: str = ""
    on_policy_fractions: list[float] = field(default_factory=list)
    generation_prompts: int = 32
    reward: str = ""
    reward_timeout: float = 60.0
    student_quant: str = ""

    def __post_init__(self) -> None:
        self._check_data_settings()
        self._check_domain_settings()
        embedded = not (self.teacher or self.student or self.data or self.eval_data or self.teacher_cache)
        if self.seeds is None:  # the embedded default is a comparison (docs/llm.md); your models: one run
            self.seeds = list(DEFAULT_COMPARISON_SEEDS) if embedded else []
        if self.divergences is None:
            self.divergences = list(DEFAULT_COMPARISON_ROWS) if embedded and self.seeds else ["forward_kl"]
        self._check_comparison_settings()
        if not self.divergences:
            raise ValueError("divergences is empty: give at least one divergence (divergent.available())")
        if len(set(self.divergences)) != len(self.divergences):
            raise ValueError(f"a divergence is listed twice in divergences: {self.divergences}")
        unknown = [k for k in self.divergence_params if k not in self.divergences]
        if unknown:
            raise ValueError(f"divergence_params names {unknown}, which are not in divergences {self.divergences}")
        from divergent.models.domain_teachers import check_domain_teacher_settings

        if check_domain_teacher_settings(self) is not None:
            pass  # one teacher per domain (--teacher DOMAIN=PATH)
        elif self.teachers or self.teacher_weights:
            from divergent.models.mixture import check_teacher_settings

            check_teacher_settings(self)
        if self.teacher_cache and (self.data or self.eval_data):
            raise ValueError("give teacher_cache (its rows are the data) or data/eval_data, not both")
        if bool(self.student) and not (self.teacher or self.teacher_cache):
            raise ValueError("student is given without teacher: give --teacher PATH (or --teacher-cache DIR) too")
        if self.teacher and not self.student:
            raise ValueError("teacher is given without student: give --student PATH too (the student's initial "
                             "weights and tokenizer, a save_pretrained folder)")
        for name in ("steps", "batch_size", "grad_accum", "evaluations", "eval_batch_size", "checkpoint_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in self.divergences:
            self.trainer_config(name)  # an unknown divergence or parameter fails here, naming itself
        if cross_tokenizer.check_mode(self.cross_tokenizer):
            cross_tokenizer.check_settings(self)
            if self.domain_column:
                raise ValueError("cross_tokenizer and domain_column cannot be combined yet: DDK measures the teacher's "
                                 "per-domain perplexity in the student's tokens; drop one of them")
        if self.student_quant:
            from divergent.models.fake_quant import quant_bits

            quant_bits(self.student_quant)

    def _check_comparison_settings(self) -> None:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds} (a seed listed twice would be paired with itself)")
        if self.baseline and self.baseline not in self.divergences:
            raise ValueError(f"baseline {self.baseline!r} must be one of divergences {self.divergences}")
        if len(set(self.on_policy_fractions)) != len(self.on_policy_fractions) or \
                any(not 0.0 <= f <= 1.0 for f in self.on_policy_fractions):
            raise ValueError(f"on_policy_fractions must be distinct values in [0, 1], got {self.on_policy_fractions}")
        if self.generation_prompts < 0:
            raise ValueError(f"generation_prompts must be >= 0 (0 = no generation), got {self.generation_prompts}")
        if (self.on_policy_fractions or self.reward) and not self.seeds:
            raise ValueError("on_policy_fractions and reward are settings of a comparison: give seeds too (--seeds 0,1,2)")
        if self.reward and not self.generation_prompts:
            raise ValueError("reward is scored on the generations: set generation_prompts >= 1 too")
        if self.reward:
            from divergent.rl.rewards import resolve_reward

            resolve_reward(self.reward)  # an unknown spec or a module that does not import fails here, naming it

    def trainer_config(self, divergence: str | None, vocab_size: int | None = None):
        """The LMDistillConfig of one row (``divergence=None``: the scratch row, labels only)."""
        from divergent.train.lm import LMDistillConfig

        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(LMTrainingSettings)}
        settings.update(warmup_steps=min(self.warmup_steps, self.steps), seed=self.seed,
                        vocab_size=vocab_size if vocab_size is not None else self.vocab_size,
                        eval_every=max(1, self.steps // self.evaluations), log_every=max(1, self.steps // 50))
        if divergence is None:
            settings.update(hard_weight=1.0, soft_weight=0.0, on_policy_fraction=0.0, seq_kd_fraction=0.0)
            return LMDistillConfig(**settings)
        return LMDistillConfig(divergence=divergence, divergence_params=dict(self.divergence_params.get(divergence, {})),
                               **settings)


# ----------------------------------------------------------------------------- models and data


@dataclass
class _Setup:
    """Everything a run trains from."""

    teacher: torch.nn.Module | None
    student_init: torch.nn.Module
    tokenizer: Any  # a Hugging Face tokenizer, or ByteTokenizer for byte-level models
    train: list[dict]
    eval: list[dict]
    byte_level: bool
    data_description: str
    stats: dict[str, Any]
    vocab_size: int | None
    teacher_description: str
    cached_teacher: bool = False
    domains: Any = None  # divergent.experiments.domains.DomainSetup with a domain column
    teacher_tokenizer: Any = None  # set when the teacher has another tokenizer (cross_tokenizer)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _stdlib_examples(tokenizer: Any, length: int, max_train_bytes: int, max_val_bytes: int, max_eval: int):
    """The standard-library corpus as examples of ``length`` tokens (train) and the first evaluation windows."""
    from divergent.data.lm_data import is_byte_tokenizer, stream_examples
    from divergent.data.text import decode_bytes, load_stdlib_corpus

    corpus = load_stdlib_corpus(max_train_bytes=max_train_bytes, max_val_bytes=max_val_bytes)
    if is_byte_tokenizer(tokenizer):
        train, val = corpus.train, corpus.val
    else:
        train = torch.tensor(tokenizer(decode_bytes(corpus.train), add_special_tokens=False)["input_ids"])
        val = torch.tensor(tokenizer(decode_bytes(corpus.val), add_special_tokens=False)["input_ids"])
    description = f"Python standard library source: {corpus.describe()}; {len(train):,} / {len(val):,} tokens"
    return stream_examples(train, length), stream_examples(val, length, max_eval), description


def _load_examples(settings: LMDataSettings, tokenizer: Any) -> tuple[list[dict], list[dict], str, dict[str, Any]]:
    """(train examples, evaluation examples, description, what became of the rows) of the settings' data."""
    from divergent.data.lm_data import load_lm_data

    if not settings.data:
        train, evaluation, description = _stdlib_examples(tokenizer, settings.length(), settings.max_train_bytes,
                                                          settings.max_val_bytes, settings.max_eval_examples)
        return train, evaluation, description, {}
    data = load_lm_data(settings.data, tokenizer, eval_data=settings.eval_data or None,
                        eval_fraction=settings.eval_fraction, max_length=settings.length(), packing=settings.packing,
                        seed=settings.seed, max_eval_examples=settings.max_eval_examples)
    description = "; ".join([data.train_stats.describe(), data.eval_stats.describe(), *data.notes])
    return data.train, data.eval, description, {"train": data.train_stats.__dict__, "eval": data.eval_stats.__dict__}


def _model_vocab(model: torch.nn.Module) -> int:
    from divergent.models.hf import output_vocab

    return output_vocab(model)


def _resolve_vocab(config_vocab: int | None, student: torch.nn.Module, teacher_vocab: int | None, tokenizer: Any) -> int | None:
    """The vocabulary compared: as set, else the tokenizer's size when the output layers differ by padding."""
    if config_vocab is not None or teacher_vocab is None:
        return config_vocab
    student_vocab = _model_vocab(student)
    if student_vocab == teacher_vocab:
        return None
    size = len(tokenizer)
    if size <= min(student_vocab, teacher_vocab):
        return size
    raise ValueError(
        f"the student's output layer has {student_vocab} rows and the teacher's {teacher_vocab}, and the tokenizer "
        f"has {size} tokens: the two models do not share one vocabulary (cross-tokenizer distillation is not "
        f"supported yet)"
    )


def _tokenizer_for(path: str, what: str, model: torch.nn.Module):
    from divergent.data.lm_data import ByteTokenizer
    from divergent.models.hf import load_tokenizer

    tokenizer = load_tokenizer(path, what)
    if tokenizer is not None:
        return tokenizer
    vocab = _model_vocab(model)
    if vocab == 256:
        return ByteTokenizer()
    raise ValueError(f"{what} {path} has no tokenizer (tokenizer.json / tokenizer_config.json) and its vocabulary "
                     f"({vocab}) is not bytes; save the tokenizer beside the model (tokenizer.save_pretrained({path!r}))")


def _setup(config: DistillLMConfig, console: Console, device: torch.device, run_dir: Path | None = None) -> _Setup:
    from divergent.data.lm_data import ByteTokenizer, is_byte_tokenizer
    from divergent.models.gpt import GPTConfig, TinyGPT
    from divergent.models.hf import check_same_tokenizer, load_causal_lm
    from divergent.models.served import is_served

    if config.teacher_cache:
        return _setup_from_cache(config, console)
    if is_served(config.teacher):  # a remote cache: its top-k written once into the run folder
        from divergent.experiments.served_teacher import served_cache

        return _setup_from_cache(config, console, served_cache(config, Path(run_dir or "."), console))
    from divergent.models.domain_teachers import check_domain_teacher_settings, describe_domain_teachers

    paths = check_domain_teacher_settings(config)  # {domain: path}: one teacher per domain (--teacher DOMAIN=PATH)
    by_domain = None
    if paths:
        student = load_causal_lm(config.student, what="--student")
        tokenizer = _tokenizer_for(config.student, "--student", student)
        by_domain = {name: load_causal_lm(path, what=f"--teacher {name}=") for name, path in paths.items()}
        for name, path in paths.items():
            cross_tokenizer.check_same(tokenizer, _tokenizer_for(path, f"--teacher {name}=", by_domain[name]),
                                       check_same_tokenizer, is_byte_tokenizer)
        teacher = None  # made below, when the data's domains are known
        teacher_description = describe_domain_teachers(paths)
    elif config.teachers:
        from divergent.models.mixture import TeacherMixture, mixture_weights

        student = load_causal_lm(config.student, what="--student")
        tokenizer = _tokenizer_for(config.student, "--student", student)
        teachers = [load_causal_lm(path, what="--teacher") for path in config.teachers]
        for path, model in zip(config.teachers, teachers):
            cross_tokenizer.check_same(tokenizer, _tokenizer_for(path, "--teacher", model), check_same_tokenizer,
                                       is_byte_tokenizer)
        weights = mixture_weights(config.teacher_weights, len(teachers))
        teacher = TeacherMixture(teachers, weights, temperature=config.temperature)
        teacher_description = f"mixture (T = {config.temperature:g}) of " + ", ".join(f"{w:.3g} x {p}" for w, p in zip(weights, config.teachers))
    elif config.teacher:
        teacher = load_causal_lm(config.teacher, what="--teacher")
        student = load_causal_lm(config.student, what="--student")
        teacher_tokenizer = _tokenizer_for(config.teacher, "--teacher", teacher)
        tokenizer = _tokenizer_for(config.student, "--student", student)
        if not config.cross_tokenizer:
            cross_tokenizer.check_same(tokenizer, teacher_tokenizer, check_same_tokenizer, is_byte_tokenizer)
        teacher_description = f"{config.teacher}"
    else:
        tokenizer = ByteTokenizer()
        torch.manual_seed(config.seed)
        student = TinyGPT(GPTConfig(**STUDENT_CONFIG))
        teacher = None  # trained below on the training examples
        teacher_description = f"default byte-level GPT {TEACHER_CONFIG}"
    byte_level = is_byte_tokenizer(tokenizer)
    domains = None
    if config.domain_column:
        from divergent.experiments.domains import load_domains

        domains, (train, evaluation, description, stats) = load_domains(config, tokenizer)
    else:
        train, evaluation, description, stats = _load_examples(config, tokenizer)
    if by_domain:
        from divergent.models.domain_teachers import DomainTeachers

        teacher, domains.teachers = DomainTeachers(by_domain, domains.data.names), paths
    elif teacher is None:
        teacher, _ = default_teacher(train, config, console=console, device=device)
    teacher = teacher.to(device).eval()  # evaluated before any student trains
    if config.cross_tokenizer:
        return _Setup(teacher=teacher, student_init=student, tokenizer=tokenizer, train=train, eval=evaluation,
                      byte_level=byte_level, data_description=description, stats=stats, vocab_size=config.vocab_size,
                      teacher_description=f"{teacher_description} (its own tokenizer; {config.cross_tokenizer})",
                      teacher_tokenizer=teacher_tokenizer)
    vocab = _resolve_vocab(config.vocab_size, student, _model_vocab(teacher), tokenizer)
    if vocab is not None and not byte_level:
        console.print(f"vocabulary: comparing the first {vocab} entries (the tokenizer's size)")
    if domains is not None:
        from divergent.experiments.domains import with_teacher

        with_teacher(domains, teacher, batch_size=config.eval_batch_size, device=device,
                     pad_token_id=_pad_id(tokenizer), vocab_size=vocab)
    return _Setup(teacher=teacher, student_init=student, tokenizer=tokenizer, train=train, eval=evaluation,
                  byte_level=byte_level, data_description=description, stats=stats, vocab_size=vocab,
                  teacher_description=teacher_description, domains=domains)


def _setup_from_cache(config: DistillLMConfig, console: Console, directory: str | Path | None = None) -> _Setup:
    from divergent.data.lm_data import ByteTokenizer, is_byte_tokenizer
    from divergent.data.teacher_cache import TeacherCache
    from divergent.models.gpt import GPTConfig, TinyGPT
    from divergent.models.hf import load_causal_lm, tokenizer_fingerprint

    directory = str(directory or config.teacher_cache)
    cache = TeacherCache(directory)
    cache.verify_all()
    metadata = cache.index.get("metadata", {})
    if config.student:
        student = load_causal_lm(config.student, what="--student")
        tokenizer = _tokenizer_for(config.student, "--student", student)
    elif metadata.get("default_teacher"):
        tokenizer = ByteTokenizer()
        torch.manual_seed(config.seed)
        student = TinyGPT(GPTConfig(**STUDENT_CONFIG))
    else:
        raise ValueError(f"the teacher cache {config.teacher_cache} was written for the teacher "
                         f"{metadata.get('teacher')!r}: give the student with --student PATH")
    teacher_tokenizer = None
    if config.cross_tokenizer:  # rows in the teacher's tokens: read as text with its tokenizer
        teacher_tokenizer = cross_tokenizer.cache_tokenizer(cache, config.teacher_tokenizer)
    elif cache.tokenizer and cache.tokenizer != tokenizer_fingerprint(None if is_byte_tokenizer(tokenizer) else tokenizer):
        raise ValueError(f"the teacher cache {config.teacher_cache} was written with another tokenizer than the "
                         f"student's: token ids would not mean the same strings (cross-tokenizer distillation is "
                         f"not supported yet)")
    teacher = None
    if config.on_policy_fraction + config.seq_kd_fraction > 0:
        if not config.teacher:
            raise ValueError("on_policy_fraction / seq_kd_fraction score generated continuations with the teacher, "
                             "which a cache does not hold; give --teacher PATH too, or set them to 0")
        teacher = load_causal_lm(config.teacher, what="--teacher").to(config.torch_device()).eval()
    train = cache.examples()
    splits = cache.index.get("splits", {})
    if "eval" not in splits or not splits["eval"]:
        raise ValueError(f"the teacher cache {config.teacher_cache} has no eval split; rebuild it with "
                         f"`divergent cache-teacher` (it caches evaluation rows too)")
    evaluation = TeacherCache(directory, "eval").examples()[: config.max_eval_examples]
    vocab = config.vocab_size
    if vocab is None and _model_vocab(student) != cache.vocab_size and teacher_tokenizer is None:
        vocab = cache.vocab_size
    description = f"cached top-{cache.k} of {metadata.get('teacher')}"
    if teacher_tokenizer is not None:  # the same text in the student's tokens, the cache's rows riding along
        train, evaluation = (cross_tokenizer.student_rows(rows, teacher_tokenizer, tokenizer) for rows in (train, evaluation))
        description += f" (its own tokenizer; {config.cross_tokenizer})"
    console.print(f"teacher cache: {cache.describe()}")
    return _Setup(teacher=teacher, student_init=student, tokenizer=tokenizer, train=train, eval=evaluation,
                  byte_level=is_byte_tokenizer(tokenizer), data_description=str(metadata.get("data", "")),
                  stats=dict(metadata.get("stats", {})), vocab_size=vocab, teacher_description=description,
                  cached_teacher=True, teacher_tokenizer=teacher_tokenizer)


def default_teacher(
    train: list[dict], settings: LMDataSettings, *, console: Console, device: torch.device | str = "cpu",
) -> tuple[torch.nn.Module, Path]:
    """The default byte-level GPT teacher: loaded from the cache directory, or trained and cached.

    The cache key is a hash of the recipe (architecture, steps, batch, learning rate,
    example length, training bytes, seed). Training checkpoints under the cache directory,
    so an interrupted teacher training continues where it stopped.
    """
    from divergent.models.gpt import GPTConfig, TinyGPT
    from divergent.models.hf import save_pretrained
    from divergent.train.lm import ExampleSource, LMDistillConfig, LMTrainer

    steps, seed = settings.teacher_steps, settings.seed
    recipe = dict(version=_TEACHER_RECIPE_VERSION, model=TEACHER_CONFIG, steps=steps, batch_size=16, lr=3e-3,
                  length=settings.length(), train_bytes=settings.max_train_bytes, examples=len(train), seed=seed)
    key = _hash(recipe)
    folder = report.cache_dir() / f"lm-teacher-{key}"
    if (folder / "model.safetensors").is_file():
        console.print(f"teacher: loaded from cache {folder}")
        return TinyGPT.from_pretrained(folder), folder
    console.print(f"teacher: training {TEACHER_CONFIG} for {steps} steps (cached afterwards in {folder})")
    torch.manual_seed(seed)
    teacher = TinyGPT(GPTConfig(**TEACHER_CONFIG))
    config = LMDistillConfig(steps=steps, batch_size=16, lr=3e-3, hard_weight=1.0, soft_weight=0.0,
                             seed=seed + 1000, log_every=max(1, steps // 20))
    trainer = LMTrainer(teacher, None, ExampleSource(train, seed=seed + 1000), config, device=device)
    work = report.cache_dir() / f".lm-teacher-{key}-checkpoints"
    with report.progress(console=console, transient=True) as bar:
        task = bar.add_task("training the default teacher", total=steps)
        drive(trainer, checkpointer=Checkpointer(work, keep=1), checkpoint_every=50, resume=True,
              on_step=lambda record: bar.update(task, completed=record["step"]))
    save_pretrained(teacher, folder)
    write_json(recipe, folder / "recipe.json")
    shutil.rmtree(work, ignore_errors=True)
    return teacher.eval(), folder


# ----------------------------------------------------------------------------- one row


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-")


def _config_hash(config: DistillLMConfig) -> str:
    settings = {k: v for k, v in config_to_dict(config).items() if k not in ("output_dir", "num_threads", "device")}
    return _hash(settings)


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train_row(config: DistillLMConfig, setup: _Setup, name: str, divergence: str | None, run_dir: Path,
               device: torch.device, console: Console, bar) -> dict[str, Any]:
    from divergent.data.lm_data import is_byte_tokenizer
    from divergent.models.hf import save_pretrained
    from divergent.train.lm import ExampleSource, LMTrainer, evaluate_lm

    folder = run_dir / "runs" / _slug(name)
    done = folder / "result.json"
    if done.is_file():
        saved = read_json(done, "per-run result file")
        if saved.get("config_hash") != _config_hash(config):
            raise ValueError(f"{done} was written by a run with other settings than {run_dir / 'config.yaml'}; "
                             f"start a new run instead of resuming this one")
        console.print(f"{name}: already finished (from {done})")
        return saved
    student = copy.deepcopy(setup.student_init)
    if config.student_quant:
        from divergent.models.fake_quant import quant_bits, quantize_linears

        quantize_linears(student, quant_bits(config.student_quant))
    pad = _pad_id(setup.tokenizer)
    tokenizer = None if is_byte_tokenizer(setup.tokenizer) else setup.tokenizer
    teacher = setup.teacher if divergence is not None else None
    # (KL to a teacher with another vocabulary is undefined: the cross-tokenizer rows report the loss alone)
    eval_teacher = setup.teacher if not (setup.cached_teacher or setup.teacher_tokenizer) else None

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return evaluate_lm(model, setup.eval, teacher=eval_teacher, batch_size=config.eval_batch_size,
                           device=device, pad_token_id=pad, vocab_size=setup.vocab_size, byte_level=setup.byte_level)

    common = dict(device=device, evaluate=evaluate, pad_token_id=pad, eos_token_id=getattr(setup.tokenizer, "eos_token_id", None))
    if setup.domains is not None:
        from divergent.experiments.domains import domain_trainer

        trainer = domain_trainer(setup.domains, student, teacher, config.trainer_config(divergence, setup.vocab_size),
                                 eval_batch_size=config.eval_batch_size, **common)
    else:
        trainer = LMTrainer(student, teacher, ExampleSource(setup.train, seed=config.seed, pad_token_id=pad),
                            config.trainer_config(divergence, setup.vocab_size), **common)
    if setup.teacher_tokenizer is not None and divergence is not None:
        trainer.objective = cross_tokenizer.objective(config, setup.tokenizer, setup.teacher_tokenizer)
    model_dir = folder / "model"

    def export(step: int, path: Path) -> None:
        state = trainer.exported_state
        if config.student_quant:  # the weights it computes with, not the latent full-precision ones
            from divergent.models.fake_quant import quantized_state

            state = quantized_state(trainer.student, state)
        save_pretrained(trainer.student, model_dir, tokenizer=tokenizer, state_dict=state)

    checkpointer = Checkpointer(folder / "checkpoints", keep=config.keep_checkpoints, on_save=export)
    shown = divergence or "-"
    if divergence and config.cross_tokenizer:  # ULD replaces the divergence; GOLD uses it on the shared entries
        shown = "uld" if config.cross_tokenizer == "uld" else f"gold ({divergence} on shared entries)"
    row: dict[str, Any] = {"model": "distilled" if divergence else name, "divergence": shown,
                           "label": name, "config_hash": _config_hash(config)}
    task = bar.add_task(name, total=config.steps)
    try:
        drive(trainer, checkpointer=checkpointer, checkpoint_every=config.checkpoint_every, resume=True,
              on_step=lambda record: bar.update(task, completed=record["step"]))
    except NonFiniteLossError as exc:
        console.print(f"[red]{name}: {exc}[/red]")
        row.update(status="failed", error=str(exc), history=trainer.history)
        write_json(row, done)
        return row
    finally:
        bar.remove_task(task)
    result = trainer.result()
    final = {k.removeprefix("eval_"): v for k, v in result.history[-1].items() if k.startswith("eval_")}
    row.update(status="finished", **final, tokens_per_s=result.tokens_per_second, peak_mb=result.peak_memory_mb,
               train_s=result.train_seconds, tokens=result.tokens_seen, steps=result.steps_done,
               params=_parameters(student), model_dir=str(model_dir), history=result.history)
    if setup.domains is not None:
        from divergent.experiments.domains import domain_row

        row["domains"] = domain_row(trainer, setup.domains)
    write_json(row, done)
    # The finished student is in model_dir and its numbers in result.json; the optimiser states go.
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return row


def _teacher_row(setup: _Setup, config: DistillLMConfig, device: torch.device) -> dict[str, Any]:
    from divergent.train.lm import evaluate_lm

    row: dict[str, Any] = {"model": "teacher", "divergence": "-", "status": "finished"}
    if setup.teacher_tokenizer is not None:
        return row  # its loss is in its own tokens: not comparable with the students'
    if setup.teacher is not None and not setup.cached_teacher:
        metrics = evaluate_lm(setup.teacher, setup.eval, batch_size=config.eval_batch_size, device=device,
                              pad_token_id=_pad_id(setup.tokenizer), vocab_size=setup.vocab_size,
                              byte_level=setup.byte_level)
        row.update(metrics, kl_teacher=0.0, top1_agreement=1.0, params=_parameters(setup.teacher))
    else:
        counted = sum(1 for e in setup.eval for label in e["labels"][1:] if label != -100)
        nll = -sum(float(lp) for e in setup.eval for lp, label in zip(e["teacher_next_logprob"][:-1].tolist(),
                                                                       e["labels"][1:]) if label != -100)
        loss = nll / max(counted, 1)
        row.update(loss=loss, perplexity=math.exp(min(loss, 700.0)), kl_teacher=0.0, top1_agreement=1.0)
        if setup.byte_level:
            row["bits_per_byte"] = loss / math.log(2)
    return row


# ----------------------------------------------------------------------------- report


def _plot(rows: list[dict[str, Any]], teacher: dict[str, Any], path: Path, title: str) -> Path:
    """Evaluation curves of comparable quantities only, one panel each (never a shared 'training loss' axis)."""
    from divergent.experiments.plots import plot_panels

    panels = [("eval_loss", "evaluation cross-entropy (nats/token)"),
              ("eval_kl_teacher", "KL(teacher ‖ student) (nats/token)"),
              ("eval_top1_agreement", "top-1 agreement with the teacher")]
    series = {row.get("label", row["model"]): {key: [(h["step"], h[key]) for h in row.get("history", []) if key in h]
                                               for key, _ in panels} for row in rows}
    references = {"eval_loss": ("teacher", teacher["loss"])} if teacher.get("loss") is not None else None
    plot_panels(series, panels, path, xlabel="training step", references=references, title=title)
    return path


def _columns(byte_level: bool) -> list[str]:
    columns = ["model", "divergence", "eval_loss", "perplexity"]
    if byte_level:
        columns.append("bits_per_byte")
    return columns + ["kl_teacher", "top1_agreement", "tokens_per_s", "peak_mb", "train_s", "params"]


def _table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for row in rows:
        entry = {k: v for k, v in row.items() if k not in ("history", "config_hash", "domains")}
        entry["eval_loss"] = row.get("loss")
        if row.get("status") == "failed":
            entry["eval_loss"] = "failed"
        for key, digits in (("tokens_per_s", 0), ("peak_mb", 1), ("train_s", 1)):
            if isinstance(entry.get(key), float):
                entry[key] = round(entry[key], digits)
        table.append(entry)
    return table


_SHORT = {"eval_loss": "eval loss", "perplexity": "ppl", "bits_per_byte": "bits/byte", "kl_teacher": "KL(t||s)",
          "top1_agreement": "top-1 agree", "tokens_per_s": "tok/s", "peak_mb": "peak MB", "train_s": "train s"}


def _display(table: list[dict[str, Any]], columns: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The table with short column names for the terminal."""
    columns = [c for c in columns if c not in ("train_s", "params")]  # in results.csv; the terminal is narrow
    rows = [{_SHORT.get(c, c): (int(r[c]) if c == "tokens_per_s" and isinstance(r.get(c), float) else r.get(c))
             for c in columns} for r in table]
    return rows, [_SHORT.get(c, c) for c in columns]


def _write_report(run_dir: Path, config: DistillLMConfig, setup: _Setup, table: list[dict], columns: list[str],
                  command: str, seconds: float, device: torch.device, extra: str = "") -> None:
    stats = ""
    for split, values in setup.stats.items():
        stats += (f"- {split}: {values.get('rows')} rows ({values.get('format')}) → {values.get('used')} examples; "
                  f"**{values.get('truncated')} truncated** to {config.length()} tokens, "
                  f"**{values.get('skipped_nothing_to_learn')} skipped** with nothing to learn; "
                  f"{values.get('counted_tokens')} counted tokens\n")
    kl_note = ("KL and top-1 agreement are computed against the cached top-k teacher (top-k buckets plus the tail: "
               "a lower bound of the full KL)." if setup.cached_teacher else
               "KL(teacher ‖ student) is the mean per counted token at T = 1 over the full vocabulary.")
    if config.cross_tokenizer:
        kl_note = ("The teacher has another tokenizer: KL and top-1 agreement are not defined across two "
                   "vocabularies, and its own loss is per teacher token, so those cells are empty; compare the "
                   f"students' eval_loss (in the student's tokens). The {config.cross_tokenizer} row's objective is "
                   f"in docs/llm.md (Another tokenizer).")
    text = f"""# divergent distill-lm

Teacher: {setup.teacher_description}. Student: {config.student or 'default byte-level GPT ' + str(STUDENT_CONFIG)}.
Data: {setup.data_description}.
{config.steps} steps per student, batch {config.batch_size} × {config.grad_accum} accumulation, on {device}.

{report.markdown_table(table, columns)}

eval_loss: mean cross-entropy on the evaluation examples (nats per counted token); perplexity = exp(eval_loss){'; bits_per_byte = eval_loss / ln 2 (the tokens are bytes)' if setup.byte_level else ''}.
{kl_note} tokens_per_s: counted training tokens per second of training (evaluation excluded);
peak_mb: peak resident memory of the process during that student's run (CPU; it includes the teacher
and the data) or peak allocated memory (CUDA). Each student is in `runs/<row>/model` (the row's label: scratch, the divergence or the cross-tokenizer mode)
(save_pretrained{', with the tokenizer' if not setup.byte_level else ''}).

## Data

{stats or '- the embedded corpus: fixed windows, nothing truncated or skipped' + chr(10)}
## Curves

![curves](curves.png)

Only comparable quantities share a panel: cross-entropy on the data, KL to the teacher and
top-1 agreement, each on its own axis. (The training objective of each row is a different
divergence, so it is in results.json, not on a shared axis.)
{extra}
## Reproduce

```
{command}
```

Total wall time {seconds:.0f} s.
"""
    (run_dir / "report.md").write_text(text)


# ----------------------------------------------------------------------------- the command


def _check_run_data(config: DistillLMConfig, setup: _Setup, run_dir: Path) -> None:
    """Record the data and settings a run folder starts with; a resume with other ones is refused."""
    fingerprint = {"config_hash": _config_hash(config), "train": _hash([e["input_ids"] for e in setup.train]),
                   "eval": _hash([e["input_ids"] for e in setup.eval])}
    data_file = run_dir / "data.json"
    if data_file.is_file():
        saved = read_json(data_file, "run data fingerprint")
        if saved != fingerprint:
            raise ValueError(f"the data or settings differ from those {run_dir} was started with ({data_file}); "
                             f"start a new run instead of resuming this one")
    else:
        write_json(fingerprint, data_file)


class DistillInterrupted(RunInterrupted):
    """Ctrl-C during distill-lm; finished rows and the current row's checkpoint are saved."""

    def __init__(self, run_dir: Path, step: int, checkpoint: Path | None) -> None:
        super().__init__(step, checkpoint, f"interrupted after step {step} (saved {checkpoint}); resume with: "
                                           f"divergent distill-lm --resume {run_dir}")
        self.run_dir = run_dir


def run_distill_lm(config: DistillLMConfig, *, run_dir: str | Path | None = None, console: Console | None = None,
                   command: str | None = None) -> dict[str, Any]:
    """Run (or, when ``run_dir`` holds a partial run, resume) ``distill-lm``; returns the results dict."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "distill-lm runs in one process (each rank would repeat the whole comparison); under torchrun/"
            "accelerate launch use divergent.hf.DistillationTrainer or divergent.train.lm.LMTrainer (docs/llm.md)"
        )
    console = console or report.output_console()
    previous = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        with report.run_folder(config.output_dir, "distill-lm", resume=run_dir) as folder:
            if config.seeds:  # every row on every seed, compared (experiments/lm_compare.py)
                from divergent.experiments.lm_compare import run_lm_comparison

                return run_lm_comparison(config, folder, console, command)
            return _run(config, folder, console, command)
    finally:
        torch.set_num_threads(previous)


def _run(config: DistillLMConfig, folder: report.RunFolder, console: Console, command: str | None) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir = folder.path
    device = config.torch_device()
    save_config(config, run_dir / "config.yaml")
    command = command or f"divergent distill-lm --config {shlex.quote(str(run_dir / 'config.yaml'))}"
    setup = _setup(config, console, device, run_dir)
    console.print(f"run folder: {run_dir}")
    console.print(f"data: {setup.data_description}")
    _check_run_data(config, setup, run_dir)
    folder.started()

    teacher_row = _teacher_row(setup, config, device)
    names = ([(SCRATCH, None)] if config.include_scratch else []) + [(d, d) for d in config.divergences]
    if config.cross_tokenizer:
        names = names[:-1] + [(config.cross_tokenizer, config.divergences[0])]
    rows: list[dict[str, Any]] = []
    with report.progress(console=console) as bar:
        overall = bar.add_task("students", total=len(names))
        for name, divergence in names:
            try:
                rows.append(_train_row(config, setup, name, divergence, run_dir, device, console, bar))
            except RunInterrupted as exc:
                raise DistillInterrupted(run_dir, exc.step, exc.checkpoint) from None
            bar.advance(overall)

    all_rows = [teacher_row] + rows
    table = _table(all_rows)
    columns = _columns(setup.byte_level)
    source = Path(config.data).name if config.data else \
        f"teacher cache {Path(config.teacher_cache).name}" if config.teacher_cache else "stdlib source"
    title = f"LM distillation: {source} ({config.steps} steps, {device})"
    report.print_table(*_display(table, columns), title=title, console=console)
    report.write_csv([{c: r.get(c) for c in columns} for r in table], run_dir / "results.csv")
    _plot(rows, teacher_row, run_dir / "curves.png", title)
    domain_section = ""
    if setup.domains is not None:
        from divergent.experiments.domains import report_domains

        domain_section = report_domains(rows, setup.domains, run_dir, console)
    seconds = time.perf_counter() - started
    results = {"command": command, "config": config_to_dict(config), "data": setup.data_description,
               "data_stats": setup.stats, "teacher": teacher_row, "rows": rows, "run_dir": str(run_dir),
               "total_seconds": seconds}
    write_json(results, run_dir / "results.json")
    _write_report(run_dir, config, setup, table, columns, command, seconds, device, domain_section)
    for split, values in setup.stats.items():
        if values.get("truncated") or values.get("skipped_nothing_to_learn"):
            console.print(f"{split} data: {values['truncated']} rows truncated to {config.length()} tokens, "
                          f"{values['skipped_nothing_to_learn']} skipped with nothing to learn")
    console.print(f"done in {seconds:.0f} s; results in {run_dir} (students in {run_dir / 'runs'}/*/model)")
    return results


def resume_distill_lm(run_dir: str | Path, *, console: Console | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` with its saved ``config.yaml``: finished students are not retrained."""
    run_dir = Path(run_dir)
    config = load_run_config(DistillLMConfig, run_dir)
    return run_distill_lm(config, run_dir=run_dir, console=console,
                          command=f"divergent distill-lm --resume {shlex.quote(str(run_dir))}")


# ----------------------------------------------------------------------------- cache-teacher


@dataclass
class CacheTeacherConfig(LMDataSettings):
    """Settings of ``divergent cache-teacher`` (every key can be set in YAML or with ``--set``):
    the models and data of :class:`LMDataSettings`, and

    max_sequences: cap on the training examples cached (0 = all).
    k: log-probs kept per token (the teacher's most likely tokens; the rest is one tail bucket).
    logprob_dtype: float16, bfloat16 or float32.
    logprob_bits: 0 = store logprob_dtype values; 2..16 = a compressed cache: ids bit-packed at
        ceil(log2 V) bits, log-probs quantised to this many bits with the KL bound recorded
        (divergent.data.cache_codec; 8 keeps KL(p ‖ p̂) below about 1e-4 nats/token).
    batch_size: examples per teacher forward pass.
    sequences_per_shard: examples per shard file.
    output_dir: the cache folder written (index.json, shards, config.yaml).
    """

    max_sequences: int = 0
    k: int = 32
    logprob_dtype: str = "float16"
    logprob_bits: int = 0
    batch_size: int = 8
    sequences_per_shard: int = 256
    output_dir: str = "teacher-cache"

    def __post_init__(self) -> None:
        self._check_data_settings()
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.logprob_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"logprob_dtype must be float16, bfloat16 or float32, got {self.logprob_dtype!r}")
        if not (self.logprob_bits == 0 or 2 <= self.logprob_bits <= 16):
            raise ValueError(f"logprob_bits must be 0 (no compression) or in [2, 16], got {self.logprob_bits}")
        for name in ("batch_size", "sequences_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_sequences < 0:
            raise ValueError(f"max_sequences must be >= 0 (0 = all), got {self.max_sequences}")


def run_cache_teacher(config: CacheTeacherConfig, *, resume: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Run the teacher over the data once and write its top-k cache to ``config.output_dir``.

    ``resume=True`` continues an interrupted cache in that folder (the shards already
    written are kept); the folder's ``config.yaml`` holds the settings.
    """
    from divergent.data.lm_data import ByteTokenizer, is_byte_tokenizer
    from divergent.data.teacher_cache import write_teacher_cache
    from divergent.models.hf import load_causal_lm, tokenizer_fingerprint
    from divergent.models.served import is_served

    console = console or report.output_console()
    previous = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        device = config.torch_device()
        out = Path(config.output_dir)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"output folder {out} is a file; expected a folder (-o/--out-dir)")
        if not resume and out.is_dir() and any(out.iterdir()):
            if not (out / "index.json").is_file():
                raise ValueError(f"{out} is not empty and holds no finished cache; continue an interrupted cache "
                                 f"with --resume {out}, or choose an empty folder")
        if is_served(config.teacher):
            from divergent.experiments.served_teacher import open_served_teacher

            teacher = open_served_teacher(config, console=console)
            tokenizer = teacher.tokenizer
        elif config.teacher:
            teacher = load_causal_lm(config.teacher, what="--teacher")
            tokenizer = _tokenizer_for(config.teacher, "--teacher", teacher)
        else:
            tokenizer = ByteTokenizer()
            teacher = None
        train, evaluation, description, stats = _load_examples(config, tokenizer)
        if teacher is None:
            teacher, _ = default_teacher(train, config, console=console, device=device)
        if config.max_sequences:
            train = train[: config.max_sequences]
        teacher = teacher if is_served(config.teacher) else teacher.to(device).eval()
        vocab = len(tokenizer) if is_served(config.teacher) else _model_vocab(teacher)
        if not is_byte_tokenizer(tokenizer) and len(tokenizer) < vocab:
            vocab = len(tokenizer)  # padding rows beyond the tokenizer are never a token
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            save_config(config, out / "config.yaml")
            if not is_byte_tokenizer(tokenizer):  # to read the rows as text (cross-tokenizer distillation)
                tokenizer.save_pretrained(str(out / cross_tokenizer.TOKENIZER_DIR))
        total = len(train) + len(evaluation)
        started = time.perf_counter()
        done = [0]
        try:
            with report.progress(console=console, transient=True) as bar:
                task = bar.add_task("caching the teacher", total=total)

                def advance(count: int) -> None:
                    done[0] = count
                    bar.update(task, completed=count)

                index = write_teacher_cache(
                    teacher, {"train": train, "eval": evaluation}, out, k=min(config.k, vocab), vocab_size=vocab,
                    tokenizer_fingerprint=tokenizer_fingerprint(None if is_byte_tokenizer(tokenizer) else tokenizer),
                    batch_size=config.batch_size, pad_token_id=_pad_id(tokenizer), logprob_dtype=config.logprob_dtype,
                    sequences_per_shard=config.sequences_per_shard, device=device, resume=resume,
                    logprob_bits=config.logprob_bits,
                    metadata={"teacher": config.teacher or "default", "default_teacher": not config.teacher,
                              "data": description, "stats": stats, "max_length": config.length()},
                    progress_callback=advance,
                )
        except KeyboardInterrupt:
            # Shards are written atomically and listed in progress.json as they finish.
            raise RunInterrupted(done[0], None, f"interrupted after {done[0]} of {total} examples; the finished shards "
                                               f"are kept: resume with: divergent cache-teacher --resume {out}") from None
        row = {"train_sequences": index["total_sequences"]["train"], "eval_sequences": index["total_sequences"]["eval"],
               "tokens": index["total_tokens"], "k": index["k"], "megabytes": round(index["total_bytes"] / 1e6, 3),
               "bytes_per_token": round(index["bytes_per_token"], 1), "seconds": round(time.perf_counter() - started, 1)}
        report.print_table([row], list(row), title=f"teacher cache written to {out}", console=console)
        console.print(f"data: {description}")
        console.print(f"train with it: divergent distill-lm --teacher-cache {out}"
                      + ("" if not config.teacher else " --student PATH"))
        return index
    finally:
        torch.set_num_threads(previous)


def resume_cache_teacher(cache_dir: str | Path, *, console: Console | None = None) -> dict[str, Any]:
    """Continue an interrupted ``cache-teacher`` in ``cache_dir`` with its own ``config.yaml``."""
    cache_dir = Path(cache_dir)
    config = load_run_config(CacheTeacherConfig, cache_dir)
    config.output_dir = str(cache_dir)
    return run_cache_teacher(config, resume=True, console=console)

