"""The generated arithmetic task: split, encoding, reward, determinism."""

import pytest
import torch

from divergent.data.arithmetic import BOS, EOS, PAD, VOCAB_SIZE, ArithmeticTask, Problem, decode_response


def test_split_is_deterministic_disjoint_and_complete():
    a = ArithmeticTask(max_operand=20, operations="+-", n_test=50, seed=3)
    b = ArithmeticTask(max_operand=20, operations="+-", n_test=50, seed=3)
    c = ArithmeticTask(max_operand=20, operations="+-", n_test=50, seed=4)
    assert a.test == b.test and a.train == b.train
    assert a.test != c.test
    assert not set(a.test) & set(a.train)
    assert len(a.test) + len(a.train) == 2 * 21 * 21


def test_answers_are_correct_python_arithmetic():
    task = ArithmeticTask(max_operand=12, operations="+-*", n_test=10)
    for problem in task.train + task.test:
        expression = problem.prompt.rstrip("=")
        assert problem.answer == str(eval(expression))  # independent check of the generator


def test_exact_match_reward():
    task = ArithmeticTask(max_operand=9, n_test=5)
    problem = Problem("3+4=", "7")
    assert task.reward(problem, "7") == 1.0
    assert task.reward(problem, " 7 ") == 1.0
    assert task.reward(problem, "07") == 0.0
    assert task.reward(problem, "8") == 0.0
    assert task.reward(problem, "") == 0.0


def test_prompts_have_equal_length_and_round_trip():
    task = ArithmeticTask(max_operand=99, n_test=20)
    problems = [Problem("1+2=", "3"), Problem("99+99=", "198")]
    ids = task.encode_prompts(problems)
    assert ids.shape == (2, task.prompt_length) and ids.dtype == torch.long
    assert ids[0, 0] == BOS and ids[1, 0] == BOS  # at least one BOS on the longest prompt
    assert bytes(t for t in ids[0].tolist() if t < 256).decode() == "1+2="


def test_supervised_batch_targets_are_the_answers():
    task = ArithmeticTask(max_operand=99, n_test=20)
    problems = task.train[:5]
    ids, mask = task.supervised_batch(problems)
    for row, problem in enumerate(problems):
        target = ids[row][mask[row]].tolist()
        assert target == list(problem.answer.encode()) + [EOS]
        assert (ids[row][~mask[row]][task.prompt_length:] == PAD).all()
    assert int(ids.max()) < VOCAB_SIZE


def test_decode_response_stops_at_eos_and_reports_truncation():
    assert decode_response([ord("1"), ord("9"), EOS, PAD]) == ("19", 3, True)
    assert decode_response([ord("1"), ord("9")]) == ("19", 2, False)
    text, length, finished = decode_response([BOS, ord("5"), EOS])
    assert text == "\ufffd5" and length == 3 and finished


def test_preference_pairs_reject_a_wrong_answer():
    task = ArithmeticTask(max_operand=30, n_test=5)
    for prompt, chosen, rejected in task.preference_pairs(task.train[:50], seed=1):
        assert chosen != rejected
        assert chosen == str(eval(prompt.rstrip("=")))
    assert task.preference_pairs(task.train[:5], seed=1) == task.preference_pairs(task.train[:5], seed=1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="operations"):
        ArithmeticTask(operations="/")
    with pytest.raises(ValueError, match="n_test"):
        ArithmeticTask(max_operand=2, n_test=100)
    with pytest.raises(ValueError, match="max_operand"):
        ArithmeticTask(max_operand=0)
