"""Several teachers as one: the weighted mixture of their tempered distributions.

``TeacherMixture(teachers, weights, temperature=T)`` runs every teacher and returns, as its
logits, ``T * log p_mix`` with

    p_mix = sum_i w_i softmax(z_i / T)      (weights normalised to sum to 1)

computed in log space, ``log p_mix = logsumexp_i(log w_i + log_softmax(z_i / T))``. The
distillation losses temper the teacher's logits (``softmax(logits / T)``), so they see
``softmax(log p_mix) = p_mix``: the student matches the mixture of the *tempered* teachers.

It has no output layer: it *gives its logits* (``teacher_logits(input_ids, attention_mask)``,
recognised by :func:`divergent.models.hf.gives_logits`), which the fused and unfused losses,
evaluation, the teacher cache and the per-domain teacher measure take in place of a
teacher's output-layer input and weight. Nothing of size ``V^2`` exists, so any vocabulary
size works; the one ``[B, T, V]`` tensor is the mixture's logits themselves.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from divergent.functional._validation import check_temperature
from divergent.models.hf import hidden_and_logits, output_layer

__all__ = ["TeacherMixture", "mixture_weights"]


def mixture_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """One positive weight per teacher, normalised to sum to 1 (None: equal weights)."""
    if weights is None or len(weights) == 0:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"teacher_weights: {len(weights)} weights given for {count} teachers; give one per teacher")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(f"teacher_weights must be positive and finite, got {bad[0]!r} in {weights}")
    total = sum(weights)
    return [w / total for w in weights]


class TeacherMixture(nn.Module):
    """Several causal LMs sharing a vocabulary, seen as one teacher (see the module docstring)."""

    def __init__(self, teachers: Sequence[nn.Module], weights: Sequence[float] | None = None, *,
                 temperature: float = 1.0) -> None:
        super().__init__()
        if len(teachers) < 2:
            raise ValueError(f"TeacherMixture needs at least two teachers, got {len(teachers)}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        vocabs = [int(output_layer(t).weight.shape[0]) for t in teachers]
        if len(set(vocabs)) != 1:
            raise ValueError(f"the teachers' output layers have different vocabularies {vocabs}; "
                             f"several teachers must share the student's tokenizer and vocabulary")
        self.vocab_size = vocabs[0]
        self.teachers = nn.ModuleList(teachers)
        self.weights = mixture_weights(weights, len(teachers))
        self.temperature = float(temperature)

    tempers = True  # its distribution depends on the temperature (models.hf.teacher_side passes one)

    def log_mixture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    temperature: float | None = None) -> torch.Tensor:
        """``log p_mix`` ``[B, T, V]`` (float32; float64 for float64 teachers) of the tempered teachers, without grad.

        ``temperature``: the teachers' temperature (default: the mixture's own).

        Summed one teacher at a time (``log(a + b) = logaddexp``), in place where the tensor is
        this method's own: at most three ``[B, T, V]`` tensors live at once (the sum, a
        teacher's logits, its log-probabilities), whatever the number of teachers.
        """
        temperature = self.temperature if temperature is None else check_temperature(temperature)
        total = None
        for teacher, log_weight in zip(self.teachers, [math.log(w) for w in self.weights]):
            with torch.no_grad():  # a teacher: no gradient (and the in-place steps below rely on it)
                _, logits = hidden_and_logits(teacher, input_ids, attention_mask)  # a new tensor: hidden @ weight.T
            logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
            term = torch.log_softmax(logits.div_(temperature), dim=-1).add_(log_weight)
            del logits
            total = term if total is None else torch.logaddexp(total, term, out=total)
            del term
        return total

    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       temperature: float | None = None) -> torch.Tensor:
        """Logits ``T * log p_mix`` ``[B, T, V]``: ``softmax(logits / T) = p_mix``.

        ``temperature``: T (default: the mixture's own); evaluation asks at 1.0, where the
        logits are ``log sum_i w_i softmax(z_i)``, the mixture of the teachers themselves.
        """
        temperature = self.temperature if temperature is None else check_temperature(temperature)
        return self.log_mixture(input_ids, attention_mask, temperature=temperature).mul_(temperature)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The same as :meth:`teacher_logits`."""
        return self.teacher_logits(input_ids, attention_mask)


def check_teacher_settings(config) -> None:
    """Check ``teachers``/``teacher_weights`` of a distill-lm config (several local teachers, mixed)."""
    from divergent.models.served import is_served

    teachers, weights = list(config.teachers), list(config.teacher_weights)
    if weights and not teachers:
        raise ValueError("teacher_weights is given with one teacher: give several (--teacher A --teacher B)")
    if len(teachers) < 2:
        raise ValueError(f"teachers: give at least two (got {teachers}); one teacher is --teacher PATH")
    served = [t for t in teachers if is_served(t)]
    if served:
        raise ValueError(f"several teachers must be local Hugging Face folders; the served teacher {served[0]} "
                         f"cannot be mixed (give local folders, or distil from the one served teacher)")
    if config.teacher and config.teacher != teachers[0]:
        raise ValueError(f"teacher {config.teacher!r} and teachers {teachers}: give the teachers in teachers only")
    for name, value in (("teacher_cache", config.teacher_cache), ("cross_tokenizer", config.cross_tokenizer),
                        ("seq_kd_fraction", config.seq_kd_fraction)):
        if value:
            raise ValueError(f"several teachers cannot be combined with {name}={value!r} yet (the mixture shares the "
                             f"student's tokenizer and does not generate)")
    mixture_weights(weights, len(teachers))
    config.teacher = teachers[0]  # "a teacher is given" for the checks that follow


def load_teachers(teachers: Sequence, weights: Sequence[float] | None, *, temperature: float,
                  tokenizer=None, what: str = "teacher_model") -> TeacherMixture:
    """A :class:`TeacherMixture` of local folders or modules; each folder's tokenizer must be ``tokenizer``."""
    from divergent.models.hf import check_same_tokenizer, load_causal_lm, load_tokenizer
    from divergent.models.served import is_served

    served = [t for t in teachers if is_served(t)]
    if served:
        raise ValueError(f"{what}: several teachers must be local folders or models; the served teacher "
                         f"{served[0]} cannot be mixed")
    weights = mixture_weights(weights, len(teachers))  # checked before any model is loaded
    models = []
    for teacher in teachers:
        if isinstance(teacher, nn.Module):
            models.append(teacher)
            continue
        models.append(load_causal_lm(teacher, what=what))
        if tokenizer is not None:
            check_same_tokenizer(tokenizer, load_tokenizer(teacher, what))
    return TeacherMixture(models, weights, temperature=temperature)
