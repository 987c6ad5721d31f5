"""``divergent distill-lm`` and ``divergent cache-teacher`` (the runs are in :mod:`divergent.experiments.lm`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from divergent.data.domains import MIXINGS
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


ServedTokenizerOption = typer.Option(
    None, "--teacher-tokenizer", help="Served teacher: a local copy of its tokenizer (distill-lm: default the student's). With --teacher-cache and --cross-tokenizer: the cache's tokenizer (default: the copy saved in it).")
ServedModelOption = typer.Option(None, "--teacher-model", help="Served teacher: the model's name (default: the one the server lists).")
ServedApiOption = typer.Option(None, "--teacher-api", help="Served teacher: auto (default), vllm or sglang.")


def register(app: typer.Typer) -> None:
    @app.command("distill-lm")
    def distill_lm(
        config_file: ConfigOption = None,
        teacher: Optional[list[str]] = typer.Option(None, help="Local Hugging Face (or TinyGPT) teacher folder, or a served teacher http://HOST:PORT/v1 (vLLM/SGLang; default: a byte-level GPT trained once and cached). Repeat it for several local teachers: the student matches their weighted mixture; with --domain-column, DOMAIN=PATH gives each domain its own teacher."),
        teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights", help="Several teachers: comma-separated positive weights, one per --teacher, normalised to sum to 1 (default: equal)."),
        teacher_tokenizer: Optional[Path] = ServedTokenizerOption,
        teacher_model: Optional[str] = ServedModelOption,
        teacher_api: Optional[str] = ServedApiOption,
        student: Optional[Path] = typer.Option(None, help="Local folder of the student's initial weights and tokenizer (save_pretrained)."),
        data: Optional[Path] = typer.Option(None, help="Training data: .jsonl/.json/.csv/.parquet/.txt or a save_to_disk folder; rows of 'messages', 'prompt'+'completion' or 'text' (default: Python stdlib source)."),
        eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Evaluation data in the same formats (default: a held-out fraction of --data)."),
        eval_fraction: Optional[float] = typer.Option(None, "--eval-fraction", help="Fraction of --data held out for evaluation when there is no --eval-data (default 0.05)."),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per example; longer rows are truncated and counted (default: 512 on data files, 65 on the stdlib corpus)."),
        packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help="Concatenate training rows into blocks of --max-length tokens."),
        teacher_cache: Optional[Path] = typer.Option(None, "--teacher-cache", help="Folder written by `divergent cache-teacher`: train with no teacher in memory."),
        divergences: Optional[str] = typer.Option(None, "--divergences", "-d", help="Comma-separated divergences; one distilled student each (default forward_kl; the embedded comparison: six)."),
        cross_tokenizer: Optional[str] = typer.Option(None, "--cross-tokenizer", help="uld or gold: the teacher has another tokenizer; distil with Universal Logit Distillation, or GOLD (byte-aligned; the shared vocabulary by --divergences, gold_* settings via --set) (default: one shared tokenizer required)."),
        steps: Optional[int] = typer.Option(None, help="Optimisation steps per student (default 150)."),
        teacher_steps: Optional[int] = typer.Option(None, "--teacher-steps", help="Steps to train the default teacher when it is not cached (default 300)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per micro-batch (default 16)."),
        grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per step (default 1)."),
        lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 3e-3; warm-up then cosine)."),
        temperature: Optional[float] = typer.Option(None, help="Distillation temperature T (default 1)."),
        hard_weight: Optional[float] = typer.Option(None, "--hard-weight", help="Weight of the cross-entropy on the data in distilled runs (default 0)."),
        soft_weight: Optional[float] = typer.Option(None, "--soft-weight", help="Weight of T^2 x divergence in distilled runs (default 1)."),
        on_policy: Optional[str] = typer.Option(None, "--on-policy", help="GKD's lambda: fraction of steps on student-generated continuations (default 0); with --seeds a comma-separated list (0,0.5,1) gives one row per value."),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds: every row on every seed, paired differences, a verdict and report.md (docs/llm.md)."),
        baseline: Optional[str] = typer.Option(None, "--baseline", help="With --seeds: the divergence every row is compared with (default: the first)."),
        generation_prompts: Optional[int] = typer.Option(None, "--generation-prompts", help="With --seeds: held-out prompts each student generates from, for ROUGE-L and distinct-n (default 32; 0 = none)."),
        reward: Optional[str] = typer.Option(None, "--reward", help="With --seeds: a reward scored on the generations (exact, math, regex:PATTERN or module:function, as in `divergent rl`)."),
        seq_kd: Optional[float] = typer.Option(None, "--seq-kd", help="Fraction of steps on teacher-generated continuations (default 0)."),
        fused: Optional[bool] = typer.Option(None, "--fused/--no-fused", help="Fused, chunked output-layer loss: the [tokens, vocab] logits are never formed (default: fused)."),
        chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="Tokens per chunk of the fused loss (default: as many as fit 2^27 logits, 2^23 on the CPU)."),
        vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Compare the first N vocabulary entries (output layers padded beyond the tokenizer)."),
        domain_column: Optional[str] = typer.Option(None, "--domain-column", help="Column of --data naming each row's domain: draw training rows by domain (--mixing)."),
        mixing: Optional[str] = typer.Option(None, "--mixing", help="How domains are drawn: " + "; ".join(f"{k}: {v}" for k, v in MIXINGS.items()) + " (default ddk)."),
        ddk_interval: Optional[int] = typer.Option(None, "--ddk-interval", help="DDK: steps K between per-domain perplexity measurements and weight updates (default 50; the paper 1000)."),
        ddk_smoothing: Optional[float] = typer.Option(None, "--ddk-smoothing", help="DDK: smoothing alpha in [0, 1] of the factor-smooth update (default 0.5; 1 = none)."),
        student_quant: Optional[str] = typer.Option(None, "--student-quant", help="int8 or int4: students train with fake-quantized linear weights (per channel, straight-through); with --student = --teacher, a quantized model distilled from its full-precision self."),
        seed: Optional[int] = typer.Option(None, help="Seed of initialisation, data order, splits and generation (default 0)."),
        threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's)."),
        device: Optional[str] = typer.Option(None, help="cpu, cuda or auto (default auto)."),
        out_dir: OutDirOption = None,
        set_: SetOption = [],
        resume: ResumeOption = None,
        debug: DebugOption = False,
    ) -> None:
        """Distil a teacher LM into a student with each divergence, on your models and data.

        Trains the student on the data alone (scratch) and distilled with each divergence,
        from the same initial weights on the same batches, and prints per model: evaluation
        loss and perplexity (bits per byte for byte-level models), KL to the teacher, top-1
        agreement, tokens/s and peak memory. Writes results.csv/json, report.md and
        curves.png, and each student with save_pretrained (runs/<row>/model, the row being
        scratch, a divergence or the cross-tokenizer mode). With --seeds 0,1,2 every row runs
        on every seed and is compared with the student alone and a baseline (paired
        differences, a verdict, report.md). With no options: that comparison
        on Python stdlib source as bytes with a cached tiny teacher (six divergences, three
        seeds; a few minutes on two CPU cores); --set seeds=[] gives one run. With
        --domain-column COL the rows are drawn by domain (--mixing ddk: DDK's weights from each
        domain's student/teacher perplexity ratio, re-measured every --ddk-interval steps), and
        a per-domain table, domains.csv and domain_weights.png are added.
        """

        def body() -> None:
            from divergent.experiments.lm import DistillLMConfig, resume_distill_lm, run_distill_lm

            def text(path):
                return str(path) if path is not None else None

            fractions = split_list(on_policy)
            config = settings(
                DistillLMConfig, config_file=config_file, sets=set_, resume=resume,
                options={
                    "teacher": teacher[0] if teacher and len(teacher) == 1 else None,
                    "teachers": teacher if teacher and len(teacher) > 1 else None,
                    "teacher_weights": split_list(teacher_weights), "teacher_tokenizer": text(teacher_tokenizer),
                    "teacher_model": teacher_model, "teacher_api": teacher_api, "student": text(student), "data": text(data), "eval_data": text(eval_data),
                    "eval_fraction": eval_fraction, "max_length": max_length, "packing": packing,
                    "teacher_cache": text(teacher_cache), "divergences": split_list(divergences), "steps": steps,
                    "cross_tokenizer": cross_tokenizer,
                    "teacher_steps": teacher_steps, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
                    "temperature": temperature, "hard_weight": hard_weight, "soft_weight": soft_weight,
                    "on_policy_fraction": fractions[0] if fractions and len(fractions) == 1 else None,
                    "on_policy_fractions": fractions if fractions and len(fractions) > 1 else None,
                    "seeds": split_list(seeds), "baseline": baseline, "generation_prompts": generation_prompts,
                    "reward": reward, "seq_kd_fraction": seq_kd, "fused": fused,
                    "chunk_size": chunk_size, "vocab_size": vocab_size, "seed": seed, "num_threads": threads,
                    "domain_column": domain_column, "mixing": mixing, "ddk_interval": ddk_interval,
                    "ddk_smoothing": ddk_smoothing, "student_quant": student_quant,
                    "device": device, "output_dir": text(out_dir),
                },
            )
            if resume is not None:
                resume_distill_lm(resume)
                return
            run_distill_lm(config, command=command_line("distill-lm"))

        run_command(body, debug=debug)

    @app.command("cache-teacher")
    def cache_teacher(
        config_file: ConfigOption = None,
        teacher: Optional[str] = typer.Option(None, help="Local Hugging Face (or TinyGPT) teacher folder, or a served teacher http://HOST:PORT/v1 (vLLM/SGLang; default: distill-lm's default teacher)."),
        teacher_tokenizer: Optional[Path] = ServedTokenizerOption,
        teacher_model: Optional[str] = ServedModelOption,
        teacher_api: Optional[str] = ServedApiOption,
        data: Optional[Path] = typer.Option(None, help="Data as distill-lm takes it (default: Python stdlib source)."),
        eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Evaluation data (default: a held-out fraction of --data)."),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per example; longer rows are truncated and counted."),
        k: Optional[int] = typer.Option(None, "--k", help="Top-k log-probs kept per token (default 32)."),
        logprob_dtype: Optional[str] = typer.Option(None, "--logprob-dtype", help="float16 (default), bfloat16 or float32."),
        logprob_bits: Optional[int] = typer.Option(None, "--logprob-bits", help="Compress: bit-packed ids and log-probs quantised to N bits (2-16) with a KL bound (default 0: off)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per teacher forward pass (default 8)."),
        max_sequences: Optional[int] = typer.Option(None, "--max-sequences", help="Cap on the training examples cached (default: all)."),
        sequences_per_shard: Optional[int] = typer.Option(None, "--sequences-per-shard", help="Examples per shard file (default 256)."),
        teacher_steps: Optional[int] = typer.Option(None, "--teacher-steps", help="Default teacher: its training steps when not cached."),
        device: Optional[str] = typer.Option(None, help="cpu, cuda or auto."),
        threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's)."),
        out_dir: Optional[Path] = typer.Option(None, "--out-dir", "--out", "-o", help="The cache folder to write (default: teacher-cache)."),
        set_: SetOption = [],
        resume: ResumeOption = None,
        debug: DebugOption = False,
    ) -> None:
        """Run a teacher once over your data and cache its top-k log-probs.

        Writes safetensors shards (checksummed) and index.json to the cache folder and prints
        bytes per token. Train from it with no teacher in memory:
        divergent distill-lm --teacher-cache DIR --student PATH. --resume DIR continues an
        interrupted cache.
        """

        def body() -> None:
            from divergent.experiments.lm import CacheTeacherConfig, resume_cache_teacher, run_cache_teacher

            def text(path):
                return str(path) if path is not None else None

            config = settings(
                CacheTeacherConfig, config_file=config_file, sets=set_, resume=resume,
                options={"teacher": text(teacher), "teacher_tokenizer": text(teacher_tokenizer),
                    "teacher_model": teacher_model, "teacher_api": teacher_api, "data": text(data), "eval_data": text(eval_data),
                         "max_length": max_length, "k": k, "logprob_dtype": logprob_dtype, "logprob_bits": logprob_bits,
                         "batch_size": batch_size,
                         "max_sequences": max_sequences, "sequences_per_shard": sequences_per_shard,
                         "teacher_steps": teacher_steps, "device": device, "num_threads": threads,
                         "output_dir": text(out_dir)},
            )
            if resume is not None:
                resume_cache_teacher(resume)
                return
            run_cache_teacher(config)

        run_command(body, debug=debug)
