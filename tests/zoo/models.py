"""Tiny models of every kind Kit must serve, each with an example input and its capture options.

Kept small (a few thousand parameters) so the whole zoo captures, gates and serves in minutes on two busy
cores. Every model is deterministic (eval mode, fixed seeds) so eager and served outputs can be compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

VOCAB = 100
MAX_SEQ = 64


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv + BatchNorm (with non-trivial running statistics) + pooling + a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(image)))
        return self.head(h.mean(dim=(2, 3)))


class TextClassifier(nn.Module):
    """int64 token ids + float mask (dynamic sequence length) -> class logits (masked mean pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) * mask.unsqueeze(-1)
        pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return self.head(pooled)


class GRUClassifier(nn.Module):
    """A GRU over a float sequence; the last hidden state feeds the head."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(seq)
        return self.head(h[-1])


class TinyTransformer(nn.Module):
    """Embedding + learned positions (so seq <= MAX_SEQ) + one TransformerEncoder layer + pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.pos = nn.Parameter(torch.randn(1, MAX_SEQ, 16) * 0.1)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.pos[:, : ids.shape[1]]
        return self.head(self.encoder(h).mean(1))


class TwoHeads(nn.Module):
    """One trunk, a dict of two outputs: class logits and a score in (0, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(12, 24), nn.Tanh())
        self.cls = nn.Linear(24, 3)
        self.reg = nn.Linear(24, 1)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(features)
        return {"logits": self.cls(h), "score": torch.sigmoid(self.reg(h)).squeeze(-1)}


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids_and_mask(batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = (torch.rand(batch, seq, generator=g) > 0.2).to(torch.float32)
    mask[:, 0] = 1.0
    return ids, mask


@dataclass(frozen=True)
class ZooEntry:
    """A model, how to make inputs of a given batch (and seq), and what capture needs to know."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int, int], tuple[torch.Tensor, ...]]  # (batch, seq, seed) -> inputs
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    dims: dict[str, tuple[int, int]] = field(default_factory=dict)
    seqs: tuple[int, ...] = (0,)  # sequence lengths the tests send (0: the model has no seq dim)
    onnx: bool = True  # capture exports model.onnx with onnxruntime parity (all six do with torch 2.13 / ORT 1.32)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().eval()

    def example(self) -> tuple[torch.Tensor, ...]:
        return self.inputs(4, self.seqs[0], 0)

    def eager(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        with torch.no_grad():
            out = model(*inputs)
        if isinstance(out, dict):
            return {k: v.numpy() for k, v in out.items()}
        return {"output_0": out.numpy()}


ZOO: tuple[ZooEntry, ...] = (
    ZooEntry("zoo-mlp", MLP, lambda b, s, seed: (torch.randn(b, 16, generator=_gen(seed)),)),
    ZooEntry("zoo-cnn", SmallCNN, lambda b, s, seed: (torch.randn(b, 1, 8, 8, generator=_gen(seed)),)),
    ZooEntry("zoo-text", TextClassifier, lambda b, s, seed: _ids_and_mask(b, s, seed),
             dynamic={"ids": {1: "seq"}, "mask": {1: "seq"}}, dims={"seq": (1, 256)}, seqs=(12, 5, 40)),
    # torch.export specialises a recurrent layer's sequence length: the GRU takes a fixed length of 10
    ZooEntry("zoo-gru", GRUClassifier, lambda b, s, seed: (torch.randn(b, 10, 8, generator=_gen(seed)),)),
    ZooEntry("zoo-transformer", TinyTransformer, lambda b, s, seed: (_ids_and_mask(b, s, seed)[0],),
             dynamic={"ids": {1: "seq"}}, dims={"seq": (1, MAX_SEQ)}, seqs=(9, 2, MAX_SEQ)),
    ZooEntry("zoo-two-heads", TwoHeads, lambda b, s, seed: (torch.randn(b, 12, generator=_gen(seed)),)),
)
