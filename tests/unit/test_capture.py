"""kit.capture: torch.export with a dynamic batch, parity, signatures, refusals, safe loading."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from kit.capture import capture, load_examples, load_program, load_weights
from kit.errors import CaptureError, ParityError, UnsafeArtifactError


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(8, 3)

    def forward(self, features: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([features, self.emb(token)], dim=1)
        return self.lin(h), h.sum(dim=1)


def test_batch_one_example_gives_dynamic_batch(tmp_path):
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    cap = capture(model, torch.randn(1, 6))
    assert cap.signature.inputs[0].shape == ("batch", 6)
    assert cap.signature.outputs[0].shape == ("batch", 2)
    assert cap.parity.batch_sizes == (1, 4)
    cap.save(tmp_path)
    loaded = load_program(tmp_path / "model.pt2")
    for b in (1, 2, 5, 37):
        x = torch.randn(b, 6)
        torch.testing.assert_close(loaded(x), model(x))
    ins, outs = load_examples(tmp_path / "example.npz")
    torch.testing.assert_close(outs[0], model(ins[0]).detach())


def test_two_inputs_names_dtypes_and_tuple_outputs():
    cap = capture(TwoInputs(), (torch.randn(3, 4), torch.tensor([1, 2, 3])))
    ins = cap.signature.inputs
    assert [s.name for s in ins] == ["features", "token"]
    assert [s.dtype for s in ins] == ["float32", "int64"]
    assert ins[1].shape == ("batch",)
    assert len(cap.signature.outputs) == 2
    assert "features: float32[batch, 4]" in cap.signature.describe()


def test_static_batch_when_asked():
    cap = capture(nn.Linear(3, 1), torch.randn(4, 3), dynamic_batch=False)
    assert cap.signature.inputs[0].shape == (4, 3)
    assert cap.parity.batch_sizes == (4,)


class Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


def test_parity_failure_names_deviation_and_tolerance():
    with pytest.raises(ParityError) as ei:
        capture(Noisy(), torch.zeros(2, 3), atol=1e-6, rtol=0.0)
    err = ei.value
    assert err.max_abs_diff > 1e-6
    assert "max |diff|" in str(err) and "atol=1e-06" in str(err)


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 0:  # data-dependent Python control flow: not exportable
            return x * 2
        return x


def test_uncapturable_model_gives_reason_and_what_to_try():
    with pytest.raises(CaptureError) as ei:
        capture(DataDependent(), torch.randn(2, 3))
    msg = str(ei.value)
    assert "torch.export could not capture DataDependent" in msg
    assert "torch.cond" in msg


def test_bad_examples_are_refused_with_expectations():
    with pytest.raises(CaptureError, match="a tensor, a tuple of tensors or a dict"):
        capture(nn.Linear(2, 2), [[1.0, 2.0]])
    with pytest.raises(CaptureError, match="disagree on the batch size"):
        capture(TwoInputs(), (torch.randn(3, 4), torch.tensor([1, 2])))
    with pytest.raises(CaptureError, match="nn.Module"):
        capture(lambda x: x, torch.randn(1, 2))  # type: ignore[arg-type]


class Evil:
    """Unpickling this would run code: it must never happen."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Evil(str(marker)))
    disguised = tmp_path / "model.pt2"
    disguised.write_bytes(payload)
    with pytest.raises(UnsafeArtifactError, match="not a torch.export archive"):
        load_program(disguised)
    plain = tmp_path / "weights.pt"
    torch.save({"w": Evil(str(marker))}, plain)
    with pytest.raises(UnsafeArtifactError, match="never unpickles"):
        load_weights(plain)
    with pytest.raises(UnsafeArtifactError, match=".pt2"):
        load_program(plain)
    assert not marker.exists(), "the pickle's payload ran"


def test_weights_only_state_dict_loads(tmp_path):
    m = nn.Linear(2, 2)
    torch.save(m.state_dict(), tmp_path / "w.pt")
    sd = load_weights(tmp_path / "w.pt")
    assert set(sd) == {"weight", "bias"}


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(image)).mean(dim=(2, 3))


def test_fast_forward_matches_eager_and_checks_inputs(tmp_path):
    from kit.capture import ExportedForward

    model = ConvBN().eval()
    model.bn.running_mean.uniform_()  # buffers must travel too
    capture(model, torch.randn(1, 3, 8, 8)).save(tmp_path)
    fwd = load_program(tmp_path / "model.pt2")
    assert isinstance(fwd, ExportedForward), "a plain inference program takes the fast path"
    for b in (1, 3, 17):
        x = torch.randn(b, 3, 8, 8)
        torch.testing.assert_close(fwd(x), model(x))
    with pytest.raises(ValueError, match=r"input 'image' must be float32\[batch, 3, 8, 8\], got float32\[2, 3, 9, 8\]"):
        fwd(torch.randn(2, 3, 9, 8))
    with pytest.raises(ValueError, match=r"must be float32.*got float64"):
        fwd(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected 1 input tensor"):
        fwd(torch.randn(2, 3, 8, 8), torch.randn(1))
    two = TwoInputs()
    capture(two, (torch.randn(3, 4), torch.tensor([1, 2, 3]))).save(tmp_path / "two")
    out = load_program(tmp_path / "two" / "model.pt2")(torch.randn(2, 4), torch.tensor([4, 5]))
    assert isinstance(out, tuple) and len(out) == 2, "tuple outputs keep their structure"
