"""kit.gate.suite, the default gate's checks, on real captured models without a kernel.

The models are real: captured, registered and loaded through the registry. The failing cases swap the
loaded program for a deliberately broken eager module (NaN outputs, noise, shape-blind), the thing each
check exists to catch; those are fixtures, not mocks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from kit.errors import GateError
from kit.gate import metrics, record, suite

DEFAULT_CHECKS = ["parity on the stored example", "deterministic on repeat", "finite outputs", "batch consistency",
                  "latency p95, batch 1", "latency p95, batch 8", "wrong shape is refused"]
LOOSE = {"max_p95_ms_batch1": 1000.0, "max_p95_ms_batch_n": 5000.0, "batch_n": 8, "latency_repeats": 5}


pytestmark = pytest.mark.usefixtures("fresh_gate_recorder")  # tests/unit/conftest.py


class TwoInputs(nn.Module):
    """A text classifier: int64 token ids and a float mask, three classes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) * mask.unsqueeze(-1)
        return self.out(h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1))


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.lin(x)
        return {"score": logits.sum(1), "logits": logits}


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (6, 7), generator=gen)
    mask = torch.ones(6, 7)
    mask[:, 5:] = 0
    return ids, mask


@pytest.fixture
def two(registry):
    torch.manual_seed(0)
    registry.register("two", TwoInputs().eval(), _example())
    return registry.load("two", 1)


def _names() -> list[str]:
    return [c.name for c in record.checks()]


def _by_name(name: str) -> record.Check:
    return next(c for c in record.checks() if c.name == name)


def test_a_two_input_model_passes_every_check_without_data(two, capsys):
    suite.run_all(two, **LOOSE)
    assert _names() == DEFAULT_CHECKS
    assert all(c.passed for c in record.checks()), capsys.readouterr().out
    assert "got ValueError" in _by_name("wrong shape is refused").detail


def test_inputs_are_made_from_the_example(two):
    ids, mask = suite.make_inputs(two, 32, seed=0)
    assert ids.shape == (32, 7) and mask.shape == (32, 7) and ids.dtype == torch.int64
    ex_ids, ex_mask = two.example_inputs
    assert int(ids.min()) >= int(ex_ids.min()) and int(ids.max()) <= int(ex_ids.max())  # ids in range
    rows = {tuple(r) for r in ex_ids.tolist()}
    assert all(tuple(r) in rows for r in ids.tolist())  # whole rows resampled, ids and mask together
    assert torch.equal(mask, ex_mask[:1].expand(32, -1))
    longer, _ = suite.make_inputs(two, 2, sizes={"seq": 12}, seed=0)
    assert longer.shape == (2, 7)  # "seq" is no dim of this signature (static 7): sizes leave it alone


def test_a_nan_output_fails_finite(two):
    class NaNs(nn.Module):
        def forward(self, ids, mask):
            return torch.full((ids.shape[0], 3), float("nan"))

    suite.finite(dataclasses.replace(two, module=NaNs()))
    assert not _by_name("finite outputs").passed and _by_name("finite outputs").value > 0


def test_noise_fails_determinism_and_a_shape_blind_model_fails_the_refusal(two):
    class Noisy(nn.Module):
        def forward(self, ids, mask):
            return torch.randn(ids.shape[0], 3)

    broken = dataclasses.replace(two, module=Noisy())
    suite.determinism(broken)
    suite.wrong_shape(broken)
    suite.parity(broken)
    assert not _by_name("deterministic on repeat").passed
    assert not _by_name("wrong shape is refused").passed
    assert "answered with" in _by_name("wrong shape is refused").detail
    assert not _by_name("parity on the stored example").passed


def test_batch_consistency_catches_rows_that_leak_into_each_other(two):
    class Leaky(nn.Module):  # e.g. a BatchNorm left in training mode
        def forward(self, ids, mask):
            x = ids.double()
            return (x - x.mean(0)).sum(1, keepdim=True).expand(-1, 3).float()

    suite.batch_consistency(dataclasses.replace(two, module=Leaky()))
    assert not _by_name("batch consistency").passed


def test_tight_latency_budgets_fail(two):
    suite.latency(two, batch_n=4, max_p95_ms_batch1=0.0, max_p95_ms_batch_n=1e9, repeats=3)
    assert not _by_name("latency p95, batch 1").passed and _by_name("latency p95, batch 4").passed
    assert "better of 2 rounds" in _by_name("latency p95, batch 1").detail  # a breach must reproduce
    assert "rounds" not in _by_name("latency p95, batch 4").detail


def test_quality_accuracy_and_a_named_metric(two, tmp_path):
    ids, mask = _example()
    labels = two(ids, mask).argmax(1).numpy()
    data = tmp_path / "held_out.npz"
    np.savez(data, ids=ids.numpy(), mask=mask.numpy(), labels=labels)
    assert suite.quality(two, data, min_accuracy=0.99) == 1.0
    np.savez(data, ids=ids.numpy(), mask=mask.numpy(), labels=(labels + 1) % 3)
    assert suite.quality(two, data, min_accuracy=0.5) == 0.0
    assert [c.passed for c in record.checks() if c.name == "accuracy"] == [True, False]

    metrics = tmp_path / "my_metrics.py"
    metrics.write_text("import numpy as np\n\ndef mean_top(outputs, labels):\n    return float(outputs.max(1).mean())\n")
    score = suite.quality(two, data, metric=f"{metrics}:mean_top", max_metric=1e6)
    assert _by_name("mean_top").passed and _by_name("mean_top").value == pytest.approx(score, abs=1e-6)
    with pytest.raises(GateError, match="needs a threshold"):
        suite.quality(two, data, metric=f"{metrics}:mean_top")
    with pytest.raises(GateError, match="cannot import"):
        suite.quality(two, data, metric="no_such_module_kit:f", min_metric=0)


def test_data_with_wrong_names_says_what_to_save(two, tmp_path):
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((2, 7), dtype=np.int64), y=np.zeros(2))
    with pytest.raises(GateError, match=r"has no array\(s\) ids, mask; it holds x, y.*np.savez\(path, ids=..., mask=..."):
        suite.quality(two, data)


def test_missing_data_says_where_it_looked(two, tmp_path):
    with pytest.raises(GateError, match=r"data 'held_out.npz' is not a file \(looked for .*/project/held_out.npz\)"):
        suite.quality(two, "held_out.npz", base=tmp_path / "project")


def test_relative_paths_are_read_in_the_callers_folder(two, tmp_path):
    """The gate's caller_dir: `kit validate m@1 -p data=held_out.npz` from the project means the project's file."""
    ids, mask = _example()
    np.savez(tmp_path / "held_out.npz", ids=ids.numpy(), mask=mask.numpy(), labels=np.zeros(6, dtype=np.int64))
    (tmp_path / "scores.py").write_text("def rows(outputs, labels):\n    return float(len(outputs))\n")
    (tmp_path / "proj_metrics_kit_test.py").write_text("def rows2(outputs, labels):\n    return 2.0 * len(outputs)\n")
    assert suite.quality(two, "held_out.npz", metric="scores.py:rows", min_metric=6, base=tmp_path) == 6.0
    assert suite.quality(two, "held_out.npz", metric="proj_metrics_kit_test:rows2", max_metric=12, base=tmp_path) == 12.0


def test_data_without_labels_still_checks_outputs(two, tmp_path, capsys):
    ids, mask = _example()
    data = tmp_path / "unlabelled.npz"
    np.savez(data, ids=ids.numpy(), mask=mask.numpy())
    assert suite.quality(two, data) is None
    assert _names() == ["finite outputs on the data"] and "no accuracy check" in capsys.readouterr().out


def test_dict_outputs_are_scored_by_name(registry, tmp_path):
    torch.manual_seed(0)
    registry.register("dict", DictOut().eval(), torch.randn(5, 4))
    m = registry.load("dict", 1)
    assert [s.name for s in m.signature.outputs][:2] in (["score", "logits"], ["output_0", "output_1"])
    x = torch.randn(20, 4)
    outs = suite.run(m, (x,))
    logits_i = next(i for i, o in enumerate(outs) if o.dim() == 2)
    data = tmp_path / "d.npz"
    np.savez(data, x=x.numpy(), labels=outs[logits_i].argmax(1).numpy())
    name = m.signature.outputs[logits_i].name
    assert suite.quality(m, data, output=name, min_accuracy=0.99) == 1.0
    with pytest.raises(GateError, match="is not one of the model's outputs"):
        suite.quality(m, data, output="nope")


class HalfIn(nn.Module):
    """bfloat16 features in (a dtype numpy lacks), float16 scores out."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.float()).half()


def test_a_bfloat16_input_passes_every_check(registry, capsys):
    """numpy has no bfloat16: the gate makes its inputs as float32 and casts them back for the program,
    which refuses any other dtype (the real zoo's bfloat16 model failed its gate on exactly that)."""
    torch.manual_seed(0)
    registry.register("half", HalfIn().eval(), torch.randn(4, 6).to(torch.bfloat16), onnx=False)
    m = registry.load("half", 1)
    (x,) = suite.make_inputs(m, 8, seed=0)
    assert x.dtype == torch.bfloat16 and x.shape == (8, 6)
    suite.run_all(m, **LOOSE)
    assert all(c.passed for c in record.checks()), capsys.readouterr().out


def test_accuracy_of_binary_scores():
    assert metrics.accuracy(np.array([[2.0], [-1.0]]), np.array([1, 0])) == 1.0  # logits
    assert metrics.accuracy(np.array([0.9, 0.2, 0.6]), np.array([1, 0, 0])) == pytest.approx(2 / 3)  # probabilities
    with pytest.raises(GateError, match="Cannot compute accuracy"):
        metrics.accuracy(np.zeros((4, 2, 2)), np.zeros(4))


def test_every_dynamic_dim_is_exercised(registry):
    import inspect

    from kit.capture import capture

    if "dynamic" not in inspect.signature(capture).parameters:
        pytest.skip("kit.capture.capture has no dynamic= (named dynamic dims) in this checkout")
    torch.manual_seed(0)
    registry.register("seq", TwoInputs().eval(), _example(),
                      dynamic={"ids": {1: "seq"}, "mask": {1: "seq"}}, dims={"seq": (2, 64)})
    m = registry.load("seq", 1)
    assert suite.dim_ranges(m)["seq"] == (2, 64)
    assert suite.dynamic_dims(m) == {"seq": [2, 7, 64]}
    c = _by_name("dynamic dim seq")
    assert c.passed and c.threshold == "2..64", c.detail
    suite.wrong_shape(m)  # every dim is dynamic: one dim too many must be refused
    assert _by_name("wrong shape is refused").passed and _by_name("wrong shape is refused").value == "(2, 7, 1)"
