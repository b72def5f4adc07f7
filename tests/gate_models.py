"""Three versions of one small classifier for the gate's comparison with production.

``v1`` is the first version; ``v2`` the same net with slightly moved weights (a retrain that changes little);
``v3`` the v2 net wrapped to run its body three times and average (the same answers, about 3x the work).
The net is wide enough (about 5.2 M multiply-adds a row, a millisecond or more at batch 1) that 3x the work
is milliseconds more, far past the gate's 1.25x ratio and its 0.25 ms slack whatever the machine's load
(at half this width a loaded run saw 0.98 vs 0.68 ms: within the slack).
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES, CLASSES = 256, 10


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, 4096), nn.ReLU(), nn.Linear(4096, 1024), nn.ReLU(),
                                  nn.Linear(1024, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ThreeTimes(nn.Module):
    """``net``'s answer, computed three times (scaled by buffers equal to one, so nothing is folded away)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("scales", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(x * self.scales[0]) + self.net(x * self.scales[1]) + self.net(x * self.scales[2])) / 3


def versions() -> tuple[nn.Module, nn.Module, nn.Module]:
    """(v1, v2, v3), deterministic."""
    torch.manual_seed(0)
    v1 = Wide().eval()
    v2 = Wide().eval()
    v2.load_state_dict(v1.state_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in v2.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-4)
    return v1, v2, ThreeTimes(v2).eval()


def example(rows: int = 8) -> torch.Tensor:
    return torch.randn(rows, FEATURES, generator=torch.Generator().manual_seed(2))
