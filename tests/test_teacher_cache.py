"""Offline top-k teacher cache: round trip, bytes/token, corruption detection."""

import json

import pytest
import torch

import divergent.functional as F
from divergent.data.teacher_cache import CorruptCacheError, TeacherCache, write_teacher_cache
from divergent.functional.topk import TopK
from divergent.models.gpt import GPTConfig, TinyGPT


def _teacher():
    return TinyGPT(GPTConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)).eval()


def _batches(n_batches=3, batch=4, seq=10, vocab=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, vocab, (batch, seq), generator=gen), torch.randint(0, vocab, (batch, seq), generator=gen))
        for _ in range(n_batches)
    ]


def _write(tmp_path, k=8, per_shard=5, logprob_dtype="float32"):
    teacher = _teacher()
    batches = _batches()
    index = write_teacher_cache(
        teacher, batches, tmp_path / "cache", k=k, vocab_size=64,
        sequences_per_shard=per_shard, logprob_dtype=logprob_dtype,
    )
    return teacher, batches, index


def test_round_trip_gives_the_teachers_topk(tmp_path):
    teacher, batches, index = _write(tmp_path)
    cache = TeacherCache(tmp_path / "cache")
    assert len(cache) == 12 and index["total_tokens"] == 120 and len(index["shards"]) == 2
    ids, labels, sparse = cache.get(range(4, 9))
    want_ids = torch.cat([b[0] for b in batches])[4:9]
    want_labels = torch.cat([b[1] for b in batches])[4:9]
    assert torch.equal(ids, want_ids) and torch.equal(labels, want_labels)
    with torch.no_grad():
        expected = TopK.from_logits(teacher(want_ids), k=8)
    assert torch.equal(sparse.indices, expected.indices)
    torch.testing.assert_close(sparse.logprobs, expected.logprobs)
    # Reading the cache gives the same divergence as running the teacher.
    student = torch.randn(5, 10, 64)
    torch.testing.assert_close(F.divergence("js", student, sparse), F.divergence("js", student, expected))
    assert sum(b[0].shape[0] for b in cache.batches(5)) == 12


def test_bytes_per_token_is_reported_and_matches_files(tmp_path):
    _, _, index = _write(tmp_path, k=8, logprob_dtype="float16")
    files = sorted((tmp_path / "cache").glob("shard_*.safetensors"))
    assert index["total_bytes"] == sum(f.stat().st_size for f in files)
    assert index["bytes_per_token"] == pytest.approx(index["total_bytes"] / 120)
    # k * (int16 id + float16 log-prob) + int16 input id + int16 label = 36 bytes, plus headers.
    assert 36 <= index["bytes_per_token"] < 60
    assert TeacherCache(tmp_path / "cache").bytes_per_token == index["bytes_per_token"]


def test_truncated_shard_is_detected(tmp_path):
    _write(tmp_path)
    shard = tmp_path / "cache" / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    cache = TeacherCache(tmp_path / "cache")
    cache.get([0])  # the intact first shard still reads
    with pytest.raises(CorruptCacheError, match="shard_00001.*truncated"):
        cache.get([11])


def test_corrupted_shard_is_detected(tmp_path):
    _write(tmp_path)
    shard = tmp_path / "cache" / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="SHA-256"):
        TeacherCache(tmp_path / "cache").verify_all()


def test_missing_index_and_bad_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        TeacherCache(tmp_path)
    _write(tmp_path)
    index_path = tmp_path / "cache" / "index.json"
    index_path.write_text(index_path.read_text()[:50])
    with pytest.raises(CorruptCacheError, match="not valid JSON"):
        TeacherCache(tmp_path / "cache")


def test_missing_shard_and_wrong_version(tmp_path):
    _write(tmp_path)
    (tmp_path / "cache" / "shard_00000.safetensors").unlink()
    with pytest.raises(CorruptCacheError, match="missing"):
        TeacherCache(tmp_path / "cache").get([0])
    index_path = tmp_path / "cache" / "index.json"
    index = json.loads(index_path.read_text())
    index["format_version"] = 99
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCacheError, match="format_version"):
        TeacherCache(tmp_path / "cache")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="k must be"):
        write_teacher_cache(_teacher(), _batches(), tmp_path, k=0, vocab_size=64)
    with pytest.raises(ValueError, match="logprob_dtype"):
        write_teacher_cache(_teacher(), _batches(), tmp_path, k=4, vocab_size=64, logprob_dtype="int8")
