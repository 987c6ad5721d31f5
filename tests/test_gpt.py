"""TinyGPT: shapes, causality, hidden/lm_head relation, generation, save/load."""

import pytest
import torch

from divergent.models.gpt import GPTConfig, TinyGPT


def _tiny(**overrides) -> TinyGPT:
    config = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
    config.update(overrides)
    return TinyGPT(GPTConfig(**config))


def test_logits_equal_hidden_times_lm_head_weight():
    model = _tiny()
    ids = torch.randint(0, 32, (3, 7))
    hidden, logits = model(ids, return_hidden=True)
    assert hidden.shape == (3, 7, 32) and logits.shape == (3, 7, 32)
    torch.testing.assert_close(logits, hidden @ model.lm_head.weight.T)
    torch.testing.assert_close(model(ids), logits)
    assert model.lm_head.bias is None


def test_causal_future_tokens_do_not_change_past_logits():
    model = _tiny()
    ids = torch.randint(0, 32, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 32
    torch.testing.assert_close(model(ids)[:, :6], model(changed)[:, :6])
    assert not torch.allclose(model(ids)[:, 6:], model(changed)[:, 6:])


def test_greedy_generation_is_argmax_of_forward():
    model = _tiny()
    prompt = torch.randint(0, 32, (2, 3))
    out = model.generate(prompt, max_new_tokens=4, temperature=0)
    assert out.shape == (2, 7)
    assert torch.equal(out[:, :3], prompt)
    for step in range(3, 7):
        assert torch.equal(model(out[:, :step])[:, -1].argmax(-1), out[:, step])


def test_sampling_is_reproducible_with_generator_and_respects_top_k():
    model = _tiny()
    prompt = torch.randint(0, 32, (4, 2))
    first = model.generate(prompt, 5, generator=torch.Generator().manual_seed(3))
    second = model.generate(prompt, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    top1 = model.generate(prompt, 5, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(top1, model.generate(prompt, 5, temperature=0))


def test_rows_stop_at_eos_and_are_padded_with_eos():
    model = _tiny()
    prompt = torch.randint(0, 32, (3, 2))
    greedy_first = model(prompt)[:, -1].argmax(-1)
    eos = int(greedy_first[0])
    out = model.generate(prompt, 6, temperature=0, eos_id=eos)
    assert out.shape == (3, 8)
    assert (out[0, 2:] == eos).all()
    for row in out:
        hits = (row[2:] == eos).nonzero()
        if len(hits):
            assert (row[2 + int(hits[0]) :] == eos).all()


def test_context_longer_than_max_seq_len_is_cropped_when_generating():
    model = _tiny(max_seq_len=8)
    out = model.generate(torch.zeros(1, 8, dtype=torch.long), 5, temperature=0)
    assert out.shape == (1, 13)


def test_save_and_load_round_trip(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path / "gpt")
    loaded = TinyGPT.from_pretrained(tmp_path / "gpt")
    assert loaded.config == model.config
    ids = torch.randint(0, 32, (2, 5))
    torch.testing.assert_close(loaded(ids), model(ids))


def test_bad_input_and_config_raise_clear_errors(tmp_path):
    model = _tiny()
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(torch.tensor([[0, 40]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=30, n_heads=4)
    with pytest.raises(FileNotFoundError, match="config.json"):
        TinyGPT.from_pretrained(tmp_path / "missing")


def test_training_step_reduces_loss():
    model = _tiny()
    ids = torch.randint(0, 32, (4, 12))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_attention_mask_right_padding_changes_nothing_and_left_padding_is_refused():
    model = _tiny()
    ids = torch.randint(0, 32, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(model(ids, attention_mask=mask)[1, :3], model(ids[1:, :3])[0])
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="attention_mask must be a tensor of the shape"):
        model(ids, attention_mask=mask[:, :3])


def test_save_pretrained_writes_a_given_state_dict_and_damage_is_a_clear_error(tmp_path):
    model, other = _tiny(), _tiny()
    model.save_pretrained(tmp_path / "gpt", state_dict=other.state_dict())
    loaded = TinyGPT.from_pretrained(tmp_path / "gpt")
    torch.testing.assert_close(loaded.lm_head.weight, other.lm_head.weight)
    (tmp_path / "gpt" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read .*model.safetensors"):
        TinyGPT.from_pretrained(tmp_path / "gpt")
