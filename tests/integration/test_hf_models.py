"""Issue 19: Hugging Face models as transformers returns them (random weights, built from small configs):
captured with dict inputs, registered signed, loaded back on both backends from the registry, equal to eager.

transformers is a declared dev dependency (pinned); no weights are downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
)

from kit.errors import CaptureError
from kit.registry import Registry
from kit.signing import Keyring

SMALL = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 37, "vocab_size": 100}


def _ids(batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0  # a padded row
    return {"input_ids": torch.randint(1, 100, (batch, seq), generator=g), "attention_mask": mask}


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "reg", user="alice", keyring=Keyring(tmp_path / "keys"),
                    cache_dir=tmp_path / "cache")


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(num_hidden_layers=1, **SMALL)).eval()
    if kind == "distilbert":
        return DistilBertModel(DistilBertConfig(n_layers=1, dim=32, n_heads=2, hidden_dim=37, vocab_size=100)).eval()
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("kind", ["bert", "distilbert", "gpt2"])
def test_a_transformers_model_registers_and_serves_on_both_backends_equal_to_eager(reg, kind):
    model = _model(kind)
    seq = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    mv = reg.register(kind, model, _ids(2, 7), dynamic=seq, dims={"seq": (2, 32)})
    assert [s["name"] for s in mv.signature["inputs"]] == ["input_ids", "attention_mask"]
    assert mv.signature["output_kind"] == "dict"
    assert mv.capture["onnx"]["exported"], mv.capture["onnx"]
    x = _ids(3, 11)
    with torch.no_grad():
        eager = model(**x)
    expect = eager["logits"] if kind != "distilbert" else eager["last_hidden_state"]
    on_torch = reg.load(kind, mv.version)(x["input_ids"], x["attention_mask"])
    got = on_torch[0] if isinstance(on_torch, tuple) else next(iter(on_torch.values()))
    assert torch.allclose(torch.as_tensor(got), expect, atol=1e-4)
    on_ort = reg.load(kind, mv.version, backend="onnxruntime")(x["input_ids"].numpy(), x["attention_mask"].numpy())
    got = on_ort[0] if isinstance(on_ort, (tuple, list)) else next(iter(on_ort.values()))
    assert np.allclose(np.asarray(got), expect.numpy(), atol=1e-4)


def test_gpt2_with_its_default_cache_is_refused_naming_use_cache(reg):
    model = _model("gpt2")
    model.config.use_cache = True
    with pytest.raises(CaptureError, match="use_cache=False"):
        reg.register("gpt2", model, _ids(2, 7))
    assert reg.models() == []  # a failed register leaves no trace
