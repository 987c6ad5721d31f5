"""``divergent rl``: GRPO with a chosen regulariser, on the embedded arithmetic task or on your model, prompts and reward.

Two sources of a task:

- **embedded** (no ``model``): generated arithmetic (``"12+7="`` → ``"19"``), a TinyGPT
  policy warm-started by a short supervised phase (cached under
  ``divergent.io.cache_dir()/rl``), exact-match reward, 200 held-out test problems;
- **yours**: ``model`` (a local Hugging Face causal-LM folder with its tokenizer),
  ``prompts`` (rows ``{"prompt": ..., ...}``, see :mod:`divergent.data.prompts`) and
  ``reward`` (``exact``, ``math``, ``regex:PATTERN`` or ``module:function``, see
  :mod:`divergent.rl.rewards`); held-out prompts from ``test_prompts`` or a
  ``test_fraction`` of ``prompts`` split by ``split_seed``.

A single run evaluates the initial policy on the held-out prompts (pass@k from
``eval_samples`` samples each), trains with :class:`divergent.train.rl.GRPOTrainer` under
the shared run layer (checkpoints, Ctrl-C, resume), evaluates again, and writes
``results.json``/``results.csv``/``history.csv``/``report.md``/``pass_at_k.png`` and the
policy (``save_pretrained``, with its tokenizer) to ``RUN_DIR/model`` at every checkpoint
and at the end. ``compare`` runs none / reverse KL / DPH forward KL / DPH JS over
``seeds`` from the same initial policies and writes one table, a paired comparison with
``none`` and a pass@k-vs-k plot.

Python API::

    from divergent.experiments.rl import RLConfig, run_rl
    run_rl(RLConfig(model="my-model", prompts="train.jsonl", reward="math", steps=200))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from divergent.config import config_to_dict, load_run_config
from divergent.experiments import report, verdict
from divergent.io import read_json, write_json
from divergent.rl import get_regulariser
from divergent.train.rl import GRPOConfig, GRPOTrainer, evaluate_policy, supervised_warm_start

__all__ = [
    "RLConfig",
    "COMPARE_METHODS",
    "REPORT_KS",
    "run_rl",
    "resume_rl",
    "run_single",
    "run_comparison",
    "initial_evaluation",
    "warm_started_policy",
    "aggregate",
    "plot_pass_at_k",
    "RLSetup",
    "build_setup",
]

# name -> GRPOConfig overrides. Coefficients follow the DPH-RL ranges (FKL eta 0.01-0.05, JS 0.05-0.2).
COMPARE_METHODS: dict[str, dict[str, Any]] = {
    "none": {"regulariser": "none"},
    "reverse_kl": {"regulariser": "reverse_kl", "kl_estimator": "k3", "kl_beta": 0.05},
    "dph_forward_kl": {"regulariser": "dph", "dph_divergence": "forward_kl", "dph_eta": 0.05},
    "dph_js": {"regulariser": "dph", "dph_divergence": "js", "dph_eta": 0.1},
}

REPORT_KS = (1, 4, 16)
_EMBEDDED_NEW_TOKENS = 6
_PROMPTS_NEW_TOKENS = 64
_GRPO_FIELDS = tuple(f.name for f in dataclasses.fields(GRPOConfig))


@dataclass
class RLConfig(GRPOConfig):
    """Settings of ``divergent rl`` (every key can be set in YAML or with ``--set``): the GRPO
    settings of :class:`divergent.train.rl.GRPOConfig` (documented there: ``steps``, ``lr``,
    ``regulariser`` and its parameters, ``advantage_std``, ``dual_clip``, ``log_ratio_clamp``,
    ``kl_log_ratio_clamp``, ``kl_value_clamp``, ``regulariser_params``, ``filter_low``/``filter_high``,
    ``top_p``, ...), and

    max_new_tokens: response length cap; 0 = 6 on the embedded task, 64 on your prompts.
    model: local Hugging Face causal-LM folder (with its tokenizer) to train; "" = the embedded
        arithmetic task with a warm-started TinyGPT.
    prompts: the training prompts (.jsonl/.json/.csv/.parquet or a save_to_disk folder) of rows
        {"prompt": ..., ...}; every other field reaches the reward function.
    test_prompts: held-out prompts in the same format; "" = a test_fraction of prompts.
    test_fraction: share of prompts held out for pass@k when there is no test_prompts.
    split_seed: seed of that split (fixed, so that every seed and method sees the same prompts).
    max_test_prompts: held-out prompts evaluated (the first ones).
    reward: exact | math | regex:PATTERN | module:function (see docs/rl.md); needed with prompts.
    reward_timeout: seconds a call of a module:function reward may take (it runs in a worker
        process); a call cut off scores 0 and is counted. 0 = run it in this process, no limit.
    teacher: teacher folder for a regulariser that needs one (kdrl): a Hugging Face causal LM with
        the policy's tokenizer (or a TinyGPT folder on the embedded task; "" there = a longer warm start),
        or a served teacher http://HOST:PORT/v1 (vLLM/SGLang; kdrl's k1/k2/k3 estimators read the
        log-probs of the sampled tokens from it).
    teacher_tokenizer, teacher_model, teacher_api: a served teacher's local tokenizer copy (default:
        the model's), model name ("" = the one listed) and protocol (auto, vllm, sglang).
    chat_template: render prompts with the tokenizer's chat template when it has one.
    max_prompt_length: prompts longer than this many tokens keep their last ones (counted).
    compare: run none / reverse_kl / dph forward KL / dph JS over seeds and compare them.
    seeds: seeds of compare.
    warm_steps: supervised warm-start steps of the embedded TinyGPT (cached).
    eval_samples: samples per held-out prompt for pass@k (k = 1..eval_samples).
    max_operand, operations, n_test: the embedded arithmetic task (operands 0..max_operand,
        operators from "+-*", held-out problems).
    device: torch device (cpu, cuda, cuda:N).
    num_threads: torch CPU threads (1: the tiny default policy runs fastest on one).
    output_dir: folder in which the run folder is created.
    """

    max_new_tokens: int = 0
    model: str = ""
    prompts: str = ""
    test_prompts: str = ""
    test_fraction: float = 0.1
    split_seed: int = 0
    max_test_prompts: int = 200
    reward: str = ""
    reward_timeout: float = 60.0
    teacher: str = ""
    teacher_tokenizer: str = ""
    teacher_model: str = ""
    teacher_api: str = "auto"
    chat_template: bool = True
    max_prompt_length: int = 512
    compare: bool = False
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    warm_steps: int = 400
    eval_samples: int = 16
    max_operand: int = 99
    operations: str = "+"
    n_test: int = 200
    device: str = "cpu"
    num_threads: int = 1
    output_dir: str = "runs"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 1 (or 0 = automatic), got {self.max_new_tokens}")
        self.grpo_config()  # checks every GRPO setting
        if self.model and not self.prompts:
            raise ValueError("model is given without prompts: give --prompts FILE (rows {\"prompt\": ..., ...})")
        if self.prompts and not self.model:
            raise ValueError("prompts are given without a model: give --model PATH (a local Hugging Face folder)")
        if self.prompts and not self.reward:
            raise ValueError("prompts need a reward: give --reward exact, math, regex:PATTERN or module:function")
        if self.reward and not self.prompts:
            raise ValueError("reward applies to your prompts (--prompts); the embedded task has its own exact-match reward")
        if self.test_prompts and not self.prompts:
            raise ValueError("test_prompts is given without prompts")
        if not self.test_prompts and not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not self.reward_timeout >= 0:
            raise ValueError(f"reward_timeout must be >= 0 seconds (0 = no limit), got {self.reward_timeout}")
        for name in ("warm_steps", "eval_samples", "max_operand", "n_test", "max_prompt_length", "max_test_prompts",
                     "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.compare and not self.seeds:
            raise ValueError("seeds is empty: compare needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"a seed is listed twice in seeds: {self.seeds}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available; use cpu")

    def grpo_config(self, **overrides: Any) -> GRPOConfig:
        """The trainer's settings (``max_new_tokens`` resolved), with ``overrides`` applied."""
        values = {name: getattr(self, name) for name in _GRPO_FIELDS}
        values["max_new_tokens"] = self.max_new_tokens or (_PROMPTS_NEW_TOKENS if self.prompts else _EMBEDDED_NEW_TOKENS)
        values.update(overrides)
        return GRPOConfig(**values)


# ----------------------------------------------------------------------------- the embedded policy


def _policy_config():
    from divergent.data.arithmetic import VOCAB_SIZE
    from divergent.models.gpt import GPTConfig

    return GPTConfig(vocab_size=VOCAB_SIZE, d_model=128, n_layers=2, n_heads=4, max_seq_len=32)


def warm_started_policy(task, *, seed: int, steps: int, batch_size: int = 64, lr: float = 1e-3,
                        device: str = "cpu", console: Console | None = None):
    """A TinyGPT trained ``steps`` supervised steps on the task's training answers, cached on disk.

    The cache key covers the model shape, the task (operand range, operations,
    split seed), the steps, batch size, learning rate and seed.
    """
    from divergent.models.gpt import TinyGPT

    config = _policy_config()
    key = json.dumps({"model": asdict(config), "max_operand": task.max_operand, "operations": task.operations,
                      "split_seed": task.seed, "n_test": len(task.test), "steps": steps, "batch_size": batch_size,
                      "lr": lr, "seed": seed, "version": 1}, sort_keys=True)
    folder = report.cache_dir() / "rl" / f"warmstart-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (folder / "model.safetensors").is_file():
        return TinyGPT.from_pretrained(folder).to(device)
    torch.manual_seed(seed)
    model = TinyGPT(config).to(device)
    with report.progress(console=console, transient=True) as bar:
        task_id = bar.add_task(f"warm start (seed {seed})", total=steps)
        supervised_warm_start(model, task, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                              on_step=lambda step, loss: bar.advance(task_id))
    # Write to a temporary folder and rename, so a half-written cache entry is never read.
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    model.save_pretrained(tmp)
    (tmp / "key.json").write_text(key)
    if folder.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)
    return model


# ----------------------------------------------------------------------------- what a run trains on


@dataclass
class RLSetup:
    """The task, how to get the initial policy and teacher for a seed, and what the report says about them."""

    task: Any
    policy: Callable[[int], torch.nn.Module]
    teacher: Callable[[int], torch.nn.Module] | None
    test: list[Any]
    tokenizer: Any | None
    description: str
    scorer: Any | None = None

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()


def _needs_teacher(config: RLConfig, methods: dict[str, dict[str, Any]] | None = None) -> bool:
    names = [config.regulariser] if not config.compare else [m.get("regulariser", config.regulariser)
                                                              for m in (methods or COMPARE_METHODS).values()]
    return any("teacher" in get_regulariser(name).needs for name in names)


def build_setup(config: RLConfig, console: Console) -> RLSetup:
    """Check and load what ``config`` names (model, tokenizer, prompts, reward, teacher); errors name the file."""
    if not config.model:
        return _embedded_setup(config, console)
    from divergent.data.prompts import PromptTask, read_prompt_rows, split_prompt_rows
    from divergent.models.hf import check_same_tokenizer, is_hf_model, load_causal_lm, load_tokenizer
    from divergent.models.served import ServedTeacher, is_served
    from divergent.rl.rewards import RewardScorer, resolve_reward

    device = torch.device(config.device)
    model = load_causal_lm(config.model, what="--model")
    if not is_hf_model(model):
        raise ValueError(f"--model {config.model} is a TinyGPT folder; --model takes a Hugging Face causal LM with "
                         f"its tokenizer (the embedded task runs without --model)")
    tokenizer = load_tokenizer(config.model, "--model")
    if tokenizer is None:
        raise ValueError(f"--model {config.model} has no tokenizer (tokenizer.json / tokenizer_config.json); save it "
                         f"beside the model (tokenizer.save_pretrained({config.model!r}))")
    spec = resolve_reward(config.reward)
    rows = read_prompt_rows(config.prompts, "--prompts")
    if config.test_prompts:
        train_rows, test_rows = rows, read_prompt_rows(config.test_prompts, "--test-prompts")
    else:
        train_rows, test_rows = split_prompt_rows(rows, config.test_fraction, config.split_seed,
                                                  f"--prompts {config.prompts}")
    if spec.needs_answer:
        for what, path, part in (("--prompts", config.prompts, rows),
                                 ("--test-prompts", config.test_prompts, test_rows if config.test_prompts else [])):
            for number, row in enumerate(part, start=1):
                if row.get("answer") is None:
                    raise ValueError(f"{what} {path} row {number} has no 'answer', which --reward {spec.spec} compares "
                                     f"with; add an \"answer\" field to every row, or use regex:PATTERN or "
                                     f"module:function")
    scorer = RewardScorer(spec, timeout=config.reward_timeout)
    task = PromptTask(train_rows, test_rows, tokenizer, scorer, chat_template=config.chat_template,
                      max_prompt_length=config.max_prompt_length, source=f"--prompts {config.prompts}")
    teacher_model = None
    if _needs_teacher(config):
        if not config.teacher:
            raise ValueError(f"regulariser {config.regulariser!r} needs a teacher: give --teacher PATH (a Hugging Face "
                             f"causal LM with the policy's tokenizer)")
        if is_served(config.teacher):
            teacher_model = ServedTeacher(config.teacher, config.teacher_tokenizer or tokenizer,
                                          model=config.teacher_model or None, api=config.teacher_api)
            teacher_tokenizer = teacher_model.tokenizer
        else:
            teacher_model = load_causal_lm(config.teacher, what="--teacher")
            teacher_tokenizer = load_tokenizer(config.teacher, "--teacher")
        if teacher_tokenizer is None:
            raise ValueError(f"--teacher {config.teacher} has no tokenizer; save the teacher's tokenizer beside it so "
                             f"that it can be checked against the policy's")
        try:
            check_same_tokenizer(tokenizer, teacher_tokenizer)
        except ValueError as exc:
            raise ValueError(f"--teacher {config.teacher} and --model {config.model}: {exc}") from None
        if not is_served(config.teacher):
            teacher_model = teacher_model.to(device).eval()
    model = model.to(device)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def policy(seed: int) -> torch.nn.Module:
        model.load_state_dict(initial)  # every seed and method starts from the same weights
        return model

    held_out = task.test[: config.max_test_prompts]
    description = (f"model {config.model}; prompts {config.prompts}: {len(task.train)} training, {len(held_out)} "
                   f"held-out ({'from ' + config.test_prompts if config.test_prompts else f'a {config.test_fraction:g} split, seed {config.split_seed}'}); "
                   f"reward {spec.spec}; chat template {'on' if task.use_template else 'off'}"
                   + (f"; {task.truncated_prompts} prompts cut to {config.max_prompt_length} tokens"
                      if task.truncated_prompts else ""))
    return RLSetup(task=task, policy=policy, teacher=(lambda seed: teacher_model) if teacher_model is not None else None,
                   test=held_out, tokenizer=tokenizer, description=description, scorer=scorer)


def _embedded_setup(config: RLConfig, console: Console) -> RLSetup:
    from divergent.data.arithmetic import ArithmeticTask

    if config.teacher.startswith(("http://", "https://")):
        raise ValueError("a served teacher (--teacher http://...) needs --model: a Hugging Face policy whose tokenizer "
                         "the server's model shares (the embedded task's TinyGPT is byte-level)")
    task = ArithmeticTask(max_operand=config.max_operand, operations=config.operations, n_test=config.n_test, seed=0)

    def policy(seed: int):
        return warm_started_policy(task, seed=seed, steps=config.warm_steps, device=config.device, console=console)

    def teacher(seed: int):
        if config.teacher:
            from divergent.models.hf import load_causal_lm

            model = load_causal_lm(config.teacher, what="--teacher")
            return model.to(config.device)
        return warm_started_policy(task, seed=seed + 1000, steps=4 * config.warm_steps, device=config.device,
                                   console=console)

    description = (f"generated arithmetic `a{task.operations}b=` with operands 0..{task.max_operand}, exact-match "
                   f"reward, {len(task.train)} training / {len(task.test)} held-out problems; TinyGPT (2 layers, "
                   f"d=128) warm-started by {config.warm_steps} supervised steps")
    return RLSetup(task=task, policy=policy, teacher=teacher if _needs_teacher(config) else None, test=task.test,
                   tokenizer=None, description=description)


# ----------------------------------------------------------------------------- one run


_COUNTS = ("reward_errors", "reward_timeouts", "reward_skipped")


def _summarise(evaluation: dict[str, Any]) -> dict[str, Any]:
    row = {f"pass@{k}": evaluation["pass_at_k"][k] for k in REPORT_KS if k in evaluation["pass_at_k"]}
    row.update({"distinct_correct": evaluation["distinct_correct"], "mean_length": evaluation["mean_length"]})
    row.update({key: evaluation.get(key, 0) for key in _COUNTS})
    return row


def _reward_curve(history: list[dict[str, Any]], chunks: int = 5) -> list[dict[str, Any]]:
    """Mean training reward over ``chunks`` equal spans of steps."""
    rewards = [(r["step"], r["mean_reward"]) for r in history if r["mean_reward"] == r["mean_reward"]]
    if not rewards:
        return []
    size = max(1, len(rewards) // chunks)
    rows = []
    for start in range(0, len(rewards), size):
        span = rewards[start : start + size]
        rows.append({"steps": f"{span[0][0]}-{span[-1][0]}", "mean_reward": sum(r for _, r in span) / len(span)})
    return rows


def _read_result(path: Path) -> dict[str, Any]:
    result = read_json(path, "run result")
    result["pass_at_k"] = {int(k): v for k, v in result["pass_at_k"].items()}  # JSON keys are strings
    return result


def _evaluate(policy, setup: RLSetup, config: GRPOConfig, eval_samples: int) -> dict[str, Any]:
    return evaluate_policy(policy, setup.task, setup.test, n_samples=eval_samples,
                           max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                           seed=10_000 + config.seed)


def initial_evaluation(setup: RLSetup, config: GRPOConfig, *, eval_samples: int, path: Path | None = None) -> dict[str, Any]:
    """Held-out metrics of the initial policy of ``config.seed`` (the 'base' row); kept in ``path`` once computed."""
    if path is not None and path.is_file():
        return _read_result(path)
    evaluation = _evaluate(setup.policy(config.seed), setup, config, eval_samples)
    result = {"method": "base (initial policy)", "seed": config.seed, **_summarise(evaluation),
              "pass_at_k": evaluation["pass_at_k"]}
    if path is not None:
        write_json(result, path)
    return result


def run_single(setup: RLSetup, config: GRPOConfig, run_dir: Path, *, eval_samples: int, resume: bool = False,
               console: Console | None = None, label: str | None = None) -> dict[str, Any]:
    """GRPO from the seed's initial policy, then the held-out evaluation; writes ``results.json``,
    ``history.csv``, ``checkpoints/`` and ``model/`` (save_pretrained at each checkpoint and at the end)
    in ``run_dir``. A finished run (``results.json`` present) is read back, not retrained."""
    from divergent.models.hf import save_pretrained

    console = console or report.output_console()
    label = label or config.regulariser
    done = run_dir / "results.json"
    if done.is_file():
        return _read_result(done)
    run_dir.mkdir(parents=True, exist_ok=True)
    policy = setup.policy(config.seed)
    teacher = setup.teacher(config.seed) if "teacher" in get_regulariser(config.regulariser).needs else None
    trainer = GRPOTrainer(policy, setup.task, config, teacher=teacher, run_dir=run_dir)

    def export(step: int, path: Path) -> None:
        save_pretrained(policy, run_dir / "model", tokenizer=setup.tokenizer)

    started = time.perf_counter()
    with report.progress(console=console, transient=True) as bar:
        bar_task = bar.add_task(f"GRPO {label} seed {config.seed}", total=config.steps)

        def on_step(record: dict[str, Any]) -> None:
            bar.update(bar_task, completed=record["step"],
                       description=f"GRPO {label} seed {config.seed} reward {record['mean_reward']:.2f}")

        trainer.train(resume=resume, on_step=on_step, on_save=export)
    train_seconds = time.perf_counter() - started
    evaluation = _evaluate(policy, setup, config, eval_samples)
    curve = _reward_curve(trainer.history)
    result = {"method": label, "seed": config.seed, **_summarise(evaluation),
              "pass_at_k": evaluation["pass_at_k"], "train_seconds": train_seconds,
              "final_train_reward": curve[-1]["mean_reward"] if curve else float("nan"),
              "reward_curve": curve,
              "rehearsal_size": None if trainer.rehearsal is None else len(trainer.rehearsal["indices"])}
    for key in _COUNTS:
        result[f"train_{key}"] = sum(int(r.get(key, 0)) for r in trainer.history)
    report.write_csv(trainer.history, run_dir / "history.csv")
    write_json(result, run_dir / "results.json")
    return result


# ----------------------------------------------------------------------------- reports


def plot_pass_at_k(curves: dict[str, list[dict[int, float]]], path: Path, title: str) -> Path:
    """pass@k against k (log scale), mean over seeds with a band of +-1 std, one line per method.

    With a ``"none"`` entry and several seeds, a second panel shows each method's
    paired difference to ``"none"`` (same seeds), which removes the seed-to-seed
    spread of the initial policy that dominates the first panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def as_array(per_seed):
        ks = sorted(per_seed[0])
        return ks, np.array([[curve[k] for k in ks] for curve in per_seed])

    colours = {name: f"C{i}" for i, name in enumerate(curves)}  # same colour per method in both panels
    paired = "none" in curves and len(curves["none"]) > 1
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(11 if paired else 6, 4), squeeze=False)
    ax = axes[0, 0]
    for name, per_seed in curves.items():
        ks, values = as_array(per_seed)
        mean, std = values.mean(0), values.std(0)
        ax.plot(ks, mean, marker="o", markersize=3, label=name, color=colours[name])
        ax.fill_between(ks, mean - std, mean + std, alpha=0.12, color=colours[name])
    ax.set_ylabel("pass@k on held-out problems")
    ax.set_title(title)
    if paired:
        ax_diff = axes[0, 1]
        _, baseline = as_array(curves["none"])
        for name, per_seed in curves.items():
            ks, values = as_array(per_seed)
            if name == "none" or values.shape != baseline.shape:
                continue
            diff = values - baseline
            ax_diff.errorbar(ks, diff.mean(0), yerr=diff.std(0, ddof=1), marker="o", markersize=3, capsize=2,
                             label=name, color=colours[name])
        ax_diff.axhline(0.0, color="gray", linewidth=0.8)
        ax_diff.set_ylabel("pass@k minus no regulariser (paired)")
        ax_diff.set_title("difference to 'none', mean ± std over seeds")
    for axis in axes.flat:
        axis.set_xscale("log", base=2)
        axis.set_xlabel("k (samples)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def aggregate(results: list[dict[str, Any]], *, n_test: int) -> list[dict[str, Any]]:
    """One row per method: mean and std over seeds of the reported metrics, plus paired differences vs 'none'.

    A difference is marked ``*`` by the rule every comparison uses (:func:`divergent.experiments.verdict.paired_difference`): its mean
    exceeds both its spread across seeds and one held-out prompt (1/``n_test`` of pass@k).
    """
    metrics = [f"pass@{k}" for k in REPORT_KS] + ["distinct_correct", "mean_length"]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in results:
        by_method.setdefault(row["method"], []).append(row)
    baseline = {r["seed"]: r for r in by_method.get("none", [])}
    rows = []
    for method, runs in by_method.items():
        row: dict[str, Any] = {"method": method, "seeds": len(runs)}
        for metric in metrics:
            if metric not in runs[0]:
                continue
            mean, std = verdict.mean_std([r[metric] for r in runs])
            row[metric] = f"{mean:.3f} ± {std:.3f}" if metric.startswith("pass") else f"{mean:.1f} ± {std:.1f}"
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
        if baseline and method != "none" and not method.startswith("base"):
            for metric in ("pass@1", "pass@16"):
                if metric in runs[0]:
                    diff = verdict.paired_difference({r["seed"]: r[metric] for r in runs},
                                                     {s: r[metric] for s, r in baseline.items()}, resolution=1 / n_test)
                    row[f"{metric} vs none"] = verdict.format_difference(diff, 3, star=True)
        rows.append(row)
    return rows


def _flat(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("pass_at_k", "reward_curve")} for r in rows]


def run_comparison(setup: RLSetup, base_config: RLConfig, run_dir: Path, *, seeds: list[int] | None = None,
                   methods: dict[str, dict[str, Any]] | None = None, resume: bool = False,
                   console: Console | None = None) -> dict[str, Any]:
    """Every method in ``methods`` x every seed from the same initial policies; writes the report files."""
    console = console or report.output_console()
    methods = methods or COMPARE_METHODS
    seeds = list(base_config.seeds if seeds is None else seeds)
    eval_samples = base_config.eval_samples
    started = time.perf_counter()
    results = []
    for seed in seeds:
        seed_config = base_config.grpo_config(seed=seed)
        results.append(initial_evaluation(setup, seed_config, eval_samples=eval_samples,
                                          path=run_dir / f"base-seed{seed}.json"))
        for name, overrides in methods.items():
            config = base_config.grpo_config(seed=seed, **overrides)
            result = run_single(setup, config, run_dir / f"{name}-seed{seed}", eval_samples=eval_samples,
                                resume=resume, console=console, label=name)
            console.print(f"  {name:>15} seed {seed}: pass@1 {result['pass@1']:.3f}  "
                          f"pass@{eval_samples} {result['pass_at_k'][eval_samples]:.3f}  "
                          f"({result['train_seconds']:.0f} s)")
            results.append(result)
    seconds = time.perf_counter() - started
    table = aggregate(results, n_test=len(setup.test))
    columns = ["method", "seeds"] + [f"pass@{k}" for k in REPORT_KS if k <= eval_samples] + \
        ["distinct_correct", "mean_length", "pass@1 vs none", "pass@16 vs none"]
    grpo = base_config.grpo_config()
    report.print_table(table, columns, title=f"GRPO regularisers ({len(seeds)} seeds, {grpo.steps} steps, pass@k "
                       f"from {eval_samples} samples)", console=console)
    report.write_csv(_flat(results), run_dir / "results.csv")
    report.write_csv(table, run_dir / "summary.csv")
    write_json({"config": config_to_dict(base_config), "seeds": seeds, "methods": methods, "seconds": seconds,
                "setup": setup.description, "results": results}, run_dir / "results.json")
    curves: dict[str, list[dict[int, float]]] = {}
    for r in results:
        curves.setdefault(r["method"], []).append(r["pass_at_k"])
    plot_pass_at_k(curves, run_dir / "pass_at_k.png", f"pass@k vs k, mean ± std over {len(seeds)} seeds")
    errors = {key: sum(int(r.get(f"train_{key}", 0)) + int(r.get(key, 0)) for r in results) for key in _COUNTS}
    (run_dir / "report.md").write_text(_comparison_markdown(table, columns, grpo, seeds, eval_samples, setup,
                                                            methods, errors, seconds))
    console.print(f"[bold]compared {len(methods)} regularisers x {len(seeds)} seeds in {seconds / 60:.1f} min[/]; "
                  f"results in {run_dir}")
    return {"results": results, "summary": table, "seconds": seconds, "run_dir": run_dir}


def _errors_line(errors: dict[str, int]) -> str:
    return (f"Reward calls: {errors['reward_errors']} responses scored 0 because the reward raised or returned "
            f"something invalid, {errors['reward_timeouts']} because a call hit reward_timeout, "
            f"{errors['reward_skipped']} with no reward (None) — training and evaluation together.")


def _comparison_markdown(table, columns, config: GRPOConfig, seeds, eval_samples, setup: RLSetup, methods,
                         errors: dict[str, int], seconds) -> str:
    return "\n".join([
        "# GRPO regularisers",
        "",
        f"Setup: {setup.description}. {config.steps} GRPO steps ({config.prompts_per_step} prompts x "
        f"{config.group_size} samples, lr {config.lr}, up to {config.max_new_tokens} new tokens). "
        f"Seeds: {', '.join(map(str, seeds))}. pass@k is the unbiased estimator from {eval_samples} samples "
        "per held-out prompt (correct = reward > 0); `distinct_correct` counts distinct correct responses summed "
        "over prompts. `vs none` is the paired mean difference to no regulariser over the same seeds ± the std of the "
        f"per-seed differences; `*` marks a difference larger than both that std and one held-out prompt "
        f"(1/{len(setup.test)}).",
        "",
        report.markdown_table(table, columns),
        "",
        "Methods: " + "; ".join(f"`{name}` = {overrides}" for name, overrides in methods.items()),
        "",
        _errors_line(errors),
        "",
        "![pass@k vs k](pass_at_k.png)",
        "",
        f"Wall time: {seconds / 60:.1f} min.",
        "",
    ])


# ----------------------------------------------------------------------------- the command


def run_rl(config: RLConfig, *, run_dir: str | Path | None = None, console: Console | None = None,
           command: str | None = None) -> dict[str, Any]:
    """Run ``divergent rl`` (or continue the run in ``run_dir``); returns the results."""
    console = console or report.output_console()

    def body(setup: RLSetup, folder: Path) -> dict[str, Any]:
        console.print(setup.description)
        if config.compare:
            return run_comparison(setup, config, folder, resume=run_dir is not None, console=console)
        return _run_one(setup, config, folder, resume=run_dir is not None, console=console, command=command)

    return report.run_with_setup("rl", config, run_dir, console, build_setup, body)


def resume_rl(run_dir: str | Path, *, console: Console | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` with its own ``config.yaml`` (steps included); finished parts are read back."""
    run_dir = Path(run_dir)
    config = load_run_config(RLConfig, run_dir)
    return run_rl(config, run_dir=run_dir, console=console,
                  command=f"divergent rl --resume {shlex.quote(str(run_dir))}")


def _run_one(setup: RLSetup, config: RLConfig, run_dir: Path, *, resume: bool, console: Console,
             command: str | None) -> dict[str, Any]:
    grpo = config.grpo_config()
    base = initial_evaluation(setup, grpo, eval_samples=config.eval_samples, path=run_dir / "base.json")
    result = run_single(setup, grpo, run_dir, eval_samples=config.eval_samples, resume=resume, console=console)
    report.print_table(result["reward_curve"], ["steps", "mean_reward"], title="training reward", console=console)
    columns = ["method"] + [f"pass@{k}" for k in REPORT_KS if k <= config.eval_samples] + \
        ["distinct_correct", "mean_length", "reward_errors", "reward_timeouts"]
    report.print_table([base, result], columns, title=f"held-out ({len(setup.test)} prompts, "
                       f"{config.eval_samples} samples each)", console=console)
    plot_pass_at_k({base["method"]: [base["pass_at_k"]], result["method"]: [result["pass_at_k"]]},
                   run_dir / "pass_at_k.png", "pass@k vs k")
    report.write_csv(_flat([base, result]), run_dir / "results.csv")
    errors = {key: int(result.get(f"train_{key}", 0)) + int(result.get(key, 0)) + int(base.get(key, 0))
              for key in _COUNTS}
    if any(errors.values()):
        console.print(f"[yellow]{_errors_line(errors)}[/]")
    model_line = f"The trained policy: `{run_dir / 'model'}` (save_pretrained" + \
        (", with its tokenizer)." if setup.tokenizer is not None else ").")
    (run_dir / "report.md").write_text("\n".join([
        f"# GRPO, regulariser `{grpo.regulariser}`", "",
        f"Setup: {setup.description}. {grpo.steps} steps ({grpo.prompts_per_step} prompts x {grpo.group_size} "
        f"samples, lr {grpo.lr}, up to {grpo.max_new_tokens} new tokens).", "",
        report.markdown_table([base, result], columns), "",
        "pass@k: unbiased estimator from the samples per held-out prompt (correct = reward > 0).", "",
        _errors_line(errors), "",
        "Training reward:", "", report.markdown_table(result["reward_curve"], ["steps", "mean_reward"]), "",
        "![pass@k vs k](pass_at_k.png)", "",
        model_line, "",
        "## Reproduce", "", "```", command or f"divergent rl --config {run_dir / 'config.yaml'}", "```", "",
    ]))
    console.print(f"results in {run_dir}")
    return {"base": base, "result": result, "run_dir": run_dir}
