"""The user's own teachers and students for classifier distillation (``divergent compare --teacher``).

A model is given as one of:

- a **TorchScript** file (``torch.jit.save``; any suffix but ``.pt2``);
- a **torch.export** file (``torch.export.save``; the suffix ``.pt2`` is how it is recognised).
  An exported program is an inference graph: its train/eval mode was fixed at export time, and
  when it was exported with a fixed batch size, batches are run in chunks of that size (the
  last one padded, the padding's outputs dropped);
- ``module:factory`` — ``factory`` in the Python module ``module``, imported with the current
  folder on ``sys.path``. It is called as ``factory(input_shape, num_classes)`` when it accepts
  two positional arguments, else as ``factory()``, and must return an ``nn.Module``.

``weights`` (``--teacher-weights``) is a state_dict to load into the model: a ``.safetensors``
file, or a ``torch.save`` file read with ``weights_only=True`` (so it cannot run code). The
keys must match the model's exactly.

:func:`check_fits` runs the model on one example of the data and raises, naming both, when
its input shape or number of outputs does not fit the data.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from divergent.data.vision import ClassificationData, get_batch

__all__ = ["load_user_model", "is_factory_spec", "model_source", "check_fits", "model_fingerprint", "ExportedModel"]


def is_factory_spec(spec: str) -> bool:
    """Whether ``spec`` names ``module:factory`` (not a file on disk)."""
    return ":" in spec and not Path(spec).expanduser().exists()


def model_source(spec: str) -> str:
    """``"factory"``, ``"export"`` (a ``.pt2`` file) or ``"torchscript"`` (any other file)."""
    if is_factory_spec(spec):
        return "factory"
    return "export" if Path(spec).suffix.lower() == ".pt2" else "torchscript"


class ExportedModel(nn.Module):
    """A ``torch.export`` program as a module: fixed mode, fixed-batch programs run in chunks."""

    def __init__(self, program, path: Path) -> None:
        super().__init__()
        self.program = program.module()
        self.path = path
        self.batch_size = _static_batch_size(program)

    def train(self, mode: bool = True) -> "ExportedModel":
        # The graph was captured in one mode; GraphModule refuses train()/eval(), and the mode is fixed anyway.
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.batch_size
        if size is None or x.shape[0] == size:
            return self.program(x)
        outputs = []
        for start in range(0, x.shape[0], size):
            chunk = x[start:start + size]
            rows = chunk.shape[0]
            if rows < size:
                chunk = torch.cat([chunk, chunk.new_zeros((size - rows, *chunk.shape[1:]))])
            outputs.append(self.program(chunk)[:rows])
        return torch.cat(outputs)


def _static_batch_size(program) -> int | None:
    """The first input's batch size when the program was exported with a fixed one, else None."""
    names = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            value = node.meta.get("val")
            if value is not None and hasattr(value, "shape") and len(value.shape) > 0:
                first = value.shape[0]
                return int(first) if isinstance(first, int) else None
    return None


def _call_factory(factory, spec: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    try:
        inspect.signature(factory).bind(tuple(input_shape), num_classes)
        takes_shape = True
    except TypeError:
        takes_shape = False
    except ValueError:  # no signature (a builtin): try the documented form
        takes_shape = True
    model = factory(tuple(input_shape), num_classes) if takes_shape else factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def _from_factory(spec: str, input_shape: Sequence[int], num_classes: int, what: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{what} {spec!r}: expected 'module:factory' (e.g. my_models:make_teacher) or a model file")
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)  # the documented contract: the current folder is importable
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} (looked in the current folder "
                         f"{here} and sys.path): {exc}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no callable {attribute!r}; "
                         f"callables there: {', '.join(found) or 'none'}")
    return _call_factory(factory, spec, input_shape, num_classes)


def _from_file(path: Path, what: str) -> nn.Module:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist; expected a TorchScript file (torch.jit.save), "
                                f"a torch.export file (.pt2) or module:factory")
    if path.suffix.lower() == ".pt2":
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise ValueError(f"{what} {path} could not be read as a torch.export file (torch.export.save): "
                             f"{str(exc).splitlines()[0][:200]}") from None
        return ExportedModel(program, path)
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ValueError(
            f"{what} {path} could not be read as a TorchScript file (torch.jit.save): "
            f"{str(exc).splitlines()[0][:200]}. A state_dict saved with torch.save needs the code that builds "
            f"the model: give module:factory and the file as weights (--teacher-weights)") from None


def load_weights(path: str | os.PathLike, what: str = "weights") -> dict[str, torch.Tensor]:
    """A state_dict from a ``.safetensors`` file or a ``torch.save`` file (read with ``weights_only=True``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{what} {path} could not be read as a state_dict (torch.save of tensors, loaded with "
                         f"weights_only=True, or .safetensors): {str(exc).splitlines()[0][:200]}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} {path} holds a {type(state).__name__}, expected a state_dict: a mapping of "
                         f"parameter names to tensors")
    return dict(state)


def load_user_model(
    spec: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    weights: str | os.PathLike | None = None,
    what: str = "teacher",
) -> nn.Module:
    """The model ``spec`` names (a TorchScript file, a ``.pt2`` export, or ``module:factory``), with ``weights`` loaded.

    ``input_shape`` and ``num_classes`` are passed to a factory that takes them; ``what`` names
    the model in errors (``"teacher"``, ``"student_model"``).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{what} must be a model file or module:factory, got {spec!r}")
    if is_factory_spec(spec):
        model = _from_factory(spec, input_shape, num_classes, what)
    else:
        model = _from_file(Path(spec).expanduser(), what)
    if weights:
        state = load_weights(weights, f"{what} weights")
        target = model.program if isinstance(model, ExportedModel) else model
        try:
            target.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{what} weights {weights} do not fit {spec}: "
                             f"{' '.join(str(exc).split())[:400]}") from None
    return model


@torch.no_grad()
def check_fits(model: nn.Module, data: ClassificationData, what: str, spec: str) -> None:
    """Run ``model`` on one training example; raise naming both when it does not fit ``data``."""
    inputs, _ = get_batch(data.train, torch.tensor([0]))
    was_training = model.training
    model.eval()
    try:
        output = model(inputs)
    except Exception as exc:
        raise ValueError(
            f"{what} {spec} cannot run on the data {data.name}, whose inputs have shape {tuple(inputs.shape[1:])} "
            f"({len(data.train)} training examples, {data.num_classes} classes): {str(exc).splitlines()[0][:200]}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[0] != 1:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"{what} {spec} returned {shape} for one example of {data.name}; expected logits of "
                         f"shape (1, {data.num_classes})")
    if output.shape[1] != data.num_classes:
        names = f" ({', '.join(data.class_names[:10])}{', ...' if data.num_classes > 10 else ''})" \
            if data.class_names else ""
        raise ValueError(f"{what} {spec} outputs {output.shape[1]} classes, but the data {data.name} has "
                         f"{data.num_classes} classes{names}")


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's parameters and buffers (names, shapes, values), for cache keys."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()[:16]
