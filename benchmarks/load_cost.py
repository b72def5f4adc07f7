"""What verified-once loads and the local verified cache (kit.registry.cache, issue 17) cost per load, and
that they cost nothing per request, for the demo MLP and a ~400 MB model (benchmarks/large_model.py's).

Per model, medians of ``--repeat`` runs (the registry's files are in the page cache: a cold disk adds its
read time to both the old and the new first load):

- ``verify_meta``: meta.json read once and its signature checked (``Registry.verified``), on every load;
- ``old_checks``: what a load checked before the cache: the signature over a second read of meta.json and
  every file's sha256 read by path (``check_integrity``), then the files parsed again from the registry;
- ``cache_copy``: a first load's copy of the files into the cache while hashing them (one read);
- ``cache_hit``: a later load's check of the entry (one stat per file, no hashing);
- ``load_first`` / ``load_cached`` / ``load_from_registry``: a whole ``Registry.load`` (check_env off) with a
  cold cache, with the entry already there, and the same parse straight from the registry's files (the
  old load, less its checks);
- ``forward_us``: one batch-1 call of the module loaded from the cache vs from the registry's file: the
  request path is the same code over the same kind of mapping, so the difference is noise.

Writes benchmarks/results/load_cost.json and prints it. Takes about a minute and ~1.5 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kit.backends.checks import DEFAULT_LIMITS
from kit.capture import load_examples, load_program
from kit.registry import Registry
from kit.registry.cache import VersionCache
from kit.signing import Keyring

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _median(fn: Callable[[], Any], repeat: int, setup: Callable[[], Any] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _forward_us(module: Any, x: torch.Tensor, calls: int) -> float:
    with torch.inference_mode():
        for _ in range(20):
            module(x)
        t0 = time.perf_counter()
        for _ in range(calls):
            module(x)
    return (time.perf_counter() - t0) / calls * 1e6


def measure(tmp: Path, name: str, model: Any, example: torch.Tensor, repeat: int) -> dict[str, Any]:
    reg = Registry(tmp / "registry", user="bench", keyring=Keyring(tmp / "keys"), cache_dir=tmp / "cache")
    mv = reg.register(name, model, example)
    vv = reg.verified(name, 1)
    caches = iter(range(10_000))

    def cold() -> None:
        reg.cache = VersionCache(tmp / "caches" / str(next(caches)))

    def old_parse() -> None:
        load_program(mv.path / "model.pt2", DEFAULT_LIMITS)
        load_examples(mv.path / "example.npz", DEFAULT_LIMITS)

    out: dict[str, Any] = {"model": name, "bytes": mv.size_bytes, "repeat": repeat}
    out["verify_meta_s"] = _median(lambda: reg.verified(name, 1), repeat)
    out["old_checks_s"] = _median(lambda: reg.check_integrity(mv), repeat)
    out["cache_copy_s"] = _median(lambda: reg.cache.materialize(vv, DEFAULT_LIMITS.max_bytes), repeat, cold)
    out["cache_hit_s"] = _median(lambda: reg.cache.materialize(vv, DEFAULT_LIMITS.max_bytes), repeat)
    out["load_first_s"] = _median(lambda: reg.load(name, 1, check_env=False), repeat, cold)
    out["load_cached_s"] = _median(lambda: reg.load(name, 1, check_env=False), repeat)
    out["load_from_registry_s"] = _median(old_parse, repeat)
    out["old_load_s"] = out["old_checks_s"] + out["load_from_registry_s"]
    x = example[:1]
    calls = 2000 if mv.size_bytes < 10 << 20 else 20
    cached = reg.load(name, 1, check_env=False).module
    direct = load_program(mv.path / "model.pt2", DEFAULT_LIMITS)
    out["forward_us"] = {"from_cache": round(_forward_us(cached, x, calls), 1),
                         "from_registry": round(_forward_us(direct, x, calls), 1), "calls": calls}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-large", action="store_true", help="only the demo model")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "load_cost.json")
    args = ap.parse_args(argv)
    from kit.demo import DigitsMLP

    results = []
    with tempfile.TemporaryDirectory(prefix="kit-load-cost-") as d:
        torch.manual_seed(0)
        results.append(measure(Path(d) / "demo", "demo", DigitsMLP().eval(), torch.rand(2, 64), args.repeat))
        if not args.no_large:
            from large_model import large_model

            results.append(measure(Path(d) / "large", "large", large_model(), torch.rand(2, 512),
                                   max(3, args.repeat // 2)))
    report = {"benchmark": "load_cost", "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
