"""`--cross-tokenizer gold` in training: byte offsets, the objective, distill-lm end to end (and resume), DistillationTrainer."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from divergent.cli import app

pytest.importorskip("transformers")
import lm_helpers as H  # noqa: E402
from test_cross_tokenizer_gold import teacher_tokenizer  # noqa: E402

TEXTS = ["two plus two is four.", " the quick brown fox", "hello, café naïve ü!", "", "   spaced  out"]


def test_answer_byte_offsets_equal_trls_encoder_offsets():
    """The decode-based offsets of divergent equal TRL's encode_with_byte_offsets (trl/experimental/utils.py, 1.16)."""
    pytest.importorskip("trl.experimental.gold")
    from trl.experimental.utils import encode_with_byte_offsets

    from divergent.train.cross_tokenizer import answer_byte_offsets, decoded_byte_offsets

    for tok in (H.tokenizer(300, template=False), teacher_tokenizer()):
        for text in TEXTS:
            ((ids, want),) = encode_with_byte_offsets(tok.backend_tokenizer, [text])
            for offsets in (answer_byte_offsets, decoded_byte_offsets):  # the byte-level path and the generic one
                assert offsets(ids, tok) == [tuple(o) for o in want], (offsets.__name__, text)
        ids = tok("é!", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert len(ids) == 4  # é is two byte tokens: the first ends inside the character
        for offsets in (answer_byte_offsets, decoded_byte_offsets):
            assert offsets(ids, tok) == [(0, 1), (1, 2), (2, 3), (3, 3)]


def test_offsets_of_a_tokenizer_that_is_not_byte_level():
    """A WordPiece-like tokenizer (whitespace pre-tokenizer): offsets from decoding, by hand."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from divergent.train.cross_tokenizer import answer_byte_offsets

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(H.CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "</s>"],
                                                                show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")
    ids = fast("the cat sat", add_special_tokens=False)["input_ids"] + [fast.eos_token_id]
    assert fast.decode(ids, skip_special_tokens=True) == "the cat sat" and len(ids) == 4
    assert answer_byte_offsets(ids, fast) == [(0, 3), (3, 7), (7, 11), (11, 11)]


def test_objective_is_gold_per_counted_token_and_accumulation_consistent():
    """The step loss is gold_sequence_loss(reduction='sum') / n on the re-tokenized batch, offsets from the texts."""
    from divergent.functional.cross_tokenizer import VocabularyMatch, gold_sequence_loss
    from divergent.train.cross_tokenizer import CrossTokenizerObjective, answer_byte_offsets, teacher_batch

    student_tok, teacher_tok = H.tokenizer(300), teacher_tokenizer()
    student, teacher = H.llama(len(student_tok), 32, 1, seed=0), H.llama(len(teacher_tok), 48, 1, seed=1)
    batch = H.answer_batch(student_tok, eos=True)
    gold = dict(divergence="js", divergence_params={"beta": 0.3}, strategy="bayesian", matched_weight=None,
                unmatched_weight=None)
    objective = CrossTokenizerObjective("gold", student_tok, teacher_tok, temperature=2.0, gold=gold)
    got = objective(student, student, batch, teacher=teacher, normalizer=17.0)

    t_ids, t_mask, t_labels = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels, student_tok, teacher_tok)

    def offsets(ids, labels, tok):  # each answer's offsets in its own text, from the encoder (TRL's way)
        from trl.experimental.utils import encode_with_byte_offsets

        out = torch.zeros((*ids.shape, 2), dtype=torch.long)
        for b in range(ids.shape[0]):
            where = (labels[b] != -100).nonzero()[:, 0]
            answer = ids[b, where].tolist()
            text = tok.decode(answer, skip_special_tokens=True)
            ((enc_ids, enc_offsets),) = encode_with_byte_offsets(tok.backend_tokenizer, [text])
            assert enc_ids == [i for i in answer if i != tok.eos_token_id]
            out[b, where] = torch.tensor(enc_offsets + [(len(text.encode()),) * 2])
            assert answer_byte_offsets(answer, tok) == [tuple(o) for o in out[b, where].tolist()]
        return out

    with torch.no_grad():
        t_logits = teacher(input_ids=t_ids, attention_mask=t_mask).logits
    want = gold_sequence_loss(student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, t_logits,
                              batch.labels, t_labels, batch.input_ids, t_ids,
                              offsets(batch.input_ids, batch.labels, student_tok), offsets(t_ids, t_labels, teacher_tok),
                              VocabularyMatch.from_tokenizers(student_tok, teacher_tok), student_temperature=2.0,
                              teacher_temperature=2.0, reduction="sum", **gold) / 17.0
    assert float(got) > 0
    torch.testing.assert_close(got, want)
    halves = sum(objective(student, student, batch.rows(i, i + 2), teacher=teacher, normalizer=17.0) for i in (0, 2))
    torch.testing.assert_close(halves, got, rtol=1e-5, atol=1e-6)


def _pair(tmp_path):
    student_tok, teacher_tok = H.tokenizer(300), teacher_tokenizer()
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    H.llama(len(teacher_tok), 48, 2, seed=1).save_pretrained(teacher_dir)
    teacher_tok.save_pretrained(teacher_dir)
    H.llama(len(student_tok), 32, 1, seed=0).save_pretrained(student_dir)
    student_tok.save_pretrained(student_dir)
    data = H.write_jsonl(tmp_path / "pc.jsonl", H.prompt_completion_rows(16))
    return ["distill-lm", "--teacher", str(teacher_dir), "--student", str(student_dir), "--data", str(data),
            "--batch-size", "4", "--threads", "1"]


def test_distill_lm_gold_trains_saves_and_refuses_bad_settings(tmp_path):
    base = _pair(tmp_path)
    result = CliRunner().invoke(app, [*base, "--steps", "24", "--cross-tokenizer", "gold", "-d", "js", "--set",
                                      "divergence_params={js: {beta: 0.3}}", "--set", "evaluations=2", "--set",
                                      "include_scratch=false", "--lr", "1e-2", "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    (row,) = json.loads((run_dir / "results.json").read_text())["rows"]
    assert (row["label"], row["status"]) == ("gold", "finished")
    losses = [h["loss"] for h in row["history"]]  # the training loss of every step: GOLD per counted token
    assert len(losses) == 24 and sum(losses[-6:]) < 0.7 * sum(losses[:6]), losses
    assert (run_dir / "runs" / "gold" / "model" / "config.json").is_file()
    assert (run_dir / "runs" / "gold" / "model" / "tokenizer.json").is_file()
    for args, message in [
        (["--cross-tokenizer", "gold", "-d", "skew_kl"], "without an f-generator here; divergence must be one of"),
        (["--cross-tokenizer", "gold", "--set", "gold_strategy=last"], "gold_strategy must be one of observed, bayesian"),
        (["--cross-tokenizer", "gold", "--set", "gold_matched_weight=0.5"], "gold_matched_weight and "
                                                                            "gold_unmatched_weight are both None"),
        (["--cross-tokenizer", "uld", "--set", "gold_strategy=bayesian"], "gold_strategy set, but cross_tokenizer='uld'"),
        (["--cross-tokenizer", "gold", "-d", "js,tvd"], "uses one divergence on the shared vocabulary"),
        (["--cross-tokenizer", "golld"], "did you mean 'gold'"),
    ]:
        bad = CliRunner().invoke(app, [*base, *args, "-o", str(tmp_path / "bad")])
        assert bad.exit_code == 2 and message in " ".join(bad.output.split()), (args, bad.output)
        assert len(bad.output.strip().splitlines()) == 1 and "Traceback" not in bad.output


def test_distill_lm_gold_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from divergent.experiments import lm as experiment
    from divergent.train.run import current_interrupt

    args = [*_pair(tmp_path), "--steps", "6", "--cross-tokenizer", "gold", "-d", "reverse_kl", "--set",
            "checkpoint_every=2", "--set", "include_scratch=false", "--set", "evaluations=1", "--set",
            "gold_strategy=bayesian", "--set", "gold_matched_weight=0.8", "--set", "gold_unmatched_weight=0.2"]
    reference = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "reference")])
    assert reference.exit_code == 0, reference.output
    real_drive = experiment.drive

    def interrupted_drive(trainer, **kwargs):
        def ctrl_c(record):
            kwargs["on_step"](record)
            if record["step"] == 3:
                current_interrupt().request()
        return real_drive(trainer, **{**kwargs, "on_step": ctrl_c})

    monkeypatch.setattr(experiment, "drive", interrupted_drive)
    first = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "cut")])
    assert first.exit_code == 130, first.output
    monkeypatch.setattr(experiment, "drive", real_drive)
    (run_dir,) = (tmp_path / "cut").iterdir()
    resumed = CliRunner().invoke(app, ["distill-lm", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    ((got,), (want,)) = [json.loads(next((tmp_path / d).iterdir()).joinpath("results.json").read_text())["rows"]
                         for d in ("cut", "reference")]
    assert got["label"] == "gold" and got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in want["history"]], rel=1e-6)


def test_hf_distillation_trainer_with_gold(tmp_path):
    from divergent.hf import DistillationConfig

    trainer, losses, settings = H.train_across_tokenizers(
        tmp_path, H.tokenizer(300), teacher_tokenizer(), cross_tokenizer="gold", divergence="js",
        divergence_params={"beta": 0.5}, gold_strategy="bayesian")
    assert trainer.objective.mode == "gold" and trainer.objective.gold["strategy"] == "bayesian"
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    with pytest.raises(ValueError, match="did you mean 'gold'"):
        DistillationConfig(cross_tokenizer="GOLD", **settings)
    with pytest.raises(ValueError, match="registered divergence without an f-generator"):
        DistillationConfig(cross_tokenizer="gold", divergence="cauchy_schwarz", **settings)
    with pytest.raises(ValueError, match="gold_unmatched_weight must be a finite number"):
        DistillationConfig(cross_tokenizer="gold", gold_matched_weight=1.0, gold_unmatched_weight=-1.0, **settings)


def test_objective_refuses_settings_of_the_wrong_mode_or_unknown_ones():
    from divergent.train.cross_tokenizer import CrossTokenizerObjective

    student_tok, teacher_tok = H.tokenizer(300), teacher_tokenizer()
    with pytest.raises(ValueError, match="holds the settings of mode 'gold', got mode 'uld'"):
        CrossTokenizerObjective("uld", student_tok, teacher_tok, gold={"strategy": "bayesian"})
    with pytest.raises(ValueError, match=r"unknown settings \['stratgy'\]"):
        CrossTokenizerObjective("gold", student_tok, teacher_tok, gold={"stratgy": "bayesian"})
    with pytest.raises(ValueError, match="strategy must be one of observed, bayesian"):
        CrossTokenizerObjective("gold", student_tok, teacher_tok, gold={"strategy": "first"})
