"""A model that fails at forward time answers 500 naming the request id and the version that failed
(``X-Kit-Model-Version``), on the in-process ASGI app: a client or a balancer can attribute a canary's 5xx
exactly as its 200s."""

from __future__ import annotations

import torch
from torch import nn

from kit.registry import Registry
from kit.servicegen import generate
from kit.serving import load_service_config
from kit.serving.asgi import create_asgi_app


class Lookup(nn.Module):
    """An embedding: an id past its 10 rows is a real runtime error of the model (an index out of range),
    which the request checks cannot know about (any int64 is a valid id)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids).sum(1)


def test_a_model_failure_is_a_500_that_names_the_version_and_request(tmp_path):
    reg = Registry(tmp_path / "registry", require_gate=True, user="test")
    torch.manual_seed(0)
    reg.register("lookup", Lookup().eval(), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    reg.promote("lookup", 1, force=True, why="test")  # gates are tested by the gate area
    d = generate("svc", "lookup", registry=reg.root, out_dir=tmp_path / "services", force=True)
    client = create_asgi_app(load_service_config(d), watch=False).test_client()
    ok = client.post("/predict", json={"inputs": [[1, 2, 3]]})
    assert ok.status_code == 200 and ok.headers["X-Kit-Model-Version"] == "1"
    bad = client.post("/predict", json={"inputs": [[1, 2, 99]]}, headers={"X-Request-Id": "req-7"})
    assert bad.status_code == 500, bad.data
    assert bad.headers["X-Kit-Model-Version"] == "1" and bad.headers["X-Request-Id"] == "req-7"
    assert "request id req-7" in bad.json["error"]
