"""The rules Kit keeps in one place each: "matches the reference" (kit.backends.parity.compare), the canary
weight (kit.registry.names.check_weight / parse_weight) and the sha256 hex digest (is_sha256_hex), and
that the places that used to carry their own copy now answer by them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kit.backends.parity import compare
from kit.errors import InvalidNameError, RegistryCorruptError, ServiceError
from kit.registry.names import check_weight, is_sha256_hex, parse_weight
from kit.registry.records import Aliases

F = np.float32


# ---------------------------------------------------------------- matches the reference


def test_within_tolerance_and_the_worst_difference():
    m = compare([np.array([1.0, 2.0], F)], [np.array([1.0, 2.0 + 5e-6], F)], atol=1e-5, rtol=0)
    assert m.ok and m.max_abs_diff == pytest.approx(5e-6, rel=0.1)
    m = compare([np.array([1.0, 2.0], F)], [np.array([1.0, 2.1], F)], atol=1e-5, rtol=1e-4)
    assert not m.ok and m.max_abs_diff == pytest.approx(0.1, rel=1e-3)
    assert compare([np.array([100.0])], [np.array([100.5])], atol=0, rtol=1e-2).ok  # rtol scales with |want|


def test_nan_matches_nan_at_the_same_place_only():
    nan = float("nan")
    m = compare([np.array([nan, 1.0])], [np.array([nan, 1.0])], atol=1e-5, rtol=1e-4)
    assert m.ok and m.max_abs_diff == 0.0
    m = compare([np.array([nan, 1.0])], [np.array([1.0, 1.0])], atol=1e-5, rtol=1e-4)
    assert not m.ok and math.isinf(m.max_abs_diff)
    m = compare([np.array([1.0, 1.0])], [np.array([1.0, nan])], atol=1e-5, rtol=1e-4)
    assert not m.ok and math.isinf(m.max_abs_diff)
    inf = float("inf")
    assert compare([np.array([inf, -inf])], [np.array([inf, -inf])], atol=0, rtol=0) == compare(
        [np.array([0.0])], [np.array([0.0])], atol=0, rtol=0)
    assert not compare([np.array([inf])], [np.array([-inf])], atol=1, rtol=1).ok


def test_shapes_counts_and_integers_must_be_equal():
    assert not compare([np.zeros((2, 3))], [np.zeros((3, 2))], atol=1, rtol=1).ok
    assert math.isinf(compare([np.zeros(2)], [np.zeros(2), np.zeros(2)], atol=1, rtol=1).max_abs_diff)
    assert compare([np.array([1, 2])], [np.array([1, 2])], atol=0, rtol=0).ok
    m = compare([np.array([1, 2])], [np.array([1, 3])], atol=5, rtol=5)  # ids: a tolerance never applies
    assert not m.ok and math.isinf(m.max_abs_diff)
    assert not compare([np.array([True])], [np.array([False])], atol=1, rtol=1).ok


def test_half_precision_gets_its_floor():
    got, want = [np.array([1.0], F)], [np.array([1.001], F)]
    assert not compare(got, want, atol=1e-5, rtol=1e-4).ok
    assert compare(got, want, atol=1e-5, rtol=1e-4, dtypes=["torch.float16"]).ok
    assert compare([np.array([1.0], np.float16)], [np.array([1.001], np.float16)], atol=1e-5, rtol=1e-4).ok


# ---------------------------------------------------------------- the canary weight


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, 1.5, True, "x", None, 0.0])
def test_check_weight_refuses(bad):
    with pytest.raises(InvalidNameError, match="Canary weight"):
        check_weight(bad)


def test_check_weight_and_parse_weight_share_the_range():
    assert check_weight(1) == 1.0 and check_weight("0.25") == 0.25
    assert check_weight(0, allow_zero=True) == 0.0
    assert parse_weight("10%") == pytest.approx(0.1) and parse_weight("0") == 0.0
    for text in ("nan", "nan%", "-5%", "101%", "inf"):
        with pytest.raises(InvalidNameError, match="Canary weight"):
            parse_weight(text)


@pytest.mark.parametrize("weight", ["NaN", 1.5, -1, True])
def test_aliases_json_with_a_bad_weight_is_corrupt(weight):
    doc = json.loads(json.dumps({"production": {"version": 1}, "canary": {"version": 2, "weight": weight}}))
    with pytest.raises(RegistryCorruptError, match="malformed"):
        Aliases.from_json(doc, "reg/m/aliases.json")


def test_traffic_and_deploy_refuse_a_nan_weight_before_any_work(registry):
    from kit.deploy import deploy
    from kit.traffic import set_traffic

    with pytest.raises(InvalidNameError, match="Canary weight"):
        set_traffic(registry, "m", 1, float("nan"))
    with pytest.raises(InvalidNameError, match="Canary weight"):
        deploy(registry, None, None, "m", canary=float("nan"))


# ---------------------------------------------------------------- sha256 hex digests


def test_is_sha256_hex():
    good = "ab" * 32
    assert is_sha256_hex(good)
    for bad in (good.upper(), good[:-1], good + "0", good[:-1] + "\n", good[:-1] + "g", 64, None, "٠" * 64):
        assert not is_sha256_hex(bad), bad


def test_service_settings_and_keys_files_use_it(tmp_path):
    from kit.servicegen import render
    from kit.serving.security import read_keys_file

    (tmp_path / "keys").write_text("# ops\n" + "cd" * 32 + "\n")
    assert read_keys_file(tmp_path / "keys") == ("cd" * 32,)
    (tmp_path / "keys").write_text("cd" * 31 + "zz\n")
    with pytest.raises(ServiceError, match="keys:1: .* not a sha256 hex digest"):
        read_keys_file(tmp_path / "keys")
    with pytest.raises(ServiceError, match="not a sha256 hex digest"):
        render("svc", "m", registry="reg", api_keys_sha256=["ab" * 31])
