"""One teacher per domain: each row of the data is distilled from its own domain's teacher.

With a domain column (``--domain-column COL``, ``DistillationConfig(domain_column=...)``) the
teachers are given by domain: ``--teacher code=PATH_A --teacher prose=PATH_B`` on the command
line, ``teacher_model={"code": a, "prose": b}`` in :class:`divergent.hf.DistillationTrainer`.
Every domain of the data needs a teacher, and every teacher a domain of the data.

:class:`DomainTeachers` holds them in the order of the data's domains (``DomainData.names``);
each example of domain-grouped data carries that order's index as ``domain_index``
(:func:`divergent.data.domains.tokenize_domains`), which the trainer's batches carry as
``Batch.domains``. The loss (:class:`divergent.train.lm.LMObjective`) runs each domain's
teacher on that domain's rows of the batch and sums the per-row losses over all rows, divided
by the step's one count of counted tokens: the loss of the batch is the loss every row would
have against its own teacher. Evaluation and DDK's per-domain teacher perplexity read each
row's logits from its domain's teacher (:meth:`DomainTeachers.teacher_logits`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from divergent.models.hf import output_vocab, teacher_side

__all__ = ["DomainTeachers", "is_domain_teacher", "parse_domain_teachers", "check_domain_teacher_settings",
           "describe_domain_teachers"]

SEPARATOR = "="


def is_domain_teacher(spec: Any) -> bool:
    """Whether a ``--teacher`` value is ``DOMAIN=PATH`` (a domain name: no ``/``, no ``:``, not empty;
    an existing file or folder of that very name is a path)."""
    if not isinstance(spec, str) or SEPARATOR not in spec or Path(spec).exists():
        return False
    name, path = spec.split(SEPARATOR, 1)
    return bool(name) and bool(path) and "/" not in name and ":" not in name and "\\" not in name


def parse_domain_teachers(specs: Sequence[str]) -> dict[str, str]:
    """``{domain: path}`` of ``DOMAIN=PATH`` values (one per domain)."""
    bad = [spec for spec in specs if not is_domain_teacher(spec)]
    if bad:
        raise ValueError(f"teachers: {bad[0]!r} is not DOMAIN=PATH; with one teacher per domain give every teacher "
                         f"as --teacher DOMAIN=PATH (got {list(specs)})")
    teachers: dict[str, str] = {}
    for spec in specs:
        name, path = spec.split(SEPARATOR, 1)
        if name in teachers:
            raise ValueError(f"teachers: domain {name!r} is given two teachers ({teachers[name]} and {path}); "
                             f"give one --teacher {name}=PATH")
        teachers[name] = path
    return teachers


def _specs(config: Any) -> list[str]:
    return list(config.teachers) or ([config.teacher] if config.teacher else [])


def check_domain_teacher_settings(config: Any) -> dict[str, str] | None:
    """``{domain: path}`` when a distill-lm config gives its teachers by domain (else None); checks the settings."""
    from divergent.models.served import is_served

    specs = _specs(config)
    if not any(is_domain_teacher(spec) for spec in specs):
        return None
    if not config.domain_column:
        raise ValueError(f"teacher {next(s for s in specs if is_domain_teacher(s))!r} names a domain (DOMAIN=PATH): "
                         f"one teacher per domain needs --domain-column COL (the data's column naming each row's domain)")
    teachers = parse_domain_teachers(specs)
    served = [path for path in teachers.values() if is_served(path)]
    if served:
        raise ValueError(f"one teacher per domain: the teachers must be local folders; the served teacher {served[0]} "
                         f"cannot be one of them")
    for name, value in (("teacher_weights", config.teacher_weights), ("teacher_cache", config.teacher_cache),
                        ("cross_tokenizer", config.cross_tokenizer), ("seq_kd_fraction", config.seq_kd_fraction)):
        if value:
            raise ValueError(f"one teacher per domain cannot be combined with {name}={value!r} (each row has one "
                             f"teacher, in the student's tokenizer, and no teacher generates)")
    config.teachers, config.teacher = specs, specs[0]  # "a teacher is given" for the checks that follow
    return teachers


def describe_domain_teachers(teachers: Mapping[str, Any]) -> str:
    return "one teacher per domain: " + ", ".join(f"{name} = {path}" for name, path in teachers.items())


class DomainTeachers(nn.Module):
    """One causal LM per domain (see the module docstring), in the order of ``names``.

    ``teachers``: ``{domain: model}`` with exactly the domains ``names`` (the data's, in its
    order). The models share one vocabulary. ``teacher_logits(input_ids, attention_mask,
    domains)``: each row's logits from its domain's teacher (``domains`` ``[B]``: the index
    of each row's domain in ``names``).
    """

    takes_domains = True  # models.hf.teacher_side passes each row's domain

    def __init__(self, teachers: Mapping[str, nn.Module], names: Sequence[str]) -> None:
        super().__init__()
        from divergent.config import suggest

        names = list(names)
        unknown = [name for name in teachers if name not in names]
        if unknown:
            raise ValueError(f"teacher for domain {unknown[0]!r}, which the data does not have"
                             f"{suggest(unknown[0], names)}; the data's domains: {', '.join(names)}")
        missing = [name for name in names if name not in teachers]
        if missing:
            raise ValueError(f"no teacher for domain(s) {', '.join(repr(m) for m in missing)}: give one teacher per "
                             f"domain of the data ({', '.join(names)}), e.g. --teacher {missing[0]}=PATH")
        self.names = names
        self.teachers = nn.ModuleList([teachers[name] for name in names])
        vocabs = [output_vocab(t) for t in self.teachers]
        if len(set(vocabs)) != 1:
            raise ValueError(f"the domains' teachers have different vocabularies "
                             f"{dict(zip(names, vocabs))}; they must share the student's tokenizer and vocabulary")
        self.vocab_size = vocabs[0]

    def groups(self, domains: torch.Tensor | None) -> list[tuple[nn.Module, torch.Tensor]]:
        """``(teacher, rows)`` for each domain present in ``domains`` ``[B]`` (rows: indices into the batch)."""
        if domains is None:
            raise ValueError("one teacher per domain needs each row's domain: examples of data grouped by a domain "
                             "column (domain_index), as --domain-column / domain_column gives them")
        domains = domains.reshape(-1)
        present = sorted(set(domains.tolist()))
        if present and not (0 <= present[0] and present[-1] < len(self.names)):
            raise ValueError(f"domain index {present[-1] if present[-1] >= len(self.names) else present[0]} is not one "
                             f"of the {len(self.names)} domains {self.names}")
        return [(self.teachers[d], (domains == d).nonzero().squeeze(1)) for d in present]

    tempers = True  # passes a temperature on to a teacher that takes one (a mixture)

    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       domains: torch.Tensor | None = None, *, temperature: float | None = None) -> torch.Tensor:
        """``[B, T, V]``: row ``b``'s logits from the teacher of domain ``domains[b]`` (at ``temperature``, see
        :func:`divergent.models.hf.teacher_side`)."""
        out = None
        for teacher, rows in self.groups(domains):
            rows = rows.to(input_ids.device)
            hidden, weight = teacher_side(teacher, input_ids[rows],
                                          None if attention_mask is None else attention_mask[rows],
                                          temperature=temperature)
            logits = weight if hidden is None else hidden @ weight.T
            if out is None:
                out = logits.new_empty((input_ids.shape[0], *logits.shape[1:]))
            out[rows] = logits
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                domains: torch.Tensor | None = None) -> torch.Tensor:
        """The same as :meth:`teacher_logits`."""
        return self.teacher_logits(input_ids, attention_mask, domains)
