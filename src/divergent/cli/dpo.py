"""``divergent dpo`` (the run is in :mod:`divergent.experiments.dpo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from divergent.cli._common import ConfigOption, DebugOption, OutDirOption, ResumeOption, SetOption, command_line, run_command, settings


def register(app: typer.Typer) -> None:
    @app.command("dpo")
    def dpo(
        config_file: ConfigOption = None,
        model: Optional[Path] = typer.Option(None, help="Local folder of the model to train (save_pretrained, with its tokenizer); the reference is a frozen copy of it."),
        data: Optional[Path] = typer.Option(None, help="Preference data: .jsonl/.json/.csv/.parquet or a save_to_disk folder; rows of 'prompt', 'chosen', 'rejected' (strings or conversations), or 'chosen'/'rejected' conversations sharing their first messages."),
        eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Held-out pairs in the same formats (default: the data's validation/test split, else a held-out fraction)."),
        eval_fraction: Optional[float] = typer.Option(None, "--eval-fraction", help="Fraction of --data held out for evaluation when there is no --eval-data (default 0.1)."),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens of prompt + response; longer pairs are cut and counted (default 512)."),
        divergence: Optional[str] = typer.Option(None, "--divergence", "-d", help="reverse_kl (standard DPO, default), forward_kl, js or alpha."),
        alpha: Optional[float] = typer.Option(None, help="Order of the alpha divergence, 0 < alpha < 1 (default 0.5; TRL's f_alpha_divergence_coef = 1 - alpha)."),
        beta: Optional[float] = typer.Option(None, help="f-DPO temperature beta (default 0.1); implicit reward = beta * psi(pi / pi_ref)."),
        steps: Optional[int] = typer.Option(None, help="Optimisation steps (default 100)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Preference pairs per step (default 8)."),
        lr: Optional[float] = typer.Option(None, help="AdamW learning rate (default 1e-6, as TRL's DPO)."),
        seed: Optional[int] = typer.Option(None, help="Seed of the split and the order of the pairs (default 0)."),
        threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's)."),
        device: Optional[str] = typer.Option(None, help="cpu, cuda or auto (default auto)."),
        out_dir: OutDirOption = None,
        set_: SetOption = [],
        resume: ResumeOption = None,
        debug: DebugOption = False,
    ) -> None:
        """f-DPO on your model and preference pairs, with the divergence as the choice.

        Trains the model against a frozen copy of itself on (prompt, chosen, rejected) pairs and
        prints, on held-out pairs before and after training: preference accuracy (chosen implicit
        reward above the rejected one's), the reward margin, the chosen and rejected rewards and
        the loss. Writes results.csv/json, report.md and the trained model (RUN_DIR/model,
        save_pretrained with the tokenizer, also at each checkpoint).
        """

        def body() -> None:
            from divergent.experiments.dpo import DPOConfig, resume_dpo, run_dpo

            def text(path):
                return str(path) if path is not None else None

            config = settings(
                DPOConfig, config_file=config_file, sets=set_, resume=resume,
                options={"model": text(model), "data": text(data), "eval_data": text(eval_data),
                         "eval_fraction": eval_fraction, "max_length": max_length, "divergence": divergence,
                         "alpha": alpha, "beta": beta, "steps": steps, "batch_size": batch_size, "lr": lr,
                         "seed": seed, "num_threads": threads, "device": device, "output_dir": text(out_dir)},
            )
            if resume is not None:
                resume_dpo(resume)
                return
            run_dpo(config, command=command_line("dpo"))

        run_command(body, debug=debug)
