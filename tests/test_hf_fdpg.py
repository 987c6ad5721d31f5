"""divergent.hf.FDPGTrainer inside TRL on CPU with a tiny Llama: it trains and logs the f-DPG metrics;
each micro-batch's loss equals fdpg_loss on the same samples with log-probs, Z and the baseline
recomputed in the test (a plain float64 forward of the policy and of a copy of the initial model,
Z as the per-prompt mean of P/q, b as the mean of earlier pseudo-rewards); fed TRL's samples, the
CLI trainer (divergent.train.fdpg, what `divergent fdpg` runs) gives the same loss, Z and
parameters step by step; bad config values are clear errors."""

import copy
import math
import warnings

import pytest
import torch

import lm_helpers

trl = pytest.importorskip("trl", reason="trl is not installed")
datasets = pytest.importorskip("datasets")
from divergent.hf import FDPGConfig, FDPGTrainer  # noqa: E402
from divergent.rl import fdpg_loss  # noqa: E402
from divergent.train import fdpg as cli_fdpg  # noqa: E402

TOKENIZER = lm_helpers.tokenizer()


def _dataset():
    # two prompts, each seen again on later steps (their running Z carries over)
    return datasets.Dataset.from_list([{"prompt": p} for p in ["what is two plus two?", "the cat sat on"] * 4])


def constraint(completion_ids, **_):
    """b(x) = 1 when the completion's token ids sum to an even number (about half of the samples)."""
    return [float(sum(ids) % 2 == 0) for ids in completion_ids]


def _args(tmp_path, **kwargs):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=6, max_steps=3, logging_steps=1, report_to=[], use_cpu=True,
                    disable_tqdm=True, learning_rate=1e-2, seed=0, save_strategy="no", lr_scheduler_type="constant",
                    divergence="js", bf16=False)  # TRL defaults to bf16 autocast, CPU included
    settings.update(kwargs)
    return FDPGConfig(**settings)


class Recording(FDPGTrainer):
    """Keeps every generation batch and every micro-batch's loss with the parameters it was computed at."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches, self.losses = [], []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        values = (self._fdpg_rewards_per_func * self.reward_weights.unsqueeze(0)).nansum(dim=1)
        self.batches.append({"prompts": list(self._fdpg_prompts), "values": values.double(),
                             **{k: output[k].clone() for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                               "completion_mask")}})
        return output

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        self.losses.append((float(loss.detach()), {k: v.clone() for k, v in inputs.items()
                                                   if isinstance(v, torch.Tensor)},
                            copy.deepcopy(self.accelerator.unwrap_model(model).state_dict())))
        return loss


def _train(tmp_path, trainer_class=Recording, **kwargs):
    model = lm_helpers.llama(len(TOKENIZER), 32, 1, seed=0)
    initial = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_class(model=model, reward_funcs=constraint, args=_args(tmp_path, **kwargs),
                                train_dataset=_dataset(), processing_class=TOKENIZER)
        trainer.train()
    return trainer, initial


def _with_weights(model, weights):
    model = copy.deepcopy(model)
    model.load_state_dict(weights)
    return model


def _plain_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Summed completion log-probs with a plain float64 forward (no TRL, no fused head)."""
    model = copy.deepcopy(model).double().eval()
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, prompt_ids.shape[1] - 1:-1]
    token = logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return (token * completion_mask).sum(-1)


def test_trains_and_logs_fdpg_metrics_through_trl(tmp_path):
    trainer, initial = _train(tmp_path)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for name in ("fdpg/z", "fdpg/pseudo_reward", "fdpg/kl_target_policy", "fdpg/tv_target_policy",
                 "fdpg/js_target_policy", "fdpg/kl_policy_base", "fdpg/alignment", "fdpg/baseline"):
        assert name in logs[0] and math.isfinite(logs[0][name]), name
    assert logs[0]["fdpg/kl_policy_base"] == 0.0 and logs[-1]["fdpg/kl_policy_base"] != 0.0
    assert logs[0]["fdpg/baseline"] == 0.0 and logs[1]["fdpg/baseline"] == pytest.approx(logs[0]["fdpg/pseudo_reward"])
    moved = [not torch.equal(a, b) for a, b in zip(trainer.model.parameters(), initial.parameters())]
    assert any(moved)
    # a(x) is TRL's reference model, frozen at the initial weights
    for a, b in zip(trainer.ref_model.parameters(), initial.parameters()):
        assert torch.equal(a, b) and not a.requires_grad


def feature(completion_ids, **_):
    """phi(x) in [0, 1]: the completion's id sum modulo 7, over 6."""
    return [(sum(ids) % 7) / 6 for ids in completion_ids]


def reward(completion_ids, **_):
    return [sum(ids) % 5 / 4 for ids in completion_ids]


# pseudo-rewards -f'(t) at log t, as disco's f_divergence.py has f' (forward KL -1/t, reverse KL
# log t + 1, JS log(2t/(1+t)) = log 2 - log(1 + 1/t)); t = inf where P = 0
PSEUDO_REWARD = {
    "js": lambda log_t: -(math.log(2.0) - torch.nn.functional.softplus(-log_t)),
    "reverse_kl": lambda log_t: -(log_t + 1.0),
    "forward_kl": lambda log_t: torch.exp(-log_t),
}


@pytest.mark.parametrize("target,divergence,func,extra", [
    ("constraint", "js", constraint, {}),
    ("reward", "reverse_kl", reward, {"reward_beta": 0.5}),
    ("feature", "forward_kl", feature, {"moment": 0.3}),
    ("constraint", "js", constraint, {"num_iterations": 2}),  # second pass: q = TRL's old log-probs, w != 1
])
def test_each_loss_equals_fdpg_loss_recomputed_from_the_samples(tmp_path, target, divergence, func, extra):
    model = lm_helpers.llama(len(TOKENIZER), 32, 1, seed=0)
    initial = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Recording(model=model, reward_funcs=func, train_dataset=_dataset(), processing_class=TOKENIZER,
                            args=_args(tmp_path, divergence=divergence, target=target, **extra))
        trainer.train()
    assert len(trainer.losses) == 3 and len(trainer.batches) == math.ceil(3 / extra.get("num_iterations", 1))
    if target == "feature":
        # GDC's moment matching on the first batch (samples of a): E_{p_lambda}[phi] = mu* under
        # self-normalised weights exp(lambda * phi)
        phi = trainer.batches[0]["values"]
        lam = float(trainer.fdpg_target.lam.reshape(-1)[0])
        weights = torch.exp(lam * phi)
        assert float((weights * phi).sum() / weights.sum()) == pytest.approx(0.3, abs=1e-6)
    iterations = extra.get("num_iterations", 1)
    z_sum, z_count, earlier_rewards = {}, {}, []
    for index, batch in enumerate(trainer.batches):
        tensors = [batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
        # q: the policy the batch was sampled from (its weights at the batch's first loss)
        log_q = _plain_logps(_with_weights(initial, trainer.losses[index * iterations][2]), *tensors)
        log_a = _plain_logps(initial, *tensors)
        log_factor = {"constraint": lambda v: torch.log(v), "reward": lambda v: v / 0.5,
                      "feature": lambda v: v * lam}[target](batch["values"])
        log_p = log_a + log_factor  # P = a·b, a·exp(r/beta), a·exp(lambda·phi)
        for key, lp, lq in zip(batch["prompts"], log_p.tolist(), log_q.tolist()):  # Z: mean of P/q so far
            z_sum[key] = z_sum.get(key, 0.0) + math.exp(lp - lq)
            z_count[key] = z_count.get(key, 0) + 1
        log_z = torch.tensor([math.log(z_sum[k] / z_count[k]) if z_sum[k] > 0 else math.nan for k in batch["prompts"]],
                             dtype=torch.float64)
        valid = ~torch.isnan(log_z)
        baseline = sum(earlier_rewards) / len(earlier_rewards) if earlier_rewards else None
        for loss, _, weights in trainer.losses[index * iterations:(index + 1) * iterations]:
            if not valid.any():
                assert loss == 0.0
                continue
            log_pi = _plain_logps(_with_weights(initial, weights), *tensors)  # the policy at this loss
            if weights is not trainer.losses[index * iterations][2]:
                assert not torch.allclose(log_pi, log_q)  # a later pass: importance weights pi/q != 1
            expected = fdpg_loss(log_pi[valid], log_q[valid], log_p[valid], log_z[valid], divergence=divergence,
                                 baseline=baseline)
            assert loss == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
        if valid.any():
            earlier_rewards += PSEUDO_REWARD[divergence](log_q[valid] - (log_p[valid] - log_z[valid])).tolist()
    assert any(loss != 0.0 for loss, _, _ in trainer.losses)


def _assert_same_steps(model, reference, initial, lr=1e-2):
    """AdamW scales each coordinate's step to about lr, so float32 summation-order noise on a near-zero
    gradient can move one coordinate by a fraction of lr: every coordinate within lr / 10, and the
    whole update within 1% of the reference's."""
    for (name, a), b, a0 in zip(model.named_parameters(), reference.parameters(), initial.parameters()):
        a, b, a0 = a.detach(), b.detach(), a0.detach()
        torch.testing.assert_close(a, b, rtol=0, atol=lr / 10, msg=name)
        assert float((a - b).norm()) <= 0.01 * float((b - a0).norm()) + 1e-7, name


class _NoTask:
    eos_id, pad_id = TOKENIZER.eos_token_id, TOKENIZER.pad_token_id


def test_same_numbers_as_the_cli_trainer_on_the_same_samples(tmp_path):
    """TRL samples with its own generate(), the CLI with divergent's sampler: the draws differ, so
    the CLI trainer is fed TRL's samples (and their constraint values) step by step; from there
    on the loss, Z, the baseline and the parameters after each AdamW step are the CLI's."""
    trainer, initial = _train(tmp_path)
    prompts = sorted(set(trainer.batches[0]["prompts"]) | set(trainer.batches[1]["prompts"]))
    target = cli_fdpg.FDPGTarget(kind="constraint", name="even ids", score=None)
    config = cli_fdpg.FDPGConfig(divergence="js", steps=3, prompts_per_step=2, samples_per_prompt=4, lr=1e-2,
                                 grad_clip=1.0, max_new_tokens=6, eval_every=100, seed=0)
    cli = cli_fdpg.FDPGTrainer(copy.deepcopy(initial), _NoTask(), prompts, target, config)
    cli._evaluate_now = lambda: None
    batches = iter(trainer.batches)
    current = {}

    def sample(model, indices, per_prompt, generator):
        batch = current["batch"] = next(batches)
        return (batch["prompts"], batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                batch["completion_mask"], [""] * len(batch["prompts"]))

    cli._sample = sample
    cli._score = lambda problems, texts: current["batch"]["values"]
    # TRL's prompt order, as CLI prompt indices (keys of the running Z)
    cli._batch_prompts = lambda step: [prompts.index(p) for p in trainer.batches[step]["prompts"][::4]]
    for step, (loss, _, _) in enumerate(trainer.losses):
        record = cli.step()
        if loss == 0.0:
            assert math.isnan(record["loss"])
        else:
            assert record["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    for key in set(trainer.batches[0]["prompts"]):
        assert cli.z.z(prompts.index(key)) == pytest.approx(trainer.fdpg_z.z(key), rel=1e-5)
    assert cli.baseline.value == pytest.approx(trainer.fdpg_baseline.value, rel=1e-5)
    _assert_same_steps(cli.policy, trainer.model, initial)


@pytest.mark.parametrize("kwargs,message", [
    ({"divergence": "jss"}, "js"),
    ({"target": "constrain"}, "constraint"),
    ({"target": "reward", "reward_beta": 0.0}, "reward_beta"),
    ({"constraint_epsilon": 1.0}, "constraint_epsilon"),
    ({"target": "feature"}, "moment"),
    ({"moment": 0.5}, "feature"),
    ({"beta": 0.1}, "beta"),
    ({"temperature": 0.7}, "temperature"),
    ({"top_p": 0.9}, "top_p"),
    ({"baseline_window": 0}, "baseline_window"),
])
def test_bad_config_values_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kwargs)


def test_wrong_args_or_no_reward_funcs(tmp_path):
    model = lm_helpers.llama(len(TOKENIZER), 32, 1, seed=0)
    with pytest.raises(TypeError, match="FDPGConfig"):
        FDPGTrainer(model=model, reward_funcs=constraint, args=trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True),
                    train_dataset=_dataset(), processing_class=TOKENIZER)
    with pytest.raises(ValueError, match="reward_funcs"):
        FDPGTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), processing_class=TOKENIZER)


def test_a_constraint_never_met_stops_with_an_error(tmp_path):
    def never(completion_ids, **_):
        return [0.0] * len(completion_ids)

    model = lm_helpers.llama(len(TOKENIZER), 32, 1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = FDPGTrainer(model=model, reward_funcs=never, args=_args(tmp_path, max_zero_samples=16),
                              train_dataset=_dataset(), processing_class=TOKENIZER)
        with pytest.raises(ValueError, match="Z = 0 after 16 samples.*constraint never"):
            trainer.train()


def test_gradient_accumulation_gives_the_whole_batch_step(tmp_path):
    """One generation batch of 8 as 2 accumulated micro-batches of 4 takes the step of one batch of 8
    (each micro-batch's mean divided by the accumulation steps, as TRL divides its own loss). Plain SGD
    without clipping, so that the gradient's scale shows in the step."""
    sgd = dict(max_steps=2, optim="sgd", learning_rate=0.1, max_grad_norm=1e9)
    whole, initial = _train(tmp_path / "whole", **sgd)
    split, _ = _train(tmp_path / "split", per_device_train_batch_size=4, gradient_accumulation_steps=2, **sgd)
    for key in ("completion_ids", "completion_mask"):  # the same draws: the comparison is of the steps
        assert all(torch.equal(a[key], b[key]) for a, b in zip(whole.batches, split.batches))
    assert len(split.losses) == 2 * len(whole.losses)
    for (name, a), b, a0 in zip(split.model.named_parameters(), whole.model.parameters(), initial.parameters()):
        assert not torch.equal(b, a0) or name.endswith("norm.weight"), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert whole.fdpg_baseline.value == pytest.approx(split.fdpg_baseline.value, rel=1e-6)


def test_a_resumed_run_restores_z_and_the_baseline(tmp_path):
    """TRL's checkpoint carries fdpg_state.json: a run resumed from step 2 of 3 goes on from the running Z,
    the baseline and λ of the run that wrote it (not only its model and optimizer)."""
    whole, _ = _train(tmp_path / "whole", save_strategy="steps", save_steps=2, max_steps=2, target="feature",
                      moment=0.3, divergence="forward_kl", trainer_class=FDPGTrainer)
    checkpoint = tmp_path / "whole" / "out" / "checkpoint-2"
    assert (checkpoint / FDPGTrainer.STATE_FILE).exists()
    model = lm_helpers.llama(len(TOKENIZER), 32, 1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = FDPGTrainer(model=model, reward_funcs=feature, train_dataset=_dataset(), processing_class=TOKENIZER,
                              args=_args(tmp_path / "resumed", target="feature", moment=0.3, max_steps=3,
                                         divergence="forward_kl"))
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.fdpg_target.lam.tolist() == whole.fdpg_target.lam.reshape(-1).tolist()
    # 16 samples from the checkpoint, then step 3's 8
    assert sum(whole.fdpg_z.weight.values()) == 16 and sum(resumed.fdpg_z.weight.values()) == 24
    assert len(whole.fdpg_baseline.buffer) == 16 and resumed.fdpg_baseline.buffer[:16] == whole.fdpg_baseline.buffer


def test_resuming_from_a_checkpoint_without_fdpg_state_is_an_error(tmp_path):
    trainer, _ = _train(tmp_path, save_strategy="steps", save_steps=2, trainer_class=FDPGTrainer)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    (checkpoint / FDPGTrainer.STATE_FILE).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = FDPGTrainer(model=lm_helpers.llama(len(TOKENIZER), 32, 1, seed=0), reward_funcs=constraint,
                            args=_args(tmp_path / "again"), train_dataset=_dataset(), processing_class=TOKENIZER)
        with pytest.raises(ValueError, match="fdpg_state.json"):
            fresh.train(resume_from_checkpoint=str(checkpoint))


def test_evaluation_uses_the_training_z_without_adding_to_it(tmp_path):
    model = lm_helpers.llama(len(TOKENIZER), 32, 1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = FDPGTrainer(model=model, reward_funcs=constraint, train_dataset=_dataset(), eval_dataset=_dataset(),
                              processing_class=TOKENIZER,
                              args=_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1,
                                         per_device_eval_batch_size=8))
        trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and all(math.isfinite(h["eval_fdpg/alignment"]) for h in evals)
    assert sum(trainer.fdpg_z.weight.values()) == 16  # the 2 training batches only
    assert len(trainer.fdpg_baseline.buffer) == 16
