"""divergent.hf.DistillationTrainer under ``accelerate launch`` with FSDP (2 CPU processes, gloo) trains the
same student as one plain process: a local teacher, a cached teacher (``cache-teacher``'s folder) and a
served teacher (tests/served_server.py on 127.0.0.1).

The reference is the same worker run as ONE process without accelerate: global batch 8 as 4 rows x 2
accumulation there and 2 rows x 2 accumulation x 2 processes under FSDP. Rows carry prompt masks of
different lengths, so the two ranks count different numbers of tokens per micro-batch: only the global
token count as the normaliser gives the one-process update. Compared: the logged loss of every step and
the final (gathered, unsharded) parameters.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
import lm_helpers as H  # noqa: E402

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
STEPS, K = 3, 8

WORKER = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_hf_fsdp import enable_cpu_fsdp, examples, full_state
enable_cpu_fsdp()
from divergent.hf import DistillationConfig, DistillationTrainer

out, mode, batch, accum, root, url = sys.argv[1:7]
settings = dict(output_dir=out + ".run", per_device_train_batch_size=int(batch),
                gradient_accumulation_steps=int(accum), max_steps={steps}, learning_rate=0.5, optim="sgd",
                lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, save_strategy="no", use_cpu=True,
                report_to=[], seed=0, disable_tqdm=True, divergence="forward_kl", hard_weight=0.3, chunk_size=7,
                teacher_top_k={k})
teacher, rows = root + "/teacher", examples()
if mode == "cached":
    settings["teacher_cache"], teacher, rows = root + "/cache", None, None
elif mode == "served":
    teacher = url
trainer = DistillationTrainer(model=root + "/student", teacher_model=teacher, args=DistillationConfig(**settings),
                              train_dataset=rows)
trainer.train()
state = full_state(trainer)
if trainer.accelerator.is_main_process:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    torch.save({{"state": {{k: v.detach().clone() for k, v in state.items()}}, "losses": losses,
                 "wrapped": type(trainer.model_wrapped).__name__, "fsdp": trainer.is_fsdp_enabled,
                 "processes": trainer.accelerator.num_processes}}, out)
"""


def examples(n: int = 24) -> list[dict]:
    """Rows of different lengths whose first 0-4 tokens are a prompt (labels -100): ranks count unequal tokens."""
    tok = H.tokenizer()
    rows = []
    for i in range(n):
        ids = tok(H.CORPUS[i % 6] + f" {i}")["input_ids"][: 5 + (i * 7) % 13]
        prompt = i % 5
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def full_state(trainer) -> dict:
    """The trained student's full parameters, gathered from the FSDP shards (accelerate's get_state_dict offloads
    to the CPU, which crashes on CPU ranks); every rank must call it."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType

    if isinstance(trainer.model_wrapped, FSDP):
        with FSDP.state_dict_type(trainer.model_wrapped, StateDictType.FULL_STATE_DICT):
            return trainer.model_wrapped.state_dict()
    return trainer.model.state_dict()


def enable_cpu_fsdp() -> None:
    """Let accelerate's FSDP path run on CPU processes (gloo), as it runs on GPUs.

    accelerate 1.16 turns ``--use_fsdp`` into ``DistributedType.FSDP`` only for accelerator processes
    (``AcceleratorState.__init__``: the FSDP branch is under MULTI_GPU/MULTI_NPU/...); CPU processes stay
    MULTI_CPU and get DDP. torch's FSDP itself runs on CPU with gloo (tests/test_lm_distributed.py), so
    after accelerate has built its state we make the one change it refuses on CPU: keep the FSDP plugin it
    was given and mark the run FSDP. Everything after that — the wrapping, the Trainer's FSDP branches,
    the gathered state dict — is accelerate's and transformers' own code, unchanged. (Its device is
    ``cpu:<local rank>`` on CPU processes; FSDP wants ``device_id`` to be the parameters' ``cpu``.)
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or getattr(AcceleratorState, "_cpu_fsdp", 0):
        return
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            self.device = torch.device("cpu")  # not "cpu:<rank>": FSDP checks device_id against the parameters'
            PartialState._shared_state.update(distributed_type=DistributedType.FSDP, device=self.device)

    AcceleratorState.__init__, AcceleratorState._cpu_fsdp = init, 1


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The saved teacher/student pair and the teacher's top-k cache of ``examples()``."""
    from divergent.data.teacher_cache import write_teacher_cache
    from divergent.models.hf import load_causal_lm, tokenizer_fingerprint

    folder = tmp_path_factory.mktemp("hf_fsdp")
    teacher_dir, _, tok = H.save_pair(folder)
    write_teacher_cache(load_causal_lm(teacher_dir, what="teacher"), {"train": examples()}, folder / "cache", k=K,
                        vocab_size=len(tok), tokenizer_fingerprint=tokenizer_fingerprint(tok), logprob_dtype="float32")
    return folder


# The launch documented in docs/llm.md: FSDP (version 1) shards every decoder layer and the root (embeddings,
# norm, output layer); the full state dict is gathered at the end.
FSDP_FLAGS = ("--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
              "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
              "LlamaDecoderLayer", "--fsdp_use_orig_params", "true", "--fsdp_state_dict_type", "FULL_STATE_DICT",
              "--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false")


def _run(tmp_path: Path, root: Path, mode: str, nproc: int, url: str = "-", *, worker: str = WORKER,
         flags: tuple[str, ...] = FSDP_FLAGS) -> dict:
    """One plain process (4 rows x 2 accumulation) or ``accelerate launch`` FSDP on 2 CPU processes (2 x 2 x 2).

    ``worker``/``flags``: another worker script (formatted with ``tests``, ``steps``, ``k``) and launch mode
    (tests/test_teachers_accelerate.py: DDP)."""
    from test_accelerate_launch import _accelerate_launch

    script = tmp_path / "hf_fsdp_worker.py"
    script.write_text(worker.format(tests=str(TESTS), steps=STEPS, k=K))
    out = tmp_path / f"{mode}_{nproc}.pt"
    batch, accum = (4, 2) if nproc == 1 else (2, 2)
    args = [str(out), mode, str(batch), str(accum), str(root), url]
    if nproc == 1:
        env = {"PYTHONPATH": str(SRC), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
               "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-5000:]
    else:
        _accelerate_launch(tmp_path, script, *args, flags=flags)
    return torch.load(out)


def _assert_equal(single: dict, double: dict) -> None:
    assert single["processes"] == 1 and double["processes"] == 2
    assert double["fsdp"] and double["wrapped"] == "FullyShardedDataParallel", double["wrapped"]
    assert not single["fsdp"] and single["wrapped"] == "LlamaForCausalLM"
    assert len(single["losses"]) == len(double["losses"]) == STEPS
    assert double["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert single["state"].keys() == double["state"].keys()
    for name in single["state"]:
        torch.testing.assert_close(double["state"][name], single["state"][name], rtol=1e-5, atol=1e-6, msg=name)


def _trained(single: dict, root: Path) -> None:
    from divergent.models.hf import load_causal_lm

    initial = load_causal_lm(root / "student", what="student").state_dict()
    assert not torch.allclose(initial["lm_head.weight"], single["state"]["lm_head.weight"])


def test_fsdp_with_a_local_teacher_equals_one_process(tmp_path, root):
    """The teacher whole on each rank (not wrapped), the student sharded: ~11 s on 2 quiet cores, ~20 s busy."""
    single = _run(tmp_path, root, "local", 1)
    _assert_equal(single, _run(tmp_path, root, "local", 2))
    _trained(single, root)


def test_fsdp_with_a_cached_teacher_equals_one_process(tmp_path, root):
    """The cache's rows and top-k split across the ranks by the Trainer's sampler (~11 s on 2 quiet cores)."""
    single = _run(tmp_path, root, "cached", 1)
    _assert_equal(single, _run(tmp_path, root, "cached", 2))
    _trained(single, root)


@pytest.mark.slow  # two launches, each rank asking the test's server for every batch: ~12 s quiet, ~24 s on 2 busy cores
def test_fsdp_with_a_served_teacher_equals_one_process(tmp_path, root):
    from divergent.models.hf import load_causal_lm, load_tokenizer
    from served_server import Server, ServedModel

    served = ServedModel(load_causal_lm(root / "teacher", what="teacher"), load_tokenizer(root / "teacher", "teacher"))
    with Server(served) as url:
        single = _run(tmp_path, root, "served", 1, url)
        double = _run(tmp_path, root, "served", 2, url)
    _assert_equal(single, double)
    _trained(single, root)
    assert served.sequences >= 2 * STEPS * 8  # both runs asked the server for every row they trained on
