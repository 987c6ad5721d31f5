"""The preference trainer on the run layer with a Hugging Face causal LM: padding and attention masks,
Ctrl-C at several steps and a real SIGINT/SIGKILL, then resume equal to the uninterrupted run."""

import json
import signal

import pytest
import torch

import lm_helpers
from signal_helpers import signal_then_resume
from divergent.train.preference import PreferenceConfig, PreferenceTrainer, evaluate_preferences, sequence_logprobs
from divergent.train.run import Checkpointer, RunInterrupted, current_interrupt, drive

_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = lm_helpers.tokenizer()
    return _TOKENIZER


def _pairs(n=12):
    tok = _tokenizer()
    out = []
    for i in range(n):
        a, b = i % 5, (i * 3) % 7
        prompt = tok(f"what is {a} plus {b}?", add_special_tokens=False)["input_ids"]
        chosen = tok(f" {a} plus {b} is {a + b}." + ("" if i % 3 else " thank you"), add_special_tokens=False)["input_ids"]
        rejected = tok(" the dog sat on the log", add_special_tokens=False)["input_ids"]
        out.append((prompt, chosen + [tok.eos_token_id], rejected + [tok.eos_token_id]))
    return out


def _model(seed=0, dropout=0.0):
    model = lm_helpers.llama(len(_tokenizer()), 32, 2, seed=seed)
    model.config.attention_dropout = dropout
    return model


def _trainer(steps=6, divergence="js", dropout=0.1):
    config = PreferenceConfig(steps=steps, batch_size=5, lr=3e-3, beta=0.5, divergence=divergence, seed=3)
    return PreferenceTrainer(_model(dropout=dropout), _pairs(), config, pad_id=_tokenizer().pad_token_id)


def test_padded_batches_give_each_rows_own_log_prob():
    """Right padding under the attention mask changes nothing: each row equals its unpadded sum, token by token."""
    model = _model().eval()
    pairs = _pairs(4)
    prompts, responses = [p for p, _, _ in pairs], [c for _, c, _ in pairs]
    with torch.no_grad():
        got = sequence_logprobs(model, prompts, responses, _tokenizer().pad_token_id)
    assert len({len(p) + len(r) for p, r in zip(prompts, responses)}) > 1  # rows of different lengths
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        expected = sum(float(logp[len(prompt) - 1 + i, token]) for i, token in enumerate(response))
        assert float(got[row]) == pytest.approx(expected, abs=1e-4)


def test_a_hf_policy_learns_the_preferences_and_evaluation_agrees_with_the_history():
    trainer = _trainer(steps=12, divergence="reverse_kl", dropout=0.0)
    before = trainer.evaluate(trainer.pairs)
    assert before["accuracy"] == 0.0 and before["margin"] == 0.0  # policy == reference: every reward is 0
    trainer.train()
    after = trainer.evaluate(trainer.pairs)
    assert after["accuracy"] == 1.0 and after["margin"] > 0.5 and after["loss"] < before["loss"]
    direct = evaluate_preferences(trainer.policy, trainer.reference, trainer.pairs, pad_id=trainer.pad_id,
                                  divergence="reverse_kl", beta=0.5, batch_size=3)
    assert direct["loss"] == pytest.approx(after["loss"], rel=1e-5)


@pytest.mark.parametrize("stop_after", [1, 4])
def test_ctrl_c_between_steps_then_resume_equals_the_uninterrupted_run(tmp_path, stop_after):
    reference = _trainer()
    drive(reference)
    checkpointer = Checkpointer(tmp_path / "ck")
    first = _trainer()

    def ctrl_c(record):
        if record["step"] == stop_after:
            current_interrupt().request()

    with pytest.raises(RunInterrupted, match=f"after step {stop_after}"):
        drive(first, checkpointer=checkpointer, checkpoint_every=3, on_step=ctrl_c)
    torch.manual_seed(123)  # a fresh process would not share the RNG (dropout): resume must restore it
    second = _trainer()
    drive(second, checkpointer=checkpointer, checkpoint_every=3, resume=True)
    assert second.history == reference.history
    for key, value in reference.policy.state_dict().items():
        assert torch.equal(second.policy.state_dict()[key], value), key


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ck")
    drive(_trainer(steps=2), checkpointer=checkpointer)
    with pytest.raises(ValueError, match="written with divergence='js', this run has divergence='alpha'"):
        drive(_trainer(steps=2, divergence="alpha"), checkpointer=checkpointer, resume=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_a_real_signal_then_resume_equals_the_uninterrupted_run(tmp_path, sig):
    reference = _trainer(steps=12)
    drive(reference)
    history = signal_then_resume(tmp_path, "from test_preference_trainer import _trainer; trainer = _trainer(steps=12)", sig)
    assert history == json.loads(json.dumps(reference.history))
