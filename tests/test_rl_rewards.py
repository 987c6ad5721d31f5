"""Reward specs of `divergent rl --reward` against hand-computed values; failures and hangs counted, not fatal."""

import sys
import textwrap
import time

import pytest

from divergent.rl.rewards import RewardScorer, exact_reward, extract_math_answer, math_reward, parse_number, resolve_reward


def test_exact_compares_the_first_line_or_first_token():
    completions = ["19", " 19 \nmore", "19.", "the answer is 19", "19 apples", "\n\n19\n", "1 9"]
    assert exact_reward([""] * 7, completions, answer=[19] * 7) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("completion, answer, expected", [
    ("so the total is 1,234.", "1234", 1.0),
    ("$1,234.00", 1234, 1.0),
    ("first 3 then 7", "7", 1.0),         # the last number
    ("first 7 then 3", "7", 0.0),
    ("\\boxed{3/4} but maybe 5", "0.75", 1.0),  # \boxed wins over the last number
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # LaTeX fractions parse
    ("\\boxed{-\\dfrac{3}{4}}", "-0.75", 1.0),
    ("\\boxed{\\frac12}", "1/2", 1.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("x = -2.5", "-5/2", 1.0),
    ("0.3333", "1/3", 0.0),               # off by 3.3e-5: beyond the 1e-6 tolerance
    ("0.3333333", "1/3", 1.0),            # off by 3.3e-8
    ("no number here", "4", 0.0),
    ("\\boxed{yes}", "Yes", 0.0),
    ("\\boxed{yes}", "yes", 1.0),         # a non-numeric answer: normalised text
])
def test_math_reward_by_hand(completion, answer, expected):
    assert math_reward(["q"], [completion], answer=[answer]) == [expected]


def test_math_helpers():
    assert extract_math_answer("a \\boxed{x^{2}} b") == "x^{2}"
    assert parse_number("1,000,000.") == 1_000_000 and parse_number("2/0") is None


def test_regex_with_and_without_a_group():
    plain = resolve_reward(r"regex:\bdone\b").fn
    assert plain(["q"] * 3, ["all done", "undone", "done."]) == [1.0, 0.0, 1.0]
    grouped = resolve_reward(r"regex:answer:\s*(\d+)").fn
    assert grouped(["q"] * 3, ["answer: 12", "answer:13", "no"], answer=["12", "12", "12"]) == [1.0, 0.0, 0.0]
    assert grouped(["q"], ["answer: 13"]) == [1.0]  # no answer column: a match is enough


def test_conversational_completions_use_the_last_message():
    completion = [{"role": "assistant", "content": "42"}]
    assert exact_reward([[{"role": "user", "content": "q"}]], [completion], answer=["42"]) == [1.0]


def test_specs_that_do_not_resolve_name_themselves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards_a.py").write_text("def correct(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    with pytest.raises(ValueError, match=r"not a valid regular expression"):
        resolve_reward("regex:([a-")
    with pytest.raises(ImportError, match="cannot import the module 'no_such_module_x'"):
        resolve_reward("no_such_module_x:fn")
    with pytest.raises(ValueError, match=r"has no function 'corect' \(did you mean 'correct'\?\)"):
        resolve_reward("my_rewards_a:corect")
    with pytest.raises(ValueError, match=r"'exat' is not a reward spec \(did you mean 'exact'\?\)"):
        resolve_reward("exat")
    assert resolve_reward("my_rewards_a:correct").fn(prompts=["p"], completions=["c"]) == [1.0]


USER_MODULE = textwrap.dedent("""
    import time

    def flaky(prompts, completions, answer, **columns):
        # raises whenever a completion says "boom": the batch is re-scored one by one
        if any("boom" in c for c in completions):
            raise RuntimeError("grader crashed")
        return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]

    def partial(prompts, completions, **columns):
        return [None if c == "skip" else 0.5 for c in completions]

    def wrong_length(prompts, completions, **columns):
        return [1.0]

    def sleepy(prompts, completions, delay, **columns):
        time.sleep(max(delay))
        return [float(d) for d in delay]
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_rewards_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_raising_and_malformed_rewards_are_counted_in_process(user_module):
    scorer = RewardScorer(resolve_reward(f"{user_module}:flaky"), timeout=0)
    rewards, counts = scorer(["q"] * 4, ["1", "boom", "3", "x"], {"answer": [1, 2, 3, 4]})
    assert rewards.tolist() == [1.0, 0.0, 1.0, 0.0]  # only the completion that raises scores 0
    assert counts == {"reward_errors": 1, "reward_timeouts": 0, "reward_skipped": 0}
    assert "grader crashed" in scorer.first_error
    rewards, counts = RewardScorer(resolve_reward(f"{user_module}:partial"), timeout=0)(["q"] * 2, ["skip", "a"], {})
    assert rewards.tolist() == [0.0, 0.5] and counts["reward_skipped"] == 1
    rewards, counts = RewardScorer(resolve_reward(f"{user_module}:wrong_length"), timeout=0)(["q"] * 3, ["a"] * 3, {})
    # the batch call returns 1 value for 3: re-scored one by one, where 1 value is right
    assert rewards.tolist() == [1.0, 1.0, 1.0] and counts["reward_errors"] == 0


def test_a_hanging_reward_is_cut_off_and_counted_in_a_worker_process(user_module):
    scorer = RewardScorer(resolve_reward(f"{user_module}:sleepy"), timeout=1.5)
    try:
        rewards, counts = scorer(["q"] * 2, ["a", "b"], {"delay": [0.0, 0.1]})
        assert rewards.tolist() == pytest.approx([0.0, 0.1]) and counts["reward_timeouts"] == 0
        started = time.perf_counter()
        rewards, counts = scorer(["q"] * 2, ["a", "b"], {"delay": [30.0, 0.0]})
        assert time.perf_counter() - started < 10  # cut off, not waited for
        assert rewards.tolist() == [0.0, 0.0] and counts["reward_timeouts"] == 2
        assert "reward_timeout=1.5" in scorer.first_error
        # a fresh worker serves the next call
        rewards, counts = scorer(["q"], ["a"], {"delay": [0.2]})
        assert rewards.tolist() == pytest.approx([0.2]) and counts["reward_timeouts"] == 0
        # a raise in the worker is counted like in-process
        scorer2 = RewardScorer(resolve_reward(f"{user_module}:flaky"), timeout=5)
        rewards, counts = scorer2(["q"] * 2, ["boom", "2"], {"answer": [1, 2]})
        assert rewards.tolist() == [0.0, 1.0] and counts["reward_errors"] == 1
        scorer2.close()
    finally:
        scorer.close()
