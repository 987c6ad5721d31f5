"""Small reference classifiers and the feature hook that methods needing features use.

Every model here maps inputs to logits and follows one convention that the
feature-based methods (ND loss, USKD's weak head, OFA branches) rely on:

- ``model.classifier`` is the final ``nn.Linear``; the tensor entering it is the
  model's *penultimate feature* (``model.feature_dim`` wide);
- ``model.stage_names`` names the submodules whose outputs are the intermediate
  stages, shallow to deep (used for OFA projector branches and USKD's weak head).

Any other ``nn.Module`` that returns logits works as teacher or student; to use a
feature method with it, name its final layer with ``FeatureHook(model, "head")``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN", "FeatureHook", "build_model", "MODEL_NAMES"]


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU`` for each hidden width, then a linear classifier.

    >>> MLP((1, 8, 8), 10, hidden=(32,))(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128,), dropout: float = 0.0):
        super().__init__()
        if not hidden:
            raise ValueError("hidden must list at least one width, got an empty sequence")
        in_features = 1
        for size in input_shape:
            in_features *= int(size)
        layers: list[nn.Module] = [nn.Flatten()]
        self.stage_names = []
        width = in_features
        for i, out in enumerate(hidden):
            block = nn.Sequential(nn.Linear(width, out), nn.ReLU())
            if dropout > 0:
                block.append(nn.Dropout(dropout))
            layers.append(block)
            self.stage_names.append(f"body.{i + 1}")
            width = out
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


class SmallCNN(nn.Module):
    """Two or more ``conv3x3 -> BatchNorm -> ReLU`` stages (each doubling the width and, after
    the first, halving the resolution), global average pooling, then a linear classifier.

    >>> SmallCNN(1, 10, width=8)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, num_stages: int = 2):
        super().__init__()
        stages = []
        channels = in_channels
        for i in range(num_stages):
            out = width * 2**i
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(),
                )
            )
            channels = out
        self.stages = nn.Sequential(*stages)
        self.stage_names = [f"stages.{i}" for i in range(num_stages)]
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)
        self.feature_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.stages(x)))


class FeatureHook:
    """Records a model's penultimate features and stage outputs during its forward pass.

    ``head`` names the final linear layer (default ``"classifier"``); the tensor
    entering it is recorded as ``hook.features``. ``stages`` names submodules whose
    outputs are recorded in ``hook.stages`` (a list, in the given order); by default
    the model's ``stage_names`` when it has them. Use as a context manager, or call
    :meth:`remove` when done.

    >>> model = MLP((4,), 3, hidden=(5, 6))
    >>> with FeatureHook(model) as hook:
    ...     logits = model(torch.zeros(2, 4))
    >>> hook.features.shape, [s.shape[1] for s in hook.stages]
    (torch.Size([2, 6]), [5, 6])
    """

    def __init__(self, model: nn.Module, head: str = "classifier", stages: Sequence[str] | None = None):
        modules = dict(model.named_modules())
        if head not in modules:
            raise ValueError(
                f"head {head!r} is not a submodule of {type(model).__name__}; pass the name of its final "
                f"linear layer, one of: {', '.join(n for n, m in modules.items() if isinstance(m, nn.Linear))}"
            )
        stage_names = list(stages) if stages is not None else list(getattr(model, "stage_names", []))
        missing = [name for name in stage_names if name not in modules]
        if missing:
            raise ValueError(f"stages {missing} are not submodules of {type(model).__name__}")
        self.features: torch.Tensor | None = None
        self._stage_outputs: dict[int, torch.Tensor] = {}
        self._handles = [modules[head].register_forward_pre_hook(self._record_features)]
        for position, name in enumerate(stage_names):
            self._handles.append(modules[name].register_forward_hook(self._stage_recorder(position)))
        self._num_stages = len(stage_names)

    def _record_features(self, module, args):
        self.features = args[0]

    def _stage_recorder(self, position: int):
        def record(module, args, output):
            self._stage_outputs[position] = output

        return record

    @property
    def stages(self) -> list[torch.Tensor]:
        return [self._stage_outputs[i] for i in range(self._num_stages) if i in self._stage_outputs]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "FeatureHook":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _parse_widths(spec: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in spec.split("x") if w)
    except ValueError:
        raise ValueError(f"MLP widths must look like 'mlp-128' or 'mlp-256x128', got {spec!r}") from None


MODEL_NAMES = ("mlp-<widths>", "cnn-<width>", "resnet8x4", "resnet32x4", "resnet20", "resnet56", "resnet8", "resnet14", "resnet32", "resnet110")


def build_model(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """A shipped model by name: ``mlp-128``, ``mlp-256x128`` (hidden widths), ``cnn-16``
    (base width), or a CIFAR ResNet (``resnet8x4``, ``resnet32x4``, ``resnet20``, ``resnet56``, ...).

    >>> type(build_model("mlp-64x32", (1, 8, 8), 10)).__name__
    'MLP'
    """
    from divergent.models import resnet_cifar

    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    if name.startswith("mlp-"):
        return MLP(input_shape, num_classes, hidden=_parse_widths(name[4:]))
    if name.startswith("cnn-"):
        try:
            width = int(name[4:])
        except ValueError:
            raise ValueError(f"CNN name must look like 'cnn-16', got {name!r}") from None
        return SmallCNN(int(input_shape[0]), num_classes, width=width)
    if name in resnet_cifar.RESNETS:
        return resnet_cifar.RESNETS[name](num_classes=num_classes, in_channels=int(input_shape[0]))
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
