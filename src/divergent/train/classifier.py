"""Classifier distillation: one training loop for offline, online and self-distillation.

Read :meth:`ClassifierTrainer.step` top to bottom to see a whole step: a fixed shuffling
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

Reliability: :class:`ClassifierTrainer` is a steppable trainer on the shared run layer,
:func:`divergent.train.run.drive`: with a run folder, checksummed atomic checkpoints
``run_dir/checkpoints/step_N.ckpt`` are written at every epoch end (and every
``checkpoint_every`` steps), loaded without unpickling code; ``resume=True`` continues from
the newest — the epoch's shuffling depends only on (seed, epoch) and the RNG state,
objective state (PS-KD predictions, MCMI centroids, projectors) and history are saved — so an
interrupted and resumed run ends with the same weights and history as an uninterrupted one.
Ctrl-C finishes the current step, saves and returns ``status="interrupted"``. A non-finite
loss or gradient raises :class:`NonFiniteLossError` (the run layer's) naming the step, the
epoch, the method and the last good checkpoint, without taking the step. A run folder of an
older version (``checkpoint.pt``) is refused with an error saying to delete it.

Distributed: under ``torchrun`` (``torch.distributed`` initialised), each process
takes its share of every global batch of ``batch_size`` rows and gradients are
averaged with ``all_reduce``, so N processes follow the same trajectory as one
process (for models without batch-dependent layers such as BatchNorm, and for
losses that are means over rows — not the batch-wise Sinkhorn term).
"""

from __future__ import annotations

import math
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
from divergent.train import distributed
from divergent.train.run import Checkpointer, NonFiniteLossError, RunInterrupted, current_interrupt, drive

__all__ = [
    "ClassifierTrainConfig",
    "TrainResult",
    "NonFiniteLossError",
    "ClassifierTrainer",
    "train_classifier",
    "predict_logits",
    "METHODS",
    "method_kind",
    "needs_teacher_features",
]

CHECKPOINT_FOLDER = "checkpoints"  # run_dir/checkpoints/step_N.ckpt

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
    checkpoint_every: also save a checkpoint every this many steps (0: only at epoch ends, which are always saved).
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
    checkpoint: the newest checkpoint file (``run_dir/checkpoints/step_N.ckpt``), None without a run folder.
    """

    student: nn.Module
    teacher: nn.Module | None
    history: list[dict[str, float]]
    steps: int
    status: str
    seconds: float
    checkpoint: Path | None


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


def needs_teacher_features(method: str, params: dict | None = None) -> bool:
    """Whether ``method`` reads the teacher's penultimate features (through a FeatureHook on the teacher)."""
    return _build_objective(ClassifierTrainConfig(method=method, params=dict(params or {}))).needs_teacher_features


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


# ---------------------------------------------------------------------------------------------
# The trainer: one optimisation step at a time, on the shared run layer
# ---------------------------------------------------------------------------------------------


class ClassifierTrainer:
    """Train ``student`` (and, for online methods, ``teacher``) on ``data`` with ``config.method``, one step at a time.

    A steppable trainer for :func:`divergent.train.run.drive` (Ctrl-C between steps,
    checksummed checkpoints, resume): ``step_index``, ``total_steps`` (epochs × steps per
    epoch), :meth:`step`, :meth:`state_dict`, :meth:`load_state_dict`. The step that ends an
    epoch also runs ``objective.end_epoch()`` and the validation pass, so an epoch-end
    checkpoint holds the state after both. :func:`train_classifier` builds one and drives it.
    """

    def __init__(self, student: nn.Module, data: ClassificationData, config: ClassifierTrainConfig, *,
                 teacher: nn.Module | None = None) -> None:
        self.kind = kind = method_kind(config.method)
        self.config, self.data = config, data
        self.device = device = _resolve_device(config.device)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if kind in ("offline", "online") and teacher is None:
            raise ValueError(f"method {config.method!r} needs a teacher model; pass teacher=...")
        if kind in ("self", "plain"):
            teacher = None
        self.student, self.teacher = student.to(device).train(), teacher
        if teacher is not None:
            teacher.to(device)
            teacher.train(kind == "online")
            for parameter in teacher.parameters():
                parameter.requires_grad_(kind == "online")
        torch.manual_seed(config.seed)  # objectives may create layers; a resumed run restores the RNG state
        # setup() runs before any checkpoint is loaded: it builds the parts (projectors, buffers)
        # whose saved values load_state_dict then puts back.
        self.objective = objective = _build_objective(config)
        objective.setup(student, teacher, data, device, config)
        objective.to(device)

        self.trainable = [student] + ([teacher] if kind == "online" else []) + [objective]
        self.parameters = [p for module in self.trainable for p in module.parameters() if p.requires_grad]
        self.optimizer = _make_optimizer(self.parameters, config)
        self.n_train = len(data.train)
        self.steps_per_epoch = math.ceil(self.n_train / config.batch_size)
        # A frozen teacher in eval mode on un-augmented data gives every example the same logits
        # in every epoch: compute them once instead of once per step.
        self.fixed_teacher_logits = None
        if kind == "offline" and not objective.needs_teacher_features and isinstance(data.train, TensorDataset):
            self.fixed_teacher_logits = predict_logits(teacher, data.train, batch_size=config.eval_batch_size,
                                                       device=device)[0].to(device)
        # Processes start from identical weights (same seed), but make it explicit.
        if self.world > 1:
            for module in self.trainable:
                for tensor in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(tensor.data, src=0)

        self.step_index = 0
        self.total_steps = config.epochs * self.steps_per_epoch
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self._loss_sum, self._loss_count = 0.0, 0
        self._order: tuple[int, torch.Tensor] | None = None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, _epoch_order(self.config.seed, epoch, self.n_train))
        return self._order[1]

    def step(self) -> dict[str, Any]:
        """One optimiser step on the next batch; at an epoch's last batch also end_epoch() and validation."""
        config, device, kind, objective = self.config, self.device, self.kind, self.objective
        student, teacher = self.student, self.teacher
        began = time.perf_counter()
        epoch, batch_index = divmod(self.step_index, self.steps_per_epoch)
        global_rows = self._epoch_order(epoch)[batch_index * config.batch_size:(batch_index + 1) * config.batch_size]
        local_rows = global_rows[self.rank::self.world]  # this process's share of the global batch
        lr = config.lr * _lr_factor(config, self.step_index, self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        inputs, labels = get_batch(self.data.train, local_rows)
        inputs, labels = inputs.to(device), labels.to(device)
        student_hook = FeatureHook(student) if objective.needs_student_features else None
        teacher_hook = FeatureHook(teacher) if objective.needs_teacher_features else None
        try:
            student_logits = student(inputs)
            teacher_logits = None
            if teacher is not None:
                if kind == "online":
                    teacher_logits = teacher(inputs)
                elif self.fixed_teacher_logits is not None:
                    teacher_logits = self.fixed_teacher_logits[local_rows.to(device)]
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

        self.optimizer.zero_grad(set_to_none=True)
        loss_ok = torch.isfinite(loss.detach()).float().reshape(1)
        if self.world > 1:
            # Every process must agree, or the gradient all_reduce below would wait forever.
            loss_ok = loss_ok.to(distributed.collective_device())
            dist.all_reduce(loss_ok, op=dist.ReduceOp.MIN)
        if loss_ok.item() == 1.0:
            # Scale so that averaging gradients over processes gives the mean over the global batch.
            (loss * (len(local_rows) * self.world / len(global_rows))).backward()
            if self.world > 1:
                for p in self.parameters:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        problem = _non_finite(loss, self.parameters) if loss_ok.item() == 1.0 else (
            f"loss is {loss.item()}" if not torch.isfinite(loss) else "loss is non-finite on another process")
        if problem:
            raise NonFiniteLossError(f"{problem} at step {self.step_index + 1} (epoch {epoch + 1}) with method "
                                     f"{config.method!r}; stopped without taking the step")
        self.optimizer.step()

        self.step_index += 1
        self._loss_sum += loss.item()
        self._loss_count += 1
        record: dict[str, Any] = {"step": self.step_index, "epoch": epoch + 1, "loss": loss.item(), "lr": lr}
        if batch_index + 1 == self.steps_per_epoch:
            objective.end_epoch()
            val_logits, val_labels = predict_logits(student, self.data.val, batch_size=config.eval_batch_size, device=device)
            self.history.append({
                "epoch": epoch + 1,
                "train_loss": self._loss_sum / max(self._loss_count, 1),
                "val_accuracy": (val_logits.argmax(-1) == val_labels).float().mean().item(),
                "val_nll": F.cross_entropy(val_logits, val_labels).item(),
                "lr": self.optimizer.param_groups[0]["lr"],
            })
            self._loss_sum, self._loss_count = 0.0, 0
            record.update(epoch_end=True, **{k: v for k, v in self.history[-1].items() if k != "epoch"})
        self.train_seconds += time.perf_counter() - began
        return record

    # -- state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: weights, objective state (PS-KD predictions, centroids,
        projectors), optimiser, counters, history and RNG states — tensors and plain values only."""
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict() if self.kind == "online" else None,
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_index,
            "history": [dict(h) for h in self.history],
            "train_seconds": self.train_seconds,
            "loss_sum": self._loss_sum,
            "loss_count": self._loss_count,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "config": config_to_dict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("config", {})
        for key in _RESUME_KEYS:
            if key in saved and saved[key] != getattr(self.config, key):
                raise ValueError(
                    f"the checkpoint was written with {key}={saved[key]!r}, this run has {key}="
                    f"{getattr(self.config, key)!r}; resume with the run's own settings or start a new run folder"
                )
        self.student.load_state_dict(state["student"])
        if self.kind == "online":
            self.teacher.load_state_dict(state["teacher"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_index = int(state["step"])
        self.history = [dict(h) for h in state["history"]]
        self.train_seconds = float(state["train_seconds"])
        self._loss_sum, self._loss_count = float(state["loss_sum"]), int(state["loss_count"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])


# The settings that make a checkpoint another run's: resuming with a different one raises.
_RESUME_KEYS = ("method", "epochs", "batch_size", "seed")


def _refuse_old_layout(run_dir: Path) -> None:
    """A run folder of divergent before the shared run layer holds ``checkpoint.pt``: refuse it, never ignore it."""
    old = run_dir / "checkpoint.pt"
    if old.is_file() and not (run_dir / CHECKPOINT_FOLDER).is_dir():
        raise ValueError(
            f"{old} is a checkpoint of an older divergent version (before checkpoints/step_N.ckpt); it cannot be "
            f"resumed: delete {old} to train this run again from the start, or use another run folder"
        )


# ---------------------------------------------------------------------------------------------
# The whole run
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
    ``stage_names``). With ``run_dir``, checkpoints go to ``run_dir/checkpoints/step_N.ckpt``
    (at every epoch end, and every ``config.checkpoint_every`` steps) and ``resume=True``
    continues from the newest. ``progress`` (a rich ``Progress``) and ``progress_task`` are
    advanced once per step.

    Ctrl-C (or SIGTERM) finishes the step, saves and returns ``status="interrupted"``; a
    non-finite loss or gradient raises :class:`NonFiniteLossError` without taking the step.

    >>> from divergent.data.digits import load_digits_data
    >>> from divergent.models.classifiers import MLP
    >>> data = load_digits_data()
    >>> result = train_classifier(MLP((1, 8, 8), 10, hidden=(16,)), data, ClassifierTrainConfig(method="ce", epochs=2))
    >>> result.status, len(result.history)
    ('finished', 2)
    """
    checkpointer = None
    if run_dir is not None:
        run_dir = Path(run_dir)
        if resume:
            _refuse_old_layout(run_dir)
        checkpointer = Checkpointer(run_dir / CHECKPOINT_FOLDER)
    trainer = ClassifierTrainer(student, data, config, teacher=teacher)
    stopped_by_limit = False

    def on_step(record: dict[str, Any]) -> None:
        nonlocal stopped_by_limit
        if progress is not None and progress_task is not None:
            progress.advance(progress_task)
        step = trainer.step_index
        if (checkpointer is not None and config.checkpoint_every and record.get("epoch_end")
                and step % config.checkpoint_every and step < trainer.total_steps):
            checkpointer.save(step, trainer.state_dict())  # epoch ends are saved too, between the regular saves
        if config.stop_after_steps and step >= config.stop_after_steps:
            stopped_by_limit = True
            current_interrupt().request()

    status = "finished"
    try:
        drive(trainer, checkpointer=checkpointer, checkpoint_every=config.checkpoint_every or trainer.steps_per_epoch,
              resume=resume, on_step=on_step, map_location=trainer.device)
    except RunInterrupted:
        status = "stopped" if stopped_by_limit else "interrupted"
    student.eval()
    if trainer.teacher is not None:
        trainer.teacher.eval()
    return TrainResult(student, trainer.teacher, trainer.history, trainer.step_index, status, trainer.train_seconds,
                       checkpointer.latest() if checkpointer is not None else None)
