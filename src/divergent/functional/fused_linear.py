"""Divergence fused with the output layer, chunked over tokens.

For LLM distillation the logits ``x @ W^T`` of a 128k-token vocabulary are the
largest tensors of the step: ``N`` tokens x ``V`` entries, twice (student and
teacher), plus their gradient. This module computes

    loss = sum_i  c_i * [ soft_scale * D(softmax(s_i / T) || softmax(t_i / T))
                          + hard_scale * CE(s_i, y_i) ]

    s_i = x_s[i] @ W_s^T      (student logits of token i)
    t_i = x_t[i] @ W_t^T      (teacher logits of token i)

with ``c_i = 1`` for counted tokens (label != ignore_index) and 0 otherwise,
``soft_scale = soft_weight * (T^2 if t2_scale) / denominator`` and
``hard_scale = hard_weight / denominator``, by walking over the tokens in
chunks of ``chunk_size`` rows. Each chunk's logits and the gradient of the
loss with respect to them live only while the chunk is processed; the
gradients with respect to the inputs and weights are accumulated right away:

    dL/dx_s[chunk] = G @ W_s          dL/dW_s += G^T @ x_s[chunk]

where ``G = dL/ds[chunk]``. The whole computation happens in the forward pass
(the backward hands the stored gradients over, scaled by ``grad_output`` in place
when it is not 1), so peak memory is O(N * H + V * H + chunk_size * V) instead of
O(N * V). By default a chunk holds ``AUTO_CHUNK_ELEMENTS / V`` rows (rounded down
to a power of two): the chunk's logits take the same memory at every vocabulary
size, and a small vocabulary gets larger chunks, hence fewer read-modify-write
passes over ``dL/dW_s``.

The per-row divergence and its gradient come from
:func:`rows_and_student_grad_torch`, which calls ``dv.divergence`` (the one
place the math lives). On CUDA, when the GPU module
``divergent.functional.triton_divergence`` imports and ``supports(name)``, its
``rows_and_student_grad`` (same signature) is used instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from divergent.functional import _validation as v
from divergent.functional.api import divergence_rows
from divergent.functional.registry import DivergenceSpec, get_spec
from divergent.functional.topk import TopK

__all__ = [
    "fused_linear_distillation",
    "rows_and_student_grad_torch",
    "resolve_vocab_size",
    "default_chunk_size",
    "AUTO_CHUNK_ELEMENTS",
    "CPU_AUTO_CHUNK_ELEMENTS",
]

# Entries of one chunk's logits when chunk_size is not given: 2^27 (256 MiB in bf16 per side)
# gives 1024 rows at V = 128256 and 4096 at V = 32000. On the CPU, 2^23 (256 rows at V = 32000):
# a CPU matmul is as fast per row at a few hundred rows, and the chunk's logits, probabilities
# and gradient are what a step holds beyond the model (benchmarks/results/lm_trl_gkd*.csv:
# 256 rows were faster than 4096 at half the memory beyond the model).
AUTO_CHUNK_ELEMENTS = 2**27
CPU_AUTO_CHUNK_ELEMENTS = 2**23


def default_chunk_size(vocab_size: int, n_tokens: int | None = None, *, device: torch.device | str | None = None) -> int:
    """Rows per chunk when ``chunk_size`` is None: the largest power of two with at most
    ``AUTO_CHUNK_ELEMENTS`` logits per chunk (``CPU_AUTO_CHUNK_ELEMENTS`` when ``device`` is the
    CPU; at least 1 row), and no more than ``n_tokens``.

    >>> default_chunk_size(128256), default_chunk_size(32000), default_chunk_size(256, n_tokens=3000)
    (1024, 4096, 3000)
    >>> default_chunk_size(32000, device="cpu"), default_chunk_size(32000, device="meta")
    (256, 4096)
    """
    on_cpu = device is not None and torch.device(device).type == "cpu"
    rows = max(1, (CPU_AUTO_CHUNK_ELEMENTS if on_cpu else AUTO_CHUNK_ELEMENTS) // max(int(vocab_size), 1))
    rows = 1 << (rows.bit_length() - 1)
    return min(rows, n_tokens) if n_tokens else rows


def _is_topk(teacher: Any) -> bool:
    return isinstance(teacher, TopK)


def _slice_topk(teacher: Any, start: int, end: int) -> Any:
    # A row range of an already validated TopK (no second validation, no host syncs).
    return teacher[start:end]


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True); True if unknown."""
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if getter is None else bool(getter())



def rows_and_student_grad_torch(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: Any,
    *,
    temperature: float,
    params: dict,
    row_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence and the gradient of their weighted sum.

    Returns ``rows`` (float32 ``[N]``; float64 for float64 logits, ``rows[i] = D(p_i || q_i)`` at
    ``temperature``; rows with ``row_scale == 0`` are 0) and
    ``grad = d(sum_i row_scale[i] * rows[i]) / d student_logits`` (same dtype,
    ``[N, V]``). ``teacher_logits`` is ``[N, V]`` logits or a ``dv.TopK``; it
    receives no gradient. This is the reference of the Triton kernel's
    ``rows_and_student_grad`` and has the identical signature.
    """
    spec = get_spec(name)
    params = spec.resolve(params)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    row_scale = row_scale.to(dtype)
    with torch.enable_grad():
        student = student_logits.detach().to(dtype).requires_grad_(True)
        teacher = teacher_logits if _is_topk(teacher_logits) else teacher_logits.detach()
        rows = _counted_rows(spec, student, teacher, temperature, params, row_scale != 0)
        (grad,) = torch.autograd.grad((rows.to(dtype) * row_scale).sum(), student)
    return rows.detach().to(dtype), grad


def _counted_rows(spec: DivergenceSpec, student: torch.Tensor, teacher: Any, temperature: float, params: dict,
                  counted: torch.Tensor) -> torch.Tensor:
    """Per-row divergence of the counted rows, 0 for the others (``params`` already resolved)."""
    # Without uncounted rows, select nothing: selecting rows copies the [N, V] logits.
    if bool(counted.all()):
        return divergence_rows(spec, student, teacher, temperature, params)
    rows = divergence_rows(spec, student[counted], teacher[counted], temperature, params)
    return rows.new_zeros(counted.shape).masked_scatter(counted, rows)


# Devices whose chunks go to the Triton kernels. (benchmarks/bench_fused_linear.py --plan adds
# "meta" to plan the kernel path's memory at full size without a GPU.)
_KERNEL_DEVICE_TYPES = ("cuda",)


def _soft_term(name, student_logits, teacher_chunk, temperature, params, row_scale, teacher_grad, acc):
    """One chunk's Σ row_scale_i · D_i and its gradients (the teacher's only when it trains)."""
    if not teacher_grad:
        rows, grad_s = _student_rows_and_grad(name, student_logits, teacher_chunk, temperature, params, row_scale)
        return (rows.to(acc) * row_scale).sum(), grad_s, None
    # Trainable teacher (online distillation): both logits need gradients.
    with torch.enable_grad():
        s_leaf = student_logits.detach().requires_grad_(True)
        t_leaf = teacher_chunk.detach().requires_grad_(True)
        rows = _counted_rows(get_spec(name), s_leaf, t_leaf, temperature, params, row_scale != 0)
        grad_s, grad_t = torch.autograd.grad((rows.to(acc) * row_scale).sum(), [s_leaf, t_leaf])
    return (rows.detach().to(acc) * row_scale).sum(), grad_s.to(acc), grad_t.to(acc)


def _student_rows_and_grad(name, student_logits, teacher_logits, temperature, params, row_scale):
    """Dispatch to the Triton kernels on CUDA when they exist and support ``name``.

    Dense teachers go to ``rows_and_student_grad``, ``dv.TopK`` teachers to
    ``rows_and_student_grad_topk``; float64 (which the kernels do not take) and
    CPU tensors stay on the PyTorch reference.
    """
    implementation = rows_and_student_grad_torch
    if student_logits.device.type in _KERNEL_DEVICE_TYPES and student_logits.dtype != torch.float64:
        try:
            from divergent.functional import triton_divergence
        except ImportError:
            triton_divergence = None
        if triton_divergence is not None and triton_divergence.supports(name):
            if not _is_topk(teacher_logits):
                implementation = triton_divergence.rows_and_student_grad
            elif hasattr(triton_divergence, "rows_and_student_grad_topk"):
                implementation = triton_divergence.rows_and_student_grad_topk
    return implementation(
        name,
        student_logits,
        teacher_logits,
        temperature=temperature,
        params=params,
        row_scale=row_scale,
    )


def resolve_vocab_size(student_vocab: int, teacher_vocab: int | None, vocab_size: int | None) -> int:
    """The vocabulary both sides are compared over.

    Equal sizes are used as they are. A difference is accepted only when it is
    padding: rows of the output layer beyond the tokenizer's real vocabulary
    (models pad the embedding to a multiple of 64 or 128 for speed). Then
    ``vocab_size`` must name the real size and both sides are cut to it.
    Anything else means different tokenizers, whose token ids do not refer to
    the same strings, so a token-level divergence between them is meaningless.
    """
    if vocab_size is not None:
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        for side, size in (("student", student_vocab), ("teacher", teacher_vocab)):
            if size is not None and size < vocab_size:
                raise ValueError(
                    f"vocab_size={vocab_size} is larger than the {side} output layer ({size} rows)"
                )
        return vocab_size
    if teacher_vocab is None or teacher_vocab == student_vocab:
        return student_vocab
    raise ValueError(
        f"student vocabulary ({student_vocab}) and teacher vocabulary ({teacher_vocab}) differ. "
        "Token-level distillation needs student and teacher to share one tokenizer. If the "
        "difference is only padding rows of the output layer, pass vocab_size=<the tokenizer's "
        "vocabulary size> to compare the first vocab_size entries; different tokenizers are "
        "not supported."
    )


class _FusedLinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student_input,
        student_weight,
        teacher_input,
        teacher_weight,
        labels,
        teacher_topk,
        teacher_logits,
        options,
    ):
        name = options["name"]
        params = options["params"]
        temperature = options["temperature"]
        chunk_size = options["chunk_size"]
        vocab = options["vocab_size"]
        ignore_index = options["ignore_index"]
        n_tokens = student_input.shape[0]

        counted = (
            labels != ignore_index
            if labels is not None
            else torch.ones(n_tokens, dtype=torch.bool, device=student_input.device)
        )
        if options["normalizer"] is not None:
            denominator = float(options["normalizer"])
        else:
            # A fully masked batch gives loss 0 and zero gradients, never 0/0.
            denominator = max(int(counted.sum()), 1)
        soft_scale = options["soft_weight"] * options["t2"] / denominator
        hard_scale = options["hard_weight"] / denominator

        # A precomputed teacher (dv.TopK or dense logits) is data: it gets no gradient.
        given = teacher_topk is not None or teacher_logits is not None
        teacher_grad = not given and (
            teacher_input.requires_grad or teacher_weight.requires_grad
        )
        # Row values and CE in float32 (float64 stays float64), like the functional layer.
        acc = torch.float64 if student_input.dtype == torch.float64 else torch.float32
        # Weight gradients: float32 accumulators on CPU; elsewhere the weight's own dtype,
        # because a float32 [V, H] buffer is 2 GiB at V = 128k, H = 4096 (each chunk's product
        # is still summed in float32 inside the matmul). ``accumulation_dtype`` overrides both.
        weight_acc = options["accumulation_dtype"] or (
            acc if student_input.device.type == "cpu" else student_weight.dtype
        )
        student_w = student_weight[:vocab]
        teacher_w = None if given else teacher_weight[:vocab]

        # Every row is written by its chunk below, so no zero fill; contiguous, so that
        # each chunk's rows can be the matmul's output.
        grad_student_input = (
            torch.empty(student_input.shape, dtype=student_input.dtype, device=student_input.device)
            if student_input.requires_grad
            else None
        )
        grad_student_weight = (
            torch.zeros(student_w.shape, dtype=weight_acc, device=student_w.device)
            if student_weight.requires_grad
            else None
        )
        grad_teacher_input = (
            torch.zeros_like(teacher_input) if teacher_grad and teacher_input.requires_grad else None
        )
        grad_teacher_weight = (
            torch.zeros(teacher_w.shape, dtype=weight_acc, device=teacher_w.device)
            if teacher_grad and teacher_weight.requires_grad
            else None
        )
        total = torch.zeros((), dtype=acc, device=student_input.device)

        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            x_s = student_input[start:end]
            row_scale = counted[start:end].to(acc) * soft_scale
            student_logits = x_s @ student_w.T

            if teacher_topk is not None:
                teacher_chunk = _slice_topk(teacher_topk, start, end)
            elif teacher_logits is not None:
                # As x_t @ W_t.T would be: the student logits' dtype, contiguous (a copy only when
                # padding columns beyond vocab are cut or the dtypes differ).
                teacher_chunk = teacher_logits[start:end, :vocab].to(student_logits.dtype).contiguous()
            else:
                x_t = teacher_input[start:end]
                teacher_chunk = x_t @ teacher_w.T

            # The hard term goes first: a GPU kernel may write its gradient over the
            # student logits' buffer.
            ce_grad = None
            if hard_scale != 0.0 and labels is not None:
                chunk_labels = labels[start:end]
                chunk_counted = counted[start:end]
                # CE(s, y) = logsumexp(s) - s_y;  dCE/ds = softmax(s) - onehot(y)
                log_probs = torch.log_softmax(student_logits.to(acc), dim=-1)
                safe_labels = torch.where(chunk_counted, chunk_labels, torch.zeros_like(chunk_labels))
                if safe_labels.numel() and (
                    int(safe_labels.max()) >= vocab or int(safe_labels.min()) < 0
                ):
                    raise ValueError(
                        f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}, "
                        f"got values in [{int(safe_labels.min())}, {int(safe_labels.max())}]"
                    )
                picked = log_probs.gather(1, safe_labels[:, None]).squeeze(1)
                hard_rows = -picked * chunk_counted.to(acc)
                total = total + hard_scale * hard_rows.sum()
                ce_grad = log_probs.exp_()  # softmax(s), reusing the log-prob buffer
                del log_probs
                ce_grad.scatter_add_(1, safe_labels[:, None], -torch.ones_like(picked)[:, None])
                ce_grad *= (hard_scale * chunk_counted.to(acc))[:, None]

            try:
                soft_sum, grad_s, grad_t = _soft_term(
                    name, student_logits, teacher_chunk, temperature, params, row_scale, teacher_grad, acc
                )
            except ValueError as exc:
                # Say what the logits the message names are: nobody passed them in.
                teacher = "" if given else ", teacher_logits = teacher_input @ teacher_weight.T"
                raise ValueError(
                    f"{exc} (in the fused loss: student_logits = student_input @ student_weight.T{teacher}, "
                    f"tokens {start} to {end - 1})"
                ) from None
            total = total + soft_sum
            if ce_grad is not None:
                # The kernel's gradient may be bf16: add the CE part at full precision.
                grad_s = grad_s.to(acc).add_(ce_grad)
                del ce_grad

            grad_s_low = grad_s.to(student_w.dtype)  # the kernel's gradient already is
            if grad_student_input is not None:
                torch.mm(grad_s_low, student_w, out=grad_student_input[start:end])
            if grad_student_weight is not None:
                grad_student_weight.addmm_(grad_s_low.T.to(weight_acc), x_s.to(weight_acc))
            if teacher_grad:
                grad_t_low = grad_t.to(teacher_w.dtype)
                if grad_teacher_input is not None:
                    grad_teacher_input[start:end] = grad_t_low @ teacher_w
                if grad_teacher_weight is not None:
                    grad_teacher_weight.addmm_(grad_t_low.T.to(weight_acc), x_t.to(weight_acc))
                del grad_t, grad_t_low
            # Free this chunk's buffers before the next chunk's logits are made.
            del student_logits, teacher_chunk, grad_s, grad_s_low

        if bool(torch.isnan(total)):
            # The inputs were checked finite, so the logits x @ W.T overflowed their dtype.
            raise ValueError(
                f"the loss came out NaN from finite inputs: the logits student_input @ student_weight.T"
                f"{'' if given else ' or teacher_input @ teacher_weight.T'} overflow "
                f"{student_input.dtype} (beyond ±{torch.finfo(student_input.dtype).max:.3g}) for some token, "
                f"or their spread divided by temperature={temperature:g} does; check the hidden states' and "
                f"weights' scale"
            )

        def _pad_rows(grad, weight):
            # Padding rows of the output layer beyond ``vocab`` get zero gradient.
            if grad is None:
                return None
            grad = grad.to(weight.dtype)
            if grad.shape[0] == weight.shape[0]:
                return grad
            full = torch.zeros_like(weight)
            full[: grad.shape[0]] = grad
            return full

        # Kept on ctx rather than saved for backward: backward drops its reference before it
        # returns them, so that autograd moves them into .grad instead of copying them.
        ctx.grads = (
            grad_student_input,
            _pad_rows(grad_student_weight, student_weight),
            grad_teacher_input,
            None if given else _pad_rows(grad_teacher_weight, teacher_weight),
        )
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        # The gradients were formed in the forward pass for grad_output = 1 (loss.backward()).
        # When the graph is not kept, ctx lets go of them, so autograd moves them into .grad
        # without a copy, and any other grad_output scales them in place: a scaled copy of
        # dL/dW_s would add a [V, H] buffer at the peak. With retain_graph=True (gradcheck,
        # several losses over one graph) they stay here for the next backward, and the
        # result is a copy.
        grads = getattr(ctx, "grads", None)
        if grads is None:
            raise RuntimeError(
                "backward ran a second time through fused_linear_distillation / "
                "LinearDistillationLoss after a backward without retain_graph=True, which handed "
                "its gradients over; pass retain_graph=True to the earlier backward, or compute "
                "the loss again"
            )
        # One host read; as a Python float the scale is not rounded to the gradients' bf16.
        scale = float(grad_output)
        if _graph_is_kept():
            if scale == 1.0:
                return (*grads, None, None, None, None)
            return (*(None if g is None else g * scale for g in grads), None, None, None, None)
        del ctx.grads
        if scale != 1.0:
            for grad in grads:
                if grad is not None:
                    grad.mul_(scale)
        return (*grads, None, None, None, None)


def _check_matrix(value: Any, argument: str, width: int | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{argument} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() != 2:
        raise ValueError(f"{argument} must be 2-D, got shape {tuple(value.shape)}")
    if width is not None and value.shape[1] != width:
        raise ValueError(
            f"{argument} has {value.shape[1]} columns, expected {width} to match its input's "
            "hidden size"
        )


def fused_linear_distillation(
    name: str,
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor | None,
    teacher_weight: Any,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    t2_scale: bool = True,
    ignore_index: int = -100,
    normalizer: float | None = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    accumulation_dtype: torch.dtype | None = None,
    **params: Any,
) -> torch.Tensor:
    """Distillation loss of the output layer without materialising ``[N, V]`` logits.

    ``student_input`` ``[..., H_s]`` and ``student_weight`` ``[V_s, H_s]`` give
    the student logits ``s = x_s @ W_s^T``; ``teacher_input`` ``[..., H_t]`` and
    ``teacher_weight`` ``[V_t, H_t]`` the teacher's. Instead of the teacher
    pair, with ``teacher_input=None``, ``teacher_weight`` may be the teacher
    itself over the same tokens: a ``dv.TopK`` (a cached sparse teacher) or
    dense logits ``[..., V_t]`` (a teacher that gives its logits, e.g. a mixture
    of teachers); either is sliced per chunk and gets no gradient.

    Returns the scalar

        sum_i c_i * (soft_weight * T^2 * D_i + hard_weight * CE_i) / denominator

    with ``D_i`` the divergence ``name`` between the tempered teacher and
    student distributions of token ``i``, ``CE_i`` the untempered cross-entropy
    of the student with ``labels[i]`` (only when ``labels`` is given and
    ``hard_weight != 0``), ``c_i = [labels[i] != ignore_index]`` (1 for all
    tokens without labels), and the denominator the number of counted tokens,
    or ``normalizer`` (global token count across accumulation steps or ranks).
    ``T^2`` is applied when ``t2_scale``. The value and gradients equal those
    of computing the full logits and calling ``dv.divergence`` on them.

    Gradients: to the student's input and weight; to the teacher's too when
    ``teacher_input`` or ``teacher_weight`` requires grad (online distillation). A
    ``dv.TopK`` or dense-logits teacher is data: it may not require grad here.
    Every tensor is checked once per call (dtypes and devices of each input/weight pair,
    finite values, weights with values, not on ``meta``), the settings as in
    :func:`check_options`.

    ``vocab_size``: see :func:`resolve_vocab_size`; padding rows of either
    output layer beyond it are ignored and get zero gradient.

    ``chunk_size``: tokens per chunk; None picks :func:`default_chunk_size`
    (1024 at V = 128256, 4096 at V = 32000).

    ``accumulation_dtype``: dtype of the weight-gradient accumulators. None keeps
    float32 on CPU and the weight's own dtype on GPUs (a float32 ``[V, H]``
    accumulator costs 2 GiB at V = 128k, H = 4096); ``torch.float32`` sums the
    chunks' contributions without rounding each one to bf16, at that memory cost.
    """
    spec, options = check_options(
        name, temperature=temperature, hard_weight=hard_weight, soft_weight=soft_weight, t2_scale=t2_scale,
        ignore_index=ignore_index, chunk_size=chunk_size, accumulation_dtype=accumulation_dtype, params=params,
    )
    normalizer = v.check_normalizer(normalizer)
    if isinstance(normalizer, torch.Tensor):
        normalizer = float(normalizer.detach())

    _check_matrix(student_weight, "student_weight")
    if not isinstance(student_input, torch.Tensor) or student_input.dim() < 1:
        raise TypeError("student_input must be a tensor of shape [..., hidden]")
    leading_shape = student_input.shape[:-1]
    student_flat = student_input.reshape(-1, student_input.shape[-1])
    _check_matrix(student_flat, "student_input")
    if student_flat.shape[1] != student_weight.shape[1]:
        raise ValueError(
            f"student_input hidden size {student_flat.shape[1]} does not match student_weight "
            f"{tuple(student_weight.shape)} (expected [vocab, {student_flat.shape[1]}])"
        )
    _check_pair(student_input, student_weight, "student")
    n_tokens = student_flat.shape[0]

    teacher_topk = None
    teacher_flat = None
    teacher_logits = None
    if teacher_input is None and isinstance(teacher_weight, torch.Tensor):
        # Dense teacher logits [..., V_t] over the same tokens.
        if not teacher_weight.is_floating_point() or teacher_weight.dim() < 1:
            raise TypeError(f"teacher logits (teacher_input=None) must be a floating-point tensor [..., vocab], "
                            f"got dtype {teacher_weight.dtype} and shape {tuple(teacher_weight.shape)}")
        if torch.is_grad_enabled() and teacher_weight.requires_grad:
            raise ValueError(
                "the teacher logits (teacher_input=None) require grad, but the fused loss gives precomputed "
                "teacher logits no gradient; pass them detached, or pass the teacher's (input, weight) pair"
            )
        teacher_logits = teacher_weight.reshape(-1, teacher_weight.shape[-1])
        if teacher_logits.shape[0] != n_tokens:
            raise ValueError(f"the teacher logits cover {teacher_logits.shape[0]} tokens, student_input has {n_tokens}")
        if teacher_logits.device != student_input.device:
            raise ValueError(f"the teacher logits are on {teacher_logits.device} and the student's tensors on "
                             f"{student_input.device}; move both to one device")
        vocab = resolve_vocab_size(student_weight.shape[0], teacher_logits.shape[1], vocab_size)
        teacher_weight_tensor = None
    elif _is_topk(teacher_weight):
        if teacher_input is not None:
            raise ValueError("teacher_input must be None when the teacher is a dv.TopK")
        teacher_topk = teacher_weight
        if torch.is_grad_enabled() and teacher_topk.logprobs.requires_grad:
            raise ValueError(
                "the TopK teacher's logprobs require grad, but the fused loss gives a TopK teacher no "
                "gradient; pass TopK(indices, logprobs.detach()) (a stored teacher is data), or use "
                "dv.DistillationLoss on full logits, which differentiates through the bucket log-probs"
            )
        topk_rows = teacher_topk.logprobs.reshape(-1, teacher_topk.logprobs.shape[-1])
        if topk_rows.shape[0] != n_tokens:
            raise ValueError(
                f"TopK teacher covers {topk_rows.shape[0]} tokens, student_input has {n_tokens}"
            )
        teacher_topk = teacher_topk.flatten_rows()  # validated when it was made
        vocab = resolve_vocab_size(student_weight.shape[0], None, vocab_size)
        teacher_weight_tensor = None
    else:
        _check_matrix(teacher_weight, "teacher_weight")
        if not isinstance(teacher_input, torch.Tensor):
            raise TypeError(
                f"teacher_input must be a torch.Tensor, got {type(teacher_input).__name__}"
            )
        teacher_flat = teacher_input.reshape(-1, teacher_input.shape[-1])
        if teacher_flat.shape[0] != n_tokens:
            raise ValueError(
                f"teacher_input covers {teacher_flat.shape[0]} tokens, student_input has {n_tokens}"
            )
        if teacher_flat.shape[1] != teacher_weight.shape[1]:
            raise ValueError(
                f"teacher_input hidden size {teacher_flat.shape[1]} does not match teacher_weight "
                f"{tuple(teacher_weight.shape)} (expected [vocab, {teacher_flat.shape[1]}])"
            )
        _check_pair(teacher_input, teacher_weight, "teacher")
        if teacher_input.device != student_input.device:
            raise ValueError(
                f"the teacher's tensors are on {teacher_input.device} and the student's on "
                f"{student_input.device}; move both to one device"
            )
        vocab = resolve_vocab_size(student_weight.shape[0], teacher_weight.shape[0], vocab_size)
        teacher_weight_tensor = teacher_weight

    flat_labels = None
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool \
                or labels.is_complex():
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise TypeError(f"labels must be an integer tensor of token ids (ignore_index = masked), got {got}")
        if labels.shape != leading_shape:
            raise ValueError(
                f"labels has shape {tuple(labels.shape)}, expected {tuple(leading_shape)} "
                "(the input's shape without the hidden dimension)"
            )
        flat_labels = labels.reshape(-1).long()

    _check_finite(
        ("student_input", student_flat), ("student_weight", student_weight[:vocab]),
        ("teacher_input", teacher_flat),
        ("teacher logits" if teacher_logits is not None else "teacher_weight",
         None if teacher_topk is not None else teacher_weight[..., :vocab] if teacher_logits is not None
         else teacher_weight[:vocab]),
    )
    options.update(
        normalizer=normalizer,
        vocab_size=vocab,
        chunk_size=options["chunk_size"] or default_chunk_size(vocab, n_tokens, device=student_flat.device),
        hard_weight=options["hard_weight"] if labels is not None else 0.0,
    )
    return _FusedLinearDistillation.apply(
        student_flat,
        student_weight,
        teacher_flat,
        teacher_weight_tensor,
        flat_labels,
        teacher_topk,
        teacher_logits,
        options,
    )


def check_options(
    name: str,
    *,
    temperature: Any,
    hard_weight: Any,
    soft_weight: Any,
    t2_scale: Any,
    ignore_index: Any,
    chunk_size: Any,
    accumulation_dtype: Any,
    params: dict,
) -> tuple[DivergenceSpec, dict]:
    """Check the fused loss's hyperparameters (also what ``LinearDistillationLoss`` checks when made).

    Returns the registry entry and the options of ``_FusedLinearDistillation`` (the
    divergence's parameters resolved: filled with defaults and range-checked).
    """
    spec = get_spec(name)
    if not spec.per_row:
        raise ValueError(
            f"divergence {name!r} is not per-row (it couples all rows of a batch), so it cannot "
            "be computed chunk by chunk; use dv.DistillationLoss on full logits instead"
        )
    resolved = spec.resolve(params)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")
    if accumulation_dtype is not None and (
        not isinstance(accumulation_dtype, torch.dtype) or not accumulation_dtype.is_floating_point
    ):
        raise TypeError(
            f"accumulation_dtype must be a floating-point torch.dtype or None, got {accumulation_dtype!r}"
        )
    temperature = v.check_temperature(temperature)
    if not isinstance(t2_scale, bool):
        raise TypeError(f"t2_scale must be True or False, got {t2_scale!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int (the label of tokens that do not count), got {ignore_index!r}")
    return spec, dict(
        name=name,
        params=resolved,
        temperature=temperature,
        chunk_size=chunk_size,
        accumulation_dtype=accumulation_dtype,
        ignore_index=ignore_index,
        soft_weight=v.check_weight(soft_weight, "soft_weight"),
        hard_weight=v.check_weight(hard_weight, "hard_weight"),
        t2=temperature**2 if t2_scale else 1.0,
    )


def _check_pair(hidden: torch.Tensor, weight: torch.Tensor, side: str) -> None:
    """An input and its output layer: one dtype, one device, with values (not on ``meta``)."""
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"{side}_input has dtype {hidden.dtype} but {side}_weight has {weight.dtype}; the logits "
            f"{side}_input @ {side}_weight.T need one dtype (cast the hidden states to the weight's)"
        )
    if hidden.device != weight.device:
        raise ValueError(
            f"{side}_input is on {hidden.device} but {side}_weight is on {weight.device}; move both to one device"
        )
    # A memory plan (benchmarks/bench_fused_linear.py --plan) routes meta tensors to the kernels on
    # purpose; anywhere else a weight on meta belongs to a model whose weights were never loaded.
    if weight.device.type == "meta" and "meta" not in _KERNEL_DEVICE_TYPES:
        raise ValueError(
            f"{side}_weight is on the meta device: it has a shape but no values (a model made with "
            f"init_empty_weights or device_map='meta' and never loaded); load its weights first"
        )


def _check_finite(*named: tuple[str, torch.Tensor | None]) -> None:
    """ValueError naming the first tensor that holds NaN or ±inf (one host read for all of them).

    Min and max are reductions: no temporary as large as a [V, H] weight, unlike isfinite.
    """
    present = [(argument, tensor) for argument, tensor in named if tensor is not None and tensor.numel()]
    if not present:
        return
    extremes = torch.stack([torch.stack(torch.aminmax(tensor.detach())).float() for _, tensor in present])
    bad = ~torch.isfinite(extremes).all(-1)
    if bool(bad.any()):
        argument, tensor = present[int(bad.int().argmax())]
        count = int((~torch.isfinite(tensor.detach())).sum())
        raise ValueError(f"{argument} holds {count} NaN or infinite value(s); the loss needs finite values")
