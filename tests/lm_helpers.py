"""Tiny Hugging Face models, a locally trained tokenizer with a chat template, and data files.

Everything is built from configs and local text: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "what is two plus two? two plus two is four.",
    "a quick brown fox jumps over the lazy dog again and again",
    "hello, how are you today? i am fine, thank you very much.",
    "python is a programming language; it reads like plain english.",
    "numbers: one two three four five six seven eight nine ten",
] * 4


def tokenizer(vocab_size: int = 300, *, template: bool = True):
    """A byte-level BPE tokenizer trained on CORPUS, with <s>, </s>, <pad> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<|user|>",
                                                                        "<|assistant|>", "<|system|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def llama(vocab: int, hidden: int = 32, layers: int = 2, seed: int = 0, tie: bool = False):
    """A tiny Llama (2 layers, hidden 32 by default)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=tie, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


def save_pair(tmp_path: Path, vocab_size: int = 300):
    """``(teacher_dir, student_dir, tokenizer)``: a hidden-48 teacher and a hidden-32 student, each with the tokenizer."""
    tok = tokenizer(vocab_size)
    teacher, student = llama(len(tok), 48, 2, seed=1), llama(len(tok), 32, 1, seed=0)
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    teacher.save_pretrained(teacher_dir)
    student.save_pretrained(student_dir)
    tok.save_pretrained(teacher_dir)
    tok.save_pretrained(student_dir)
    return teacher_dir, student_dir, tok


def save_other_pair(tmp_path: Path):
    """``(teacher_dir, student_dir, student_tok, teacher_tok)``: a student with a 300-token BPE and a teacher with a
    400-token BPE (both trained with `tokenizers`), each saved with its own tokenizer."""
    student_tok, teacher_tok = tokenizer(300), tokenizer(400)
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    llama(len(teacher_tok), 48, 2, seed=1).save_pretrained(teacher_dir)
    teacher_tok.save_pretrained(teacher_dir)
    llama(len(student_tok), 32, 1, seed=0).save_pretrained(student_dir)
    student_tok.save_pretrained(student_dir)
    return teacher_dir, student_dir, student_tok, teacher_tok


def chat_rows(n: int = 12):
    rows = []
    for i in range(n):
        a, b = i % 5, (i * 3) % 7
        rows.append({"messages": [
            {"role": "system", "content": "answer briefly"},
            {"role": "user", "content": f"what is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            {"role": "user", "content": "thank you"},
            {"role": "assistant", "content": "you are welcome"},
        ]})
    return rows


def prompt_completion_rows(n: int = 12):
    return [{"prompt": f"the number {i} is", "completion": f" {'even' if i % 2 == 0 else 'odd'}."} for i in range(n)]


def text_rows(n: int = 12):
    return [{"text": CORPUS[i % len(CORPUS)]} for i in range(n)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_across_tokenizers(tmp_path: Path, student_tok, teacher_tok, **config):
    """Two steps of DistillationTrainer with a teacher in another tokenizer: ``(trainer, losses, settings)``.

    Asserts the student's weights changed; ``settings`` are the shared DistillationConfig arguments
    (without ``config``), for building other configs in the same test.
    """
    from divergent.hf import DistillationConfig, DistillationTrainer

    student, teacher = llama(len(student_tok), 32, 1, seed=0), llama(len(teacher_tok), 48, 1, seed=1)
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                    save_strategy="no", use_cpu=True, report_to=[], seed=0, disable_tqdm=True, logging_steps=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(**config, **settings),
                                  train_dataset=text_rows(8), processing_class=student_tok,
                                  teacher_processing_class=teacher_tok)
    before = [p.detach().clone() for p in student.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h], settings


def answer_batch(tok, n: int = 4, *, eos: bool = False):
    """A right-padded ``divergent.train.lm.Batch`` of prompt_completion_rows(n), the first 3 tokens of each row not counted."""
    from divergent.train.lm import Batch

    rows = [tok(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
            for r in prompt_completion_rows(n)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :3] = -100
    return Batch(ids, mask, labels)


def ctrl_c_in_student(monkeypatch, number: int, step: int) -> None:
    """Make distill-lm's ``number``-th student run (1 = the first) stop as on Ctrl-C after its ``step``.

    Patches ``divergent.experiments.lm.drive``; ``monkeypatch.undo()`` restores it.
    """
    from divergent.experiments import lm as experiment
    from divergent.train.run import current_interrupt

    real_drive, calls = experiment.drive, []

    def interrupted_drive(trainer, **kwargs):
        calls.append(1)
        if len(calls) == number:
            def ctrl_c(record):
                kwargs["on_step"](record)
                if record["step"] == step:
                    current_interrupt().request()
            return real_drive(trainer, **{**kwargs, "on_step": ctrl_c})
        return real_drive(trainer, **kwargs)

    monkeypatch.setattr(experiment, "drive", interrupted_drive)
