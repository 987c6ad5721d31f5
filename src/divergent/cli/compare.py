"""``divergent compare``: distil one classifier with several divergences and compare them honestly."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console


def _split(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        value = value.strip()
        # Mappings and lists may be written inline as YAML: --set 'method_params={dkd: {beta: 4}}'.
        overrides[key.strip()] = yaml.safe_load(value) if value[:1] in "{[" and value else value
    return overrides


def register(app: typer.Typer) -> None:
    @app.command()
    def compare(
        config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file of CompareConfig keys; options below override it."),
        dataset: Optional[str] = typer.Option(None, help="digits (embedded, default), cifar10 or cifar100."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder holding the CIFAR python-pickle release."),
        divergences: Optional[str] = typer.Option(None, "--divergences", "-d", help="Comma-separated rows: divergences or methods."),
        methods: Optional[str] = typer.Option(None, "--methods", "-m", help="Comma-separated extra method rows (hinton, dkd, nkd, abkd, sinkhorn-with-KD, nd, ofa, mcmi, dml, bdkd-online, pskd, uskd)."),
        baseline: Optional[str] = typer.Option(None, help="Row the others are compared with (default forward_kl)."),
        seeds: Optional[str] = typer.Option(None, help="Comma-separated training seeds (default 0,1,2)."),
        epochs: Optional[int] = typer.Option(None, help="Epochs per student run."),
        teacher_epochs: Optional[int] = typer.Option(None, help="Epochs of teacher training (cached)."),
        teacher_model: Optional[str] = typer.Option(None, help="Teacher architecture, e.g. cnn-32, mlp-256x128, resnet32x4."),
        student_model: Optional[str] = typer.Option(None, help="Student architecture, e.g. mlp-32, resnet8x4."),
        output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Where the run folder is created (default runs/)."),
        device: Optional[str] = typer.Option(None, help="cpu, cuda or auto."),
        set_: list[str] = typer.Option([], "--set", help="Any other config key: --set lr=0.005 (repeatable)."),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted run in this folder with its saved settings."),
    ) -> None:
        """Which divergence should I distil my classifier with?

        Trains a teacher (cached), then a student alone and one student per divergence over
        several seeds; prints test accuracy, NLL, ECE, teacher agreement and time, marks rows
        that differ from the baseline by more than the seed-to-seed spread, and writes
        results.csv/json, report.md and PNGs to a run folder. With no options: digits,
        eight divergences, three seeds, under two minutes on two CPU cores.
        """
        from divergent.compare import CompareConfig, CompareInterrupted, resume_compare, run_compare
        from divergent.config import load_config
        from divergent.train.classifier import NonFiniteLossError

        console = Console()
        overrides = {
            "dataset": dataset, "data_dir": str(data_dir) if data_dir else None,
            "divergences": _split(divergences), "methods": _split(methods), "baseline": baseline,
            "seeds": _split(seeds), "epochs": epochs, "teacher_epochs": teacher_epochs,
            "teacher_model": teacher_model, "student_model": student_model,
            "output_dir": str(output_dir) if output_dir else None, "device": device,
        }
        overrides = {k: v for k, v in overrides.items() if v is not None}
        for key, value in _parse_sets(set_).items():
            if key in overrides:
                raise typer.BadParameter(f"{key} is set twice (option and --set)", param_hint="--set")
            overrides[key] = value
        try:
            if resume is not None:
                if overrides or config_file is not None:
                    raise typer.BadParameter("--resume continues with the run's saved config.yaml; give no other settings", param_hint="--resume")
                resume_compare(resume, console=console)
                return
            config = load_config(CompareConfig, config_file, overrides)
            command = "divergent " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None
            run_compare(config, console=console, command=command)
        except CompareInterrupted as exc:
            console.print(f"[yellow]{exc}[/]")
            raise typer.Exit(code=130) from None
        except NonFiniteLossError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(code=1) from None
        except (ValueError, TypeError, FileNotFoundError) as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(code=2) from None
