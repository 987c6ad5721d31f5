"""``divergent compare``: distil one classifier with several divergences and compare them honestly."""

from __future__ import annotations

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
    split_list,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def compare(
        config_file: ConfigOption = None,
        dataset: Optional[str] = typer.Option(None, help="digits (embedded, default), cifar10 or cifar100."),
        data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder holding the CIFAR python-pickle release."),
        data: Optional[str] = typer.Option(
            None, "--data", help="Your data: a .npz (X, y; optional X_test/y_test or split), a .csv (with "
                                 "--label-column) or a folder with one sub-folder of images per class."),
        label_column: Optional[str] = typer.Option(None, "--label-column", help="Label column of a .csv --data file."),
        teacher: Optional[str] = typer.Option(
            None, "--teacher", help="Your trained teacher, used frozen: a TorchScript file, a torch.export .pt2 file "
                                    "or module:factory (with --teacher-weights)."),
        teacher_weights: Optional[str] = typer.Option(
            None, "--teacher-weights", help="state_dict for --teacher (torch.save, read weights_only, or .safetensors)."),
        divergences: Optional[str] = typer.Option(None, "--divergences", "-d", help="Comma-separated rows: divergences or methods."),
        methods: Optional[str] = typer.Option(None, "--methods", "-m", help="Comma-separated extra method rows (see docs/methods.md)."),
        baseline: Optional[str] = typer.Option(None, help="Row the others are compared with (default: forward_kl when it is a row, else the first row)."),
        seeds: Optional[str] = typer.Option(None, help="Comma-separated training seeds (default 0,1,2)."),
        epochs: Optional[int] = typer.Option(None, help="Epochs per student run."),
        teacher_epochs: Optional[int] = typer.Option(None, help="Epochs of teacher training (cached)."),
        teacher_model: Optional[str] = typer.Option(None, help="Teacher architecture, e.g. cnn-32, mlp-256x128, resnet32x4."),
        student_model: Optional[str] = typer.Option(None, help="Student architecture, e.g. mlp-32, resnet8x4, or module:factory."),
        device: Optional[str] = typer.Option(None, help="cpu, cuda or auto."),
        out_dir: OutDirOption = None,
        set_: SetOption = [],
        resume: ResumeOption = None,
        debug: DebugOption = False,
    ) -> None:
        """Which divergence should I distil my classifier with?

        Trains a teacher (cached), then a student alone and one student per divergence
        over several seeds; prints test accuracy, ECE, NLL, teacher agreement and time,
        paired differences to the student alone and the baseline (marked only beyond both
        the seed-to-seed spread and one test example) and a verdict, and writes
        results.csv/json, report.md and PNGs to a run folder. With no options: digits,
        students seeing 10% of the labels, eight divergences, three seeds, under a minute
        on two CPU cores.
        """

        def body() -> None:
            from divergent.experiments.compare import CompareConfig, resume_compare, run_compare

            config = settings(
                CompareConfig,
                config_file=config_file,
                options={
                    "dataset": dataset, "data_dir": data_dir, "data": data, "label_column": label_column,
                    "teacher": teacher, "teacher_weights": teacher_weights, "divergences": split_list(divergences),
                    "methods": split_list(methods), "baseline": baseline, "seeds": split_list(seeds),
                    "epochs": epochs, "teacher_epochs": teacher_epochs, "teacher_model": teacher_model,
                    "student_model": student_model, "device": device,
                    "output_dir": str(out_dir) if out_dir is not None else None,
                },
                sets=set_,
                resume=resume,
            )
            if resume is not None:
                resume_compare(resume)
                return
            run_compare(config, command=command_line("compare"))

        run_command(body, debug=debug)
