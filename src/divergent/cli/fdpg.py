"""``divergent fdpg`` (the runs are in :mod:`divergent.experiments.fdpg`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from divergent.cli._common import (
    ConfigOption,
    DebugOption,
    OutDirOption,
    ResumeOption,
    SetOption,
    command_line,
    run_command,
    settings,
    split_list,
)


def register(app: typer.Typer) -> None:
    from divergent.rl.fdpg import FDPG_DIVERGENCES

    @app.command("fdpg")
    def fdpg(
        config_file: ConfigOption = None,
        model: Optional[Path] = typer.Option(None, help="Local Hugging Face causal-LM folder (with its tokenizer); default: the embedded arithmetic TinyGPT."),
        prompts: Optional[Path] = typer.Option(None, help="Prompts to condition on (.jsonl/.json/.csv/.parquet rows {\"prompt\": ...}); one Z per prompt."),
        constraint: Optional[str] = typer.Option(None, help="Pointwise constraint b(x) in {0,1}: regex:PATTERN or module:function; P = a·b (default on the embedded task: regex:7)."),
        feature: Optional[str] = typer.Option(None, help="Feature φ(x) (module:function or regex:PATTERN) of a distributional constraint; P = a·exp(λφ) with E_p[φ] = --moment."),
        moment: Optional[float] = typer.Option(None, help="Target mean of --feature."),
        reward: Optional[str] = typer.Option(None, help="Reward r(x) (module:function or regex:PATTERN); P = a·exp(r/β)."),
        beta: Optional[float] = typer.Option(None, help="β of a --reward target (> 0, default 0.1)."),
        divergence: Optional[str] = typer.Option(None, help=f"f-divergence D_f(π‖p): one of {', '.join(FDPG_DIVERGENCES)} (default js)."),
        compare: Optional[bool] = typer.Option(None, "--compare", help="Run every divergence of --divergences over --seeds and compare them."),
        divergences: Optional[str] = typer.Option(None, help="Divergences of --compare, comma-separated (default forward_kl,reverse_kl,js,tvd)."),
        seeds: Optional[str] = typer.Option(None, help="Seeds of --compare, comma-separated (default 0,1,2)."),
        steps: Optional[int] = typer.Option(None, help="Gradient steps (default 80)."),
        seed: Optional[int] = typer.Option(None, help="Seed of a single run (default 0)."),
        lr: Optional[float] = typer.Option(None, help="AdamW learning rate (default 1e-4)."),
        offline: Optional[bool] = typer.Option(None, "--offline", help="Sample from a frozen proposal, replaced by π when KL(p‖π) < KL(p‖q) (DPG)."),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Response length cap (default 6)."),
        reward_timeout: Optional[float] = typer.Option(None, "--reward-timeout", help="Seconds a module:function target call may take (default 60; 0 = no limit)."),
        device: Optional[str] = typer.Option(None, help="torch device (default cpu)."),
        threads: Optional[int] = typer.Option(None, help="torch CPU threads (default 1)."),
        out_dir: OutDirOption = None,
        set_: SetOption = [],
        resume: ResumeOption = None,
        debug: DebugOption = False,
    ) -> None:
        """f-DPG: fit the model to a target distribution p ∝ P with any f-divergence (Go et al., ICML 2023).

        Prints and writes (RUN_DIR) alignment, KL(p‖π), TV, JS (importance-sampled with the running
        Z), KL(π‖a), distinct-1/2/3 and self-BLEU per divergence and seed: results.csv/json,
        summary.csv, curves.png, report.md, and each trained policy (save_pretrained, RUN_DIR/<row>/model).
        With no arguments: the embedded default (arithmetic TinyGPT, constraint regex:7) over
        forward KL, reverse KL, JS and TV and 3 seeds. Every FDPGRunConfig field is a --set key.
        """

        def body() -> None:
            from divergent.experiments.fdpg import FDPGRunConfig, resume_fdpg, run_fdpg

            def text(path):
                return str(path) if path is not None else None

            nothing_given = all(v is None for v in (model, prompts, constraint, feature, reward, divergence, compare,
                                                     divergences, seeds, steps, seed, offline, config_file)) and not set_
            options: dict[str, Any] = {
                "model": text(model), "prompts": text(prompts), "constraint": constraint, "feature": feature,
                "moment": moment, "reward": reward, "beta": beta, "divergence": divergence,
                "compare": True if nothing_given and resume is None else compare,
                "divergences": split_list(divergences), "seeds": split_list(seeds), "steps": steps, "seed": seed,
                "lr": lr, "offline": offline, "max_new_tokens": max_new_tokens, "reward_timeout": reward_timeout,
                "device": device, "num_threads": threads, "output_dir": text(out_dir),
            }
            config = settings(FDPGRunConfig, config_file=config_file, options=options, sets=set_, resume=resume)
            if resume is not None:
                resume_fdpg(resume)
                return
            run_fdpg(config, command=command_line("fdpg"))

        run_command(body, debug=debug)
