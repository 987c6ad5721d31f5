"""DDK domain mixing in divergent.hf.DistillationTrainer on a tiny HF Llama: the callback's weights follow
Eq. 1 then Eq. 2 (numpy, written out) from per-domain perplexities measured independently, the sampler
draws the rows by those weights (with no lag), the same seed gives the same draws (what every rank relies on),
a run resumed from a checkpoint equals the uninterrupted run (draws, weights, parameters), and bad input is
refused by name."""

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
import lm_helpers as H  # noqa: E402

from divergent.data.lm_data import tokenize_rows  # noqa: E402
from divergent.hf import DistillationConfig, DistillationTrainer  # noqa: E402
from divergent.train.lm import evaluate_lm  # noqa: E402

DOMAINS = {"animals": [0, 2], "chat": [1, 3], "code": [4, 5]}  # indices into H.CORPUS


def _rows(n=8):
    return [{"text": H.CORPUS[DOMAINS[d][i % 2]] + f" {i}", "kind": d} for d in DOMAINS for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = H.tokenizer()
    return tokenizer, H.llama(len(tokenizer), 48, 2, seed=1), H.llama(len(tokenizer), 32, 1, seed=0)


def _args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=5, learning_rate=0.05,
                    optim="sgd", lr_scheduler_type="constant", logging_steps=1, save_strategy="no", use_cpu=True,
                    report_to=[], seed=0, disable_tqdm=True, hard_weight=1.0, soft_weight=0.2, domain_column="kind",
                    ddk_interval=2, ddk_smoothing=0.5, per_device_eval_batch_size=4)
    settings.update(overrides)
    return DistillationConfig(**settings)


def _record_draws(trainer):
    """The rows the trainer's sampler draws from now on: (domain, dataset index, weights in force)."""
    domains, drawn = trainer.domain_sampler.domains, []
    real_next = domains.next_example

    def recording_next(domain):
        index = real_next(domain)
        drawn.append((domains.names[domain], index, list(domains.weights)))
        return index

    domains.next_example = recording_next
    return drawn


def test_ddk_callback_follows_eq1_then_eq2_and_the_sampler_draws_by_the_weights(tmp_path, tiny):
    tokenizer, teacher, student = tiny
    rows = _rows()
    eval_rows = [{"text": H.CORPUS[DOMAINS[d][0]], "kind": d} for d in DOMAINS]
    initial = copy.deepcopy(student)
    trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, train_dataset=rows,
                                  eval_dataset=eval_rows, args=_args(tmp_path), processing_class=tokenizer)
    drawn = _record_draws(trainer)
    trainer.train()
    callback = trainer.domain_callback
    assert [h["step"] for h in callback.history] == [0, 2, 4, 5]

    def ppl(model, domain):
        examples, _ = tokenize_rows([r for r in eval_rows if r["kind"] == domain], tokenizer, max_length=1024)
        return evaluate_lm(model, examples, pad_token_id=tokenizer.pad_token_id)["perplexity"]

    names = sorted(DOMAINS)
    teacher_ppl = np.array([ppl(teacher, d) for d in names])
    np.testing.assert_allclose(callback.teacher_ppl, teacher_ppl, rtol=1e-6)
    np.testing.assert_allclose(callback.history[0]["student_ppl"], [ppl(initial, d) for d in names], rtol=1e-6)
    np.testing.assert_allclose(callback.history[-1]["student_ppl"], [ppl(trainer.model, d) for d in names], rtol=1e-6)
    ratio = np.array(callback.history[0]["student_ppl"]) / teacher_ppl
    np.testing.assert_allclose(callback.history[0]["weights"], np.exp(ratio) / np.exp(ratio).sum(), rtol=1e-9)
    for before, after in zip(callback.history[:2], callback.history[1:3]):
        psi = np.array(before["weights"]) * np.exp(np.array(after["student_ppl"]) / teacher_ppl)
        np.testing.assert_allclose(after["weights"], 0.5 * psi / psi.sum() + 0.5 / 3, rtol=1e-9)
    # the rows drawn: 5 steps x 4 rows (drawn when a step takes them, none ahead), each a row of its domain,
    # drawn with the weights in force at the time (Eq. 1's first, then the updates')
    assert len(drawn) == 20
    assert [w for _, _, w in drawn] == [callback.history[i]["weights"] for i in (0,) * 8 + (1,) * 8 + (2,) * 4]
    for domain, index, _ in drawn:
        text = tokenizer.decode(trainer.train_dataset[index]["input_ids"])
        assert any(text.startswith(H.CORPUS[i]) for i in DOMAINS[domain]), (domain, text)
    seen = {tuple(w) for _, _, w in drawn}
    assert len(seen) >= 2 and seen <= {tuple(h["weights"]) for h in callback.history}
    assert not torch.allclose(trainer.model.lm_head.weight, student.lm_head.weight)


def test_two_trainers_with_one_seed_draw_the_same_rows(tmp_path, tiny):
    """What every process of an accelerate launch relies on: the same seed, the same weights, the same stream."""
    tokenizer, teacher, student = tiny

    def stream():
        trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, train_dataset=_rows(),
                                      args=_args(tmp_path, mixing="proportional"), processing_class=tokenizer)
        sampler = trainer.domain_sampler
        return [sampler.resolve(slot) for slot in sampler]

    first, second = stream(), stream()
    assert first == second and len(first) == len(_rows()) - 3  # one row per domain held out for evaluation


def _recorded_run(tmp_path, tiny, out, resume=None, **overrides):
    """A DDK run recording every row drawn as (domain, dataset index, weights in force)."""
    tokenizer, teacher, student = tiny
    args = _args(tmp_path, output_dir=str(out), save_strategy="steps", **overrides)
    trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, train_dataset=_rows(),
                                  args=args, processing_class=tokenizer)
    drawn = _record_draws(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, drawn


@pytest.mark.parametrize("settings", [
    # 21 training rows in batches of 4: 6 steps a pass, the checkpoint of step 3 mid-pass and mid-interval
    dict(per_device_train_batch_size=4, max_steps=8, save_steps=3),
    # 2 micro-batches a step: the Trainer skips 6 micro-batches of slots; the resumed run crosses a pass
    dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=8, save_steps=4),
])
def test_a_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(tmp_path, tiny, settings):
    """Run layer: weights, per-domain positions, the generator and the measurements are in each checkpoint;
    a new trainer resumed from checkpoint-k draws the rows, measures the weights and ends at the parameters
    of the uninterrupted run."""
    whole, whole_drawn = _recorded_run(tmp_path, tiny, tmp_path / "whole", **settings)
    k = settings["save_steps"]
    checkpoint = tmp_path / "whole" / f"checkpoint-{k}"
    assert (checkpoint / "domain_mixing.pt").is_file() and (checkpoint / "trainer_state.json").is_file()
    rows_per_step = settings["per_device_train_batch_size"] * settings.get("gradient_accumulation_steps", 1)
    resumed, resumed_drawn = _recorded_run(tmp_path, tiny, tmp_path / "resumed", resume=str(checkpoint), **settings)

    full = whole.domain_callback
    assert [h["step"] for h in full.history] == [0, 2, 4, 6, 8]
    assert resumed.domain_callback.history == full.history
    assert resumed.domain_callback.teacher_ppl == full.teacher_ppl
    assert len(whole_drawn) == 21 + 2 * 4  # a pass of 21 rows in 6 steps (the last holds one), then 2 steps
    assert resumed_drawn == whole_drawn[k * rows_per_step:]
    assert len({tuple(w) for _, _, w in resumed_drawn}) >= 2  # the resumed part spans a weight update
    for name, parameter in whole.model.named_parameters():
        torch.testing.assert_close(dict(resumed.model.named_parameters())[name], parameter, rtol=0, atol=0)
    # the state a fresh run would have restarted from (Eq. 1 at step k) is not what the resumed run used
    assert full.history[0]["weights"] != full.history[k // 2]["weights"]


def test_resuming_without_or_with_a_corrupt_mixing_state_is_refused(tmp_path, tiny):
    tokenizer, teacher, student = tiny
    _recorded_run(tmp_path, tiny, tmp_path / "run", max_steps=2, save_steps=1)

    def resume(checkpoint, output_dir="again", **overrides):
        args = _args(tmp_path, output_dir=str(tmp_path / output_dir), **{"max_steps": 2, **overrides})
        trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, train_dataset=_rows(),
                                      args=args, processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=checkpoint if checkpoint is True else str(checkpoint))
        return trainer

    # True: the output folder's last checkpoint (step 2: its measurements restored, then step 3 measured)
    assert [h["step"] for h in resume(True, output_dir="run", max_steps=3).domain_callback.history] == [0, 2, 3]
    with pytest.raises(ValueError, match="resume_from_checkpoint=True: no checkpoint found in the output folder"):
        resume(True, output_dir="empty")
    first, second = tmp_path / "run" / "checkpoint-1", tmp_path / "run" / "checkpoint-2"
    with pytest.raises(ValueError, match="was written with interval=2, this trainer has interval=3"):
        resume(first, ddk_interval=3)
    with pytest.raises(ValueError, match="ignore_data_skip=True with domain_column"):
        resume(first, ignore_data_skip=True)
    (first / "domain_mixing.pt").unlink()
    with pytest.raises(ValueError, match="checkpoint-1 holds no domain_mixing.pt"):
        resume(first)
    state = second / "domain_mixing.pt"
    data = bytearray(state.read_bytes())
    data[-5] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="domain_mixing.pt is corrupt: its SHA-256 checksum does not match"):
        resume(second)


@pytest.mark.parametrize("overrides, match", [
    (dict(domain_column="topic"), "no domain column 'topic'; found columns \\['text', 'kind'\\]"),
    (dict(mixing="uniformm"), "did you mean 'uniform'"),
    (dict(ddk_interval=0), "ddk_interval must be an int >= 1"),
    (dict(ddk_smoothing=-1.0), "ddk_smoothing must be in \\[0, 1\\]"),
    (dict(domain_column=None, mixing="uniform"), "mixing 'uniform' draws rows by domain and needs a domain column"),
])
def test_bad_input_is_refused_by_name(tmp_path, tiny, overrides, match):
    tokenizer, teacher, student = tiny
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, train_dataset=_rows(),
                            args=_args(tmp_path, **overrides), processing_class=tokenizer)


def test_ddk_without_a_teacher_is_refused(tmp_path, tiny):
    tokenizer, _, student = tiny
    with pytest.raises(ValueError, match="mixing 'ddk' needs the teacher model"):
        DistillationTrainer(model=copy.deepcopy(student), train_dataset=_rows(),
                            args=_args(tmp_path, soft_weight=0.0), processing_class=tokenizer)


# Every process of `accelerate launch` draws the same domains: each rank logs its measurements and draws.
DDK_WORKER = """
import json, os, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import lm_helpers as H
from test_ddk_hf import _rows
from divergent.hf import DistillationConfig, DistillationTrainer

out = sys.argv[1]
tokenizer = H.tokenizer()
teacher, student = H.llama(len(tokenizer), 48, 2, seed=1), H.llama(len(tokenizer), 32, 1, seed=0)
args = DistillationConfig(output_dir=out + ".run", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                          max_steps=4, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
                          logging_steps=1, save_strategy="steps", save_steps=2, use_cpu=True, report_to=[], seed=0,
                          disable_tqdm=True,
                          hard_weight=1.0, soft_weight=0.2, domain_column="kind", ddk_interval=2,
                          per_device_eval_batch_size=4)
trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_rows(),
                              processing_class=tokenizer)
domains = trainer.domain_sampler.domains
drawn, real_next = [], domains.next_example
def recording_next(domain):
    drawn.append(domain)
    return real_next(domain)
domains.next_example = recording_next
trainer.train(resume_from_checkpoint=sys.argv[2] if len(sys.argv) > 2 else None)
rank = os.environ.get("RANK", "0")
json.dump({{"history": trainer.domain_callback.history, "drawn": drawn}}, open(out + ".rank" + rank + ".json", "w"))
torch.save(trainer.model.state_dict(), out + ".rank" + rank + ".pt")
"""


@pytest.mark.slow  # two accelerate + torchrun start-ups: ~30 s on 2 busy cores
def test_every_accelerate_process_draws_the_same_domains(tmp_path):
    """2 CPU processes (DDP via accelerate launch): identical DDK measurements, weights and draws on both ranks,
    and a run resumed from its checkpoint on 2 processes equals the uninterrupted one."""
    import json

    from test_accelerate_launch import _accelerate_launch

    script = tmp_path / "ddk_worker.py"
    script.write_text(DDK_WORKER.format(tests=str(H.Path(H.__file__).parent)))
    _accelerate_launch(tmp_path, script, str(tmp_path / "ddk"))
    rank0, rank1 = (json.loads((tmp_path / f"ddk.rank{r}.json").read_text()) for r in (0, 1))
    assert [h["step"] for h in rank0["history"]] == [0, 2, 4]
    assert rank0["history"] == rank1["history"]
    assert rank0["drawn"] == rank1["drawn"] and len(rank0["drawn"]) >= 4 * 2 * 2 * 2
    assert rank0["history"][0]["weights"] != rank0["history"][1]["weights"]
    # killed after the checkpoint of step 2 and resumed on 2 processes: the same draws, weights and parameters
    _accelerate_launch(tmp_path, script, str(tmp_path / "again"), str(tmp_path / "ddk.run" / "checkpoint-2"))
    for rank in (0, 1):
        whole = json.loads((tmp_path / f"ddk.rank{rank}.json").read_text())
        resumed = json.loads((tmp_path / f"again.rank{rank}.json").read_text())
        assert resumed["history"] == whole["history"]
        assert resumed["drawn"] == whole["drawn"][2 * 2 * 2 * 2:]  # 2 steps x 2 micro-batches x 2 rows x 2 ranks
        final, again = (torch.load(tmp_path / f"{name}.rank{rank}.pt") for name in ("ddk", "again"))
        for key in final:
            torch.testing.assert_close(again[key], final[key], rtol=0, atol=0)
