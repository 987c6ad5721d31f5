"""Byte-level stdlib corpus and local Hugging Face model loading."""

import pytest
import torch

from divergent.data.text import (
    decode_bytes,
    encode_text,
    load_stdlib_corpus,
    load_text_corpus,
    random_windows,
    sequential_windows,
    stdlib_source_files,
)
from divergent.models.gpt import GPTConfig, TinyGPT
from divergent.models.hf import (
    check_same_tokenizer,
    hidden_and_logits,
    load_causal_lm,
    output_weight,
)


def test_stdlib_corpus_is_deterministic_split_by_file_and_capped():
    first = load_stdlib_corpus(max_train_bytes=30_000, max_val_bytes=8_000)
    second = load_stdlib_corpus(max_train_bytes=30_000, max_val_bytes=8_000)
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert len(first.train) == 30_000 and len(first.val) == 8_000
    assert set(first.train_files).isdisjoint(first.val_files)
    files = stdlib_source_files()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    # The first validation file is the first stdlib file; its text opens the val stream.
    assert first.val_files[0] == str(files[0])
    assert bytes(first.val[:200].tolist()) == files[0].read_bytes()[:200]


def test_text_corpus_from_user_files_and_errors(tmp_path):
    paths = []
    for i in range(4):
        path = tmp_path / f"f{i}.txt"
        path.write_text(f"file {i} " * 20)
        paths.append(path)
    corpus = load_text_corpus(paths, val_fraction=0.5)
    assert corpus.val_files == [str(paths[0]), str(paths[2])]
    assert decode_bytes(corpus.train).startswith("file 1 ")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text_corpus([tmp_path / "missing.txt", paths[0]])
    with pytest.raises(ValueError, match="val_fraction"):
        load_text_corpus(paths, val_fraction=1.5)


def test_windows_are_shifted_by_one():
    data = encode_text("abcdefghijklmnopqrstuvwxyz")
    inputs, labels = random_windows(data, 5, 8, torch.Generator().manual_seed(0))
    assert inputs.shape == labels.shape == (5, 8)
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    assert torch.equal(labels - inputs, torch.ones_like(inputs))  # consecutive letters
    seq_inputs, seq_labels = sequential_windows(data, 8)
    assert seq_inputs.shape == (3, 8) and decode_bytes(seq_inputs[1]) == "ijklmnop"
    assert decode_bytes(seq_labels[1]) == "jklmnopq"
    with pytest.raises(ValueError, match="at least"):
        random_windows(data[:4], 1, 8)


def _tiny_gpt2(tmp_path, name="gpt2", vocab=256, n_embd=32):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_embd=n_embd, n_head=2, vocab_size=vocab, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def test_local_hf_model_loads_and_exposes_hidden_and_output_weight(tmp_path):
    model, path = _tiny_gpt2(tmp_path)
    loaded = load_causal_lm(path).eval()
    ids = torch.randint(0, 256, (2, 9))
    hidden, logits = hidden_and_logits(loaded, ids)
    torch.testing.assert_close(logits, model(ids).logits)
    torch.testing.assert_close(hidden @ output_weight(loaded).T, logits)
    hidden_only, none = hidden_and_logits(loaded, ids, compute_logits=False)
    assert none is None and torch.equal(hidden_only, hidden)


def test_tinygpt_folder_loads_through_the_same_loader(tmp_path):
    model = TinyGPT(GPTConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
    model.save_pretrained(tmp_path / "tiny")
    loaded = load_causal_lm(tmp_path / "tiny")
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(loaded(ids), model(ids))
    assert output_weight(loaded) is loaded.lm_head.weight


def test_missing_local_model_is_a_clear_error_not_a_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local directory.*never downloads"):
        load_causal_lm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")


class _Tokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_different_tokenizers_are_rejected():
    check_same_tokenizer(_Tokenizer({"a": 0, "b": 1}), _Tokenizer({"a": 0, "b": 1}))
    check_same_tokenizer(None, _Tokenizer({"a": 0}))
    with pytest.raises(ValueError, match="different tokenizers"):
        check_same_tokenizer(_Tokenizer({"a": 0, "b": 1}), _Tokenizer({"b": 0, "a": 1}))


def test_llama_style_model_hidden_times_output_weight_is_logits(tmp_path):
    """The fused loss relies on logits = hidden @ W^T; check it on a Llama-style model too."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    model = load_causal_lm(tmp_path / "llama").eval()
    ids = torch.randint(0, 96, (2, 7))
    hidden, logits = hidden_and_logits(model, ids)
    torch.testing.assert_close(logits, model(ids).logits)
    torch.testing.assert_close(hidden @ output_weight(model).T, logits)


# ----------------------------------------------------------------------------- the user's data files (lm_data)

import csv as _csv  # noqa: E402
import json as _json  # noqa: E402

from divergent.data import lm_data  # noqa: E402


def _counted_text(tokenizer, example):
    """The text of the tokens the loss counts (labels[1:] != -100), decoded."""
    return tokenizer.decode([t for t, label in zip(example["input_ids"][1:], example["labels"][1:]) if label != -100])


def test_chat_rows_count_exactly_the_assistant_turns():
    pytest.importorskip("transformers")
    import lm_helpers as H

    tokenizer = H.tokenizer()
    rows = H.chat_rows(4)
    examples, stats = lm_data.tokenize_rows(rows, tokenizer, max_length=500, source="chat")
    assert stats.format == "messages" and stats.used == 4 and stats.truncated == 0
    for row, example in zip(rows, examples):
        assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(row["messages"], tokenize=False)
        replies = "".join(m["content"] + "</s>" for m in row["messages"] if m["role"] == "assistant")
        assert _counted_text(tokenizer, example) == replies
        assert len(example["labels"]) == len(example["input_ids"])


def test_prompt_completion_and_text_rows_count_the_completion_and_everything():
    pytest.importorskip("transformers")
    import lm_helpers as H

    tokenizer = H.tokenizer()
    examples, stats = lm_data.tokenize_rows(H.prompt_completion_rows(3), tokenizer, max_length=100)
    assert stats.format == "prompt_completion"
    assert [_counted_text(tokenizer, e) for e in examples] == [" even.</s>", " odd.</s>", " even.</s>"]
    examples, stats = lm_data.tokenize_rows(H.text_rows(2), tokenizer, max_length=100)
    assert stats.format == "text"
    assert _counted_text(tokenizer, examples[0]) == tokenizer.decode(examples[0]["input_ids"][1:])
    assert tokenizer.decode(examples[0]["input_ids"]) == H.CORPUS[0] + "</s>"
    # Conversational prompt/completion: the prompt rendered with the generation prompt, loss on the reply.
    conversational = [{"prompt": [{"role": "user", "content": "hello"}],
                       "completion": [{"role": "assistant", "content": "hi there"}]}]
    examples, _ = lm_data.tokenize_rows(conversational, tokenizer, max_length=100)
    assert _counted_text(tokenizer, examples[0]) == "hi there</s>"


def test_truncated_and_nothing_to_learn_rows_are_counted():
    pytest.importorskip("transformers")
    import lm_helpers as H

    tokenizer = H.tokenizer()
    rows = H.prompt_completion_rows(3) + [{"prompt": "only a prompt", "completion": ""},
                                          {"prompt": "a long prompt " * 20, "completion": " cut off"},
                                          {"prompt": "x", "completion": None}]
    examples, stats = lm_data.tokenize_rows(rows, tokenizer, max_length=40)
    # The long row is cut before its completion: truncated, and then it has nothing to learn.
    assert (stats.rows, stats.used, stats.skipped_nothing_to_learn, stats.truncated) == (6, 3, 3, 1)
    assert all(len(e["input_ids"]) <= 40 for e in examples)
    assert stats.counted_tokens == sum(sum(1 for label in e["labels"][1:] if label != -100) for e in examples)


def test_every_file_format_reads_the_same_rows(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "a.json").write_text(_json.dumps(rows))
    (tmp_path / "columns.json").write_text(_json.dumps({"prompt": [r["prompt"] for r in rows],
                                                        "completion": [r["completion"] for r in rows]}))
    with open(tmp_path / "a.csv", "w", newline="") as handle:
        writer = _csv.DictWriter(handle, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.jsonl", "a.json", "columns.json", "a.csv", "a.parquet", "saved"):
        assert lm_data.read_rows(tmp_path / name) == {"train": rows}, name
    (tmp_path / "lines.txt").write_text("first line\n\nsecond line\n")
    assert lm_data.read_rows(tmp_path / "lines.txt") == {"train": [{"text": "first line"}, {"text": "second line"}]}
    # A conversation stored in a CSV cell is JSON text.
    with open(tmp_path / "chat.csv", "w", newline="") as handle:
        writer = _csv.DictWriter(handle, ["messages"])
        writer.writeheader()
        writer.writerow({"messages": _json.dumps([{"role": "user", "content": "a, b"}])})
    assert lm_data.read_rows(tmp_path / "chat.csv")["train"][0]["messages"] == [{"role": "user", "content": "a, b"}]


def test_bad_files_name_the_file_the_columns_and_the_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data: .*missing.jsonl not found; expected files .jsonl"):
        lm_data.read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "a.xlsx").write_text("x")
    with pytest.raises(ValueError, match="suffix '.xlsx'"):
        lm_data.read_rows(tmp_path / "a.xlsx")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2 is a JSON list; expected an object"):
        lm_data.read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "broken.json").write_text('{"text": [')
    with pytest.raises(ValueError, match=r"broken.json is not valid JSON \(line 1"):
        lm_data.read_rows(tmp_path / "broken.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no rows"):
        lm_data.read_rows(tmp_path / "empty.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not one written by datasets' save_to_disk"):
        lm_data.read_rows(tmp_path / "folder")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        lm_data.read_rows(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match=r"rows.jsonl: no column .*'prompt' and 'completion' must both be present\); "
                                         r"found columns \['question', 'prompt'\]; accepted row formats"):
        lm_data.detect_format(["question", "prompt"], "rows.jsonl")


def test_chat_rows_need_a_template_and_a_prefix_consistent_one():
    pytest.importorskip("transformers")
    import lm_helpers as H

    with pytest.raises(ValueError, match="need a chat template, and the tokenizer .* has none"):
        lm_data.tokenize_rows(H.chat_rows(1), H.tokenizer(template=False), max_length=100)
    with pytest.raises(ValueError, match="need a chat template, and the byte-level model"):
        lm_data.tokenize_rows(H.chat_rows(1), lm_data.ByteTokenizer(), max_length=100)
    tokenizer = H.tokenizer()
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="row 0: the chat template does not render the conversation's beginning"):
        lm_data.tokenize_rows(H.chat_rows(1), tokenizer, max_length=100)
    with pytest.raises(ValueError, match="row 0: every message of 'messages' needs 'role' and 'content'"):
        lm_data.tokenize_rows([{"messages": [{"text": "hi"}]}], H.tokenizer(), max_length=100)


def test_byte_tokenizer_packing_split_and_collate():
    tokenizer = lm_data.ByteTokenizer()
    examples, stats = lm_data.tokenize_rows([{"text": "héllo"}, {"text": "ab"}], tokenizer, max_length=100)
    assert examples[0]["input_ids"] == list("héllo".encode()) and stats.counted_tokens == 5 + 1
    blocks = lm_data.pack_examples(examples, 4)
    assert [len(b["input_ids"]) for b in blocks] == [4, 4]
    assert [t for b in blocks for t in b["input_ids"]] == examples[0]["input_ids"] + examples[1]["input_ids"]
    rows = [{"text": str(i)} for i in range(20)]
    train, held = lm_data.split_rows(rows, 0.25, seed=3, source="s")
    assert len(held) == 5 and sorted(map(str, train + held)) == sorted(map(str, rows))
    assert lm_data.split_rows(rows, 0.25, seed=3, source="s") == (train, held)
    with pytest.raises(ValueError, match="1 row cannot be split"):
        lm_data.split_rows(rows[:1], 0.5, seed=0, source="s")
    batch = lm_data.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                            pad_token_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_load_lm_data_splits_tokenizes_and_uses_a_saved_test_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"row number {i}"} for i in range(20)]
    (tmp_path / "rows.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    data = lm_data.load_lm_data(tmp_path / "rows.jsonl", lm_data.ByteTokenizer(), eval_fraction=0.1, max_length=8)
    assert (data.train_stats.rows, data.eval_stats.rows) == (18, 2) and data.byte_level
    assert data.train_stats.truncated == 18 and all(len(e["input_ids"]) == 8 for e in data.train)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:15]),
                          "validation": datasets.Dataset.from_list(rows[15:])}).save_to_disk(str(tmp_path / "saved"))
    data = lm_data.load_lm_data(tmp_path / "saved", lm_data.ByteTokenizer(), max_length=64)
    assert (data.train_stats.rows, data.eval_stats.rows) == (15, 5)
    data = lm_data.load_lm_data(tmp_path / "saved", lm_data.ByteTokenizer(), max_length=64,
                                eval_data=tmp_path / "rows.jsonl", max_eval_examples=3)
    assert data.eval_stats.rows == 20 and len(data.eval) == 3
