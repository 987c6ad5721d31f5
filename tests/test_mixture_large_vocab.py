"""Several teachers at any vocabulary size: the mixture gives its logits (no [V, V] layer).

References are computed by hand in float64 from each teacher's own HF logits and the student's
own HF logits with autograd (p_mix = sum_i w_i softmax(z_i / T); forward KL and JS written out),
never through the code under test; the fused loss with dense teacher logits also against the unfused
loss on full float64 logits (dv.DistillationLoss, another code path) for more registry divergences."""

import math

import pytest
import torch

pytest.importorskip("transformers")
import lm_helpers as H  # noqa: E402

import divergent as dv  # noqa: E402
from divergent.data.teacher_cache import teacher_topk  # noqa: E402
from divergent.functional.fused_linear import fused_linear_distillation  # noqa: E402
from divergent.models.hf import gives_logits, output_vocab, teacher_side  # noqa: E402
from divergent.models.mixture import TeacherMixture  # noqa: E402
from divergent.train.lm import Batch, LMObjective, evaluate_lm  # noqa: E402

VOCAB = 20000  # above the 16384 the identity output layer allowed


@pytest.fixture(scope="module")
def models():
    a, b = H.llama(VOCAB, 16, 1, seed=1).double(), H.llama(VOCAB, 16, 1, seed=2).double()
    with torch.no_grad():  # peaked teachers, so that where T is applied matters
        a.lm_head.weight.mul_(30)
        b.lm_head.weight.mul_(30)
    return a, b, H.llama(VOCAB, 16, 1, seed=0).double()


def _ids(seed, shape=(2, 7)):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _hand_mixture(teachers, weights, ids, temperature):
    with torch.no_grad():
        probs = [torch.softmax(t(input_ids=ids).logits.double() / temperature, -1) for t in teachers]
    return sum(w * p for w, p in zip(weights, probs))


def test_the_mixture_holds_no_vocab_squared_tensor_and_gives_its_logits(models):
    a, b, _ = models
    mixture = TeacherMixture([a, b], [1, 3])
    assert gives_logits(mixture) and output_vocab(mixture) == VOCAB
    tensors = list(mixture.parameters()) + list(mixture.buffers())
    assert tensors and max(t.numel() for t in tensors) <= VOCAB * 16  # the teachers' [V, H] layers, no [V, V]
    assert not any(t.dim() == 2 and t.shape[0] == t.shape[1] == VOCAB for t in tensors)
    ids = _ids(0)
    with torch.no_grad():
        hidden, logits = teacher_side(mixture, ids)
    assert hidden is None and logits.shape == (2, 7, VOCAB)
    torch.testing.assert_close(torch.softmax(logits, -1), _hand_mixture([a, b], [0.25, 0.75], ids, 1.0),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_loss_and_student_gradient_equal_the_hand_mixture_in_float64(models, fused):
    a, b, student = models
    temperature, weights = 2.0, [0.7, 0.3]
    ids = _ids(1)
    labels = ids.clone()
    labels[0, :3] = -100
    objective = LMObjective("forward_kl", temperature=temperature, fused=fused, chunk_size=4)
    student.zero_grad()
    loss = objective(student, student, Batch(ids, torch.ones_like(ids), labels),
                     teacher=TeacherMixture([a, b], weights, temperature=temperature))
    loss.backward()
    ours = [p.grad.clone() for p in student.parameters()]

    # by hand: T^2 * sum_t KL(p_mix || q^T) / counted, with autograd through the student's own logits
    student.zero_grad()
    p = _hand_mixture([a, b], weights, ids, temperature)[:, :-1]
    logq = torch.log_softmax(student(input_ids=ids).logits.double() / temperature, -1)[:, :-1]
    counted = labels[:, 1:] != -100
    kl = (p * (p.log() - logq)).sum(-1)
    expected = temperature**2 * kl[counted].sum() / counted.sum()
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-9)
    for got, want in zip(ours, (p.grad for p in student.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)


def _forward_kl(s, t, temperature):
    p, logp, logq = torch.softmax(t / temperature, -1), torch.log_softmax(t / temperature, -1), \
        torch.log_softmax(s / temperature, -1)
    return (p * (logp - logq)).sum(-1)


def _js(s, t, temperature, beta=0.5):
    p, q = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)


@pytest.mark.parametrize("name, params, reference", [("forward_kl", {}, _forward_kl),
                                                     ("js", {"beta": 0.5}, _js)])
def test_fused_loss_with_dense_teacher_logits_equals_the_float64_reference(name, params, reference):
    g = torch.Generator().manual_seed(3)
    n, hidden, vocab, temperature = 11, 8, 300, 1.5
    x = torch.randn(n, hidden, dtype=torch.float64, generator=g).requires_grad_(True)
    w = torch.randn(vocab, hidden, dtype=torch.float64, generator=g).requires_grad_(True)
    teacher = 3 * torch.randn(n, vocab, dtype=torch.float64, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[[2, 7]] = -100
    loss = fused_linear_distillation(name, x, w, None, teacher, labels, temperature=temperature, chunk_size=4,
                                     **params)
    gx, gw = torch.autograd.grad(loss, [x, w])
    counted = labels != -100
    expected = temperature**2 * reference(x @ w.T, teacher, temperature)[counted].sum() / counted.sum()
    ex, ew = torch.autograd.grad(expected, [x, w])
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    torch.testing.assert_close(gx, ex, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, ew, rtol=1e-9, atol=1e-12)


def test_dense_teacher_logits_bad_input_is_named():
    x, w = torch.randn(4, 8), torch.randn(30, 8)
    with pytest.raises(ValueError, match="cover 3 tokens, student_input has 4"):
        fused_linear_distillation("forward_kl", x, w, None, torch.randn(3, 30))
    with pytest.raises(ValueError, match="require grad"):
        fused_linear_distillation("forward_kl", x, w, None, torch.randn(4, 30, requires_grad=True))
    with pytest.raises(ValueError, match="teacher vocabulary \\(20\\) differ"):
        fused_linear_distillation("forward_kl", x, w, None, torch.randn(4, 20))
    bad = torch.randn(4, 30)
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="teacher logits holds 1 NaN"):
        fused_linear_distillation("forward_kl", x, w, None, bad)


def test_evaluation_and_teacher_cache_read_the_mixture(models):
    a, b, student = models
    mixture = TeacherMixture([a, b], [0.5, 0.5])
    ids = _ids(4, (1, 6))
    examples = [{"input_ids": ids[0].tolist(), "labels": ids[0].tolist()}]
    metrics = evaluate_lm(student, examples, teacher=mixture)
    p = _hand_mixture([a, b], [0.5, 0.5], ids, 1.0)[0, :-1]
    with torch.no_grad():
        logq = torch.log_softmax(student(input_ids=ids).logits.double(), -1)[0, :-1]
    assert metrics["kl_teacher"] == pytest.approx(float((p * (p.log() - logq)).sum(-1).mean()), rel=1e-5)
    assert metrics["teacher_loss"] == pytest.approx(float(-p.log().gather(1, ids[0, 1:, None]).mean()), rel=1e-5)
    # the mixture measured as a model (DDK's per-domain teacher perplexity)
    assert evaluate_lm(mixture, examples)["loss"] == pytest.approx(metrics["teacher_loss"], rel=1e-9)
    indices, logprobs, next_logprob = teacher_topk(mixture, ids, torch.ones_like(ids), k=3, vocab_size=VOCAB)
    top = p.log().topk(3, dim=-1)
    torch.testing.assert_close(indices[0, :-1], top.indices)
    torch.testing.assert_close(logprobs[0, :-1].double(), top.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(next_logprob[0, :-1].double(), p.log().gather(1, ids[0, 1:, None])[:, 0],
                               rtol=1e-5, atol=1e-6)


def test_the_mixture_is_a_teacher_without_gradient(models):
    a, b, _ = models
    trainable = [H.llama(300, 16, 1, seed=s) for s in (5, 6)]  # parameters that require grad, grad mode on
    logits = TeacherMixture(trainable, [0.5, 0.5], temperature=2.0)(torch.tensor([[3, 4, 5]]))
    assert not logits.requires_grad and torch.isfinite(logits).all()


def test_dense_teacher_logits_with_padding_columns_are_cut_to_vocab_size():
    """Teacher logits wider than the vocabulary compared (a padded output layer): only the first vocab_size count."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, dtype=torch.float64, generator=g).requires_grad_(True)
    w = torch.randn(40, 8, dtype=torch.float64, generator=g)
    teacher = torch.randn(6, 48, dtype=torch.float64, generator=g)
    loss = fused_linear_distillation("forward_kl", x, w, None, teacher, vocab_size=32, chunk_size=4)
    expected = _forward_kl((x @ w.T)[:, :32], teacher[:, :32], 1.0).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)


@pytest.mark.parametrize("name, params", [("reverse_kl", {}), ("tvd", {}), ("skew_kl", {"alpha": 0.1}),
                                          ("alpha_beta", {"alpha": 0.5, "beta": 0.7})])
def test_fused_dense_teacher_logits_equal_the_unfused_loss_on_full_logits(name, params):
    """Against the unfused path (dv.DistillationLoss on the [N, V] logits, float64), with labels and a CE term."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 8, dtype=torch.float64, generator=g).requires_grad_(True)
    w = torch.randn(50, 8, dtype=torch.float64, generator=g).requires_grad_(True)
    teacher = 2 * torch.randn(9, 50, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 50, (9,), generator=g)
    labels[4] = -100
    common = dict(temperature=1.7, hard_weight=0.3, soft_weight=0.7, **params)
    loss = dv.LinearDistillationLoss(name, chunk_size=4, **common)(x, w, None, teacher, labels)
    gx, gw = torch.autograd.grad(loss, [x, w])
    expected = dv.DistillationLoss(name, **common)(x @ w.T, teacher, labels)
    ex, ew = torch.autograd.grad(expected, [x, w])
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    torch.testing.assert_close(gx, ex, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, ew, rtol=1e-9, atol=1e-12)


def test_evaluation_at_another_temperature_reads_the_mixture_of_the_teachers_themselves(models):
    """Training at T = 2 mixes the tempered teachers; evaluation (KL, teacher loss) and a cache of the mixture are at
    T = 1, so they read sum_i w_i softmax(z_i), computed here by hand in float64."""
    a, b, student = models
    mixture = TeacherMixture([a, b], [0.3, 0.7], temperature=2.0)
    ids = _ids(4, (1, 6))
    examples = [{"input_ids": ids[0].tolist(), "labels": ids[0].tolist()}]
    metrics = evaluate_lm(student, examples, teacher=mixture)
    p = _hand_mixture([a, b], [0.3, 0.7], ids, 1.0)[0, :-1]
    assert not torch.allclose(p, _hand_mixture([a, b], [0.3, 0.7], ids, 2.0)[0, :-1])  # the temperature matters
    with torch.no_grad():
        logq = torch.log_softmax(student(input_ids=ids).logits.double(), -1)[0, :-1]
    assert metrics["kl_teacher"] == pytest.approx(float((p * (p.log() - logq)).sum(-1).mean()), rel=1e-5)
    assert metrics["teacher_loss"] == pytest.approx(float(-p.log().gather(1, ids[0, 1:, None]).mean()), rel=1e-5)
    _, logprobs, _ = teacher_topk(mixture, ids, torch.ones_like(ids), k=3, vocab_size=VOCAB)
    torch.testing.assert_close(logprobs[0, :-1].double(), p.log().topk(3, dim=-1).values, rtol=1e-5, atol=1e-6)
    # training still reads the tempered mixture: softmax(logits / T) = sum_i w_i softmax(z_i / T)
    torch.testing.assert_close(torch.softmax(mixture(ids).double() / 2.0, -1)[0, :-1],
                               _hand_mixture([a, b], [0.3, 0.7], ids, 2.0)[0, :-1], rtol=1e-5, atol=1e-7)
