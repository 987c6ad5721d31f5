"""``divergent rl`` (the runs are in :mod:`divergent.experiments.rl`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from divergent.cli.distill_lm import ServedApiOption, ServedModelOption, ServedTokenizerOption
from divergent.cli._common import (
    ConfigOption,
    DebugOption,
    OutDirOption,
    ResumeOption,
    SetOption,
    command_line,
    run_command,
    settings,
)


def _regulariser_param(regulariser: str, option: str, matches) -> str:
    """The config key of ``regulariser``'s parameter that ``option`` sets, read from the registry."""
    from divergent.rl import get_regulariser

    spec = get_regulariser(regulariser)
    names = [p.name for p in spec.params if matches(p)]
    if not names:
        raise ValueError(f"{option} does not apply to regulariser {regulariser!r} (its parameters: "
                         f"{', '.join(p.name for p in spec.params) or 'none'}); set them with --set KEY=VALUE")
    return names[0]


def register(app: typer.Typer) -> None:
    from divergent.rl import available_regularisers

    @app.command("rl")
    def rl(
        config_file: ConfigOption = None,
        model: Optional[Path] = typer.Option(None, help="Local Hugging Face causal-LM folder (with its tokenizer) to train; default: the embedded arithmetic task on a TinyGPT."),
        prompts: Optional[Path] = typer.Option(None, help="Training prompts: .jsonl/.json/.csv/.parquet rows {\"prompt\": ..., ...}; other fields (e.g. answer) reach the reward."),
        test_prompts: Optional[Path] = typer.Option(None, "--test-prompts", help="Held-out prompts for pass@k (default: a --set test_fraction=0.1 split of --prompts)."),
        reward: Optional[str] = typer.Option(None, help="exact | math | regex:PATTERN | module:function (called as TRL calls reward functions)."),
        reward_timeout: Optional[float] = typer.Option(None, "--reward-timeout", help="Seconds a module:function reward call may take before it is cut off and counted (default 60; 0 = no limit, in this process)."),
        teacher: Optional[str] = typer.Option(None, help="Teacher for kdrl: a Hugging Face causal LM folder with the policy's tokenizer, or a served teacher http://HOST:PORT/v1 (embedded task default: a longer warm start)."),
        teacher_tokenizer: Optional[Path] = ServedTokenizerOption,
        teacher_model: Optional[str] = ServedModelOption,
        teacher_api: Optional[str] = ServedApiOption,
        regulariser: Optional[str] = typer.Option(None, help=f"One of {', '.join(available_regularisers())} (default none)."),
        divergence: Optional[str] = typer.Option(None, help="The regulariser's divergence, e.g. the DPH generator forward_kl, js or alpha."),
        estimator: Optional[str] = typer.Option(None, help="The regulariser's estimator: k1/k2/k3 (reverse_kl), or k1/k2/k3/full (kdrl)."),
        coefficient: Optional[float] = typer.Option(None, help="The regulariser's coefficient (kl_beta, dph_eta, kdrl_beta0)."),
        steps: Optional[int] = typer.Option(None, help="GRPO steps (default 150)."),
        seed: Optional[int] = typer.Option(None, help="Seed of the warm start and the GRPO run (default 0)."),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Response length cap (default 6 on the embedded task, 64 on --prompts)."),
        temperature: Optional[float] = typer.Option(None, help="Sampling temperature (default 1)."),
        top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling (default 1 = off)."),
        lr: Optional[float] = typer.Option(None, help="AdamW learning rate (default 1e-4)."),
        compare: Optional[bool] = typer.Option(None, "--compare", help="Run none / reverse KL / DPH forward KL / DPH JS over --seeds."),
        seeds: Optional[str] = typer.Option(None, help="Seeds for --compare, comma-separated (default 0,1,2)."),
        warm_steps: Optional[int] = typer.Option(None, "--warm-steps", help="Supervised warm-start steps of the embedded TinyGPT (default 400; cached)."),
        eval_samples: Optional[int] = typer.Option(None, "--eval-samples", help="Samples per held-out prompt for pass@k (default 16)."),
        max_operand: Optional[int] = typer.Option(None, "--max-operand", help="Embedded task: operands range over 0..max_operand (default 99)."),
        operations: Optional[str] = typer.Option(None, help="Embedded task: operators drawn from '+-*' (default +)."),
        n_test: Optional[int] = typer.Option(None, "--n-test", help="Embedded task: held-out problems (default 200)."),
        device: Optional[str] = typer.Option(None, help="torch device (default cpu)."),
        threads: Optional[int] = typer.Option(
            None, help="torch CPU threads (default 1: the tiny default policy ran many times faster on one thread than "
            "on two on a busy 2-core machine, benchmarks/results/rl_threads.csv)."),
        out_dir: OutDirOption = None,
        set_: SetOption = [],
        resume: ResumeOption = None,
        debug: DebugOption = False,
    ) -> None:
        """GRPO with a chosen regulariser on your model, prompts and reward (or the embedded arithmetic task).

        Prints the training reward and held-out pass@1/4/16 before and after training; writes
        results.csv/json, history.csv, report.md, pass_at_k.png and the trained policy
        (save_pretrained, RUN_DIR/model). --compare runs none / reverse KL / DPH forward KL /
        DPH JS over several seeds. Every GRPOConfig field is a --set key (e.g. --set
        advantage_std=population, --set dual_clip=3, --set filter_low=0.25).
        """

        def body() -> None:
            from divergent.experiments.rl import RLConfig, resume_rl, run_rl

            def text(path):
                return str(path) if path is not None else None

            options: dict[str, Any] = {
                "model": text(model), "prompts": text(prompts), "test_prompts": text(test_prompts), "reward": reward,
                "reward_timeout": reward_timeout, "teacher": text(teacher), "teacher_tokenizer": text(teacher_tokenizer),
                "teacher_model": teacher_model, "teacher_api": teacher_api, "regulariser": regulariser,
                "steps": steps, "seed": seed, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "lr": lr, "compare": compare,
                "seeds": None if seeds is None else [s.strip() for s in seeds.split(",") if s.strip()],
                "warm_steps": warm_steps, "eval_samples": eval_samples, "max_operand": max_operand,
                "operations": operations, "n_test": n_test, "device": device, "num_threads": threads,
                "output_dir": text(out_dir),
            }
            chosen = regulariser or "none"
            if compare and any(v is not None for v in (regulariser, divergence, estimator, coefficient)):
                raise ValueError("--compare runs its own regularisers; --regulariser/--divergence/--estimator/"
                                 "--coefficient apply to a single run")
            if divergence is not None:
                options[_regulariser_param(chosen, "--divergence", lambda p: p.name.endswith("_divergence"))] = divergence
            if estimator is not None:
                options[_regulariser_param(chosen, "--estimator", lambda p: p.name.endswith("_estimator"))] = estimator
            if coefficient is not None:
                options[_regulariser_param(chosen, "--coefficient", lambda p: p.kind is float and "coefficient" in p.doc)] = coefficient
            config = settings(RLConfig, config_file=config_file, options=options, sets=set_, resume=resume)
            if resume is not None:
                resume_rl(resume)
                return
            run_rl(config, command=command_line("rl"))

        run_command(body, debug=debug)
