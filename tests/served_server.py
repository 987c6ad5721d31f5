"""A tiny inference server on 127.0.0.1 that answers as vLLM and SGLang do, from a real HF model.

Used by tests/test_served_teacher.py and benchmarks/bench_served_teacher.py. The JSON follows
vLLM's ``CompletionResponse`` (``vllm/entrypoints/openai/protocol.py``: choices with
``prompt_logprobs`` — null at position 0, then ``{"<id>": {"logprob", "rank",
"decoded_token"}}`` holding the prompt's own token plus the top-k —, ``prompt_token_ids``,
``logprobs.top_logprobs`` keyed ``"token_id:<id>"`` under ``return_tokens_as_token_ids``),
vLLM's 400 for ``prompt_logprobs`` above ``--max-logprobs`` ("Requested prompt logprobs of N,
which is greater than max allowed: M") and 404 for an unknown model, and SGLang's
``/generate`` (``meta_info.input_token_logprobs`` / ``input_top_logprobs`` /
``output_top_logprobs`` as ``[logprob, token_id, text]`` lists, null at position 0).

Faults for the robustness tests are queued in ``server.faults`` and consumed one per
log-prob request: ``"500"``, ``"429"``, ``"long"`` (vLLM's 400 for a prompt beyond max_model_len), ``"slow"`` (answers after ``server.slow_seconds``), ``"cut"``
(closes the connection mid-answer), ``"malformed"`` (invalid JSON), ``"schema"`` (valid JSON,
wrong shape), ``"retokenize"`` (``prompt_token_ids`` with one id changed).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class ServedModel:
    """Runs ``model`` (a Hugging Face causal LM) for the handler; one forward at a time."""

    def __init__(self, model, tokenizer, *, name: str = "tiny-teacher", api: str = "vllm", max_logprobs: int = 20,
                 owned_by: str | None = None, extra_models: tuple[str, ...] = ()) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.api = api
        self.max_logprobs = max_logprobs
        self.owned_by = owned_by or api
        self.extra_models = extra_models
        self.faults: list[str] = []
        self.slow_seconds = 1.0
        self.requests = 0
        self.sequences = 0
        self._lock = threading.Lock()

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        logits = self.model(torch.tensor([ids])).logits[0].float()  # requests in flight run side by side
        return torch.log_softmax(logits, dim=-1)

    def next_fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            return self.faults.pop(0) if self.faults else None

    def count(self) -> None:
        with self._lock:
            self.sequences += 1

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else str(token)


def _vllm_completion(served: ServedModel, body: dict) -> tuple[int, dict]:
    if body.get("model") not in (served.name, *served.extra_models):
        return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist.", "type": "NotFoundError",
                               "param": "model", "code": 404}}
    k, n = int(body.get("prompt_logprobs") or 0), int(body.get("logprobs") or 0)
    for what, value in (("prompt", k), ("sample", n)):
        if value > served.max_logprobs:
            return 400, {"error": {"message": f"Requested {what} logprobs of {value}, which is greater than max "
                                              f"allowed: {served.max_logprobs}", "type": "BadRequestError",
                                   "param": None, "code": 400}}
    prompts = body["prompt"]
    prompts = prompts if prompts and isinstance(prompts[0], list) else [prompts]
    as_ids = bool(body.get("return_tokens_as_token_ids"))
    choices = []
    for index, ids in enumerate(prompts):
        logprobs = served.logprobs(ids)
        prompt_logprobs: list = [None]
        for position in range(1, len(ids)):
            row = logprobs[position - 1]
            top = row.topk(k)
            entry = {}
            actual = ids[position]
            entry[str(actual)] = {"logprob": float(row[actual]), "rank": int((row > row[actual]).sum()) + 1,
                                  "decoded_token": served.text(actual)}
            for rank, (value, token) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
                entry[str(token)] = {"logprob": value, "rank": rank, "decoded_token": served.text(token)}
            prompt_logprobs.append(entry)
        last = logprobs[-1]
        chosen = int(last.argmax())
        key = (lambda t: f"token_id:{t}") if as_ids else served.text
        top = last.topk(n) if n else None
        choices.append({
            "index": index, "text": served.text(chosen),
            "logprobs": None if top is None else {
                "text_offset": [0], "token_logprobs": [float(last[chosen])], "tokens": [key(chosen)],
                "top_logprobs": [{key(t): v for v, t in zip(top.values.tolist(), top.indices.tolist())}]},
            "finish_reason": "length", "stop_reason": None,
            "token_ids": [chosen] if body.get("return_token_ids") else None,
            "prompt_logprobs": prompt_logprobs if k else None,
            "prompt_token_ids": list(ids) if body.get("return_token_ids") else None,
        })
        served.count()
    total = sum(len(p) for p in prompts)
    return 200, {"id": "cmpl-test", "object": "text_completion", "created": int(time.time()), "model": body["model"],
                 "choices": choices, "usage": {"prompt_tokens": total, "total_tokens": total + len(prompts),
                                               "completion_tokens": len(prompts)}}


def _sglang_generate(served: ServedModel, body: dict) -> tuple[int, object]:
    prompts = body["input_ids"]
    single = not (prompts and isinstance(prompts[0], list))
    prompts = [prompts] if single else prompts
    k = int(body.get("top_logprobs_num") or 0)
    out = []
    for ids in prompts:
        logprobs = served.logprobs(ids)
        tops = [None]
        tokens = [[None, ids[0], None]]
        for position in range(1, len(ids)):
            row = logprobs[position - 1]
            top = row.topk(k)
            tokens.append([float(row[ids[position]]), ids[position], None])
            tops.append([[v, t, None] for v, t in zip(top.values.tolist(), top.indices.tolist())])
        last = logprobs[-1]
        chosen = int(last.argmax())
        top = last.topk(k)
        out.append({"text": served.text(chosen), "meta_info": {
            "id": "gen-test", "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": len(ids),
            "completion_tokens": 1, "cached_tokens": 0,
            "input_token_logprobs": tokens, "input_top_logprobs": tops,
            "output_token_logprobs": [[float(last[chosen]), chosen, None]],
            "output_top_logprobs": [[[v, t, None] for v, t in zip(top.values.tolist(), top.indices.tolist())]]}})
        served.count()
    return 200, out[0] if single else out


def make_handler(served: ServedModel):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, payload, raw: bytes | None = None) -> None:
            data = raw if raw is not None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                names = (served.name, *served.extra_models)
                self._send(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": served.owned_by, "root": name,
                     "parent": None, "max_model_len": 256, "permission": []} for name in names]})
            else:
                self._send(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/tokenize" and served.api == "vllm":
                tokens = served.tokenizer(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))
                ids = list(tokens["input_ids"])
                self._send(200, {"count": len(ids), "max_model_len": 256, "tokens": ids, "token_strs": None})
                return
            if (self.path, served.api) not in (("/v1/completions", "vllm"), ("/generate", "sglang")):
                self._send(404, {"detail": "Not Found"})
                return
            fault = served.next_fault()
            if fault == "500":
                self._send(500, {"error": {"message": "EngineCore encountered an issue", "type": "InternalServerError",
                                           "param": None, "code": 500}})
                return
            if fault == "429":
                self._send(429, {"error": {"message": "Too many requests", "type": "TooManyRequests", "param": None,
                                           "code": 429}})
                return
            if fault == "long" and served.api == "vllm":
                self._send(400, {"error": {"message": "This model's maximum context length is 256 tokens. However, "
                                                      "your request has 300 input tokens.", "type": "BadRequestError",
                                           "param": None, "code": 400}})
                return
            if fault == "cut":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"ch")
                self.wfile.flush()
                self.close_connection = True
                return
            if fault == "malformed":
                self._send(200, None, raw=b'{"choices": [{"index": 0, "prompt_logprobs": [null, {"3": ')
                return
            if fault == "schema":
                self._send(200, {"choices": [{"index": 0}]} if served.api == "vllm" else [{"meta_info": {}}])
                return
            if fault == "slow":
                time.sleep(served.slow_seconds)
            status, payload = (_vllm_completion if served.api == "vllm" else _sglang_generate)(served, body)
            if fault == "retokenize" and status == 200:
                ids = payload["choices"][0]["prompt_token_ids"]
                ids[2] = ids[2] + 1
            self._send(status, payload)

    return Handler


class Server:
    """``with Server(served) as url:`` serves on 127.0.0.1 (a free port) in a thread; stops on exit."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(served))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def main() -> None:
    """``python tests/served_server.py MODEL_DIR PORT [vllm|sglang]``: serve until killed (benchmarks)."""
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, port = sys.argv[1], int(sys.argv[2])
    api = sys.argv[3] if len(sys.argv) > 3 else "vllm"
    torch.set_num_threads(1)
    served = ServedModel(AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), api=api,
                         max_logprobs=64)
    httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(served))
    httpd.daemon_threads = True
    print(f"serving {folder} on http://127.0.0.1:{port}/v1", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
