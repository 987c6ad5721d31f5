"""LM distillation trainer: invariants (accumulation, fused/unfused, resume, cache), on-policy data."""

import pytest
import torch

from divergent.data.teacher_cache import TeacherCache, write_teacher_cache
from divergent.data.text import load_stdlib_corpus
from divergent.models.gpt import GPTConfig, TinyGPT
from divergent.train.lm import (
    Batch,
    LMDistillConfig,
    _generated_batch,
    cache_sampler,
    corpus_sampler,
    evaluate_lm,
    train_lm_distillation,
)

VOCAB = 48


def _model(seed, d_model=32, n_layers=1):
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(vocab_size=VOCAB, d_model=d_model, n_layers=n_layers, n_heads=2, max_seq_len=32))


def _masked_sampler(seq_len=12):
    """Random sequences whose labels are masked at random, so micro-batches count different numbers of tokens."""

    def sample(step, n):
        gen = torch.Generator().manual_seed(100 + step)
        ids = torch.randint(0, VOCAB, (n, seq_len), generator=gen)
        labels = torch.randint(0, VOCAB, (n, seq_len), generator=gen)
        labels[torch.rand(n, seq_len, generator=gen) < torch.linspace(0.0, 0.9, n)[:, None]] = -100
        return Batch(ids, labels)

    return sample


def _train(config_overrides, teacher_seed=1, sample=None, **kwargs):
    config = LMDistillConfig(**{"steps": 3, "batch_size": 8, "seq_len": 12, "lr": 1e-2, "warmup_steps": 1,
                                "prompt_len": 4, "chunk_size": 20, **config_overrides})
    student = _model(0)
    teacher = _model(teacher_seed, d_model=48, n_layers=2)
    return train_lm_distillation(student, teacher, sample or _masked_sampler(), config, show_progress=False, **kwargs)


def _assert_same_params(a, b, **tolerance):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=name, **tolerance)


def test_batch_8x1_equals_4x2_accumulation_with_global_token_normaliser():
    # Plain SGD: a gradient of the wrong scale (per-micro-batch mean, missing
    # 1/accumulation) changes the update; Adam would hide a uniform scale.
    sgd = {"divergence": "js", "hard_weight": 0.3, "optimizer": "sgd", "lr": 0.5, "grad_clip": 0.0}
    one = _train({**sgd, "batch_size": 8, "grad_accum": 1})
    two = _train({**sgd, "batch_size": 4, "grad_accum": 2})
    _assert_same_params(one.student, two.student, rtol=1e-5, atol=1e-6)
    assert one.history[-1]["loss"] == pytest.approx(two.history[-1]["loss"], rel=1e-5)
    initial = _model(0)
    assert not torch.allclose(initial.lm_head.weight, one.student.lm_head.weight)


def test_fused_and_unfused_training_follow_the_same_trajectory():
    fused = _train({"divergence": "reverse_kl", "temperature": 2.0, "hard_weight": 0.5, "fused": True})
    unfused = _train({"divergence": "reverse_kl", "temperature": 2.0, "hard_weight": 0.5, "fused": False})
    _assert_same_params(fused.student, unfused.student, rtol=1e-4, atol=2e-5)


def test_resume_after_interrupt_equals_uninterrupted(tmp_path):
    config = {"steps": 5, "checkpoint_every": 2}
    full = _train(config, run_dir=tmp_path / "full")
    base = _masked_sampler()

    def interrupting(step, n):
        if step == 3:
            raise KeyboardInterrupt
        return base(step, n)

    with pytest.raises(KeyboardInterrupt):
        _train(config, sample=interrupting, run_dir=tmp_path / "cut")
    assert (tmp_path / "cut" / "step_3.pt").is_file()  # Ctrl-C saved the last finished step
    resumed = _train(config, run_dir=tmp_path / "cut")
    _assert_same_params(full.student, resumed.student, rtol=0, atol=0)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_full_vocabulary_cache_trains_like_the_live_teacher(tmp_path):
    """A cache with k = vocabulary size holds the whole teacher distribution."""
    teacher = _model(1, d_model=48, n_layers=2).eval()
    corpus = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(5)).to(torch.uint8)
    windows = corpus[: 40 * 13].view(40, 13).long()
    write_teacher_cache(teacher, [(windows[:20, :-1], windows[:20, 1:]), (windows[20:, :-1], windows[20:, 1:])],
                        tmp_path / "cache", k=VOCAB, vocab_size=VOCAB, logprob_dtype="float32")
    cache = TeacherCache(tmp_path / "cache")
    config = LMDistillConfig(steps=3, batch_size=8, seq_len=12, lr=1e-2, warmup_steps=1, chunk_size=20, prompt_len=4)
    from_cache = train_lm_distillation(_model(0), None, cache_sampler(cache, seed=3), config, show_progress=False)

    def live(step, n):
        ids, labels, _ = cache_sampler(cache, seed=3)(step, n).__dict__.values()
        return Batch(ids, labels)

    from_teacher = train_lm_distillation(_model(0), teacher, live, config, show_progress=False)
    _assert_same_params(from_cache.student, from_teacher.student, rtol=1e-4, atol=1e-5)


def test_generated_batches_mask_the_prompt_and_continue_it():
    model = _model(0)
    config = LMDistillConfig(seq_len=12, prompt_len=4)
    batch = _masked_sampler()(0, 3)
    generated = _generated_batch(model, batch, config, torch.Generator().manual_seed(0))
    assert generated.input_ids.shape == generated.labels.shape == (3, 12)
    assert torch.equal(generated.input_ids[:, :4], batch.input_ids[:, :4])
    assert (generated.labels[:, :3] == -100).all() and (generated.labels[:, 3:] >= 0).all()
    assert torch.equal(generated.labels[:, 3:-1], generated.input_ids[:, 4:])


def test_on_policy_and_seq_kd_runs_train_and_reject_missing_teacher():
    result = _train({"on_policy_fraction": 0.5, "seq_kd_fraction": 0.5, "steps": 2})
    assert result.steps_done == 2 and result.tokens_seen > 0
    with pytest.raises(ValueError, match="need a teacher model"):
        train_lm_distillation(_model(0), None, _masked_sampler(), LMDistillConfig(on_policy_fraction=0.5, seq_len=12, prompt_len=4))
    with pytest.raises(ValueError, match="must be <= 1"):
        LMDistillConfig(on_policy_fraction=0.7, seq_kd_fraction=0.5)


def test_distillation_on_stdlib_bytes_moves_student_toward_teacher():
    corpus = load_stdlib_corpus(max_train_bytes=60_000, max_val_bytes=6_000)
    torch.manual_seed(0)
    teacher = TinyGPT(GPTConfig(vocab_size=256, d_model=48, n_layers=1, n_heads=2, max_seq_len=32))
    train_lm_distillation(
        teacher, None, corpus_sampler(corpus.train, 32),
        LMDistillConfig(steps=40, batch_size=8, seq_len=32, hard_weight=1.0, soft_weight=0.0, lr=1e-2),
        show_progress=False,
    )
    student = TinyGPT(GPTConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, max_seq_len=32))
    before = evaluate_lm(student, teacher, corpus.val, seq_len=32, max_windows=16)
    train_lm_distillation(
        student, teacher, corpus_sampler(corpus.train, 32, seed=1),
        LMDistillConfig(steps=30, batch_size=8, seq_len=32, lr=1e-2, chunk_size=64),
        show_progress=False,
    )
    after = evaluate_lm(student, teacher, corpus.val, seq_len=32, max_windows=16)
    assert after["kl_teacher_student"] < 0.5 * before["kl_teacher_student"]
    assert after["student_bpb"] < before["student_bpb"]
    assert before["teacher_bpb"] == after["teacher_bpb"] < 8.0  # better than uniform over bytes


def test_hf_teacher_and_student_fused_equals_unfused(tmp_path):
    transformers = pytest.importorskip("transformers")

    def gpt2(seed, width):
        torch.manual_seed(seed)
        config = transformers.GPT2Config(n_layer=1, n_embd=width, n_head=2, vocab_size=VOCAB, n_positions=32,
                                         bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config)

    results = []
    for fused in (True, False):
        config = LMDistillConfig(steps=2, batch_size=4, seq_len=12, chunk_size=16, fused=fused, hard_weight=0.2,
                                 lr=1e-2, warmup_steps=1, prompt_len=4, on_policy_fraction=0.5)
        results.append(train_lm_distillation(gpt2(0, 16), gpt2(1, 32), _masked_sampler(), config, show_progress=False))
    _assert_same_params(results[0].student, results[1].student, rtol=1e-4, atol=2e-5)


def test_config_loads_from_yaml_with_overrides(tmp_path):
    from divergent.config import load_config, save_config

    path = tmp_path / "lm.yaml"
    path.write_text("divergence: js\ndivergence_params: {beta: 0.3}\ngrad_accum: 2\non_policy_fraction: 0.5\n")
    config = load_config(LMDistillConfig, path, overrides={"steps": "7"})
    assert (config.divergence, config.divergence_params, config.grad_accum, config.steps) == ("js", {"beta": 0.3}, 2, 7)
    assert load_config(LMDistillConfig, save_config(config, tmp_path / "again.yaml")) == config
    with pytest.raises(ValueError, match="unknown config key 'lamda'"):
        load_config(LMDistillConfig, overrides={"lamda": 0.5})
