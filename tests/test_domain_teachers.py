"""One teacher per domain: each row is distilled from its own domain's teacher.

The reference is written out in float64 from each teacher's and the student's own HF logits (autograd for
the gradient): sum over rows b and counted positions t of T^2 * KL(p_{teacher(domain b)} || q) / n, with n
the normaliser given (the step's global count), never through the code under test."""

import copy
import csv
import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")
import lm_helpers as H  # noqa: E402

from divergent.cli import app  # noqa: E402
from divergent.models.domain_teachers import DomainTeachers  # noqa: E402
from divergent.models.gpt import GPTConfig, TinyGPT  # noqa: E402
from divergent.train.ddk import DomainMixingTrainer  # noqa: E402
from divergent.train.lm import Batch, LMDistillConfig, LMObjective, evaluate_lm  # noqa: E402
from divergent.train.run import Checkpointer, RunInterrupted, current_interrupt, drive  # noqa: E402
from signal_helpers import ctrl_c_in_drive  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    tok = H.tokenizer()
    a, b = H.llama(len(tok), 48, 2, seed=1).double(), H.llama(len(tok), 40, 1, seed=2).double()
    with torch.no_grad():  # different, peaked teachers: a row scored against the wrong one is far off
        a.lm_head.weight.mul_(30)
        b.lm_head.weight.mul_(-30)
    return tok, a, b, H.llama(len(tok), 32, 1, seed=0).double()


@pytest.mark.parametrize("fused", [True, False])
def test_each_row_is_distilled_from_its_domains_teacher(tiny, fused):
    tok, a, b, student = tiny
    temperature, normalizer = 2.0, 23.0  # a global count larger than this micro-batch's
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (4, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 6:] = -100
    domains = torch.tensor([1, 0, 1, 1])  # names ["code", "prose"]: rows 0, 2, 3 are prose (teacher b)
    teachers = DomainTeachers({"prose": b, "code": a}, ["code", "prose"])
    objective = LMObjective("forward_kl", temperature=temperature, fused=fused, chunk_size=5, hard_weight=0.5)
    student.zero_grad()
    loss = objective(student, student, Batch(ids, mask, labels, domains=domains), teacher=teachers,
                     normalizer=normalizer)
    loss.backward()
    ours = [p.grad.clone() for p in student.parameters()]

    student.zero_grad()
    with torch.no_grad():
        by_row = {0: a(input_ids=ids, attention_mask=mask).logits, 1: b(input_ids=ids, attention_mask=mask).logits}
    z = torch.stack([by_row[int(d)][row] for row, d in enumerate(domains)]).double()[:, :-1]
    s = student(input_ids=ids, attention_mask=mask).logits.double()[:, :-1]
    p, logp = torch.softmax(z / temperature, -1), torch.log_softmax(z / temperature, -1)
    kl = (p * (logp - torch.log_softmax(s / temperature, -1))).sum(-1)
    targets = labels[:, 1:]
    counted = targets != -100
    ce = -torch.log_softmax(s, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = (temperature**2 * kl[counted].sum() + 0.5 * ce[counted].sum()) / normalizer
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-9)
    for got, want in zip(ours, (p.grad for p in student.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)
    # and not the loss against one teacher for every row
    wrong = objective(student, student, Batch(ids, mask, labels), teacher=a, normalizer=normalizer)
    assert abs(float(wrong.detach()) - float(loss.detach())) > 1e-2


def test_evaluation_reads_each_rows_teacher(tiny):
    tok, a, b, student = tiny
    teachers = DomainTeachers({"code": a, "prose": b}, ["code", "prose"])
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, len(tok), (7,), generator=gen).tolist() for _ in range(3)]
    examples = [{"input_ids": r, "labels": r, "domain_index": d} for r, d in zip(rows, [0, 1, 1])]
    metrics = evaluate_lm(student, examples, teacher=teachers, batch_size=2)
    nll = []
    for r, d in zip(rows, [0, 1, 1]):
        ids = torch.tensor([r])
        with torch.no_grad():
            logp = torch.log_softmax((a, b)[d](input_ids=ids).logits.double(), -1)[0, :-1]
        nll.append(-logp.gather(1, ids[0, 1:, None]))
    assert metrics["teacher_loss"] == pytest.approx(float(torch.cat(nll).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="needs each row's domain"):
        evaluate_lm(student, [{"input_ids": rows[0], "labels": rows[0]}], teacher=teachers)


def test_unknown_and_missing_domains_are_named(tiny):
    _, a, b, _ = tiny
    with pytest.raises(ValueError, match=r"domain 'prse', which the data does not have \(did you mean 'prose'\?\)"):
        DomainTeachers({"code": a, "prse": b}, ["code", "prose"])
    with pytest.raises(ValueError, match=r"no teacher for domain\(s\) 'prose'.*--teacher prose=PATH"):
        DomainTeachers({"code": a}, ["code", "prose"])


# ------------------------------------------------------------------ the LM trainer: resume exact

VOCAB = 48


def _gpt(seed, d_model=32, scale=1.0):
    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(vocab_size=VOCAB, d_model=d_model, n_layers=1, n_heads=2, max_seq_len=32))
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def _rows(low, high, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(low, high, (10,), generator=gen).tolist()), "labels": list(ids)}
            for _ in range(n)]


def _trainer(mixing="uniform", steps=8, **overrides):
    train = {"a": _rows(3, 20, 12, 0), "b": _rows(20, 48, 12, 1)}
    evaluation = {"a": _rows(3, 20, 3, 2), "b": _rows(20, 48, 3, 3)}
    teachers = DomainTeachers({"a": _gpt(1, 48, 5.0), "b": _gpt(2, 48, -5.0)}, ["a", "b"])
    config = LMDistillConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=1, log_every=1, seed=2, **overrides)
    return DomainMixingTrainer(_gpt(0), teachers, train, evaluation, config, mixing=mixing, interval=3,
                               teacher_ppl=(3.0, 5.0), eval_batch_size=3)


def test_trainer_with_teachers_by_domain_resumes_exactly(tmp_path):
    reference = _trainer()
    drive(reference)
    checkpointer = Checkpointer(tmp_path / "ck")

    def ctrl_c(record):
        if record["step"] == 4:
            current_interrupt().request()

    with pytest.raises(RunInterrupted):
        drive(_trainer(), checkpointer=checkpointer, checkpoint_every=100, on_step=ctrl_c)
    second = _trainer()
    drive(second, checkpointer=checkpointer, resume=True)
    assert second.history == reference.history
    for p, q in zip(second.student.parameters(), reference.student.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ------------------------------------------------------------------ CLI and DistillationTrainer


def _save(tmp_path, tok, **models):
    for name, model in models.items():
        model.float().save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)


def _task_rows():
    rows = [{**row, "task": "parity"} for row in H.prompt_completion_rows(10)]
    return rows + [{"prompt": f"what is {i} plus {i}?", "completion": f" {2 * i}.", "task": "sums"} for i in range(10)]


def _cli_run(tmp_path, out, mixing, parity, sums, rows=None, extra=()):
    data = H.write_jsonl(tmp_path / "tasks.jsonl", _task_rows() if rows is None else rows)
    result = CliRunner().invoke(app, [
        "distill-lm", "--teacher", f"sums={tmp_path / sums}", "--teacher", f"parity={tmp_path / parity}",
        "--student", str(tmp_path / "student"), "--data", str(data), "--domain-column", "task", "--mixing", mixing,
        "--ddk-interval", "1", "--steps", "2", "--batch-size", "4", "--max-length", "30", "--threads", "1",
        "--set", "include_scratch=false", *extra, "-o", str(tmp_path / out)])
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in (tmp_path / out).iterdir() if p.name.startswith("distill-lm-")]
    return run_dir, json.loads((run_dir / "results.json").read_text())["rows"][0]


@pytest.mark.parametrize("mixing", ["uniform", "ddk"])
def test_cli_distils_each_domain_from_its_teacher(tmp_path, tiny, mixing):
    tok, a, b, student = tiny
    _save(tmp_path, tok, a=copy.deepcopy(a), b=copy.deepcopy(b), student=copy.deepcopy(student))
    run_dir, row = _cli_run(tmp_path, "runs", mixing, "a", "b")
    report = (run_dir / "report.md").read_text()
    assert f"sums = {tmp_path / 'b'}" in report and f"parity = {tmp_path / 'a'}" in report
    assert row["domains"]["names"] == ["parity", "sums"]
    with open(run_dir / "domains.csv") as handle:
        assert {(r["domain"], r["teacher"]) for r in csv.DictReader(handle)} == {
            ("parity", str(tmp_path / "a")), ("sums", str(tmp_path / "b"))}
    # each domain's teacher perplexity is its own teacher's: with teacher a for both domains,
    # parity's is unchanged and sums' is another
    _, same = _cli_run(tmp_path, "same", mixing, "a", "a")
    assert row["domains"]["teacher_ppl"][0] == pytest.approx(same["domains"]["teacher_ppl"][0], rel=1e-6)
    assert row["domains"]["teacher_ppl"][1] != pytest.approx(same["domains"]["teacher_ppl"][1], rel=1e-2)


def test_cli_proportional_mixing_with_a_teacher_per_domain(tmp_path, tiny):
    """--mixing proportional: each domain drawn by its share of the training rows (16 parity, 10 sums; the
    evaluation rows given apart), and the domain table names each domain's teacher."""
    tok, a, b, student = tiny
    _save(tmp_path, tok, a=copy.deepcopy(a), b=copy.deepcopy(b), student=copy.deepcopy(student))
    rows = _task_rows()
    evaluation = H.write_jsonl(tmp_path / "eval.jsonl", rows[::5])
    run_dir, row = _cli_run(tmp_path, "runs", "proportional", "a", "b", rows=rows + rows[:6],
                            extra=("--eval-data", str(evaluation)))
    report = (run_dir / "report.md").read_text()
    assert "drawn by proportional (each domain by its share of the training rows)" in report
    assert f"sums = {tmp_path / 'b'}" in report and f"parity = {tmp_path / 'a'}" in report
    assert row["domains"]["names"] == ["parity", "sums"]
    with open(run_dir / "domains.csv") as handle:
        table = {r["domain"]: r for r in csv.DictReader(handle)}
    assert {name: r["teacher"] for name, r in table.items()} == {"parity": str(tmp_path / "a"),
                                                                  "sums": str(tmp_path / "b")}
    assert float(table["parity"]["final_weight"]) == pytest.approx(16 / 26, abs=1e-3)
    assert float(table["sums"]["final_weight"]) == pytest.approx(10 / 26, abs=1e-3)
    # fixed weights: never measured again after the start
    assert [h["weights"] for h in row["domains"]["history"]] == [pytest.approx([16 / 26, 10 / 26])] * len(
        row["domains"]["history"])


@pytest.mark.parametrize("teachers, extra, message", [
    (["parity=A", "sums=B", "chat=C"], [], "'chat', which the data does not have"),
    (["parity=A"], [], "no teacher for domain(s) 'sums'"),
    (["parity=A", "sums=B"], ["--teacher-weights", "1,2"], "cannot be combined with teacher_weights"),
    (["parity=A", "parity=B"], [], "domain 'parity' is given two teachers"),
])
def test_bad_teachers_by_domain_are_one_line_exit_2(tmp_path, tiny, teachers, extra, message):
    tok, a, b, student = tiny
    _save(tmp_path, tok, A=copy.deepcopy(a), B=copy.deepcopy(b), C=copy.deepcopy(a), student=copy.deepcopy(student))
    data = H.write_jsonl(tmp_path / "tasks.jsonl", _task_rows())
    args = [x for t in teachers for x in ("--teacher", t.replace("=", f"={tmp_path}/"))]
    result = CliRunner().invoke(app, ["distill-lm", *args, *extra, "--student", str(tmp_path / "student"),
                                      "--data", str(data), "--domain-column", "task", "--steps", "1",
                                      "--threads", "1", "-o", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_teacher_by_domain_without_a_domain_column_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["distill-lm", "--teacher", "code=A", "--teacher", "prose=B",
                                      "--student", "S", "-o", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "needs --domain-column" in result.output, result.output


def test_distillation_trainer_takes_a_teacher_per_domain(tmp_path, tiny):
    from divergent.hf import DistillationConfig, DistillationTrainer

    tok, a, b, student = tiny
    _save(tmp_path, tok, a=copy.deepcopy(a))
    args = DistillationConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                              learning_rate=0.05, optim="sgd", save_strategy="no", use_cpu=True, report_to=[],
                              disable_tqdm=True, logging_steps=1, domain_column="task", mixing="uniform")
    trainer = DistillationTrainer(model=copy.deepcopy(student).float(),
                                  teacher_model={"parity": tmp_path / "a", "sums": copy.deepcopy(b).float()},
                                  args=args, train_dataset=_task_rows(), processing_class=tok)
    assert isinstance(trainer.teacher_model, DomainTeachers) and trainer.teacher_model.names == ["parity", "sums"]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert "domain_index" in trainer.data_collator(trainer.eval_dataset.examples[:4])
    # on-policy steps: the student's continuations keep their rows' domains
    on_policy = DistillationTrainer(model=copy.deepcopy(student).float(), teacher_model={"parity": a, "sums": b},
                                    args=dataclasses.replace(args, output_dir=str(tmp_path / "op"),
                                                             on_policy_fraction=1.0, max_new_tokens=4),
                                    train_dataset=_task_rows(), processing_class=tok)
    on_policy.train()
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in on_policy.state.log_history if "loss" in h])))
    with pytest.raises(ValueError, match="'prse', which the data does not have"):
        DistillationTrainer(model=copy.deepcopy(student).float(), teacher_model={"parity": a, "prse": b}, args=args,
                            train_dataset=_task_rows(), processing_class=tok)
    with pytest.raises(ValueError, match="needs args.domain_column"):
        DistillationTrainer(model=copy.deepcopy(student).float(), teacher_model={"parity": a},
                            args=DistillationConfig(output_dir=str(tmp_path / "o2"), use_cpu=True, report_to=[]),
                            train_dataset=_task_rows(), processing_class=tok)


def test_cli_run_interrupted_then_resumed_equals_the_uninterrupted_run(tmp_path, tiny, monkeypatch):
    from divergent.experiments import lm as experiment

    tok, a, b, student = tiny
    _save(tmp_path, tok, a=copy.deepcopy(a), b=copy.deepcopy(b), student=copy.deepcopy(student))
    data = H.write_jsonl(tmp_path / "tasks.jsonl", _task_rows())
    args = ["--teacher", f"parity={tmp_path / 'a'}", "--teacher", f"sums={tmp_path / 'b'}", "--student",
            str(tmp_path / "student"), "--data", str(data), "--domain-column", "task", "--ddk-interval", "2",
            "--steps", "5", "--batch-size", "4", "--max-length", "30", "--threads", "1",
            "--set", "include_scratch=false", "--set", "checkpoint_every=2"]
    reference = CliRunner().invoke(app, ["distill-lm", *args, "-o", str(tmp_path / "reference")])
    assert reference.exit_code == 0, reference.output
    ctrl_c_in_drive(monkeypatch, experiment, 3)
    first = CliRunner().invoke(app, ["distill-lm", *args, "-o", str(tmp_path / "runs")])
    assert first.exit_code == 130, first.output
    monkeypatch.undo()
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("distill-lm-")]
    resumed = CliRunner().invoke(app, ["distill-lm", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    got = json.loads((run_dir / "results.json").read_text())["rows"][0]
    (ref_dir,) = [p for p in (tmp_path / "reference").iterdir() if p.name.startswith("distill-lm-")]
    want = json.loads((ref_dir / "results.json").read_text())["rows"][0]
    assert [h["weights"] for h in got["domains"]["history"]] == [h["weights"] for h in want["domains"]["history"]]
    assert got["domains"]["after"] == pytest.approx(want["domains"]["after"], rel=1e-9)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-9)


def test_sequence_level_kd_from_teachers_that_only_give_logits_is_refused():
    teachers = DomainTeachers({"a": _gpt(1), "b": _gpt(2)}, ["a", "b"])
    with pytest.raises(ValueError, match="seq_kd_fraction=0.5 needs a teacher that generates"):
        DomainMixingTrainer(_gpt(0), teachers, {"a": _rows(3, 20, 4, 0), "b": _rows(20, 48, 4, 1)},
                            {"a": _rows(3, 20, 2, 2), "b": _rows(20, 48, 2, 3)},
                            LMDistillConfig(steps=2, batch_size=2, seq_kd_fraction=0.5), mixing="uniform")



def test_on_policy_steps_keep_each_rows_domain_in_the_lm_trainer():
    """Every step on the student's own continuations: each generated row is still scored by its domain's teacher
    (a row without its domain would be refused by DomainTeachers)."""
    trainer = _trainer(steps=2, on_policy_fraction=1.0, max_new_tokens=4)
    drive(trainer)
    assert len(trainer.history) == 2 and all(torch.isfinite(torch.tensor([h["loss"] for h in trainer.history])))


def test_a_folder_whose_name_holds_an_equals_sign_is_a_path(tmp_path, monkeypatch):
    from divergent.models.domain_teachers import is_domain_teacher

    monkeypatch.chdir(tmp_path)
    assert is_domain_teacher("code=teacher-a") and not is_domain_teacher("runs/code=a")
    (tmp_path / "code=teacher-a").mkdir()
    assert not is_domain_teacher("code=teacher-a")
