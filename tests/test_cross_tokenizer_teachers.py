"""Cross-tokenizer distillation (ULD) from a served and from a cached teacher, against the same teacher loaded locally.

A served or cached teacher gives its top-k log-probs; ``topk_to_dense_logprobs`` spreads the
tail mass uniformly over the other ids. With k = the teacher's whole vocabulary that is the
teacher's distribution itself, so the loss equals the local teacher's; at smaller k each
position's ULD moves by at most 2τ (τ = the tail mass: the top-k stay in place when sorted and
the tail's L1 change is at most 2τ; sorted L1 obeys the triangle inequality), so the step loss,
a sum over at most ``n`` aligned positions divided by ``n``, moves by at most 2·max τ.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from divergent.cli import app
from divergent.functional.topk import TopK, topk_to_dense_logprobs

pytest.importorskip("transformers")
import lm_helpers as H  # noqa: E402
from served_server import Server, ServedModel  # noqa: E402

runner = CliRunner()
V_TEACHER = 400


# -- the dense completion of a top-k teacher ------------------------------------------------------


def test_k_equal_to_the_vocabulary_is_the_distribution_itself():
    logits = torch.randn(3, 5, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    dense = topk_to_dense_logprobs(TopK.from_logits(logits, k=11), 11)
    torch.testing.assert_close(dense, torch.log_softmax(logits, -1), rtol=0, atol=1e-14)


def test_uniform_tail_by_hand_in_float64():
    """k = 2 of V = 6 keeps 0.5 and 0.25; the 0.25 left goes to the 4 other ids, 0.0625 each."""
    top = TopK(torch.tensor([[1, 3]]), torch.log(torch.tensor([[0.5, 0.25]], dtype=torch.float64)))
    dense = topk_to_dense_logprobs(top, 6).exp()[0].numpy()
    np.testing.assert_allclose(dense, [0.25 / 4, 0.5, 0.25 / 4, 0.25, 0.25 / 4, 0.25 / 4], rtol=1e-15)
    # mass is kept for random top-k of random distributions, and the top-k values are untouched
    logits = torch.randn(4, 7, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for k in (1, 5, 49):
        top = TopK.from_logits(logits, k)
        dense = topk_to_dense_logprobs(top, 50)
        torch.testing.assert_close(dense.exp().sum(-1), torch.ones(4, 7, dtype=torch.float64), rtol=0, atol=1e-13)
        torch.testing.assert_close(dense.gather(-1, top.indices), top.logprobs, rtol=0, atol=1e-13)
        tail = 1 - top.logprobs.exp().sum(-1, keepdim=True)
        others = dense.exp().scatter(-1, top.indices, float("nan"))
        np.testing.assert_allclose(others[~others.isnan()].reshape(4, 7, 50 - k).numpy(),
                                   (tail / (50 - k)).expand(4, 7, 50 - k).numpy(), rtol=1e-10)


def test_sorted_l1_to_the_truth_is_at_most_twice_the_tail():
    from divergent.functional.cross_tokenizer import uld_distance

    logits = torch.randn(64, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2
    for k in (1, 4, 12):
        top = TopK.from_logits(logits, k)
        tau = 1 - top.logprobs.exp().sum(-1)
        gap = uld_distance(topk_to_dense_logprobs(top, 30), logits, reduction="none")
        assert (gap <= 2 * tau + 1e-12).all() and (gap > 0).any()


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda t: topk_to_dense_logprobs(t.logprobs, 10), TypeError, "teacher must be a TopK"),
    (lambda t: topk_to_dense_logprobs(t, 2), ValueError, "vocab_size must be an int >= k=3"),
    (lambda t: topk_to_dense_logprobs(t, 5), ValueError, "indices go up to 7, outside vocab_size=5"),
])
def test_bad_input_names_the_argument(call, error, match):
    top = TopK(torch.tensor([[7, 1, 2]]), torch.log(torch.tensor([[0.5, 0.2, 0.1]])))
    with pytest.raises(error, match=match):
        call(top)


# -- the objective with each kind of teacher ---------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 300-token student and a 400-token teacher (each saved with its own tokenizer)."""
    root = tmp_path_factory.mktemp("ct")
    student_tok, teacher_tok = H.tokenizer(300), H.tokenizer(V_TEACHER)
    teacher, student = H.llama(len(teacher_tok), 48, 2, seed=1), H.llama(len(student_tok), 32, 1, seed=0)
    teacher.save_pretrained(root / "teacher")
    teacher_tok.save_pretrained(root / "teacher")
    student.save_pretrained(root / "student")
    student_tok.save_pretrained(root / "student")
    return {"root": root, "student_tok": student_tok, "teacher_tok": teacher_tok, "teacher": teacher.eval(),
            "student": student}


@pytest.fixture
def server(models):
    served = ServedModel(models["teacher"], models["teacher_tok"], max_logprobs=V_TEACHER)
    with Server(served) as url:
        served.url = url
        yield served


def _student_batch(tok, n=4):
    from divergent.train.lm import Batch

    rows = []
    for r in H.prompt_completion_rows(n):
        prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        answer = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return Batch.from_examples(rows, tok.pad_token_id)


def _tail_max(teacher, t_ids, t_mask, k):
    with torch.no_grad():
        probs = torch.softmax(teacher(input_ids=t_ids, attention_mask=t_mask).logits.double(), -1)
    return float((1 - probs.topk(k, -1).values.sum(-1))[t_mask.bool()].max())


@pytest.mark.parametrize("api", ["vllm", "sglang"])
def test_served_teacher_gives_the_local_loss(models, api):
    from divergent.models.served import ServedTeacher
    from divergent.train.cross_tokenizer import CrossTokenizerObjective, teacher_batch

    s_tok, t_tok, student, teacher = models["student_tok"], models["teacher_tok"], models["student"], models["teacher"]
    batch = _student_batch(s_tok)
    n = float((batch.labels[:, 1:] != -100).sum())
    local = CrossTokenizerObjective("uld", s_tok, t_tok)(student, student, batch, teacher=teacher, normalizer=n)
    local_t2 = CrossTokenizerObjective("uld", s_tok, t_tok, temperature=2.0)(student, student, batch, teacher=teacher,
                                                                            normalizer=n)
    assert abs(float(local_t2.detach()) - float(local.detach())) > 1e-3  # the temperature matters here
    with Server(ServedModel(teacher, t_tok, api=api, max_logprobs=V_TEACHER)) as url, \
            ServedTeacher(url, t_tok, retries=0) as served:
        assert served.api == api and served.tokenizer_checked == (api == "vllm")
        full = CrossTokenizerObjective("uld", s_tok, t_tok, served=served, top_k=V_TEACHER)
        torch.testing.assert_close(full(student, student, batch, normalizer=n), local, rtol=1e-5, atol=1e-6)
        full_t2 = CrossTokenizerObjective("uld", s_tok, t_tok, served=served, top_k=V_TEACHER, temperature=2.0)
        torch.testing.assert_close(full_t2(student, student, batch, normalizer=n), local_t2, rtol=1e-5, atol=1e-6)
        t_ids, t_mask, _ = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels, s_tok, t_tok)
        for k in (8, 64):
            got = CrossTokenizerObjective("uld", s_tok, t_tok, served=served, top_k=k)(student, student, batch,
                                                                                       normalizer=n)
            bound = 2 * _tail_max(teacher, t_ids, t_mask, k)
            gap = abs(float(got.detach()) - float(local.detach()))
            assert 0 < gap <= bound, (k, gap, bound)
        # the teacher side is one method: the batch in the teacher's tokens and dense [B, Lt, Vt] log-probs
        ids, mask, labels, dense = full.teacher_side(batch)
        assert torch.equal(ids, t_ids) and dense.shape == (*t_ids.shape, V_TEACHER)
        torch.testing.assert_close(dense.exp().sum(-1), torch.ones(t_ids.shape), rtol=0, atol=1e-5)


def _cache(models, tmp_path, k, dtype="float32", rows=None):
    from divergent.data.lm_data import tokenize_rows
    from divergent.data.teacher_cache import TeacherCache, write_teacher_cache
    from divergent.models.hf import tokenizer_fingerprint

    rows = rows or H.prompt_completion_rows(4)
    examples, _ = tokenize_rows(rows, models["teacher_tok"], max_length=64, source="rows")
    write_teacher_cache(models["teacher"], {"train": examples}, tmp_path / "cache", k=k, vocab_size=V_TEACHER,
                        tokenizer_fingerprint=tokenizer_fingerprint(models["teacher_tok"]), logprob_dtype=dtype)
    return TeacherCache(tmp_path / "cache")


def test_cached_teacher_gives_the_local_loss(models, tmp_path):
    from divergent.train.cross_tokenizer import CrossTokenizerObjective, student_rows, teacher_batch
    from divergent.train.lm import Batch

    s_tok, t_tok, student, teacher = models["student_tok"], models["teacher_tok"], models["student"], models["teacher"]
    for k in (V_TEACHER, 8):
        cache = _cache(models, tmp_path / str(k), k)
        rows = student_rows(cache.examples(), t_tok, s_tok)
        batch = Batch.from_examples(rows, s_tok.pad_token_id)
        # the student's rows are the same text: re-tokenized for the teacher they are the cache's tokens again
        t_ids, t_mask, t_labels = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels, s_tok, t_tok)
        assert torch.equal(t_ids, batch.teacher_rows["input_ids"]) and torch.equal(t_labels, batch.teacher_rows["labels"])
        assert s_tok.decode(rows[0]["input_ids"]) == t_tok.decode(cache.example(0)["input_ids"])
        n = float((batch.labels[:, 1:] != -100).sum())
        objective = CrossTokenizerObjective("uld", s_tok, t_tok)
        local = objective(student, student, Batch(batch.input_ids, batch.attention_mask, batch.labels),
                          teacher=teacher, normalizer=n)
        cached = objective(student, student, batch, normalizer=n)  # no teacher model: the batch carries it
        if k == V_TEACHER:
            torch.testing.assert_close(cached, local, rtol=1e-5, atol=1e-6)
        else:
            assert 0 < abs(float(cached.detach()) - float(local.detach())) <= 2 * _tail_max(teacher, t_ids, t_mask, k)
        halves = sum(objective(student, student, batch.rows(i, i + 2), normalizer=n) for i in (0, 2))
        torch.testing.assert_close(halves, cached, rtol=1e-5, atol=1e-6)  # micro-batches cut the teacher rows too


def test_distillation_trainer_with_served_and_cached_teachers(models, server, tmp_path):
    from divergent.hf import DistillationConfig, DistillationTrainer
    from divergent.models.served import ServedTeacherError

    settings = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, save_strategy="no", use_cpu=True,
                    report_to=[], seed=0, disable_tqdm=True, logging_steps=1, cross_tokenizer="uld", teacher_top_k=16)
    s_tok, t_tok = models["student_tok"], models["teacher_tok"]
    cache = _cache(models, tmp_path, 16, "float16")
    teachers = [("served", dict(teacher_model=server.url, teacher_processing_class=t_tok,
                                train_dataset=H.prompt_completion_rows(8))),
                ("cached", dict(teacher_processing_class=t_tok))]
    for mode, (name, kwargs) in [(mode, teacher) for mode in ("uld", "gold") for teacher in teachers]:
        gold = dict(divergence="forward_kl", gold_strategy="bayesian") if mode == "gold" else {}
        args = DistillationConfig(output_dir=str(tmp_path / name / mode), teacher_cache=str(cache.directory)
                                  if name == "cached" else None, **{**settings, "cross_tokenizer": mode, **gold})
        student = H.llama(len(s_tok), 32, 1, seed=0)
        trainer = DistillationTrainer(model=student, args=args, processing_class=s_tok, **kwargs)
        before = [p.detach().clone() for p in student.parameters()]
        sequences = server.sequences
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == 2 and all(0 < x < 20 for x in losses), (name, mode, losses)
        assert trainer.objective.mode == mode
        assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
        assert (server.sequences > sequences) == (name == "served")
    # a cache read with another tokenizer than its own, and more log-probs than the server allows
    args = DistillationConfig(output_dir=str(tmp_path / "bad"), teacher_cache=str(cache.directory), **settings)
    with pytest.raises(ValueError, match="written with another tokenizer than --teacher-tokenizer"):
        DistillationTrainer(model=H.llama(len(s_tok), 32, 1), args=args, processing_class=s_tok,
                            teacher_processing_class=s_tok)
    with pytest.raises(ValueError, match="holds no copy of its tokenizer .*; give --teacher-tokenizer PATH"):
        DistillationTrainer(model=H.llama(len(s_tok), 32, 1), args=args, processing_class=s_tok)  # (none saved here)
    args = DistillationConfig(output_dir=str(tmp_path / "t"), **settings)
    with pytest.raises(ValueError, match="served teacher needs teacher_processing_class"):
        DistillationTrainer(model=H.llama(len(s_tok), 32, 1), teacher_model=server.url, args=args,
                            processing_class=s_tok, train_dataset=H.prompt_completion_rows(4))
    server.max_logprobs = 20
    args = DistillationConfig(output_dir=str(tmp_path / "k"), **{**settings, "teacher_top_k": 32})
    trainer = DistillationTrainer(model=H.llama(len(s_tok), 32, 1), teacher_model=server.url, args=args,
                                  processing_class=s_tok, teacher_processing_class=t_tok,
                                  train_dataset=H.prompt_completion_rows(4))
    with pytest.raises(ServedTeacherError, match="--max-logprobs 32"):
        trainer.train()


# -- the commands ------------------------------------------------------------------------------------


def _uld_falls(models, run_dir, cache_dir):
    """The run finished, saved its student, and that student's ULD to the cached teacher (all its rows) fell."""
    from transformers import AutoModelForCausalLM

    from divergent.data.teacher_cache import TeacherCache
    from divergent.train.cross_tokenizer import CrossTokenizerObjective, student_rows
    from divergent.train.lm import Batch

    results = json.loads((run_dir / "results.json").read_text())
    assert {(r["label"], r["status"]) for r in results["rows"]} == {("scratch", "finished"), ("uld", "finished")}
    s_tok, t_tok = models["student_tok"], models["teacher_tok"]
    batch = Batch.from_examples(student_rows(TeacherCache(cache_dir).examples(), t_tok, s_tok), s_tok.pad_token_id)
    objective = CrossTokenizerObjective("uld", s_tok, t_tok)
    with torch.no_grad():
        before = float(objective(models["student"], None, batch))
        after = float(objective(AutoModelForCausalLM.from_pretrained(run_dir / "runs" / "uld" / "model"), None, batch))
    assert after < before, (before, after)


def _cache_teacher_cli(models, tmp_path):
    """``divergent cache-teacher`` of the teacher (its own tokenizer) over 16 prompt/completion rows, k = 16."""
    data = H.write_jsonl(tmp_path / "pc.jsonl", H.prompt_completion_rows(16))
    cache = tmp_path / "cache"
    result = runner.invoke(app, ["cache-teacher", "--teacher", str(models["root"] / "teacher"), "--data", str(data),
                                 "--k", "16", "-o", str(cache), "--threads", "1"])
    assert result.exit_code == 0, result.output
    return cache


def test_cache_teacher_then_distill_lm_across_tokenizers(models, tmp_path):
    cache = _cache_teacher_cli(models, tmp_path)
    assert (cache / "teacher-tokenizer" / "tokenizer.json").is_file()
    base = ["distill-lm", "--teacher-cache", str(cache), "--student", str(models["root"] / "student"),
            "--cross-tokenizer", "uld", "--batch-size", "4", "--threads", "1", "--set", "evaluations=1"]
    result = runner.invoke(app, [*base, "--steps", "8", "--lr", "1e-2", "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    _uld_falls(models, next((tmp_path / "runs").iterdir()), cache)
    # --teacher-tokenizer names the cache's tokenizer; another one is refused in one line
    bad = runner.invoke(app, [*base, "--teacher-tokenizer", str(models["root"] / "student"), "-o", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "written with another tokenizer than --teacher-tokenizer" in bad.output, bad.output
    assert len(bad.output.strip().splitlines()) == 1 and "Traceback" not in bad.output
    # the student's generations need a teacher that reads new text: a cache alone is refused
    bad = runner.invoke(app, [*base, "--on-policy", "0.5", "-o", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "needs a local --teacher PATH to score the student's generated text" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and "Traceback" not in bad.output


def test_distill_lm_with_a_served_teacher_across_tokenizers(models, server, tmp_path):
    data = H.write_jsonl(tmp_path / "pc.jsonl", H.prompt_completion_rows(16))
    base = ["distill-lm", "--teacher", server.url, "--student", str(models["root"] / "student"), "--data", str(data),
            "--cross-tokenizer", "uld", "--batch-size", "4", "--threads", "1", "--set", "evaluations=1"]
    teacher_tok = ["--teacher-tokenizer", str(models["root"] / "teacher")]
    result = runner.invoke(app, [*base, *teacher_tok, "--steps", "8", "--lr", "1e-2", "--set", "teacher_top_k=16",
                                 "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "runs").iterdir())
    _uld_falls(models, run, run / "teacher-cache")
    assert json.loads((run / "teacher-cache" / "index.json").read_text())["vocab_size"] == V_TEACHER
    server.max_logprobs = 20
    for args, message in [
        ([], "needs --teacher-tokenizer PATH"),
        (["--teacher-tokenizer", str(models["root"] / "student")], "tokenizer differs from --teacher-tokenizer"),
        ([*teacher_tok, "--set", "teacher_top_k=32"], "--max-logprobs 32"),
        ([*teacher_tok, "--teacher-model", "nope"], "--teacher-model 'nope' is not served"),
    ]:
        bad = runner.invoke(app, [*base, *args, "-o", str(tmp_path / "bad")])
        assert bad.exit_code == 2 and message in bad.stderr, (args, bad.output)  # (stdout: the teacher it reached)
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.output


def test_an_interrupted_served_run_resumes_to_the_uninterrupted_result(models, server, tmp_path, monkeypatch):
    """Ctrl-C in the ULD student's step 3; --resume reads the run's teacher-cache (no new requests) and ends equal."""
    data = H.write_jsonl(tmp_path / "pc.jsonl", H.prompt_completion_rows(16))
    args = ["distill-lm", "--teacher", server.url, "--teacher-tokenizer", str(models["root"] / "teacher"), "--student",
            str(models["root"] / "student"), "--data", str(data), "--cross-tokenizer", "uld", "--steps", "6",
            "--batch-size", "4", "--threads", "1", "--set", "teacher_top_k=16", "--set", "checkpoint_every=2"]
    assert runner.invoke(app, [*args, "-o", str(tmp_path / "reference")]).exit_code == 0
    H.ctrl_c_in_student(monkeypatch, 2, 3)  # the ULD student (after scratch), after its step 3
    assert runner.invoke(app, [*args, "-o", str(tmp_path / "cut")]).exit_code == 130
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "cut").iterdir()
    requests = server.requests
    resumed = runner.invoke(app, ["distill-lm", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert server.requests == requests  # the teacher's top-k were cached in the run folder the first time
    (reference,) = (tmp_path / "reference").iterdir()
    rows = {r["label"]: r for r in json.loads((run_dir / "results.json").read_text())["rows"]}
    want = {r["label"]: r for r in json.loads((reference / "results.json").read_text())["rows"]}
    for label in ("scratch", "uld"):
        assert rows[label]["loss"] == pytest.approx(want[label]["loss"], rel=1e-6), label
        assert [h.get("loss") for h in rows[label]["history"]] == pytest.approx(
            [h.get("loss") for h in want[label]["history"]], rel=1e-6)


# -- GOLD from the same served and cached teachers --------------------------------------------------


def test_gold_from_served_and_cached_teachers_gives_the_local_loss(models, tmp_path):
    """GOLD reads the teacher through the same teacher_side: at k = V the served and the cached teacher give the
    local teacher's loss; at k = 8 the uniform tail changes it, but it stays finite and positive."""
    from divergent.models.served import ServedTeacher
    from divergent.train.cross_tokenizer import CrossTokenizerObjective, student_rows
    from divergent.train.lm import Batch

    s_tok, t_tok, student, teacher = models["student_tok"], models["teacher_tok"], models["student"], models["teacher"]
    gold = {"divergence": "forward_kl", "strategy": "bayesian"}
    batch = _student_batch(s_tok)
    n = float((batch.labels[:, 1:] != -100).sum())
    local = CrossTokenizerObjective("gold", s_tok, t_tok, gold=gold)(student, student, batch, teacher=teacher,
                                                                      normalizer=n)
    assert float(local.detach()) > 0
    with Server(ServedModel(teacher, t_tok, max_logprobs=V_TEACHER)) as url, ServedTeacher(url, t_tok, retries=0) as served:
        full = CrossTokenizerObjective("gold", s_tok, t_tok, gold=gold, served=served, top_k=V_TEACHER)
        torch.testing.assert_close(full(student, student, batch, normalizer=n), local, rtol=1e-5, atol=1e-6)
        small = CrossTokenizerObjective("gold", s_tok, t_tok, gold=gold, served=served, top_k=8)
        got = float(small(student, student, batch, normalizer=n).detach())
        assert np.isfinite(got) and got > 0 and abs(got - float(local.detach())) > 1e-6
    cache = _cache(models, tmp_path, V_TEACHER)
    cached_batch = Batch.from_examples(student_rows(cache.examples(), t_tok, s_tok), s_tok.pad_token_id)
    objective = CrossTokenizerObjective("gold", s_tok, t_tok, gold=gold)
    plain = Batch(cached_batch.input_ids, cached_batch.attention_mask, cached_batch.labels)
    n = float((plain.labels[:, 1:] != -100).sum())
    torch.testing.assert_close(objective(student, student, cached_batch, normalizer=n),
                               objective(student, student, plain, teacher=teacher, normalizer=n), rtol=1e-5, atol=1e-6)


def test_cache_teacher_then_distill_lm_with_gold(models, tmp_path):
    cache = _cache_teacher_cli(models, tmp_path)
    result = runner.invoke(app, ["distill-lm", "--teacher-cache", str(cache), "--student", str(models["root"] / "student"),
                                 "--cross-tokenizer", "gold", "-d", "forward_kl", "--set", "gold_strategy=bayesian",
                                 "--batch-size", "4", "--threads", "1", "--set", "evaluations=1", "--steps", "8",
                                 "--lr", "1e-2", "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "runs").iterdir())
    results = json.loads((run / "results.json").read_text())
    assert {(r["label"], r["status"]) for r in results["rows"]} == {("scratch", "finished"), ("gold", "finished")}
    assert (run / "runs" / "gold" / "model" / "config.json").is_file()
