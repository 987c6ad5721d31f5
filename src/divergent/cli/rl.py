"""``divergent rl``: GRPO on a generated arithmetic task with a chosen regulariser.

With no arguments: build the arithmetic task, warm-start a tiny GPT policy by a
short supervised phase (cached under ``divergent.experiments.report.cache_dir()``), run GRPO
with the chosen regulariser, then print the reward curve and test pass@1/4/16.
``--compare`` runs none / reverse KL / DPH forward KL / DPH JS over several
seeds from the same warm-started policies and writes one table, ``report.md``
and a pass@k-vs-k plot.

The functions here (:func:`warm_started_policy`, :func:`run_single`,
:func:`run_comparison`) are also what ``benchmarks/rl_divergence_passk.py`` calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from divergent.experiments import report
from divergent.config import load_config, save_config
from divergent.data.arithmetic import VOCAB_SIZE, ArithmeticTask
from divergent.models.gpt import GPTConfig, TinyGPT
from divergent.train.rl import (
    REGULARISERS,
    GRPOConfig,
    GRPOTrainer,
    NonFiniteLossError,
    evaluate_policy,
    supervised_warm_start,
)

__all__ = ["COMPARE_METHODS", "register", "run_comparison", "run_single", "warm_started_policy"]

# name -> GRPOConfig overrides. Coefficients follow the DPH-RL ranges (FKL eta 0.01-0.05, JS 0.05-0.2).
COMPARE_METHODS: dict[str, dict[str, Any]] = {
    "none": {"regulariser": "none"},
    "reverse_kl": {"regulariser": "reverse_kl", "kl_estimator": "k3", "kl_beta": 0.05},
    "dph_forward_kl": {"regulariser": "dph", "dph_divergence": "forward_kl", "dph_eta": 0.05},
    "dph_js": {"regulariser": "dph", "dph_divergence": "js", "dph_eta": 0.1},
}

REPORT_KS = (1, 4, 16)


def _policy_config() -> GPTConfig:
    return GPTConfig(vocab_size=VOCAB_SIZE, d_model=128, n_layers=2, n_heads=4, max_seq_len=32)


def warm_started_policy(task: ArithmeticTask, *, seed: int, steps: int, batch_size: int = 64, lr: float = 1e-3,
                        device: str = "cpu", console: Console | None = None) -> TinyGPT:
    """A TinyGPT trained ``steps`` supervised steps on the task's training answers, cached on disk.

    The cache key covers the model shape, the task (operand range, operations,
    split seed), the steps, batch size, learning rate and seed.
    """
    config = _policy_config()
    key = json.dumps({"model": asdict(config), "max_operand": task.max_operand, "operations": task.operations,
                      "split_seed": task.seed, "n_test": len(task.test), "steps": steps, "batch_size": batch_size,
                      "lr": lr, "seed": seed, "version": 1}, sort_keys=True)
    folder = report.cache_dir() / "rl" / f"warmstart-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (folder / "model.safetensors").is_file():
        return TinyGPT.from_pretrained(folder).to(device)
    import torch

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


def _summarise(evaluation: dict[str, Any]) -> dict[str, Any]:
    row = {f"pass@{k}": evaluation["pass_at_k"][k] for k in REPORT_KS if k in evaluation["pass_at_k"]}
    row.update({"distinct_correct": evaluation["distinct_correct"], "mean_length": evaluation["mean_length"],
                "reward_errors": evaluation["reward_errors"]})
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


def run_single(task: ArithmeticTask, config: GRPOConfig, run_dir: Path, *, warm_steps: int, eval_samples: int,
               device: str = "cpu", resume: bool = False, teacher_dir: Path | None = None,
               console: Console | None = None, label: str | None = None) -> dict[str, Any]:
    """Warm start, GRPO, test evaluation; writes ``results.json`` and ``history.csv`` in ``run_dir``."""
    console = console or Console()
    label = label or config.regulariser
    done = run_dir / "results.json"
    if resume and done.is_file():
        result = json.loads(done.read_text())
        result["pass_at_k"] = {int(k): v for k, v in result["pass_at_k"].items()}  # JSON keys are strings
        return result
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    policy = warm_started_policy(task, seed=config.seed, steps=warm_steps, device=device, console=console)
    teacher = None
    if config.regulariser == "kdrl":
        teacher = (TinyGPT.from_pretrained(teacher_dir).to(device) if teacher_dir is not None else
                   warm_started_policy(task, seed=config.seed + 1000, steps=4 * warm_steps, device=device,
                                       console=console))
    trainer = GRPOTrainer(policy, task, config, teacher=teacher, run_dir=run_dir)
    started = time.perf_counter()
    with report.progress(console=console, transient=True) as bar:
        bar_task = bar.add_task(f"GRPO {label} seed {config.seed}", total=config.steps)

        def on_step(record: dict[str, Any]) -> None:
            bar.update(bar_task, completed=record["step"],
                       description=f"GRPO {label} seed {config.seed} reward {record['mean_reward']:.2f}")

        trainer.train(resume=resume, on_step=on_step)
    train_seconds = time.perf_counter() - started
    evaluation = evaluate_policy(policy, task, task.test, n_samples=eval_samples,
                                 max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                 seed=10_000 + config.seed)
    curve = _reward_curve(trainer.history)
    result = {"method": label, "seed": config.seed, **_summarise(evaluation),
              "pass_at_k": evaluation["pass_at_k"], "train_seconds": train_seconds,
              "final_train_reward": curve[-1]["mean_reward"] if curve else float("nan"),
              "reward_curve": curve,
              "rehearsal_size": None if trainer.rehearsal is None else len(trainer.rehearsal["indices"])}
    report.write_csv(trainer.history, run_dir / "history.csv")
    report.write_json(result, run_dir / "results.json")
    return result


def initial_evaluation(task: ArithmeticTask, *, seed: int, warm_steps: int, eval_samples: int, max_new_tokens: int,
                       device: str = "cpu", console: Console | None = None) -> dict[str, Any]:
    """Test metrics of the warm-started policy before any RL (the 'base' row)."""
    policy = warm_started_policy(task, seed=seed, steps=warm_steps, device=device, console=console)
    evaluation = evaluate_policy(policy, task, task.test, n_samples=eval_samples, max_new_tokens=max_new_tokens,
                                 seed=10_000 + seed)
    return {"method": "base (warm start)", "seed": seed, **_summarise(evaluation), "pass_at_k": evaluation["pass_at_k"]}


def plot_pass_at_k(curves: dict[str, list[dict[int, float]]], path: Path, title: str) -> Path:
    """pass@k against k (log scale), mean over seeds with a band of +-1 std, one line per method.

    With a ``"none"`` entry and several seeds, a second panel shows each method's
    paired difference to ``"none"`` (same seeds), which removes the seed-to-seed
    spread of the warm start that dominates the first panel.
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


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: mean and std over seeds of the reported metrics, plus paired differences vs 'none'."""
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
            mean, std = report.mean_std([r[metric] for r in runs])
            row[metric] = f"{mean:.3f} ± {std:.3f}" if metric.startswith("pass") else f"{mean:.1f} ± {std:.1f}"
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
        if baseline and method not in ("none",) and not method.startswith("base"):
            for metric in ("pass@1", "pass@16"):
                if metric in runs[0]:
                    diff = report.paired_difference({r["seed"]: r[metric] for r in runs},
                                                    {s: r[metric] for s, r in baseline.items()})
                    row[f"{metric} vs none"] = f"{diff['mean_diff']:+.3f}" + (" *" if diff["significant"] else "")
        rows.append(row)
    return rows


def run_comparison(task: ArithmeticTask, base_config: GRPOConfig, run_dir: Path, *, seeds: list[int],
                   warm_steps: int, eval_samples: int, methods: dict[str, dict[str, Any]] | None = None,
                   device: str = "cpu", resume: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Every method in ``methods`` x every seed from the same warm-started policies; writes the report files."""
    console = console or Console()
    methods = methods or COMPARE_METHODS
    started = time.perf_counter()
    results = []
    for seed in seeds:
        results.append(initial_evaluation(task, seed=seed, warm_steps=warm_steps, eval_samples=eval_samples,
                                          max_new_tokens=base_config.max_new_tokens, device=device, console=console))
        for name, overrides in methods.items():
            config = replace(base_config, seed=seed, **overrides)
            result = run_single(task, config, run_dir / f"{name}-seed{seed}", warm_steps=warm_steps,
                                eval_samples=eval_samples, device=device, resume=resume, console=console, label=name)
            console.print(f"  {name:>15} seed {seed}: pass@1 {result['pass@1']:.3f}  "
                          f"pass@{eval_samples} {result['pass_at_k'][eval_samples]:.3f}  "
                          f"({result['train_seconds']:.0f} s)")
            results.append(result)
    seconds = time.perf_counter() - started
    table = aggregate(results)
    columns = ["method", "seeds"] + [f"pass@{k}" for k in REPORT_KS if k <= eval_samples] + \
        ["distinct_correct", "mean_length", "pass@1 vs none", "pass@16 vs none"]
    report.print_table(table, columns, title=f"GRPO regularisers on arithmetic ({len(seeds)} seeds, "
                       f"{base_config.steps} steps, pass@k from {eval_samples} samples)", console=console)
    flat = [{k: v for k, v in r.items() if k not in ("pass_at_k", "reward_curve")} for r in results]
    report.write_csv(flat, run_dir / "results.csv")
    report.write_csv(table, run_dir / "summary.csv")
    report.write_json({"config": asdict(base_config), "seeds": seeds, "warm_steps": warm_steps,
                       "eval_samples": eval_samples, "methods": methods, "seconds": seconds, "results": results},
                      run_dir / "results.json")
    curves: dict[str, list[dict[int, float]]] = {}
    for r in results:
        curves.setdefault(r["method"], []).append(r["pass_at_k"])
    plot_pass_at_k(curves, run_dir / "pass_at_k.png",
                   f"pass@k vs k, mean ± std over {len(seeds)} seeds")
    (run_dir / "report.md").write_text(_report_markdown(table, columns, base_config, seeds, warm_steps,
                                                        eval_samples, task, seconds))
    console.print(f"[bold]compared {len(methods)} regularisers x {len(seeds)} seeds in {seconds / 60:.1f} min[/]; "
                  f"results in {run_dir}")
    return {"results": results, "summary": table, "seconds": seconds, "run_dir": run_dir}


def _report_markdown(table, columns, config: GRPOConfig, seeds, warm_steps, eval_samples, task, seconds) -> str:
    return "\n".join([
        "# GRPO regularisers on generated arithmetic",
        "",
        f"Task: `a{task.operations}b=` with operands 0..{task.max_operand}, exact-match reward, "
        f"{len(task.train)} training / {len(task.test)} held-out test problems. Policy: TinyGPT "
        f"(2 layers, d=128) warm-started by {warm_steps} supervised steps, then {config.steps} GRPO steps "
        f"({config.prompts_per_step} prompts x {config.group_size} samples, lr {config.lr}). "
        f"Seeds: {', '.join(map(str, seeds))}. pass@k is the unbiased estimator from {eval_samples} samples "
        "per test problem; `distinct_correct` counts distinct correct responses summed over test problems "
        "(one answer is correct per problem here, so it equals the number of problems solved at least once). "
        "`vs none` is the paired mean difference to no regulariser over the same seeds; `*` marks a "
        "difference larger than its spread across seeds.",
        "",
        report.markdown_table(table, columns),
        "",
        "Methods: " + "; ".join(f"`{name}` = {overrides}" for name, overrides in COMPARE_METHODS.items()),
        "",
        f"![pass@k vs k](pass_at_k.png)",
        "",
        f"Wall time: {seconds / 60:.1f} min.",
        "",
    ])


def register(app: typer.Typer) -> None:
    @app.command("rl")
    def rl(
        regulariser: str = typer.Option("none", help=f"One of {', '.join(REGULARISERS)}."),
        divergence: Optional[str] = typer.Option(None, help="DPH generator: forward_kl, js or alpha (with --regulariser dph)."),
        estimator: Optional[str] = typer.Option(None, help="KL estimator k1/k2/k3 (reverse_kl) or k1/k2/k3/full (kdrl)."),
        coefficient: Optional[float] = typer.Option(None, help="kl_beta (reverse_kl), dph_eta (dph) or kdrl_beta0 (kdrl)."),
        steps: Optional[int] = typer.Option(None, min=1, help="GRPO steps (default 150)."),
        seed: Optional[int] = typer.Option(None, help="Seed of the warm start and the GRPO run."),
        compare: bool = typer.Option(False, "--compare", help="Run none / reverse KL / DPH forward KL / DPH JS over --seeds."),
        seeds: str = typer.Option("0,1,2", help="Seeds for --compare, comma-separated."),
        warm_steps: int = typer.Option(400, min=1, help="Supervised warm-start steps (cached)."),
        eval_samples: int = typer.Option(16, min=1, help="Samples per test problem for pass@k."),
        max_operand: int = typer.Option(99, min=1, help="Operands range over 0..max_operand."),
        operations: str = typer.Option("+", help="Operators drawn from '+-*'."),
        n_test: int = typer.Option(200, min=1, help="Held-out test problems."),
        teacher: Optional[Path] = typer.Option(None, help="TinyGPT folder used as the KDRL teacher (default: a longer warm start)."),
        config: Optional[Path] = typer.Option(None, "--config", help="YAML file of GRPOConfig fields."),
        out_dir: Path = typer.Option(Path("runs"), "--out-dir", "-o", help="Where the run folder is created."),
        resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder from its last checkpoint."),
        device: str = typer.Option("cpu", help="torch device."),
        threads: int = typer.Option(
            1, min=1, help="torch CPU threads. The policy is tiny: one thread was many times faster than two on a "
            "busy 2-core machine (benchmarks/results/rl_threads.csv)."),
    ) -> None:
        """GRPO with a chosen regulariser on generated arithmetic; prints pass@1/4/16 (``--compare`` for all)."""
        import torch

        torch.set_num_threads(threads)
        console = Console()
        overrides: dict[str, Any] = {"steps": steps, "seed": seed}
        if not compare:
            overrides["regulariser"] = regulariser
            if divergence is not None:
                overrides["dph_divergence"] = divergence
            if estimator is not None:
                overrides["kdrl_estimator" if regulariser == "kdrl" else "kl_estimator"] = estimator
            if coefficient is not None:
                key = {"reverse_kl": "kl_beta", "dph": "dph_eta", "kdrl": "kdrl_beta0"}.get(regulariser)
                if key is None:
                    raise typer.BadParameter("--coefficient needs --regulariser reverse_kl, dph or kdrl")
                overrides[key] = coefficient
        try:
            grpo_config = load_config(GRPOConfig, config, overrides)
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
            task = ArithmeticTask(max_operand=max_operand, operations=operations, n_test=n_test, seed=0)
        except (ValueError, TypeError) as exc:
            raise typer.BadParameter(str(exc)) from exc
        if resume is not None and not resume.is_dir():
            raise typer.BadParameter(f"--resume: {resume} is not a folder")
        run_dir = resume if resume is not None else report.make_run_dir(out_dir, "rl-compare" if compare else "rl")
        console.print(f"[bold]divergent rl[/] → {run_dir}")
        try:
            if compare:
                run_comparison(task, grpo_config, run_dir, seeds=seed_list, warm_steps=warm_steps,
                               eval_samples=eval_samples, device=device, resume=resume is not None, console=console)
                return
            base = initial_evaluation(task, seed=grpo_config.seed, warm_steps=warm_steps, eval_samples=eval_samples,
                                      max_new_tokens=grpo_config.max_new_tokens, device=device, console=console)
            result = run_single(task, grpo_config, run_dir, warm_steps=warm_steps, eval_samples=eval_samples,
                                device=device, resume=resume is not None, teacher_dir=teacher, console=console)
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted; checkpoint saved. Continue with: divergent rl --resume {run_dir}"
                          f"{' --compare' if compare else ''}[/]")
            raise typer.Exit(130)
        except NonFiniteLossError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1)
        report.print_table(result["reward_curve"], ["steps", "mean_reward"], title="training reward", console=console)
        columns = ["method"] + [f"pass@{k}" for k in REPORT_KS if k <= eval_samples] + ["distinct_correct", "mean_length"]
        report.print_table([base, result], columns, title=f"held-out test ({len(task.test)} problems, "
                           f"{eval_samples} samples each)", console=console)
        curves = {base["method"]: [base["pass_at_k"]], result["method"]: [result["pass_at_k"]]}
        plot_pass_at_k(curves, run_dir / "pass_at_k.png", "pass@k vs k")
        report.write_csv([{k: v for k, v in r.items() if k not in ("pass_at_k", "reward_curve")} for r in (base, result)],
                         run_dir / "results.csv")
        (run_dir / "report.md").write_text("\n".join([
            f"# GRPO, regulariser `{grpo_config.regulariser}`", "",
            report.markdown_table([base, result], columns), "",
            "Training reward:", "", report.markdown_table(result["reward_curve"], ["steps", "mean_reward"]), "",
            "![pass@k vs k](pass_at_k.png)", "",
        ]))
        console.print(f"results in {run_dir}")
