"""divergent.models.fake_quant: per-channel symmetric int8/int4 weight fake-quantization with a
straight-through gradient, against a float64 numpy transcription of the formula (no torch in the reference)."""

import copy

import numpy as np
import pytest
import torch

import lm_helpers as H
from divergent.models.fake_quant import FakeQuantLinear, fake_quantize, quant_bits, quantize_linears


def _reference(w: np.ndarray, bits: int) -> np.ndarray:
    levels = 2 ** (bits - 1) - 1
    out = np.empty_like(w, dtype=np.float64)
    for c, row in enumerate(w.astype(np.float64)):
        scale = np.abs(row).max() / levels
        out[c] = np.clip(np.round(row / scale), -levels - 1, levels) * scale
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_values_equal_the_formula_and_use_at_most_2_to_the_bits_levels(bits):
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    q = fake_quantize(w, bits)
    np.testing.assert_allclose(q.numpy(), _reference(w.numpy(), bits), rtol=0, atol=1e-12)
    for row, original in zip(q, w):
        assert len(torch.unique(row)) <= 2 ** bits
        assert row.abs().max() == pytest.approx(original.abs().max().item(), rel=1e-12)  # the extreme is exact
    assert (q - w).abs().max() > 0


def test_gradient_passes_straight_through():
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    upstream = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    (fake_quantize(w, 4) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream, rtol=0, atol=0)


def test_a_quantized_llama_computes_with_quantized_weights_and_keeps_its_state_dict():
    tok = H.tokenizer()
    model = H.llama(len(tok), 32, 2, seed=0)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert quantize_linears(model, 4) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head kept
    assert type(model.lm_head) is torch.nn.Linear and isinstance(model.model.layers[0].mlp.up_proj, FakeQuantLinear)
    assert list(model.state_dict()) == keys
    with torch.no_grad():  # the same model with the numpy-quantized weights written in
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                module.weight.copy_(torch.from_numpy(_reference(module.weight.numpy(), 4)))
    ids = torch.tensor([tok(H.CORPUS[0])["input_ids"]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    model(ids).logits.sum().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="did you mean 'int4'"):
        quant_bits("int44")
    with pytest.raises(ValueError, match="bits must be an int in \\[2, 16\\], got 1"):
        fake_quantize(torch.ones(2, 2), 1)
    with pytest.raises(ValueError, match="output-channel dimension"):
        fake_quantize(torch.ones(3), 8)
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        quantize_linears(torch.nn.Sequential(torch.nn.ReLU()), 8)
    assert quant_bits("int8") == 8


def test_distill_lm_student_quant_distils_a_model_into_its_quantized_self(tmp_path):
    """--student = --teacher: without --student-quant the first step's KL(teacher || student) is 0 (the same
    model); fake-quantized it is not, larger at int4 than at int8; the table and saved models come out."""
    import json

    from typer.testing import CliRunner

    from divergent.cli import app

    teacher, _, _ = H.save_pair(tmp_path)
    data = H.write_jsonl(tmp_path / "d.jsonl", H.text_rows(24))
    first_kl = {}
    for quant in ("", "int8", "int4"):
        out = tmp_path / f"runs{quant}"
        result = CliRunner().invoke(app, ["distill-lm", "--teacher", str(teacher), "--student", str(teacher),
                                          "--data", str(data), "--steps", "2", "--batch-size", "4", "--threads", "1",
                                          "--eval-fraction", "0.25", "-o", str(out)]
                                    + (["--student-quant", quant] if quant else []))
        assert result.exit_code == 0, result.output
        (run_dir,) = out.iterdir()
        rows = json.loads((run_dir / "results.json").read_text())["rows"]
        distilled = next(r for r in rows if r["divergence"] == "forward_kl")
        first_kl[quant] = distilled["history"][0]["loss"]  # step 1, before any update: KL(teacher || q(self))
        if quant == "int4":  # the exported student holds the quantized weights: at most 16 values per row
            from divergent.models.hf import load_causal_lm

            saved = load_causal_lm(run_dir / "runs" / "forward_kl" / "model", what="saved")
            for row in saved.model.layers[0].self_attn.q_proj.weight:
                assert len(torch.unique(row)) <= 16
            assert len(torch.unique(saved.lm_head.weight[0])) > 16  # the output layer is kept in full precision
    assert abs(first_kl[""]) < 1e-6
    assert 0 < first_kl["int8"] < first_kl["int4"], first_kl


def test_distill_lm_bad_student_quant_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from divergent.cli import app

    teacher, _, _ = H.save_pair(tmp_path)
    data = H.write_jsonl(tmp_path / "d.jsonl", H.text_rows(12))
    result = CliRunner().invoke(app, ["distill-lm", "--teacher", str(teacher), "--student", str(teacher),
                                      "--data", str(data), "--student-quant", "int3", "-o", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "student_quant (--student-quant) must be one of ['int4', 'int8'], got 'int3'" in result.output
    assert "Traceback" not in result.output
