"""``distill-lm --seeds``: which divergence should I distil my language model with?

The answer ``compare`` gives for classifiers, for language models. Every row — the
student trained on the data alone ("student alone"), one distilled student per divergence,
and, with ``on_policy_fractions``, one per divergence × GKD λ — trains on every seed from
the same initial weights (re-drawn per seed for the default student; your ``--student``
folder's weights otherwise, the seed then changing the batch order and sampling), on the
same data split and evaluation examples. The teacher is a row too. For every row it reports,
mean ± std over seeds: evaluation loss (nats per counted token), KL(teacher ‖ student), top-1
agreement with the teacher and — with ``generation_prompts`` — generation quality on held-out
prompts (ROUGE-L of the greedy and sampled generations against the reference completion,
ROUGE-L against the teacher's own greedy generation, distinct-1/2, and the mean ``reward``).

Each row is compared seed by seed with the student alone and with a ``baseline`` divergence
by the rule of :mod:`divergent.experiments.verdict`: a difference is marked only when its
mean exceeds both its spread across seeds and **one evaluation example** — for a mean over
evaluation examples (ROUGE-L, top-1 agreement) 1/n (one example moving from 0 to 1), for a
loss or KL per token one example's share of the student alone's mean (its mean / n).

Each finished (row, seed) is kept on disk — ``seed<k>/runs/<row>/result.json`` (and
``generation.json``), the student in ``model/`` — and an interrupted row continues from its
checkpoint: ``divergent distill-lm --resume RUN_DIR`` (after Ctrl-C or SIGKILL) gives the
uninterrupted run's results.

Python API::

    from divergent.experiments.lm import DistillLMConfig, run_distill_lm
    run_distill_lm(DistillLMConfig(divergences=["forward_kl", "reverse_kl"], seeds=[0, 1, 2]))
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from divergent.metrics.diversity import distinct_n as metrics_distinct_n
from divergent.config import config_to_dict, save_config
from divergent.experiments import lm, report, verdict
from divergent.io import atomic_write_text, read_json, write_json
from divergent.train.run import RunInterrupted

__all__ = ["ALONE", "Row", "comparison_rows", "baseline_row", "run_lm_comparison", "context_length", "rouge_l", "distinct_n"]

ALONE = "student alone"


@dataclass(frozen=True)
class Row:
    """One compared row: its name, divergence (None: the student alone) and GKD λ."""

    name: str
    divergence: str | None
    on_policy: float


def comparison_rows(config: lm.DistillLMConfig) -> list[Row]:
    """The student alone (when ``include_scratch``), then every divergence × λ, in the config's order.

    A row's name is its divergence, followed by `` λ=<value>`` when several λ are compared.
    """
    fractions = list(config.on_policy_fractions) or [config.on_policy_fraction]
    rows = [Row(ALONE, None, 0.0)] if config.include_scratch else []
    for divergence in config.divergences:
        for fraction in fractions:
            name = divergence if len(fractions) == 1 else f"{divergence} λ={fraction:g}"
            rows.append(Row(name, divergence, float(fraction)))
    return rows


def baseline_row(config: lm.DistillLMConfig) -> str:
    """The row every other is compared with: ``baseline`` (its first λ), else the first divergence row."""
    rows = [r for r in comparison_rows(config) if r.divergence is not None]
    wanted = config.baseline or rows[0].divergence
    return next(r.name for r in rows if r.divergence == wanted)


# ----------------------------------------------------------------------------- generation quality


def context_length(model: torch.nn.Module) -> int | None:
    """Positions the model can attend over (TinyGPT's ``max_seq_len``, a HF config's ``max_position_embeddings``)."""
    config = getattr(model, "config", None)
    for name in ("max_seq_len", "max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def rouge_l(references: list[str], predictions: list[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference (``rouge-score``, no stemming).

    >>> rouge_l(["the cat sat"], ["the cat sat"]), rouge_l(["a b c d"], ["a x c y"])
    ([1.0], [0.5])
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(reference, prediction)["rougeL"].fmeasure for reference, prediction in zip(references, predictions)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n: distinct word n-grams over all n-grams of the texts (whitespace words; 0 when there is none).

    >>> distinct_n(["a b a b"], 1), distinct_n(["a b a b"], 2)
    (0.5, 0.6666666666666666)
    """
    return metrics_distinct_n([text.split() for text in texts], n)


@dataclass
class _Prompts:
    """The held-out prompts generated from, with their reference completions (token ids and text)."""

    ids: list[list[int]]
    prompts: list[str]
    references: list[str]


def _held_out_prompts(config: lm.DistillLMConfig, setup: lm._Setup) -> _Prompts:
    """The first ``generation_prompts`` evaluation examples, split into prompt and reference.

    The prompt is everything before an example's first counted token (a prompt–completion or
    chat row), or its first ``prompt_len`` tokens when every token counts (text); the reference
    is the counted tokens after it (at most ``max_new_tokens`` of them for text rows).
    """
    from divergent.train.lm import _prompt

    ids, prompts, references = [], [], []
    for example in setup.eval[: config.generation_prompts]:
        tokens = [int(t) for t in example["input_ids"]]
        labels = [int(t) for t in example["labels"]]
        prompt = _prompt(tokens, labels, config.prompt_len)
        counted = [t for t, label in zip(tokens[len(prompt):], labels[len(prompt):]) if label != -100]
        if all(label != -100 for label in labels[1:]):  # text: the continuation of the same length
            counted = counted[: config.max_new_tokens]
        ids.append(prompt)
        prompts.append(setup.tokenizer.decode(prompt, skip_special_tokens=True))
        references.append(setup.tokenizer.decode(counted, skip_special_tokens=True))
    return _Prompts(ids, prompts, references)


def check_generation_fits(config: lm.DistillLMConfig, setup: lm._Setup, prompts: _Prompts) -> None:
    """Generation settings that exceed a model's context are an error naming them (before any training)."""
    longest = max((len(p) for p in prompts.ids), default=0)
    for what, model in (("the student", setup.student_init), ("the teacher", setup.teacher)):
        limit = None if model is None else context_length(model)
        if limit is not None and longest + config.max_new_tokens > limit:
            raise ValueError(
                f"generation_prompts: the longest held-out prompt has {longest} tokens and max_new_tokens is "
                f"{config.max_new_tokens}: {longest + config.max_new_tokens} positions exceed {what}'s context of "
                f"{limit}; lower max_new_tokens, prompt_len or max_length")


def _decoded(tokenizer: Any, generations: list[list[int]]) -> list[str]:
    return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in generations]


def _generate(model: torch.nn.Module, prompts: _Prompts, config: lm.DistillLMConfig, setup: lm._Setup, seed: int,
              temperature: float, device: torch.device) -> list[str]:
    from divergent.train.lm import _sample

    generator = torch.Generator().manual_seed(10_000 + seed)
    tokens = _sample(model, prompts.ids, config.max_new_tokens, temperature, generator, lm._pad_id(setup.tokenizer),
                     getattr(setup.tokenizer, "eos_token_id", None), device)
    return _decoded(setup.tokenizer, tokens)


def _generation_metrics(model: torch.nn.Module, prompts: _Prompts, teacher_greedy: list[str] | None,
                        config: lm.DistillLMConfig, setup: lm._Setup, seed: int, device: torch.device,
                        scorer: Any) -> dict[str, Any]:
    """ROUGE-L (greedy, sampled) against the references and the teacher's greedy generation, distinct-n, reward."""
    greedy = _generate(model, prompts, config, setup, seed, 0.0, device)
    sampled = _generate(model, prompts, config, setup, seed, config.generation_temperature or 1.0, device)
    metrics: dict[str, Any] = {
        "rouge_l": _mean(rouge_l(prompts.references, greedy)),
        "rouge_l_sampled": _mean(rouge_l(prompts.references, sampled)),
        "distinct_1": distinct_n(sampled, 1),
        "distinct_2": distinct_n(sampled, 2),
    }
    if teacher_greedy is not None:
        metrics["rouge_l_teacher"] = _mean(rouge_l(teacher_greedy, greedy))
    if scorer is not None:
        rewards, counts = scorer(prompts.prompts, sampled, {"answer": list(prompts.references)})
        metrics["reward"] = float(rewards.mean()) if len(rewards) else 0.0
        metrics.update(counts)
    metrics["examples"] = [{"prompt": p, "reference": r, "greedy": g, "sampled": s}
                           for p, r, g, s in list(zip(prompts.prompts, prompts.references, greedy, sampled))[:3]]
    return metrics


# ----------------------------------------------------------------------------- the comparison


def _seed_setup(config: lm.DistillLMConfig, setup: lm._Setup, seed: int) -> lm._Setup:
    """The setup of one seed: the default student's initial weights are drawn from the seed; a given student's are its own."""
    from divergent.models.gpt import GPTConfig, TinyGPT

    if config.student:
        return setup
    torch.manual_seed(seed)
    return dataclasses.replace(setup, student_init=TinyGPT(GPTConfig(**lm.STUDENT_CONFIG)))


def _load_student(path: str) -> torch.nn.Module:
    from divergent.models.hf import load_causal_lm

    return load_causal_lm(path, what="a finished student")


def _with_generation(run: dict[str, Any], folder: Path, compute) -> dict[str, Any]:
    """The run's generation metrics, computed once and kept in ``generation.json`` beside its result."""
    path = folder / "generation.json"
    if path.is_file():
        saved = read_json(path, "per-run generation file")
        if saved.get("config_hash") == run.get("config_hash"):
            return {**run, **{k: v for k, v in saved.items() if k != "config_hash"}}
    metrics = compute()
    write_json({**metrics, "config_hash": run.get("config_hash")}, path)
    return {**run, **metrics}


def _resolutions(runs: list[dict[str, Any]], n_eval: int, n_prompts: int) -> dict[str, float]:
    """One evaluation example in each metric's units (see the module docstring)."""
    alone = [r for r in runs if r["name"] == ALONE and r.get("status") == "finished"]
    pool = alone or [r for r in runs if r.get("status") == "finished"]

    def share(key: str) -> float:
        values = [float(r[key]) for r in pool if key in r]
        return (sum(values) / len(values)) / n_eval if values else 0.0

    return {"loss": share("loss"), "kl_teacher": share("kl_teacher"), "top1_agreement": 1 / n_eval,
            "per_prompt": 1 / max(n_prompts, 1)}


def _metrics(config: lm.DistillLMConfig, runs: list[dict[str, Any]], n_eval: int, n_prompts: int):
    """(primary metric, the other compared metrics) of this comparison."""
    res = _resolutions(runs, n_eval, n_prompts)
    loss = verdict.Metric("loss", "evaluation loss", higher_is_better=False, resolution=res["loss"], digits=4,
                          short="eval loss", unit="one evaluation example's share of the loss")
    kl = verdict.Metric("kl_teacher", "KL(teacher ‖ student)", higher_is_better=False, resolution=res["kl_teacher"],
                        digits=4, short="KL", unit="one evaluation example's share of the KL")
    agree = verdict.Metric("top1_agreement", "top-1 agreement", resolution=res["top1_agreement"], digits=4,
                           short="top-1", unit="one evaluation example")
    likelihood = [loss, kl, agree]
    if not config.generation_prompts:
        return loss, [kl], likelihood
    rouge = verdict.Metric("rouge_l", "ROUGE-L (greedy, vs reference)", resolution=res["per_prompt"], digits=4,
                           short="ROUGE-L", unit="one held-out prompt")
    generation = [rouge, verdict.Metric("rouge_l_sampled", "ROUGE-L (sampled)", resolution=res["per_prompt"],
                                        short="ROUGE-L sampled", unit="one held-out prompt")]
    if any("rouge_l_teacher" in r for r in runs):
        generation.append(verdict.Metric("rouge_l_teacher", "ROUGE-L vs the teacher", resolution=res["per_prompt"],
                                         short="ROUGE-L vs teacher", unit="one held-out prompt"))
    if config.reward:
        generation.append(verdict.Metric("reward", "mean reward", resolution=res["per_prompt"], short="reward",
                                         unit="one held-out prompt"))
    return loss, [kl, rouge], likelihood + generation


_DESCRIBED = ("loss", "perplexity", "kl_teacher", "top1_agreement", "rouge_l", "rouge_l_sampled", "rouge_l_teacher",
              "distinct_1", "distinct_2", "reward", "train_s")
_HEADERS = {"loss": "eval loss", "perplexity": "ppl", "kl_teacher": "KL(t‖s)", "top1_agreement": "top-1 agree",
            "rouge_l": "ROUGE-L", "rouge_l_sampled": "ROUGE-L sampled", "rouge_l_teacher": "ROUGE-L vs teacher",
            "distinct_1": "distinct-1", "distinct_2": "distinct-2", "reward": "reward", "train_s": "train s"}
_TERMINAL = ("row", "eval loss", "KL(t‖s)", "top-1 agree", "ROUGE-L", "ROUGE-L vs teacher", "distinct-2", "reward")
_SHORT = {"loss": "loss", "kl_teacher": "KL", "top1_agreement": "top-1", "rouge_l": "ROUGE-L"}


def _table(summary, teacher_row, primary, compared, baseline: str, include_alone: bool, described: list[str]):
    by_key = {m.key: m for m in compared}
    differences = ["loss", "kl_teacher"] + (["rouge_l"] if "rouge_l" in by_key else [])
    rows = []
    teacher = {"row": "teacher"}
    for key in described:
        value = teacher_row.get(key)
        teacher[_HEADERS[key]] = "—" if value is None else f"{value:.{4 if key != 'train_s' else 1}f}"
    for entry in summary:
        row = {"row": entry["name"]}
        for key in described:
            row[_HEADERS[key]] = verdict.mean_std_cell(entry, key, 1 if key == "train_s" else 4)
        for key in differences:
            if include_alone:
                row[f"Δ{_SHORT[key]} vs {ALONE}"] = verdict.difference_column(entry, by_key[key], "_alone", ALONE)
            row[f"Δ{_SHORT[key]} vs {baseline}"] = verdict.difference_column(entry, by_key[key], "", baseline)
        rows.append(row)
    columns = list(rows[0]) if rows else ["row"]
    return [{c: teacher.get(c, "—") for c in columns}] + rows, columns


def _regime_text(config: lm.DistillLMConfig, setup: lm._Setup, summary, teacher_row) -> str:
    """The "Why this regime" paragraph of report.md, with this run's numbers."""
    alone = next((e for e in summary if e["name"] == ALONE and e["runs"]), None)
    numbers = f"In this run the teacher's evaluation loss is {teacher_row.get('loss', float('nan')):.4f}"
    if alone is not None:
        numbers += f", the student alone's {alone['loss_mean']:.4f}"
    distilled = [e for e in summary if e["name"] != ALONE and e["runs"]]
    if distilled:
        numbers += (f", the distilled rows' {min(e['loss_mean'] for e in distilled):.4f}–"
                    f"{max(e['loss_mean'] for e in distilled):.4f}")
    if config.teacher or config.teacher_cache:
        where = f"The teacher ({setup.teacher_description}) and the student are yours"
    else:
        where = ("The default byte-level teacher (2 layers, d=128) was trained once on the standard-library source "
                 "and the student (1 layer, d=64, about a fifth of its parameters: 91k against 479k) starts from scratch")
    return (f"{where}. Each student trains {config.steps} steps of {config.batch_size} × {config.grad_accum} "
            f"examples: short enough that the student alone is still far from the teacher, so what the teacher's "
            f"full next-token distribution carries beyond the one observed token — and how each divergence "
            f"transfers it — changes the student by more than the seed spread; with many more steps the student "
            f"alone would close part of the gap and the rows would differ less. {numbers}.")


def run_lm_comparison(config: lm.DistillLMConfig, folder: report.RunFolder, console: Console,
                      command: str | None) -> dict[str, Any]:
    """Every row on every seed in ``folder`` (resuming what it holds); the table, verdict, report.md and figures."""
    started = time.perf_counter()
    run_dir = folder.path
    device = config.torch_device()
    save_config(config, run_dir / "config.yaml")
    command = command or f"divergent distill-lm --config {run_dir / 'config.yaml'}"
    setup = lm._setup(config, console, device, run_dir)
    console.print(f"run folder: {run_dir}")
    console.print(f"data: {setup.data_description}")
    prompts = _held_out_prompts(config, setup) if config.generation_prompts else None
    if prompts is not None:
        check_generation_fits(config, setup, prompts)
    scorer = None
    if config.reward and prompts is not None:
        from divergent.rl.rewards import RewardScorer, resolve_reward

        scorer = RewardScorer(resolve_reward(config.reward), timeout=config.reward_timeout)
    lm._check_run_data(config, setup, run_dir)
    folder.started()
    try:
        return _compare(config, setup, prompts, scorer, run_dir, device, console, command, started)
    finally:
        if scorer is not None:
            scorer.close()


def _compare(config, setup, prompts, scorer, run_dir, device, console, command, started) -> dict[str, Any]:
    teacher_row = lm._teacher_row(setup, config, device)
    teacher_greedy = None
    from divergent.models.hf import gives_logits

    # A teacher that only gives logits (several teachers mixed, one per domain) does not generate.
    if prompts is not None and setup.teacher is not None and not gives_logits(setup.teacher):
        teacher_greedy = _generate(setup.teacher, prompts, config, setup, config.seed, 0.0, device)
        teacher_row.update(_generation_metrics(setup.teacher, prompts, teacher_greedy, config, setup, config.seed,
                                               device, scorer))
    rows = comparison_rows(config)
    runs: list[dict[str, Any]] = []
    with report.progress(console=console) as bar:
        overall = bar.add_task("rows × seeds", total=len(rows) * len(config.seeds))
        for seed in config.seeds:
            seed_setup = _seed_setup(config, setup, seed)
            for row in rows:
                run_config = dataclasses.replace(config, seed=seed, on_policy_fraction=row.on_policy)
                seed_dir = run_dir / f"seed{seed}"
                try:
                    run = lm._train_row(run_config, seed_setup, row.name, row.divergence, seed_dir, device, console, bar)
                except RunInterrupted as exc:
                    raise lm.DistillInterrupted(run_dir, exc.step, exc.checkpoint) from None
                run = {**run, "name": row.name, "seed": seed, "on_policy": row.on_policy}
                if prompts is not None and run.get("status") == "finished":
                    folder = seed_dir / "runs" / lm._slug(row.name)
                    run = _with_generation(run, folder, lambda: _generation_metrics(
                        _load_student(run["model_dir"]).to(device), prompts, teacher_greedy, config, setup, seed,
                        device, scorer))
                runs.append(run)
                bar.advance(overall)
    return _report(config, setup, runs, teacher_row, prompts, run_dir, device, console, command, started)


def _report(config, setup, runs, teacher_row, prompts, run_dir: Path, device, console: Console, command: str,
            started: float) -> dict[str, Any]:
    n_eval, n_prompts = len(setup.eval), len(prompts.ids) if prompts is not None else 0
    primary, secondary, compared = _metrics(config, runs, n_eval, n_prompts)
    names = [r.name for r in comparison_rows(config)]
    baseline = baseline_row(config)
    references = {"": baseline, **({"_alone": ALONE} if config.include_scratch else {})}
    described = [k for k in _DESCRIBED if any(k in r for r in runs)]
    summary = verdict.summarise(runs, names, compared, references, described=described)
    answer = verdict.verdict(summary, runs, primary, secondary=secondary, baseline=baseline,
                             alone=ALONE if config.include_scratch else None)
    table, columns = _table(summary, teacher_row, primary, compared, baseline, config.include_scratch, described)
    note = verdict.table_note(answer.get("single_seed", False),
                              "one evaluation example (1/n of a mean over examples; a per-token loss's mean/n)",
                              extra="Lower loss and KL are better. ")
    title = f"distill-lm: {len(names)} rows × {len(config.seeds)} seeds, {config.steps} steps each"
    shown = [c for c in columns if c in _TERMINAL or (c.startswith("Δ") and "KL" not in c)]
    report.print_table(table, shown, title=title, console=console)
    console.print(note)
    console.print(answer["text"].replace("**", ""))

    report.write_csv([{k: v for k, v in r.items() if k not in ("history", "examples")} for r in runs],
                     run_dir / "results.csv")
    report.write_csv(summary, run_dir / "summary.csv")
    figures = _figures(runs, teacher_row, names, run_dir, config)
    seconds = time.perf_counter() - started
    resolutions = {m.key: m.resolution for m in compared}
    results = {"command": command, "config": config_to_dict(config), "data": setup.data_description,
               "teacher": teacher_row, "verdict": answer, "summary": summary, "runs": runs, "n_eval": n_eval,
               "n_prompts": n_prompts, "resolutions": resolutions, "figures": figures, "run_dir": str(run_dir),
               "total_seconds": seconds}
    write_json(results, run_dir / "results.json")
    _write_report(config, setup, run_dir, answer, table, columns, note, summary, teacher_row, runs, resolutions,
                  n_eval, n_prompts, figures, command, seconds, device)
    errors = sum(int(r.get("reward_errors", 0)) + int(r.get("reward_timeouts", 0)) for r in [teacher_row, *runs])
    if errors:
        console.print(f"[yellow]reward: {errors} generations scored 0 because the reward raised, returned something "
                      f"invalid or timed out (counted per run in results.csv)[/]")
    console.print(f"done in {seconds:.0f} s; results in {run_dir}")
    return results


def _figures(runs, teacher_row, names, run_dir: Path, config) -> dict[str, str]:
    from divergent.experiments.plots import plot_mean_band_panels, plot_mean_std_scatter

    finished = [r for r in runs if r.get("status") == "finished"]
    if not finished:
        return {}
    histories = {name: [r["history"] for r in finished if r["name"] == name] for name in names}
    histories = {k: v for k, v in histories.items() if v}
    figures = {"curves": str(run_dir / "curves.png")}
    references = {"eval_loss": ("teacher", teacher_row["loss"])} if teacher_row.get("loss") is not None else None
    plot_mean_band_panels(histories, [("eval_loss", "evaluation cross-entropy (nats/token)"),
                                      ("eval_kl_teacher", "KL(teacher ‖ student) (nats/token)")],
                          figures["curves"], x="step", xlabel="training step", references=references,
                          title="Evaluation curves")
    if config.generation_prompts and all("rouge_l" in r and "kl_teacher" in r for r in finished):
        figures["rouge_vs_kl"] = str(run_dir / "rouge_vs_kl.png")
        plot_mean_std_scatter([{"name": r["name"], "x": r["kl_teacher"], "y": r["rouge_l"]} for r in finished],
                              figures["rouge_vs_kl"], xlabel="KL(teacher ‖ student), nats/token — lower is better",
                              ylabel="ROUGE-L (greedy) vs reference — higher is better",
                              title="Generation quality against KL to the teacher", better="upper left")
    return figures


def _write_report(config, setup, run_dir: Path, answer, table, columns, note, summary, teacher_row, runs, resolutions,
                  n_eval, n_prompts, figures, command, seconds, device) -> None:
    seeds = ", ".join(map(str, config.seeds))
    intro = (f"Teacher: {setup.teacher_description}. Student: {config.student or 'default byte-level GPT ' + str(lm.STUDENT_CONFIG)}.\n"
             f"Data: {setup.data_description}.\n"
             f"{config.steps} steps per student (batch {config.batch_size} × {config.grad_accum}), on {device}; "
             f"{len(config.seeds)} seeds ({seeds}), the same evaluation examples ({n_eval}) for every row and seed. "
             f"Mean ± sample standard deviation over seeds.")
    one = (f"One evaluation example is {resolutions.get('loss', 0):.3g} nats of evaluation loss and "
           f"{resolutions.get('kl_teacher', 0):.3g} of KL (the student alone's mean over {n_eval} examples, divided "
           f"by {n_eval}: one example's share), 1/{n_eval} of top-1 agreement")
    if n_prompts:
        one += f", and 1/{n_prompts} = {1 / n_prompts:.4f} of ROUGE-L or reward (one of {n_prompts} held-out prompts)"
    results = f"{report.markdown_table(table, columns)}\n\n{note} {one}. This is a plain rule a reader can check, not a significance test."
    if n_prompts:
        results += (f"\n\nGeneration: {n_prompts} held-out prompts (the evaluation examples' prompts: everything before "
                    f"the first counted token, or the first {config.prompt_len} tokens of a text row), up to "
                    f"{config.max_new_tokens} new tokens, greedy and sampled (temperature "
                    f"{config.generation_temperature or 1.0}). ROUGE-L is the F-measure of `rouge-score` against the "
                    f"reference completion (the example's own continuation), and against the teacher's greedy "
                    f"generation; distinct-n counts distinct word n-grams among the sampled generations.")
        if config.reward:
            counts = {key: sum(int(r.get(key, 0)) for r in [teacher_row, *runs])
                      for key in ("reward_errors", "reward_timeouts", "reward_skipped")}
            results += (f" Reward `{config.reward}`: mean over the sampled generations (the reference completion is "
                        f"passed as `answer`). {counts['reward_errors']} generations scored 0 because the reward "
                        f"raised or returned something invalid, {counts['reward_timeouts']} because a call hit "
                        f"reward_timeout, {counts['reward_skipped']} had no reward (None) — teacher and students "
                        f"together; per run in results.csv.")
    figure_text = "Evaluation curves per row, mean over seeds with a ± one standard deviation band:\n\n![curves](curves.png)"
    if "rouge_vs_kl" in figures:
        figure_text += ("\n\nROUGE-L against KL to the teacher, mean ± std over seeds per row:\n\n"
                        "![ROUGE-L vs KL](rouge_vs_kl.png)")
    settings = "\n".join(f"- `{k}`: `{v}`" for k, v in config_to_dict(config).items())
    text = verdict.report_markdown("divergent distill-lm — which divergence", answer["text"], intro, [
        ("Why this regime", _regime_text(config, setup, summary, teacher_row)),
        ("Results", results + f"\n\nTotal wall time: {seconds:.0f} s."),
        ("Figures", figure_text),
        ("Reproduce", f"```\n{command}\n```\n\nEvery setting is in `config.yaml` in this folder."),
        ("Settings", settings)])
    atomic_write_text(run_dir / "report.md", text)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan
