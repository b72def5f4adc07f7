"""Fast unit tests of the serving pieces: router, config, security, device, import hygiene."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kit.backends.pt2.serve import resolve_device as _resolve_device
from kit.errors import ServiceError, ServingError
from kit.servicegen import render
from kit.serving.config import load_service_config, worker_plan
from kit.serving.protocol import RequestError
from kit.serving.router import RouteError, choose, user_bucket
from kit.serving.security import ApiKeys, RateLimiter, hash_key


def _state(canary=True, weight=0.25):
    return SimpleNamespace(production=SimpleNamespace(version=1),
                           canary=SimpleNamespace(version=2) if canary else None, weight=weight)


def test_router_override_sticky_random():
    st = _state()
    assert choose(st, model="m", override="2")[0].version == 2
    assert choose(st, model="m", override="canary") == (st.canary, "override")
    with pytest.raises(RouteError, match="not served here"):
        choose(st, model="m", override="7")
    with pytest.raises(RequestError, match="is not 'production', 'canary' or a version number"):
        choose(st, model="m", override="../x")
    assert choose(_state(canary=False), model="m") == (_state(canary=False).production, "production")
    for u in ("alice", "bob", "carol"):
        first = choose(st, model="m", user=u)
        assert all(choose(st, model="m", user=u) == first for _ in range(5))
        assert first[1] == "sticky" and (first[0].version == 2) == (user_bucket("m", u) < 0.25)
    assert choose(st, model="m", rand=lambda: 0.1)[0].version == 2
    assert choose(st, model="m", rand=lambda: 0.3)[0].version == 1


def test_user_buckets_are_uniform_and_monotone():
    b = [user_bucket("m", f"user-{i}") for i in range(20000)]
    share = sum(x < 0.25 for x in b) / len(b)
    assert abs(share - 0.25) < 4 * (0.25 * 0.75 / len(b)) ** 0.5
    # raising a weight only adds users to the canary
    assert all((x < 0.1) <= (x < 0.25) for x in b)


def _write(tmp_path, text):
    (tmp_path / "service.toml").write_text(text)
    return tmp_path


def test_config_overrides_and_errors(tmp_path):
    d = _write(tmp_path, render("svc", "m", registry="../reg")["service.toml"])
    cfg = load_service_config(d, {"KIT_BIND": "127.0.0.1:9", "KIT_REGISTRY": "/srv/reg"})
    assert cfg.bind == "127.0.0.1:9" and str(cfg.registry) == "/srv/reg" and cfg.model == "m"
    assert load_service_config(d).registry == (tmp_path / "../reg").resolve()
    _write(tmp_path, '[service]\nname = "s"\nthreds = 3\n[model]\nname = "m"\nregistry = "r"\n')
    with pytest.raises(ServiceError, match="unknown key 'threds'"):
        load_service_config(tmp_path)
    _write(tmp_path, '[service]\nname = "s"\nworkers = "two"\n[model]\nname = "m"\nregistry = "r"\n')
    with pytest.raises(ServiceError, match="must be a int"):
        load_service_config(tmp_path)
    with pytest.raises(ServiceError, match="No service.toml"):
        load_service_config(tmp_path / "nowhere")


def test_api_key_digests_from_the_environment_add_to_the_file(tmp_path):
    a, b = hash_key("a"), hash_key("b")
    d = _write(tmp_path, render("svc", "m", registry="r", api_keys_sha256=[a])["service.toml"])
    assert load_service_config(d).api_keys_sha256 == (a,)
    cfg = load_service_config(d, {"KIT_API_KEYS_SHA256": f" {b} ,"})
    assert cfg.api_keys_sha256 == (a, b) and cfg.auth_enabled
    (tmp_path / "noauth").mkdir()
    d2 = _write(tmp_path / "noauth", render("svc", "m", registry="r")["service.toml"])
    assert not load_service_config(d2).auth_enabled
    assert load_service_config(d2, {"KIT_API_KEYS_SHA256": b}).auth_enabled, "an env key turns auth on"
    with pytest.raises(ServiceError, match="KIT_API_KEYS_SHA256 holds 'not-a-digest'"):
        load_service_config(d2, {"KIT_API_KEYS_SHA256": "not-a-digest"})


def test_worker_plan_keeps_torch_threads_within_cores():
    cfg = SimpleNamespace(workers=0, torch_threads=0)
    for cores in (1, 2, 4, 16):
        w, t = worker_plan(cfg, cores)  # type: ignore[arg-type]
        assert w * t <= max(cores, w) and t >= 1


def test_render_is_deterministic_and_escapes_nothing_unsafe():
    a = render("svc", "m", registry="../registry", workers=2)
    assert a == render("svc", "m", registry="../registry", workers=2)
    assert 'name = "m"' in a["service.toml"] and "app:app" in a["gunicorn.conf.py"]
    with pytest.raises(ServiceError, match="quote"):
        render("svc", "m", registry='x"y')
    with pytest.raises(ServiceError, match="Unknown service option"):
        render("svc", "m", registry="r", wokers=2)


def test_api_keys_and_rate_limit(tmp_path):
    keys = ApiKeys((hash_key("a"),))
    assert keys.check("a") and not keys.check("b") and not keys.check(None)
    f = tmp_path / "keys"
    f.write_text(f"# ops\n{hash_key('c')}\n")
    fk = ApiKeys((), f)
    assert fk.enabled and fk.check("c") and not fk.check("a")
    f.write_text("nothex\n")
    with pytest.raises(ServiceError, match="not a sha256"):
        ApiKeys((), f)
    rl = RateLimiter(rate=2, burst=2)
    assert [rl.allow("x")[0] for _ in range(3)] == [True, True, False]
    assert rl.allow("y")[0]


def test_cuda_device_is_refused_with_a_clear_message_without_a_gpu():
    if torch.cuda.is_available():
        assert _resolve_device("cuda") == "cuda"
    else:  # this machine: no GPU, so the cuda path must fail loudly, naming the fix
        with pytest.raises(ServingError, match="device = \\\\\"cpu\\\\\"|no CUDA GPU"):
            _resolve_device("cuda")


