"""``divergent fdpg``: f-DPG runs and the comparison of divergences over seeds.

With no model the run is the embedded default: the warm-started arithmetic TinyGPT of
``divergent rl`` (cached), conditioned on 32 of its training prompts (per-prompt Z), and the
pointwise constraint ``regex:7`` (the answer contains a 7), which its samples rarely satisfy.
With ``--model PATH --prompts FILE`` the same run trains a Hugging Face causal LM.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from divergent.config import config_to_dict, load_run_config
from divergent.experiments import report
from divergent.experiments import verdict as verdict_module
from divergent.io import read_json, write_json
from divergent.rl.generators import check_f_divergence
from divergent.train.fdpg import FDPGConfig, FDPGTarget, FDPGTrainer
from divergent.train.run import Checkpointer

__all__ = ["FDPGRunConfig", "COMPARE_DIVERGENCES", "DEFAULT_CONSTRAINT", "run_fdpg", "resume_fdpg", "build_target"]

COMPARE_DIVERGENCES = ("forward_kl", "reverse_kl", "js", "tvd")
DEFAULT_CONSTRAINT = "regex:7"
_FDPG_FIELDS = tuple(f.name for f in dataclasses.fields(FDPGConfig))
_METRICS = ("alignment", "kl_target_policy", "tv_target_policy", "js_target_policy", "kl_policy_base",
            "distinct_1", "distinct_2", "distinct_3", "self_bleu")


@dataclass
class FDPGRunConfig(FDPGConfig):
    """Settings of ``divergent fdpg``: the trainer's (:class:`divergent.train.fdpg.FDPGConfig`) and

    model: local Hugging Face causal-LM folder (with its tokenizer); "" = the embedded default.
    prompts: prompts file (rows {"prompt": ...}) to condition on, one Z per prompt; needed with model.
    constraint / feature / reward: the target (exactly one; the embedded default: regex:7).
        regex:PATTERN or module:function, called as TRL calls reward functions.
    moment: target mean of the feature (feature targets).
    beta: temperature of a reward target, P = a exp(r / beta), > 0.
    epsilon: pointwise constraints: P = a max(b, epsilon). -1 = automatic: 1e-3 when a reverse_kl
        row runs (its pseudo-reward is -inf where b = 0), for every row alike; else 0.
    compare: run every divergence of ``divergences`` over ``seeds``.
    max_prompts: prompts used (the first ones).
    warm_steps: supervised warm-start steps of the embedded TinyGPT (cached).
    reward_timeout: seconds one call of a module:function target may take (0 = no limit).
    """

    model: str = ""
    prompts: str = ""
    constraint: str = ""
    feature: str = ""
    moment: float = math.nan
    reward: str = ""
    beta: float = 0.1
    epsilon: float = -1.0
    compare: bool = False
    divergences: list[str] = field(default_factory=lambda: list(COMPARE_DIVERGENCES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_prompts: int = 32
    warm_steps: int = 400
    reward_timeout: float = 60.0
    chat_template: bool = True
    device: str = "cpu"
    num_threads: int = 1
    output_dir: str = "runs"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.divergences:
            check_f_divergence(name, alpha=self.alpha, what="divergences entry")
        given = [k for k in ("constraint", "feature", "reward") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one target, got {' and '.join('--' + k for k in given)}")
        if self.model and not self.prompts:
            raise ValueError("model is given without prompts: give --prompts FILE (rows {\"prompt\": ...})")
        if self.prompts and not self.model:
            raise ValueError("prompts are given without a model: give --model PATH (a local Hugging Face folder)")
        if self.model and not given:
            raise ValueError("give a target: --constraint regex:PATTERN|module:function, --feature module:function "
                             "--moment M, or --reward module:function --beta B")
        if self.feature and math.isnan(self.moment):
            raise ValueError("--feature needs --moment (the target mean of the feature)")
        if self.reward and not self.beta > 0:
            raise ValueError(f"--beta must be > 0 (P = a·exp(r/β)), got {self.beta}")
        if self.epsilon != -1.0 and not 0 <= self.epsilon < 1:
            raise ValueError(f"epsilon must be in [0, 1) (or -1 = automatic), got {self.epsilon}")
        if self.compare and not self.seeds:
            raise ValueError("seeds is empty: compare needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"a seed is listed twice in seeds: {self.seeds}")
        for name in ("max_prompts", "warm_steps", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def target_spec(self) -> tuple[str, str]:
        for kind in ("constraint", "feature", "reward"):
            if getattr(self, kind):
                return kind, getattr(self, kind)
        return "constraint", DEFAULT_CONSTRAINT

    def resolved_epsilon(self) -> float:
        if self.epsilon != -1.0:
            return self.epsilon
        rows = self.divergences if self.compare else [self.divergence]
        return 1e-3 if "reverse_kl" in rows and self.target_spec[0] == "constraint" else 0.0

    def trainer_config(self, **overrides: Any) -> FDPGConfig:
        values = {name: getattr(self, name) for name in _FDPG_FIELDS}
        if not self.model and self.bleu_tokenize == "13a":
            values["bleu_tokenize"] = "char"  # arithmetic answers are a few digits, no spaces
        values.update(overrides)
        return FDPGConfig(**values)


@dataclass
class FDPGSetup:
    task: Any
    prompts: list[Any]
    policy: Any  # seed -> model
    tokenizer: Any | None
    scorer: Any
    score: Any  # (problems, texts) -> (values, counts)
    description: str

    def close(self) -> None:
        self.scorer.close()


def build_setup(config: FDPGRunConfig, console: Console) -> FDPGSetup:
    """Load the model, prompts and target function that ``config`` names; errors name the option."""
    from divergent.rl.rewards import RewardScorer, resolve_reward

    kind, spec = config.target_spec
    scorer = RewardScorer(resolve_reward(spec, f"--{kind}"), timeout=config.reward_timeout)
    if not config.model:
        from divergent.data.arithmetic import ArithmeticTask
        from divergent.experiments.rl import warm_started_policy

        task = ArithmeticTask(max_operand=99, operations="+", n_test=200, seed=0)
        prompts = task.train[: config.max_prompts]

        def score(problems, texts):
            return scorer([p.prompt for p in problems], list(texts), {})

        def policy(seed: int):
            return warm_started_policy(task, seed=seed, steps=config.warm_steps, device=config.device, console=console)

        description = (f"embedded default: the arithmetic TinyGPT of `divergent rl` (2 layers, d=128, warm-started "
                       f"by {config.warm_steps} supervised steps) conditioned on {len(prompts)} `a+b=` prompts")
        return FDPGSetup(task, prompts, policy, None, scorer, score, description)
    from divergent.data.prompts import PromptTask, read_prompt_rows
    from divergent.models.hf import is_hf_model, load_causal_lm, load_tokenizer

    model = load_causal_lm(config.model, what="--model")
    if not is_hf_model(model):
        raise ValueError(f"--model {config.model} is a TinyGPT folder; --model takes a Hugging Face causal LM")
    tokenizer = load_tokenizer(config.model, "--model")
    if tokenizer is None:
        raise ValueError(f"--model {config.model} has no tokenizer; save it beside the model")
    rows = read_prompt_rows(config.prompts, "--prompts")[: config.max_prompts]
    task = PromptTask(rows, [], tokenizer, scorer, chat_template=config.chat_template, source=f"--prompts {config.prompts}")
    model = model.to(config.device)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def policy(seed: int):
        model.load_state_dict(initial)
        return model

    return FDPGSetup(task, list(task.train), policy, tokenizer, scorer, task.score,
                     f"model {config.model}; {len(rows)} prompts from {config.prompts}")


def build_target(config: FDPGRunConfig, setup: FDPGSetup) -> FDPGTarget:
    kind, spec = config.target_spec
    return FDPGTarget(kind=kind, name=f"--{kind} {spec}", score=setup.score, epsilon=config.resolved_epsilon(),
                      beta=config.beta, moments=[config.moment] if kind == "feature" else [])


def _target_text(config: FDPGRunConfig) -> str:
    kind, spec = config.target_spec
    if kind == "constraint":
        eps = config.resolved_epsilon()
        return f"pointwise constraint `{spec}`: P = a·b" + (f" with b floored at ε = {eps:g}" if eps else "")
    if kind == "feature":
        return f"distributional constraint `{spec}` with E_p[φ] = {config.moment:g}: P = a·exp(λ·φ)"
    return f"reward `{spec}`: P = a·exp(r/{config.beta:g})"


def run_single(setup: FDPGSetup, config: FDPGRunConfig, run_dir: Path, *, divergence: str, seed: int, resume: bool,
               console: Console) -> dict[str, Any]:
    """One f-DPG run; writes history.csv, evaluations.csv, results.json, checkpoints/ and model/ in ``run_dir``.
    A finished run (results.json present) is read back."""
    from divergent.models.hf import save_pretrained

    done = run_dir / "results.json"
    if done.is_file():
        return read_json(done, "run result")
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer_config = config.trainer_config(divergence=divergence, seed=seed)
    policy = setup.policy(seed)
    trainer = FDPGTrainer(policy, setup.task, setup.prompts, build_target(config, setup), trainer_config)
    started = time.perf_counter()
    with report.progress(console=console, transient=True) as bar:
        task = bar.add_task(f"f-DPG {divergence} seed {seed}", total=trainer_config.steps)

        def on_step(record: dict[str, Any]) -> None:
            bar.update(task, completed=record["step"])

        trainer.train(checkpointer=Checkpointer(run_dir / "checkpoints"), checkpoint_every=10, resume=resume,
                      on_step=on_step)
    save_pretrained(policy, run_dir / "model", tokenizer=setup.tokenizer)
    final = trainer.evaluations[-1]
    result = {"name": divergence, "seed": seed, "status": "finished", **{k: final.get(k, math.nan) for k in _METRICS},
              "initial_alignment": trainer.evaluations[0]["alignment"], "z": trainer.history[-1].get("z", math.nan),
              "train_seconds": time.perf_counter() - started, **{f"train_{k}": v for k, v in trainer.counts.items()},
              "evaluations": trainer.evaluations}
    report.write_csv(trainer.history, run_dir / "history.csv")
    report.write_csv(trainer.evaluations, run_dir / "evaluations.csv")
    write_json(result, done)
    return result


def plot_curves(results: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Alignment, KL(p‖π), KL(π‖a) and distinct-2 over steps, mean ± std over seeds per divergence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("alignment", "alignment E_π[b]"), ("kl_target_policy", "KL(p‖π)"),
              ("kl_policy_base", "KL(π‖a)"), ("distinct_2", "distinct-2")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    names = list(dict.fromkeys(r["name"] for r in results))
    for name in names:
        runs = [r["evaluations"] for r in results if r["name"] == name]
        for ax, (key, label) in zip(axes, panels):
            steps = [e["step"] for e in runs[0] if key in e]
            values = np.array([[e[key] for e in run if key in e] for run in runs], dtype=float)
            if values.size == 0:
                continue
            mean, std = values.mean(0), values.std(0)
            ax.plot(steps, mean, label=name, marker="o", markersize=3)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
            ax.set_title(label)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _row(entry: dict[str, Any], metrics: list[verdict_module.Metric], baseline: str) -> dict[str, Any]:
    row = {"divergence": entry["name"], "seeds": entry["runs"]}
    for key in _METRICS:
        row[key] = verdict_module.mean_std_cell(entry, key)
    for metric in metrics:
        row[f"{metric.short} vs {baseline}"] = verdict_module.difference_column(entry, metric, "", baseline)
    return row


def run_comparison(setup: FDPGSetup, config: FDPGRunConfig, run_dir: Path, *, resume: bool, console: Console,
                   command: str | None) -> dict[str, Any]:
    divergences = list(config.divergences) if config.compare else [config.divergence]
    seeds = list(config.seeds) if config.compare else [config.seed]
    started = time.perf_counter()
    results = []
    for seed in seeds:
        for divergence in divergences:
            result = run_single(setup, config, run_dir / f"{divergence}-seed{seed}", divergence=divergence, seed=seed,
                                resume=resume, console=console)
            console.print(f"  {divergence:>10} seed {seed}: alignment {result['initial_alignment']:.3f} → "
                          f"{result['alignment']:.3f}  KL(p‖π) {result['kl_target_policy']:.3f}  "
                          f"distinct-2 {result['distinct_2']:.3f}  ({result['train_seconds']:.0f} s)")
            results.append(result)
    seconds = time.perf_counter() - started
    n_eval = len(setup.prompts) * config.eval_samples
    # TV(p, π) is the compared distance to the target: bounded and far less noisy than the KL(p‖π)
    # estimate, whose −log Z + (1/Z)·(...) form turns every error of a per-prompt Z into bias
    tv = verdict_module.Metric("tv_target_policy", "TV(p, π) to the target", higher_is_better=False,
                               short="TV(p, π)", unit="no fixed resolution", resolution=0.0)
    alignment = verdict_module.Metric("alignment", "alignment E_π[b]", resolution=1 / n_eval, short="alignment",
                                      unit="one evaluation sample")
    diversity = verdict_module.Metric("distinct_2", "distinct-2", resolution=0.0, short="distinct-2",
                                      unit="no fixed resolution")
    baseline = "forward_kl" if "forward_kl" in divergences else divergences[0]
    flat = [{k: v for k, v in r.items() if k != "evaluations"} for r in results]
    summary = verdict_module.summarise(flat, divergences, [tv, alignment, diversity], {"": baseline},
                                       described=list(_METRICS))
    verdict = verdict_module.verdict(summary, flat, tv, baseline=baseline, secondary=[alignment, diversity])
    table = [_row(e, [tv, alignment, diversity], baseline) for e in summary]
    columns = list(table[0])
    report.print_table(table, columns, title=f"f-DPG over {len(seeds)} seed(s), {config.steps} steps", console=console)
    console.print(verdict["text"])
    report.write_csv(flat, run_dir / "results.csv")
    report.write_csv(table, run_dir / "summary.csv")
    write_json({"config": config_to_dict(config), "setup": setup.description, "seconds": seconds,
                "verdict": verdict["text"], "results": results}, run_dir / "results.json")
    plot_curves(results, run_dir / "curves.png", f"f-DPG, {_target_text(config)} (mean ± std over {len(seeds)} seeds)")
    errors = {k: sum(int(r.get(f"train_{k}", 0)) for r in results) for k in ("reward_errors", "reward_timeouts")}
    intro = (f"Setup: {setup.description}; target: {_target_text(config)}. {config.steps} steps of "
             f"{config.prompts_per_step} prompts × {config.samples_per_prompt} samples (lr {config.lr}, "
             f"{'offline proposal' if config.offline else 'on-policy'}, baseline {'on' if config.baseline else 'off'}). "
             f"Metrics from {config.eval_samples} fresh samples per prompt of the final policy: alignment E_π[b], "
             f"KL(p‖π), TV, JS by importance sampling with the running Z (naver/disco's metrics), KL(π‖a), "
             f"distinct-n over response tokens and self-BLEU among each prompt's samples (averaged over prompts; sacrebleu {config.trainer_config().bleu_tokenize} tokens). "
             f"The verdict compares TV(p, π): the KL(p‖π) estimate, −log Z + (1/Z)·mean[(P/π)(log P − log π)], "
             f"turns every error of a per-prompt Z into bias and can come out negative. "
             f"Initial alignment (seed mean): "
             f"{sum(r['initial_alignment'] for r in results) / len(results):.3f}. Target calls: "
             f"{errors['reward_errors']} errors, {errors['reward_timeouts']} time-outs (scored 0). "
             f"Training time {sum(r['train_seconds'] for r in results) / 60:.1f} min (sum over runs).")
    note = verdict_module.table_note(len(seeds) < 2, f"one evaluation sample of alignment (1/{n_eval})",
                                     extra="Lower TV(p, π) is better. ")
    sections = [("Results", report.markdown_table(table, columns) + "\n\n" + note),
                ("Curves", "![curves](curves.png)"),
                ("Reproduce", "```\n" + (command or f"divergent fdpg --config {run_dir / 'config.yaml'}") + "\n```")]
    (run_dir / "report.md").write_text(verdict_module.report_markdown("divergent fdpg", verdict["text"], intro, sections))
    console.print(f"results in {run_dir}")
    return {"results": results, "summary": summary, "verdict": verdict, "run_dir": run_dir, "seconds": seconds}


def run_fdpg(config: FDPGRunConfig, *, run_dir: str | Path | None = None, console: Console | None = None,
             command: str | None = None) -> dict[str, Any]:
    """Run ``divergent fdpg`` (or continue the run in ``run_dir``); returns the results."""
    console = console or report.output_console()
    return report.run_with_setup(
        "fdpg", config, run_dir, console, build_setup,
        lambda setup, folder: run_comparison(setup, config, folder, resume=run_dir is not None, console=console,
                                             command=command))


def resume_fdpg(run_dir: str | Path, *, console: Console | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` with its own ``config.yaml``; finished runs are read back."""
    run_dir = Path(run_dir)
    config = load_run_config(FDPGRunConfig, run_dir)
    return run_fdpg(config, run_dir=run_dir, console=console)
