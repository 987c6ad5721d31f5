"""Why the choice of divergence matters, in one picture.

A fixed teacher with three modes over 100 ordered categories, and a student that
can only be a discretised single Gaussian (two parameters: centre μ and width σ).
The student cannot match the teacher, so each divergence must choose what to
give up: a mass-covering one (forward KL) spreads the student over all modes, a
mode-seeking one (reverse KL) settles on one mode, others fall in between.
:func:`fit_all` fits the student by gradient descent under every divergence and
reports the mass it puts on each teacher mode.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from divergent.functional import available, divergence, get_spec

__all__ = ["ExploreConfig", "ExploreResult", "run_explore", "teacher_logits", "student_logits", "fit", "fit_all",
           "plot_grid", "MODES"]


@dataclass
class ExploreConfig:
    """Settings of ``divergent explore``.

    divergences: names to fit (empty: every registered divergence).
    steps: Adam steps per divergence.
    plot: write the PNG grid.
    output_dir: where the run folder is created.
    """

    divergences: list[str] = field(default_factory=list)
    steps: int = 300
    plot: bool = True
    output_dir: str = "runs"

    def __post_init__(self) -> None:
        for name in self.divergences:
            get_spec(name)  # unknown names raise, listing the valid ones
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

N_CATEGORIES = 100
# (centre, width, weight) of the teacher's modes; unequal so that "which mode" is visible.
MODES = ((20.0, 4.0, 0.45), (52.0, 7.0, 0.2), (80.0, 3.0, 0.35))


def teacher_logits(n: int = N_CATEGORIES) -> torch.Tensor:
    """log of a mixture of three discretised Gaussians, normalised over ``n`` categories."""
    k = torch.arange(n, dtype=torch.float64)
    components = torch.stack(
        [math.log(w) - 0.5 * ((k - c) / s) ** 2 - math.log(s) for c, s, w in MODES]
    )
    return torch.logsumexp(components, dim=0)


def student_logits(mu: torch.Tensor, log_sigma: torch.Tensor, n: int = N_CATEGORIES) -> torch.Tensor:
    """A discretised Gaussian: logits_k = −(k − μ)² / (2σ²)."""
    k = torch.arange(n, dtype=mu.dtype)
    return -0.5 * ((k - mu) / log_sigma.exp()) ** 2


def _mode_regions(n: int = N_CATEGORIES) -> list[range]:
    centres = [c for c, _, _ in MODES]
    cuts = [0] + [int(round((a + b) / 2)) for a, b in zip(centres, centres[1:])] + [n]
    return [range(lo, hi) for lo, hi in zip(cuts, cuts[1:])]


@dataclass
class ExploreResult:
    name: str
    mu: float
    sigma: float
    final_divergence: float
    student_probs: list[float]
    mode_mass: list[float]
    student_entropy: float
    teacher_entropy: float

    def row(self) -> dict:
        out = {"divergence": self.name}
        for i, mass in enumerate(self.mode_mass):
            out[f"mass_{'ABC'[i]}"] = round(mass, 3)
        out["covers"] = "".join("ABC"[i] for i, m in enumerate(self.mode_mass) if m >= 0.1)
        out["H_student"] = round(self.student_entropy, 3)
        out["H_teacher"] = round(self.teacher_entropy, 3)
        out["mu"] = round(self.mu, 2)
        out["sigma"] = round(self.sigma, 2)
        out["final_divergence"] = self.final_divergence
        return out


def _entropy(logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits, -1)
    return float(-(logp.exp() * logp).sum())


# Starting points (centre, width): the fit keeps the best of these, so a mode-seeking
# divergence is not stuck in whichever basin happened to contain one start.
STARTS = tuple((mu, sigma) for mu in (20.0, 35.0, 50.0, 65.0, 80.0) for sigma in (4.0, 15.0))


def fit(name: str, steps: int = 300, lr: float = 1.0, starts=STARTS, **params) -> ExploreResult:
    """Fit the Gaussian student to the teacher by Adam on ``divergence(name, student, teacher)``.

    All starting points are optimised together as independent rows (``reduction="sum"``
    gives each row its own gradient); the start with the lowest final divergence wins.
    Batch-coupled divergences (sinkhorn) are evaluated one row at a time instead.
    """
    from divergent.functional import get_spec

    per_row = get_spec(name).per_row
    teacher = teacher_logits().unsqueeze(0).expand(len(starts), -1)
    mu = torch.tensor([m for m, _ in starts], dtype=torch.float64, requires_grad=True)
    log_sigma = torch.tensor([math.log(s) for _, s in starts], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([mu, log_sigma], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)

    def per_start_values(logits: torch.Tensor) -> torch.Tensor:
        if per_row:
            return divergence(name, logits, teacher, reduction="none", **params)
        return torch.stack([divergence(name, logits[i : i + 1], teacher[i : i + 1], **params) for i in range(len(starts))])

    for _ in range(steps):
        optimizer.zero_grad()
        per_start_values(student_logits(mu.unsqueeze(1), log_sigma.unsqueeze(1))).sum().backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            log_sigma.clamp_(math.log(0.5), math.log(60.0))
    with torch.no_grad():
        logits = student_logits(mu.unsqueeze(1), log_sigma.unsqueeze(1))
        finals = per_start_values(logits)
        best = int(torch.argmin(torch.nan_to_num(finals, nan=float("inf"))))
        q = torch.softmax(logits[best], -1)
        return ExploreResult(
            name=name,
            mu=float(mu[best]),
            sigma=float(log_sigma[best].exp()),
            final_divergence=float(finals[best]),
            student_probs=q.tolist(),
            mode_mass=[float(q[list(r)].sum()) for r in _mode_regions()],
            student_entropy=_entropy(logits[best]),
            teacher_entropy=_entropy(teacher[0]),
        )


def fit_all(names: list[str] | None = None, steps: int = 300, progress=None) -> list[ExploreResult]:
    """Fit the student under each divergence (default: every registered one)."""
    names = list(available()) if names is None else names
    # With one row per call, sinkhorn's plan is the 1×1 identity after any number of
    # iterations; one iteration gives the same value at a twentieth of the cost.
    extra = {"sinkhorn": {"n_iters": 1}}
    results = []
    task = progress.add_task("fitting", total=len(names)) if progress is not None else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 10×100 tensors: threading only adds overhead
    try:
        for name in names:
            if progress is not None:
                progress.update(task, description=f"fitting {name}")
            results.append(fit(name, steps=steps, **extra.get(name, {})))
            if progress is not None:
                progress.advance(task)
    finally:
        torch.set_num_threads(threads)
    return results


def plot_grid(results: list[ExploreResult], path: str | Path) -> Path:
    """One panel per divergence: the teacher (grey bars) and the fitted student (line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    cols = 4
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.6 * rows), sharex=True, sharey=True, squeeze=False)
    p = torch.softmax(teacher_logits(), -1).numpy()
    k = range(len(p))
    for ax, result in zip(axes.flat, results):
        ax.bar(k, p, width=1.0, color="0.75", label="teacher")
        ax.plot(k, result.student_probs, color="C3", lw=2, label="student")
        masses = " ".join(f"{m:.2f}" for m in result.mode_mass)
        ax.set_title(f"{result.name}\nmass on modes A B C: {masses}", fontsize=9)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="upper right")
    fig.suptitle("A single-Gaussian student fitted to a three-mode teacher under each divergence", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_explore(config: ExploreConfig, *, run_dir: str | Path | None = None, console=None) -> dict[str, Any]:
    """Fit every divergence, print the table, write results.csv/json and explore.png to a run folder."""
    from divergent.config import save_config
    from divergent.experiments import report

    console = console or report.output_console()
    names = list(config.divergences) or list(available())
    with report.run_folder(config.output_dir, "explore", resume=run_dir) as folder:
        save_config(config, folder.path / "config.yaml")
        folder.started()
        start = time.perf_counter()
        with report.progress(console=console, transient=True) as bar:
            results = fit_all(names, steps=config.steps, progress=bar)
        rows = [r.row() for r in results]
        columns = ["divergence", "mass_A", "mass_B", "mass_C", "covers", "H_student", "H_teacher", "final_divergence"]
        report.print_table(rows, columns, console=console,
                           title="Mass a one-Gaussian student puts on each teacher mode "
                                 "(A: 45% left, B: 20% wide middle, C: 35% narrow right)")
        report.write_csv(rows, folder.path / "results.csv")
        summary = {"steps": config.steps, "results": [r.__dict__ for r in results], "run_dir": str(folder.path)}
        report.write_json(summary, folder.path / "results.json")
        if config.plot:
            plot_grid(results, folder.path / "explore.png")
        console.print(f"{len(results)} fits in {time.perf_counter() - start:.1f} s; results in {folder.path}")
    return summary
