"""kit.capture beyond one float input: named dynamic dims, integer/bool inputs, dict outputs, and the
Signature that records them (kit.signature)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kit.capture import capture, load_examples, load_program
from kit.errors import CaptureError
from kit.signature import Signature, flatten_outputs, parse_dynamic

SEQ = {"ids": {1: "seq"}, "mask": {1: "seq"}}


class Tagger(nn.Module):
    """int64 ids + bool mask -> a dict: per-sequence logits and per-token scores (seq - 1 of them)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.emb(ids) * mask.unsqueeze(-1).to(torch.float32)
        return {"logits": self.head(h.mean(1)), "tokens": h[:, 1:, 0]}


def _example(batch: int = 3, seq: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 50, (batch, seq), generator=g), torch.rand(batch, seq, generator=g) > 0.2


def test_named_dims_dtypes_and_dict_outputs_are_recorded(tmp_path):
    cap = capture(Tagger(), _example(), dynamic=SEQ, dims={"seq": (3, 64)})
    sig = cap.signature
    assert [s.shape for s in sig.inputs] == [("batch", "seq"), ("batch", "seq")]
    assert [s.dtype for s in sig.inputs] == ["int64", "bool"]
    assert sig.output_kind == "dict" and sig.output_names == ["logits", "tokens"]
    assert sig.outputs[1].shape == ("batch", "seq - 1")
    assert sig.dims == {"batch": (1, 4096), "seq": (3, 64)}
    assert cap.parity.dim_values == {"seq": (6, 9)} and cap.parity.batch_sizes == (3, 6)
    # the dict survives a JSON round trip, and the exported program runs at any seq in range
    assert Signature.from_dict(sig.to_dict()) == sig
    cap.save(tmp_path)
    prog = load_program(tmp_path / "model.pt2")
    model = Tagger().eval()
    model.load_state_dict(cap.program.state_dict)
    for batch, seq in ((1, 3), (5, 17), (2, 64)):
        ids, mask = _example(batch, seq)
        got, want = prog(ids, mask), model(ids, mask)
        assert list(got) == ["logits", "tokens"]
        for k in want:
            torch.testing.assert_close(got[k], want[k])
    ins, outs = load_examples(tmp_path / "example.npz")
    assert ins[1].dtype == torch.bool and len(outs) == 2


def test_exported_forward_refuses_out_of_range_and_disagreeing_dims(tmp_path):
    cap = capture(Tagger(), _example(), dynamic=SEQ, dims={"seq": (3, 64)})
    cap.save(tmp_path)
    prog = load_program(tmp_path / "model.pt2")
    prog.name_dims(cap.signature)
    ids, mask = _example(2, 65)
    with pytest.raises(ValueError, match=r"input 'ids' dim 1 \(seq\) is 65; the exported program accepts 3 to 64"):
        prog(ids, mask)
    with pytest.raises(ValueError, match="inputs disagree on seq"):
        prog(_example(2, 5)[0], _example(2, 6)[1])


def test_default_range_and_constraint_failure_says_what_to_try():
    # h[:, 1:] makes torch.export guard seq != 2 at min=1: the message says to narrow the range.
    with pytest.raises(CaptureError) as ei:
        capture(Tagger(), _example(), dynamic=SEQ)
    msg = str(ei.value)
    assert "seq" in msg and "dims={'NAME': (MIN, MAX)}" in msg


def test_a_size_one_dim_is_widened_for_tracing():
    ids, mask = _example(1, 1)
    cap = capture(nn.Embedding(50, 4), ids, dynamic={"input": {1: "seq"}})
    assert cap.signature.inputs[0].shape == ("batch", "seq")
    assert cap.parity.dim_values == {"seq": (1, 4)}


@pytest.mark.parametrize("dynamic, dims, match", [
    ({"nope": {1: "seq"}}, None, "model's inputs are"),
    ({"ids": {2: "seq"}}, None, "has 2 dims"),
    ({"ids": {0: "rows"}}, None, "dynamic batch already"),
    ({"ids": {1: "batch"}}, None, "other than 'batch'"),
    ({"ids": {1: "seq"}, "mask": {1: "len"}}, {"seq": (1, 4)}, "outside its range"),
    ({"ids": {1: "seq"}}, {"other": (1, 4)}, "no input names dynamic"),
    ({"ids": {1: "seq"}}, {"seq": (5, 5)}, "one value is static"),
])
def test_bad_dynamic_specs_are_refused_before_export(dynamic, dims, match):
    with pytest.raises(CaptureError, match=match):
        capture(Tagger(), _example(), dynamic=dynamic, dims=dims)


def test_inputs_sharing_a_dim_name_must_agree_in_the_example():
    ids, _ = _example(3, 6)
    with pytest.raises(CaptureError, match="disagree on seq"):
        capture(Tagger(), (ids, torch.ones(3, 5, dtype=torch.bool)), dynamic=SEQ)


def test_outputs_must_be_tensors_tuples_or_dicts():
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> list[object]:
            return [x, "text"]

    with pytest.raises(CaptureError):
        capture(Bad(), torch.ones(2, 3))


def test_old_signatures_read_with_a_batch_range_and_tuple_kind():
    old = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
           "outputs": [{"name": "output_0", "dtype": "float32", "shape": ["batch", 2]}], "max_batch": 64}
    sig = Signature.from_dict(old)
    assert sig.dims == {"batch": (1, 64)} and sig.output_kind == "tuple"
    assert Signature.from_dict({**old, "inputs": [{"name": "x", "dtype": "float32", "shape": [3, 4]}]}).dims == {}


def test_dim_values_name_the_range_and_the_inputs():
    sig = Tagger_signature()
    assert sig.dim_values([(2, 10), (2, 10)]) == {"batch": 2, "seq": 10}
    with pytest.raises(ValueError, match=r"'ids' dim 1 \(seq\) is 100; this model accepts seq from 3 to 64"):
        sig.dim_values([(2, 100), (2, 100)])
    with pytest.raises(ValueError, match="disagree on seq"):
        sig.dim_values([(2, 10), (2, 11)])


def Tagger_signature() -> Signature:  # noqa: N802 - reads as a constant
    return capture(Tagger(), _example(), dynamic=SEQ, dims={"seq": (3, 64)}).signature


def test_parse_dynamic_and_flatten_outputs():
    assert parse_dynamic(["ids:1=seq", "mask:1=seq:2..512"]) == ({"ids": {1: "seq"}, "mask": {1: "seq"}},
                                                                 {"seq": (2, 512)})
    for bad in ("ids=seq", "ids:x=seq", "ids:1=2seq"):
        with pytest.raises(CaptureError, match="INPUT:DIM=NAME"):
            parse_dynamic([bad])
    a, b = torch.ones(1), torch.zeros(1)
    assert flatten_outputs({"b": b, "a": a}, ["a", "b"]) == (a, b)
    assert flatten_outputs(a) == (a,) and flatten_outputs([a, b]) == (a, b)
