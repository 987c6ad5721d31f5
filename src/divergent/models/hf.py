"""Causal language models from local folders (Hugging Face or TinyGPT), and their output layer.

``transformers`` is an optional dependency (extra ``llm``); importing this module works
without it and the loaders raise a clear ImportError. Nothing is ever downloaded:
models and tokenizers load with ``local_files_only=True``.

A Hugging Face causal LM and a :class:`~divergent.models.gpt.TinyGPT` are used the same
way by the LM trainer, through their **output layer** (``lm_head``, a bias-free linear
layer whose input is the final hidden state):

- :func:`replace_output` makes ``model(input_ids=..., attention_mask=...)`` return
  ``fn(hidden, weight)`` computed *inside* the model's forward, from the output layer's
  input ``hidden [B, T, H]`` and its weight ``[V, H]``; the model's own ``[B, T, V]``
  logits are never formed. The distillation loss is computed this way, so that under
  FSDP (whose forward gathers the sharded weights) the output layer's weight is whole
  when the fused loss reads it, and DDP/FSDP see the loss as the model's output.
- :func:`output_layer_input` returns ``(hidden, weight)`` the same way (the teacher side).
- :func:`hidden_and_logits` and :func:`output_weight` for code that wants them directly.

A teacher may instead **give its logits**: a module with a method
``teacher_logits(input_ids, attention_mask) -> [B, T, V]`` (e.g.
:class:`divergent.models.mixture.TeacherMixture`) has no output layer to read;
:func:`gives_logits` recognises it and :func:`teacher_side` returns what the loss takes of
either kind of teacher.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "load_causal_lm",
    "load_tokenizer",
    "check_same_tokenizer",
    "tokenizer_fingerprint",
    "output_layer",
    "check_plain_output_layer",
    "replace_output",
    "output_layer_input",
    "hidden_and_logits",
    "gives_logits",
    "output_vocab",
    "teacher_side",
    "output_weight",
    "is_hf_model",
    "save_pretrained",
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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hugging Face's loading/saving progress bars and info logs off (they would interleave with ours)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def _check_local_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{what}: {path} is not a local directory. divergent never downloads models; "
            "save one first (model.save_pretrained(path)) or point to an existing local copy."
        )
    if not path.is_dir():
        raise NotADirectoryError(f"{what}: {path} is a file; expected a folder written by save_pretrained")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{what}: {path} has no config.json; expected a folder written by save_pretrained"
        )
    return path


def load_causal_lm(path: str | Path, *, dtype: torch.dtype | None = None, what: str = "load_causal_lm") -> nn.Module:
    """Load a causal LM saved with ``save_pretrained`` from a local folder.

    Uses ``local_files_only=True``: a missing folder or file is a ``FileNotFoundError``
    naming the path, never a download attempt; a damaged ``config.json`` or weights file is
    a ``ValueError`` naming it. A folder written by :meth:`TinyGPT.save_pretrained` loads as
    a ``TinyGPT``. ``what`` names the model in messages (e.g. ``"--teacher"``).
    """
    path = _check_local_dir(path, what)
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: {config_file} is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{what}: {config_file} must hold a JSON object, got {type(config).__name__}")
    if "model_type" not in config:
        from divergent.models.gpt import TinyGPT

        try:
            model = TinyGPT.from_pretrained(path)
        except (ValueError, FileNotFoundError) as exc:
            raise type(exc)(f"{what}: {exc}") from None
        return model.to(dtype) if dtype is not None else model
    transformers = _require_transformers()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        with _quiet():
            return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except ImportError:
        raise
    except Exception as exc:  # transformers/safetensors raise many types for damaged or foreign folders
        weights = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        raise ValueError(
            f"{what}: could not load a causal LM from {path} (weights: {', '.join(weights) or 'none found'}): "
            f"{_first_line(exc)}"
        ) from None


def load_tokenizer(path: str | Path, what: str = "load_tokenizer") -> Any | None:
    """The tokenizer saved next to a local model, or None when the folder has none."""
    path = Path(path)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    transformers = _require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except ImportError:
        raise
    except Exception as exc:
        raise ValueError(f"{what}: could not load the tokenizer saved in {path}: {_first_line(exc)}") from None


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
            "distillation needs one shared tokenizer; cross-tokenizer distillation is not supported yet."
        )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's (token, id) pairs; equal for tokenizers that map strings to ids alike.

    ``None`` (raw bytes, no tokenizer) gives ``"bytes"``.
    """
    if tokenizer is None:
        return "bytes"
    items = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(items).encode("utf-8")).hexdigest()[:16]


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "get_output_embeddings") and hasattr(model, "config")


# Attributes of Hugging Face configs that change the logits after the output layer; the
# loss computed from the output layer's input and weight would then be of other logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def output_layer(model: nn.Module) -> nn.Module:
    """The output layer (``lm_head``) of a TinyGPT or Hugging Face causal LM."""
    if is_hf_model(model):
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)")
        return head
    if hasattr(model, "lm_head"):
        return model.lm_head
    raise TypeError(f"{type(model).__name__} has no output layer (lm_head or get_output_embeddings())")


def _check_weight(model: nn.Module, head: nn.Module, weight: Any) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(model).__name__}: the output layer {type(head).__name__} has no [vocab, hidden] weight")


def check_plain_output_layer(model: nn.Module, *, check_weight: bool = True) -> None:
    """Raise unless logits are exactly ``hidden @ lm_head.weight.T`` (no bias, no rescaling after it).

    ``check_weight=False`` skips the weight's shape, which FSDP flattens outside the forward pass.
    """
    head = output_layer(model)
    if check_weight:
        _check_weight(model, head, getattr(head, "weight", None))
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: the output layer has a bias; the loss needs a bias-free linear output layer")
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0, 0, 0.0):
            raise ValueError(
                f"{type(model).__name__}: config.{name}={value!r} rescales the logits after the output layer, "
                f"which the distillation loss (computed from the output layer's input and weight) does not do; "
                f"models with {name} are not supported"
            )


def output_weight(model: nn.Module) -> torch.Tensor:
    """The output layer's weight ``[V, H]`` (logits = hidden @ weight.T)."""
    check_plain_output_layer(model)
    return output_layer(model).weight


_NOT_CALLED = object()


@contextlib.contextmanager
def replace_output(model: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], Any]) -> Iterator[None]:
    """While active, calling ``model`` (or a DDP/FSDP wrapper of it) returns ``fn(hidden, weight)``.

    ``hidden`` is the input of the output layer ``[B, T, H]`` (the final hidden state, after
    the last norm) and ``weight`` its ``[V, H]`` weight, both as the model's forward sees them
    (under FSDP: gathered; under autograd: connected to the parameters). ``fn`` runs when
    the forward reaches the output layer; the layer itself then processes one position only
    (its ``[B, T, V]`` logits are never formed), and the model's return value is replaced by
    ``fn``'s result — so a loss computed by ``fn`` is the output of a wrapped forward, as
    DDP and FSDP need for their backward hooks.

    The hooks are added when entering and removed when leaving, after any hooks a
    distributed engine added before (they run first: FSDP/DeepSpeed gather the weight).
    """
    check_plain_output_layer(model, check_weight=False)
    head = output_layer(model)
    state: dict[str, Any] = {"result": _NOT_CALLED}

    def at_output_layer(module, args):
        hidden = args[0]
        _check_weight(model, module, module.weight)
        state["result"] = fn(hidden, module.weight)
        return (hidden[..., :1, :],) + tuple(args[1:])

    def at_model_output(module, args, output):
        result, state["result"] = state["result"], _NOT_CALLED
        if result is _NOT_CALLED:
            raise RuntimeError(
                f"{type(model).__name__}'s forward did not call its output layer {type(head).__name__}; "
                "cannot compute the loss from the output layer's input"
            )
        return result

    pre = head.register_forward_pre_hook(at_output_layer)
    # prepend: FSDP2 registers hooks on outputs in its own forward hook, which must see our result.
    post = model.register_forward_hook(at_model_output, prepend=True)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def _call(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    if attention_mask is None:
        return model(input_ids=input_ids)
    return model(input_ids=input_ids, attention_mask=attention_mask)


def output_layer_input(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [B, T, H], weight [V, H])``: the output layer's input and weight for these tokens."""
    with replace_output(model, lambda hidden, weight: (hidden, weight)):
        return _call(model, input_ids, attention_mask)


def gives_logits(model: Any) -> bool:
    """Whether ``model`` gives its logits directly: it has a ``teacher_logits(input_ids, attention_mask)``
    method returning ``[B, T, V]`` logits (and an int ``vocab_size``, V), instead of an output layer
    whose input and weight are read."""
    return callable(getattr(model, "teacher_logits", None))


def output_vocab(model: nn.Module) -> int:
    """V, the logits per token: the output layer's rows, or ``vocab_size`` of a model that gives its logits."""
    if gives_logits(model):
        return int(model.vocab_size)
    return int(output_layer(model).weight.shape[0])


def teacher_side(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    domains: torch.Tensor | None = None, *, temperature: float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The teacher as the fused loss takes it: ``(hidden [B, T, H], weight [V, H])`` of its output
    layer, or ``(None, logits [B, T, V])`` for a model that gives its logits (:func:`gives_logits`).

    ``domains`` ``[B]``: each row's domain, passed to a model that takes it (``takes_domains``,
    :class:`divergent.models.domain_teachers.DomainTeachers`). ``temperature``: for a model
    whose distribution depends on the temperature (``tempers``: a
    :class:`divergent.models.mixture.TeacherMixture` mixes its *tempered* teachers), the
    temperature to give it at, e.g. 1.0 in evaluation; None = its own (the training one)."""
    if gives_logits(model):
        kwargs = {"temperature": temperature} if temperature is not None and getattr(model, "tempers", False) else {}
        if getattr(model, "takes_domains", False):
            return None, model.teacher_logits(input_ids, attention_mask, domains, **kwargs)
        return None, model.teacher_logits(input_ids, attention_mask, **kwargs)
    return output_layer_input(model, input_ids, attention_mask)


def hidden_and_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    compute_logits: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden [B, T, H], logits [B, T, V] or None)`` of a TinyGPT or HF causal LM.

    ``hidden`` is the input of the output layer; ``logits = hidden @ weight.T``.
    """
    hidden, weight = output_layer_input(model, input_ids, attention_mask)
    return hidden, (hidden @ weight.T if compute_logits else None)


def save_pretrained(
    model: nn.Module, folder: str | Path, *, tokenizer: Any = None, state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer``) with ``save_pretrained`` into ``folder``, replacing it whole.

    The files are written into a temporary sibling folder that then takes ``folder``'s
    place, so a reader (or a resume after SIGKILL) finds the previous complete model or the
    new one, never a mixture. ``state_dict``: the weights to write (e.g. gathered from FSDP
    shards) instead of the module's own.
    """
    from divergent.io import WriteError

    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        raise WriteError(exc.errno or 0, f"cannot write {folder}: {exc.strerror or exc}") from None
    try:
        with _quiet():
            if state_dict is None:
                model.save_pretrained(staging)
            else:
                model.save_pretrained(staging, state_dict=state_dict)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(staging)
        previous = None
        if folder.exists():
            previous = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(folder, previous)
        os.replace(staging, folder)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise WriteError(exc.errno or 0, f"cannot write {folder}: {exc.strerror or exc}") from None
    return folder
