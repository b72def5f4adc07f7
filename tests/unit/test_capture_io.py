"""Issue 19: keyword/dict inputs, structured (pytree) outputs and half-precision examples at capture."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from kit.capture import capture, load_examples, save_examples
from kit.errors import CaptureError
from kit.version_files import load_example_arrays


class Cached(nn.Module):
    """A forward whose second parameter is not the second tensor a user has (GPT-2's past_key_values)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, ids, cache=None, mask=None):
        assert cache is None, "the mask was bound to the cache"
        return self.lin(ids * mask)


def test_dict_inputs_are_passed_by_keyword_and_name_the_inputs():
    x, m = torch.randn(3, 4), torch.ones(3, 4)
    model = Cached()
    with pytest.raises(CaptureError, match="bound to the cache.*pass a dict"):  # positionally, the mask lands on `cache`
        capture(model, (x, m), onnx=False)
    c = capture(model, {"ids": x, "mask": m}, onnx=False)
    assert [s.name for s in c.signature.inputs] == ["ids", "mask"]
    x2, m2 = torch.randn(5, 4), (torch.rand(5, 4) > 0.5).float()
    assert torch.allclose(c.program.module()(x2, m2), model(x2, mask=m2))


def test_a_dict_with_a_non_tensor_or_bad_key_is_refused_naming_it():
    with pytest.raises(CaptureError, match="parameter names to tensors"):
        capture(Cached(), {"ids": torch.randn(2, 4), "cache": None}, onnx=False)
    with pytest.raises(CaptureError, match="empty dict"):
        capture(Cached(), {}, onnx=False)


@dataclass
class Output:
    logits: torch.Tensor
    hidden: tuple
    extra: torch.Tensor | None = None


pytree.register_dataclass(Output)


class Structured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return Output(logits=h.softmax(-1), hidden=(h, h * 2))


def test_a_structured_output_becomes_a_plain_dict_named_by_path():
    c = capture(Structured(), torch.randn(2, 4), onnx=False)
    assert c.signature.output_kind == "dict"
    assert [s.name for s in c.signature.outputs] == ["logits", "hidden.0", "hidden.1"]  # None dropped
    assert c.program.call_spec.out_spec.type is dict  # no reader needs the Output class registered
    out = c.program.module()(torch.ones(5, 4))
    assert set(out) == {"logits", "hidden.0", "hidden.1"} and out["hidden.1"].shape == (5, 3)


class ReturnsCache(nn.Module):
    def forward(self, x):
        class DynamicCache:  # what transformers returns with use_cache=True
            pass
        return {"logits": x * 2, "past_key_values": DynamicCache()}


def test_a_cache_output_names_use_cache_false():
    with pytest.raises(CaptureError, match="use_cache=False"):
        capture(ReturnsCache(), torch.randn(2, 4), onnx=False)


class Half(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x.float())
        return y.to(torch.bfloat16), y.half()


def test_half_precision_inputs_and_outputs_capture_and_round_trip_the_example(tmp_path):
    x = torch.randn(3, 4).to(torch.bfloat16)
    c = capture(Half(), x, onnx=False)
    assert [s.dtype for s in c.signature.outputs] == ["bfloat16", "float16"] and c.signature.inputs[0].dtype == "bfloat16"
    path = tmp_path / "example.npz"
    save_examples(path, c.example_inputs, c.reference_outputs)
    ins, outs = load_examples(path)
    assert ins[0].dtype == torch.bfloat16 and torch.equal(ins[0], x)  # bit-exact
    assert [o.dtype for o in outs] == [torch.bfloat16, torch.float16]
    assert all(torch.equal(a, b) for a, b in zip(outs, c.reference_outputs))
    np_ins, np_outs = load_example_arrays(path)  # torch-free readers get bfloat16 widened, exactly
    assert np_ins[0].dtype == np.float32 and np.array_equal(np_ins[0], x.float().numpy())
    assert np_outs[1].dtype == np.float16


def test_a_bfloat16_member_that_is_not_uint16_bits_is_refused(tmp_path):
    path = tmp_path / "example.npz"
    np.savez(path, input_0__bfloat16=np.zeros((2, 4), np.float32), output_0=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="uint16 bits"):
        load_example_arrays(path)
