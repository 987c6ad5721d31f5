"""Every fenced Python and shell block of README.md, CONTRIBUTING.md and docs/*.md runs as written.

Files are found by glob, so a new page under docs/ is covered without touching this test.
Blocks are read as follows:

- ```python / ```py blocks of one file run in order in one namespace (as a reader pastes them
  into one session), in a fresh temporary folder, with the names a reader brings (their
  models, data, hidden states) made tiny by the file's PRELUDE below and the CI-sized
  substitutions of PYTHON_SUBSTITUTIONS. Registrations a block makes are undone afterwards.
- ```bash / ```sh / ```shell / ```console blocks: one command per line (``\\`` continues a
  line, ``#`` starts a comment). Every ``divergent ...`` command is parsed by the CLI with
  ``--help`` appended (fast: an unknown command or option fails). Running them is slow
  (``--runslow``): each runs with the CI-sized settings of CLI_SUBSTITUTIONS, unless it
  matches a pattern of SHELL_SKIPS (each with its reason).
- Unlabelled blocks are output or file listings and are not run; a command block must be
  labelled (``test_command_blocks_are_labelled`` fails on an unlabelled ``divergent`` line).

To keep a block out, put an HTML comment on the line right before its fence, with the reason:

    <!-- doc-test: skip needs a GPU -->

``skip`` leaves the block out (a Python block still has its ``import`` lines run, so an
import the example needs cannot go missing); ``slow`` runs it only with ``--runslow``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted({ROOT / "README.md", ROOT / "CONTRIBUTING.md", *ROOT.glob("docs/**/*.md")})
PYTHON = ("python", "py", "python3")
SHELL = ("bash", "sh", "shell", "console")
_MARKER = re.compile(r"<!--\s*doc-test:\s*(skip|slow)\s+(.+?)\s*-->")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    marker: tuple[str, str] | None  # ("skip" | "slow", reason)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_blocks(path: Path) -> list[Block]:
    lines = path.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        opening = re.match(r"^\s*```\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.search(previous)
        blocks.append(Block(path, start + 1, opening.group(1).lower(), "\n".join(body) + "\n",
                            (marker.group(1), marker.group(2)) if marker else None))
        i += 1
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in doc_blocks(path)]


# ---------------------------------------------------------------- Python blocks

# CI-sized stand-ins for what a reader brings: ``{file name: code run before its first block}``.
_LLM_PRELUDE = """
import sys, torch
sys.path.insert(0, {tests!r})
import lm_helpers as H
_tok = H.tokenizer()
teacher, student = H.llama(len(_tok), 48, 2, seed=1), H.llama(len(_tok), 32, 1, seed=0)
teacher.save_pretrained("teacher"); _tok.save_pretrained("teacher")
student.save_pretrained("student"); _tok.save_pretrained("student")
rows, dev_rows = H.chat_rows(8), H.chat_rows(4)
from divergent.data.lm_data import load_lm_data
examples = load_lm_data(H.write_jsonl(__import__("pathlib").Path("chat.jsonl"), rows), _tok, max_length=64).train
student_lm_head, teacher_lm_head = student.lm_head, teacher.lm_head
student_hidden = torch.randn(6, student_lm_head.weight.shape[1], requires_grad=True)
teacher_hidden = torch.randn(6, teacher_lm_head.weight.shape[1])
labels = torch.randint(0, len(_tok), (6,))
global_token_count = 6
""".format(tests=str(Path(__file__).resolve().parent))

PRELUDE = {"llm.md": _LLM_PRELUDE}

# (old, new, why): each `old` must occur in its file's Python blocks (a substitution cannot rot silently).
PYTHON_SUBSTITUTIONS = {
    "compare.md": [("epochs=30", "epochs=1", "CI time: one epoch of teacher and student")],
    "llm.md": [("steps=500", "steps=2", "CI time"), ("max_steps=2000", "max_steps=1", "CI time"),
               ("max_length=1024", "max_length=64", "CI time"),
               ("gradient_accumulation_steps=4", "gradient_accumulation_steps=1", "CI time"),
               ("per_device_train_batch_size=8", "per_device_train_batch_size=2", "CI time")],
}

PYTHON_FILES = sorted({b.path for b in ALL_BLOCKS if b.language in PYTHON}, key=str)


def _imports_only(code: str) -> str:
    """The block's top-level import lines (a skipped block need not parse: it may elide arguments with ...)."""
    return "\n".join(line for line in code.split("\n") if re.match(r"(import|from) \w", line))


def _user_registrations():
    import divergent as dv
    from divergent.methods.registry import available_methods, get_method
    from divergent.rl import available_regularisers, get_regulariser

    return (
        {n for n in dv.available() if not dv.get_spec(n).builtin},
        {n for n in available_methods() if not get_method(n).builtin},
        {n for n in available_regularisers() if not getattr(get_regulariser(n), "builtin", True)},
    )


def _undo_registrations(before) -> None:
    from divergent.functional.registry import unregister_divergence
    from divergent.methods.registry import unregister_method
    from divergent.rl import unregister_regulariser

    after = _user_registrations()
    for names, undo in zip((a - b for a, b in zip(after, before)), (unregister_divergence, unregister_method,
                                                                    unregister_regulariser)):
        for name in names:
            undo(name)


@pytest.mark.parametrize("path", PYTHON_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, tmp_path, monkeypatch, request):
    blocks = [b for b in doc_blocks(path) if b.language in PYTHON]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIVERGENT_CACHE_DIR", str(tmp_path / "cache"))
    run_slow = os.environ.get("DIVERGENT_SLOW") == "1" or request.config.getoption("--runslow")
    substitutions = PYTHON_SUBSTITUTIONS.get(path.name, [])
    text = "".join(b.code for b in blocks)
    for old, _, why in substitutions:
        assert old in text, f"{path.name}: substitution {old!r} ({why}) no longer matches any block"
    namespace: dict = {"__name__": "__doc_example__"}
    before = _user_registrations()
    try:
        if path.name in PRELUDE and any(b.marker is None for b in blocks):
            exec(compile(PRELUDE[path.name], f"<prelude of {path.name}>", "exec"), namespace)
        for block in blocks:
            code = block.code
            for old, new, _ in substitutions:
                code = code.replace(old, new)
            if block.marker is not None and (block.marker[0] == "skip" or not run_slow):
                code = _imports_only(code)  # its imports must still work
            try:
                exec(compile(code, block.where, "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{block.where}: the block fails: {type(exc).__name__}: {exc}") from exc
    finally:
        _undo_registrations(before)


# ---------------------------------------------------------------- shell blocks


def _commands(block: Block) -> list[tuple[int, str]]:
    """``(line, command)`` of a shell block: continuations joined, comments and blank lines dropped."""
    out, pending, first = [], "", 0
    for offset, line in enumerate(block.code.split("\n")):
        if not pending:
            first = block.line + 1 + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = shlex.join(shlex.split(pending + line, comments=True))
        pending = ""
        if command:
            out.append((first, command))
    return out


# Commands not run, by pattern (matched against the command), each with its reason.
SHELL_SKIPS = [
    (r"^pip |^python3? -m pip ", "installs packages (and runs the whole test suite)"),
    (r"^python3? -m pytest ", "runs test files, which the suite runs itself"),
    (r"^bash benchmarks/gpu_session.sh", "the GPU session script (docs/gpu.md), run on a GPU machine"),
    (r"^torchrun ", "starts several processes; tests/test_classifier_ddp.py and test_lm_distributed.py run them"),
    (r"--resume runs/", "continues a run folder of the reader's own earlier run"),
    (r"--data-dir", "needs the CIFAR release on disk (and a GPU for its recipe)"),
    (r"--data (features|images|table)|--data photos/|--teacher teacher\.|my_models:", "the reader's own data and models "
     "(tests/test_compare_user_data.py runs each kind on generated files)"),
    (r"(--model|--teacher|--student) \./?my-|--model my-model|my_grpo.yaml|my-run.yaml", "the reader's own model or "
     "settings file (tests/test_rl_user.py, test_dpo_cli.py and test_lm_cli.py run each on tiny generated ones)"),
    (r"^(?!.*HOST).*(--cross-tokenizer|--teacher \./other-family)", "the reader's own models with two tokenizers "
     "(tests/test_cross_tokenizer_cli.py, test_cross_tokenizer_gold_train.py and test_cross_tokenizer_teachers.py run "
     "these commands, cache-teacher then distill-lm included, on tiny generated ones)"),
    (r"--teacher \./teacher|--teacher-cache \./teacher-cache", "the reader's own teacher and data (tests/test_lm_cli.py runs "
     "the same commands on tiny generated models and files)"),
    (r" \.\.\. ", "elides its other options (`...`)"),
    (r"--teacher \./qwen", "the reader's own teacher and reference models and corpus "
     "(tests/test_refine_data.py and test_cross_tokenizer_cli.py run the same commands on tiny generated ones)"),
    (r"--teacher http://HOST", "needs a running vLLM/SGLang server (tests/test_served_teacher.py, and across "
     "tokenizers test_cross_tokenizer_teachers.py, run these commands against a 127.0.0.1 server answering in vLLM's "
     "and SGLang's JSON)"),
]

# CI-sized settings of each run command: the command's own option or --set for the key is replaced
# by ``--set key=value`` (an option and a --set for one key would be refused as given twice).
CLI_SUBSTITUTIONS = {
    "compare": {"seeds": "[0]", "epochs": "1", "teacher_epochs": "1"},
    "distill-lm": {"steps": "2", "teacher_steps": "2", "max_train_bytes": "20000", "max_val_bytes": "4000",
                   "max_eval_examples": "4"},
    "rl": {"steps": "2", "warm_steps": "3", "seeds": "[0]", "eval_samples": "4", "max_operand": "9", "n_test": "8"},
}


def ci_sized(args: list[str]) -> list[str]:
    """``args`` with CLI_SUBSTITUTIONS applied for their subcommand."""
    subcommand = next((a for a in args if not a.startswith("-")), "")
    sizes = CLI_SUBSTITUTIONS.get(subcommand, {})
    out, i = [], 0
    while i < len(args):
        word = args[i]
        value = args[i + 1] if i + 1 < len(args) else ""
        if word.startswith("--") and word[2:].replace("-", "_") in sizes:
            i += 2
            continue
        if word == "--set" and value.split("=")[0] in sizes:
            i += 2
            continue
        out.append(word)
        i += 1
    return out + [item for key, value in sizes.items() for item in ("--set", f"{key}={value}")]


SHELL_COMMANDS = [(block, line, command) for block in ALL_BLOCKS if block.language in SHELL
                  for line, command in _commands(block)]


def _skip_reason(block: Block, command: str) -> str | None:
    if block.marker is not None and block.marker[0] == "skip":
        return block.marker[1]
    return next((reason for pattern, reason in SHELL_SKIPS if re.search(pattern, command)), None)


def _cli_args(command: str) -> list[str] | None:
    words = shlex.split(command)
    if words[:1] != ["divergent"]:
        return None
    return words[1:]


@pytest.mark.parametrize("block,line,command", [c for c in SHELL_COMMANDS if _cli_args(c[2]) is not None],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_divergent_command_parses(block, line, command):
    """Its command and options exist (``--help`` appended stops before running; an unknown option still fails)."""
    from typer.testing import CliRunner

    from divergent.cli import app

    args = _cli_args(command)
    if "..." in args:
        args = [a for a in args if a != "..."]
    if any(a.startswith("--plugin") for a in args):
        pytest.skip("imports the reader's plugin module (tests/test_probed_edges.py runs the README's one)")
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, f"{block.where} (line {line}): `{command}` does not parse:\n{result.output}"


@pytest.mark.slow
@pytest.mark.parametrize("block,line,command", SHELL_COMMANDS, ids=lambda v: v if isinstance(v, str) else "")
def test_shell_commands_run(block, line, command, tmp_path):
    reason = _skip_reason(block, command)
    if reason is not None:
        pytest.skip(f"{block.where} line {line}: {reason}")
    args = _cli_args(command)
    if args is None:
        pytest.skip(f"{block.where} line {line}: not a divergent command (no runner for it here)")
    args = ci_sized(args)
    env = {**os.environ, "DIVERGENT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]  # the repository's shipped configs
    done = subprocess.run([sys.executable, "-m", "divergent.cli", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"{block.where} line {line}: `{command}` failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


# ---------------------------------------------------------------- the reading rules themselves


def test_command_blocks_are_labelled():
    """An unlabelled block is read as output; one that holds a divergent command must say ```bash."""
    unlabelled = [b.where for b in ALL_BLOCKS if not b.language
                  and any(line.startswith("divergent ") for line in b.code.split("\n"))]
    assert not unlabelled, f"label these command blocks ```bash: {unlabelled}"


def test_markers_are_read(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- doc-test: skip needs a GPU -->\n```python\nx = 1\n```\n\n```bash\ndivergent rl \\\n"
                    "  --steps 2   # two\n\ndivergent compare\n```\n")
    python, shell = doc_blocks(page)
    assert python.marker == ("skip", "needs a GPU") and python.language == "python" and python.line == 4
    assert shell.marker is None and _commands(shell) == [(9, "divergent rl --steps 2"), (12, "divergent compare")]
    assert ci_sized(["compare", "-d", "js", "--epochs", "50", "--set", "seeds=[0,1]"]) == [
        "compare", "-d", "js", "--set", "seeds=[0]", "--set", "epochs=1", "--set", "teacher_epochs=1"]
