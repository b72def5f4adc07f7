"""Lean serving archives (issue 22): size by package, pack time, compression, start to first answer.

    .venv/bin/python benchmarks/pack_size.py [--skip-compression] [--out benchmarks/results/pack_size.json]

For the demo MLP and a two-input text model (int64 ids + mask, a dict output), each on the torch and the
onnxruntime backend: register (signed, with ONNX), generate the service, ``pack()`` it from this venv
(cold: an empty layer cache; then warm), print the shipped/left-out table, extract the archive elsewhere
and time ``run.sh start`` to the first correct answer of the stored example: the first start (every file
hashed, then sealed) and a later one (the sealed tree's check). ``verify_archive`` (``kit pack --verify``:
unpack, serve, example, import audit) runs on each archive. Compression: the torch environment layer as a
plain tar, compressed with gzip -1/-4/-6, zstd -3/-10 (-T0) and xz -1 (-T0); sizes, seconds both ways.
Results go next to this script (``results/pack_size.json``), with the machine's load average.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _models() -> dict[str, tuple[Any, tuple[Any, ...], dict[str, Any]]]:
    import torch
    from torch import nn

    from kit.demo import digits_split, train

    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(1000, 32)
            self.head = nn.Linear(32, 4)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
            m = mask.unsqueeze(-1).to(torch.float32)
            pooled = (self.emb(ids) * m).sum(1) / m.sum(1).clamp(min=1.0)
            logits = self.head(pooled)
            return {"logits": logits, "score": logits.max(dim=1).values}

    split = digits_split()
    mlp, _acc = train(epochs=3, split=split)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    text_kw = {"dynamic": {"ids": {1: "seq"}, "mask": {1: "seq"}}, "dims": {"seq": (2, 64)}}
    return {"demo-digits": (mlp.eval(), (torch.from_numpy(split.x_test[:1]),), {}),
            "text2": (Text().eval(), (ids, torch.ones(2, 7, dtype=torch.int64)), text_kw)}


def _start_to_answer(archive: Path, work: Path, model: str, versions: list[int], starts: int = 2) -> list[float]:
    """Extract ``archive`` into ``work``; per start: seconds from ``run.sh start`` to the first correct answer."""
    from kit._proc import free_port, stop_group
    from kit.pack.verify import extract, predict_example, start_unpacked

    root = extract(archive, work / "unpacked")
    out = []
    for i in range(starts):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        t = time.monotonic()
        proc = start_unpacked(root, port, work / f"start{i}.log", cwd=work,
                              extra_env={"KIT_STATE_DIR": str(work / "state"), "XDG_CACHE_HOME": str(work / "cache")})
        try:
            deadline = t + 300
            while True:
                try:
                    predict_example(url, root, model, versions, attempts=1)
                    break
                except Exception:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError((work / f"start{i}.log").read_text()[-3000:]) from None
                    time.sleep(0.02)
            out.append(round(time.monotonic() - t, 2))
        finally:
            stop_group(proc, timeout=30, whole_group=True)
    return out


def _compression(layer: Path, work: Path) -> list[dict[str, Any]]:
    """The environment layer as a plain tar, through each compressor (the binaries a server would use)."""
    tar = work / "env.tar"
    with gzip.open(layer, "rb") as src, open(tar, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    raw = tar.stat().st_size
    rows = [{"codec": "none", "bytes": raw, "pack_s": 0.0, "unpack_s": 0.0}]
    cases = [("gzip -1", ["gzip", "-1", "-c"], ["gzip", "-dc"]), ("gzip -4", ["gzip", "-4", "-c"], ["gzip", "-dc"]),
             ("gzip -6", ["gzip", "-6", "-c"], ["gzip", "-dc"]),
             ("zstd -3 -T0", ["zstd", "-3", "-T0", "-q", "-c"], ["zstd", "-dc", "-q"]),
             ("zstd -10 -T0", ["zstd", "-10", "-T0", "-q", "-c"], ["zstd", "-dc", "-q"]),
             ("xz -1 -T0", ["xz", "-1", "-T0", "-c"], ["xz", "-dc", "-T0"])]
    for name, enc, dec in cases:
        if shutil.which(enc[0]) is None:
            continue
        out = work / "c.bin"
        t = time.monotonic()
        with open(tar, "rb") as i, open(out, "wb") as o:
            subprocess.run(enc, stdin=i, stdout=o, check=True)
        pack_s = time.monotonic() - t
        t = time.monotonic()
        with open(out, "rb") as i:
            subprocess.run(dec, stdin=i, stdout=subprocess.DEVNULL, check=True)
        rows.append({"codec": name, "bytes": out.stat().st_size, "pack_s": round(pack_s, 1),
                     "unpack_s": round(time.monotonic() - t, 1)})
        out.unlink()
        print(f"  {name:<14} {rows[-1]['bytes'] / 1e6:8.1f} MB  pack {pack_s:6.1f}s  unpack {rows[-1]['unpack_s']:5.1f}s",
              flush=True)
    tar.unlink()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "pack_size.json")
    ap.add_argument("--skip-compression", action="store_true", help="keep the compression table of the last run")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kit-bench-pack-"))
    os.environ["KIT_KEYS_DIR"] = str(work / "keys")
    os.environ["KIT_CACHE_DIR"] = str(work / "kit-cache")
    from kit.pack import pack, verify_archive
    from kit.registry import Registry
    from kit.servicegen import generate
    from kit.signing import Keyring

    keyring = Keyring(work / "keys")
    reg = Registry(work / "registry", require_gate=True, user="bench", keyring=keyring)
    results: dict[str, Any] = {"load_before": os.getloadavg(), "cpus": os.cpu_count(), "runs": []}
    cache = work / "layers"
    try:
        for name, (model, example, kw) in _models().items():
            mv = reg.register(name, model, example if len(example) > 1 else example[0], **kw)
            reg.promote(name, mv.version, force=True, why="benchmark")
            for backend in ("torch", "onnxruntime"):
                svc = generate(f"{name}-{backend[:4]}", name, registry=reg.root, out_dir=work / "services",
                               backend=backend, workers=1, trusted_keys=keyring.service_keys())
                cold = backend not in {r["backend"] for r in results["runs"]}  # its layer is not cached yet
                lines: list[str] = []
                res = pack(svc, out_dir=work / "dist", cache_dir=cache, keyring=keyring, progress=lines.append)
                table = [ln for ln in lines if ln.startswith(("packages", "  "))]
                print(f"\n{name} / {backend}: {res.size_bytes / 1e6:.1f} MB in {res.seconds:.1f}s "
                      f"(layer cached: {res.layer_cached}; {res.timings})", flush=True)
                if cold:
                    print("\n".join(table))
                res2 = pack(svc, out_dir=work / "dist", cache_dir=cache, keyring=keyring)
                answers = _start_to_answer(res.archive, Path(tempfile.mkdtemp(dir=work)), name, [mv.version])
                trusted = tuple(k.text() for k in keyring.trust().keys)
                rep = verify_archive(res.archive, trusted_keys=trusted)
                print(f"  warm pack {res2.seconds:.1f}s; start -> first answer: first start {answers[0]}s, "
                      f"sealed {answers[1:]}s; --verify ok, audit {rep.audit}", flush=True)
                results["runs"].append({
                    "model": name, "backend": backend, "archive_bytes": res.size_bytes, "env_bytes": res.env_bytes,
                    "checked_files": res.checked_files, "pack_s": res.seconds, "pack_cold": cold,
                    "layer_cached": res.layer_cached, "timings": res.timings, "warm_pack_s": res2.seconds,
                    "shipped": res.shipped, "left_out": len(res.left_out), "table": table if cold else None,
                    "start_to_answer_first_s": answers[0], "start_to_answer_sealed_s": answers[1:],
                    "verify": {"ready_s": rep.ready_seconds, "audit": rep.audit}})
        if args.skip_compression and args.out.is_file():  # keep the last measured table
            last = json.loads(args.out.read_text())
            results.update({k: last[k] for k in ("compression", "compression_note") if k in last})
        if not args.skip_compression:
            torch_layer = max((p for p in cache.glob("env-*.gz")), key=lambda p: p.stat().st_size)
            print(f"\ncompression of the largest (torch) environment layer {torch_layer.name}:", flush=True)
            results["compression"] = _compression(torch_layer, work)
            results["compression_note"] = f"the torch env layer as a plain tar, load {os.getloadavg()[0]:.1f}"
        results["load_after"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nwrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
