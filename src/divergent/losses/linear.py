"""``LinearDistillationLoss``: the distillation loss fused with the output layer.

The module only stores hyperparameters; the chunked computation is
:func:`divergent.functional.fused_linear.fused_linear_distillation`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from divergent.functional.fused_linear import check_options, fused_linear_distillation

__all__ = ["LinearDistillationLoss"]


class LinearDistillationLoss(nn.Module):
    """Hard-label CE plus a divergence, computed from hidden states and output-layer weights.

    ``forward(student_input, student_weight, teacher_input, teacher_weight,
    labels=None, normalizer=None)`` returns

        (1 / n) * sum_{i counted} [ hard_weight * CE(s_i, y_i)
                                    + soft_weight * T^2 * D(p_i^T || q_i^T) ]

    with student logits ``s_i = student_input[i] @ student_weight.T``, teacher
    logits ``t_i = teacher_input[i] @ teacher_weight.T``, ``p^T``/``q^T`` the
    teacher/student softmax at temperature ``T``, token ``i`` counted when
    ``labels[i] != ignore_index`` (all tokens when ``labels`` is None, in which
    case there is no CE term) and ``n`` the number of counted tokens or
    ``normalizer`` (the global count across gradient-accumulation steps or
    data-parallel ranks). ``T^2`` is applied only when ``t2_scale`` (Hinton's
    convention, keeps gradient scale independent of T). The CE term uses the
    untempered logits.

    Same value and gradients as ``dv.DistillationLoss`` on the full logits,
    but tokens are processed ``chunk_size`` at a time so the ``[N, V]`` logits
    are never held in memory. The teacher may be a ``dv.TopK`` or dense logits
    ``[..., V]`` (pass it as ``teacher_weight`` with ``teacher_input=None``). Divergences that couple the
    rows of a batch (``sinkhorn``) cannot be chunked and raise. ``chunk_size=None``
    picks as many tokens as fit 2^27 logits per chunk (1024 at V = 128256, 4096 at
    V = 32000; on the CPU 2^23: 256 at V = 32000); ``accumulation_dtype`` sets the dtype of the weight-gradient
    accumulators (None: float32 on CPU, the weight's dtype on GPUs; see
    :func:`divergent.functional.fused_linear.fused_linear_distillation`).

    Every argument is checked when the module is made (divergence name and parameters,
    weights, temperature, ``t2_scale``, ``ignore_index``) and again, with the tensors, on
    each call. A trainable dense teacher (``teacher_input`` or ``teacher_weight`` requiring
    grad) receives its gradient; a ``dv.TopK`` teacher is data and may not require grad.

    Vocabulary: student and teacher output layers must have the same number of
    rows, or pass ``vocab_size=`` when the difference is only padding rows (both
    layers are then cut to the first ``vocab_size`` rows; the padding rows get
    zero gradient). Models with different tokenizers are not supported.

    >>> import torch
    >>> loss_fn = LinearDistillationLoss("forward_kl", chunk_size=4)
    >>> x_s, w_s = torch.randn(10, 8, requires_grad=True), torch.randn(32, 8, requires_grad=True)
    >>> x_t, w_t = torch.randn(10, 16), torch.randn(32, 16)
    >>> labels = torch.randint(0, 32, (10,))
    >>> loss = loss_fn(x_s, w_s, x_t, w_t, labels)
    >>> loss.backward(); tuple(w_s.grad.shape)
    (32, 8)
    """

    def __init__(
        self,
        name: str,
        chunk_size: int | None = None,
        hard_weight: float = 0.5,
        soft_weight: float = 0.5,
        temperature: float = 1.0,
        t2_scale: bool = True,
        ignore_index: int = -100,
        vocab_size: int | None = None,
        accumulation_dtype: torch.dtype | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        # The same checks as every call of fused_linear_distillation, made once here so that a
        # wrong setting fails when the loss is made, not at the first batch.
        _, options = check_options(
            name, temperature=temperature, hard_weight=hard_weight, soft_weight=soft_weight, t2_scale=t2_scale,
            ignore_index=ignore_index, chunk_size=chunk_size, accumulation_dtype=accumulation_dtype, params=params,
        )
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
        self.name = name
        self.chunk_size = chunk_size
        self.hard_weight = options["hard_weight"]
        self.soft_weight = options["soft_weight"]
        self.temperature = options["temperature"]
        self.t2_scale = t2_scale
        self.ignore_index = ignore_index
        self.vocab_size = vocab_size
        self.accumulation_dtype = accumulation_dtype
        self.params = options["params"]

    def forward(
        self,
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_input: torch.Tensor | None,
        teacher_weight: Any,
        labels: torch.Tensor | None = None,
        normalizer: float | None = None,
    ) -> torch.Tensor:
        return fused_linear_distillation(
            self.name,
            student_input,
            student_weight,
            teacher_input,
            teacher_weight,
            labels,
            temperature=self.temperature,
            hard_weight=self.hard_weight,
            soft_weight=self.soft_weight,
            t2_scale=self.t2_scale,
            ignore_index=self.ignore_index,
            normalizer=normalizer,
            chunk_size=self.chunk_size,
            vocab_size=self.vocab_size,
            accumulation_dtype=self.accumulation_dtype,
            **self.params,
        )

    def extra_repr(self) -> str:
        params = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return (
            f"{self.name!r}, chunk_size={self.chunk_size}, hard_weight={self.hard_weight}, "
            f"soft_weight={self.soft_weight}, temperature={self.temperature}, "
            f"t2_scale={self.t2_scale}{params}"
        )
