"""``divergent explore``: fit one restricted student to a multi-modal teacher under every divergence."""

from __future__ import annotations

from typing import Optional

import typer

from divergent.cli._common import (
    ConfigOption,
    DebugOption,
    OutDirOption,
    ResumeOption,
    SetOption,
    run_command,
    settings,
    split_list,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def explore(
        config_file: ConfigOption = None,
        divergences: Optional[str] = typer.Option(None, "--divergences", "-d", help="Comma-separated names (default: all registered)."),
        steps: Optional[int] = typer.Option(None, help="Adam steps per divergence (default 300)."),
        plot: Optional[bool] = typer.Option(None, "--plot/--no-plot", help="Write the PNG grid (default: yes)."),
        out_dir: OutDirOption = None,
        set_: SetOption = [],
        resume: ResumeOption = None,
        debug: DebugOption = False,
    ) -> None:
        """Show why the choice matters: a one-Gaussian student fitted to a three-mode teacher.

        Prints the mass the student puts on each teacher mode, the two entropies and the
        final divergence, and writes results.csv/json and explore.png to a run folder.
        The fits take seconds, so --resume simply repeats the run in its folder.
        """

        def body() -> None:
            from divergent.experiments.explore import ExploreConfig, run_explore

            config = settings(
                ExploreConfig, config_file=config_file, sets=set_, resume=resume,
                options={"divergences": split_list(divergences), "steps": steps, "plot": plot,
                         "output_dir": str(out_dir) if out_dir is not None else None},
            )
            run_explore(config, run_dir=resume)

        run_command(body, debug=debug)
