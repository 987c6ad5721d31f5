"""The classifier trainer: every method trains, resume equals an uninterrupted run, Ctrl-C saves, NaN stops."""

import copy
import re
import signal

import pytest
import torch
from torch.utils.data import TensorDataset

from divergent.data.digits import load_digits_data
from divergent.data.vision import AugmentedImageDataset, ClassificationData
from divergent.models.classifiers import MLP, SmallCNN, build_model
from divergent.train.checkpoint import load_checkpoint
from divergent.train.classifier import (
    METHODS,
    ClassifierTrainConfig,
    NonFiniteLossError,
    train_classifier,
)
from divergent.train.run import NonFiniteLossError as RunLayerNonFinite


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is faster, and kinder to a shared 2-core CI machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def small_data():
    """A 192-example slice of digits (fast) with the real val split."""
    full = load_digits_data()
    x, y = full.train.tensors
    return ClassificationData("digits-small", TensorDataset(x[:192], y[:192]), full.val, full.test, 10, (1, 8, 8))


def _mlp(seed, width=16):
    torch.manual_seed(seed)
    return MLP((1, 8, 8), 10, hidden=(width, width))


def _config(method, **kw):
    kw.setdefault("epochs", 2)
    kw.setdefault("batch_size", 32)
    return ClassifierTrainConfig(method=method, lr=1e-2, **kw)


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


ALL_ROWS = sorted(set(METHODS) - {"mcmi-teacher"}) + ["forward_kl", "js", "sinkhorn"]


@pytest.mark.parametrize("method", ALL_ROWS)
def test_every_method_trains_and_changes_the_student(method, small_data):
    student, teacher = _mlp(0), _mlp(1, width=32)
    before, teacher_before = copy.deepcopy(student), copy.deepcopy(teacher)
    result = train_classifier(student, small_data, _config(method), teacher=teacher)
    assert result.status == "finished" and len(result.history) == 2
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history)
    assert not _same_weights(student, before)
    teacher_changed = not _same_weights(teacher, teacher_before)
    assert teacher_changed == (METHODS.get(method, ("offline",))[0] == "online")


@pytest.mark.parametrize("method", ["ofa", "uskd", "nd"])
def test_feature_methods_work_on_convolutional_stages(method, small_data):
    torch.manual_seed(0)
    student, teacher = SmallCNN(1, 10, width=4), SmallCNN(1, 10, width=8)
    result = train_classifier(student, small_data, _config(method, epochs=1), teacher=teacher)
    assert result.status == "finished"


def test_training_lowers_the_loss_and_beats_chance(small_data):
    result = train_classifier(_mlp(0), small_data, _config("ce", epochs=15, batch_size=16))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.history[-1]["val_accuracy"] > 0.6


def test_mcmi_teacher_finetuning_runs_on_the_model_itself(small_data):
    model = _mlp(3)
    before = copy.deepcopy(model)
    train_classifier(model, small_data, _config("mcmi-teacher", epochs=1))
    assert not _same_weights(model, before)


def test_mcmi_centroid_modes_once_epoch_and_batch(small_data):
    """``once``: training-set centroids of the model before fine-tuning, kept (the official code);
    ``epoch``: recomputed after every epoch from the current weights; ``batch``: none kept."""
    from divergent.methods import class_centroids
    from divergent.train.classifier import _build_objective, predict_logits

    def centroids_of(model):
        return class_centroids(*predict_logits(model, small_data.train), 10)

    for mode in ("once", "epoch", "batch"):
        model = _mlp(3)
        config = _config("mcmi-teacher", params={"centroids": mode})
        objective = _build_objective(config)
        objective.setup(model, None, small_data, torch.device("cpu"), config)
        initial = centroids_of(model)
        if mode == "batch":
            assert objective.centroids.numel() == 0
            continue
        torch.testing.assert_close(objective.centroids, initial)
        with torch.no_grad():
            next(model.parameters()).mul_(3.0)  # the model moves during an epoch
        objective.end_epoch()
        torch.testing.assert_close(objective.centroids, initial if mode == "once" else centroids_of(model))
        assert not torch.allclose(initial, centroids_of(model))
    with pytest.raises(ValueError, match="parameter centroids must be one of 'once', 'epoch', 'batch', got 'step'"):
        _build_objective(_config("mcmi-teacher", params={"centroids": "step"}))


@pytest.mark.parametrize("mode", ["once", "epoch"])
def test_mcmi_resume_keeps_the_saved_centroids(mode, small_data, tmp_path):
    """Stopped mid-epoch and resumed, the run goes on with the centroids it had, and ends as an uninterrupted one."""
    config = dict(epochs=3, params={"centroids": mode})
    full = train_classifier(_mlp(3), small_data, _config("mcmi-teacher", **config))
    stopped = train_classifier(_mlp(3), small_data, _config("mcmi-teacher", stop_after_steps=9, **config), run_dir=tmp_path)
    assert stopped.status == "stopped"
    resumed = train_classifier(_mlp(5), small_data, _config("mcmi-teacher", **config), run_dir=tmp_path, resume=True)
    assert _same_weights(resumed.student, full.student)
    # Fine-tuning with batch centroids is a different run.
    batch = train_classifier(_mlp(3), small_data, _config("mcmi-teacher", epochs=3, params={"centroids": "batch"}))
    assert not _same_weights(batch.student, full.student)


@pytest.mark.parametrize("method", ["forward_kl", "pskd", "ofa", "dml", "dkd"])
def test_resume_after_interruption_equals_an_uninterrupted_run(method, small_data, tmp_path):
    """Stop mid-epoch after 9 steps (6 steps per epoch), resume from the checkpoint, compare."""
    full_student, full_teacher = _mlp(0), _mlp(1, width=32)
    full = train_classifier(full_student, small_data, _config(method, epochs=3), teacher=full_teacher)

    part_student, part_teacher = _mlp(0), _mlp(1, width=32)
    stopped = train_classifier(part_student, small_data, _config(method, epochs=3, stop_after_steps=9),
                               teacher=part_teacher, run_dir=tmp_path)
    assert stopped.status == "stopped" and stopped.steps == 9
    # A fresh process would rebuild the models from scratch before resuming.
    resumed_student, resumed_teacher = _mlp(5), _mlp(6, width=32)
    if METHODS.get(method, ("offline",))[0] == "offline":
        resumed_teacher = part_teacher  # a frozen teacher is given again, not restored
    torch.manual_seed(1234)  # the RNG state must come from the checkpoint, not from here
    resumed = train_classifier(resumed_student, small_data, _config(method, epochs=3),
                               teacher=resumed_teacher, run_dir=tmp_path, resume=True)
    assert resumed.status == "finished" and resumed.steps == full.steps == 18
    for a, b in zip(full.student.state_dict().values(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h["val_accuracy"] for h in resumed.history] == [h["val_accuracy"] for h in full.history]
    torch.testing.assert_close(
        torch.tensor([h["train_loss"] for h in resumed.history]), torch.tensor([h["train_loss"] for h in full.history])
    )


def test_checkpoint_every_writes_checksummed_checkpoints_and_epoch_ends(small_data, tmp_path):
    """6 steps per epoch, checkpoint_every=4: saves at steps 4 and 6 (epoch end) and 8 (stop); the newest two are kept."""
    result = train_classifier(_mlp(0), small_data, _config("ce", epochs=2, checkpoint_every=4, stop_after_steps=8),
                              run_dir=tmp_path)
    assert result.status == "stopped" and result.checkpoint == tmp_path / "checkpoints" / "step_8.ckpt"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_6.ckpt", "step_8.ckpt"]
    saved = load_checkpoint(tmp_path / "checkpoints" / "step_6.ckpt")
    assert saved["step"] == 6 and [h["epoch"] for h in saved["history"]] == [1]
    assert load_checkpoint(result.checkpoint)["step"] == 8


def test_ctrl_c_finishes_the_step_saves_and_resumes(small_data, tmp_path):
    class InterruptAtStep:
        def __init__(self, at):
            self.at, self.count = at, 0

        def advance(self, task):
            self.count += 1
            if self.count == self.at:
                signal.raise_signal(signal.SIGINT)

    full = train_classifier(_mlp(0), small_data, _config("forward_kl"), teacher=_mlp(1, width=32))
    teacher = _mlp(1, width=32)
    interrupted = train_classifier(_mlp(0), small_data, _config("forward_kl"), teacher=teacher, run_dir=tmp_path,
                                   progress=InterruptAtStep(4), progress_task=0)
    assert interrupted.status == "interrupted" and interrupted.steps == 4
    assert load_checkpoint(tmp_path / "checkpoints" / "step_4.ckpt")["step"] == 4
    resumed = train_classifier(_mlp(9), small_data, _config("forward_kl"), teacher=teacher, run_dir=tmp_path, resume=True)
    assert _same_weights(resumed.student, full.student)


def test_nan_loss_stops_naming_step_and_divergence_and_keeps_last_good_checkpoint(small_data, tmp_path):
    config = ClassifierTrainConfig(method="reverse_kl", epochs=3, batch_size=32, optimizer="sgd", lr=1e12, momentum=0.0, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+) \(epoch \d+\) with method 'reverse_kl'") as info:
        train_classifier(_mlp(0), small_data, config, teacher=_mlp(1), run_dir=tmp_path)
    failed_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    last = tmp_path / "checkpoints" / f"step_{failed_step - 1}.ckpt"
    assert f"the last good checkpoint is {last}" in str(info.value)
    saved = load_checkpoint(last)
    assert saved["step"] == failed_step - 1
    assert all(torch.isfinite(w).all() for w in saved["student"].values())  # the kept weights are good ones
    assert NonFiniteLossError is RunLayerNonFinite  # one error class for every trainer


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "kl"}, "unknown method 'kl'.*; valid: a divergence"),
        ({"method": "nkd", "params": {"gama": 1.0}}, r"unknown parameter\(s\) \['gama'\] for method 'nkd'.*did you mean 'gamma'"),
        ({"method": "dkd", "params": {"gama": 1.0}}, r"unknown parameter\(s\) \['gama'\] for method 'dkd'"),
        ({"method": "js", "params": {"alpha": 1.0}}, r"unknown parameter\(s\) \['alpha'\] for divergence 'js'; valid: \['beta'\]"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"optimizer": "rmsprop"}, "optimizer must be"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, match, small_data):
    with pytest.raises(ValueError, match=match):
        config = ClassifierTrainConfig(**kwargs)
        train_classifier(_mlp(0), small_data, config, teacher=_mlp(1))


def test_divergence_parameters_reach_the_divergence(small_data):
    """alpha_beta at (1, 0) is forward KL: the same run as forward_kl, step for step."""
    a = train_classifier(_mlp(0), small_data, _config("alpha_beta", epochs=1, params={"alpha": 1.0, "beta": 0.0}), teacher=_mlp(1))
    b = train_classifier(_mlp(0), small_data, _config("forward_kl", epochs=1), teacher=_mlp(1))
    c = train_classifier(_mlp(0), small_data, _config("alpha_beta", epochs=1), teacher=_mlp(1))
    for x, y in zip(a.student.parameters(), b.student.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert not _same_weights(c.student, b.student)


def test_offline_method_without_teacher_is_an_error(small_data):
    with pytest.raises(ValueError, match="needs a teacher"):
        train_classifier(_mlp(0), small_data, _config("forward_kl"))


def test_resume_with_random_augmentation_equals_an_uninterrupted_run(small_data, tmp_path):
    """Augmentation draws from torch's RNG every step: the saved RNG state must reproduce it."""
    x, y = small_data.train.tensors
    augmented = ClassificationData("aug", AugmentedImageDataset(x, y, pad=1), small_data.val, small_data.test, 10, (1, 8, 8))
    config = dict(epochs=2, seed=4)
    full = train_classifier(_mlp(0), augmented, _config("forward_kl", **config), teacher=_mlp(1, width=32))
    teacher = _mlp(1, width=32)
    train_classifier(_mlp(0), augmented, _config("forward_kl", stop_after_steps=7, **config), teacher=teacher, run_dir=tmp_path)
    torch.manual_seed(99)
    resumed = train_classifier(_mlp(2), augmented, _config("forward_kl", **config), teacher=teacher, run_dir=tmp_path, resume=True)
    assert _same_weights(resumed.student, full.student)


@pytest.mark.parametrize("method", ["ofa", "uskd", "nd", "dkd"])
def test_methods_run_on_cifar_resnets(method):
    """Two steps of resnet20 -> resnet8 (16x16 inputs keep it quick; the stages work the same as at 32x32)."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 100, (16,), generator=g)
    data = ClassificationData("fake-cifar", AugmentedImageDataset(images, labels), TensorDataset(images[:4], labels[:4]),
                              TensorDataset(images[:4], labels[:4]), 100, (3, 16, 16))
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", (3, 16, 16), 100), build_model("resnet20", (3, 16, 16), 100)
    result = train_classifier(student, data, ClassifierTrainConfig(method=method, epochs=1, batch_size=8, optimizer="sgd", lr=0.05),
                              teacher=teacher)
    assert result.status == "finished" and result.steps == 2
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))


# Per-epoch mean training loss of 3 epochs, 16x16 MLP student, 32x32 random-init teacher, 192 digits,
# batch 32, Adam 1e-2 with cosine decay, seed 0. Recorded with torch 2.13 on CPU. A change here means
# the method's math, the loop, the shuffling or the schedule changed: check which, then re-record.
PINNED_LOSS_CURVES = {
    "forward_kl": [1.151434, 1.098968, 1.074556],
    "dkd": [2.292822, 2.193274, 2.147042],
    "pskd": [2.284834, 2.248156, 2.26632],
    "dml": [4.579576, 4.32356, 4.17673],
}


@pytest.mark.parametrize("method", sorted(PINNED_LOSS_CURVES))
def test_loss_curve_is_pinned(method, small_data):
    result = train_classifier(_mlp(0), small_data, _config(method, epochs=3), teacher=_mlp(1, width=32))
    curve = [h["train_loss"] for h in result.history]
    assert curve == pytest.approx(PINNED_LOSS_CURVES[method], rel=1e-3)


def test_any_module_returning_logits_works_as_student_and_teacher(small_data):
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    result = train_classifier(student, small_data, _config("tvd", epochs=1), teacher=teacher)
    assert result.status == "finished"
    with pytest.raises(ValueError, match="'nd' needs models with a feature_dim"):
        train_classifier(student, small_data, _config("nd", epochs=1), teacher=teacher)
