"""``divergent distill-lm`` and ``divergent cache-teacher``.

``distill-lm`` with no arguments runs the whole LM-distillation story on two
CPU cores: a byte-level corpus from the Python standard library's own source,
a small GPT teacher (trained once, then loaded from the cache directory), a
smaller student trained on the data alone ("scratch") and the same student
distilled from the teacher with each requested divergence. It prints
validation bits per byte, teacher-student KL, top-1 agreement, tokens/s and
peak memory, and writes CSV/JSON/Markdown/PNG to a run folder.

``cache-teacher`` runs a teacher once over the training sequences and stores
its top-k log-probs (see :mod:`divergent.data.teacher_cache`);
``distill-lm --teacher-cache DIR`` then distils without the teacher in memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console

from divergent.experiments import report

# Default sizes: the teacher trains in about a minute and a half and each student
# run in under a minute on two uncontended CPU cores.
TEACHER_CONFIG = dict(vocab_size=256, d_model=128, n_layers=2, n_heads=4, max_seq_len=128)
STUDENT_CONFIG = dict(vocab_size=256, d_model=64, n_layers=1, n_heads=2, max_seq_len=128)
_TEACHER_RECIPE_VERSION = 1


@dataclass
class _Data:
    train: torch.Tensor
    val: torch.Tensor
    tokens_per_byte: float
    description: str


def _load_data(tokenizer, max_train_bytes: int, max_val_bytes: int) -> _Data:
    """Stdlib corpus as bytes, or tokenized with the models' shared tokenizer."""
    from divergent.data.text import decode_bytes, load_stdlib_corpus

    corpus = load_stdlib_corpus(max_train_bytes=max_train_bytes, max_val_bytes=max_val_bytes)
    if tokenizer is None:
        return _Data(corpus.train, corpus.val, 1.0, corpus.describe())
    train_ids = torch.tensor(tokenizer(decode_bytes(corpus.train))["input_ids"], dtype=torch.long)
    val_ids = torch.tensor(tokenizer(decode_bytes(corpus.val))["input_ids"], dtype=torch.long)
    return _Data(
        train_ids, val_ids, len(val_ids) / len(corpus.val),
        f"{corpus.describe()}; {len(train_ids):,} / {len(val_ids):,} tokens",
    )


def _teacher_cache_key(config: dict) -> str:
    text = json.dumps({"version": _TEACHER_RECIPE_VERSION, **config}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_teacher(data: _Data, *, steps: int, seq_len: int, batch_size: int, lr: float, seed: int,
                    console: Console, show_progress: bool = True):
    """The default byte-level GPT teacher: loaded from the cache directory, or trained and cached."""
    from divergent.models.gpt import GPTConfig, TinyGPT
    from divergent.train.lm import LMDistillConfig, corpus_sampler, train_lm_distillation

    recipe = dict(model=TEACHER_CONFIG, steps=steps, seq_len=seq_len, batch_size=batch_size, lr=lr,
                  seed=seed, train_bytes=len(data.train))
    folder = report.cache_dir() / f"lm-teacher-{_teacher_cache_key(recipe)}"
    if (folder / "model.safetensors").is_file():
        console.print(f"teacher: loaded from cache {folder}")
        return TinyGPT.from_pretrained(folder), folder
    console.print(f"teacher: training {TEACHER_CONFIG} for {steps} steps (cached afterwards in {folder})")
    torch.manual_seed(seed)
    teacher = TinyGPT(GPTConfig(**TEACHER_CONFIG))
    config = LMDistillConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, hard_weight=1.0,
                             soft_weight=0.0, seed=seed + 1000)
    train_lm_distillation(teacher, None, corpus_sampler(data.train, seq_len, seed + 1000), config,
                          show_progress=show_progress, description="training teacher")
    # Write to a temporary sibling and rename, so a half-written teacher is never loaded.
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lm-teacher-", dir=folder.parent))
    teacher.save_pretrained(staging)
    (staging / "recipe.json").write_text(json.dumps(recipe, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return teacher, folder


def _plot_losses(histories: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, history in histories.items():
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (per token)")
    ax.set_title("LM distillation: training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def register(app: typer.Typer) -> None:
    @app.command("distill-lm")
    def distill_lm(
        divergences: str = typer.Option("forward_kl", "--divergences", "-d",
                                        help="Comma-separated divergence names; one distilled student each."),
        steps: int = typer.Option(150, min=1, help="Optimisation steps per student."),
        teacher_steps: int = typer.Option(300, min=1, help="Steps to train the default teacher (when not cached)."),
        seq_len: int = typer.Option(64, min=2, help="Tokens per training sequence."),
        batch_size: int = typer.Option(16, min=1, help="Sequences per micro-batch."),
        grad_accum: int = typer.Option(1, min=1, help="Micro-batches per step."),
        lr: float = typer.Option(3e-3, help="Peak learning rate (AdamW, warmup + cosine)."),
        temperature: float = typer.Option(1.0, help="Distillation temperature T."),
        hard_weight: float = typer.Option(0.0, help="Weight of the data cross-entropy in distilled runs."),
        soft_weight: float = typer.Option(1.0, help="Weight of T^2 x divergence in distilled runs."),
        on_policy: float = typer.Option(0.0, help="λ: fraction of steps on student-generated sequences (GKD)."),
        seq_kd: float = typer.Option(0.0, help="Fraction of steps on teacher-generated sequences (seq-KD)."),
        fused: bool = typer.Option(True, help="Fused, chunked output-layer loss (no [tokens, vocab] logits)."),
        chunk_size: Optional[int] = typer.Option(
            None, min=1, help="Tokens per chunk of the fused loss (default: as many as fit 2^27 logits)."),
        vocab_size: Optional[int] = typer.Option(
            None, help="Compare the first N vocabulary entries (when the sizes differ only by padding)."),
        teacher: Optional[Path] = typer.Option(None, help="Local Hugging Face (or TinyGPT) teacher folder."),
        student: Optional[Path] = typer.Option(None, help="Local Hugging Face (or TinyGPT) student folder."),
        teacher_cache: Optional[Path] = typer.Option(
            None, help="Top-k teacher cache from `divergent cache-teacher`: distil without the teacher."),
        max_train_bytes: int = typer.Option(1_000_000, min=1000, help="Cap on training text."),
        max_val_bytes: int = typer.Option(100_000, min=1000, help="Cap on validation text."),
        eval_windows: int = typer.Option(64, min=1, help="Validation windows of seq_len tokens."),
        seed: int = typer.Option(0, help="Seed of initialisation, data order and generation."),
        threads: int = typer.Option(0, min=0, help="torch CPU threads (0 = torch's default)."),
        device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda."),
        out_dir: Path = typer.Option(Path("runs"), "--out-dir", "-o", help="Where the run folder is created."),
    ) -> None:
        """Distil a small GPT on Python-stdlib bytes and compare divergences.

        Prints validation bits per byte of the teacher, the student trained on the data
        alone, and each distilled student, with teacher-student KL, top-1 agreement,
        tokens/s and peak memory; writes results.csv/json, results.md and losses.png.
        """
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Each rank would run the whole comparison and write its own report.
            raise typer.BadParameter(
                "distill-lm runs in one process; under torchrun/accelerate launch use the Python "
                "API (divergent.train.lm.init_distributed_from_env + train_lm_distillation, see docs/llm.md)",
                param_hint="WORLD_SIZE",
            )
        from divergent.functional import available, get_spec
        from divergent.models.gpt import GPTConfig, TinyGPT
        from divergent.models.hf import check_same_tokenizer, load_causal_lm, load_tokenizer
        from divergent.train.lm import (
            LMDistillConfig, cache_sampler, corpus_sampler, evaluate_lm, train_lm_distillation,
        )

        console = Console()
        if threads:
            torch.set_num_threads(threads)
        names = [n.strip() for n in divergences.split(",") if n.strip()]
        for name in names:
            try:
                get_spec(name)
            except ValueError as exc:
                raise typer.BadParameter(f"{exc} (valid: {', '.join(available())})", param_hint="--divergences") from None
        if (teacher is None) != (student is None):
            raise typer.BadParameter("give both --teacher and --student, or neither", param_hint="--teacher")
        started = time.perf_counter()

        tokenizer = None
        if teacher is not None:
            teacher_model, student_init = load_causal_lm(teacher), load_causal_lm(student)
            teacher_tokenizer, tokenizer = load_tokenizer(teacher), load_tokenizer(student)
            check_same_tokenizer(tokenizer, teacher_tokenizer)
            tokenizer = tokenizer or teacher_tokenizer
        data = _load_data(tokenizer, max_train_bytes, max_val_bytes)
        console.print(f"corpus: Python stdlib source, {data.description}")
        if teacher is None:
            teacher_model, teacher_folder = default_teacher(
                data, steps=teacher_steps, seq_len=seq_len, batch_size=batch_size, lr=lr, seed=seed, console=console)
            torch.manual_seed(seed)
            student_init = TinyGPT(GPTConfig(**STUDENT_CONFIG))
        cache = None
        if teacher_cache is not None:
            from divergent.data.teacher_cache import TeacherCache

            cache = TeacherCache(teacher_cache)
            cache.verify_all()
            console.print(f"teacher cache: {cache.describe()}")

        evaluate = dict(seq_len=seq_len, max_windows=eval_windows, device=device, tokens_per_byte=data.tokens_per_byte)
        common = dict(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                      seed=seed, chunk_size=chunk_size, fused=fused, vocab_size=vocab_size)
        run_dir = report.make_run_dir(out_dir, "distill-lm")
        rows, histories = [], {}

        teacher_metrics = evaluate_lm(teacher_model, None, data.val, **evaluate)
        rows.append({"model": "teacher", "divergence": "-", "val_bpb": teacher_metrics["student_bpb"],
                     "kl_t_s": 0.0, "top1_agree": 1.0, "tok_per_s": float("nan"),
                     "peak_mb": float("nan"), "params": sum(p.numel() for p in teacher_model.parameters())})

        runs = [("scratch", None)] + [("distilled", name) for name in names]
        for label, name in runs:
            model = copy.deepcopy(student_init)
            if name is None:
                config = LMDistillConfig(hard_weight=1.0, soft_weight=0.0, **common)
                sample, teacher_arg = corpus_sampler(data.train, seq_len, seed), None
            else:
                config = LMDistillConfig(
                    divergence=name, temperature=temperature, hard_weight=hard_weight, soft_weight=soft_weight,
                    on_policy_fraction=on_policy, seq_kd_fraction=seq_kd, prompt_len=max(1, seq_len // 4), **common)
                if cache is not None:
                    sample, teacher_arg = cache_sampler(cache, seed), (teacher_model if on_policy + seq_kd > 0 else None)
                else:
                    sample, teacher_arg = corpus_sampler(data.train, seq_len, seed), teacher_model
            result = train_lm_distillation(
                model, teacher_arg, sample, config, run_dir=run_dir / f"{label}-{name or 'ce'}",
                device=device, description=f"{label} {name or '(data only)'}",
            )
            metrics = evaluate_lm(result.student, teacher_model, data.val, **evaluate)
            rows.append({"model": label, "divergence": name or "-", "val_bpb": metrics["student_bpb"],
                         "kl_t_s": metrics["kl_teacher_student"],
                         "top1_agree": metrics["top1_agreement"],
                         "tok_per_s": round(result.tokens_per_second), "peak_mb": round(result.peak_memory_mb, 1),
                         "params": sum(p.numel() for p in model.parameters())})
            histories[f"{label} {name or '(data only)'}"] = result.history

        columns = ["model", "divergence", "val_bpb", "kl_t_s", "top1_agree", "tok_per_s", "peak_mb", "params"]
        title = f"LM distillation on Python stdlib source ({steps} steps per student, {device})"
        report.print_table(rows, columns, title=title, console=console)
        report.write_csv(rows, run_dir / "results.csv")
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()
                    if k in ("divergences", "steps", "teacher_steps", "seq_len", "batch_size", "grad_accum", "lr",
                             "temperature", "hard_weight", "soft_weight", "on_policy", "seq_kd", "fused",
                             "chunk_size", "teacher", "student", "teacher_cache", "seed", "device")}
        report.write_json({"settings": settings, "results": rows, "histories": histories}, run_dir / "results.json")
        (run_dir / "results.md").write_text(
            f"# {title}\n\nCorpus: {data.description}.\n\n{report.markdown_table(rows, columns)}\n\n"
            "val_bpb: validation bits per byte; kl_t_s: mean KL(teacher || student) per token; "
            "top1_agree: fraction of tokens where both predict the same next token; tok_per_s: counted "
            "training tokens per second; peak_mb: "
            "peak resident memory of the process during the run (CPU) or peak allocated (CUDA).\n"
        )
        _plot_losses(histories, run_dir / "losses.png")
        console.print(f"[bold]done in {time.perf_counter() - started:.0f} s[/]; results in {run_dir}")

    @app.command("cache-teacher")
    def cache_teacher(
        out: Path = typer.Option(..., "--out", "-o", help="Folder for the shards and index.json."),
        teacher: Optional[Path] = typer.Option(
            None, help="Local Hugging Face or TinyGPT folder (default: the cached default teacher)."),
        k: int = typer.Option(32, min=1, help="Top-k log-probs stored per token."),
        seq_len: int = typer.Option(64, min=2, help="Tokens per cached sequence."),
        max_sequences: int = typer.Option(2000, min=1, help="Sequences to cache from the training split."),
        batch_size: int = typer.Option(32, min=1, help="Sequences per teacher forward."),
        logprob_dtype: str = typer.Option("float16", help="float16, bfloat16 or float32."),
        sequences_per_shard: int = typer.Option(512, min=1, help="Sequences per safetensors shard."),
        teacher_steps: int = typer.Option(300, min=1, help="Steps to train the default teacher (when not cached)."),
        max_train_bytes: int = typer.Option(1_000_000, min=1000, help="Cap on training text."),
        seed: int = typer.Option(0, help="Seed of the default teacher."),
    ) -> None:
        """Run a teacher once over the training text and store its top-k log-probs.

        Writes safetensors shards plus index.json (sizes, SHA-256) and prints bytes per token.
        Use the folder with `divergent distill-lm --teacher-cache OUT`.
        """
        from divergent.data.teacher_cache import write_teacher_cache
        from divergent.data.text import sequential_windows
        from divergent.models.hf import hidden_and_logits, load_causal_lm, load_tokenizer

        console = Console()
        tokenizer = load_tokenizer(teacher) if teacher is not None else None
        data = _load_data(tokenizer, max_train_bytes, 10_000)
        if teacher is None:
            model, _ = default_teacher(data, steps=teacher_steps, seq_len=seq_len, batch_size=16, lr=3e-3,
                                       seed=seed, console=console)
        else:
            model = load_causal_lm(teacher)
        model.eval()
        inputs, labels = sequential_windows(data.train, seq_len, max_sequences)
        vocab = int(hidden_and_logits(model, inputs[:1])[1].shape[-1])
        batches = ((inputs[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(inputs), batch_size))
        started = time.perf_counter()
        with report.progress(console=console, transient=True) as bar:
            task = bar.add_task("caching teacher", total=len(inputs))
            index = write_teacher_cache(
                lambda ids: hidden_and_logits(model, ids)[1], batches, out, k=k, vocab_size=vocab,
                logprob_dtype=logprob_dtype, sequences_per_shard=sequences_per_shard,
                metadata={"teacher": str(teacher) if teacher else "default TinyGPT teacher", "seq_len": seq_len},
                progress_callback=lambda done: bar.update(task, completed=done),
            )
        row = {"sequences": index["total_sequences"], "tokens": index["total_tokens"], "k": k,
               "shards": len(index["shards"]), "megabytes": index["total_bytes"] / 1e6,
               "bytes_per_token": index["bytes_per_token"], "seconds": time.perf_counter() - started}
        report.print_table([row], list(row), title=f"teacher cache written to {out}", console=console)
