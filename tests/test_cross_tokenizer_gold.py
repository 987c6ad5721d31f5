"""GOLD's hybrid cross-tokenizer loss against TRL's ULDLoss (the installed trl.experimental.gold, TRL 1.16).

Two byte-level BPE tokenizers trained here on different local text share part of their
vocabularies; the rows are tokenized by TRL's own ``build_teacher_inputs_from_texts`` (ids,
labels and completion-relative byte offsets for both sides); the logits are random.
"""

from __future__ import annotations

import pytest
import torch

import divergent as dv
from divergent.functional.cross_tokenizer import (
    VocabularyMatch,
    byte_offset_groups,
    gold_sequence_loss,
    merge_groups,
)
from divergent.functional.generators import MEASURE_DIVERGENCES, registry_f
from lm_helpers import CORPUS
from lm_helpers import tokenizer as student_tokenizer

OTHER_CORPUS = [
    "numbers plus numbers give other numbers; the sum of two and two is four",
    "a lazy cat and a quick dog share the mat today, thank you",
    "english words: hello, goodbye, again, language, programming, python",
] * 6

PROMPTS = ["what is two plus two?", "", "say hello: "]
COMPLETIONS = ["two plus two is four.", "the quick brown fox", "hello, how are you today? fine"]


def teacher_tokenizer():
    """A byte-level BPE tokenizer like the student's, trained on other text: part of the vocabulary is shared."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=["<pad>", "</s>", "<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(OTHER_CORPUS + CORPUS[:2], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def pair():
    s_tok, t_tok = student_tokenizer(300, template=False), teacher_tokenizer()
    from trl.experimental.gold.gold_trainer import build_teacher_inputs_from_texts

    s_ids, s_labels, _, s_offsets = build_teacher_inputs_from_texts(s_tok, PROMPTS, COMPLETIONS)
    t_ids, t_labels, _, t_offsets = build_teacher_inputs_from_texts(t_tok, PROMPTS, COMPLETIONS)
    g = torch.Generator().manual_seed(0)
    s_logits = torch.randn(*s_ids.shape, len(s_tok), generator=g, dtype=torch.float64) * 3
    t_logits = torch.randn(*t_ids.shape, len(t_tok), generator=g, dtype=torch.float64) * 3
    return s_tok, t_tok, (s_logits, t_logits, s_labels, t_labels, s_ids, t_ids, s_offsets, t_offsets)


def test_the_pair_shares_part_of_its_vocabulary(pair):
    s_tok, t_tok, (_, _, _, _, s_ids, t_ids, _, _) = pair
    match = VocabularyMatch.from_tokenizers(s_tok, t_tok)
    assert 0 < len(match) < min(len(s_tok), len(t_tok))
    assert s_ids.shape[1] != t_ids.shape[1] or not torch.equal(s_ids, t_ids)  # the rows are tokenized differently
    for t_id, s_id in zip(match.teacher_ids.tolist(), match.student_ids.tolist()):
        assert t_tok.convert_ids_to_tokens(t_id) == s_tok.convert_ids_to_tokens(s_id)


@pytest.mark.parametrize(("divergence", "beta"), [("forward_kl", 0.0), ("js", 0.5), ("js", 0.3), ("reverse_kl", 1.0)])
@pytest.mark.parametrize("strategy", ["observed", "bayesian"])
@pytest.mark.parametrize("weights", [None, (0.7, 0.4)])
@pytest.mark.parametrize("skip_eos", [True, False])
def test_equals_trl_gold_uld_loss(pair, divergence, beta, strategy, weights, skip_eos):
    """TRL's ULDLoss(use_extended_uld=True, uld_use_hybrid_loss=True): value and gradient, float64."""
    gold = pytest.importorskip("trl.experimental.gold")
    from trl.experimental.gold.gold_trainer import ULDLoss

    s_tok, t_tok, (s_logits, t_logits, s_labels, t_labels, s_ids, t_ids, s_off, t_off) = pair
    matched_weight, unmatched_weight = weights or (None, None)
    config = gold.GOLDConfig(output_dir="unused", report_to="none", bf16=False, use_cpu=True, use_uld_loss=True,
                             use_extended_uld=True, uld_use_hybrid_loss=True, beta=beta,
                             uld_token_merge_strategy=strategy, uld_hybrid_matched_weight=matched_weight,
                             uld_hybrid_unmatched_weight=unmatched_weight, uld_student_temperature=1.5,
                             uld_teacher_temperature=0.8, uld_skip_student_eos=skip_eos, uld_skip_teacher_eos=skip_eos)
    ours_in, trl_in = s_logits.clone().requires_grad_(True), s_logits.clone().requires_grad_(True)
    theirs = ULDLoss(config, s_tok, t_tok)(trl_in, t_logits, s_labels, t_labels, s_ids, t_ids, s_off, t_off)
    ours = gold_sequence_loss(ours_in, t_logits, s_labels, t_labels, s_ids, t_ids, s_off, t_off,
                              VocabularyMatch.from_tokenizers(s_tok, t_tok), divergence=divergence,
                              divergence_params={"beta": beta} if divergence == "js" else None, strategy=strategy,
                              matched_weight=matched_weight, unmatched_weight=unmatched_weight,
                              student_temperature=1.5, teacher_temperature=0.8, skip_student_eos=skip_eos,
                              skip_teacher_eos=skip_eos)
    assert float(theirs) > 0
    torch.testing.assert_close(ours, theirs.reshape(()), rtol=1e-10, atol=1e-12)
    ours.backward()
    theirs.backward()
    assert trl_in.grad.abs().sum() > 0
    torch.testing.assert_close(ours_in.grad, trl_in.grad, rtol=1e-8, atol=1e-12)


def test_sum_reduction_weights_each_sequence_by_its_groups(pair):
    s_tok, t_tok, args = pair
    match = VocabularyMatch.from_tokenizers(s_tok, t_tok)
    per_row = [gold_sequence_loss(*[a[b:b + 1] for a in args], match) for b in range(3)]
    groups = [len(byte_offset_groups(args[6][b][args[2][b] != -100][:-1], args[7][b][args[3][b] != -100][:-1])[0])
              for b in range(3)]
    total = gold_sequence_loss(*args, match, reduction="sum")
    torch.testing.assert_close(total, sum(g * r for g, r in zip(groups, per_row)))
    torch.testing.assert_close(gold_sequence_loss(*args, match), torch.stack(per_row).mean())


def test_byte_offset_groups_on_hand_made_offsets():
    # "the cat sat": student  |the| cat| sat|     teacher  |th|e c|at| s|at|
    student = [(0, 3), (3, 7), (7, 11)]
    teacher = [(0, 2), (2, 5), (5, 7), (7, 9), (9, 11)]
    assert byte_offset_groups(student, teacher) == ([[0, 1], [2]], [[0, 1, 2], [3, 4]])
    # identical splits: one group per token; an EOS of width 0 at the end closes its own group
    assert byte_offset_groups([(0, 2), (2, 4), (4, 4)], [(0, 2), (2, 4), (4, 4)]) == ([[0], [1], [2]], [[0], [1], [2]])
    # the teacher's zero-width EOS left over at the end: a last group with an empty student side
    assert byte_offset_groups([(0, 4)], [(0, 1), (1, 4), (4, 4)]) == ([[0], []], [[0, 1], [2]])
    # the two never meet before the end: everything in one group
    assert byte_offset_groups([(0, 3), (3, 5)], [(0, 2), (2, 6)]) == ([[0, 1]], [[0, 1]])
    assert byte_offset_groups(torch.tensor([[0, 1], [1, 2]]), [(0, 2)]) == ([[0, 1]], [[0]])


def test_merge_groups_is_the_chain_rule_on_hand_made_rows():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64)
    ids = [2, 1, 0]
    observed = merge_groups(probs, [[0, 1], [2], []], ids)
    torch.testing.assert_close(observed, torch.tensor([[0.5 * 0.6, 0.3 * 0.6, 0.2 * 0.6], [0.25, 0.25, 0.5],
                                                       [0.0, 0.0, 0.0]], dtype=torch.float64))
    bayesian = merge_groups(probs, [[0, 1, 2]], ids, "bayesian")
    torch.testing.assert_close(bayesian, torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64) * 0.2 * 0.6)
    tiny = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(merge_groups(tiny, [[0, 1]], [0, 1]), torch.tensor([[1e-8, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("name", MEASURE_DIVERGENCES)
def test_registry_f_sums_to_the_registry_divergence_on_distributions(name):
    """Σ p f(q/p) equals divergent.divergence(name) on normalised rows (js at beta 0.3 and its default)."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 9, generator=g, dtype=torch.float64), torch.randn(4, 9, generator=g, dtype=torch.float64)
    q, p = s.softmax(-1), t.softmax(-1)
    for params in ([{}, {"beta": 0.3}] if name == "js" else [{}]):
        got = (p * registry_f(q.log() - p.log(), name, **params)).sum(-1)
        torch.testing.assert_close(got, dv.divergence(name, s, t, reduction="none", **params), rtol=1e-10, atol=1e-12)


def test_matched_part_on_unnormalised_vectors_is_the_plain_f_sum():
    """forward_kl on unnormalised positive vectors: Σ t log(t/s), no linear term (TRL's beta = 0)."""
    s, t = torch.tensor([0.2, 0.05, 0.01], dtype=torch.float64), torch.tensor([0.1, 0.3, 0.02], dtype=torch.float64)
    got = (t * registry_f(s.log() - t.log(), "forward_kl")).sum()
    torch.testing.assert_close(got, (t * (t / s).log()).sum())
    got = (t * registry_f(s.log() - t.log(), "reverse_kl")).sum()
    torch.testing.assert_close(got, (s * (s / t).log()).sum())


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"divergence": "skew_kl"}, ValueError, "without an f-generator.*forward_kl, reverse_kl, js"),
        ({"divergence": "forwrd_kl"}, ValueError, "did you mean 'forward_kl'"),
        ({"divergence": "js", "divergence_params": {"beta": 1.0}}, ValueError, "beta"),
        ({"divergence_params": {"alpha": 0.2}}, TypeError, "unexpected parameter"),
        ({"strategy": "last"}, ValueError, "strategy must be one of observed, bayesian"),
        ({"matched_weight": 0.5}, ValueError, "both None"),
        ({"matched_weight": -1.0, "unmatched_weight": 1.0}, ValueError, "matched_weight must be"),
        ({"reduction": "none"}, ValueError, "reduction"),
        ({"student_temperature": 0.0}, ValueError, "student_temperature"),
    ],
)
def test_bad_settings_name_the_argument(pair, change, error, match):
    s_tok, t_tok, args = pair
    with pytest.raises(error, match=match):
        gold_sequence_loss(*args, VocabularyMatch.from_tokenizers(s_tok, t_tok), **change)


def test_bad_tensors_name_the_argument(pair):
    s_tok, t_tok, (s, t, s_labels, t_labels, s_ids, t_ids, s_off, t_off) = pair
    match = VocabularyMatch.from_tokenizers(s_tok, t_tok)
    with pytest.raises(ValueError, match="teacher_offsets must be a tensor of shape"):
        gold_sequence_loss(s, t, s_labels, t_labels, s_ids, t_ids, s_off, t_off[:, :-1], match)
    with pytest.raises(ValueError, match="student_ids must be a tensor of shape"):
        gold_sequence_loss(s, t, s_labels, t_labels, s_ids[:, 1:], t_ids, s_off, t_off, match)
    with pytest.raises(TypeError, match="match must be a VocabularyMatch"):
        gold_sequence_loss(s, t, s_labels, t_labels, s_ids, t_ids, s_off, t_off, {"a": 1})
    with pytest.raises(ValueError, match="vocabulary match holds teacher id"):
        gold_sequence_loss(s, t[..., :10], s_labels, t_labels, s_ids, t_ids, s_off, t_off, match)
    with pytest.raises(ValueError, match="non-decreasing end offsets"):
        byte_offset_groups([(0, 3), (0, 2)], [(0, 3)])
    with pytest.raises(TypeError, match="teacher_vocab must be a mapping"):
        VocabularyMatch.from_vocabularies({"a": 0}, ["a"])


def test_equals_trl_in_float32_too(pair):
    """The dtype training uses: float32 logits, TRL's and ours computed in float32."""
    gold = pytest.importorskip("trl.experimental.gold")
    from trl.experimental.gold.gold_trainer import ULDLoss

    s_tok, t_tok, (s_logits, t_logits, s_labels, t_labels, s_ids, t_ids, s_off, t_off) = pair
    config = gold.GOLDConfig(output_dir="unused", report_to="none", bf16=False, use_cpu=True, use_uld_loss=True,
                             use_extended_uld=True, uld_use_hybrid_loss=True, beta=0.5)
    s32, t32 = s_logits.float(), t_logits.float()
    ours_in, trl_in = s32.clone().requires_grad_(True), s32.clone().requires_grad_(True)
    theirs = ULDLoss(config, s_tok, t_tok)(trl_in, t32, s_labels, t_labels, s_ids, t_ids, s_off, t_off)
    ours = gold_sequence_loss(ours_in, t32, s_labels, t_labels, s_ids, t_ids, s_off, t_off,
                              VocabularyMatch.from_tokenizers(s_tok, t_tok))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.reshape(()), rtol=1e-5, atol=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, trl_in.grad, rtol=1e-4, atol=1e-8)
