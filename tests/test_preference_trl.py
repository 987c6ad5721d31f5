"""f-DPO against TRL's own ``DPOTrainer(f_divergence_type=...)``: the same loss on the same pairs.

TRL 1.16 (trl/trainer/dpo_trainer.py, ``_compute_loss``) scores a response by f'(u) of its
``f_divergence_type`` and takes ``-log sigmoid(beta * (score_chosen - score_rejected))`` — f-DPO.
Its ``alpha_divergence`` with coefficient c uses f'(u) = (u^(c-1) - 1)/(c - 1), which is f-DPO's
alpha-divergence psi(u) = (1 - u^-alpha)/alpha at alpha = 1 - c. These tests run TRL's trainer
itself (its tokenization, its batch, its ``compute_loss``) and compare with
``divergent.train.preference`` on the same rows, models and reference.
"""

import warnings

import pytest
import torch

import lm_helpers
from divergent.data.preference import tokenize_preference_rows
from divergent.train.preference import evaluate_preferences

trl = pytest.importorskip("trl", reason="trl is not installed")
datasets = pytest.importorskip("datasets")

# (TRL's f_divergence_type, its f_alpha_divergence_coef c) -> (f-DPO divergence, alpha = 1 - c)
CASES = [
    ("reverse_kl", 0.5, "reverse_kl", 0.5),
    ("forward_kl", 0.5, "forward_kl", 0.5),
    ("js_divergence", 0.5, "js", 0.5),
    ("alpha_divergence", 0.3, "alpha", 0.7),
    ("alpha_divergence", 0.8, "alpha", 0.2),
]


def _rows(conversational=False):
    rows = [{"prompt": f"what is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": " the dog sat on the mat"}
            for i in range(5)]
    if conversational:
        return [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                 "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in rows]
    return rows


def _trl_trainer(tmp_path, rows, f_divergence_type, coef, beta):
    tok = lm_helpers.tokenizer()
    # A reference that differs from the policy, so that every log-ratio is far from 0.
    policy, reference = lm_helpers.llama(len(tok), 32, 1, seed=0), lm_helpers.llama(len(tok), 32, 1, seed=1)
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(rows), beta=beta,
                         f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef, max_length=64,
                         report_to=[], use_cpu=True, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args,
                                 train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    return trainer, tok


@pytest.mark.parametrize("trl_type,coef,divergence,alpha", CASES)
def test_fdpo_loss_equals_trl_dpo_trainer(tmp_path, trl_type, coef, divergence, alpha):
    rows, beta = _rows(), 0.2
    trainer, tok = _trl_trainer(tmp_path, rows, trl_type, coef, beta)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
    pairs, _ = tokenize_preference_rows(rows, tok, max_length=64)
    ours = evaluate_preferences(trainer.model, trainer.ref_model, pairs, pad_id=tok.pad_token_id,
                                divergence=divergence, beta=beta, alpha=alpha)
    assert abs(trl_loss - 0.6931) > 1e-3  # not the trivial value of policy == reference
    assert ours["loss"] == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("conversational", [False, True], ids=["strings", "conversations"])
def test_pairs_are_tokenized_as_trl_tokenizes_them(tmp_path, conversational):
    rows = _rows(conversational)
    trainer, tok = _trl_trainer(tmp_path, rows, "reverse_kl", 0.5, 0.1)
    trl_pairs = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
    ours, stats = tokenize_preference_rows(rows, tok, max_length=64)
    assert ours == trl_pairs and stats.used == len(rows)
