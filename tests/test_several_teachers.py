"""Several teachers: the student matches the weighted mixture of the tempered teachers' distributions.

References are computed by hand in float64 from each teacher's own logits (HF forward), never by
the code under test: p_mix = sum_i w_i softmax(z_i / T)."""

import copy

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")
import lm_helpers as H  # noqa: E402

from divergent.cli import app  # noqa: E402
from divergent.models.hf import teacher_side  # noqa: E402
from divergent.models.mixture import TeacherMixture  # noqa: E402
from divergent.train.lm import Batch, LMObjective  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    tok = H.tokenizer()
    a, b = H.llama(len(tok), 48, 2, seed=1), H.llama(len(tok), 40, 1, seed=2)
    with torch.no_grad():  # peaked teachers, so that where T is applied matters
        a.lm_head.weight.mul_(40)
        b.lm_head.weight.mul_(40)
    return tok, a, b, H.llama(len(tok), 32, 1, seed=0)


def _hand_mixture(teachers, weights, ids, temperature):
    """float64: sum_i w_i softmax(z_i / T), weights normalised."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    with torch.no_grad():
        probs = [torch.softmax(t(input_ids=ids).logits.double() / temperature, -1) for t in teachers]
    return sum(wi * p for wi, p in zip(w, probs))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mixture_logits_give_the_hand_mixture_of_tempered_teachers(tiny, temperature):
    tok, a, b, _ = tiny
    ids = torch.randint(3, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    mixture = TeacherMixture([a, b], [7, 3], temperature=temperature).eval()  # normalised to 0.7, 0.3
    assert mixture.weights == pytest.approx([0.7, 0.3])
    with torch.no_grad():
        hidden, logits = teacher_side(mixture, ids)  # what the objective reads
    assert hidden is None  # the mixture gives its logits
    # the losses temper the teacher: softmax(logits / T) must be the mixture itself
    ours = torch.softmax(logits.double() / temperature, -1)
    expected = _hand_mixture([a, b], [0.7, 0.3], ids, temperature)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    # not the mixture of untempered teachers, re-tempered (the two differ at T = 2)
    if temperature != 1.0:
        wrong = torch.softmax(torch.log(_hand_mixture([a, b], [0.7, 0.3], ids, 1.0)) / temperature, -1)
        assert (wrong - expected).abs().max() > 1e-3


@pytest.mark.parametrize("fused", [True, False])
def test_distillation_loss_with_two_teachers_is_the_loss_against_the_hand_mixture(tiny, fused):
    tok, a, b, student = tiny
    temperature = 2.0
    ids = torch.randint(3, len(tok), (2, 8), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    batch = Batch(ids, torch.ones_like(ids), labels)
    objective = LMObjective("forward_kl", temperature=temperature, hard_weight=0.0, soft_weight=1.0, fused=fused,
                            chunk_size=5)
    loss = objective(student, student, batch, teacher=TeacherMixture([a, b], [0.25, 0.75], temperature=temperature))
    # by hand: T^2 * KL(p_mix || q^T), mean over the counted positions t (labels[t + 1] != -100)
    p = _hand_mixture([a, b], [0.25, 0.75], ids, temperature)[:, :-1]
    with torch.no_grad():
        logq = torch.log_softmax(student(input_ids=ids).logits.double() / temperature, -1)[:, :-1]
    kl = (p * (p.log() - logq)).sum(-1)
    counted = labels[:, 1:] != -100
    expected = temperature ** 2 * kl[counted].sum() / counted.sum()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def _run(args):
    return CliRunner().invoke(app, args)


def _save_three(tmp_path, tok, a, b, student):
    """Folders a, b and student, each with the tokenizer."""
    for name, model in (("a", a), ("b", b), ("student", student)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)


def test_cli_distils_from_two_teacher_folders(tmp_path, tiny):
    tok, a, b, student = tiny
    _save_three(tmp_path, tok, a, b, student)
    data = H.write_jsonl(tmp_path / "rows.jsonl", H.chat_rows(12))
    result = _run(["distill-lm", "--teacher", str(tmp_path / "a"), "--teacher", str(tmp_path / "b"),
                   "--teacher-weights", "0.7,0.3", "--student", str(tmp_path / "student"), "--data", str(data),
                   "--max-length", "30", "--steps", "2", "--batch-size", "4", "--eval-fraction", "0.25",
                   "--temperature", "2", "--threads", "1", "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("distill-lm-")]
    assert f"mixture (T = 2) of 0.7 x {tmp_path / 'a'}, 0.3 x {tmp_path / 'b'}" in (run_dir / "report.md").read_text()
    assert (run_dir / "runs" / "forward_kl" / "model" / "config.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--teacher-weights", "0.5,0.3,0.2"], "3 weights given for 2 teachers"),
    (["--teacher-weights", "0.5,-0.5"], "must be positive"),
    (["--teacher", "http://127.0.0.1:9/v1"], "cannot be mixed"),
])
def test_bad_teacher_lists_are_one_line_exit_2(tmp_path, tiny, extra, message):
    result = _run(["distill-lm", "--teacher", str(tmp_path / "a"), "--teacher", str(tmp_path / "b"), *extra,
                   "--student", str(tmp_path / "s"), "-o", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_one_teacher_with_weights_is_refused(tmp_path):
    result = _run(["distill-lm", "--teacher", str(tmp_path / "a"), "--teacher-weights", "1",
                   "--student", str(tmp_path / "s"), "-o", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "teacher_weights" in result.output, result.output


def test_distillation_trainer_with_two_teacher_folders_trains(tmp_path, tiny):
    from divergent.hf import DistillationConfig, DistillationTrainer

    tok, a, b, student = tiny
    for name, model in (("a", a), ("b", b)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    args = DistillationConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                              learning_rate=0.1, optim="sgd", save_strategy="no", use_cpu=True, report_to=[],
                              disable_tqdm=True, logging_steps=1, temperature=2.0, teacher_weights=[3, 1])
    before = copy.deepcopy(student)
    trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=[tmp_path / "a", tmp_path / "b"],
                                  args=args, train_dataset=H.prompt_completion_rows(8), processing_class=tok)
    assert isinstance(trainer.teacher_model, TeacherMixture)
    assert trainer.teacher_model.weights == pytest.approx([0.75, 0.25])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before.parameters()))
    with pytest.raises(ValueError, match="2 weights given for 3 teachers"):
        DistillationTrainer(model=copy.deepcopy(student), teacher_model=[a, b, a],
                            args=DistillationConfig(output_dir=str(tmp_path / "o2"), use_cpu=True, report_to=[],
                                                    teacher_weights=[1, 2]),
                            train_dataset=H.prompt_completion_rows(8), processing_class=tok)


def test_a_comparison_with_generations_runs_with_a_mixture_that_does_not_generate(tmp_path, tiny):
    """--seeds with generation prompts: the students generate; the mixture (logits only) has no generation metrics."""
    import json

    tok, a, b, student = tiny
    _save_three(tmp_path, tok, a, b, student)
    data = H.write_jsonl(tmp_path / "rows.jsonl", H.prompt_completion_rows(12))
    result = _run(["distill-lm", "--teacher", str(tmp_path / "a"), "--teacher", str(tmp_path / "b"), "--seeds",
                   "0,1", "-d", "forward_kl", "--student", str(tmp_path / "student"), "--data", str(data), "--steps",
                   "1", "--batch-size", "4", "--threads", "1", "--set", "generation_prompts=2", "-o",
                   str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("distill-lm-")]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["teacher"].get("rouge_l") is None
    assert [r["rouge_l"] is not None for r in results["runs"]] == [True] * 4  # 2 rows x 2 seeds generated
