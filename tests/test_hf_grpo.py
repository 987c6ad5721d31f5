"""divergent.hf.GRPOTrainer inside TRL on CPU with a tiny Llama: each regulariser trains and logs its
metric; regulariser none = plain trl.GRPOTrainer; reverse_kl/k3/coefficient beta = TRL's own beta KL
(with and without TRL's importance-sampling correction); dual_clip = verl's bound; population-std
advantages against numpy; a teacher of another tokenizer and bad config values are clear errors."""

import warnings

import numpy as np
import pytest
import torch

import lm_helpers

trl = pytest.importorskip("trl", reason="trl is not installed")
datasets = pytest.importorskip("datasets")
from divergent.hf import GRPOConfig, GRPOTrainer  # noqa: E402
from divergent.rl import ppo_clip_loss  # noqa: E402

TOKENIZER = lm_helpers.tokenizer()


def _dataset(n=8):
    return datasets.Dataset.from_list([{"prompt": f"what is {i} plus {i}?", "answer": str(2 * i)} for i in range(n)])


def _reward(completions, answer, completion_ids, **_):
    # -1, 0 or 1 by the token ids (an untrained model's text is noise): groups have spread, and
    # most completions are not "correct" (KDRL masks reward > 0).
    return [float(a in c) + float(sum(ids) % 3) - 1.0 for c, a, ids in zip(completions, answer, completion_ids)]


def _args(tmp_path, **kwargs):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                    max_completion_length=8, max_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                    disable_tqdm=True, learning_rate=1e-2, seed=0, save_strategy="no", loss_type="bnpo")
    settings.update(kwargs)
    return settings


def _train(trainer_class, args, model=None, **kwargs):
    torch.manual_seed(0)
    model = lm_helpers.llama(len(TOKENIZER), 32, 1, seed=0) if model is None else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_class(model=model, reward_funcs=_reward, args=args, train_dataset=_dataset(),
                                processing_class=TOKENIZER, **kwargs)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, logs


def _teacher_dir(tmp_path, tokenizer=TOKENIZER):
    folder = tmp_path / "teacher"
    lm_helpers.llama(len(tokenizer), 48, 1, seed=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("regulariser,metric,extra", [
    ("reverse_kl", "kl_k2", {"kl_estimator": "k2"}),
    ("dph", "dph/forward_kl", {"dph_divergence": "forward_kl", "regulariser_params": {
        "dph_probe_prompts": 4, "dph_probe_samples": 4, "dph_solved_fraction": 0.25, "dph_batch_size": 4}}),
    ("kdrl", "kdrl", {}),
])
def test_each_regulariser_trains_and_logs_its_value_through_trl(tmp_path, regulariser, metric, extra):
    kwargs = {"teacher_model": _teacher_dir(tmp_path)} if regulariser == "kdrl" else {}
    args = GRPOConfig(**_args(tmp_path, max_steps=3, regulariser=regulariser, **extra))
    trainer, logs = _train(GRPOTrainer, args, **kwargs)
    values = [log[metric] for log in logs]
    assert len(values) == 3 and all(np.isfinite(values))
    if regulariser == "kdrl":
        assert values[0] > 0  # the teacher differs from the policy from the start
        assert [log["kdrl_beta"] for log in logs] == pytest.approx([0.02, 0.0199, 0.0198])
    elif regulariser == "reverse_kl":
        assert values[0] == 0.0 and values[-1] > 0  # the policy moves away from its initial copy
    else:
        assert trainer._rehearsal["completion_ids"].shape[0] > 0 and values[-1] > 0


def test_regulariser_none_equals_plain_trl(tmp_path):
    _, ours = _train(GRPOTrainer, GRPOConfig(**_args(tmp_path, max_steps=3)))
    _, plain = _train(trl.GRPOTrainer, trl.GRPOConfig(**_args(tmp_path, max_steps=3)))
    assert [log["loss"] for log in ours] == [log["loss"] for log in plain]
    assert [log["reward"] for log in ours] == [log["reward"] for log in plain]


@pytest.mark.parametrize("bias_correction", [True, False], ids=["is-corrected", "plain"])
def test_reverse_kl_k3_with_coefficient_beta_equals_trl_beta(tmp_path, bias_correction):
    beta = 0.5
    # Plain SGD: Adam would turn float32 noise in near-zero gradients into full-size steps.
    common = _args(tmp_path, max_steps=3, use_bias_correction_kl=bias_correction, num_iterations=2, optim="sgd",
                   learning_rate=0.5)
    path = tmp_path / "policy"  # TRL builds its reference from the policy's folder
    lm_helpers.llama(len(TOKENIZER), 32, 1, seed=0).save_pretrained(path)
    ours_trainer, ours = _train(GRPOTrainer, GRPOConfig(**common, regulariser="reverse_kl", kl_estimator="k3",
                                                        coefficient=beta), model=str(path))
    trl_trainer, theirs = _train(trl.GRPOTrainer, trl.GRPOConfig(**common, beta=beta), model=str(path))
    assert [log["kl_k3"] for log in ours][-1] > 0
    np.testing.assert_allclose([log["loss"] for log in ours], [log["loss"] for log in theirs], rtol=1e-5, atol=1e-7)
    for (name, a), b in zip(ours_trainer.model.named_parameters(), trl_trainer.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)  # float32 summation order


def _trainer(tmp_path, **kwargs):
    model = lm_helpers.llama(len(TOKENIZER), 32, 1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GRPOTrainer(model=model, reward_funcs=_reward, args=GRPOConfig(**_args(tmp_path, **kwargs)),
                           train_dataset=_dataset(), processing_class=TOKENIZER)


def test_dual_clip_is_verls_bound(tmp_path):
    """TRL's two-sided clipping delta = c gives verl's dual-clip loss (divergent.rl.ppo_clip_loss, checked
    against verl in test_official_parity), for both signs of the advantage and ratios far from 1."""
    trainer = _trainer(tmp_path, dual_clip=3.0, epsilon=0.2)
    assert trainer.args.delta == 3.0
    trainer.model.eval()  # one micro-batch outside a training loop: no gradient-accumulation scaling
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 200, (6, 5), generator=g)
    completion = torch.randint(3, 200, (6, 7), generator=g)
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[0, 5:] = 0
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
              "completion_mask": mask, "advantages": torch.tensor([1.5, -2.0, -0.5, 1.0, -1.0, 0.3]),
              "num_items_in_batch": mask.sum(), "divergent_rewards": torch.zeros(6)}
    logp = trainer._forward_logps(trainer.model, inputs).detach()
    inputs["old_per_token_logps"] = logp + torch.randn(6, 7, generator=g) * 1.5  # ratios from ~0.05 to ~20
    loss = trainer._compute_loss(trainer.model, inputs)
    expected, stats = ppo_clip_loss(logp, inputs["old_per_token_logps"], inputs["advantages"], mask.bool(),
                                    clip_eps=0.2, dual_clip=3.0)
    assert stats["dual_clip_fraction"] > 0
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("std", ["sample", "population"])
def test_advantages_divide_by_the_sample_or_population_std(tmp_path, std):
    trainer = _trainer(tmp_path, advantage_std=std)
    rows = [dict(r) for r in _dataset(2) for _ in range(4)]
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        output = trainer._generate_and_score_completions(rows)
    rewards = output["divergent_rewards"].numpy().reshape(-1, 4)
    ddof = 1 if std == "sample" else 0  # TRL's nanstd is the Bessel-corrected one
    expected = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=ddof, keepdims=True) + 1e-4)
    np.testing.assert_allclose(output["advantages"].numpy(), expected.reshape(-1), rtol=1e-5, atol=1e-6)


def test_a_teacher_with_another_tokenizer_is_a_clear_error(tmp_path):
    other = lm_helpers.tokenizer(vocab_size=280)
    folder = _teacher_dir(tmp_path, other)
    with pytest.raises(ValueError, match=f"teacher_model {folder}: .*tokenizer"):
        _trainer_kdrl(tmp_path, folder)
    with pytest.raises(ValueError, match="regulariser 'kdrl' needs teacher_model"):
        _trainer_kdrl(tmp_path, None)


def _trainer_kdrl(tmp_path, teacher):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GRPOTrainer(model=lm_helpers.llama(len(TOKENIZER), 32, 1), reward_funcs=_reward,
                           args=GRPOConfig(**_args(tmp_path, regulariser="kdrl")), train_dataset=_dataset(),
                           processing_class=TOKENIZER, teacher_model=teacher)


@pytest.mark.parametrize("settings,message", [
    ({"regulariser": "revers_kl"}, "did you mean 'reverse_kl'"),
    ({"regulariser": "reverse_kl", "kl_estimator": "k4"}, "GRPOConfig.regulariser_params.kl_estimator must be one of"),
    ({"regulariser": "dph", "kl_estimator": "k2"}, "GRPOConfig.kl_estimator='k2' does not apply to regulariser 'dph'"),
    ({"regulariser": "reverse_kl", "beta": 0.1}, "GRPOConfig.beta=0.1 adds TRL's own KL"),
    ({"dual_clip": 1.1}, "GRPOConfig.dual_clip must be > 1 \\+ epsilon_high"),
    ({"advantage_std": "pop"}, "GRPOConfig.advantage_std must be"),
    ({"advantage_std": "population", "scale_rewards": "batch"}, "advantage_std='population' needs scale_rewards"),
    ({"coefficient": -1.0, "regulariser": "reverse_kl"}, "GRPOConfig.coefficient must be"),
    ({"regulariser": "kdrl", "regulariser_params": {"kdrl_estimator": "full"}}, "kdrl_estimator='full'"),
    ({"regulariser": "dph", "regulariser_params": {"dph_batch": 4}}, "did you mean 'dph_batch_size'"),
])
def test_bad_config_values_name_the_field(tmp_path, settings, message):
    with pytest.raises((ValueError, TypeError), match=message):
        GRPOConfig(**_args(tmp_path, **settings))
