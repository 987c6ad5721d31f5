"""Compressed teacher caches: bit-packed ids, quantised log-probs and their KL bound, checked independently."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from divergent.data import cache_codec as codec
from divergent.data.teacher_cache import CorruptCacheError, TeacherCache, write_teacher_cache
from divergent.models.gpt import GPTConfig, TinyGPT


def _numpy_buckets(top):
    """Top-k probabilities and the tail 1 − Σ, in float64 numpy."""
    p = np.exp(np.asarray(top, dtype=np.float64))
    return np.concatenate([p, np.clip(1 - p.sum(-1, keepdims=True), 0, None)], -1)


def _numpy_kl(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)


@pytest.mark.parametrize("bits", [1, 3, 8, 9, 15, 17])
@pytest.mark.parametrize("n", [1, 5, 32])
def test_pack_unpack_round_trip_and_size(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    values = torch.randint(0, 1 << bits, (2, 3, n), generator=g)
    packed = codec.pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, math.ceil(n * bits / 8))
    assert torch.equal(codec.unpack_bits(packed, bits, n), values)


def test_id_bits_is_ceil_log2():
    assert [codec.id_bits(v) for v in (1, 2, 256, 257, 32000, 128256)] == [1, 1, 8, 9, 15, 17]


@pytest.mark.parametrize("bits", [4, 6, 8, 12])
def test_quantisation_error_is_within_its_kl_bound(bits):
    """KL(p ‖ p̂) over the k + 1 buckets, computed in numpy, never exceeds Δ²/8 at any token."""
    g = torch.Generator().manual_seed(bits)
    logits = torch.randn(400, 500, generator=g, dtype=torch.float64) * torch.linspace(0.5, 6, 400).unsqueeze(1)
    top = torch.log_softmax(logits, -1).topk(32, -1).values
    codes, lo = codec.quantize_logprobs(top, bits)
    assert int(codes.max()) < 1 << bits
    back = codec.dequantize_logprobs(codes, lo, bits)
    kl = _numpy_kl(_numpy_buckets(top.numpy()), _numpy_buckets(back.double().numpy()))
    bound = codec.kl_bound(lo, bits).numpy()
    assert (kl <= bound + 1e-9).all() and kl.max() > 0
    # the bound is of the order of the error: at most a few hundred times looser on these rows
    assert kl.max() > bound.max() / 300


def test_a_teacher_with_all_its_mass_in_the_top_k_keeps_a_zero_tail():
    top = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0, -2.0]], dtype=torch.float64), -1)  # k = V: tail 0
    codes, lo = codec.quantize_logprobs(top, 6)
    assert int(codes[0, -1]) == 0  # probability exactly 0
    back = codec.dequantize_logprobs(codes, lo, 6)
    assert float(torch.logsumexp(back.double(), -1)) == pytest.approx(0.0, abs=1e-6)


def test_bad_codec_input():
    with pytest.raises(ValueError, match=r"values must be in \[0, 7\]"):
        codec.pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="logprob_bits must be at least 2"):
        codec.quantize_logprobs(torch.zeros(1, 1), 1)
    with pytest.raises(ValueError, match="expected uint8"):
        codec.unpack_bits(torch.zeros(3, dtype=torch.uint8), 8, 4)


# ---------------------------------------------------------------- the cache


def _teacher():
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)).eval()


def _examples(n=12):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 300, (int(torch.randint(3, 11, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return rows


def test_compressed_cache_matches_the_uncompressed_one_within_its_bound(tmp_path):
    teacher, examples = _teacher(), _examples()
    common = dict(k=16, vocab_size=300, sequences_per_shard=5, batch_size=4)
    plain = write_teacher_cache(teacher, {"train": examples, "eval": examples[:2]}, tmp_path / "plain",
                                logprob_dtype="float32", **common)
    packed = write_teacher_cache(teacher, {"train": examples, "eval": examples[:2]}, tmp_path / "packed",
                                 logprob_bits=8, **common)
    assert packed["format_version"] == 3 and plain["format_version"] == 2
    assert packed["compression"]["index_bits"] == 9 and packed["bytes_per_token"] < plain["bytes_per_token"] / 1.8
    bound = packed["compression"]["kl_bound_max"]
    a, b = TeacherCache(tmp_path / "plain"), TeacherCache(tmp_path / "packed")
    for i in range(len(examples)):
        x, y = a.example(i), b.example(i)
        assert x["input_ids"] == y["input_ids"] and x["labels"] == y["labels"]
        assert torch.equal(x["teacher_indices"], y["teacher_indices"])
        kl = _numpy_kl(_numpy_buckets(x["teacher_logprobs"].numpy()), _numpy_buckets(y["teacher_logprobs"].numpy()))
        assert (kl <= bound + 1e-7).all()
    assert "log-probs 8 bits" in b.describe()
    # checksums still guard every shard
    shard = tmp_path / "packed" / packed["splits"]["train"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="SHA-256"):
        TeacherCache(tmp_path / "packed").example(0)


def test_unknown_or_incomplete_compressed_index_is_refused(tmp_path):
    write_teacher_cache(_teacher(), {"train": _examples(3)}, tmp_path / "c", k=4, vocab_size=300, logprob_bits=6)
    index_path = tmp_path / "c" / "index.json"
    index = json.loads(index_path.read_text())
    del index["compression"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCacheError, match="format_version 3.*'compression' entry"):
        TeacherCache(tmp_path / "c")
    with pytest.raises(ValueError, match=r"logprob_bits must be 0 \(no compression\) or an int in \[2, 16\], got 1"):
        write_teacher_cache(_teacher(), {"train": _examples(3)}, tmp_path / "d", k=4, vocab_size=300, logprob_bits=1)


def test_cli_writes_a_compressed_cache_and_distils_from_it(tmp_path):
    pytest.importorskip("transformers")
    from typer.testing import CliRunner

    import lm_helpers as H
    from divergent.cli import app

    teacher, student, _ = H.save_pair(tmp_path)
    data = H.write_jsonl(tmp_path / "pc.jsonl", H.prompt_completion_rows(12))
    cache = tmp_path / "cache"
    result = CliRunner().invoke(app, ["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--k", "8",
                                      "--logprob-bits", "8", "-o", str(cache)])
    assert result.exit_code == 0, result.output
    assert json.loads((cache / "index.json").read_text())["compression"]["logprob_bits"] == 8
    # (with kl_top: a TopK teacher read from a compressed cache picks its top k among the stored classes)
    run = CliRunner().invoke(app, ["distill-lm", "--teacher-cache", str(cache), "--student", str(student),
                                   "--steps", "2", "--batch-size", "4", "--threads", "1", "-d", "forward_kl,kl_top",
                                   "--set", "divergence_params={kl_top: {k: 4}}", "-o", str(tmp_path / "runs")])
    assert run.exit_code == 0, run.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    assert [(r["divergence"], r["status"]) for r in rows] == [("-", "finished"), ("forward_kl", "finished"),
                                                               ("kl_top", "finished")]
    bad = CliRunner().invoke(app, ["cache-teacher", "--teacher", str(teacher), "--data", str(data),
                                   "--logprob-bits", "1", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "logprob_bits must be 0 (no compression) or in [2, 16], got 1" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_an_interrupted_compressed_cache_resumes_to_the_same_cache(tmp_path):
    teacher, examples = _teacher(), _examples()
    calls = []

    def interrupted(ids, mask):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        with torch.no_grad():
            return teacher(ids)

    def whole(ids, mask):
        with torch.no_grad():
            return teacher(ids)

    common = dict(k=8, vocab_size=300, batch_size=2, sequences_per_shard=4, logprob_bits=6)
    with pytest.raises(KeyboardInterrupt):
        write_teacher_cache(interrupted, {"train": examples}, tmp_path / "c", **common)
    resumed = write_teacher_cache(whole, {"train": examples}, tmp_path / "c", resume=True, **common)
    straight = write_teacher_cache(whole, {"train": examples}, tmp_path / "w", **common)
    assert resumed["compression"] == straight["compression"]
    assert [s["sha256"] for s in resumed["splits"]["train"]] == [s["sha256"] for s in straight["splits"]["train"]]
