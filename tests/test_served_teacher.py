"""A served teacher (vLLM / SGLang over HTTP) read as a top-k teacher: divergent.models.served.

The server is tests/served_server.py: a thread on 127.0.0.1 answering in vLLM's (and SGLang's)
JSON from a tiny HF Llama's real log-probs. The reference is the same model loaded in this
process and cached by ``write_teacher_cache``'s local path (``teacher_topk``).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

import httpx
import pytest
import torch
from typer.testing import CliRunner

from divergent.cli import app
from divergent.data.teacher_cache import TeacherCache, write_teacher_cache
from divergent.models.served import ServedTeacher, ServedTeacherError
import lm_helpers
from served_server import Server, ServedModel

runner = CliRunner()
K = 8


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``(teacher_dir, student_dir, tokenizer, teacher_model)``."""
    root = tmp_path_factory.mktemp("served")
    teacher_dir, student_dir, tok = lm_helpers.save_pair(root)
    from divergent.models.hf import load_causal_lm

    return teacher_dir, student_dir, tok, load_causal_lm(teacher_dir, what="teacher")


@pytest.fixture
def server(pair):
    """A vLLM-like server of the teacher; ``server.served`` holds its faults and counters."""
    served = ServedModel(pair[3], pair[2])
    with Server(served) as url:
        served.url = url
        yield served


def _rows(tok, n=6):
    rows = []
    for text in lm_helpers.CORPUS[:n]:
        ids = tok(text)["input_ids"][: 6 + len(rows) * 3]  # rows of different lengths: padding inside batches
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def _teacher(served, tok, **kwargs):
    kwargs = {"retries": 3, "backoff": 0.01, **kwargs}
    return ServedTeacher(served.url, tok, **kwargs)


def test_answer_is_vllm_shaped(server, pair):
    """The fixture answers as vLLM: position 0 null, keys are ids as strings, the actual token plus the top-k."""
    ids = pair[2]("the cat sat on the mat")["input_ids"]
    answer = httpx.post(f"{server.url}/completions", json={"model": server.name, "prompt": ids, "max_tokens": 1,
                                                             "prompt_logprobs": 3}).json()
    prompt = answer["choices"][0]["prompt_logprobs"]
    assert prompt[0] is None and len(prompt) == len(ids)
    for position in range(1, len(ids)):
        assert str(ids[position]) in prompt[position]
        assert 3 <= len(prompt[position]) <= 4
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in prompt[position].values())


@pytest.mark.parametrize("api", ["vllm", "sglang"])
def test_cache_from_server_equals_local_cache(pair, tmp_path, api):
    """A cache written from the server equals the one written from the same model in-process (float16 rounding)."""
    _, _, tok, model = pair
    rows = _rows(tok)
    local = write_teacher_cache(model, {"train": rows}, tmp_path / "local", k=K, vocab_size=len(tok), batch_size=4)
    served = ServedModel(model, tok, api=api)
    with Server(served) as url:
        with ServedTeacher(url, tok, api="auto", max_in_flight=2) as teacher:
            assert teacher.api == api
            remote = write_teacher_cache(teacher, {"train": rows}, tmp_path / "remote", k=K, vocab_size=len(tok),
                                         batch_size=4)
    assert local["total_tokens"] == remote["total_tokens"]
    assert served.sequences == len(rows)
    a, b = TeacherCache(tmp_path / "local").examples(), TeacherCache(tmp_path / "remote").examples()
    for x, y in zip(a, b):
        assert x["input_ids"] == y["input_ids"]
        assert torch.equal(x["teacher_indices"], y["teacher_indices"])
        # float16 storage: half an ulp of |log p| plus the float32 difference of two forward passes
        torch.testing.assert_close(y["teacher_logprobs"], x["teacher_logprobs"], rtol=2**-10, atol=1e-4)
        torch.testing.assert_close(y["teacher_next_logprob"][:-1], x["teacher_next_logprob"][:-1],
                                   rtol=1e-5, atol=1e-4)


def test_reference_logprobs_are_the_models(pair, server):
    """Independent of the cache code: the served top-1 at each position is log_softmax(model logits).max()."""
    _, _, tok, model = pair
    ids = torch.tensor([tok("hello, how are you today?")["input_ids"]])
    teacher = _teacher(server, tok)
    indices, logprobs, next_lp = teacher.served_topk(ids, torch.ones_like(ids), k=K, vocab_size=len(tok))
    with torch.no_grad():
        reference = torch.log_softmax(model(ids).logits.double(), -1)[0]
    torch.testing.assert_close(logprobs[0, :, 0].double(), reference.max(-1).values, rtol=0, atol=1e-5)
    torch.testing.assert_close(next_lp[0, :-1].double(), reference[:-1].gather(1, ids[0, 1:, None])[:, 0],
                               rtol=0, atol=1e-5)
    assert float(next_lp[0, -1]) == 0.0


@pytest.mark.parametrize("faults", [["500", "500"], ["429"], ["cut"], ["malformed"], ["schema"], ["slow"],
                                    ["500", "cut", "malformed"]])
def test_transient_faults_are_retried(server, pair, faults):
    """5xx, a connection cut mid-answer, malformed JSON, a wrong shape and a time-out are retried."""
    tok = pair[2]
    ids = torch.tensor([tok("the cat sat on the mat")["input_ids"]])
    mask = torch.ones_like(ids)
    clean = _teacher(server, tok).served_topk(ids, mask, k=K, vocab_size=len(tok))
    server.faults[:] = faults
    server.slow_seconds = 1.0
    teacher = _teacher(server, tok, timeout=0.3)
    again = teacher.served_topk(ids, mask, k=K, vocab_size=len(tok))
    assert teacher.retried >= len(faults) and not server.faults
    for x, y in zip(clean, again):
        assert torch.equal(x, y)


def test_sglang_faults_are_retried_too(pair):
    _, _, tok, model = pair
    ids = torch.tensor([tok("the cat sat on the mat")["input_ids"]])
    mask = torch.ones_like(ids)
    served = ServedModel(model, tok, api="sglang")
    with Server(served) as url:
        served.url = url
        clean = _teacher(served, tok).served_topk(ids, mask, k=K, vocab_size=len(tok))
        served.faults[:] = ["500", "cut", "malformed", "schema"]
        teacher = _teacher(served, tok)
        assert teacher.api == "sglang" and not teacher.tokenizer_checked
        again = teacher.served_topk(ids, mask, k=K, vocab_size=len(tok))
    assert not served.faults
    for x, y in zip(clean, again):
        assert torch.equal(x, y)


def test_persistent_failure_is_reported_and_nothing_is_cached(server, pair, tmp_path):
    tok = pair[2]
    teacher = _teacher(server, tok, retries=2)
    server.faults[:] = ["500"] * 10
    with pytest.raises(ServedTeacherError, match=r"failed after 3 tries, last: server error 500"):
        write_teacher_cache(teacher, {"train": _rows(tok)}, tmp_path / "c", k=K, vocab_size=len(tok))
    assert not (tmp_path / "c" / "index.json").exists()
    assert not list((tmp_path / "c").glob("*.safetensors"))
    with pytest.raises(FileNotFoundError, match="no index.json"):
        TeacherCache(tmp_path / "c")


@pytest.mark.parametrize("fault, k, message", [
    (None, 32, r"\(400\): Requested prompt logprobs of 32, which is greater than max allowed: 20.*"
               r"`vllm serve MODEL --max-logprobs 32`"),
    ("long", K, r"\(400\): This model's maximum context length .*\(--max-length\)"),
    ("retokenize", K, r"prompt_token_ids differ from the local tokenization at position 2"),
])
def test_refusals_say_what_to_change(server, pair, fault, k, message):
    """A 4xx is not retried: one message naming what to change; a server that re-tokenizes names the position."""
    tok = pair[2]
    ids = torch.tensor([tok("the cat sat on the mat")["input_ids"]])
    server.faults[:] = [fault] if fault else []
    teacher = _teacher(server, tok)
    with pytest.raises(ServedTeacherError, match=message):
        teacher.served_topk(ids, torch.ones_like(ids), k=k, vocab_size=len(tok))
    assert teacher.retried == 0


def test_model_names(pair):
    _, _, tok, model = pair
    with Server(ServedModel(model, tok, name="org/teacher-7b", extra_models=("org/other",))) as url:
        with pytest.raises(ServedTeacherError, match=r"serves 2 models \(org/other, org/teacher-7b\); name one"):
            ServedTeacher(url, tok, retries=0)
        with pytest.raises(ServedTeacherError, match=r"did you mean 'org/teacher-7b'"):
            ServedTeacher(url, tok, model="org/teacher-7", retries=0)
        assert ServedTeacher(url, tok, model="org/other", retries=0).model == "org/other"


def test_unreachable_server(pair):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServedTeacherError, match=r"cannot reach the teacher server at http://127.0.0.1"):
        ServedTeacher(f"http://127.0.0.1:{port}/v1", pair[2], retries=1, backoff=0.01)


def test_tokenizer_mismatch(server, pair):
    """Another local tokenizer than the served one fails at connection, naming the first differing token."""
    other = lm_helpers.tokenizer(280)
    with pytest.raises(ServedTeacherError, match=r"tokenizer differs from --teacher-tokenizer: .* from token \d+ on"):
        _teacher(server, other)


# -- commands -----------------------------------------------------------------------------


def test_cache_teacher_and_distill_lm_with_a_served_teacher(server, pair, tmp_path):
    teacher_dir, student_dir, tok, _ = pair
    data = lm_helpers.write_jsonl(tmp_path / "rows.jsonl", lm_helpers.text_rows(16))
    out = tmp_path / "cache"
    result = runner.invoke(app, ["cache-teacher", "--teacher", server.url, "--teacher-tokenizer", str(teacher_dir),
                                 "--data", str(data), "--k", "8", "--max-length", "24", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert TeacherCache(out).k == 8 and len(TeacherCache(out)) > 0
    result = runner.invoke(app, ["distill-lm", "--teacher", server.url, "--student", str(student_dir), "--data",
                                 str(data), "--steps", "4", "--batch-size", "4", "--max-length", "24",
                                 "--set", "teacher_top_k=8", "--set", "evaluations=1", "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "runs").iterdir())
    results = json.loads((run / "results.json").read_text())
    assert {r["status"] for r in results["rows"]} == {"finished"}
    assert (run / "teacher-cache" / "index.json").is_file()
    distilled = next(r for r in results["rows"] if r["divergence"] == "forward_kl")
    assert distilled["kl_teacher"] > 0


@pytest.mark.parametrize("args, message", [
    (["--teacher-model", "nope"], "--teacher-model 'nope' is not served"),
    (["--k", "40"], "--max-logprobs 40"),
])
def test_cli_errors_are_one_line(server, pair, tmp_path, args, message):
    data = lm_helpers.write_jsonl(tmp_path / "rows.jsonl", lm_helpers.text_rows(4))
    result = runner.invoke(app, ["cache-teacher", "--teacher", server.url, "--teacher-tokenizer", str(pair[0]),
                                 "--data", str(data), "-o", str(tmp_path / "c"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c" / "index.json").exists()


def test_cli_unreachable_server_is_one_line(pair, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = lm_helpers.write_jsonl(tmp_path / "rows.jsonl", lm_helpers.text_rows(4))
    result = runner.invoke(app, ["cache-teacher", "--teacher", f"http://127.0.0.1:{port}/v1", "--teacher-tokenizer",
                                 str(pair[0]), "--data", str(data), "-o", str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    assert f"cannot reach the teacher server at http://127.0.0.1:{port}/v1: connection failed" in result.output
    assert "Traceback" not in result.output


def test_cli_full_logits_divergence_is_refused(server, pair, tmp_path):
    data = lm_helpers.write_jsonl(tmp_path / "rows.jsonl", lm_helpers.text_rows(4))
    result = runner.invoke(app, ["distill-lm", "--teacher", server.url, "--student", str(pair[1]), "--data", str(data),
                                 "-d", "sinkhorn", "-o", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert "needs the teacher's full logits" in result.output


def test_distillation_trainer_with_a_served_teacher(server, pair, tmp_path):
    from divergent.hf import DistillationConfig, DistillationTrainer

    _, student_dir, tok, _ = pair
    args = DistillationConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                              learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                              use_cpu=True, max_length=24)
    trainer = DistillationTrainer(model=str(student_dir), teacher_model=server.url, args=args,
                                  train_dataset=lm_helpers.text_rows(12), processing_class=tok)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert server.sequences >= 12
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_kdrl_teacher_logprobs_equal_the_local_models(server, pair):
    """Left-padded prompts + responses: the served log-probs equal response_logprobs of the model in-process."""
    from divergent.models.served import served_response_logprobs
    from divergent.train.rl import response_logprobs

    _, _, tok, model = pair
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    responses = torch.tensor([[20, 21, 2], [22, 2, 0], [23, 24, 25]])
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        local, _ = response_logprobs(model, ids, responses, mask)
    served = served_response_logprobs(_teacher(server, tok), ids, responses, mask)
    torch.testing.assert_close(served, local, rtol=1e-5, atol=1e-5)


def test_rl_kdrl_with_a_served_teacher(server, pair, tmp_path):
    teacher_dir, student_dir, tok, _ = pair
    prompts = lm_helpers.write_jsonl(tmp_path / "prompts.jsonl",
                                     [{"prompt": f"what is {i % 5} plus {i % 3}?", "answer": str(i % 5 + i % 3)}
                                      for i in range(12)])
    base = ["rl", "--model", str(student_dir), "--prompts", str(prompts), "--reward", "exact", "--steps", "2",
            "--max-new-tokens", "4", "--eval-samples", "2", "--set", "prompts_per_step=3", "--set", "group_size=2",
            "--regulariser", "kdrl", "--teacher", server.url, "-o", str(tmp_path / "runs")]
    result = runner.invoke(app, [*base, "--estimator", "k2"])
    assert result.exit_code == 0, result.output
    assert server.sequences >= 6  # 2 steps x 3 prompts x 2 responses scored by the server
    (run_dir,) = (tmp_path / "runs").glob("rl-*")
    assert "kdrl_beta" in (run_dir / "history.csv").read_text().splitlines()[0]
    result = runner.invoke(app, [*base, "--estimator", "full"])
    assert result.exit_code == 2 and "needs the teacher's full logits" in result.output, result.output


# -- a real vLLM server ---------------------------------------------------------------------


@pytest.mark.vllm
def test_against_real_vllm_serve(pair, tmp_path):
    """`vllm serve` of a tiny Llama: its cache equals the in-process one within float16 rounding."""
    tok = pair[2]
    model = lm_helpers.llama(len(tok), hidden=256, layers=2, seed=1).eval()  # head size 64: vLLM's kernels take it
    teacher_dir = tmp_path / "teacher"
    model.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(["vllm", "serve", str(teacher_dir), "--host", "127.0.0.1", "--port", str(port),
                                "--max-logprobs", "64", "--dtype", "float32", "--enforce-eager",
                                "--gpu-memory-utilization", "0.2"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                pytest.fail("vllm serve exited")
            time.sleep(1)
        rows = _rows(tok)
        write_teacher_cache(model, {"train": rows}, tmp_path / "local", k=K, vocab_size=len(tok))
        with ServedTeacher(url, str(teacher_dir)) as teacher:
            assert teacher.tokenizer_checked
            write_teacher_cache(teacher, {"train": rows}, tmp_path / "remote", k=K, vocab_size=len(tok))
        for x, y in zip(TeacherCache(tmp_path / "local").examples(), TeacherCache(tmp_path / "remote").examples()):
            torch.testing.assert_close(y["teacher_logprobs"], x["teacher_logprobs"], rtol=2**-9, atol=2e-3)
    finally:
        process.terminate()
        process.wait(timeout=60)

