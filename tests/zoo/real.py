"""Issue 19's real architectures (random weights), each with keyword example inputs and capture options.

Vision models come from torchvision's published definitions (tests/zoo/tv_cnn.py, tv_vit.py: torchvision
does not import beside this CPU torch); language models are Hugging Face ``transformers`` classes built
from small configs, exactly as ``from_config`` returns them (``model(**tokenizer_output)``). Every example is
a dict of input names to tensors (Kit passes it by keyword), batch 2. resnet18 runs at 224 px as the issue
names it; the rest use small configs or images to keep two shared cores' CPU time modest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from zoo.tv_cnn import efficientnet_b0, mobilenet_v3_small, resnet18
from zoo.tv_vit import convnext_atto, vit_tiny

Inputs = dict[str, torch.Tensor]
VOCAB = 100
SEQ = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def calibrated(model: nn.Module, image: int) -> nn.Module:
    """BatchNorm running statistics from one calibration batch, as a trained model has them: with
    torchvision's fresh statistics (mean 0, var 1) MobileNet's and EfficientNet's logits are ~1e-10."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None  # a cumulative average: one batch sets the statistics
        m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, image, image, generator=_gen(123)))
    return model.eval()


def images(size: int, dtype: torch.dtype = torch.float32) -> Callable[[int, int, int], Inputs]:
    return lambda b, s, seed: {"x": torch.randn(b, 3, size, size, generator=_gen(seed)).to(dtype)}


def tokens(*names: str) -> Callable[[int, int, int], Inputs]:
    """input_ids (+ attention_mask with one padded row, + token_type_ids), as a tokenizer returns them."""
    def make(b: int, s: int, seed: int) -> Inputs:
        g = _gen(seed)
        out = {"input_ids": torch.randint(1, VOCAB, (b, s), generator=g)}
        if "attention_mask" in names:
            mask = torch.ones(b, s, dtype=torch.long)
            mask[0, max(1, s // 2):] = 0  # the first row is padded
            out["attention_mask"] = mask
        if "token_type_ids" in names:
            types = torch.zeros(b, s, dtype=torch.long)
            types[:, s // 2:] = 1  # a sentence pair
            out["token_type_ids"] = types
        return out
    return make


class LSTMTagger(nn.Module):
    """A two-layer LSTM over a float sequence, the last step's state feeding a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(12, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(seq)
        return self.head(out[:, -1])


class HalfHead(nn.Module):
    """Half-precision features in, half-precision scores out (float16 or bfloat16): a float32 trunk whose head
    runs in half precision (a mixed model)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(24, 48), nn.GELU())
        self.head = nn.Linear(48, 6).to(dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.trunk(features.float())
        return self.head(h.to(self.head.weight.dtype))


def half_features(dtype: torch.dtype) -> Callable[[int, int, int], Inputs]:
    return lambda b, s, seed: {"features": torch.randn(b, 24, generator=_gen(seed)).to(dtype)}


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=37,
                     vocab_size=VOCAB, num_labels=3)
    return BertForSequenceClassification(cfg)


def _distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertModel

    return DistilBertModel(DistilBertConfig(n_layers=2, dim=32, n_heads=2, hidden_dim=37, vocab_size=VOCAB))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    model.config.use_cache = False  # a cache output cannot be served (Kit refuses it naming use_cache=False)
    return model


def _t5_encoder() -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                   dropout_rate=0.0, use_cache=False))


@dataclass(frozen=True)
class RealEntry:
    """A model, its keyword inputs of a given (batch, seq, seed), and what capture needs to know."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int, int], Inputs]
    seqs: tuple[int, int] = (0, 0)  # the example's sequence length and another one the tests send (0: none)
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    dims: dict[str, tuple[int, int]] = field(default_factory=dict)
    onnx: bool = True  # model.onnx exported and checked with onnxruntime at capture

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def example(self) -> Inputs:
        return self.inputs(2, self.seqs[0], 0)


def eager(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The eager answer, keyed as Kit names outputs (output_0, or a dict's / ModelOutput's keys), in float64."""
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, torch.Tensor):
        items: list[tuple[str, Any]] = [("output_0", out)]
    elif isinstance(out, Mapping):  # a plain dict or a transformers ModelOutput (fields that are set)
        items = [(k, v) for k, v in out.items() if v is not None]
    else:
        items = [(f"output_{i}", v) for i, v in enumerate(out)]
    return {k: v.detach().to(torch.float64).numpy() for k, v in items}


def nudged(model: nn.Module) -> nn.Module:
    """A "fine-tuned" second version: the last bias (a head's, or GPT-2's final LayerNorm's) moved by 1e-3; T5,
    which has no biases, its final LayerNorm's weight."""
    last = ([p for n, p in model.named_parameters() if n.endswith("bias")]
            or [p for n, p in model.named_parameters() if "layer_norm" in n])[-1]
    with torch.no_grad():
        last.add_(1e-3)
    return model


REAL: tuple[RealEntry, ...] = (
    RealEntry("resnet18", lambda: calibrated(resnet18(), 224), images(224)),
    RealEntry("mobilenet-v3-small", lambda: calibrated(mobilenet_v3_small(), 224), images(224)),
    RealEntry("efficientnet-b0", lambda: calibrated(efficientnet_b0(), 128), images(128)),
    RealEntry("vit-tiny", vit_tiny, images(224)),
    RealEntry("convnext-atto", convnext_atto, images(64)),
    RealEntry("bert-seqcls", _bert, tokens("input_ids", "attention_mask", "token_type_ids"), seqs=(9, 14),
              dynamic={**SEQ, "token_type_ids": {1: "seq"}}, dims={"seq": (2, 64)}),
    RealEntry("distilbert", _distilbert, tokens("input_ids", "attention_mask"), seqs=(9, 5), dynamic=SEQ,
              dims={"seq": (2, 64)}),
    RealEntry("gpt2", _gpt2, tokens("input_ids", "attention_mask"), seqs=(8, 13), dynamic=SEQ,
              dims={"seq": (2, 64)}),
    # torch.onnx (2.13) cannot convert T5's attention under a dynamic seq ("Cannot view a tensor with shape
    # [s, s, 2, 16] and strides ... as [s, s, 32]"): capture records why, the torch backend serves it
    RealEntry("t5-encoder", _t5_encoder, tokens("input_ids", "attention_mask"), seqs=(10, 6), dynamic=SEQ,
              dims={"seq": (2, 64)}, onnx=False),
    # torch.export specialises a recurrent layer's sequence length: the LSTM takes a fixed length of 16
    RealEntry("lstm", LSTMTagger, lambda b, s, seed: {"seq": torch.randn(b, 16, 12, generator=_gen(seed))}),
    RealEntry("fp16-io", lambda: HalfHead(torch.float16), half_features(torch.float16)),
    # onnxruntime's CPU provider has no bfloat16 Gemm: capture records why, the torch backend serves it
    RealEntry("bf16-io", lambda: HalfHead(torch.bfloat16), half_features(torch.bfloat16), onnx=False),
)
