"""``divergent compare``: which divergence should I distil my classifier with?

One run trains (or loads from the cache) a teacher, then for every seed a
student from scratch on hard labels and one student per divergence or method,
all on the same data split, labelled examples and seeds (on the embedded digits the
students see 10% of the labels, the teacher all of them: ``labelled_fraction``). It
reports test accuracy, ECE, NLL, Brier score, agreement with the teacher and training
seconds, a paired comparison of every row with the student alone and with a baseline
(``forward_kl`` by default) — the per-seed differences are averaged and a difference is
marked only when its mean exceeds both its spread across seeds and one test example, so
neither seed noise nor a single example is read as a win — and a verdict: the best row
by mean test accuracy, its paired gains, and the rows indistinguishable from it.

The run folder holds ``config.yaml``, ``results.csv`` (one row per run),
``summary.csv``, ``results.json`` (everything), ``report.md`` and PNG figures;
each training run checkpoints under ``runs/<entry>/seed<k>/`` so
``divergent compare --resume RUN_DIR`` continues an interrupted comparison.

Python API::

    from divergent.experiments.compare import CompareConfig, run_compare
    summary = run_compare(CompareConfig(seeds=[0, 1], epochs=10))
"""

from __future__ import annotations

import dataclasses
import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, TensorDataset
from rich.console import Console

from divergent.train.distributed import init_distributed_from_env, rank
from divergent.experiments import report, verdict
from divergent.config import config_to_dict, load_run_config, save_config
from divergent.io import atomic_write_text, CorruptFileError, read_json
from divergent.train.run import RunInterrupted
from divergent.data.vision import ClassificationData, get_batch, stratified_split
from divergent.metrics.classification import classification_metrics, reliability_bins
from divergent.experiments.plots import plot_accuracy_vs_ece, plot_reliability, plot_training_curves
from divergent.models.classifiers import build_model
from divergent.methods import get_method
from divergent.models.user_models import check_fits, is_factory_spec, load_user_model, model_fingerprint, model_source
from divergent.train.checkpoint import load_checkpoint, save_checkpoint
from divergent.train.classifier import (
    CHECKPOINT_FOLDER,
    ClassifierTrainConfig,
    NonFiniteLossError,
    method_kind,
    needs_teacher_features,
    predict_logits,
    train_classifier,
)

__all__ = ["CompareConfig", "CompareInterrupted", "run_compare", "load_dataset", "get_teacher", "student_data", "DEFAULT_ENTRIES", "NO_TEACHER"]

DEFAULT_ENTRIES = ["forward_kl", "reverse_kl", "js", "tvd", "skew_kl", "alpha_beta", "bdkd", "sinkhorn-with-KD"]
NO_TEACHER = "student alone (CE)"
DEFAULT_BASELINE = "forward_kl"  # when it is a row and no baseline is named
# Bump when a change makes cached teachers incompatible (e.g. a different data pipeline).
# 2: the key holds a fingerprint of the data and the MCMI teacher's resolved parameters (centroid mode).
_CACHE_VERSION = 2


@dataclass
class CompareConfig:
    """Settings of one comparison (``divergent compare``; every key can be set in YAML or on the command line).

    dataset: ``"digits"`` (bundled with scikit-learn), ``"cifar10"`` or ``"cifar100"`` (read from ``data_dir``).
    data_dir: folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/`` (CIFAR only; nothing is downloaded).
    data: your own data instead of ``dataset``: a ``.npz`` file (``X``, ``y``; optional ``X_test``/``y_test`` or a
        ``split`` array), a ``.csv`` file (with ``label_column``) or a folder with one sub-folder of images per
        class (ImageFolder layout); see :mod:`divergent.data.user_data` and docs/compare.md.
    label_column: the label column of a ``.csv`` ``data`` file; every other column is a numeric feature.
    image_size: side of the square images an ImageFolder ``data`` folder is resized to (0: its most common size).
    normalize: standardise ``data``'s features / normalise its image channels with training-split statistics;
        false feeds the values as read (features as stored, images in [0, 1]) — for a teacher trained on those.
    teacher: your own trained teacher, used frozen as given instead of training ``teacher_model``: a TorchScript
        file (``torch.jit.save``), a ``torch.export`` file (``.pt2``) or ``module:factory`` (with ``teacher_weights``).
    teacher_weights: a state_dict (``torch.save``, read with ``weights_only=True``, or ``.safetensors``) loaded
        into ``teacher``.
    divergences: the rows to compare: registered divergences (offline KD with each) or method names
        (``hinton``, ``dkd``, ``nkd``, ``abkd``, ``sinkhorn-with-KD``, ``nd``, ``ofa``, ``mcmi``,
        ``dml``, ``bdkd-online``, ``pskd``, ``uskd``).
    methods: more rows, appended after ``divergences`` (same names accepted; kept separate so a
        config can list divergences and methods apart).
    baseline: the row every other row is compared with, seed by seed. Left empty (the default):
        ``forward_kl`` when it is a row, else the first row (``-d weighted_sq`` alone is then its own
        baseline, and the comparison that counts is the one with the student alone). A baseline
        that is named must be one of the rows.
    include_student_alone: add the student trained on hard labels only (no teacher).
    seeds: training seeds; every row runs on every seed, on the same data split.
    split_seed: seed of the stratified train/val/test split (digits) or train/val split (CIFAR).
    teacher_model: teacher architecture (``cnn-32``, ``mlp-256x128``, ``resnet32x4``, ...).
    student_model: student architecture (``mlp-32``, ``resnet8x4``, ...).
    teacher_epochs: epochs of teacher training (the teacher is cached and reused).
    teacher_lr: teacher learning rate.
    teacher_seed: seed of the teacher's initialisation and training.
    epochs: epochs of every student run.
    batch_size: rows per step (students and teacher).
    optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (students and teacher).
    lr: student learning rate.
    weight_decay: students' and teacher's weight decay.
    lr_schedule: ``"cosine"``, ``"constant"`` or ``"multistep"``.
    lr_milestones: epochs where ``"multistep"`` multiplies the learning rate by 0.1.
    temperature: T of the divergence rows (methods use their papers' own T unless set in method_params).
    hard_weight: CE weight of the divergence rows.
    soft_weight: weight of T² · divergence in the divergence rows.
    divergence_params: per-divergence parameters, e.g. ``{"alpha_beta": {"alpha": 0.8, "beta": 0.3}}``.
    method_params: per-method overrides of the paper defaults, e.g. ``{"dkd": {"warmup_epochs": 5}}``.
    mcmi_epochs: epochs of MCMI fine-tuning of a copy of the teacher, at a tenth of ``teacher_lr`` (row ``mcmi``; cached).
    mcmi_weight: λ of the MCMI objective.
    output_dir: where the run folder is created.
    device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    num_threads: CPU threads for torch (0 = torch's default). Small models run fastest on 1.
    checkpoint_every: also checkpoint every this many steps inside a run (0 = at epoch ends).
    labelled_fraction: share of the training split whose labels the students see (stratified by class,
        fixed by ``split_seed``); every student row — the student alone and each divergence or method —
        trains on that labelled subset, while the teacher was trained on the whole training split.
        Unset (``null``): 0.1 on the embedded digits — the default regime, where a teacher has
        something to add (docs/compare.md) — and 1.0 (every label) on CIFAR and on your own ``data``.
        ``1.0`` on digits gives the earlier default (with ``epochs: 30``).
    """

    dataset: str = "digits"
    data_dir: str = ""
    data: str = ""
    label_column: str = ""
    image_size: int = 0
    normalize: bool = True
    teacher: str = ""
    teacher_weights: str = ""
    divergences: list[str] = field(default_factory=lambda: list(DEFAULT_ENTRIES))
    methods: list[str] = field(default_factory=list)
    baseline: str = ""
    include_student_alone: bool = True
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    split_seed: int = 0
    teacher_model: str = "cnn-32"
    student_model: str = "mlp-32"
    teacher_epochs: int = 30
    teacher_lr: float = 3e-3
    teacher_seed: int = 0
    epochs: int = 100
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-2
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    lr_milestones: list[int] = field(default_factory=list)
    temperature: float = 2.0
    hard_weight: float = 0.5
    soft_weight: float = 0.5
    divergence_params: dict = field(default_factory=dict)
    method_params: dict = field(default_factory=dict)
    mcmi_epochs: int = 5
    mcmi_weight: float = 0.15
    output_dir: str = "runs"
    device: str = "cpu"
    num_threads: int = 1
    checkpoint_every: int = 0
    labelled_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.dataset not in ("digits", "cifar10", "cifar100"):
            raise ValueError(f"dataset must be 'digits', 'cifar10' or 'cifar100', got {self.dataset!r}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed, got an empty list")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        entries = self.entries()
        if not entries:
            raise ValueError("divergences and methods are both empty: nothing to compare")
        if len(set(entries)) != len(entries):
            raise ValueError(f"a row is listed twice in divergences + methods: {entries}")
        for entry in entries:
            _entry_method(entry)  # raises, listing the valid names
        if not self.baseline:
            self.baseline = DEFAULT_BASELINE if DEFAULT_BASELINE in entries else entries[0]
        if self.baseline not in entries:
            raise ValueError(f"baseline {self.baseline!r} must be one of the compared rows: {entries}")
        _check_data_and_teacher(self)
        for name in ("epochs", "teacher_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available; use device 'cpu' or 'auto'")
        if self.labelled_fraction is not None and not 0.0 < self.labelled_fraction <= 1.0:
            raise ValueError(f"labelled_fraction must be in (0, 1], got {self.labelled_fraction}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")

    def students_labelled_fraction(self) -> float:
        """``labelled_fraction`` as used: when unset, 0.1 on the embedded digits and 1.0 on any other data."""
        if self.labelled_fraction is not None:
            return self.labelled_fraction
        return 0.1 if self.dataset == "digits" and not self.data else 1.0

    def entries(self) -> list[str]:
        """All compared rows, in order (without the student-alone row)."""
        return list(self.divergences) + list(self.methods)


class CompareInterrupted(RunInterrupted):
    """Ctrl-C during a comparison; everything finished so far is saved. ``run_dir`` tells where."""

    def __init__(self, run_dir: Path, message: str | None = None):
        super().__init__(0, None, message or f"interrupted; everything finished is saved; resume with: divergent compare --resume {run_dir}")
        self.run_dir = run_dir


def _entry_method(entry: str) -> str:
    """The trainer method of a row (``mcmi`` is KD from an MCMI-fine-tuned teacher)."""
    if entry == "mcmi":
        return "hinton"
    method_kind(entry)
    return entry


def _check_data_and_teacher(config: CompareConfig) -> None:
    """Settings of the data and teacher that contradict each other (checked when the config is built)."""
    if config.data and config.dataset != "digits":
        raise ValueError(f"give either dataset ({config.dataset!r}) or data ({config.data!r}), not both")
    if config.data_dir and (config.data or config.dataset == "digits"):
        raise ValueError(f"data_dir {config.data_dir!r} is read only for dataset cifar10 or cifar100 (dataset is "
                         f"{config.dataset!r}); for your own files give their path with --data")
    if config.label_column and not config.data:
        raise ValueError(f"label_column {config.label_column!r} is read only with data (--data FILE.csv)")
    if config.image_size < 0:
        raise ValueError(f"image_size must be >= 0 (0: the most common size), got {config.image_size}")
    if config.teacher_weights and not config.teacher:
        raise ValueError("teacher_weights (--teacher-weights) needs teacher (--teacher module:factory or a model file)")
    if not config.teacher:
        return
    source = model_source(config.teacher)
    for entry in config.entries():
        method = _entry_method(entry)
        if source != "factory" and method_kind(method) == "online":
            raise ValueError(
                f"row {entry!r} trains a fresh teacher network alongside the student; a teacher given as a file "
                f"({config.teacher}) has no code to build a fresh one: give --teacher module:factory, or drop the row")
        if source != "factory" and needs_teacher_features(method, _row_params(config, entry)):
            raise ValueError(
                f"row {entry!r} reads the teacher's penultimate features through hooks, which a "
                f"{'TorchScript' if source == 'torchscript' else 'torch.export'} teacher ({config.teacher}) does not "
                f"support: give --teacher module:factory (a model with a 'classifier' head), or drop the row")
        if source == "export" and entry == "mcmi":
            raise ValueError(f"row 'mcmi' fine-tunes a copy of the teacher; a torch.export file ({config.teacher}) is "
                             f"an inference graph: give a TorchScript file or module:factory, or drop the row")


def data_name(config: CompareConfig) -> str:
    """What the run is on: the dataset name, or the file/folder name of the user's data."""
    return Path(config.data).name if config.data else config.dataset


def load_dataset(config: CompareConfig) -> ClassificationData:
    """The dataset a comparison runs on (digits embedded; CIFAR from ``config.data_dir``; the user's ``config.data``)."""
    if config.data_dir and not Path(config.data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"data_dir {config.data_dir} does not exist or is not a folder; expected the folder "
                                f"holding cifar-10-batches-py/ or cifar-100-python/")
    if config.data:
        from divergent.data.user_data import load_user_data

        return load_user_data(config.data, label_column=config.label_column, split_seed=config.split_seed,
                              image_size=config.image_size, normalize=config.normalize)
    if config.dataset == "digits":
        from divergent.data.digits import load_digits_data

        return load_digits_data(split_seed=config.split_seed)
    from divergent.data.vision import load_cifar

    if not config.data_dir:
        raise ValueError(f"dataset {config.dataset!r} is read from disk: set data_dir (--data-dir) to the folder holding it")
    return load_cifar(config.data_dir, config.dataset, split_seed=config.split_seed)


def model_name(name: str, data: ClassificationData) -> str:
    """The built-in architecture ``name`` for ``data``: on feature vectors a ``cnn-<w>`` becomes ``mlp-<8w>x<4w>``.

    A convolutional network needs images; on feature vectors (``input_shape`` of length 1)
    the small CNN of width w is replaced by the MLP of hidden widths 8w and 4w (``cnn-32`` →
    ``mlp-256x128``), so that the default teacher works on any data. A ResNet on feature
    vectors is an error.
    """
    if len(data.input_shape) != 1 or is_factory_spec(name):
        return name
    if name.startswith("cnn-") and name[4:].isdigit():
        width = int(name[4:])
        return f"mlp-{8 * width}x{4 * width}"
    if not name.startswith("mlp-"):
        raise ValueError(f"model {name!r} needs images, but the data {data.name} are feature vectors of width "
                         f"{data.input_shape[0]}; use an MLP (e.g. mlp-256x128) or module:factory")
    return name


def _build(name: str, data: ClassificationData, what: str) -> torch.nn.Module:
    """A fresh model for ``data``: a built-in name (see :func:`model_name`) or ``module:factory``."""
    if is_factory_spec(name):
        model = load_user_model(name, input_shape=data.input_shape, num_classes=data.num_classes, what=what)
        check_fits(model, data, what, name)
        return model
    if Path(name).expanduser().is_file():
        raise ValueError(f"{what} {name!r} is a file; a {what.split('_')[0]} is built fresh: give a built-in name "
                         f"(mlp-32, cnn-16, resnet8x4, ...) or module:factory")
    return build_model(model_name(name, data), data.input_shape, data.num_classes)


def _user_teacher(config: CompareConfig, data: ClassificationData, console: Console) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The user's teacher, frozen as given; its test metrics computed here."""
    teacher = load_user_model(config.teacher, input_shape=data.input_shape, num_classes=data.num_classes,
                              weights=config.teacher_weights or None, what="teacher")
    check_fits(teacher, data, "teacher", config.teacher)
    device = "cuda" if config.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if config.device == "auto" else config.device)
    teacher.to(device).eval()
    logits, labels = predict_logits(teacher, data.test, device=device)
    info = {"name": config.teacher, "source": model_source(config.teacher), "weights": config.teacher_weights,
            "test": classification_metrics(logits, labels), "seconds": 0.0, "cached": False, "path": config.teacher}
    console.print(f"teacher {config.teacher}: given (frozen), test accuracy {info['test']['accuracy']:.4f}")
    return teacher, info


def _labels_of(dataset) -> torch.Tensor:
    """Every label of a dataset, without loading (or augmenting) its inputs where the dataset allows."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    for attribute in ("labels", "targets"):
        if hasattr(dataset, attribute):
            return torch.as_tensor(getattr(dataset, attribute))
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])


class _Rows(Dataset):
    """The rows ``indices`` of a dataset; batches come from the dataset's own ``get_batch`` (augmentation kept)."""

    def __init__(self, dataset, indices: torch.Tensor):
        self.dataset, self.indices = dataset, indices
        self.labels = _labels_of(dataset)[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[int(self.indices[index])]

    def get_batch(self, indices: torch.Tensor):
        return get_batch(self.dataset, self.indices[indices])


def student_data(config: CompareConfig, data: ClassificationData) -> ClassificationData:
    """The data the students train on: ``data`` with its training split cut to the labelled subset.

    A stratified ``labelled_fraction`` of the training split, fixed by ``split_seed`` (every
    class keeps at least one example); validation and test splits are unchanged.
    """
    fraction = config.students_labelled_fraction()
    if fraction >= 1.0:
        return data
    labels = _labels_of(data.train)
    kept, _ = stratified_split(labels.numpy(), [fraction, 1.0 - fraction], seed=config.split_seed)
    missing = sorted(set(labels.tolist()) - set(labels[torch.from_numpy(kept)].tolist()))
    if missing:
        raise ValueError(f"labelled_fraction {fraction} leaves no labelled training example of class(es) {missing} "
                         f"(the training split has {len(labels)} examples); raise labelled_fraction")
    kept = torch.from_numpy(kept)
    if isinstance(data.train, TensorDataset):
        train = TensorDataset(*(t[kept] for t in data.train.tensors))
    else:
        train = _Rows(data.train, kept)
    return dataclasses.replace(data, train=train)


def _hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _teacher_settings(config: CompareConfig, data: ClassificationData) -> dict[str, Any]:
    return {
        "version": _CACHE_VERSION, "dataset": data_name(config), "data": data.fingerprint or config.dataset,
        "split_seed": config.split_seed, "model": model_name(config.teacher_model, data), "epochs": config.teacher_epochs,
        "lr": config.teacher_lr, "seed": config.teacher_seed, "batch_size": config.batch_size, "optimizer": config.optimizer,
        "weight_decay": config.weight_decay, "lr_schedule": config.lr_schedule, "lr_milestones": list(config.lr_milestones),
    }


def _mcmi_params(config: CompareConfig) -> dict[str, Any]:
    """The MCMI fine-tuning's parameters, every default resolved (centroid mode included): part of the cache key."""
    params = {"weight": config.mcmi_weight, **config.method_params.get("mcmi-teacher", {})}
    return get_method("mcmi-teacher").resolve(params)


def get_teacher(
    config: CompareConfig, data: ClassificationData, *, console: Console | None = None, mcmi: bool = False
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The teacher for these settings: the user's (``config.teacher``), or trained and cached.

    A trained teacher's cache key is a hash of everything that determines it (a fingerprint
    of the data, split, architecture, epochs, optimiser settings, seed); the file lives under
    ``divergent.experiments.report.cache_dir()/teachers/`` and is loaded after checking its
    checksum, never unpickled (a damaged file is an error naming it). With ``mcmi=True``, a copy
    of the teacher (the user's too) fine-tuned with the MCMI objective, cached under a key that
    also holds the user teacher's weights and the MCMI parameters (``method_params['mcmi-teacher']``,
    e.g. ``centroids``). Returns the model (eval mode) and its info dict.
    """
    console = console or Console()
    if config.teacher and not mcmi:
        return _user_teacher(config, data, console)
    base = None
    settings = _teacher_settings(config, data)
    if config.teacher:
        base, _ = _user_teacher(config, data, console)
        settings = {**settings, "model": f"user:{model_fingerprint(base)}", "epochs": 0}
    if mcmi:
        settings = {**settings, "mcmi_epochs": config.mcmi_epochs, "mcmi_params": _mcmi_params(config)}
    key = _hash(settings)
    folder = report.cache_dir() / "teachers"
    stem = "user-teacher" if config.teacher else settings["model"]
    path = folder / f"{stem}-{key}{'-mcmi' if mcmi else ''}.pt"
    teacher = copy.deepcopy(base) if base is not None else build_model(settings["model"], data.input_shape, data.num_classes)
    if path.is_file():
        try:
            saved = load_checkpoint(path)
        except CorruptFileError as exc:
            raise CorruptFileError(f"cached teacher {path} is damaged and was not loaded ({exc}); delete {path} "
                                   f"and run again to retrain the teacher") from None
        teacher.load_state_dict(saved["model"])
        teacher.eval()
        console.print(f"teacher{' (MCMI)' if mcmi else ''}: loaded from cache {path}")
        return teacher, {**saved["info"], "cached": True, "path": str(path)}

    work_dir = folder / f"{path.stem}-work"
    if mcmi:
        if base is None:
            base, _ = get_teacher(config, data, console=console)
        teacher.load_state_dict(base.state_dict())
        train_config = ClassifierTrainConfig(
            method="mcmi-teacher", params=_mcmi_params(config), epochs=config.mcmi_epochs,
            batch_size=config.batch_size, optimizer=config.optimizer, lr=config.teacher_lr / 10,
            weight_decay=config.weight_decay, lr_schedule=config.lr_schedule, lr_milestones=config.lr_milestones,
            seed=config.teacher_seed, device=config.device,
        )
    else:
        torch.manual_seed(config.teacher_seed)
        teacher = build_model(settings["model"], data.input_shape, data.num_classes)
        train_config = ClassifierTrainConfig(
            method="ce", epochs=config.teacher_epochs, batch_size=config.batch_size, optimizer=config.optimizer,
            lr=config.teacher_lr, weight_decay=config.weight_decay, lr_schedule=config.lr_schedule,
            lr_milestones=config.lr_milestones, seed=config.teacher_seed, device=config.device,
        )
    label = "MCMI teacher" if mcmi else f"teacher {settings['model']}"
    steps = train_config.epochs * -(-len(data.train) // train_config.batch_size)
    with report.progress(console=console, transient=True) as bar:
        task = bar.add_task(f"training {label}", total=steps)
        result = train_classifier(teacher, data, train_config, run_dir=work_dir, resume=True, progress=bar, progress_task=task)
    if result.status != "finished":
        raise CompareInterrupted(work_dir, f"interrupted while training the {label}; run the same command again: "
                                           f"it continues from the checkpoint in {work_dir}")
    logits, labels = predict_logits(result.student, data.test, device=config.device)
    info = {"name": config.teacher or settings["model"], "settings": settings,
            "test": classification_metrics(logits, labels), "seconds": result.seconds}
    if dist.is_available() and dist.is_initialized():
        # BatchNorm running statistics are per process: every process uses the first one's teacher.
        for tensor in result.student.state_dict().values():
            dist.broadcast(tensor, src=0)
    if rank() == 0:
        save_checkpoint(path, {"model": result.student.state_dict(), "info": info})
        shutil.rmtree(work_dir, ignore_errors=True)  # the teacher is cached; its training checkpoints are not needed
    console.print(f"{label}: trained in {result.seconds:.1f}s, test accuracy {info['test']['accuracy']:.4f}; cached at {path}")
    return result.student.eval(), {**info, "cached": False, "path": str(path)}


def _row_params(config: CompareConfig, entry: str) -> dict[str, Any]:
    """The parameters a row's method gets: ``divergence_params`` or ``method_params`` of the row (or its method)."""
    method = _entry_method(entry)
    if method in config.divergence_params or entry in config.divergence_params:
        return dict(config.divergence_params.get(entry, config.divergence_params.get(method, {})))
    return dict(config.method_params.get(entry, config.method_params.get(method, {})))


def _train_config(config: CompareConfig, entry: str, seed: int) -> ClassifierTrainConfig:
    method = _entry_method(entry)
    params = _row_params(config, entry)
    return ClassifierTrainConfig(
        method=method, params=params, temperature=config.temperature, hard_weight=config.hard_weight,
        soft_weight=config.soft_weight, epochs=config.epochs, batch_size=config.batch_size,
        optimizer=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
        lr_schedule=config.lr_schedule, lr_milestones=config.lr_milestones, seed=seed, device=config.device,
        checkpoint_every=config.checkpoint_every,
    )


def _config_hash(config: CompareConfig) -> str:
    """What the per-run results of a run folder depend on (not where the folder lives or how many threads)."""
    settings = {k: v for k, v in config_to_dict(config).items() if k not in ("output_dir", "num_threads", "device")}
    return _hash(settings)


def _slug(name: str) -> str:
    """A folder name for a row: ``student alone (CE)`` -> ``student-alone-CE``."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-")


def _run_one(
    config: CompareConfig, entry: str, seed: int, data: ClassificationData, teachers: dict[str, torch.nn.Module],
    teacher_test_logits: torch.Tensor, run_dir: Path, bar, console: Console,
) -> dict[str, Any]:
    folder = run_dir / "runs" / _slug(entry) / f"seed{seed}"
    done = folder / "result.json"
    if done.is_file():
        saved = read_json(done, "per-run result file")
        if saved.get("config_hash") != _config_hash(config):
            raise ValueError(
                f"{done} was written by a run with other settings than {run_dir / 'config.yaml'}; "
                f"a run folder holds one comparison — start a new run instead of resuming this one"
            )
        return saved
    method = NO_TEACHER if entry == NO_TEACHER else entry
    train_config = _train_config(config, "ce" if entry == NO_TEACHER else entry, seed)
    kind = method_kind(train_config.method)
    torch.manual_seed(seed)
    student = _build(config.student_model, data, "student_model")
    if kind == "online":
        # Online methods train a fresh teacher network alongside the student (the user's factory, untrained).
        torch.manual_seed(10_000 + seed)
        teacher = _build(config.teacher or config.teacher_model, data, "teacher")
    else:
        teacher = teachers["mcmi" if entry == "mcmi" else "base"]
    steps = train_config.epochs * -(-len(data.train) // train_config.batch_size)
    task = bar.add_task(f"{method} · seed {seed}", total=steps)
    row: dict[str, Any] = {"name": method, "seed": seed, "method": train_config.method, "kind": kind,
                           "config_hash": _config_hash(config)}
    try:
        result = train_classifier(student, data, train_config, teacher=teacher, run_dir=folder, resume=True, progress=bar, progress_task=task)
    except NonFiniteLossError as exc:
        console.print(f"[red]{method} seed {seed}: {exc}[/red]")
        row.update(status="failed", error=str(exc))
        if rank() == 0:
            report.write_json(row, done)
        return row
    finally:
        bar.remove_task(task)
    if result.status != "finished":
        raise CompareInterrupted(run_dir)
    logits, labels = predict_logits(result.student, data.test, device=config.device)
    row.update(status="finished", seconds=result.seconds, steps=result.steps,
               **classification_metrics(logits, labels, teacher_test_logits))
    row["reliability"] = reliability_bins(logits, labels)
    row["history"] = result.history
    if rank() == 0:
        report.write_json(row, done)
        shutil.rmtree(folder / CHECKPOINT_FOLDER, ignore_errors=True)  # the result is kept; the weights are not needed
    return row


def _metrics(n_test: int) -> tuple[verdict.Metric, verdict.Metric]:
    """Test accuracy and ECE as compared (resolution: one test example, 1/n_test, for both)."""
    return (verdict.Metric("accuracy", "test accuracy", resolution=1 / n_test, digits=4, short="accuracy"),
            verdict.Metric("ece", "ECE", higher_is_better=False, resolution=1 / n_test, digits=3))


def _references(config: CompareConfig) -> dict[str, str]:
    return {"": config.baseline, **({"_alone": NO_TEACHER} if config.include_student_alone else {})}


def _summarise(config: CompareConfig, rows: list[dict[str, Any]], n_test: int) -> list[dict[str, Any]]:
    """One entry per row: mean and std over seeds, and paired differences to the baseline and the student alone.

    ``{metric}_diff``/``_diff_std``/``_significant`` compare with the baseline, the same keys ending in
    ``_alone`` with the student alone, for accuracy and ECE, by the rule of :mod:`divergent.experiments.verdict`
    (marked only when |mean| exceeds both the std of the per-seed differences and one test example, 1/n_test;
    with one seed a std is ``None`` and nothing is marked).
    """
    names = ([NO_TEACHER] if config.include_student_alone else []) + config.entries()
    return verdict.summarise(rows, names, _metrics(n_test), _references(config),
                             described=("accuracy", "nll", "ece", "brier", "agreement", "seconds"))


def _verdict(config: CompareConfig, summary: list[dict[str, Any]], rows: list[dict[str, Any]], n_test: int) -> dict[str, Any]:
    """What to use: the row of best mean test accuracy, its paired gains (accuracy, ECE), and the rows indistinguishable from it."""
    accuracy, ece = _metrics(n_test)
    return verdict.verdict(summary, rows, accuracy, secondary=[ece], baseline=config.baseline,
                           alone=NO_TEACHER if config.include_student_alone else None)


def _table_rows(config: CompareConfig, summary: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The printed and reported table; the first column is "row" (divergences and methods alike)."""
    accuracy, ece = _metrics(1)  # the marks are in the summary already; here only digits and direction are read
    rows = []
    for entry in summary:
        row = {
            "row": entry["name"],
            "test accuracy": verdict.mean_std_cell(entry, "accuracy"),
            "ECE": verdict.mean_std_cell(entry, "ece", 3),
            "NLL": verdict.mean_std_cell(entry, "nll", 3),
            "agreement": verdict.mean_std_cell(entry, "agreement", 3),
            "seconds": verdict.mean_std_cell(entry, "seconds", 1),
        }
        if config.include_student_alone:
            row["Δacc vs student alone"] = verdict.difference_column(entry, accuracy, "_alone", NO_TEACHER)
            row["ΔECE vs student alone"] = verdict.difference_column(entry, ece, "_alone", NO_TEACHER)
        row[f"Δacc vs {config.baseline}"] = verdict.difference_column(entry, accuracy, "", config.baseline)
        row[f"ΔECE vs {config.baseline}"] = verdict.difference_column(entry, ece, "", config.baseline)
        rows.append(row)
    return rows


def _teacher_row(label: str, teacher_info: dict) -> dict[str, str]:
    """The teacher's own test metrics, as the table's first row (one model: no ± and no differences)."""
    test = teacher_info["test"]
    return {"row": label, "test accuracy": f"{test['accuracy']:.4f}", "ECE": f"{test['ece']:.3f}",
            "NLL": f"{test['nll']:.3f}", "agreement": "1.000",
            "seconds": "given" if teacher_info.get("source") else "cached" if teacher_info.get("cached")
            else f"{teacher_info.get('seconds', 0.0):.1f}"}


def _table_note(config: CompareConfig, n_test: int, single_seed: bool) -> str:
    return verdict.table_note(single_seed, f"one test example (1/{n_test} = {1 / n_test:.4f})",
                              extra="Lower ECE is better. ")


def _regime_text(config: CompareConfig, teacher_info: dict, summary: list[dict[str, Any]], n_train: int, n_labelled: int) -> str:
    """The "Why this regime" paragraph of report.md, with this run's numbers."""
    steps = config.epochs * -(-n_labelled // config.batch_size)
    fraction = config.students_labelled_fraction()
    if fraction >= 1.0:
        return (f"The students see every label of the {n_train} training examples, as the teacher did "
                f"(`labelled_fraction: {fraction}`), and train {config.epochs} epochs ({steps} steps of {config.batch_size}).")
    alone = next((e for e in summary if e["name"] == NO_TEACHER and e["runs"]), None)
    distilled = [e for e in summary if e["name"] != NO_TEACHER and e["runs"]]
    numbers = f"In this run the teacher reaches {teacher_info['test']['accuracy']:.4f} test accuracy"
    if alone is not None:
        numbers += f", the student alone {alone['accuracy_mean']:.4f}"
    if distilled:
        low = min(e["accuracy_mean"] for e in distilled)
        high = max(e["accuracy_mean"] for e in distilled)
        numbers += f", the distilled rows {low:.4f}–{high:.4f}"
    teacher = "the teacher is the one given (`teacher`)" if config.teacher else f"the teacher was trained on all {n_train}"
    return (
        f"The students see the labels of {n_labelled} of the {n_train} training examples "
        f"(`labelled_fraction: {fraction}`, stratified by class, fixed by split seed "
        f"{config.split_seed}); {teacher}. This is the common reason to distil: a "
        f"strong model exists and labels for the student are scarce, so what the teacher's outputs carry beyond the "
        f"few labels — and how the divergence transfers it — can change the student. Every row, the student alone "
        f"included, trains on the same labelled examples for {config.epochs} epochs ({steps} steps of "
        f"{config.batch_size}). {numbers}."
    ) + (" With every label (`--set labelled_fraction=1.0 --epochs 30`, the earlier default) a small student on "
         "digits gains little from any teacher: there the rows differed by under two test examples (measured in "
         "docs/compare.md)." if config.dataset == "digits" and not config.data else "")


def _write_report(
    config: CompareConfig, run_dir: Path, teacher_info: dict, table_rows, columns, command: str, total_seconds: float,
    n_test: int, answer: dict[str, Any], regime: str,
) -> Path:
    settings = "\n".join(f"- `{k}`: `{v}`" for k, v in config_to_dict(config).items())
    intro = f"""Teacher `{teacher_info['name']}` (test accuracy {teacher_info['test']['accuracy']:.4f}, ECE {teacher_info['test']['ece']:.4f});
student `{config.student_model}`; {len(config.seeds)} seed{'s' if len(config.seeds) > 1 else ''} ({', '.join(map(str, config.seeds))}), same data split (split seed {config.split_seed}).
Mean ± sample standard deviation over seeds, on the test split ({n_test} examples)."""
    results = f"""{report.markdown_table(table_rows, columns)}

{_table_note(config, n_test, answer.get('single_seed', False))} This is a plain rule a reader can check, not a
significance test. Agreement is with the cached teacher on the test split (for online rows too, whose own
teacher is trained alongside).

Total wall time: {total_seconds:.1f}s."""
    figures = """Reliability pooled over seeds, with the number of predictions per confidence bin:

![reliability](reliability.png)

Training objectives, one panel per row (each row optimises its own objective), and the validation metrics every row shares:

![training curves](training_curves.png)

Test accuracy against ECE, mean ± std over seeds; top left is better:

![accuracy vs ECE](accuracy_vs_ece.png)"""
    reproduce = f"""As run:

```
{command}
```

Every setting is in `config.yaml` in this folder; this repeats the run exactly
(the teacher comes from the cache when present, else is retrained identically):

```
divergent compare --config {run_dir / 'config.yaml'}
```"""
    text = verdict.report_markdown(f"divergent compare — {data_name(config)}", answer["text"], intro, [
        ("Why this regime", regime), ("Results", results), ("Figures", figures), ("Reproduce", reproduce),
        ("Settings", settings)])
    return atomic_write_text(run_dir / "report.md", text)


def _report(
    config: CompareConfig, run_dir: Path, rows: list[dict[str, Any]], teacher_info: dict, teacher_test_logits: torch.Tensor,
    test_labels: torch.Tensor, *, n_train: int, n_labelled: int, command: str, started: float, console: Console,
) -> dict[str, Any]:
    """Table and verdict in the terminal; results.csv/json, summary.csv, report.md and the figures in ``run_dir``."""
    n_test = len(test_labels)
    summary = _summarise(config, rows, n_test)
    answer = _verdict(config, summary, rows, n_test)
    teacher_label = f"teacher {teacher_info['name']}"
    table_rows = [_teacher_row(teacher_label, teacher_info), *_table_rows(config, summary)]
    columns = list(table_rows[1])
    table_rows[0] = {column: table_rows[0].get(column, "—") for column in columns}
    report.print_table(table_rows, columns, console=console,
                       title=f"{data_name(config)}: {teacher_label} → student {config.student_model}")
    console.print(_table_note(config, n_test, answer.get("single_seed", False)))
    console.print(answer["text"].replace("**", ""))

    flat_rows = [{k: v for k, v in r.items() if k not in ("reliability", "history")} for r in rows]
    report.write_csv(flat_rows, run_dir / "results.csv")
    report.write_csv(summary, run_dir / "summary.csv")
    finished = [r for r in rows if r["status"] == "finished"]
    names = list(dict.fromkeys(r["name"] for r in finished))
    teacher_name = teacher_label
    bins = {teacher_name: reliability_bins(teacher_test_logits, test_labels)}
    bins.update({name: [{**r["reliability"], "ece": r["ece"]} for r in finished if r["name"] == name] for name in names})
    figures = {
        "reliability": run_dir / "reliability.png",
        "training_curves": run_dir / "training_curves.png",
        "accuracy_vs_ece": run_dir / "accuracy_vs_ece.png",
    }
    if finished:
        plot_reliability(bins, figures["reliability"], title="Reliability on the test split, pooled over seeds",
                         references=[teacher_name])
        plot_training_curves({name: [r["history"] for r in finished if r["name"] == name] for name in names},
                             figures["training_curves"], title="Training curves")
        plot_accuracy_vs_ece(finished, figures["accuracy_vs_ece"])
    total_seconds = time.perf_counter() - started
    results = {
        "command": command, "config": config_to_dict(config), "teacher": teacher_info, "verdict": answer,
        "summary": summary, "runs": rows, "figures": {k: str(v) for k, v in figures.items()},
        "total_seconds": total_seconds, "run_dir": str(run_dir),
    }
    report.write_json(results, run_dir / "results.json")
    regime = _regime_text(config, teacher_info, summary, n_train, n_labelled)
    _write_report(config, run_dir, teacher_info, table_rows, columns, command, total_seconds, n_test, answer, regime)
    console.print(f"wrote {run_dir}/results.csv, results.json, report.md and PNGs in {total_seconds:.1f}s")
    return results


def run_compare(
    config: CompareConfig,
    *,
    run_dir: str | Path | None = None,
    console: Console | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or, when ``run_dir`` holds a partial run, resume) a comparison; returns the results dict.

    Creates a new run folder under ``config.output_dir`` unless ``run_dir`` is given.
    Raises :class:`CompareInterrupted` on Ctrl-C after saving (resume with the same ``run_dir``).
    """
    previous_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    init_distributed_from_env(config.device)
    if rank() != 0:  # under torchrun only the first process prints and writes
        console = Console(file=open(os.devnull, "w"))
    try:
        return _run_compare(config, run_dir, console or report.output_console(), command)
    finally:
        torch.set_num_threads(previous_threads)


def _run_compare(config: CompareConfig, run_dir: str | Path | None, console: Console, command: str | None) -> dict[str, Any]:
    started = time.perf_counter()
    if dist.is_available() and dist.is_initialized():
        if run_dir is None:
            run_dir = report.make_run_dir(config.output_dir, f"compare-{_slug(data_name(config))}") if rank() == 0 else None
            shared = [run_dir]
            dist.broadcast_object_list(shared, src=0)  # every process writes into the first one's folder
            run_dir = shared[0]
        with report.run_folder(config.output_dir, "", resume=run_dir) as folder:
            return _compare_in(config, folder, console, command, started)
    with report.run_folder(config.output_dir, f"compare-{_slug(data_name(config))}", resume=run_dir) as folder:
        return _compare_in(config, folder, console, command, started)


def _compare_in(config: CompareConfig, folder: report.RunFolder, console: Console, command: str | None, started: float) -> dict[str, Any]:
    run_dir = folder.path
    if rank() == 0:
        save_config(config, run_dir / "config.yaml")
    command = command or f"divergent compare --config {shlex.quote(str(run_dir / 'config.yaml'))}"

    data = load_dataset(config)
    teacher, teacher_info = get_teacher(config, data, console=console)
    teachers = {"base": teacher}
    if "mcmi" in config.entries():
        teachers["mcmi"], _ = get_teacher(config, data, console=console, mcmi=True)
    teacher_test_logits, test_labels = predict_logits(teacher, data.test, device=config.device)
    students_data = student_data(config, data)

    names = ([NO_TEACHER] if config.include_student_alone else []) + config.entries()
    rows: list[dict[str, Any]] = []
    folder.started()
    # Printed only now: a data or teacher error above removes the folder it would have named.
    console.print(f"run folder: {run_dir}")
    try:
        with report.progress(console=console) as bar:
            overall = bar.add_task("runs", total=len(names) * len(config.seeds))
            for seed in config.seeds:
                for name in names:
                    rows.append(_run_one(config, name, seed, students_data, teachers, teacher_test_logits, run_dir, bar, console))
                    bar.advance(overall)
    except KeyboardInterrupt:
        raise CompareInterrupted(run_dir) from None

    if rank() != 0:
        return {"run_dir": str(run_dir), "runs": rows}
    try:
        return _report(config, run_dir, rows, teacher_info, teacher_test_logits, test_labels, n_train=len(data.train),
                       n_labelled=len(students_data.train), command=command, started=started, console=console)
    except KeyboardInterrupt:
        raise CompareInterrupted(
            run_dir, f"interrupted while writing the report; every run is saved; write the report with: "
                     f"divergent compare --resume {run_dir}") from None


def resume_compare(run_dir: str | Path, *, console: Console | None = None) -> dict[str, Any]:
    """Continue the comparison in ``run_dir`` with its saved ``config.yaml``; finished runs are not redone.

    A missing, empty or corrupt ``config.yaml`` is an error naming it (never a fall-back to defaults).
    """
    run_dir = Path(run_dir)
    config = load_run_config(CompareConfig, run_dir)
    return run_compare(config, run_dir=run_dir, console=console,
                       command=f"divergent compare --resume {shlex.quote(str(run_dir))}")
