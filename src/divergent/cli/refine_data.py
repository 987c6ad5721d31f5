"""``divergent refine-data``: MiniPLM difference sampling (the run is in :mod:`divergent.experiments.refine`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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
)


def register(app: typer.Typer) -> None:
    @app.command("refine-data")
    def refine_data(
        config_file: ConfigOption = None,
        teacher: Optional[Path] = typer.Option(None, help="Local Hugging Face (or TinyGPT) teacher folder (default: distill-lm's byte-level teacher, cached)."),
        reference: Optional[Path] = typer.Option(None, help="Local folder of the small reference model, trained on a held-out slice of the corpus; its own tokenizer, or the teacher's (default: a tiny GPT trained once on held-out stdlib source, cached)."),
        data: Optional[Path] = typer.Option(None, help="The corpus: .jsonl/.json/.csv/.parquet/.txt or a save_to_disk folder (default: an embedded corpus of hard, easy and noise rows)."),
        keep: Optional[float] = typer.Option(None, help="Fraction of the units kept, in (0, 1]: those with the largest scores (default 0.5)."),
        packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help="Score chunks of --max-length teacher tokens of the concatenated rows (MiniPLM's unit) instead of rows."),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per unit; longer rows are cut and counted (default 1024, or the models' positions if fewer)."),
        text_column: Optional[str] = typer.Option(None, "--text-column", help="Column scored (default: 'text', else 'prompt' + 'completion')."),
        domain_column: Optional[str] = typer.Option(None, "--domain-column", help="Column counted per part in the report (default: 'domain' when present)."),
        batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Padded tokens per forward pass; units are batched by length (default 16384)."),
        rows_per_shard: Optional[int] = typer.Option(None, "--rows-per-shard", help="Units per shard file, the unit of --resume and of torchrun's split (default 1024)."),
        seed: Optional[int] = typer.Option(None, help="Seed of the default models and the embedded corpus (default 0)."),
        threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's)."),
        device: Optional[str] = typer.Option(None, help="cpu, cuda or auto (default auto; under torchrun each rank its LOCAL_RANK GPU)."),
        out_dir: OutDirOption = None,
        set_: SetOption = [],
        resume: ResumeOption = None,
        debug: DebugOption = False,
    ) -> None:
        """Keep the part of a corpus a teacher knows better than a small reference (MiniPLM).

        Scores every row (or packed chunk) by mean log p_teacher - mean log p_reference, keeps
        the top --keep fraction (ties by position) and writes them in corpus order in the input's
        format (data.<ext>), with scores.parquet, a histogram scores.png, report.md and a table.
        Teacher and reference may have different tokenizers. Sharded: --resume RUN_DIR continues
        after a kill; under torchrun each rank scores its share. With no options: an embedded
        corpus and cached tiny models, a few minutes on two CPU cores.
        """

        def body() -> None:
            from divergent.experiments.refine import RefineDataConfig, resume_refine_data, run_refine_data

            def text(path):
                return str(path) if path is not None else None

            config = settings(
                RefineDataConfig, config_file=config_file, sets=set_, resume=resume,
                options={"teacher": text(teacher), "reference": text(reference), "data": text(data), "keep": keep,
                         "packing": packing, "max_length": max_length, "text_column": text_column,
                         "domain_column": domain_column, "batch_tokens": batch_tokens,
                         "rows_per_shard": rows_per_shard, "seed": seed, "num_threads": threads, "device": device,
                         "output_dir": text(out_dir)},
            )
            if resume is not None:
                resume_refine_data(resume)
                return
            run_refine_data(config, command=command_line("refine-data"))

        run_command(body, debug=debug)
