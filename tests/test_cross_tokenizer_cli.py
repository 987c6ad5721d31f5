"""`distill-lm --cross-tokenizer uld`: a teacher with another tokenizer, as a user runs it, and its errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from divergent.cli import app

pytest.importorskip("transformers")
import lm_helpers as H  # noqa: E402


def test_teacher_batch_reads_the_same_text_in_its_own_tokens():
    from divergent.train.cross_tokenizer import teacher_batch

    student_tok, teacher_tok = H.tokenizer(300), H.tokenizer(400)
    prompt, answer = "what is 1 plus 2?", " three</s>"
    p_ids = student_tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = student_tok(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + a_ids + [0, 0]])
    mask = torch.tensor([[1] * (len(p_ids) + len(a_ids)) + [0, 0]])
    labels = torch.tensor([[-100] * len(p_ids) + a_ids + [-100, -100]])
    t_ids, t_mask, t_labels = teacher_batch(ids, mask, labels, student_tok, teacher_tok)
    n = int(t_mask.sum())
    assert teacher_tok.decode(t_ids[0, :n].tolist()) == prompt + answer
    answer_part = t_ids[0][t_labels[0] != -100].tolist()
    assert teacher_tok.decode(answer_part) == answer and answer_part[-1] == teacher_tok.eos_token_id
    assert t_ids[0, :n].tolist() != ids[0, : int(mask.sum())].tolist()  # another tokenization indeed


def test_distill_lm_across_tokenizers_and_its_errors(tmp_path):
    teacher, student, _, _ = H.save_other_pair(tmp_path)
    data = H.write_jsonl(tmp_path / "pc.jsonl", H.prompt_completion_rows(12))
    base = ["distill-lm", "--teacher", str(teacher), "--student", str(student), "--data", str(data),
            "--batch-size", "4", "--threads", "1"]
    refused = CliRunner().invoke(app, [*base, "--steps", "1", "-o", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and "--cross-tokenizer uld" in refused.output, refused.output
    assert len(refused.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, [*base, "--steps", "3", "--cross-tokenizer", "uld", "--set", "evaluations=1",
                                      "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert [(r["label"], r["status"]) for r in results["rows"]] == [("scratch", "finished"), ("uld", "finished")]
    uld, scratch = results["rows"][1], results["rows"][0]
    assert uld["loss"] > 0 and uld["history"][0]["loss"] > 0
    assert uld["loss"] != scratch["loss"]  # the teacher's signal changed the student's training
    for args, message in [
        (["--cross-tokenizer", "ulf"], "did you mean 'uld'"),
        (["--cross-tokenizer", "uld", "-d", "forward_kl,js"], "ULD, which replaces the divergence"),
        (["--cross-tokenizer", "uld", "--set", "seq_kd_fraction=0.5"], "cannot train on the teacher's generations"),
    ]:
        bad = CliRunner().invoke(app, [*base, *args, "-o", str(tmp_path / "bad")])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
        assert len(bad.output.strip().splitlines()) == 1 and "Traceback" not in bad.output
    no_teacher = CliRunner().invoke(app, ["distill-lm", "--cross-tokenizer", "uld", "-o", str(tmp_path / "bad")])
    assert no_teacher.exit_code == 2 and "needs --student PATH and a teacher" in no_teacher.output


def test_objective_is_uld_per_counted_token_and_accumulation_consistent():
    """The step loss equals uld_sequence_loss(reduction='sum') / counted tokens on the re-tokenized batch."""
    from divergent.functional.cross_tokenizer import uld_sequence_loss
    from divergent.train.cross_tokenizer import CrossTokenizerObjective, teacher_batch

    student_tok, teacher_tok = H.tokenizer(300), H.tokenizer(400)
    student, teacher = H.llama(len(student_tok), 32, 1, seed=0), H.llama(len(teacher_tok), 48, 1, seed=1)
    batch = H.answer_batch(student_tok)
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    objective = CrossTokenizerObjective("uld", student_tok, teacher_tok, hard_weight=0.0, soft_weight=1.0)
    got = objective(student, student, batch, teacher=teacher, normalizer=17.0)
    t_ids, t_mask, t_labels = teacher_batch(ids, mask, labels, student_tok, teacher_tok)
    with torch.no_grad():
        t_logits = teacher(input_ids=t_ids, attention_mask=t_mask).logits
    want = uld_sequence_loss(student(input_ids=ids, attention_mask=mask).logits, t_logits, labels, t_labels,
                             reduction="sum") / 17.0
    torch.testing.assert_close(got, want)
    # two halves with the whole batch's normalizer add up to the whole
    halves = sum(objective(student, student, batch.rows(i, i + 2), teacher=teacher, normalizer=17.0) for i in (0, 2))
    torch.testing.assert_close(halves, got, rtol=1e-5, atol=1e-6)


def test_hf_distillation_trainer_across_tokenizers(tmp_path):
    from divergent.hf import DistillationConfig

    _, losses, settings = H.train_across_tokenizers(tmp_path, H.tokenizer(300), H.tokenizer(400),
                                                    cross_tokenizer="uld", hard_weight=1.0, soft_weight=1.0)
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    with pytest.raises(ValueError, match="did you mean 'uld'"):
        DistillationConfig(cross_tokenizer="ULD", **settings)
    with pytest.raises(ValueError, match="cross_tokenizer='uld' cannot train on the teacher's generations"):
        DistillationConfig(cross_tokenizer="uld", seq_kd_fraction=0.5, **settings)
    # the student's generations, re-tokenized for the teacher each step (GOLD's sums on unnormalised vectors may be < 0)
    _, losses, _ = H.train_across_tokenizers(tmp_path / "on-policy", H.tokenizer(300), H.tokenizer(400),
                                             cross_tokenizer="gold", divergence="forward_kl", on_policy_fraction=1.0,
                                             max_new_tokens=6)
    assert len(losses) == 2 and all(math.isfinite(x) and x != 0 for x in losses)
