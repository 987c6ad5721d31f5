"""Cross-tokenizer distillation on conversations with several assistant turns.

The labels of a conversation mark one answer per assistant turn. ``teacher_batch`` re-tokenizes
each run of the row on its own, so the teacher's labels mark the same answers in the same order,
and ULD and GOLD compare them answer by answer. The reference for a row with two answers is the
same row with one answer counted at a time (the single-answer path, equal to TRL's ``ULDLoss`` in
tests/test_cross_tokenizer.py and tests/test_cross_tokenizer_gold.py): the sum over the row's
aligned positions or groups is the sum of the two.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from divergent.cli import app
from divergent.functional.cross_tokenizer import (
    VocabularyMatch,
    answer_spans,
    gold_sequence_loss,
    uld_sequence_loss,
)

pytest.importorskip("transformers")
import lm_helpers as H  # noqa: E402


def test_answer_spans_by_hand():
    labels = torch.tensor([-100, 5, 6, -100, -100, 7, -100, 8, 9])
    assert answer_spans(labels) == [(1, 2), (5, 1), (7, 2)]
    assert answer_spans(torch.full((4,), -100)) == []
    assert answer_spans(torch.tensor([1, 2, 3])) == [(0, 3)]


@pytest.fixture(scope="module")
def pair():
    from divergent.data.lm_data import tokenize_rows
    from divergent.train.lm import Batch

    s_tok, t_tok = H.tokenizer(300), H.tokenizer(400)
    examples, _ = tokenize_rows(H.chat_rows(4), s_tok, max_length=128, source="rows")
    return s_tok, t_tok, Batch.from_examples(examples, s_tok.pad_token_id)


def test_teacher_rows_mark_the_same_turns(pair):
    from divergent.train.cross_tokenizer import teacher_batch

    s_tok, t_tok, batch = pair
    t_ids, t_mask, t_labels = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels, s_tok, t_tok)
    for b in range(batch.input_ids.shape[0]):
        s_spans, t_spans = answer_spans(batch.labels[b]), answer_spans(t_labels[b])
        assert len(s_spans) == len(t_spans) == 2
        for (s0, sn), (t0, tn) in zip(s_spans, t_spans):
            s_text = s_tok.decode(batch.input_ids[b, s0:s0 + sn], skip_special_tokens=True)
            t_text = t_tok.decode(t_ids[b, t0:t0 + tn], skip_special_tokens=True)
            assert s_text == t_text and s_text.strip()
        # the chat markup between the answers is kept: the teacher reads every role marker and end of turn
        s_row, t_row = batch.input_ids[b][batch.attention_mask[b].bool()].tolist(), t_ids[b][t_mask[b].bool()].tolist()
        for marker in ("<|system|>", "<|user|>", "<|assistant|>", "</s>"):
            assert t_row.count(t_tok.convert_tokens_to_ids(marker)) == s_row.count(s_tok.convert_tokens_to_ids(marker)) > 0
        # the whole row reads the same text on both sides
        s_all = s_tok.decode(batch.input_ids[b][batch.attention_mask[b].bool()], skip_special_tokens=True)
        assert t_tok.decode(t_ids[b][t_mask[b].bool()], skip_special_tokens=True) == s_all


def _only(labels, spans, keep):
    out = torch.full_like(labels, -100)
    start, size = spans[keep]
    out[start:start + size] = labels[start:start + size]
    return out


@pytest.mark.parametrize("mode", ["uld", "gold"])
def test_two_turns_are_the_sum_of_each_turn_alone(pair, mode):
    from divergent.train.cross_tokenizer import _offsets, teacher_batch

    s_tok, t_tok, batch = pair
    t_ids, _, t_labels = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels, s_tok, t_tok)
    torch.manual_seed(0)
    s_logits = torch.randn(*batch.input_ids.shape, len(s_tok), dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(*t_ids.shape, len(t_tok), dtype=torch.float64)
    match = VocabularyMatch.from_tokenizers(s_tok, t_tok)

    def loss(s_labels, tl, reduction):
        if mode == "uld":
            return uld_sequence_loss(s_logits, t_logits, s_labels, tl, reduction=reduction)
        return gold_sequence_loss(s_logits, t_logits, s_labels, tl, batch.input_ids, t_ids,
                                  _offsets(batch.input_ids, s_labels, s_tok), _offsets(t_ids, tl, t_tok), match,
                                  divergence="forward_kl", strategy="bayesian", reduction=reduction)

    both = loss(batch.labels, t_labels, "sum")
    parts = []
    for keep in (0, 1):
        s_lab = torch.stack([_only(batch.labels[b], answer_spans(batch.labels[b]), keep) for b in range(4)])
        t_lab = torch.stack([_only(t_labels[b], answer_spans(t_labels[b]), keep) for b in range(4)])
        parts.append(loss(s_lab, t_lab, "sum"))
    torch.testing.assert_close(both, parts[0] + parts[1], rtol=1e-12, atol=1e-12)
    grad_both = torch.autograd.grad(both, s_logits)[0]
    grad_parts = torch.autograd.grad(parts[0] + parts[1], s_logits)[0]
    torch.testing.assert_close(grad_both, grad_parts, rtol=1e-12, atol=1e-12)
    assert float(both.detach()) > 0 and float(loss(batch.labels, t_labels, "mean").detach()) > 0


def test_a_different_number_of_answers_is_an_error(pair):
    s_tok, t_tok, batch = pair
    s_logits = torch.randn(1, 6, 10)
    t_logits = torch.randn(1, 6, 12)
    s_labels = torch.tensor([[-100, 1, 2, -100, 3, 4]])
    t_labels = torch.tensor([[-100, 1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match=r"row 0: the student's labels mark 2 answer span\(s\) and the teacher's 1"):
        uld_sequence_loss(s_logits, t_logits, s_labels, t_labels)


def test_distill_lm_across_tokenizers_on_conversations(tmp_path):
    root = tmp_path
    H.save_other_pair(root)
    data = H.write_jsonl(root / "chat.jsonl", H.chat_rows(16))
    result = CliRunner().invoke(app, [
        "distill-lm", "--teacher", str(root / "teacher"), "--student", str(root / "student"), "--data", str(data),
        "--cross-tokenizer", "gold", "-d", "forward_kl", "--steps", "4", "--batch-size", "4", "--threads", "1",
        "--set", "evaluations=1", "-o", str(root / "runs")])
    assert result.exit_code == 0, result.output
    run = next((root / "runs").iterdir())
    rows = {r["label"]: r for r in json.loads((run / "results.json").read_text())["rows"]}
    assert rows["gold"]["status"] == "finished" and rows["gold"]["loss"] > 0


# -- on-policy: the student's own generations, read by the teacher in its tokens ----------------------


def test_on_policy_batch_is_read_by_the_teacher_as_the_students_text(pair):
    """A generated batch (the student's sampled continuations, counted) goes through the same re-tokenization:
    the teacher's counted tokens spell the student's generated text, and the objective is finite."""
    from divergent.train.cross_tokenizer import CrossTokenizerObjective, teacher_batch
    from divergent.train.lm import generated_batch

    s_tok, t_tok, batch = pair
    student, teacher = H.llama(len(s_tok), 32, 1, seed=0), H.llama(len(t_tok), 48, 1, seed=1)
    generated = generated_batch(student, batch, max_new_tokens=6, prompt_len=4, temperature=1.0,
                                generator=torch.Generator().manual_seed(0), pad_token_id=s_tok.pad_token_id,
                                eos_token_id=s_tok.eos_token_id)
    t_ids, _, t_labels = teacher_batch(generated.input_ids, generated.attention_mask, generated.labels, s_tok, t_tok)
    for b in range(generated.input_ids.shape[0]):
        (s0, sn), = answer_spans(generated.labels[b])
        (t0, tn), = answer_spans(t_labels[b])
        said = s_tok.decode(generated.input_ids[b, s0:s0 + sn], skip_special_tokens=True)
        assert said and t_tok.decode(t_ids[b, t0:t0 + tn], skip_special_tokens=True) == said
    for mode in ("uld", "gold"):
        loss = CrossTokenizerObjective(mode, s_tok, t_tok, gold={"divergence": "forward_kl"} if mode == "gold" else None)(
            student, student, generated, teacher=teacher)
        assert torch.isfinite(loss) and float(loss.detach()) > 0


def test_distill_lm_on_policy_across_tokenizers_and_what_it_refuses(tmp_path):
    root = tmp_path
    H.save_other_pair(root)
    data = H.write_jsonl(root / "pc.jsonl", H.prompt_completion_rows(16))
    base = ["distill-lm", "--student", str(root / "student"), "--data", str(data), "--cross-tokenizer", "gold",
            "-d", "js", "--batch-size", "4", "--threads", "1", "--set", "evaluations=1", "--set", "max_new_tokens=6"]
    result = CliRunner().invoke(app, [*base, "--teacher", str(root / "teacher"), "--on-policy", "1", "--steps", "3",
                                      "-o", str(root / "runs")])
    assert result.exit_code == 0, result.output
    run = next((root / "runs").iterdir())
    rows = {r["label"]: r for r in json.loads((run / "results.json").read_text())["rows"]}
    assert rows["gold"]["status"] == "finished" and len(rows["gold"]["history"]) >= 1
    bad = CliRunner().invoke(app, [*base, "--teacher", "http://127.0.0.1:9/v1", "--teacher-tokenizer",
                                   str(root / "teacher"), "--on-policy", "0.5", "-o", str(root / "bad")])
    assert bad.exit_code == 2 and "need a local teacher to score generated continuations" in bad.output, bad.output
    assert len(bad.output.strip().splitlines()) == 1 and "Traceback" not in bad.output
