"""A teacher served over HTTP (vLLM or SGLang): its top-k log-probs, read as ``dv.TopK``.

A large teacher often lives in an inference server, not in the student's process. This
module asks the server for the teacher's log-probs over the student's token ids and returns
them in the layout of :func:`divergent.data.teacher_cache.teacher_topk` (the top-k
indices, their log-probs and the log-prob of the next token), so a served teacher is a
*remote cache*: ``cache-teacher`` writes it to disk, ``distill-lm`` and
``DistillationTrainer`` train from it as from a cache (top-k buckets plus one tail
bucket holding the remaining mass).

Protocols (the request TRL's ``VLLMClient.get_sequence_logprobs`` makes):

- vLLM's OpenAI-compatible ``POST /v1/completions`` with token-id prompts, ``max_tokens=1``,
  ``prompt_logprobs=k`` and ``logprobs=k``. Each choice holds ``prompt_logprobs``: one entry
  per prompt token, ``null`` at position 0, else ``{"<token id>": {"logprob", "rank",
  "decoded_token"}}`` with the actual token plus the top-k; and ``logprobs.top_logprobs[0]``
  (keys ``"token_id:<id>"`` with ``return_tokens_as_token_ids``): the distribution after the
  last prompt token. ``prompt_token_ids`` (with ``return_token_ids``) is checked against the ids sent.
- SGLang's ``POST /generate`` with ``input_ids``, ``return_logprob``, ``top_logprobs_num=k``,
  ``logprob_start_len=0``: ``meta_info.input_token_logprobs`` / ``input_top_logprobs`` hold
  ``(logprob, token_id, text)`` tuples, ``null`` at position 0.

Temperature: the server's log-probs are read at temperature 1 (vLLM's default
``--logprobs-mode raw_logprobs``: before any temperature or logit processor; the request
also sets ``temperature=1``). A distillation temperature is applied here, locally, to the
top-k log-probs and the tail, as for a cached teacher.

Robustness: a batch is split into requests of ``sequences_per_request`` sequences (default:
evenly over the requests in flight), at most ``max_in_flight`` in flight at once. Server errors (5xx, and 429), time-outs, dropped connections and
malformed answers are retried ``retries`` times with exponential back-off
(``backoff · 2^attempt`` seconds); after that, and at once for a 4xx (e.g. more log-probs
than ``vllm serve --max-logprobs`` allows), a :class:`ServedTeacherError` (a ``ValueError``)
says in one line what to change.
"""

from __future__ import annotations

import difflib
import math
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

__all__ = ["ServedTeacher", "ServedTeacherError", "is_served", "check_topk_divergences", "served_response_logprobs",
           "PROBE_TEXT"]

# Text tokenized on the server and locally to check that both tokenizers agree.
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789 def f(x):\n    return x ** 2  # ok?"
_APIS = ("auto", "vllm", "sglang")


class ServedTeacherError(ValueError):
    """The teacher server cannot be used as asked; the message says what to change."""


class _Unreachable(ServedTeacherError):
    def __init__(self, message: str, last: str) -> None:
        super().__init__(message)
        self.last = last


class _Transient(Exception):
    """A failure worth retrying: 5xx, time-out, dropped connection, malformed answer."""


def is_served(teacher: Any) -> bool:
    """True for a teacher given as an ``http://`` or ``https://`` URL."""
    return isinstance(teacher, str) and teacher.startswith(("http://", "https://"))


def check_topk_divergences(divergences) -> None:
    """A served teacher gives top-k log-probs: a divergence that needs full logits is refused here."""
    from divergent.functional.registry import get_spec

    for name in divergences or ():
        if not get_spec(name).accepts_topk:
            raise ValueError(f"divergence {name!r} needs the teacher's full logits; a served teacher (--teacher "
                             f"http://...) gives top-k log-probs: use a local teacher folder or another divergence")


def _error_message(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message", error))[:300]
        return str(error)[:300]
    return str(body)[:300]


class ServedTeacher:
    """The top-k log-probs of a model served by vLLM or SGLang at ``url``.

    url: the server's OpenAI-compatible base, ``http://HOST:PORT/v1`` (SGLang's ``/generate``
        is found at the same host and port).
    tokenizer: a local copy of the served model's tokenizer (a folder or a loaded tokenizer);
        it is checked against the server's (vLLM's ``/tokenize``) and must be the student's, unless
        the ids are the teacher's own (cross-tokenizer distillation, :mod:`divergent.train.cross_tokenizer`).
    model: the served model's name; ``None`` = the one model ``/v1/models`` lists.
    api: ``"vllm"``, ``"sglang"`` or ``"auto"`` (from ``owned_by`` in ``/v1/models``).
    max_in_flight: requests sent at once.
    sequences_per_request: sequences in one request (``None``: a batch split evenly over ``max_in_flight``).
    timeout: seconds to wait for one answer.
    retries: extra tries after a transient failure (5xx, time-out, dropped connection,
        malformed answer), waiting ``backoff * 2**attempt`` seconds before each.
    """

    def __init__(
        self,
        url: str,
        tokenizer: Any = None,
        *,
        model: str | None = None,
        api: str = "auto",
        max_in_flight: int = 4,
        sequences_per_request: int | None = None,
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 0.5,
    ) -> None:
        import httpx

        if not is_served(url):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if api not in _APIS:
            raise ValueError(f"api must be one of {', '.join(_APIS)}, got {api!r}")
        for name, value in (("max_in_flight", max_in_flight), ("sequences_per_request", sequences_per_request or 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not timeout > 0 or backoff < 0:
            raise ValueError(f"timeout must be > 0 and backoff >= 0, got {timeout!r} and {backoff!r}")
        if isinstance(tokenizer, str) or hasattr(tokenizer, "__fspath__"):
            from divergent.models.hf import load_tokenizer

            path = tokenizer
            tokenizer = load_tokenizer(path, "--teacher-tokenizer")
            if tokenizer is None:
                raise ValueError(f"--teacher-tokenizer {path} holds no tokenizer (tokenizer.json / tokenizer_config.json)")
        self.url = url.rstrip("/")
        self.root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        self.tokenizer = tokenizer
        self.max_in_flight = max_in_flight
        self.sequences_per_request = sequences_per_request
        self.retries = retries
        self.backoff = backoff
        self.requests_sent = 0
        self.retried = 0
        self._client = httpx.Client(timeout=httpx.Timeout(timeout),
                                    limits=httpx.Limits(max_connections=max_in_flight + 1))
        try:
            self.model, owner = self._pick_model(model)
            self.api = api if api != "auto" else ("sglang" if owner == "sglang" else "vllm")
            self.tokenizer_checked = self._check_tokenizer() if tokenizer is not None else False
        except BaseException:
            self._client.close()
            raise

    def __repr__(self) -> str:
        return f"ServedTeacher({self.url!r}, model={self.model!r}, api={self.api!r})"

    def describe(self) -> str:
        return f"{self.model} served by {self.api} at {self.url}"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ServedTeacher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- HTTP -------------------------------------------------------------------------

    def _call(self, method: str, url: str, body: dict[str, Any] | None = None, *, what: str,
              retries: int | None = None) -> Any:
        """The JSON answer; transient failures retried with back-off, a 4xx raised at once."""
        import httpx

        last = ""
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            if attempt:
                self.retried += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                self.requests_sent += 1
                response = self._client.request(method, url, json=body)
            except httpx.TimeoutException:
                last = "no answer within the time-out"
                continue
            except httpx.TransportError as exc:  # refused, reset, cut mid-answer
                last = f"connection failed ({type(exc).__name__}: {str(exc)[:120] or 'no detail'})"
                continue
            if response.status_code >= 500 or response.status_code == 429:  # 429: too many requests, wait
                last = f"server error {response.status_code}: {_error_message(response)}"
                continue
            if response.status_code >= 400:
                return self._refused(response, what)
            try:
                return response.json()
            except ValueError:
                last = "malformed JSON in the answer"
                continue
        raise _Unreachable(f"teacher server {url}: {what} failed after {retries + 1} tries, last: {last}; "
                           f"check that the server is up (`curl {self.url}/models`)", last)

    def _refused(self, response, what: str):
        message = _error_message(response)
        hint = ""
        if "logprobs" in message and ("max" in message or "greater" in message):
            asked = re.search(r"logprobs of (\d+)", message)
            hint = (" — ask for fewer (--k / teacher_top_k) or restart the server allowing more: "
                    f"`vllm serve MODEL --max-logprobs {asked.group(1) if asked else 'K'}`")
        elif "context length" in message or "max_model_len" in message:
            hint = " — shorten the rows (--max-length) or serve the model with a longer --max-model-len"
        elif response.status_code == 404 and "model" in message.lower():
            hint = " — check --teacher-model against the names `/v1/models` lists"
        elif response.status_code == 404:
            hint = f" — is {self.url} the server's /v1 base (and --teacher-api right)?"
        raise ServedTeacherError(f"teacher server refused {what} ({response.status_code}): {message}{hint}")

    def _pick_model(self, model: str | None) -> tuple[str, str]:
        import httpx

        try:  # a wrong address is the likely cause here: two retries, not the full back-off
            listing = self._call("GET", f"{self.url}/models", what="listing models", retries=min(self.retries, 2))
        except _Unreachable as exc:
            raise ServedTeacherError(f"cannot reach the teacher server at {self.url}: {exc.last}; start it (e.g. "
                                     f"`vllm serve MODEL --max-logprobs 64`) or correct --teacher") from None
        except httpx.InvalidURL as exc:
            raise ServedTeacherError(f"--teacher {self.url} is not a valid URL: {exc}") from None
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list) or not all(isinstance(m, dict) and "id" in m for m in data):
            raise ServedTeacherError(f"{self.url}/models did not answer a model list (OpenAI format); "
                                     f"is {self.url} a vLLM/SGLang server's /v1 base?")
        names = {str(m["id"]): str(m.get("owned_by", "")) for m in data}
        if model is None:
            if len(names) != 1:
                raise ServedTeacherError(f"the teacher server at {self.url} serves {len(names)} models "
                                         f"({', '.join(sorted(names)) or 'none'}); name one with --teacher-model")
            model = next(iter(names))
        elif model not in names:
            close = difflib.get_close_matches(model, list(names), n=1)
            suggestion = f"; did you mean {close[0]!r}?" if close else ""
            raise ServedTeacherError(f"--teacher-model {model!r} is not served at {self.url}; it serves "
                                     f"{', '.join(sorted(names))}{suggestion}")
        return model, names[model]

    def _check_tokenizer(self) -> bool:
        """Tokenize :data:`PROBE_TEXT` on the server (vLLM ``/tokenize``) and here; raise on a difference."""
        if self.api != "vllm":
            return False
        import httpx

        try:
            response = self._client.post(f"{self.root}/tokenize", json={"model": self.model, "prompt": PROBE_TEXT,
                                                                       "add_special_tokens": False})
        except httpx.HTTPError:
            return False
        if response.status_code != 200:
            return False  # no /tokenize: prompt_token_ids are still checked on every answer
        try:
            served = [int(t) for t in response.json()["tokens"]]
        except (ValueError, KeyError, TypeError):
            return False
        local = list(self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
        if served != local:
            position = next((i for i, (a, b) in enumerate(zip(served, local)) if a != b), min(len(served), len(local)))
            raise ServedTeacherError(
                f"the served model's tokenizer differs from --teacher-tokenizer: {PROBE_TEXT!r} tokenizes differently "
                f"from token {position} on ({served[position:position + 3]} on the server, {local[position:position + 3]} "
                f"here); give a local copy of the served model's tokenizer")
        return True

    # -- log-probs ----------------------------------------------------------------------

    def served_topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, k: int,
                    vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(indices [B, T, k], logprobs [B, T, k], next_logprob [B, T])`` as ``teacher_topk`` gives them.

        Position ``t`` holds the teacher's distribution after tokens ``0..t``; rows are right-padded
        (``attention_mask``), padding positions repeat the row's last position and ``next_logprob``
        is 0 at each row's last token (nothing follows it).
        """
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must be [B, T] of one shape, got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        lengths = attention_mask.long().sum(1).tolist()
        rows = [input_ids[i, :n].tolist() for i, n in enumerate(lengths)]
        if any(n < 1 for n in lengths):
            raise ValueError("every row needs at least one token (attention_mask sums to 0 in a row)")
        size = self.sequences_per_request or -(-len(rows) // self.max_in_flight)
        groups = [list(range(i, min(i + size, len(rows)))) for i in range(0, len(rows), size)]
        ask = self._vllm if self.api == "vllm" else self._sglang
        with ThreadPoolExecutor(max_workers=min(self.max_in_flight, len(groups))) as pool:
            answers = list(pool.map(lambda group: ask([rows[i] for i in group], k), groups))
        batch, length = input_ids.shape
        indices = torch.zeros(batch, length, k, dtype=torch.long)
        logprobs = torch.zeros(batch, length, k, dtype=torch.float32)
        next_logprob = torch.zeros(batch, length, dtype=torch.float32)
        for group, answer in zip(groups, answers):
            for row, (top_ids, top_values, nexts) in zip(group, answer):
                n = lengths[row]
                ids = torch.tensor(top_ids, dtype=torch.long)
                if (ids >= vocab_size).any() or (ids < 0).any():
                    raise ServedTeacherError(f"the teacher server answered token id {int(ids.max())}, outside the "
                                             f"vocabulary of {vocab_size} tokens; is it serving the model whose "
                                             f"tokenizer is --teacher-tokenizer?")
                indices[row, :n] = ids
                logprobs[row, :n] = torch.tensor(top_values, dtype=torch.float32)
                next_logprob[row, : n - 1] = torch.tensor(nexts, dtype=torch.float32)
                indices[row, n:] = indices[row, n - 1]
                logprobs[row, n:] = logprobs[row, n - 1]
        return indices, logprobs, next_logprob

    def _check_ids(self, sent: Sequence[int], served: Sequence[int], sequence: int) -> None:
        if list(served) == list(sent):
            return
        position = next((i for i, (a, b) in enumerate(zip(served, sent)) if a != b), min(len(served), len(sent)))
        got = served[position] if position < len(served) else "nothing"
        raise ServedTeacherError(
            f"the teacher server's prompt_token_ids differ from the local tokenization at position {position} of "
            f"a sequence (id {got} on the server, {sent[position] if position < len(sent) else 'nothing'} here; "
            f"{len(served)} vs {len(sent)} tokens); the server must take the token ids as given")

    def _ask(self, url: str, body: dict[str, Any], what: str, parse) -> list[tuple[list, list, list]]:
        """POST ``body`` and parse the answer; a malformed answer is asked again (bounded)."""
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return parse(self._call("POST", url, body, what=what))
            except _Transient as exc:
                last = exc
        raise ServedTeacherError(f"teacher server {url}: malformed answers after {self.retries + 1} tries, last: {last}")

    def _vllm(self, rows: list[list[int]], k: int) -> list[tuple[list, list, list]]:
        body = {"model": self.model, "prompt": rows, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k,
                "logprobs": k, "return_tokens_as_token_ids": True, "return_token_ids": True, "add_special_tokens": False}
        return self._ask(f"{self.url}/completions", body, f"prompt_logprobs={k}",
                         lambda answer: self._parse_vllm(answer, rows, k))

    def _parse_vllm(self, answer: Any, rows: list[list[int]], k: int) -> list[tuple[list, list, list]]:
        try:
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            if len(choices) != len(rows):
                raise _Transient(f"{len(choices)} choices for {len(rows)} prompts")
            out = []
            for number, (choice, sent) in enumerate(zip(choices, rows)):
                if choice.get("prompt_token_ids") is not None:
                    self._check_ids(sent, choice["prompt_token_ids"], number)
                prompt = choice["prompt_logprobs"]
                if not isinstance(prompt, list) or len(prompt) != len(sent) or prompt[0] is not None:
                    raise _Transient(f"prompt_logprobs of {len(prompt) if isinstance(prompt, list) else '?'} entries "
                                     f"for {len(sent)} tokens (position 0 must be null)")
                top_ids, top_values, nexts = [], [], []
                for position in range(1, len(sent)):
                    entry = {int(t): float(v["logprob"]) for t, v in prompt[position].items()}
                    if sent[position] not in entry:  # vLLM always lists the prompt's own token
                        raise ServedTeacherError(
                            f"the teacher server's prompt_logprobs at position {position} do not hold the token id "
                            f"{sent[position]} sent there; the server must take the token ids as given")
                    nexts.append(entry[sent[position]])
                    ids, values = self._top(entry, k)
                    top_ids.append(ids)
                    top_values.append(values)
                last = choice["logprobs"]["top_logprobs"][0]  # after the last prompt token
                if not all(str(t).startswith("token_id:") for t in last):
                    raise ServedTeacherError(
                        "the teacher server keyed its top_logprobs by text, not \"token_id:<id>\": it ignores "
                        "return_tokens_as_token_ids; use a vLLM whose /v1/completions takes it")
                ids, values = self._top({int(str(t)[len("token_id:"):]): float(v) for t, v in last.items()}, k)
                out.append((top_ids + [ids], top_values + [values], nexts))
            return out
        except ServedTeacherError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise _Transient(f"unexpected vLLM answer ({type(exc).__name__}: {str(exc)[:120]})") from None

    def _sglang(self, rows: list[list[int]], k: int) -> list[tuple[list, list, list]]:
        body = {"input_ids": rows, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0}, "return_logprob": True,
                "top_logprobs_num": k, "logprob_start_len": 0}
        return self._ask(f"{self.root}/generate", body, f"top_logprobs_num={k}",
                         lambda answer: self._parse_sglang(answer, rows, k))

    def _parse_sglang(self, answer: Any, rows: list[list[int]], k: int) -> list[tuple[list, list, list]]:
        try:
            answer = answer if isinstance(answer, list) else [answer]
            if len(answer) != len(rows):
                raise _Transient(f"{len(answer)} answers for {len(rows)} prompts")
            out = []
            for number, (item, sent) in enumerate(zip(answer, rows)):
                meta = item["meta_info"]
                tokens, tops = meta["input_token_logprobs"], meta["input_top_logprobs"]
                if len(tokens) == len(tops) == len(sent) - 1:  # without the first token's empty entry
                    tokens, tops = [[None, sent[0], None], *tokens], [None, *tops]
                if len(tokens) != len(sent) or len(tops) != len(sent):
                    raise _Transient(f"input logprobs of {len(tokens)} entries for {len(sent)} tokens")
                self._check_ids(sent, [int(t[1]) for t in tokens], number)
                nexts = [float(t[0]) for t in tokens[1:]]
                top_ids, top_values = [], []
                for top in [*tops[1:], meta["output_top_logprobs"][0]]:
                    ids, values = self._top({int(t[1]): float(t[0]) for t in top}, k)
                    top_ids.append(ids)
                    top_values.append(values)
                out.append((top_ids, top_values, nexts))
            return out
        except ServedTeacherError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise _Transient(f"unexpected SGLang answer ({type(exc).__name__}: {str(exc)[:120]})") from None

    @staticmethod
    def _top(entry: dict[int, float], k: int) -> tuple[list[int], list[float]]:
        if len(entry) < k:
            raise _Transient(f"{len(entry)} log-probs at a position where {k} were asked")
        ranked = sorted(entry.items(), key=lambda item: -item[1])[:k]
        if any(not (math.isfinite(v) or v == -math.inf) or v > 1e-3 for _, v in ranked):
            raise _Transient("a log-prob that is NaN, +inf or above 0")
        return [t for t, _ in ranked], [v for _, v in ranked]


def served_response_logprobs(teacher: ServedTeacher, prompt_ids: torch.Tensor, responses: torch.Tensor,
                             prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probs ``[N, R]`` of ``responses`` after ``prompt_ids`` (left-padded, ``prompt_mask`` 0 = padding).

    What ``train.rl.response_logprobs`` gives for a local model (KDRL's sampled-token
    estimators k1/k2/k3 need nothing more), read from the server's prompt log-probs.
    """
    n, width = prompt_ids.shape
    mask = torch.ones_like(prompt_ids) if prompt_mask is None else prompt_mask
    lengths = mask.long().sum(1).tolist()
    total = max(lengths) + responses.shape[1]
    ids = torch.zeros(n, total, dtype=torch.long)
    attention = torch.zeros(n, total, dtype=torch.long)
    for row, length in enumerate(lengths):  # left padding out, responses right after the prompt
        sequence = torch.cat([prompt_ids[row, width - length:].cpu(), responses[row].cpu()])
        ids[row, : sequence.numel()] = sequence
        attention[row, : sequence.numel()] = 1
    _, _, next_logprob = teacher.served_topk(ids, attention, k=1, vocab_size=2**62)
    picked = [next_logprob[row, length - 1 : length - 1 + responses.shape[1]] for row, length in enumerate(lengths)]
    return torch.stack(picked).to(responses.device)
