"""A TRL run stopped at a checkpoint and resumed with train(resume_from_checkpoint=...) ends exactly
where the uninterrupted run ends: divergent.hf.FDPGTrainer and divergent.hf.GRPOTrainer on CPU with
a tiny Llama (tests/lm_helpers.py), seeds fixed. Exact means bitwise: the same parameters, the same
logged values of every step after the checkpoint (loss, rewards, fdpg/*), the same running Z,
baseline window and λ. The reference is the uninterrupted run itself.

The cases are the places where TRL 1.16 alone does not resume exactly (divergent.hf.resume):
a checkpoint in a later epoch (TRL's RepeatSampler replays epoch 0's prompt order), a checkpoint
inside a generation window (num_iterations > 1: TRL's buffer of samples is not saved) and DPH's
rehearsal set (sampled from the initial policy on the first step); plus one in epoch 0 at a
generation boundary, where TRL alone was already exact. A checkpoint between two logs: only the
first log after it differs (an average over fewer steps), as transformers.Trainer's own loss."""

import math
from pathlib import Path
import warnings

import pytest
import torch

import lm_helpers

trl = pytest.importorskip("trl", reason="trl is not installed")
datasets = pytest.importorskip("datasets")
from trl.trainer.utils import RepeatSampler  # noqa: E402

from divergent.hf import FDPGConfig, FDPGTrainer, GRPOConfig, GRPOTrainer  # noqa: E402
from divergent.hf.resume import EpochSeededRepeatSampler, epoch_seeded  # noqa: E402

TOKENIZER = lm_helpers.tokenizer()
PROMPTS = ["what is two plus two?", "the cat sat on"]


def _dataset():
    # 8 rows, 2 prompts a step: an epoch is 4 steps (num_iterations=1)
    return datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS * 4])


def even(completion_ids, **_):
    return [float(sum(ids) % 2 == 0) for ids in completion_ids]


def feature(completion_ids, **_):
    return [(sum(ids) % 7) / 6 for ids in completion_ids]


class _Recording:
    """Keeps the prompts each generation batch was drawn for."""

    def _generate_and_score_completions(self, inputs):
        self.__dict__.setdefault("drawn", []).append([x["prompt"] for x in inputs])
        return super()._generate_and_score_completions(inputs)


class FDPG(_Recording, FDPGTrainer):
    pass


class GRPO(_Recording, GRPOTrainer):
    pass


def _run(tmp_path, trainer_class, config_class, reward, steps, save_steps, resume=None, **kwargs):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=6, max_steps=steps, logging_steps=1, report_to=[], use_cpu=True,
                    disable_tqdm=True, learning_rate=1e-2, seed=0, save_strategy="steps", save_steps=save_steps,
                    lr_scheduler_type="constant", bf16=False, beta=0.0)
    settings.update(kwargs)
    model = lm_helpers.llama(len(TOKENIZER), 32, 1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_class(model=model, reward_funcs=reward, args=config_class(**settings),
                                train_dataset=_dataset(), processing_class=TOKENIZER)
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def _untimed(logs):
    """Logged values by step, timings left out."""
    return {h["step"]: {k: v for k, v in h.items() if k != "step_time"} for h in logs}


def _steps(trainer, after):
    """The logged values of each step after ``after``."""
    return _untimed(h for h in trainer.state.log_history if "loss" in h and h["step"] > after)


def _assert_resumes_exactly(tmp_path, trainer_class, config_class, reward, steps, checkpoint, **kwargs):
    whole = _run(tmp_path / "whole", trainer_class, config_class, reward, steps, checkpoint, **kwargs)
    resumed = _run(tmp_path / "resumed", trainer_class, config_class, reward, steps, checkpoint,
                   resume=str(tmp_path / "whole" / f"checkpoint-{checkpoint}"), **kwargs)
    generations = len(resumed.drawn)
    assert 0 < generations < len(whole.drawn)  # it resumed, not restarted
    assert resumed.drawn == whole.drawn[-generations:]  # the same prompts, in the same order
    logged = _steps(whole, after=checkpoint)
    assert len(logged) == steps - checkpoint and _steps(resumed, after=checkpoint) == logged
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    return whole, resumed


@pytest.mark.parametrize("steps,checkpoint,kwargs", [
    (3, 2, {}),  # epoch 0, at a generation
    (6, 5, {"target": "feature", "moment": 0.3, "divergence": "forward_kl"}),  # epoch 1: prompt order, λ
    (4, 1, {"num_iterations": 2}),  # inside a generation window: TRL's buffer of samples
    # one generation of 4 prompts for 2 steps of 2 accumulated micro-batches; epoch 1, inside the window
    (7, 5, {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "steps_per_generation": 4}),
])
def test_a_resumed_fdpg_run_ends_exactly_where_the_uninterrupted_run_ends(tmp_path, steps, checkpoint, kwargs):
    kwargs = {"divergence": "js", **kwargs}
    reward = feature if kwargs.get("target") == "feature" else even
    whole, resumed = _assert_resumes_exactly(tmp_path, FDPG, FDPGConfig, reward, steps, checkpoint, **kwargs)
    assert resumed.fdpg_z.state_dict() == whole.fdpg_z.state_dict()
    assert resumed.fdpg_baseline.state_dict() == whole.fdpg_baseline.state_dict()
    per_generation = kwargs.get("steps_per_generation", 1) // kwargs.get("gradient_accumulation_steps", 1)
    generations = math.ceil(steps / kwargs.get("num_iterations", 1) / per_generation)
    assert len(whole.fdpg_baseline.buffer) == 8 * per_generation * generations
    if kwargs.get("target") == "feature":
        assert resumed.fdpg_target.lam.tolist() == whole.fdpg_target.lam.tolist()


def test_a_resumed_grpo_run_ends_exactly_where_the_uninterrupted_run_ends(tmp_path):
    # a later epoch and inside a generation window at once (num_iterations=2: an epoch is 8 steps; step 10
    # reuses step 9's samples, step 11 draws the second prompts of epoch 1)
    _assert_resumes_exactly(tmp_path, GRPO, GRPOConfig, even, 12, 9, regulariser="reverse_kl",
                            coefficient=0.1, num_iterations=2)


def test_each_epoch_has_the_order_of_the_uninterrupted_sampler():
    """TRL's RepeatSampler draws epoch e's permutation as its (e+1)-th pass; after set_epoch(e) a fresh
    EpochSeededRepeatSampler (a resumed run's) yields that pass, and one set at each epoch in turn (an
    uninterrupted run's) yields TRL's order unchanged."""
    def make():
        return RepeatSampler(list(range(10)), mini_repeat_count=2, batch_size=3, repeat_count=2, shuffle=True, seed=7)

    reference = make()
    passes = [list(reference) for _ in range(4)]
    assert passes[0] != passes[1]  # the order changes each epoch
    continuing = epoch_seeded(make())
    assert isinstance(continuing, EpochSeededRepeatSampler)
    for epoch, expected in enumerate(passes):
        continuing.set_epoch(epoch)
        assert list(continuing) == expected
        fresh = epoch_seeded(make())
        fresh.set_epoch(epoch)
        assert list(fresh) == expected
    unshuffled = epoch_seeded(RepeatSampler(list(range(4)), mini_repeat_count=1, shuffle=False))
    unshuffled.set_epoch(3)
    assert list(unshuffled) == [0, 1, 2, 3]
    other = torch.utils.data.SequentialSampler(range(3))
    assert epoch_seeded(other) is other


DPH = dict(regulariser="dph", dph_divergence="forward_kl", regulariser_params={
    "dph_probe_prompts": 4, "dph_probe_samples": 4, "dph_solved_fraction": 0.25, "dph_batch_size": 4})


@pytest.mark.parametrize("trainer_class,config_class,kwargs,message", [
    (FDPG, FDPGConfig, {"num_iterations": 2, "divergence": "js"},
     "inside a generation window.*no generation buffer in resume_state_0.ckpt"),
    (GRPO, GRPOConfig, DPH, "no DPH rehearsal set in resume_state_0.ckpt"),
])
def test_a_checkpoint_without_its_resume_state_is_an_error(tmp_path, trainer_class, config_class, kwargs, message):
    _run(tmp_path / "whole", trainer_class, config_class, even, 1, 1, **kwargs)
    checkpoint = tmp_path / "whole" / "checkpoint-1"
    (checkpoint / FDPGTrainer.PROCESS_FILE.format(0)).unlink()
    with pytest.raises(ValueError, match=message):
        _run(tmp_path / "resumed", trainer_class, config_class, even, 2, 1, resume=str(checkpoint), **kwargs)


def test_a_checkpoint_at_a_generation_writes_no_buffer(tmp_path):
    _run(tmp_path, FDPG, FDPGConfig, even, 1, 1, divergence="js")
    assert not (tmp_path / "checkpoint-1" / FDPGTrainer.PROCESS_FILE.format(0)).exists()
    assert (tmp_path / "checkpoint-1" / FDPGTrainer.STATE_FILE).exists()



def test_a_resumed_dph_run_keeps_the_rehearsal_set_of_the_initial_policy(tmp_path):
    """DPH's rehearsal set is sampled from the initial policy on the first step; a resumed run reads it from
    the checkpoint instead of sampling the checkpoint's policy."""
    whole, resumed = _assert_resumes_exactly(tmp_path, GRPO, GRPOConfig, even, 3, 2, **DPH)
    for key, value in whole._rehearsal.items():
        assert torch.equal(resumed._rehearsal[key], value), key


def test_a_checkpoint_between_two_logs_changes_only_the_first_log_after_it(tmp_path):
    """transformers.Trainer's loss and TRL's metrics accumulate in memory between logs, not in checkpoints:
    with checkpoint 3 and logging every 2 steps the resumed run's log of step 4 averages step 4 alone; the
    parameters and the later logs are the uninterrupted run's."""
    kwargs = dict(divergence="js", logging_steps=2)
    whole = _run(tmp_path / "whole", FDPG, FDPGConfig, even, 6, 3, **kwargs)
    resumed = _run(tmp_path / "resumed", FDPG, FDPGConfig, even, 6, 3,
                   resume=str(tmp_path / "whole" / "checkpoint-3"), **kwargs)
    assert sorted(_steps(resumed, after=3)) == [4, 6] and _steps(resumed, after=5) == _steps(whole, after=5)
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


# f-DPG as a TRL user runs it on several processes: `accelerate launch script.py` (2 CPU ranks, gloo).
WORKER = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_hf_resume import FDPG, FDPGConfig, even, _run
out, resume = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
trainer = _run(out + ".run", FDPG, FDPGConfig, even, 12, 9, resume=resume, divergence="js",
               per_device_train_batch_size=4, num_iterations=2)
rank, model = trainer.accelerator.process_index, trainer.accelerator.unwrap_model(trainer.model)
torch.save({{"params": {{k: v.detach().clone() for k, v in model.state_dict().items()}},
            "z": trainer.fdpg_z.state_dict(), "baseline": trainer.fdpg_baseline.state_dict(),
            "drawn": getattr(trainer, "drawn", []), "world": trainer.accelerator.num_processes,
            "logs": [h for h in trainer.state.log_history if "loss" in h and h["step"] > 9]}},
           f"{{out}}.{{rank}}.pt")
"""


@pytest.mark.slow  # two `accelerate launch` start-ups of 2 processes: ~20 s on 2 cores
def test_a_resumed_fdpg_run_on_two_processes_ends_exactly_where_the_uninterrupted_run_ends(tmp_path):
    """2 ranks x 4 samples of one prompt, a later epoch and inside a generation window (num_iterations=2):
    each rank's resume_state file, the sampler's order on both ranks (a resumed loader on several processes
    does not pass set_epoch to the sampler: ExactResume sets it), Z over the gathered batch."""
    from test_accelerate_launch import _accelerate_launch

    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).resolve().parent)))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _accelerate_launch(tmp_path / "a", script, str(tmp_path / "whole"))
    assert {p.name for p in (tmp_path / "whole.run" / "checkpoint-9").glob("resume_state_*")} == \
        {"resume_state_0.ckpt", "resume_state_1.ckpt"}
    _accelerate_launch(tmp_path / "b", script, str(tmp_path / "resumed"), str(tmp_path / "whole.run" / "checkpoint-9"))
    for rank in (0, 1):
        whole, resumed = torch.load(tmp_path / f"whole.{rank}.pt"), torch.load(tmp_path / f"resumed.{rank}.pt")
        assert whole["world"] == resumed["world"] == 2
        assert 0 < len(resumed["drawn"]) < len(whole["drawn"])
        assert resumed["drawn"] == whole["drawn"][-len(resumed["drawn"]):]
        assert sorted(_untimed(whole["logs"])) == [10, 11, 12]
        assert _untimed(resumed["logs"]) == _untimed(whole["logs"])
        assert resumed["z"] == whole["z"] and resumed["baseline"] == whole["baseline"]
        for name, value in whole["params"].items():
            assert torch.equal(resumed["params"][name], value), name
