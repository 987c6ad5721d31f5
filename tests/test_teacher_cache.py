"""Offline top-k teacher cache: round trip against the teacher, bytes/token, resume, corruption detection."""

import json

import pytest
import torch

import divergent.functional as F
from divergent.data.teacher_cache import CorruptCacheError, TeacherCache, teacher_topk, write_teacher_cache
from divergent.functional.topk import TopK
from divergent.io import CorruptFileError
from divergent.models.gpt import GPTConfig, TinyGPT


def _teacher():
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)).eval()


def _examples(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 11, (1,), generator=gen))
        ids = torch.randint(0, 64, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return rows


def _write(tmp_path, k=8, per_shard=5, logprob_dtype="float32", **kwargs):
    teacher, examples = _teacher(), _examples()
    index = write_teacher_cache(teacher, {"train": examples, "eval": examples[:3]}, tmp_path / "cache", k=k,
                                vocab_size=64, sequences_per_shard=per_shard, logprob_dtype=logprob_dtype,
                                batch_size=4, **kwargs)
    return teacher, examples, index


def test_round_trip_gives_the_teachers_topk_at_every_real_position(tmp_path):
    teacher, examples, index = _write(tmp_path)
    cache = TeacherCache(tmp_path / "cache")
    assert len(cache) == 12 and [s["sequences"] for s in index["splits"]["train"]] == [8, 4] and index["total_sequences"]["eval"] == 3
    for i in (0, 5, 11):  # one row at a time: no padding involved in the reference
        row = cache.example(i)
        assert row["input_ids"] == examples[i]["input_ids"] and row["labels"] == examples[i]["labels"]
        ids = torch.tensor([examples[i]["input_ids"]])
        with torch.no_grad():
            logits = teacher(ids)[0]
        expected = TopK.from_logits(logits, k=8)
        assert torch.equal(row["teacher_indices"], expected.indices)
        torch.testing.assert_close(row["teacher_logprobs"], expected.logprobs)
        next_logprob = torch.log_softmax(logits, -1)[:-1].gather(1, ids[0, 1:, None]).squeeze(1)
        torch.testing.assert_close(row["teacher_next_logprob"][:-1], next_logprob)
        # Reading the cache gives the same divergence as running the teacher.
        student = torch.randn(len(ids[0]), 64)
        torch.testing.assert_close(F.divergence("js", student, TopK(row["teacher_indices"], row["teacher_logprobs"])),
                                   F.divergence("js", student, expected))
    ids, labels, sparse = cache.get([0, 1, 2])
    assert ids.shape == labels.shape == sparse.indices.shape[:2]
    assert labels[2, len(examples[2]["input_ids"]):].eq(-100).all()  # padding does not count
    assert sum(b[0].shape[0] for b in cache.batches(5)) == 12
    assert len(TeacherCache(tmp_path / "cache", "eval")) == 3


def test_teacher_topk_of_a_model_equals_its_full_logits():
    teacher = _teacher()
    ids = torch.randint(0, 64, (3, 9))
    indices, logprobs, next_logprob = teacher_topk(teacher, ids, torch.ones_like(ids), k=5, vocab_size=64, max_logits=64 * 4)
    with torch.no_grad():
        full = torch.log_softmax(teacher(ids), -1)
    top = full.topk(5, -1)
    assert torch.equal(indices, top.indices)
    torch.testing.assert_close(logprobs, top.values)
    torch.testing.assert_close(next_logprob[:, :-1], full[:, :-1].gather(2, ids[:, 1:, None]).squeeze(-1))


def test_bytes_per_token_is_reported_and_matches_files(tmp_path):
    _, examples, index = _write(tmp_path, k=8, logprob_dtype="float16")
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    tokens = sum(len(e["input_ids"]) for e in examples) + sum(len(e["input_ids"]) for e in examples[:3])
    assert index["total_tokens"] == tokens
    assert index["total_bytes"] == sum(f.stat().st_size for f in files)
    assert index["bytes_per_token"] == pytest.approx(index["total_bytes"] / tokens)
    # k * (int16 id + float16 log-prob) + int16 id + uint8 mask + int32 label + float32 next log-prob = 43 bytes,
    # plus shard headers and the padding of shorter rows.
    assert 43 <= index["bytes_per_token"] < 90
    assert TeacherCache(tmp_path / "cache").bytes_per_token == index["bytes_per_token"]


def test_an_interrupted_cache_continues_after_its_finished_shards(tmp_path):
    teacher, examples = _teacher(), _examples()
    calls = []

    def counting(ids, mask):
        calls.append(ids.shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third batch runs
        with torch.no_grad():
            return teacher(ids)

    with pytest.raises(KeyboardInterrupt):
        write_teacher_cache(counting, {"train": examples}, tmp_path / "c", k=4, vocab_size=64, batch_size=2,
                            sequences_per_shard=4, logprob_dtype="float32")
    assert not (tmp_path / "c" / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished cache"):
        TeacherCache(tmp_path / "c")
    resumed_calls = []

    def after(ids, mask):
        resumed_calls.append(ids.shape[0])
        with torch.no_grad():
            return teacher(ids)

    write_teacher_cache(after, {"train": examples}, tmp_path / "c", k=4, vocab_size=64, batch_size=2,
                        sequences_per_shard=4, logprob_dtype="float32", resume=True)
    assert sum(resumed_calls) == 12 - 4  # the first shard (4 rows) was kept
    write_teacher_cache(after, {"train": examples}, tmp_path / "whole", k=4, vocab_size=64, batch_size=2,
                        sequences_per_shard=4, logprob_dtype="float32")
    for i in range(12):
        a, b = TeacherCache(tmp_path / "c").example(i), TeacherCache(tmp_path / "whole").example(i)
        assert torch.equal(a["teacher_indices"], b["teacher_indices"])
    with pytest.raises(ValueError, match="other settings or data"):
        (tmp_path / "c" / "progress.json").write_text(json.dumps({"settings_hash": "x", "shards": {}}))
        write_teacher_cache(after, {"train": examples}, tmp_path / "c", k=4, vocab_size=64, resume=True)


def test_truncated_shard_is_detected(tmp_path):
    _write(tmp_path)
    shard = tmp_path / "cache" / "train_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    cache = TeacherCache(tmp_path / "cache")
    cache.example(0)  # the intact first shard still reads
    with pytest.raises(CorruptCacheError, match="train_00001.*truncated"):
        cache.example(9)


def test_corrupted_shard_is_detected(tmp_path):
    _write(tmp_path)
    shard = tmp_path / "cache" / "train_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="SHA-256"):
        TeacherCache(tmp_path / "cache").verify_all()


def test_missing_index_bad_index_missing_shard_wrong_version(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        TeacherCache(tmp_path)
    _write(tmp_path)
    index_path = tmp_path / "cache" / "index.json"
    good = index_path.read_text()
    index_path.write_text(good[:50])
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        TeacherCache(tmp_path / "cache")
    index = json.loads(good)
    index["format_version"] = 1
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCacheError, match="format_version 1"):
        TeacherCache(tmp_path / "cache")
    index_path.write_text(good)
    with pytest.raises(ValueError, match="no 'validation' split"):
        TeacherCache(tmp_path / "cache", "validation")
    (tmp_path / "cache" / "train_00000.safetensors").unlink()
    with pytest.raises(CorruptCacheError, match="missing"):
        TeacherCache(tmp_path / "cache").example(0)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="k must be"):
        write_teacher_cache(_teacher(), {"train": _examples()}, tmp_path, k=0, vocab_size=64)
    with pytest.raises(ValueError, match="logprob_dtype"):
        write_teacher_cache(_teacher(), {"train": _examples()}, tmp_path, k=4, vocab_size=64, logprob_dtype="int8")
    with pytest.raises(ValueError, match="no examples"):
        write_teacher_cache(_teacher(), {"train": []}, tmp_path, k=4, vocab_size=64)
