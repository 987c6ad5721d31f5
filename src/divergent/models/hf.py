"""Hugging Face causal language models from local paths only (no hub access).

``transformers`` is an optional dependency (extra ``llm``); importing this
module works without it and the loaders raise a clear ImportError.

A Hugging Face causal LM and a :class:`~divergent.models.gpt.TinyGPT` are used
through the same two functions by the LM trainer:

- :func:`hidden_and_logits` -> ``(hidden [B, T, H], logits [B, T, V])``, the
  hidden state being the input of the output layer;
- :func:`output_weight` -> the output layer's weight ``[V, H]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "load_causal_lm",
    "load_tokenizer",
    "check_same_tokenizer",
    "hidden_and_logits",
    "output_weight",
    "is_hf_model",
]


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Hugging Face models need the optional dependency 'transformers': "
            "pip install 'divergent[llm]'"
        ) from exc
    return transformers


def _check_local_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what}: {path} is not a local directory. divergent never downloads models; "
            "save one first (model.save_pretrained(path)) or point to an existing local copy."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{what}: {path} has no config.json; expected a folder written by save_pretrained"
        )
    return path


def load_causal_lm(path: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a causal LM saved with ``save_pretrained`` from a local folder.

    Uses ``local_files_only=True``: a missing folder or file is a
    FileNotFoundError naming the path, never a download attempt. A folder
    written by :meth:`TinyGPT.save_pretrained` loads as a ``TinyGPT``.
    """
    path = Path(path)
    config_file = path / "config.json"
    if path.is_dir() and config_file.is_file() and "model_type" not in config_file.read_text():
        from divergent.models.gpt import TinyGPT

        model = TinyGPT.from_pretrained(path)
        return model.to(dtype) if dtype is not None else model
    path = _check_local_dir(path, "load_causal_lm")
    transformers = _require_transformers()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"load_causal_lm: could not load a model from {path}: {exc}") from exc


def load_tokenizer(path: str | Path) -> Any | None:
    """The tokenizer saved next to a local model, or None when the folder has none."""
    path = Path(path)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    transformers = _require_transformers()
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def check_same_tokenizer(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Raise a ValueError unless both tokenizers map the same strings to the same ids.

    Token-level distillation compares the two models' distributions entry by
    entry, which is only meaningful when token id ``k`` is the same string for
    both. ``None`` (no tokenizer known, e.g. byte-level TinyGPT) is accepted.
    """
    if student_tokenizer is None or teacher_tokenizer is None:
        return
    student_vocab = student_tokenizer.get_vocab()
    teacher_vocab = teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        only_student = len(set(student_vocab.items()) - set(teacher_vocab.items()))
        only_teacher = len(set(teacher_vocab.items()) - set(student_vocab.items()))
        raise ValueError(
            "student and teacher use different tokenizers "
            f"({len(student_vocab)} vs {len(teacher_vocab)} tokens; {only_student} (token, id) "
            f"pairs only in the student's, {only_teacher} only in the teacher's). Token-level "
            "distillation needs one shared tokenizer; cross-tokenizer distillation is not supported."
        )


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "get_output_embeddings") and hasattr(model, "config")


def output_weight(model: nn.Module) -> torch.Tensor:
    """The output layer's weight ``[V, H]`` (logits = hidden @ weight.T)."""
    if is_hf_model(model):
        head = model.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            raise ValueError(
                f"{type(model).__name__}: the fused loss needs a bias-free linear output layer"
            )
        return head.weight
    if hasattr(model, "lm_head"):
        return model.lm_head.weight
    raise TypeError(f"{type(model).__name__} has no output layer (lm_head) the loss can use")


def hidden_and_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    compute_logits: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden [B, T, H], logits [B, T, V] or None)`` of a TinyGPT or HF causal LM.

    ``hidden`` is the input of the output layer. With ``compute_logits=False``
    an HF model skips its output layer (the fused loss computes it chunk by
    chunk); a TinyGPT always computes logits, which are then dropped.
    """
    if is_hf_model(model):
        # The base model's last hidden state is the input of the output layer
        # (after the final norm). Models that rescale logits after the output
        # layer (soft-capping, logit_scale) are not covered by the fused loss.
        base = getattr(model, model.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = model.get_output_embeddings()(hidden) if compute_logits else None
        return hidden, logits
    hidden, logits = model(input_ids, return_hidden=True)
    return hidden, logits if compute_logits else None
