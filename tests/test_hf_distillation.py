"""divergent.hf.DistillationTrainer: a transformers.Trainer running the project's LM loss.

Checked: raw rows in TRL's SFT formats are tokenized for the user; batch 8 x 1 equals 2 x 4
gradient accumulation (num_items_in_batch is the normaliser); one optimisation step equals the
CLI's trainer (LMTrainer) on the same batch — the two engines run one loss; a teacher cache trains
like the live teacher; the student is saved with save_pretrained; bad input is refused by name.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
import lm_helpers as H  # noqa: E402

from divergent.data.lm_data import tokenize_rows  # noqa: E402
from divergent.hf import DistillationConfig, DistillationTrainer  # noqa: E402
from divergent.train.lm import ExampleSource, LMDistillConfig, LMTrainer  # noqa: E402
from divergent.train.run import drive  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    tokenizer = H.tokenizer()
    return tokenizer, H.llama(len(tokenizer), 48, 2, seed=1), H.llama(len(tokenizer), 32, 1, seed=0)


def _args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, gradient_accumulation_steps=1,
                    max_steps=3, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                    logging_steps=1, save_strategy="no", use_cpu=True, report_to=[], seed=0, disable_tqdm=True,
                    divergence="js", hard_weight=0.3, chunk_size=7)
    settings.update(overrides)
    return DistillationConfig(**settings)


def _same(a, b, **tolerance):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=name, **tolerance)


def test_raw_rows_are_tokenized_and_8x1_equals_2x4_accumulation(tmp_path, tiny):
    tokenizer, teacher, student = tiny
    rows = H.chat_rows(24)

    def run(batch, accumulation):
        trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, train_dataset=rows,
                                      args=_args(tmp_path, per_device_train_batch_size=batch,
                                                 gradient_accumulation_steps=accumulation),
                                      processing_class=tokenizer)
        trainer.train()
        return trainer

    one, four = run(8, 1), run(2, 4)
    _same(one.model, four.model, rtol=1e-5, atol=1e-6)
    losses = [h["loss"] for h in one.state.log_history if "loss" in h]
    assert losses == pytest.approx([h["loss"] for h in four.state.log_history if "loss" in h], rel=1e-5)
    assert not torch.allclose(one.model.lm_head.weight, student.lm_head.weight)
    assert one.teacher_model is teacher and not any(p.requires_grad for p in teacher.parameters())
    assert one.data_stats["train"].rows == 24 and one.data_stats["train"].format == "messages"


def test_one_step_equals_the_cli_trainer_on_the_same_batch(tmp_path, tiny):
    """The HF engine and LMTrainer run one loss: same loss value and same SGD update from the same batch."""
    tokenizer, teacher, student = tiny
    rows = H.prompt_completion_rows(8)
    hf = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, train_dataset=rows,
                             args=_args(tmp_path, max_steps=1, divergence="skew_kl",
                                        divergence_params={"alpha": 0.2}, temperature=2.0),
                             processing_class=tokenizer)
    hf.train()
    examples, _ = tokenize_rows(rows, tokenizer, max_length=1024)
    config = LMDistillConfig(steps=1, batch_size=8, optimizer="sgd", lr=0.5, grad_clip=0.0, warmup_steps=0,
                             lr_schedule="constant", divergence="skew_kl", divergence_params={"alpha": 0.2},
                             temperature=2.0, hard_weight=0.3, chunk_size=7)
    ours = LMTrainer(copy.deepcopy(student), teacher, ExampleSource(examples, pad_token_id=tokenizer.pad_token_id),
                     config)
    drive(ours)
    hf_loss = next(h["loss"] for h in hf.state.log_history if "loss" in h)
    assert hf_loss == pytest.approx(ours.history[-1]["loss"], rel=1e-5)
    _same(hf.model, ours.student, rtol=1e-5, atol=1e-6)


def test_teacher_cache_trains_like_the_live_teacher_and_needs_no_teacher_model(tmp_path, tiny):
    from divergent.data.teacher_cache import write_teacher_cache
    from divergent.models.hf import tokenizer_fingerprint

    tokenizer, teacher, student = tiny
    examples, _ = tokenize_rows(H.text_rows(16), tokenizer, max_length=24)
    vocab = len(tokenizer)
    write_teacher_cache(teacher, {"train": examples}, tmp_path / "cache", k=vocab, vocab_size=vocab,
                        logprob_dtype="float32", tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                        pad_token_id=tokenizer.pad_token_id)
    cached = DistillationTrainer(model=copy.deepcopy(student), args=_args(tmp_path, teacher_cache=str(tmp_path / "cache")),
                                 processing_class=tokenizer)
    cached.train()
    live = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, train_dataset=examples,
                               args=_args(tmp_path), processing_class=tokenizer)
    live.train()
    assert cached.teacher_model is None
    _same(cached.model, live.model, rtol=1e-4, atol=1e-5)


def test_the_student_is_saved_with_save_pretrained_and_evaluates(tmp_path, tiny):
    tokenizer, teacher, student = tiny
    trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher,
                                  train_dataset=H.prompt_completion_rows(12), eval_dataset=H.prompt_completion_rows(4),
                                  args=_args(tmp_path, max_steps=2, hard_weight=0.0, divergence="reverse_kl"),
                                  processing_class=tokenizer)
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    trainer.save_model(str(tmp_path / "student"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student", local_files_only=True)
    _same(loaded, trainer.model)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "student").get_vocab() == tokenizer.get_vocab()


def test_on_policy_and_seq_kd_micro_batches_train(tmp_path, tiny):
    tokenizer, teacher, student = tiny
    trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher,
                                  train_dataset=H.prompt_completion_rows(8),
                                  args=_args(tmp_path, max_steps=2, per_device_train_batch_size=4,
                                             on_policy_fraction=0.5, seq_kd_fraction=0.5, max_new_tokens=4),
                                  processing_class=tokenizer)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    assert not torch.allclose(trainer.model.lm_head.weight, student.lm_head.weight)


def test_bad_input_is_refused_by_name(tmp_path, tiny):
    tokenizer, teacher, student = tiny
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        _args(tmp_path, divergence="kl")
    with pytest.raises(ValueError, match="on_policy_fraction \\+ seq_kd_fraction must be <= 1"):
        _args(tmp_path, on_policy_fraction=0.6, seq_kd_fraction=0.6)
    with pytest.raises(ValueError, match="teacher_model is required"):
        DistillationTrainer(model=student, args=_args(tmp_path), train_dataset=H.text_rows(4), processing_class=tokenizer)
    with pytest.raises(ValueError, match="pass processing_class"):
        DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=H.text_rows(4))
    with pytest.raises(ValueError, match="no column this command can train on; found columns \\['question'\\]"):
        DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path),
                            train_dataset=[{"question": "q"}], processing_class=tokenizer)
    with pytest.raises(ValueError, match="different tokenizers.*give --cross-tokenizer uld"):
        DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=H.text_rows(4),
                            processing_class=tokenizer, teacher_processing_class=H.tokenizer(400))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        DistillationTrainer(model=student, teacher_model=str(tmp_path / "missing"), args=_args(tmp_path),
                            train_dataset=H.text_rows(4), processing_class=tokenizer)
    with pytest.raises(TypeError, match="args must be a DistillationConfig"):
        DistillationTrainer(model=student, teacher_model=teacher, processing_class=tokenizer,
                            args=transformers.TrainingArguments(output_dir=str(tmp_path)))


def test_models_and_teacher_load_from_local_folders(tmp_path):
    teacher_dir, student_dir, tokenizer = H.save_pair(tmp_path)
    trainer = DistillationTrainer(model=str(student_dir), teacher_model=str(teacher_dir),
                                  train_dataset=H.text_rows(8), args=_args(tmp_path, max_steps=1))
    assert trainer.processing_class.get_vocab() == tokenizer.get_vocab()
    trainer.train()
