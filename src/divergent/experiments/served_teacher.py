"""A served teacher (``--teacher http://HOST:PORT/v1``) in ``cache-teacher`` and ``distill-lm``.

A served teacher is a *remote cache*: ``cache-teacher`` writes its top-k log-probs to a
cache folder; ``distill-lm`` writes that cache once into its run folder
(``<run>/teacher-cache``, continued on ``--resume``) and trains from it as from
``--teacher-cache``. The HTTP side is :class:`divergent.models.served.ServedTeacher`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rich.console import Console

from divergent.models.served import ServedTeacher, check_topk_divergences, is_served

__all__ = ["check_served_settings", "open_served_teacher", "served_cache", "check_topk_divergences"]

_APIS = ("auto", "vllm", "sglang")


def check_served_settings(settings: Any) -> None:
    """Raise a ValueError for served-teacher settings that cannot work (called by the configs)."""
    if settings.teacher_api not in _APIS:
        raise ValueError(f"teacher_api must be one of {', '.join(_APIS)}, got {settings.teacher_api!r}")
    for name in ("teacher_in_flight", "teacher_top_k"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(settings, name)}")
    served = is_served(settings.teacher)
    read_cache = bool(getattr(settings, "teacher_cache", "") and getattr(settings, "cross_tokenizer", ""))
    if not served and (settings.teacher_model or (settings.teacher_tokenizer and not read_cache)):
        raise ValueError("--teacher-tokenizer / --teacher-model name a served teacher; give --teacher "
                         "http://HOST:PORT/v1 with them (a local teacher folder holds its own tokenizer; with "
                         "--teacher-cache DIR --cross-tokenizer uld, --teacher-tokenizer is the cache's tokenizer)")
    if not served:
        return
    if getattr(settings, "teacher_cache", ""):
        raise ValueError("give --teacher http://... (a served teacher) or --teacher-cache DIR, not both")
    if getattr(settings, "on_policy_fraction", 0) + getattr(settings, "seq_kd_fraction", 0) > 0:
        raise ValueError("on_policy_fraction / seq_kd_fraction need a local teacher to score generated continuations; "
                         "a served teacher (--teacher http://...) gives log-probs of the data only: set them to 0")
    if not settings.teacher_tokenizer and not getattr(settings, "student", ""):
        raise ValueError("a served teacher needs --teacher-tokenizer PATH: a local copy of the served model's tokenizer")
    check_topk_divergences(getattr(settings, "divergences", ()))


def open_served_teacher(settings: Any, *, console: Console | None = None) -> ServedTeacher:
    """Connect to ``settings.teacher`` (checks the model name and, on vLLM, the tokenizer)."""
    tokenizer = settings.teacher_tokenizer or getattr(settings, "student", "")
    teacher = ServedTeacher(settings.teacher, tokenizer, model=settings.teacher_model or None,
                            api=settings.teacher_api, max_in_flight=settings.teacher_in_flight)
    if console is not None:
        checked = "checked against the server's /tokenize" if teacher.tokenizer_checked else \
            "checked on every answer's token ids"
        console.print(f"teacher: {teacher.describe()} (tokenizer {tokenizer}, {checked}); top-k log-probs at T = 1, "
                      f"the temperature is applied here")
    return teacher


def served_cache(config: Any, run_dir: Path, console: Console) -> Path:
    """``distill-lm``'s served teacher written once as a cache in ``run_dir/teacher-cache``."""
    from divergent.experiments.lm import CacheTeacherConfig, LMDataSettings, run_cache_teacher

    out = run_dir / "teacher-cache"
    if (out / "index.json").is_file():
        console.print(f"teacher: its top-k log-probs are cached in {out} (from {config.teacher})")
        return out
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(LMDataSettings)}
    shared["teacher_tokenizer"] = config.teacher_tokenizer or config.student
    cache_config = CacheTeacherConfig(**shared, k=config.teacher_top_k, batch_size=max(config.batch_size, 8),
                                      output_dir=str(out))
    run_cache_teacher(cache_config, resume=(out / "progress.json").is_file(), console=console)
    return out
