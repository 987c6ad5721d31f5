"""``divergent dpo``: f-DPO on the user's causal LM and preference data.

The model (a local ``save_pretrained`` folder with its tokenizer) is trained with
:class:`divergent.train.preference.PreferenceTrainer` against a frozen copy of itself
(the reference) on ``{"prompt", "chosen", "rejected"}`` rows (:mod:`divergent.data.preference`),
with the divergence of f-DPO: ``reverse_kl`` (standard DPO), ``forward_kl``, ``js`` or
``alpha``. Before and after training it is evaluated on held-out pairs: preference accuracy
(share of pairs whose chosen implicit reward beta·psi(pi/pi_ref) is above the rejected one's),
the mean reward margin, the mean chosen and rejected rewards and the loss. Writes
``results.json``/``results.csv``, ``report.md`` and the trained model with
``save_pretrained`` (and its tokenizer) in ``RUN_DIR/model`` at each checkpoint and at the end.

Python API::

    from divergent.experiments.dpo import DPOConfig, run_dpo
    results = run_dpo(DPOConfig(model="my-model", data="pairs.jsonl", divergence="js", steps=200))
"""

from __future__ import annotations

import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from divergent.config import config_to_dict, load_run_config, save_config
from divergent.experiments import report
from divergent.io import atomic_write_text, read_json, write_json
from divergent.train.preference import PreferenceConfig
from divergent.train.run import Checkpointer, RunInterrupted, drive

__all__ = ["DPOConfig", "run_dpo", "resume_dpo", "COLUMNS"]

COLUMNS = ["model", "accuracy", "margin", "chosen_reward", "rejected_reward", "loss"]


@dataclass
class DPOConfig:
    """Settings of ``divergent dpo`` (every key can be set in YAML or with ``--set``).

    model: local folder of the model to train (save_pretrained, with its tokenizer); the
        reference is a frozen copy of it.
    data: preference rows: .jsonl/.json/.csv/.parquet or a save_to_disk folder (see
        divergent.data.preference for the row formats).
    eval_data: held-out pairs in the same formats; "" = the data's validation/test split, else
        a held-out eval_fraction of its rows.
    eval_fraction: fraction of the rows held out for evaluation when there is no eval_data.
    max_eval_pairs: evaluation pairs used (the first ones).
    max_length: tokens of prompt + response; longer sequences are cut (and counted in the report).
    divergence: reverse_kl (standard DPO), forward_kl, js or alpha.
    alpha: order of the alpha divergence, 0 < alpha < 1 (TRL's f_alpha_divergence_coef = 1 - alpha).
    beta: f-DPO temperature beta; implicit reward = beta * psi(pi / pi_ref).
    steps: optimisation steps.
    batch_size: preference pairs per step.
    lr: AdamW learning rate (constant; TRL's DPO default is 1e-6).
    grad_clip: gradient-norm clipping (0 = off).
    eval_batch_size: pairs per evaluation forward pass.
    checkpoint_every: steps between checkpoints (and save_pretrained exports of the model).
    keep_checkpoints: checkpoints kept.
    seed: seed of the split and the order of the pairs.
    device: cpu, cuda, cuda:N or auto.
    num_threads: CPU threads for torch (0 = torch's default).
    output_dir: folder in which the run folder is created.
    """

    model: str = ""
    data: str = ""
    eval_data: str = ""
    eval_fraction: float = 0.1
    max_eval_pairs: int = 256
    max_length: int = 512
    divergence: str = "reverse_kl"
    alpha: float = 0.5
    beta: float = 0.1
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-6
    grad_clip: float = 1.0
    eval_batch_size: int = 16
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0
    output_dir: str = "runs"

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required: --model PATH (a local save_pretrained folder with its tokenizer)")
        if not self.data:
            raise ValueError("data is required: --data FILE (rows of 'prompt', 'chosen', 'rejected')")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        for name in ("max_eval_pairs", "eval_batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
        self.trainer_config()  # the divergence, beta, alpha, steps, ... fail here, naming themselves

    def trainer_config(self) -> PreferenceConfig:
        return PreferenceConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, beta=self.beta,
                                divergence=self.divergence, alpha=self.alpha, grad_clip=self.grad_clip, seed=self.seed)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if not torch.cuda.is_available() and self.device.startswith("cuda"):
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available; use cpu or auto")
        return torch.device(self.device)


class DPOInterrupted(RunInterrupted):
    """Ctrl-C during ``divergent dpo``; the state is saved and the message gives the resume command."""

    def __init__(self, run_dir: Path, step: int, checkpoint: Path | None) -> None:
        super().__init__(step, checkpoint, f"interrupted after step {step} (saved {checkpoint}); resume with: "
                                           f"divergent dpo --resume {shlex.quote(str(run_dir))}")


def run_dpo(config: DPOConfig, *, run_dir: str | Path | None = None, console: Console | None = None,
            command: str | None = None) -> dict[str, Any]:
    """Run (or, when ``run_dir`` holds a partial run, resume) ``divergent dpo``; returns the results dict."""
    console = console or report.output_console()
    previous = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        with report.run_folder(config.output_dir, "dpo", resume=run_dir) as folder:
            return _run(config, folder, console, command)
    finally:
        torch.set_num_threads(previous)


def resume_dpo(run_dir: str | Path, *, console: Console | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` with its own saved ``config.yaml``."""
    run_dir = Path(run_dir)
    config = load_run_config(DPOConfig, run_dir)
    return run_dpo(config, run_dir=run_dir, console=console,
                   command=f"divergent dpo --resume {shlex.quote(str(run_dir))}")


def _run(config: DPOConfig, folder: report.RunFolder, console: Console, command: str | None) -> dict[str, Any]:
    from divergent.data.lm_data import is_byte_tokenizer
    from divergent.data.preference import load_preference_data
    from divergent.experiments.lm import _hash, _pad_id, _tokenizer_for
    from divergent.models.hf import load_causal_lm, save_pretrained
    from divergent.train.preference import PreferenceTrainer

    started = time.perf_counter()
    run_dir = folder.path
    if (run_dir / "results.json").is_file():
        console.print(f"{run_dir} is finished; its results are in {run_dir / 'results.json'}")
        return read_json(run_dir / "results.json", "results file")
    device = config.torch_device()
    model = load_causal_lm(config.model, what="--model")
    tokenizer = _tokenizer_for(config.model, "--model", model)
    data = load_preference_data(config.data, tokenizer, eval_data=config.eval_data or None,
                                eval_fraction=config.eval_fraction, max_length=config.max_length, seed=config.seed,
                                max_eval_pairs=config.max_eval_pairs)
    save_config(config, run_dir / "config.yaml")
    command = command or f"divergent dpo --config {shlex.quote(str(run_dir / 'config.yaml'))}"
    fingerprint = {"config": _hash({k: v for k, v in config_to_dict(config).items()
                                    if k not in ("output_dir", "num_threads", "device")}),
                   "train": _hash(data.train), "eval": _hash(data.eval)}
    data_file = run_dir / "data.json"
    if data_file.is_file():
        if read_json(data_file, "run data fingerprint") != fingerprint:
            raise ValueError(f"the data or settings differ from those {run_dir} was started with ({data_file}); "
                             f"start a new run instead of resuming this one")
    else:
        write_json(fingerprint, data_file)
    folder.started()
    console.print(f"run folder: {run_dir}")
    console.print(f"data: {data.describe()}")

    trainer = PreferenceTrainer(model, data.train, config.trainer_config(), pad_id=_pad_id(tokenizer), device=device)
    before_file = run_dir / "before.json"
    if before_file.is_file():
        before = read_json(before_file, "evaluation of the initial model")
    else:
        before = trainer.evaluate(data.eval, batch_size=config.eval_batch_size)
        write_json(before, before_file)
    hf_tokenizer = None if is_byte_tokenizer(tokenizer) else tokenizer
    model_dir = run_dir / "model"

    def export(step: int, path: Path) -> None:
        save_pretrained(trainer.policy, model_dir, tokenizer=hf_tokenizer)

    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.keep_checkpoints, on_save=export)
    train_started = time.perf_counter()
    with report.progress(console=console) as bar:
        task = bar.add_task(f"f-DPO ({config.divergence})", total=config.steps)
        try:
            drive(trainer, checkpointer=checkpointer, checkpoint_every=config.checkpoint_every, resume=True,
                  on_step=lambda record: bar.update(task, completed=record["step"]))
        except RunInterrupted as exc:
            raise DPOInterrupted(run_dir, exc.step, exc.checkpoint) from None
    train_seconds = time.perf_counter() - train_started
    after = trainer.evaluate(data.eval, batch_size=config.eval_batch_size)
    if not model_dir.is_dir():  # a resumed run that had already reached its last step
        export(trainer.step_index, run_dir)

    table = [{"model": "initial (= reference)", **before}, {"model": f"after {config.steps} steps", **after}]
    title = f"f-DPO ({config.divergence}, beta={config.beta:g}) on {Path(config.data).name}: held-out pairs"
    report.print_table(table, COLUMNS, title=title, console=console)
    report.write_csv([{c: row.get(c) for c in COLUMNS} for row in table], run_dir / "results.csv")
    seconds = time.perf_counter() - started
    results = {"command": command, "config": config_to_dict(config), "data": data.describe(),
               "data_stats": {"train": data.train_stats.__dict__, "eval": data.eval_stats.__dict__},
               "before": before, "after": after, "history": trainer.history, "model_dir": str(model_dir),
               "run_dir": str(run_dir), "train_seconds": train_seconds, "total_seconds": seconds}
    _write_report(run_dir, config, data, table, command, seconds, device)
    write_json(results, run_dir / "results.json")  # last: its presence marks the run finished
    # The trained model is in model_dir and the numbers in results.json; the optimiser states go.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for split, stats in (("training", data.train_stats), ("evaluation", data.eval_stats)):
        if stats.truncated or stats.skipped_nothing_to_learn:
            console.print(f"{split} data: {stats.truncated} pairs truncated to {config.max_length} tokens, "
                          f"{stats.skipped_nothing_to_learn} skipped with no response left")
    console.print(f"done in {seconds:.0f} s; results in {run_dir}, the trained model in {model_dir}")
    return results


def _write_report(run_dir: Path, config: DPOConfig, data, table: list[dict[str, Any]], command: str,
                  seconds: float, device: torch.device) -> None:
    stats = "".join(
        f"- {split}: {s.rows} rows ({s.format}) → {s.used} pairs; **{s.truncated} truncated** to {config.max_length} "
        f"tokens, **{s.skipped_nothing_to_learn} skipped** with no response left; {s.counted_tokens} response tokens\n"
        for split, s in (("training", data.train_stats), ("evaluation", data.eval_stats)))
    divergence = config.divergence + (f" (alpha = {config.alpha:g})" if config.divergence == "alpha" else "")
    text = f"""# divergent dpo

Model: {config.model}; reference: a frozen copy of it. Data: {config.data}.
f-DPO with {divergence}, beta = {config.beta:g}; {config.steps} steps of {config.batch_size} pairs, lr {config.lr:g},
on {device}.

## Held-out pairs

{report.markdown_table(table, COLUMNS)}

Implicit reward of a response: beta · psi(pi_theta(y|x) / pi_ref(y|x)), with psi = f' of the divergence
(reverse_kl: log u, standard DPO). accuracy: share of pairs whose chosen reward is above the rejected one's
(at the initial model every reward is 0, so it is 0); margin: mean chosen − rejected reward; loss: the
f-DPO loss −log σ(margin) averaged over the pairs (log 2 at the initial model).
The trained model is in `model/` (save_pretrained, with the tokenizer).

## Data

{stats}
## Reproduce

```
{command}
```

Total wall time {seconds:.0f} s.
"""
    atomic_write_text(run_dir / "report.md", text)
