"""LM trainer: the loss against an independent float64 reference (HF label convention), invariants
(accumulation, fused/unfused, cache = live teacher), generation, and Ctrl-C/SIGKILL then resume
equal to the uninterrupted run."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from divergent.data.teacher_cache import TeacherCache, write_teacher_cache
from divergent.models.gpt import GPTConfig, TinyGPT
from divergent.train.lm import (
    Batch,
    ExampleSource,
    LMDistillConfig,
    LMObjective,
    LMTrainer,
    count_targets,
    evaluate_lm,
    generated_batch,
)
from divergent.train.run import Checkpointer, NonFiniteLossError, RunInterrupted, current_interrupt, drive

VOCAB = 48


def _model(seed, d_model=32, n_layers=1, dropout=0.0):
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(vocab_size=VOCAB, d_model=d_model, n_layers=n_layers, n_heads=2, max_seq_len=32,
                             dropout=dropout))


def _examples(n=40, seed=0):
    """Rows of different lengths whose first tokens are a prompt (-100), like prompt/completion data."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 15, (1,), generator=gen))
        ids = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        prompt = int(torch.randint(0, length - 1, (1,), generator=gen))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _config(**overrides):
    return LMDistillConfig(**{"steps": 3, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1, "chunk_size": 7,
                              "prompt_len": 3, "max_new_tokens": 5, **overrides})


def _trainer(config, student=None, teacher="default", examples=None, **kwargs):
    teacher = _model(1, 48, 2) if teacher == "default" else teacher
    return LMTrainer(student or _model(0), teacher, ExampleSource(examples or _examples(), seed=1), config, **kwargs)


def _run(config, **kwargs):
    trainer = _trainer(config, **kwargs)
    drive(trainer)
    return trainer


def _assert_same_params(a, b, **tolerance):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=name, **tolerance)


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("fused", [True, False])
def test_loss_equals_a_float64_reference_with_hf_labels(fused):
    """HF convention: labels are not shifted; the prediction at t is scored against labels[t + 1].

    Reference: the models' own forward (logits), shifted by hand, KL and CE written out in float64.
    """
    student, teacher = _model(0).double(), _model(1, 48, 2).double()
    batch = Batch.from_examples(_examples(6))
    objective = LMObjective("forward_kl", temperature=2.0, hard_weight=0.3, soft_weight=0.7, fused=fused, chunk_size=5)
    ours = objective(student, student, batch, teacher=teacher)

    with torch.no_grad():
        t_logits = teacher(batch.input_ids)[:, :-1] / 2.0
    s_logits = student(batch.input_ids)
    targets = batch.labels[:, 1:]
    counted = targets != -100
    p_log = torch.log_softmax(t_logits, -1)
    q_log = torch.log_softmax(s_logits[:, :-1] / 2.0, -1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    ce = -torch.log_softmax(s_logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    reference = ((0.7 * 4.0 * kl + 0.3 * ce) * counted).sum() / counted.sum()
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)
    grads = torch.autograd.grad(ours, list(student.parameters()))
    want = torch.autograd.grad(reference, list(student.parameters()))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


def test_unshifted_labels_are_not_silently_accepted_as_shifted():
    """Passing already-shifted labels (the old convention) gives a different loss: the shift is applied once."""
    student = _model(0)
    rows = [{"input_ids": list(range(3, 13)), "labels": list(range(3, 13))}]
    batch = Batch.from_examples(rows)
    objective = LMObjective("forward_kl", hard_weight=1.0, soft_weight=0.0)
    loss = objective(student, student, batch)
    logits = student(batch.input_ids)
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], batch.input_ids[0, 1:])
    torch.testing.assert_close(loss, expected)
    assert int(count_targets(batch.labels)) == 9


def test_chunked_cross_entropy_equals_full_logits_and_its_gradient():
    student = _model(0)
    batch = Batch.from_examples(_examples(8))
    chunked = LMObjective("forward_kl", hard_weight=1.0, soft_weight=0.0, chunk_size=3)(student, student, batch)
    logits = student(batch.input_ids)[:, :-1]
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch.labels[:, 1:].reshape(-1))
    torch.testing.assert_close(chunked, full)
    for a, b in zip(torch.autograd.grad(chunked, list(student.parameters())),
                    torch.autograd.grad(full, list(student.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- invariants


def test_batch_8x1_equals_2x4_accumulation_with_global_token_normaliser():
    # Plain SGD: a gradient of the wrong scale (per-micro-batch mean, missing 1/accumulation)
    # changes the update; Adam would hide a uniform scale. The micro-batches count different numbers of tokens.
    sgd = {"divergence": "js", "hard_weight": 0.3, "optimizer": "sgd", "lr": 0.5, "grad_clip": 0.0}
    one = _run(_config(**sgd, batch_size=8, grad_accum=1))
    two = _run(_config(**sgd, batch_size=2, grad_accum=4))
    _assert_same_params(one.student, two.student, rtol=1e-5, atol=1e-6)
    assert [h["loss"] for h in one.history] == pytest.approx([h["loss"] for h in two.history], rel=1e-6)
    assert not torch.allclose(_model(0).lm_head.weight, one.student.lm_head.weight)


def test_fused_and_unfused_training_follow_the_same_trajectory():
    fused = _run(_config(divergence="reverse_kl", temperature=2.0, hard_weight=0.5, fused=True))
    unfused = _run(_config(divergence="reverse_kl", temperature=2.0, hard_weight=0.5, fused=False))
    _assert_same_params(fused.student, unfused.student, rtol=1e-4, atol=2e-5)


def test_full_vocabulary_cache_trains_like_the_live_teacher(tmp_path):
    """A cache with k = vocabulary size holds the whole teacher distribution."""
    teacher = _model(1, 48, 2).eval()
    examples = _examples(24)
    write_teacher_cache(teacher, {"train": examples}, tmp_path / "cache", k=VOCAB, vocab_size=VOCAB,
                        logprob_dtype="float32", sequences_per_shard=10)
    cached = TeacherCache(tmp_path / "cache").examples()
    assert [e["input_ids"] for e in cached] == [e["input_ids"] for e in examples]
    config = _config(divergence="js")
    from_cache = _run(config, teacher=None, examples=cached)
    from_teacher = _run(config, teacher=teacher, examples=examples)
    _assert_same_params(from_cache.student, from_teacher.student, rtol=1e-4, atol=1e-5)


def test_generated_batches_keep_the_prompt_and_count_only_generated_tokens():
    model = _model(0)
    batch = Batch.from_examples(_examples(4))
    out = generated_batch(model, batch, max_new_tokens=5, prompt_len=3, temperature=1.0,
                          generator=torch.Generator().manual_seed(0))
    for row in range(4):
        n = int(batch.attention_mask[row].sum())
        labels = batch.labels[row, :n].tolist()
        first = next(t for t in range(1, n) if labels[t] != -100)
        prompt = batch.input_ids[row, :first].tolist() if first > 1 else batch.input_ids[row, :3].tolist()
        length = int(out.attention_mask[row].sum())
        assert length == len(prompt) + 5
        assert out.input_ids[row, : len(prompt)].tolist() == prompt
        assert (out.labels[row, : len(prompt)] == -100).all()
        assert torch.equal(out.labels[row, len(prompt):length], out.input_ids[row, len(prompt):length])


def test_on_policy_and_seq_kd_train_and_a_missing_teacher_is_an_error():
    trainer = _run(_config(on_policy_fraction=0.5, seq_kd_fraction=0.5, steps=3))
    assert trainer.step_index == 3 and trainer.tokens_seen == 3 * 8 * 5  # 5 generated tokens per row
    with pytest.raises(ValueError, match="need a teacher model"):
        _trainer(_config(on_policy_fraction=0.5), teacher=None)
    with pytest.raises(ValueError, match="must be <= 1"):
        _config(on_policy_fraction=0.7, seq_kd_fraction=0.5)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        _config(divergence="kl")


def test_a_non_finite_loss_stops_before_the_update_naming_the_step(tmp_path):
    trainer = _trainer(_config(steps=5))
    drive(trainer, checkpointer=Checkpointer(tmp_path / "ck"), checkpoint_every=2)
    assert trainer.step_index == 5
    # A learning rate that makes the weights overflow: the run stops naming the step, before updating.
    blown = _trainer(_config(steps=5, optimizer="sgd", lr=1e30, grad_clip=0.0, warmup_steps=0))
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* at step 2"):
        drive(blown, checkpointer=Checkpointer(tmp_path / "blown"))
    assert blown.step_index == 1
    # Weights that are NaN from the start: stopped at step 1 with the weights untouched.
    bad = _trainer(_config(steps=5))
    with torch.no_grad():
        bad.student.token_embedding.weight[:] = float("nan")
    before = [p.detach().clone() for p in bad.student.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"non-finite student hidden states .* at step 1"):
        drive(bad)
    assert all(torch.equal(a, b, ) or (a.isnan().all() and b.isnan().all())
               for a, b in zip(before, bad.student.parameters()))


def test_evaluation_metrics_against_a_direct_computation():
    student, teacher = _model(0), _model(1, 48, 2)
    examples = _examples(10)
    metrics = evaluate_lm(student, examples, teacher=teacher, batch_size=3, byte_level=True)
    batch = Batch.from_examples(examples)
    with torch.no_grad():
        s, t = student(batch.input_ids)[:, :-1], teacher(batch.input_ids)[:, :-1]
    counted = batch.labels[:, 1:] != -100
    s, t, y = s[counted].double(), t[counted].double(), batch.labels[:, 1:][counted]
    loss = torch.nn.functional.cross_entropy(s, y).item()
    kl = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean().item()
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["bits_per_byte"] == pytest.approx(loss / torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    assert metrics["kl_teacher"] == pytest.approx(kl, rel=1e-4)
    assert metrics["top1_agreement"] == pytest.approx((s.argmax(-1) == t.argmax(-1)).double().mean().item())
    assert metrics["teacher_loss"] == pytest.approx(torch.nn.functional.cross_entropy(t, y).item(), rel=1e-5)


# ----------------------------------------------------------------------------- interrupts and resume


def _resumable_config():
    # On-policy steps and a dropout student: an exact resume needs the step-seeded draws and the RNG state.
    return _config(steps=6, on_policy_fraction=0.4, seq_kd_fraction=0.2, log_every=1, eval_every=2, hard_weight=0.2)


def _resumable_trainer():
    examples = _examples(30)
    return LMTrainer(_model(0, dropout=0.1), _model(1, 48, 2), ExampleSource(examples, seed=1), _resumable_config(),
                     evaluate=lambda model: evaluate_lm(model, examples[:6]))


@pytest.mark.parametrize("stop_after", [1, 4])
def test_ctrl_c_between_steps_then_resume_equals_the_uninterrupted_run(tmp_path, stop_after):
    reference = _resumable_trainer()
    drive(reference)
    checkpointer = Checkpointer(tmp_path / "ck")
    first = _resumable_trainer()

    def ctrl_c(record):
        if record["step"] == stop_after:
            current_interrupt().request()

    with pytest.raises(RunInterrupted, match=f"after step {stop_after}"):
        drive(first, checkpointer=checkpointer, checkpoint_every=3, on_step=ctrl_c)
    torch.manual_seed(123)  # a fresh process would not share the RNG: resume must restore it
    second = _resumable_trainer()
    drive(second, checkpointer=checkpointer, checkpoint_every=3, resume=True)
    assert second.history == reference.history
    assert any("eval_loss" in h for h in reference.history)
    _assert_same_params(second.student, reference.student, rtol=0, atol=0)


_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_lm_trainer import _resumable_trainer
    from divergent.train.run import Checkpointer, RunInterrupted, drive

    trainer = _resumable_trainer()
    trainer.total_steps = trainer.config.steps = 14
    def slow(record):
        print(record["step"], flush=True)
        time.sleep({delay})
    try:
        drive(trainer, checkpointer=Checkpointer({folder!r}), checkpoint_every=2, resume=True, on_step=slow)
    except RunInterrupted as exc:
        print("INTERRUPTED", exc.step, flush=True)
        sys.exit(130)
    json.dump(trainer.history, open({out!r}, "w"))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_a_real_signal_then_resume_equals_the_uninterrupted_run(tmp_path, sig):
    reference = _resumable_trainer()
    reference.total_steps = reference.config.steps = 14
    drive(reference)
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent), folder=str(tmp_path / "ck"),
                                     out=str(tmp_path / "history.json"), delay=0.15))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.strip().isdigit() and int(line) >= 3:
            break
    process.send_signal(sig)
    rest = process.stdout.read()
    code = process.wait(timeout=120)
    if sig == signal.SIGINT:
        assert code == 130 and "INTERRUPTED" in rest
    else:
        assert code == -signal.SIGKILL
    script.write_text(script.read_text().replace("time.sleep(0.15)", "time.sleep(0.0)"))
    resumed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "history.json").read_text()) == json.loads(json.dumps(reference.history))


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ck")
    drive(_trainer(_config(steps=2)), checkpointer=checkpointer)
    with pytest.raises(ValueError, match="written with batch_size=8, this run has batch_size=4"):
        drive(_trainer(_config(steps=2, batch_size=4)), checkpointer=checkpointer, resume=True)


def test_config_loads_from_yaml_with_overrides(tmp_path):
    from divergent.config import load_config, save_config

    path = tmp_path / "lm.yaml"
    path.write_text("divergence: js\ndivergence_params: {beta: 0.3}\ngrad_accum: 2\non_policy_fraction: 0.5\n")
    config = load_config(LMDistillConfig, path, overrides={"steps": "7"})
    assert (config.divergence, config.divergence_params, config.grad_accum, config.steps) == ("js", {"beta": 0.3}, 2, 7)
    assert load_config(LMDistillConfig, save_config(config, tmp_path / "again.yaml")) == config
    with pytest.raises(ValueError, match="unknown config key 'lamda'"):
        load_config(LMDistillConfig, overrides={"lamda": 0.5})


def test_under_autocast_mixed_dtypes_follow_the_autocast_dtype():
    """Mixed precision: a bf16 output layer under float32 hidden states is computed as autocast would (bf16)."""
    student, teacher = _model(0), _model(1, 48, 2)
    batch = Batch.from_examples(_examples(4))
    objective = LMObjective("js", hard_weight=0.2)
    reference = objective(student, student, batch, teacher=teacher)
    student.lm_head.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = objective(student, student, batch, teacher=teacher)
    mixed.backward()
    assert student.lm_head.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(mixed, reference, rtol=2e-2, atol=2e-2)
