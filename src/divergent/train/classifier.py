"""Classifier distillation: one training loop for offline, online and self-distillation.

Read :func:`train_classifier` top to bottom to see a whole run: a fixed shuffling
of the training set per epoch, a loss chosen by ``config.method``, an optimiser
step, a checkpoint now and then, and a validation pass per epoch. The loss of
every method is built from :mod:`divergent.methods` and :mod:`divergent.functional`;
this module only feeds them the tensors they need.

Methods (``config.method``):

=================== ======================================================================
a divergence name   offline KD: hard_weight · CE + soft_weight · T² · D(p_T ‖ q_T), frozen teacher
``ce``              the student alone on hard labels (the no-teacher baseline)
``hinton``          Hinton KD (T = 4, CE 0.1, KD 0.9)
``dkd``             Decoupled KD (α = 1, β = 8, T = 4, warm-up 20 epochs)
``nkd``             Normalized KD (T = 3, γ = 3.5)
``abkd``            CE + α-β divergence (α = 0.8, β = 0.3, total weight 32)
``sinkd``           CE + KD + Sinkhorn (``sinkhorn-with-KD`` is an alias)
``nd``              CE + KD + KD++'s ND loss on penultimate features (needs a feature hook)
``ofa``             CE + OFA's target-enhanced loss on the logits and on projector branches
``mcmi-teacher``    fine-tunes the *given model* with CE − λ·CMI (use on a teacher copy)
``dml``             online: teacher and student trained together, each toward the other
``bdkd-online``     online: BD-KD student loss, teacher toward the student
``pskd``            self-KD on the model's own previous-epoch predictions
``uskd``            self-KD with customised soft labels and a weak mid-level head
=================== ======================================================================

``config.params`` overrides any default above (e.g. ``{"beta": 4.0}`` for DKD).

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

import inspect
import math
import signal
import threading
import time
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
from divergent.functional import available, get_spec
from divergent.methods import dkd as dkd_method
from divergent.methods import kd as kd_method
from divergent.methods import mcmi as mcmi_method
from divergent.methods import nd as nd_method
from divergent.methods import nkd as nkd_method
from divergent.methods import ofa as ofa_method
from divergent.methods import online as online_method
from divergent.methods import self_kd
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

# Method name -> (kind, default parameters). Kinds: "offline" (frozen teacher), "online"
# (teacher trained too), "self" (no teacher), "plain" (hard labels only).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ce": ("plain", {}),
    "hinton": ("offline", {"temperature": 4.0, "hard_weight": 0.1, "soft_weight": 0.9}),
    "dkd": ("offline", {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20}),
    "nkd": ("offline", {"temperature": 3.0, "gamma": 3.5}),
    "abkd": ("offline", {"alpha": 0.8, "beta": 0.3, "temperature": 4.0, "hard_weight": 1.0, "soft_weight": 2.0}),
    "sinkd": ("offline", {"kd_weight": 0.9, "sinkhorn_weight": 0.8, "temperature": 2.0, "epsilon": 0.1, "n_iters": 20}),
    "nd": ("offline", {"temperature": 4.0, "hard_weight": 0.1, "soft_weight": 0.9, "nd_weight": 1.0}),
    "ofa": ("offline", {"epsilon": 1.0, "temperature": 1.0, "ofa_weight": 1.0, "branches": True}),
    "mcmi-teacher": ("plain", {"weight": 0.15}),
    "dml": ("online", {"temperature": 1.0}),
    "bdkd-online": ("online", {"temperature": 1.0, "high_weight": 3.0, "low_weight": 1.0, "teacher_divergence": "forward_kl", "teacher_weight": 1.0}),
    "pskd": ("self", {"alpha_final": 0.8}),
    "uskd": ("self", {"alpha": 1.0, "beta": 0.1, "mu": 0.005, "ce_weight": 1.0}),
}
ALIASES = {"sinkhorn-with-KD": "sinkd", "sinkhorn-with-kd": "sinkd", "kd": "hinton"}


def method_kind(method: str) -> str:
    """``"offline"``, ``"online"``, ``"self"`` or ``"plain"`` for a method or divergence name."""
    method = ALIASES.get(method, method)
    if method in METHODS:
        return METHODS[method][0]
    if method in available():
        return "offline"
    raise ValueError(
        f"unknown method {method!r}; valid: a divergence ({', '.join(available())}) "
        f"or a method ({', '.join([*METHODS, *ALIASES])})"
    )


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
        method_kind(self.method)
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
        if not isinstance(self.params, dict):
            raise TypeError(f"params must be a mapping, got {type(self.params).__name__}")


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


def _call_with_known(fn: Callable, *args, **kwargs):
    """Call ``fn`` with only the keyword arguments its signature accepts (extras are an error)."""
    accepted = inspect.signature(fn).parameters
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {fn.__name__}; valid: {[k for k in accepted if k not in ('student_logits', 'teacher_logits', 'labels', 'logits')]}")
    return fn(*args, **kwargs)


class _DivergenceKD(_Objective):
    def __init__(self, name: str, config: ClassifierTrainConfig):
        super().__init__()
        valid = [param.name for param in get_spec(name).params]
        unknown = [k for k in config.params if k not in valid]
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for divergence {name!r}; valid: {valid}")
        self.name, self.params = name, dict(config.params)
        self.temperature, self.hard_weight, self.soft_weight = config.temperature, config.hard_weight, config.soft_weight

    def loss(self, batch: _Batch) -> torch.Tensor:
        return kd_method.divergence_kd_loss(
            self.name, batch.student_logits, batch.teacher_logits, batch.labels,
            temperature=self.temperature, hard_weight=self.hard_weight, soft_weight=self.soft_weight, **self.params,
        )


class _LogitMethod(_Objective):
    """Methods that need only the two logits and the labels (and DKD the epoch)."""

    FUNCTIONS = {
        "hinton": kd_method.hinton_kd_loss,
        "dkd": dkd_method.dkd_loss,
        "nkd": nkd_method.nkd_loss,
        "abkd": kd_method.abkd_loss,
        "sinkd": kd_method.sinkd_loss,
    }

    def __init__(self, method: str, params: dict[str, Any]):
        super().__init__()
        self.fn = self.FUNCTIONS[method]
        self.params = params
        self.takes_epoch = "epoch" in inspect.signature(self.fn).parameters

    def loss(self, batch: _Batch) -> torch.Tensor:
        extra = {"epoch": batch.epoch} if self.takes_epoch else {}
        return _call_with_known(self.fn, batch.student_logits, batch.teacher_logits, batch.labels, **extra, **self.params)


class _PlainCE(_Objective):
    def loss(self, batch: _Batch) -> torch.Tensor:
        return F.cross_entropy(batch.student_logits, batch.labels)


class _MCMITeacher(_Objective):
    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def loss(self, batch: _Batch) -> torch.Tensor:
        return mcmi_method.mcmi_teacher_loss(batch.student_logits, batch.labels, weight=self.weight)


class _ND(_Objective):
    """CE + KD + λ · ND on penultimate features; class centres from the teacher's training-set features."""

    needs_student_features = True
    needs_teacher_features = True

    def __init__(self, params: dict[str, Any]):
        super().__init__()
        params = dict(params)
        self.nd_weight = params.pop("nd_weight")
        self.kd_params = params
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
        kd = _call_with_known(kd_method.hinton_kd_loss, batch.student_logits, batch.teacher_logits, batch.labels, **self.kd_params)
        student_features = self.projector(batch.student_hook.features)
        nd = nd_method.nd_loss(student_features, batch.teacher_hook.features, batch.labels, self.centers)
        return kd + self.nd_weight * nd


class _OFA(_Objective):
    """CE + weight · (OFA loss on the final logits + on one projector branch per intermediate stage)."""

    def __init__(self, params: dict[str, Any]):
        super().__init__()
        params = dict(params)
        self.ofa_weight = params.pop("ofa_weight")
        self.use_branches = bool(params.pop("branches"))
        self.needs_student_features = self.use_branches
        self.ofa_params = params
        self.branches = nn.ModuleList()

    def setup(self, student, teacher, data, device, config):
        if not self.use_branches:
            return
        stages = _probe_stages(student, data, device)
        # The last stage feeds the classifier already; branches go on the earlier ones.
        for stage in stages[:-1]:
            self.branches.append(ofa_method.OFABranch(stage.shape[1], data.num_classes, spatial=stage.ndim == 4).to(device))

    def loss(self, batch: _Batch) -> torch.Tensor:
        terms = [ofa_method.ofa_loss(batch.student_logits, batch.teacher_logits, batch.labels, **self.ofa_params)]
        if self.use_branches:
            for branch, stage in zip(self.branches, batch.student_hook.stages):
                terms.append(ofa_method.ofa_loss(branch(stage), batch.teacher_logits, batch.labels, **self.ofa_params))
        return F.cross_entropy(batch.student_logits, batch.labels) + self.ofa_weight * sum(terms)


class _Online(_Objective):
    def __init__(self, method: str, params: dict[str, Any]):
        super().__init__()
        self.fn = online_method.dml_losses if method == "dml" else online_method.bdkd_online_losses
        self.params = params

    def loss(self, batch: _Batch) -> torch.Tensor:
        # Each loss reaches only its own network (the peer is detached), so one backward
        # pass of the sum updates both exactly as two separate steps would.
        student_loss, teacher_loss = _call_with_known(self.fn, batch.student_logits, batch.teacher_logits, batch.labels, **self.params)
        return student_loss + teacher_loss


class _PSKD(_Objective):
    """Keeps each training sample's softmax from the previous epoch (a buffer, so it is checkpointed)."""

    def __init__(self, params: dict[str, Any]):
        super().__init__()
        self.alpha_final = params["alpha_final"]
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
        return self_kd.pskd_loss(batch.student_logits, batch.labels, previous, alpha_t)

    def end_epoch(self) -> None:
        if dist.is_available() and dist.is_initialized():
            # Each process recorded only its own rows (zeros elsewhere): the sum is the whole table.
            dist.all_reduce(self.current)
        self.previous, self.current = self.current, torch.zeros_like(self.current)
        self.has_previous.fill_(True)


class _USKD(_Objective):
    """USKD with a weak head on the second-to-last stage's output (when the model has stages)."""

    needs_student_features = True

    def __init__(self, params: dict[str, Any]):
        super().__init__()
        self.params = params
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
        return _call_with_known(self_kd.uskd_loss, batch.student_logits, batch.labels, weak_logits=weak_logits, **self.params)


def _build_objective(config: ClassifierTrainConfig) -> _Objective:
    method = ALIASES.get(config.method, config.method)
    if method not in METHODS:
        return _DivergenceKD(method, config)
    kind, defaults = METHODS[method]
    unknown = [k for k in config.params if k not in defaults]
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for method {method!r}; valid: {list(defaults)}")
    params = {**defaults, **config.params}
    if method == "ce":
        return _PlainCE()
    if method == "mcmi-teacher":
        return _MCMITeacher(params["weight"])
    if method in _LogitMethod.FUNCTIONS:
        return _LogitMethod(method, params)
    if method == "nd":
        return _ND(params)
    if method == "ofa":
        return _OFA(params)
    if method in ("dml", "bdkd-online"):
        return _Online(method, params)
    if method == "pskd":
        return _PSKD(params)
    return _USKD(params)


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

