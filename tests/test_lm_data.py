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
