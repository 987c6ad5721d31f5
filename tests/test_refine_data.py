"""`divergent refine-data` (MiniPLM difference sampling) against the official scoring, transcribed.

Reference: thu-coai/MiniPLM at commit ac2302f9a5512f91e839df310af8b5d052331cba —
``tools/process_data/tokenize_pile.py`` (a document is ``tokenizer.encode(doc,
add_special_tokens=False) + [eos_token_id]``), ``data_utils/lm_datasets.py`` ``LMDataset.collate``
(``input = ids[:-1]``, ``label = ids[1:]``, ``loss_mask = input != pad_id``), ``utils.py``
(``PAD_EOS_MODELS``: llama and every family it uses set ``pad_token_id = eos_token_id``),
``train_eval_utils/base_trainer.py`` ``_get_lm_loss_from_logits`` (per unit ``sum(CE * mask) /
sum(mask)``), ``scripts/miniplm/difference_sampling/compute_difference_scores.py``
(``diff_scores = small_scores - large_scores``: reference loss minus teacher loss) and
``construct_pretrain_data.py`` (sort descending, keep the first ``int(ratio * N)``, write them in
index order). The reference computation below is written from those files, in float64, one unit at a
time with no padding — not with the code under test.
"""

import json
import os
import csv

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from divergent.cli import app
from divergent.data.difference import select_top

pytest.importorskip("transformers")
import lm_helpers as H  # noqa: E402

TEXTS = [
    "the cat sat on the mat",
    "two plus two is four.",
    "zq xv kj wp",  # unusual for both models
    "hello, how are you today? </s> i am fine",  # an EOS inside: the prediction from it does not count
    "a quick brown fox",
    "numbers: one two three",
    "python reads like plain english.",
    "the dog sat on the log and the cat sat on the mat",
    "x",
]


def _official_loss(model, ids, eos):
    """Mean cross-entropy of one unit as MiniPLM's compute_lm_loss computes it, in float64."""
    ids = torch.tensor(ids)
    inputs, labels = ids[:-1], ids[1:]
    loss_mask = (inputs != eos).double()  # pad_token_id = eos_token_id (PAD_EOS_MODELS)
    with torch.no_grad():
        logits = model.double()(input_ids=inputs[None]).logits[0].double()
    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    return float((losses * loss_mask).sum() / loss_mask.sum())


def _official_scores(teacher, reference, teacher_tok, reference_tok, texts):
    scores = []
    for text in texts:
        t_ids = teacher_tok.encode(text, add_special_tokens=False) + [teacher_tok.eos_token_id]
        r_ids = reference_tok.encode(text, add_special_tokens=False) + [reference_tok.eos_token_id]
        scores.append(_official_loss(reference, r_ids, reference_tok.eos_token_id)
                      - _official_loss(teacher, t_ids, teacher_tok.eos_token_id))
    return np.array(scores)


@pytest.fixture
def models(tmp_path):
    """A teacher (hidden 48) and a reference (hidden 32, 1 layer) sharing the test tokenizer."""
    tok = H.tokenizer(300)
    teacher, reference = H.llama(len(tok), 48, 2, seed=1), H.llama(len(tok), 32, 1, seed=2)
    for name, model in (("teacher", teacher), ("reference", reference)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    return tmp_path / "teacher", tmp_path / "reference", teacher, reference, tok


def _run(args):
    threads = [] if "--resume" in args else ["--threads", "1"]
    return CliRunner().invoke(app, ["refine-data", *threads, *args])


def _run_dir(root):
    (run_dir,) = [p for p in root.iterdir() if p.name.startswith("refine-data-")]
    return run_dir


def _scores(run_dir):
    import pyarrow.parquet as pq

    return pq.read_table(run_dir / "scores.parquet").to_pydict()


def test_scores_equal_the_official_formula_and_the_top_half_is_kept_in_corpus_order(tmp_path, models):
    teacher_dir, reference_dir, teacher, reference, tok = models
    data = H.write_jsonl(tmp_path / "rows.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)])
    result = _run(["--teacher", str(teacher_dir), "--reference", str(reference_dir), "--data", str(data),
                   "--keep", "0.5", "--batch-tokens", "40", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    run_dir = _run_dir(tmp_path / "out")
    table = _scores(run_dir)
    expected = _official_scores(teacher, reference, tok, tok, TEXTS)
    np.testing.assert_allclose(table["score"], expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.array(table["teacher_logprob"]) - np.array(table["reference_logprob"]), expected, atol=2e-5)
    # int(0.5 * 9) = 4 kept, the largest official scores, written in corpus order
    top = sorted(np.argsort(-expected, kind="stable")[:4].tolist())
    assert [i for i, k in enumerate(table["kept"]) if k] == top
    lines = data.read_text().splitlines(keepends=True)
    assert (run_dir / "data.jsonl").read_text() == "".join(lines[i] for i in top)  # the rows byte for byte
    for name in ("scores.png", "report.md", "results.json", "config.yaml"):
        assert (run_dir / name).is_file()
    assert "rows in" in (run_dir / "report.md").read_text()


def test_the_eos_inside_a_row_masks_the_prediction_made_from_it(tmp_path, models):
    """Only the official mask (input != EOS) gives these numbers: counting every prediction does not."""
    teacher_dir, reference_dir, teacher, reference, tok = models
    text = TEXTS[3]
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    assert ids.count(tok.eos_token_id) == 2  # the EOS inside the text is one token
    data = H.write_jsonl(tmp_path / "rows.jsonl", [{"text": text}, {"text": TEXTS[0]}])
    assert _run(["--teacher", str(teacher_dir), "--reference", str(reference_dir), "--data", str(data),
                 "-o", str(tmp_path / "out")]).exit_code == 0
    table = _scores(_run_dir(tmp_path / "out"))
    official = _official_loss(teacher, ids, tok.eos_token_id)
    assert -table["teacher_logprob"][0] == pytest.approx(official, abs=2e-5)
    assert table["teacher_tokens"][0] == len(ids)


def test_select_top_breaks_ties_by_position_and_floors_the_count():
    scores = [0.3, 0.7, 0.3, 0.7, float("nan"), 0.3]
    assert select_top(scores, 0.5).tolist() == [False, True, False, True, False, False]  # int(0.5 * 5) = 2
    assert select_top(scores, 0.6).tolist() == [True, True, False, True, False, False]  # 3: the first 0.3
    assert select_top(scores, 1.0).sum() == 5  # the unscorable unit is never kept
    with pytest.raises(ValueError, match="keep must be a fraction in \\(0, 1\\]"):
        select_top(scores, 0.0)


def _write(path, rows):
    """Rows in the format of the file's suffix (or a save_to_disk folder)."""
    suffix = path.suffix
    if suffix == ".jsonl":
        H.write_jsonl(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))  # a mapping of columns
    elif suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".txt":
        path.write_text("".join(r["text"] + "\n" for r in rows))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json", "rows.csv", "rows.parquet", "rows.txt", "saved"])
def test_every_format_round_trips(tmp_path, models, name):
    from divergent.data.lm_data import read_rows

    teacher_dir, reference_dir, *_ = models
    rows = [{"text": t, "domain": "ab"[i % 2]} for i, t in enumerate(TEXTS)]
    if name.endswith(".txt"):
        rows = [{"text": r["text"]} for r in rows]
    data = _write(tmp_path / name, rows)
    result = _run(["--teacher", str(teacher_dir), "--reference", str(reference_dir), "--data", str(data),
                   "--keep", "0.5", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    run_dir = _run_dir(tmp_path / "out")
    kept = [i for i, k in enumerate(_scores(run_dir)["kept"]) if k]
    output = run_dir / ("data" if name == "saved" else f"data{data.suffix}")
    read = read_rows(output)
    assert read["train"] == [rows[i] for i in kept]
    if name == "saved":
        assert read["test"] == rows[:2]  # the other splits are kept as they were
    if "domain" in rows[0]:
        results = json.loads((run_dir / "results.json").read_text())
        assert [r["part"] for r in results["table"]] == ["all", "a", "b"]
        assert sum(r["rows kept"] for r in results["table"][1:]) == 4


def test_packing_scores_chunks_of_max_length_tokens(tmp_path, models):
    teacher_dir, reference_dir, teacher, reference, tok = models
    data = H.write_jsonl(tmp_path / "rows.jsonl", [{"text": t} for t in TEXTS])
    result = _run(["--teacher", str(teacher_dir), "--reference", str(reference_dir), "--data", str(data),
                   "--packing", "--max-length", "16", "--keep", "0.5", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    run_dir = _run_dir(tmp_path / "out")
    stream = [i for t in TEXTS for i in tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]]
    chunks = [stream[s:s + 16] for s in range(0, len(stream), 16)]
    chunks = [c for c in chunks if len(c) >= 2]
    expected = np.array([_official_loss(reference, c, tok.eos_token_id) - _official_loss(teacher, c, tok.eos_token_id)
                         for c in chunks])
    table = _scores(run_dir)
    assert table["chunk"] == list(range(len(chunks)))
    np.testing.assert_allclose(table["score"], expected, atol=2e-5)
    kept = [json.loads(line) for line in (run_dir / "data.jsonl").read_text().splitlines()]
    assert [k["chunk"] for k in kept] == sorted(np.argsort(-expected, kind="stable")[:len(chunks) // 2].tolist())
    first = kept[0]
    assert tok.encode(first["text"], add_special_tokens=False)[:4] == chunks[first["chunk"]][:4]


def test_different_tokenizers_each_score_the_text_with_their_own(tmp_path, models):
    teacher_dir, _, teacher, _, tok = models
    other = H.tokenizer(270)  # another vocabulary: ids differ
    assert other.get_vocab() != tok.get_vocab()
    reference = H.llama(len(other), 32, 1, seed=3)
    reference.save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    data = H.write_jsonl(tmp_path / "rows.jsonl", [{"text": t} for t in TEXTS])
    result = _run(["--teacher", str(teacher_dir), "--reference", str(tmp_path / "other"), "--data", str(data),
                   "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "different tokenizers" in result.output
    table = _scores(_run_dir(tmp_path / "out"))
    np.testing.assert_allclose(table["score"], _official_scores(teacher, reference, tok, other, TEXTS), atol=2e-5)
    assert table["teacher_tokens"] != table["reference_tokens"]


def test_resume_after_a_kill_gives_the_same_files(tmp_path, models, monkeypatch):
    from divergent.experiments import refine

    teacher_dir, reference_dir, *_ = models
    data = H.write_jsonl(tmp_path / "rows.jsonl", [{"text": t} for t in TEXTS * 3])
    args = ["--teacher", str(teacher_dir), "--reference", str(reference_dir), "--data", str(data),
            "--rows-per-shard", "4", "--keep", "0.3"]
    assert _run([*args, "-o", str(tmp_path / "whole")]).exit_code == 0
    whole = _run_dir(tmp_path / "whole")

    flushed = []
    real = refine._flush

    def killed_after_two_shards(*a, **k):
        if len(flushed) == 2:
            raise KeyboardInterrupt  # as SIGKILL: nothing after the second shard is written
        real(*a, **k)
        flushed.append(a[1])

    monkeypatch.setattr(refine, "_flush", killed_after_two_shards)
    assert _run([*args, "-o", str(tmp_path / "cut")]).exit_code != 0
    cut = _run_dir(tmp_path / "cut")
    assert sorted(p.name for p in (cut / "shards").iterdir()) == ["shard_000000.ckpt", "shard_000001.ckpt"]
    assert not (cut / "data.jsonl").exists() and not (cut / "scores.parquet").exists()  # nothing half-written
    monkeypatch.setattr(refine, "_flush", real)
    result = _run(["--resume", str(cut)])
    assert result.exit_code == 0, result.output
    assert "resuming: 2 shard(s)" in result.output
    for name in ("data.jsonl", "scores.parquet"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name

    # A corrupt shard on --resume: one line naming it, exit 2.
    shard = cut / "shards" / "shard_000001.ckpt"
    shard.write_bytes(shard.read_bytes()[:-10])
    result = _run(["--resume", str(cut)])
    assert result.exit_code == 2
    assert "shard_000001.ckpt is corrupt" in result.output and len(result.output.strip().splitlines()) == 1


def _error(result):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_bad_input_is_one_line_exit_2_and_leaves_no_run_folder(tmp_path, models):
    teacher_dir, reference_dir, *_ = models
    data = H.write_jsonl(tmp_path / "rows.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "out"
    both = ["--teacher", str(teacher_dir), "--reference", str(reference_dir)]
    for keep in ("0", "1.5", "-0.2"):
        assert "keep must be a fraction in (0, 1]" in _error(_run([*both, "--data", str(data), "--keep", keep, "-o", str(out)]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "holds no rows" in _error(_run([*both, "--data", str(empty), "-o", str(out)]))
    assert "not found" in _error(_run([*both, "--data", str(tmp_path / "missing.jsonl"), "-o", str(out)]))
    assert "--teacher" in _error(_run(["--teacher", str(tmp_path / "nope"), "--reference", str(reference_dir),
                                       "--data", str(data), "-o", str(out)]))
    # A reference without a tokenizer reads with the teacher's: its vocabulary must match.
    bare = H.llama(280, 32, 1)
    bare.save_pretrained(tmp_path / "bare")
    line = _error(_run(["--teacher", str(teacher_dir), "--reference", str(tmp_path / "bare"), "--data", str(data),
                        "-o", str(out)]))
    assert "vocabularies do not match" in line and "280" in line
    assert "keeps none" in _error(_run([*both, "--data", str(data), "--keep", "0.1", "-o", str(out)]))  # int(0.9) = 0
    assert "no column 'body'" in _error(_run([*both, "--data", str(data), "--text-column", "body", "-o", str(out)]))
    assert not out.exists() or not any(out.iterdir())


def _subprocess(args, tmp_path, nproc=1, timeout=240):
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"] \
        if nproc > 1 else [sys.executable, "-m"]
    env = {"PYTHONPATH": src, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
           "DIVERGENT_CACHE_DIR": os.environ["DIVERGENT_CACHE_DIR"]}
    return subprocess.run([*launcher, "divergent.cli", "refine-data", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_two_torchrun_processes_give_the_files_of_one(tmp_path, models):
    """torchrun (gloo, 2 CPU processes): each rank scores every other shard, rank 0 merges; the same bytes."""
    teacher_dir, reference_dir, *_ = models
    data = H.write_jsonl(tmp_path / "rows.jsonl", [{"text": t, "domain": "ab"[i % 2]} for i, t in enumerate(TEXTS * 3)])
    args = ["--teacher", str(teacher_dir), "--reference", str(reference_dir), "--data", str(data),
            "--rows-per-shard", "5", "--keep", "0.4", "--device", "cpu"]
    assert _run([*args, "-o", str(tmp_path / "one")]).exit_code == 0
    done = _subprocess([*args, "-o", str(tmp_path / "two")], tmp_path, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _run_dir(tmp_path / "one"), _run_dir(tmp_path / "two")
    assert len(list((two / "shards").iterdir())) == 6
    for name in ("data.jsonl", "scores.parquet"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name


def test_sigkill_then_resume_gives_the_bytes_of_an_uninterrupted_run(tmp_path, models):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    teacher_dir, reference_dir, *_ = models
    data = H.write_jsonl(tmp_path / "rows.jsonl", [{"text": f"{t} {i}"} for i, t in enumerate(TEXTS * 60)])
    args = ["--teacher", str(teacher_dir), "--reference", str(reference_dir), "--data", str(data),
            "--rows-per-shard", "6", "--keep", "0.5", "--device", "cpu", "--threads", "1"]
    assert _run([*args[:-2], "-o", str(tmp_path / "whole")]).exit_code == 0
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {"PYTHONPATH": src, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
           "DIVERGENT_CACHE_DIR": os.environ["DIVERGENT_CACHE_DIR"]}
    process = subprocess.Popen([sys.executable, "-m", "divergent.cli", "refine-data", *args, "-o", str(tmp_path / "cut")],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    shards = []
    while time.time() < deadline and process.poll() is None:
        runs = list((tmp_path / "cut").glob("refine-data-*/shards/shard_*.ckpt"))
        if len(runs) >= 3:
            shards = runs
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert shards, "the run ended before it could be killed"
    cut = _run_dir(tmp_path / "cut")
    assert not (cut / "data.jsonl").exists()  # killed while scoring: no output yet
    result = _run(["--resume", str(cut)])
    assert result.exit_code == 0, result.output
    whole = _run_dir(tmp_path / "whole")
    for name in ("data.jsonl", "scores.parquet"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name


def test_the_embedded_default_runs_with_no_data_and_counts_its_parts(tmp_path):
    """The default path at toy sizes (3 training steps per model): hard, easy and noise rows, a domain table."""
    result = _run(["--set", "teacher_steps=3", "--set", "reference_steps=3", "--set", "default_rows=400",
                   "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    run_dir = _run_dir(tmp_path / "out")
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["part"] for r in results["table"]] == ["all", "easy", "hard", "noise"]
    assert [r["rows in"] for r in results["table"]] == [400, 80, 240, 80]
    assert results["units_kept"] == 200 and len((run_dir / "data.jsonl").read_text().splitlines()) == 200
    assert "reference: training" in result.output
    again = _run(["--set", "teacher_steps=3", "--set", "reference_steps=3", "--set", "default_rows=40",
                  "-o", str(tmp_path / "again")])
    assert again.exit_code == 0 and "reference: loaded from cache" in again.output


@pytest.mark.slow
def test_the_default_selection_drops_the_noise(tmp_path):
    """The full default (4000 rows; teacher 1500 steps, reference 300; about a minute on 2 cores): the noise goes."""
    result = _run(["-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    table = {r["part"]: r for r in json.loads((_run_dir(tmp_path / "out") / "results.json").read_text())["table"]}
    assert table["noise"]["kept %"] < 2
    assert table["hard"]["kept %"] > 50


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet", ".txt", "saved"])
def test_packed_chunks_are_written_in_the_input_format(tmp_path, models, suffix):
    from divergent.data.lm_data import read_rows

    teacher_dir, reference_dir, *_ = models
    data = _write(tmp_path / ("saved" if suffix == "saved" else f"rows{suffix}"), [{"text": t} for t in TEXTS])
    result = _run(["--teacher", str(teacher_dir), "--reference", str(reference_dir), "--data", str(data),
                   "--packing", "--max-length", "16", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    run_dir = _run_dir(tmp_path / "out")
    kept = [i for i, k in enumerate(_scores(run_dir)["kept"]) if k]
    read = read_rows(run_dir / ("data" if suffix == "saved" else f"data{suffix}"))["train"]
    if suffix == ".txt":
        assert len(read) >= len(kept)  # a chunk's text may hold several lines
    else:
        assert [int(r["chunk"]) for r in read] == kept


def test_packing_with_different_tokenizers_scores_the_chunk_text_with_each(tmp_path, models):
    """A chunk is cut by the teacher's tokens; the reference reads its text: the pieces between the
    teacher's EOS tokens, each followed by the reference's own EOS where the teacher had one."""
    teacher_dir, _, teacher, _, tok = models
    other = H.tokenizer(270)
    reference = H.llama(len(other), 32, 1, seed=3)
    reference.save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    texts = TEXTS[:3] + TEXTS[4:8]  # no EOS inside a row
    data = H.write_jsonl(tmp_path / "rows.jsonl", [{"text": t} for t in texts])
    result = _run(["--teacher", str(teacher_dir), "--reference", str(tmp_path / "other"), "--data", str(data),
                   "--packing", "--max-length", "24", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    stream, owner = [], []
    for row, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        stream += ids
        owner += [(row, k) for k in range(len(ids))]
    expected = []
    for start in range(0, len(stream), 24):
        chunk = stream[start:start + 24]
        pieces, current = [], []
        for token in chunk:  # split at the teacher's EOS, decode each piece, re-encode with the reference's
            if token == tok.eos_token_id:
                pieces += other.encode(tok.decode(current), add_special_tokens=False) + [other.eos_token_id]
                current = []
            else:
                current.append(token)
        if current:
            pieces += other.encode(tok.decode(current), add_special_tokens=False)
        expected.append(_official_loss(reference, pieces, other.eos_token_id)
                        - _official_loss(teacher, chunk, tok.eos_token_id))
    np.testing.assert_allclose(_scores(_run_dir(tmp_path / "out"))["score"], expected, atol=2e-5)
