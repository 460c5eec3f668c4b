"""Model loading: the tiny tokenizer, the default GGUF conversion (both documented traps), bad names."""

import pytest
import torch

from policylab import models


def test_tiny_tokenizer_round_trips_text():
    tok = models.tiny_tokenizer()
    text = "What is 12 + 7? Answer: 19."
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text


def test_default_model_conversion_matches_the_gguf(tmp_path, monkeypatch):
    """The cached HF folder gives exactly the logits of the GGUF-loaded model (no meta-device rotary bug,
    no leftover quantization_config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = models.smollm2_gguf_path()
    folder = models.resolve_model_path("smollm2")
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert "quantization_config" not in plain.config.to_dict()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("What is 12 + 30? Give only the final number.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, direct(ids).logits)


def test_missing_model_folder_or_gguf_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelError, match="has no config.json"):
        models.resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(models.ModelError, match="does not exist"):
        models.resolve_model_path(str(tmp_path / "nope.gguf"))
