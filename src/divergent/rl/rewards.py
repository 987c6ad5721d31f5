"""Reward functions for ``divergent rl`` on the user's prompts: a spec string → a scorer.

A reward is called as TRL calls reward functions::

    fn(prompts=[...], completions=[...], **{column: [values...]}) -> list[float | None]

one value per completion; every column of the prompts file other than ``prompt`` (e.g.
``answer``) arrives as a list aligned with the completions. For rows whose ``prompt`` is a
list of chat messages, ``prompts`` holds those lists and each completion is
``[{"role": "assistant", "content": text}]`` (TRL's conversational format); otherwise both
are strings.

Specs (:func:`resolve_reward`):

- ``exact``: 1.0 when the completion's first line, stripped, or its first
  whitespace-separated token equals ``str(answer).strip()``; else 0.0.
- ``math``: numeric equality. The candidate is the content of the last ``\\boxed{...}`` in
  the completion when there is one, else the last number in it (``-1,234.5``, ``3/4``,
  ``.5``). Both candidate and answer are normalised — strip, remove ``,``, ``$`` and
  spaces and a trailing ``.`` — then parsed as an integer, a decimal, a fraction ``a/b`` or a
  LaTeX fraction (``\\frac{a}{b}``, ``\\dfrac``, ``\\tfrac``, ``\\frac12``);
  equal within ``1e-6 * max(1, |answer|)``. An answer that does not parse as a number is
  compared as the normalised string.
- ``regex:PATTERN``: ``re.search(PATTERN, completion)``; no match → 0.0. A match → 1.0,
  except when the row has an ``answer`` and the pattern has a group: then 1.0 only if
  ``group(1).strip() == str(answer).strip()``.
- ``module:function``: the user's function (``module`` importable from the current folder
  or the Python path), called as above. ``None`` in its result means "no reward for this
  completion": it scores 0 and is counted in ``reward_skipped``.

A call that raises, or returns something else than one finite number (or None) per
completion, is not fatal: the batch is re-scored one completion at a time, and each
completion whose own call still fails scores 0 and is counted in ``reward_errors``. With
``timeout > 0`` a user function runs in a separate worker process (started with ``spawn``
and kept between calls); a call that takes longer than ``timeout`` seconds is cut off —
the worker is killed and a fresh one starts for the next call — and its completions score
0 and are counted in ``reward_timeouts``. The worker keeps its own module state between
calls (not saved in checkpoints). The built-in specs run in the training process.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

__all__ = [
    "BUILTIN_REWARDS",
    "RewardSpec",
    "RewardScorer",
    "resolve_reward",
    "exact_reward",
    "math_reward",
    "regex_reward",
    "extract_math_answer",
    "parse_number",
]


def _text(completion: Any) -> str:
    """A completion's text: the string itself, or the content of the last message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _answers(answer: Sequence[Any] | None, n: int, spec: str) -> Sequence[Any]:
    if answer is None:
        raise ValueError(f"reward {spec!r} compares with the row's 'answer', and the prompts have no 'answer' field")
    return answer


def exact_reward(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None,
                 **_: Any) -> list[float]:
    """1.0 where the first line (stripped) or the first whitespace token of the completion equals ``str(answer)``.

    >>> exact_reward(["1+1="], ["2\\nbecause"], answer=[2]), exact_reward(["q"], [" 19 apples"], answer=["19"])
    ([1.0], [1.0])
    >>> exact_reward(["q"], ["the answer is 19"], answer=["19"])
    [0.0]
    """
    out = []
    for completion, expected in zip(completions, _answers(answer, len(completions), "exact")):
        text, target = _text(completion), str(expected).strip()
        lines = text.strip().splitlines()
        first_line = lines[0].strip() if lines else ""
        tokens = text.split()
        out.append(1.0 if first_line == target or (tokens and tokens[0] == target) else 0.0)
    return out


_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?")


def _normalise(text: str) -> str:
    text = str(text).strip().replace(",", "").replace("$", "").replace(" ", "")
    return text[:-1] if text.endswith(".") else text


# LaTeX fractions: \frac{a}{b}, \dfrac{a}{b}, \tfrac{a}{b} and the shorthand \frac12 (one digit each).
_LATEX_FRACTION = re.compile(r"^([-+]?)\\[dt]?frac(?:\{([^{}]+)\}\{([^{}]+)\}|(\d)(\d))$")


def parse_number(text: Any) -> Fraction | None:
    """``text`` normalised (strip; no ``,``, ``$``, spaces, trailing ``.``) as an exact number, or None.

    Integers, decimals, ``a/b`` and LaTeX fractions (``\\frac{a}{b}``, ``\\dfrac``, ``\\tfrac``,
    ``\\frac12``, with a sign in front) parse.

    >>> parse_number("$1,234.50."), parse_number("3/4"), parse_number("-7"), parse_number("x")
    (Fraction(2469, 2), Fraction(3, 4), Fraction(-7, 1), None)
    >>> parse_number("-\\\\frac{3}{4}"), parse_number("\\\\dfrac{1}{2}"), parse_number("\\\\frac12")
    (Fraction(-3, 4), Fraction(1, 2), Fraction(1, 2))
    """
    text = _normalise(text)
    latex = _LATEX_FRACTION.match(text)
    if latex:
        sign, top, bottom = latex.group(1), latex.group(2) or latex.group(4), latex.group(3) or latex.group(5)
        text = f"{sign}{top}/{bottom}"
    try:
        if "/" in text:
            top, bottom = text.split("/", 1)
            return Fraction(Fraction(top), Fraction(bottom))
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[i:j]
            depth -= 1
    return None


def extract_math_answer(completion: str) -> str | None:
    """The last ``\\boxed{...}`` content, else the last number in ``completion``, else None.

    >>> extract_math_answer("so x = \\\\boxed{\\\\frac12} or \\\\boxed{3/4}"), extract_math_answer("2+2 is 4.")
    ('3/4', '4')
    """
    boxed = _last_boxed(completion)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def math_reward(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None,
                **_: Any) -> list[float]:
    """1.0 where the completion's final answer equals ``answer`` numerically (see the module docstring).

    >>> math_reward(["q"] * 3, ["it is 1,000.", "\\\\boxed{0.5}", "maybe 3"], answer=["1000", "1/2", 4])
    [1.0, 1.0, 0.0]
    """
    out = []
    for completion, expected in zip(completions, _answers(answer, len(completions), "math")):
        candidate = extract_math_answer(_text(completion))
        if candidate is None:
            out.append(0.0)
            continue
        target = parse_number(expected)
        if target is None:
            out.append(1.0 if _normalise(candidate) == _normalise(str(expected)) else 0.0)
            continue
        value = parse_number(candidate)
        out.append(1.0 if value is not None and abs(value - target) <= 1e-6 * max(1, abs(target)) else 0.0)
    return out


def regex_reward(pattern: str) -> Callable[..., list[float]]:
    """A reward: 1.0 where ``re.search(pattern, completion)`` matches (and group 1 equals the answer, if both exist).

    >>> fn = regex_reward(r"answer: (\\d+)")
    >>> fn(["q", "q", "q"], ["answer: 7", "answer: 8", "none"], answer=[7, 7, 7])
    [1.0, 0.0, 0.0]
    """
    compiled = re.compile(pattern)

    def reward(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None,
               **_: Any) -> list[float]:
        out = []
        for i, completion in enumerate(completions):
            match = compiled.search(_text(completion))
            if match is None:
                out.append(0.0)
            elif answer is not None and compiled.groups >= 1 and answer[i] is not None:
                group = match.group(1)
                out.append(1.0 if group is not None and group.strip() == str(answer[i]).strip() else 0.0)
            else:
                out.append(1.0)
        return out

    return reward


BUILTIN_REWARDS = ("exact", "math", "regex:PATTERN", "module:function")


@dataclass(frozen=True)
class RewardSpec:
    """A resolved ``--reward`` spec: the function, whether it needs an ``answer`` column, whether it is the user's."""

    spec: str
    fn: Callable[..., Any]
    needs_answer: bool = False
    module: str | None = None
    function: str | None = None

    @property
    def user(self) -> bool:
        return self.module is not None


def _import_function(module: str, function: str, what: str) -> Callable[..., Any]:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        loaded = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} {module}:{function}: cannot import the module {module!r} ({exc}); give a module "
                          f"on the Python path, e.g. my_rewards for ./my_rewards.py") from None
    except Exception as exc:
        raise ValueError(f"{what} {module}:{function}: importing {module!r} raised {type(exc).__name__}: {exc}") from None
    fn = getattr(loaded, function, None)
    if fn is None:
        names = [n for n in dir(loaded) if not n.startswith("_") and callable(getattr(loaded, n))]
        import difflib

        close = difflib.get_close_matches(function, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{what} {module}:{function}: module {module!r} has no function {function!r}{hint}")
    if not callable(fn):
        raise TypeError(f"{what} {module}:{function}: {function!r} is a {type(fn).__name__}, not a function")
    return fn


def resolve_reward(spec: str, what: str = "--reward") -> RewardSpec:
    """The reward named by ``spec`` (``exact``, ``math``, ``regex:PATTERN`` or ``module:function``).

    A spec that does not resolve (unknown name, bad regular expression, missing module or
    function) raises naming it.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{what} is empty; give one of {', '.join(BUILTIN_REWARDS)}")
    spec = spec.strip()
    if spec == "exact":
        return RewardSpec(spec, exact_reward, needs_answer=True)
    if spec == "math":
        return RewardSpec(spec, math_reward, needs_answer=True)
    if spec.startswith("regex:"):
        pattern = spec[len("regex:"):]
        try:
            return RewardSpec(spec, regex_reward(pattern))
        except re.error as exc:
            raise ValueError(f"{what} {spec!r}: not a valid regular expression ({exc})") from None
    module, sep, function = spec.partition(":")
    if sep and module and function and all(part.isidentifier() for part in module.split(".")) \
            and function.isidentifier():
        return RewardSpec(spec, _import_function(module, function, what), module=module, function=function)
    from divergent.config import suggest

    raise ValueError(f"{what} {spec!r} is not a reward spec{suggest(spec, ['exact', 'math'])}; expected one of "
                     f"{', '.join(BUILTIN_REWARDS)}")


# ----------------------------------------------------------------------------- calling it safely


class _Failed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "error" or "timeout"


def _check_values(values: Any, n: int) -> list[float | None]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"a reward function must return a list of {n} numbers (or None), got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"a reward function must return one value per completion: {n} expected, got {len(values)}")
    out: list[float | None] = []
    for value in values:
        if value is None:
            out.append(None)
            continue
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"a reward function returned a non-finite value ({value})")
        out.append(value)
    return out


def _worker_main(conn, module: str, function: str) -> None:  # pragma: no cover - runs in the worker process
    try:
        fn = _import_function(module, function, "--reward")
    except BaseException as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            kwargs = conn.recv()
        except EOFError:
            return
        if kwargs is None:
            return
        try:
            values = fn(**kwargs)
            if isinstance(values, torch.Tensor):
                values = values.tolist()
            conn.send(("ok", [None if v is None else float(v) for v in values]))
        except BaseException as exc:
            conn.send(("raised", f"{type(exc).__name__}: {exc}"))


class _Worker:
    """One ``spawn``ed process that imports the user's function and runs calls sent through a pipe."""

    STARTUP_SECONDS = 300.0  # importing torch and the user's module; not counted in a call's time limit

    def __init__(self, module: str, function: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, module, function), daemon=True,
                                       name=f"divergent-reward-{module}.{function}")
        self.process.start()
        child.close()
        if not self.conn.poll(self.STARTUP_SECONDS):
            self.close()
            raise RuntimeError(f"the reward worker for {module}:{function} did not start within "
                               f"{self.STARTUP_SECONDS:.0f} s")
        try:
            status, message = self.conn.recv()
        except EOFError:
            self.close()
            raise RuntimeError(f"the reward worker for {module}:{function} exited while starting") from None
        if status != "ready":
            self.close()
            raise RuntimeError(f"the reward worker could not load {module}:{function}: {message}")

    def call(self, kwargs: dict[str, Any], timeout: float) -> list[float | None]:
        self.conn.send(kwargs)
        if not self.conn.poll(timeout):
            self.close()
            raise _Failed("timeout", f"the reward call took longer than reward_timeout={timeout:g} s")
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.close()
            raise _Failed("error", "the reward worker process died during the call") from None
        if status != "ok":
            raise _Failed("error", value)
        return value

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def close(self) -> None:
        try:
            if self.process.is_alive():
                try:
                    self.conn.send(None)
                except (OSError, ValueError):
                    pass
                self.process.join(0.5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        finally:
            self.conn.close()


class RewardScorer:
    """Scores completions with a :class:`RewardSpec`, counting errors, time-outs and skipped values.

    ``scorer(prompts, completions, columns)`` → ``(rewards [N] float32, counts)`` where
    ``counts`` has ``reward_errors``, ``reward_timeouts`` and ``reward_skipped`` (completions),
    and :attr:`first_error` keeps the first failure's message for the report. ``timeout``:
    seconds per call of a user function (0 = call it in this process, without a limit).
    """

    def __init__(self, spec: RewardSpec, *, timeout: float = 60.0) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"reward_timeout must be a number of seconds >= 0 (0 = no limit), got {timeout!r}")
        self.spec = spec
        self.timeout = float(timeout)
        self.first_error: str | None = None
        self._worker: _Worker | None = None

    def _call(self, kwargs: dict[str, Any], n: int) -> list[float | None]:
        if self.spec.user and self.timeout > 0:
            if self._worker is None or not self._worker.alive:
                self._worker = _Worker(self.spec.module, self.spec.function)
            return _check_values(self._worker.call(kwargs, self.timeout), n)
        try:
            return _check_values(self.spec.fn(**kwargs), n)
        except _Failed:
            raise
        except Exception as exc:  # the user's function may fail in any way: counted, not fatal
            raise _Failed("error", f"{type(exc).__name__}: {exc}") from None

    def _call_checked(self, kwargs: dict[str, Any], n: int) -> list[float | None]:
        try:
            return self._call(kwargs, n)
        except (TypeError, ValueError) as exc:  # a malformed result
            raise _Failed("error", str(exc)) from None

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 columns: dict[str, list[Any]]) -> tuple[torch.Tensor, dict[str, int]]:
        n = len(completions)
        counts = {"reward_errors": 0, "reward_timeouts": 0, "reward_skipped": 0}
        kwargs = {"prompts": list(prompts), "completions": list(completions), **columns}
        try:
            values = self._call_checked(kwargs, n)
        except _Failed as failure:
            self.first_error = self.first_error or str(failure)
            if failure.kind == "timeout" or n == 1:
                counts["reward_timeouts" if failure.kind == "timeout" else "reward_errors"] = n
                values = [0.0] * n
            else:  # score one completion at a time, so that one bad completion does not zero the batch
                values = []
                for i in range(n):
                    single = {key: [value[i]] for key, value in kwargs.items()}
                    try:
                        values.append(self._call_checked(single, 1)[0])
                    except _Failed as item_failure:
                        counts["reward_timeouts" if item_failure.kind == "timeout" else "reward_errors"] += 1
                        values.append(0.0)
        skipped = [v is None for v in values]
        counts["reward_skipped"] = sum(skipped)
        rewards = torch.tensor([0.0 if v is None else v for v in values], dtype=torch.float32)
        return rewards, counts

    def close(self) -> None:
        """Stop the worker process, if one runs."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass
