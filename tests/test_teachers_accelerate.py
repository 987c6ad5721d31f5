"""The new teachers of divergent.hf.DistillationTrainer under ``accelerate launch`` (DDP, 2 CPU processes, gloo)
train the same student as one plain process: one teacher per domain (``teacher_model={domain: folder}``, DDK
mixing) and a teacher with another tokenizer (``cross_tokenizer="uld"|"gold"``: a local teacher, a
``teacher_cache`` in the teacher's tokens, a served teacher); GOLD also with the student sharded by FSDP.

The reference is the same worker run as ONE process without accelerate: global batch 8 as 4 rows x 2
accumulation there and 2 rows x 2 accumulation x 2 processes here (tests/test_hf_fsdp.py's ``_run``). The
answers differ in length, so the ranks count different numbers of tokens per micro-batch: only the global
token count as each objective's normaliser gives the one-process update. Compared: the logged loss of every
step and the final parameters (and, by domain, DDK's measured weights).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")
from test_cross_tokenizer_teachers import _cache, models, server  # noqa: E402,F401  (the 300/400-token pair)
from test_domain_teachers import _save, tiny  # noqa: E402,F401  (the two peaked teachers)
import test_hf_fsdp  # noqa: E402
from test_hf_fsdp import FSDP_FLAGS, STEPS, _run, _trained  # noqa: E402

# Modes: "domains" (one teacher per domain, DDK every 2 steps) or "<uld|gold>-<local|cached|served>".
WORKER = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_hf_fsdp import enable_cpu_fsdp, full_state
enable_cpu_fsdp()  # (only under --use_fsdp)
from test_teachers_accelerate import uneven_rows
from divergent.hf import DistillationConfig, DistillationTrainer
from divergent.models.hf import load_tokenizer

out, mode, batch, accum, root, url = sys.argv[1:7]
settings = dict(output_dir=out + ".run", per_device_train_batch_size=int(batch),
                gradient_accumulation_steps=int(accum), max_steps={steps}, learning_rate=0.5, optim="sgd",
                lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, save_strategy="no", use_cpu=True,
                report_to=[], seed=0, disable_tqdm=True, hard_weight=0.3)
if mode == "domains":
    from test_domain_teachers import _task_rows
    rows = _task_rows()  # 10 parity + 10 sums rows; 24 to train on: 3 steps of 8 are one pass
    settings.update(domain_column="task", mixing="ddk", ddk_interval=2, per_device_eval_batch_size=4)
    kwargs = dict(teacher_model={{"parity": root + "/a", "sums": root + "/b"}}, train_dataset=rows + rows[:4],
                  eval_dataset=rows[::5])
else:
    cross, source = mode.split("-")
    settings.update(cross_tokenizer=cross, divergence="forward_kl")
    kwargs = dict(processing_class=load_tokenizer(root + "/student", "student"),
                  teacher_processing_class=load_tokenizer(root + "/teacher", "teacher"))
    if source == "cached":
        settings["teacher_cache"] = root + "/cache"
    elif source == "served":
        settings["teacher_top_k"] = 16
        kwargs.update(teacher_model=url, train_dataset=uneven_rows())
    else:
        kwargs.update(teacher_model=root + "/teacher", train_dataset=uneven_rows())
trainer = DistillationTrainer(model=root + "/student", args=DistillationConfig(**settings), **kwargs)
trainer.train()
state = full_state(trainer)
if trainer.accelerator.is_main_process:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    history = trainer.domain_callback.history if trainer.domain_callback is not None else None
    torch.save({{"state": {{k: v.detach().clone() for k, v in state.items()}}, "losses": losses,
                 "wrapped": type(trainer.model_wrapped).__name__, "processes": trainer.accelerator.num_processes,
                 "history": history, "objective": type(trainer.objective).__name__, "fsdp": trainer.is_fsdp_enabled}}, out)
"""

DDP = ("--multi_gpu",)


def uneven_rows(n: int = 24) -> list[dict]:
    """Prompt + answer rows whose answers are 1-4 words long: the ranks count unequal numbers of tokens."""
    words = ["even" if i % 2 == 0 else "odd" for i in range(n)]
    return [{"prompt": f"the number {i} is", "completion": " " + " ".join([words[i]] * (1 + i % 4)) + "."}
            for i in range(n)]


def _both(tmp_path, root, mode, url="-"):
    """``(one process, two processes)`` of the worker in ``mode``."""
    single = _run(tmp_path, root, mode, 1, url, worker=WORKER, flags=DDP)
    return single, _run(tmp_path, root, mode, 2, url, worker=WORKER, flags=DDP)


def _assert_equal(single: dict, double: dict) -> None:
    assert single["processes"] == 1 and double["processes"] == 2
    assert double["wrapped"] == "DistributedDataParallel", double["wrapped"]
    assert len(single["losses"]) == len(double["losses"]) == STEPS
    assert all(torch.isfinite(torch.tensor(single["losses"])))
    assert double["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert single["state"].keys() == double["state"].keys()
    for name in single["state"]:
        torch.testing.assert_close(double["state"][name], single["state"][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def domain_root(tmp_path_factory, tiny):  # noqa: F811
    import copy

    tok, a, b, student = tiny
    root = tmp_path_factory.mktemp("domains_ddp")
    _save(root, tok, a=copy.deepcopy(a), b=copy.deepcopy(b), student=copy.deepcopy(student))
    return root


@pytest.mark.slow  # two launches (one plain, one accelerate + torchrun): ~25 s on 2 busy cores
def test_teachers_by_domain_under_ddp_equal_one_process(tmp_path, domain_root):
    single, double = _both(tmp_path, domain_root, "domains")
    _assert_equal(single, double)
    _trained(single, domain_root)
    # DDK measured at steps 0 and 2 (and after the last): the same weights from the same student
    assert [h["step"] for h in double["history"]] == [h["step"] for h in single["history"]] == [0, 2, 3]
    # (here the domains' ppl_S/ppl_T are close: weights about 0.5 +- 7e-5, compared to 1e-6)
    for one, two in zip(single["history"], double["history"]):
        assert two["weights"] == pytest.approx(one["weights"], rel=0, abs=1e-6)
        assert one["weights"] != pytest.approx([0.5, 0.5], rel=0, abs=1e-6)


@pytest.mark.slow  # four launches: ~50 s on 2 busy cores
@pytest.mark.parametrize("mode", ["gold", "uld"])
def test_local_teacher_across_tokenizers_under_ddp_equals_one_process(tmp_path, models, mode):  # noqa: F811
    single, double = _both(tmp_path, models["root"], f"{mode}-local")
    assert single["objective"] == "CrossTokenizerObjective"
    _assert_equal(single, double)
    _trained(single, models["root"])


@pytest.fixture(scope="module")
def cached(models):  # noqa: F811
    """A cache of uneven_rows() in the teacher's tokens (k = 16 of 400) in the pair's folder."""
    return _cache(models, models["root"], 16, rows=uneven_rows())


@pytest.mark.slow  # two launches each: ~25 s on 2 busy cores
@pytest.mark.parametrize("mode", ["gold", "uld"])
def test_cached_teacher_across_tokenizers_under_ddp_equals_one_process(tmp_path, models, cached, mode):  # noqa: F811
    """Every rank reads the whole cache and re-tokenizes its rows for the student; the sampler splits them."""
    single, double = _both(tmp_path, models["root"], f"{mode}-cached")
    _assert_equal(single, double)
    _trained(single, models["root"])


@pytest.mark.slow  # two launches, each rank asking the test's server for its rows every step: ~15 s on 2 busy cores
def test_served_teacher_across_tokenizers_under_ddp_equals_one_process(tmp_path, models, server):  # noqa: F811
    """Each rank re-tokenizes its own micro-batches for the teacher and asks the server (tests/served_server.py on
    127.0.0.1) for their top-16; the step is still normalised by the count over both ranks."""
    single, double = _both(tmp_path, models["root"], "gold-served", server.url)
    _assert_equal(single, double)
    _trained(single, models["root"])
    assert server.sequences >= 2 * STEPS * 8  # both runs asked the server for every row they trained on


@pytest.mark.slow  # two launches: ~15 s on 2 busy cores
@pytest.mark.parametrize("source", ["local", "cached"])
def test_gold_under_fsdp_equals_one_process(tmp_path, models, cached, source):  # noqa: F811
    """The student sharded by FSDP (tests/test_hf_fsdp.py's launch), the teacher whole (or its cache) on each rank."""
    single = _run(tmp_path, models["root"], f"gold-{source}", 1, worker=WORKER)
    double = _run(tmp_path, models["root"], f"gold-{source}", 2, worker=WORKER, flags=FSDP_FLAGS)
    test_hf_fsdp._assert_equal(single, double)
    _trained(single, models["root"])
