"""Classifier distillation: one training loop for offline, online and self-distillation.

Read :func:`train_classifier` top to bottom to see a whole run: a fixed shuffling
of the training set per epoch, a loss chosen by ``config.method``, an optimiser
step, a checkpoint now and then, and a validation pass per epoch. The loss of
every method is built from :mod:`divergent.methods` and :mod:`divergent.functional`;
this module only feeds them the tensors they need.

Methods (``config.method``) come from one registry, :mod:`divergent.methods.registry`
(``divergent.methods.available_methods()``; table, formulas and sources in
``docs/methods.md``): any registered divergence name is offline KD with it
(hard_weight · CE + soft_weight · T² · D(p_T ‖ q_T), frozen teacher); each method has a
kind — offline (frozen teacher), online (the teacher is trained too), self (no teacher)
or plain (the given model alone; ``mcmi-teacher`` fine-tunes it, so use it on a teacher
copy) — and an ``adapter`` that picks the objective class below feeding its loss. Methods
added with :func:`divergent.methods.register_method` train here too; an unknown name raises.

``config.params`` overrides any of the method's defaults (e.g. ``{"beta": 4.0}`` for DKD);
an unknown parameter raises when the config is built.

Reliability: the run folder holds ``checkpoint.pt`` (written atomically); calling
again with ``resume=True`` continues exactly where it stopped — the epoch's
shuffling depends only on (seed, epoch) and the RNG state is saved — so an
interrupted and resumed run ends with the same weights as an uninterrupted one.
Ctrl-C finishes the current step, saves and returns ``status="interrupted"``. A
non-finite loss raises :class:`NonFiniteLossError` naming the step and the method,
after saving the last good state.

Distributed: under ``torchrun`` (``torch.distributed`` initialised), each process
takes its share of every global batch of ``batch_size`` rows and gradients are
averaged with ``all_reduce``, so N processes follow the same trajectory as one
process (for models without batch-dependent layers such as BatchNorm, and for
losses that are means over rows — not the batch-wise Sinkhorn term).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from divergent.config import config_to_dict
from divergent.data.vision import ClassificationData, get_batch
from divergent.methods import get_method, kd as kd_method, mcmi as mcmi_method, nd as nd_method
from divergent.methods import ofa as ofa_method, registry as method_registry, self_kd
from divergent.methods.registry import MethodSpec
from divergent.models.classifiers import FeatureHook
from divergent.train.checkpoint import load_checkpoint, save_checkpoint
from divergent.train import distributed

__all__ = [
    "ClassifierTrainConfig",
    "TrainResult",
    "NonFiniteLossError",
    "train_classifier",
    "predict_logits",
    "METHODS",
    "method_kind",
]

CHECKPOINT_NAME = "checkpoint.pt"

class _MethodTable(Mapping):
    """Read-only view of the method registry: name -> (kind, default parameters).

    Derived from :mod:`divergent.methods.registry` on every access, so methods added with
    :func:`divergent.methods.register_method` appear here too.
    """

    def __getitem__(self, name: str) -> tuple[str, dict[str, Any]]:
        if name not in method_registry.available_methods():
            raise KeyError(name)
        spec = get_method(name)
        return spec.kind, dict(spec.defaults)

    def __iter__(self):
        return iter(method_registry.available_methods())

    def __len__(self) -> int:
        return len(method_registry.available_methods())


class _AliasTable(Mapping):
    """Read-only view of the registry's aliases: alias -> method name."""

    def __getitem__(self, alias: str) -> str:
        return method_registry.method_aliases()[alias]

    def __iter__(self):
        return iter(method_registry.method_aliases())

    def __len__(self) -> int:
        return len(method_registry.method_aliases())


METHODS: Mapping[str, tuple[str, dict[str, Any]]] = _MethodTable()
ALIASES: Mapping[str, str] = _AliasTable()
method_kind = method_registry.method_kind


@dataclass
class ClassifierTrainConfig:
    """Settings of one classifier training run.

    method: a registered divergence (offline KD with it) or a method name — see the module docs.
    params: overrides of the method's or divergence's parameters, e.g. ``{"alpha": 0.8, "beta": 0.3}``.
    temperature: T for divergence methods (both logits divided by T; the soft term is scaled by T²).
    hard_weight: weight of the cross-entropy on labels, for divergence methods.
    soft_weight: weight of T² · divergence, for divergence methods.
    epochs: passes over the training set.
    batch_size: rows per optimiser step (the global batch, whatever the number of processes).
    optimizer: ``"sgd"`` (with ``momentum``), ``"adam"`` or ``"adamw"``.
    lr: learning rate at the start.
    momentum: SGD momentum.
    weight_decay: L2 penalty (decoupled for adamw).
    lr_schedule: ``"cosine"`` (to 0 over the run, per step), ``"constant"``, or ``"multistep"``.
    lr_milestones: epochs at which ``"multistep"`` multiplies the learning rate by ``lr_decay``.
    lr_decay: factor of ``"multistep"``.
    seed: seeds shuffling, dropout and augmentation (the model is built by the caller).
    device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... or ``"auto"`` (CUDA when available).
    checkpoint_every: also save a checkpoint every this many steps (0: only at epoch ends).
    stop_after_steps: stop (saving a checkpoint) after this many steps in total; 0 = run to the end.
        Used to time-box a run and by the resume tests.
    eval_batch_size: rows per forward pass when evaluating.
    """

    method: str = "forward_kl"
    params: dict = field(default_factory=dict)
    temperature: float = 4.0
    hard_weight: float = 0.5
    soft_weight: float = 0.5
    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    lr_milestones: list[int] = field(default_factory=list)
    lr_decay: float = 0.1
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 0
    stop_after_steps: int = 0
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        if not isinstance(self.params, dict):
            raise TypeError(f"params must be a mapping, got {type(self.params).__name__}")
        get_method(self.method).resolve(self.params)  # unknown method or parameter: fail before training
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {self.optimizer!r}")
        if self.lr_schedule not in ("cosine", "constant", "multistep"):
            raise ValueError(f"lr_schedule must be 'cosine', 'constant' or 'multistep', got {self.lr_schedule!r}")


@dataclass
class TrainResult:
    """What a run returns: the trained model(s), per-epoch history and how the run ended.

    status: ``"finished"``, ``"interrupted"`` (Ctrl-C, saved) or ``"stopped"`` (``stop_after_steps``).
    history: one dict per finished epoch (``epoch``, ``train_loss``, ``val_accuracy``, ``val_nll``, ``lr``).
    seconds: training time summed over all sessions of the run (a resumed run adds up).
    """

    student: nn.Module
    teacher: nn.Module | None
    history: list[dict[str, float]]
    steps: int
    status: str
    seconds: float
    checkpoint: Path | None


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step, epoch and method."""


# ---------------------------------------------------------------------------------------------
# Objectives: one small class per method family. Each turns a batch into a scalar loss by
# calling divergent.methods / divergent.functional, and holds any extra trainable parts
# (projectors, weak heads) or per-sample state (PS-KD predictions) so that they are
# optimised and checkpointed with the models.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    inputs: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    epoch: int
    epochs: int
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    student_hook: FeatureHook | None
    teacher_hook: FeatureHook | None


class _Objective(nn.Module):
    needs_student_features = False
    needs_teacher_features = False

    def setup(self, student: nn.Module, teacher: nn.Module | None, data: ClassificationData, device: torch.device, config: ClassifierTrainConfig) -> None:
        """Build parts that depend on the models or data (called once, before any checkpoint is loaded)."""

    def loss(self, batch: _Batch) -> torch.Tensor:
        raise NotImplementedError

    def end_epoch(self) -> None:
        """Called after each epoch's last step."""


@torch.no_grad()
def _probe_stages(model: nn.Module, data: ClassificationData, device: torch.device) -> list[torch.Tensor]:
    """The stage outputs of ``model`` on two training examples (to size projector branches and heads)."""
    inputs, _ = get_batch(data.train, torch.arange(min(2, len(data.train))))
    was_training = model.training
    model.eval()
    with FeatureHook(model) as hook:
        model(inputs.to(device))
    model.train(was_training)
    return hook.stages


class _DivergenceKD(_Objective):
    """Adapter ``divergence``: hard_weight · CE + soft_weight · T² · D(p_T ‖ q_T), T and weights from the config."""

    def __init__(self, spec: MethodSpec, params: dict[str, Any], config: ClassifierTrainConfig):
        super().__init__()
        self.name, self.params = spec.name, params
        self.temperature, self.hard_weight, self.soft_weight = config.temperature, config.hard_weight, config.soft_weight

    def loss(self, batch: _Batch) -> torch.Tensor:
        return kd_method.divergence_kd_loss(
            self.name, batch.student_logits, batch.teacher_logits, batch.labels,
            temperature=self.temperature, hard_weight=self.hard_weight, soft_weight=self.soft_weight, **self.params,
        )


class _LogitMethod(_Objective):
    """Adapter ``logits``: fn(student_logits, teacher_logits, labels, **params[, epoch]).

    A tuple result (an online method: one loss per network) is summed: each loss reaches
    only its own network (the peer is detached), so one backward pass of the sum updates
    both exactly as two separate steps would.
    """

    def __init__(self, spec: MethodSpec, params: dict[str, Any], config: ClassifierTrainConfig):
        super().__init__()
        self.fn, self.params, self.takes_epoch = spec.fn, params, spec.takes_epoch

    def loss(self, batch: _Batch) -> torch.Tensor:
        extra = {"epoch": batch.epoch} if self.takes_epoch else {}
        value = self.fn(batch.student_logits, batch.teacher_logits, batch.labels, **extra, **self.params)
        return sum(value) if isinstance(value, (tuple, list)) else value


class _PlainCE(_Objective):
    """Adapter ``ce``."""

    def __init__(self, spec: MethodSpec, params: dict[str, Any], config: ClassifierTrainConfig):
        super().__init__()

    def loss(self, batch: _Batch) -> torch.Tensor:
        return F.cross_entropy(batch.student_logits, batch.labels)


class _MCMITeacher(_Objective):
    """Adapter ``mcmi-teacher``: fine-tunes the given model with CE − λ · KL(p(x) ‖ Q_y).

    ``centroids`` chooses Q: ``"once"`` — training-set class centroids of the model before
    fine-tuning, fixed (the official code); ``"epoch"`` — recomputed after every epoch from the
    current model, for the next one; ``"batch"`` — the batch estimate, gradients through Q.
    The centroids are a buffer, so a resumed run continues with the ones it saved.
    """

    CENTROIDS = ("once", "epoch", "batch")

    def __init__(self, spec: MethodSpec, params: dict[str, Any], config: ClassifierTrainConfig):
        super().__init__()
        params = dict(params)
        self.mode = params.pop("centroids")
        if self.mode not in self.CENTROIDS:
            raise ValueError(f"method 'mcmi-teacher': parameter centroids must be one of "
                             f"{', '.join(map(repr, self.CENTROIDS))}, got {self.mode!r}")
        self.fn, self.params = spec.fn, params
        self.register_buffer("centroids", torch.zeros(0))
        self._refresh: Callable[[], torch.Tensor] | None = None

    def setup(self, student, teacher, data, device, config):
        if self.mode == "batch":
            return

        def refresh() -> torch.Tensor:
            # Q_y over the whole training set with the current weights (no gradient).
            logits, labels = predict_logits(student, data.train, batch_size=config.eval_batch_size, device=device)
            return mcmi_method.class_centroids(logits, labels, data.num_classes).to(device)

        self._refresh = refresh  # a plain function: the model is not registered as a submodule
        self.centroids = refresh()

    def loss(self, batch: _Batch) -> torch.Tensor:
        centroids = self.centroids if self.mode != "batch" else None
        return self.fn(batch.student_logits, batch.labels, centroids=centroids, **self.params)

    def end_epoch(self) -> None:
        if self.mode == "epoch":
            self.centroids = self._refresh()


class _ND(_Objective):
    """Adapter ``nd``: Hinton KD + λ · ND on penultimate features; class centres from the teacher's training-set features."""

    needs_student_features = True
    needs_teacher_features = True

    def __init__(self, spec: MethodSpec, params: dict[str, Any], config: ClassifierTrainConfig):
        super().__init__()
        params = dict(params)
        self.nd_weight = params.pop("nd_weight")
        self.fn, self.kd_params = spec.fn, params
        self.projector: nn.Module = nn.Identity()
        self.register_buffer("centers", torch.zeros(0))

    def setup(self, student, teacher, data, device, config):
        student_dim = getattr(student, "feature_dim", None)
        teacher_dim = getattr(teacher, "feature_dim", None)
        if student_dim is None or teacher_dim is None:
            raise ValueError("method 'nd' needs models with a feature_dim attribute and a 'classifier' head (see divergent.models.classifiers)")
        if student_dim != teacher_dim:
            # KD++ projects the student's feature to the teacher's width with a linear layer.
            self.projector = nn.Linear(student_dim, teacher_dim).to(device)
        features, labels = _collect_features(teacher, data.train, device, config.eval_batch_size)
        self.centers = nd_method.teacher_class_centers(features, labels, data.num_classes).to(device)

    def loss(self, batch: _Batch) -> torch.Tensor:
        kd = kd_method.hinton_kd_loss(batch.student_logits, batch.teacher_logits, batch.labels, **self.kd_params)
        student_features = self.projector(batch.student_hook.features)
        nd = self.fn(student_features, batch.teacher_hook.features, batch.labels, self.centers)
        return kd + self.nd_weight * nd


class _OFA(_Objective):
    """Adapter ``ofa``: CE + weight · (OFA loss on the final logits + on one projector branch per intermediate stage)."""

    def __init__(self, spec: MethodSpec, params: dict[str, Any], config: ClassifierTrainConfig):
        super().__init__()
        params = dict(params)
        self.ofa_weight = params.pop("ofa_weight")
        self.use_branches = bool(params.pop("branches"))
        self.needs_student_features = self.use_branches
        self.fn, self.ofa_params = spec.fn, params
        self.branches = nn.ModuleList()

    def setup(self, student, teacher, data, device, config):
        if not self.use_branches:
            return
        stages = _probe_stages(student, data, device)
        # The last stage feeds the classifier already; branches go on the earlier ones.
        for stage in stages[:-1]:
            self.branches.append(ofa_method.OFABranch(stage.shape[1], data.num_classes, spatial=stage.ndim == 4).to(device))

    def loss(self, batch: _Batch) -> torch.Tensor:
        terms = [self.fn(batch.student_logits, batch.teacher_logits, batch.labels, **self.ofa_params)]
        if self.use_branches:
            for branch, stage in zip(self.branches, batch.student_hook.stages):
                terms.append(self.fn(branch(stage), batch.teacher_logits, batch.labels, **self.ofa_params))
        return F.cross_entropy(batch.student_logits, batch.labels) + self.ofa_weight * sum(terms)


class _PSKD(_Objective):
    """Adapter ``pskd``: keeps each training sample's softmax from the previous epoch (a buffer, so it is checkpointed)."""

    def __init__(self, spec: MethodSpec, params: dict[str, Any], config: ClassifierTrainConfig):
        super().__init__()
        self.fn, self.alpha_final = spec.fn, params["alpha_final"]
        self.register_buffer("previous", torch.zeros(0))
        self.register_buffer("current", torch.zeros(0))
        self.register_buffer("has_previous", torch.tensor(False))

    def setup(self, student, teacher, data, device, config):
        self.previous = torch.zeros(len(data.train), data.num_classes, device=device)
        self.current = torch.zeros_like(self.previous)

    def loss(self, batch: _Batch) -> torch.Tensor:
        self.current[batch.indices] = torch.softmax(batch.student_logits.detach().float(), dim=-1)
        previous = self.previous[batch.indices] if bool(self.has_previous) else None
        alpha_t = self_kd.pskd_alpha(batch.epoch, batch.epochs, self.alpha_final)
        return self.fn(batch.student_logits, batch.labels, previous, alpha_t)

    def end_epoch(self) -> None:
        if dist.is_available() and dist.is_initialized():
            # Each process recorded only its own rows (zeros elsewhere): the sum is the whole table.
            dist.all_reduce(self.current)
        self.previous, self.current = self.current, torch.zeros_like(self.current)
        self.has_previous.fill_(True)


class _USKD(_Objective):
    """Adapter ``uskd``: a weak head on the second-to-last stage's output (when the model has stages)."""

    needs_student_features = True

    def __init__(self, spec: MethodSpec, params: dict[str, Any], config: ClassifierTrainConfig):
        super().__init__()
        self.fn, self.params = spec.fn, params
        self.weak_head: nn.Module | None = None

    def setup(self, student, teacher, data, device, config):
        if len(getattr(student, "stage_names", [])) < 2:
            return  # no mid-level stage: ranks come from the model's own logits
        stages = _probe_stages(student, data, device)
        self.weak_head = self_kd.WeakHead(stages[-2].shape[1], data.num_classes).to(device)

    def loss(self, batch: _Batch) -> torch.Tensor:
        weak_logits = None
        if self.weak_head is not None:
            weak_logits = self.weak_head(batch.student_hook.stages[-2])
        return self.fn(batch.student_logits, batch.labels, weak_logits=weak_logits, **self.params)


# One objective class per registry adapter (divergent.methods.registry.ADAPTERS; a test checks both lists agree).
_OBJECTIVES: dict[str, type[_Objective]] = {
    "logits": _LogitMethod,
    "divergence": _DivergenceKD,
    "ce": _PlainCE,
    "nd": _ND,
    "ofa": _OFA,
    "mcmi-teacher": _MCMITeacher,
    "pskd": _PSKD,
    "uskd": _USKD,
}


def _build_objective(config: ClassifierTrainConfig) -> _Objective:
    """The objective of ``config.method``, dispatched on its registry adapter; unknown names raise."""
    spec = get_method(config.method)
    return _OBJECTIVES[spec.adapter](spec, spec.resolve(config.params), config)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available; use device='cpu'")
    return resolved


@torch.no_grad()
def predict_logits(model: nn.Module, dataset, *, batch_size: int = 1024, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, C)`` of ``model`` (in eval mode) on every example of ``dataset``, and the labels ``(N,)``."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    outputs, labels = [], []
    for start in range(0, len(dataset), batch_size):
        inputs, batch_labels = get_batch(dataset, torch.arange(start, min(start + batch_size, len(dataset))))
        outputs.append(model(inputs.to(device)).float().cpu())
        labels.append(batch_labels)
    model.train(was_training)
    return torch.cat(outputs), torch.cat(labels)


@torch.no_grad()
def _collect_features(model: nn.Module, dataset, device: torch.device, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    features, labels = [], []
    with FeatureHook(model) as hook:
        for start in range(0, len(dataset), batch_size):
            inputs, batch_labels = get_batch(dataset, torch.arange(start, min(start + batch_size, len(dataset))))
            # Evaluation without augmentation would be ideal; datasets with get_batch augment
            # only their training view, and class means are robust to it.
            model(inputs.to(device))
            features.append(hook.features.float().cpu())
            labels.append(batch_labels)
    model.train(was_training)
    return torch.cat(features), torch.cat(labels)


def _non_finite(loss: torch.Tensor, parameters: list[nn.Parameter]) -> str:
    """Why this step must not be taken ("" when loss and gradients are finite)."""
    if not torch.isfinite(loss):
        return f"loss is {loss.item()}"
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads and not torch.isfinite(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).all():
        return f"gradient is non-finite (loss {loss.item():.4g})"
    return ""


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The training order of epoch ``epoch``: a permutation that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)



def _make_optimizer(params: list[nn.Parameter], config: ClassifierTrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _lr_factor(config: ClassifierTrainConfig, step: int, steps_per_epoch: int) -> float:
    total = config.epochs * steps_per_epoch
    if config.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if config.lr_schedule == "multistep":
        epoch = step // steps_per_epoch
        return config.lr_decay ** sum(epoch >= m for m in config.lr_milestones)
    return 1.0


class _InterruptFlag:
    """Turns Ctrl-C into a flag checked between steps, so a step is never cut in half."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def __enter__(self) -> "_InterruptFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


def train_classifier(
    student: nn.Module,
    data: ClassificationData,
    config: ClassifierTrainConfig,
    *,
    teacher: nn.Module | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: Any = None,
    progress_task: Any = None,
) -> TrainResult:
    """Train ``student`` (and, for online methods, ``teacher``) on ``data`` with ``config.method``.

    ``student`` and ``teacher`` are any ``nn.Module`` mapping a batch of inputs to logits.
    Offline methods need ``teacher`` (frozen, used in eval mode); online methods train it
    (pass a fresh or pre-trained network); self and plain methods ignore it. Feature
    methods (``nd``, ``ofa`` branches, ``uskd``'s weak head) read features through
    :class:`~divergent.models.classifiers.FeatureHook` (a ``classifier`` head and
    ``stage_names``). With ``run_dir``, checkpoints go to ``run_dir/checkpoint.pt`` and
    ``resume=True`` continues from it. ``progress`` (a rich ``Progress``) and
    ``progress_task`` are advanced once per step.

    >>> from divergent.data.digits import load_digits_data
    >>> from divergent.models.classifiers import MLP
    >>> data = load_digits_data()
    >>> result = train_classifier(MLP((1, 8, 8), 10, hidden=(16,)), data, ClassifierTrainConfig(method="ce", epochs=2))
    >>> result.status, len(result.history)
    ('finished', 2)
    """
    kind = method_kind(config.method)
    device = _resolve_device(config.device)
    rank, world = distributed.rank(), distributed.world_size()
    if kind in ("offline", "online") and teacher is None:
        raise ValueError(f"method {config.method!r} needs a teacher model; pass teacher=...")
    if kind in ("self", "plain"):
        teacher = None

    student.to(device).train()
    if teacher is not None:
        teacher.to(device)
        teacher.train(kind == "online")
        for parameter in teacher.parameters():
            parameter.requires_grad_(kind == "online")
    torch.manual_seed(config.seed)  # objectives may create layers; a resumed run restores RNG below
    objective = _build_objective(config)
    objective.setup(student, teacher, data, device, config)
    objective.to(device)

    trainable = [student] + ([teacher] if kind == "online" else []) + [objective]
    parameters = [p for module in trainable for p in module.parameters() if p.requires_grad]
    optimizer = _make_optimizer(parameters, config)
    n_train = len(data.train)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    # A frozen teacher in eval mode on un-augmented data gives every example the same logits
    # in every epoch: compute them once instead of once per step.
    fixed_teacher_logits = None
    if kind == "offline" and not objective.needs_teacher_features and isinstance(data.train, TensorDataset):
        fixed_teacher_logits = predict_logits(teacher, data.train, batch_size=config.eval_batch_size, device=device)[0].to(device)

    # Processes start from identical weights (same seed), but make it explicit.
    if world > 1:
        for module in trainable:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    state = {"epoch": 0, "batch": 0, "step": 0, "history": [], "seconds": 0.0, "loss_sum": 0.0, "loss_count": 0}
    checkpoint_path = Path(run_dir) / CHECKPOINT_NAME if run_dir is not None else None

    def save(status: str) -> None:
        if checkpoint_path is None or rank != 0:
            return
        save_checkpoint(checkpoint_path, {
            "student": student.state_dict(),
            "teacher": teacher.state_dict() if kind == "online" else None,
            "objective": objective.state_dict(),
            "optimizer": optimizer.state_dict(),
            "state": dict(state),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            "config": config_to_dict(config),
            "status": status,
        })

    if resume and checkpoint_path is not None and checkpoint_path.is_file():
        saved = load_checkpoint(checkpoint_path, map_location=device)
        if saved["config"]["method"] != config.method:
            raise ValueError(f"checkpoint {checkpoint_path} is for method {saved['config']['method']!r}, not {config.method!r}")
        student.load_state_dict(saved["student"])
        if kind == "online":
            teacher.load_state_dict(saved["teacher"])
        objective.load_state_dict(saved["objective"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update(saved["state"])
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])

    status = "finished"
    started = time.perf_counter()
    with _InterruptFlag() as interrupt:
        while state["epoch"] < config.epochs and status == "finished":
            epoch = state["epoch"]
            order = _epoch_order(config.seed, epoch, n_train)
            while state["batch"] < steps_per_epoch:
                global_rows = order[state["batch"] * config.batch_size:(state["batch"] + 1) * config.batch_size]
                local_rows = global_rows[rank::world]  # this process's share of the global batch
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * _lr_factor(config, state["step"], steps_per_epoch)

                inputs, labels = get_batch(data.train, local_rows)
                inputs, labels = inputs.to(device), labels.to(device)
                student_hook = FeatureHook(student) if objective.needs_student_features else None
                teacher_hook = FeatureHook(teacher) if objective.needs_teacher_features else None
                try:
                    student_logits = student(inputs)
                    teacher_logits = None
                    if teacher is not None:
                        if kind == "online":
                            teacher_logits = teacher(inputs)
                        elif fixed_teacher_logits is not None:
                            teacher_logits = fixed_teacher_logits[local_rows.to(device)]
                        else:
                            with torch.no_grad():
                                teacher_logits = teacher(inputs)
                    if not torch.isfinite(student_logits).all():
                        # Caught here, before a divergence rejects the NaN input deep inside the loss.
                        loss = student_logits.new_tensor(float("nan"))
                    else:
                        loss = objective.loss(_Batch(inputs, labels, local_rows.to(device), epoch, config.epochs,
                                                     student_logits, teacher_logits, student_hook, teacher_hook))
                finally:
                    for hook in (student_hook, teacher_hook):
                        if hook is not None:
                            hook.remove()

                optimizer.zero_grad(set_to_none=True)
                loss_ok = torch.isfinite(loss.detach()).float().reshape(1)
                if world > 1:
                    # Every process must agree, or the gradient all_reduce below would wait forever.
                    dist.all_reduce(loss_ok, op=dist.ReduceOp.MIN)
                if loss_ok.item() == 1.0:
                    # Scale so that averaging gradients over processes gives the mean over the global batch.
                    (loss * (len(local_rows) * world / len(global_rows))).backward()
                    if world > 1:
                        for p in parameters:
                            if p.grad is None:
                                p.grad = torch.zeros_like(p)
                            dist.all_reduce(p.grad)
                            p.grad /= world
                problem = _non_finite(loss, parameters) if loss_ok.item() == 1.0 else (
                    f"loss is {loss.item()}" if not torch.isfinite(loss) else "loss is non-finite on another process")
                if problem:
                    # The weights are still those before this step. Keep them as the last good
                    # checkpoint unless they are already broken (then the previous file stays).
                    if all(torch.isfinite(p).all() for p in parameters):
                        save("failed")
                    where = f"; last good checkpoint: {checkpoint_path}" if checkpoint_path and checkpoint_path.is_file() else ""
                    raise NonFiniteLossError(
                        f"{problem} at step {state['step'] + 1} (epoch {epoch + 1}) with method "
                        f"{config.method!r}; stopped without taking the step{where}"
                    )
                optimizer.step()

                state["batch"] += 1
                state["step"] += 1
                state["loss_sum"] += loss.item()
                state["loss_count"] += 1
                if progress is not None and progress_task is not None:
                    progress.advance(progress_task)
                if config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
                    state["seconds"] += time.perf_counter() - started
                    started = time.perf_counter()
                    save("running")
                if interrupt.raised or (config.stop_after_steps and state["step"] >= config.stop_after_steps):
                    status = "interrupted" if interrupt.raised else "stopped"
                    break
            if status != "finished":
                break

            objective.end_epoch()
            val_logits, val_labels = predict_logits(student, data.val, batch_size=config.eval_batch_size, device=device)
            state["history"].append({
                "epoch": epoch + 1,
                "train_loss": state["loss_sum"] / max(state["loss_count"], 1),
                "val_accuracy": (val_logits.argmax(-1) == val_labels).float().mean().item(),
                "val_nll": F.cross_entropy(val_logits, val_labels).item(),
                "lr": optimizer.param_groups[0]["lr"],
            })
            state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_count=0)
            state["seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            save("running" if state["epoch"] < config.epochs else "finished")

    state["seconds"] += time.perf_counter() - started
    if status != "finished":
        save(status)
    student.eval()
    if teacher is not None:
        teacher.eval()
    return TrainResult(student, teacher, state["history"], state["step"], status, state["seconds"], checkpoint_path)

