"""The line's costs: `dmad serve`, `dmad predict` and the exported scorer (ONNX under onnxruntime,
TorchScript) against the backbone's own forward time, for DMAD and the PatchCore kNN baseline on the same
features and normal bank, measured in the same run.

    .venv/bin/python benchmarks/serve.py [--home H] [--requests 48] [--clients 1 4 16] [--size 256]

Without ``--home`` it builds a home in a temporary folder from procedural images (two classes, 256 px, the
offline preset; procedural images are fine for timing, not for quality) and trains one version there.
Every row gives images per second, p50 / p99 latency of one request, and the ratio of its per-image time
to the backbone's forward alone (batch 16). Peak memory of this process at the end.
"""

from __future__ import annotations

import argparse
import functools
import io
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_home(root: Path, size: int) -> Path:
    from app.cli import main as dmad
    from dmad_core.data.synthetic import make_synthetic_category

    folders = [make_synthetic_category(root / "data", name, n_train=24, n_test_good=6, n_test_defect=6,
                                       texture=texture, size=size, seed=3)
               for name, texture in (("tiles", "grid"), ("fabric", "weave"))]
    home = root / "home"
    for argv in (["init", "--home", str(home)], ["ingest", "--home", str(home), *map(str, folders)],
                 ["train", "--home", str(home)]):
        if dmad(argv) != 0:
            sys.exit(f"serve.py: dmad {argv[0]} failed")
    return home


def images(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def backbone_ms(line, arrays: list[np.ndarray], batch: int) -> float:
    """The backbone's forward alone (with its resize and patch head), per image, at ``batch`` images a call
    (after one warm-up call)."""
    store = line.model.features
    store.compute(arrays[:batch])
    t0 = time.perf_counter()
    for start in range(0, len(arrays), batch):
        store.compute(arrays[start:start + batch])
    return 1000 * (time.perf_counter() - t0) / len(arrays)


def in_process(line, payloads: list[bytes], category: str, batch: int) -> float:
    """Milliseconds per image of LineModel.score (decode included) at ``batch`` images a call."""
    from app.services.line.prediction import LineImage

    t0 = time.perf_counter()
    for start in range(0, len(payloads), batch):
        line.score([LineImage.from_bytes(p, category) for p in payloads[start:start + batch]])
    return 1000 * (time.perf_counter() - t0) / len(payloads)


def _serve_child(home_root: str, port: int, max_batch: int, knn: bool) -> None:
    """The service in its own process, as `dmad serve` runs (the kNN baseline cannot be chosen there)."""
    import uvicorn

    from app.api.scoring import ServeConfig, create_app
    from app.home_folder import Home
    from app.services.database import open_database
    from app.services.line.prediction import LineModel

    home = Home.at(home_root)
    loader = functools.partial(LineModel.load, knn_baseline=knn)
    app = create_app(home, open_database(home), ServeConfig(feed=False, max_queue=256, max_batch=max_batch),
                     token="bench", loader=loader)
    uvicorn.run(app, host="127.0.0.1", port=port, backlog=2048, log_level="warning")


def over_http(home_root: Path, payloads: list[bytes], clients: int, category: str, max_batch: int,
              knn: bool) -> tuple[float, float, float, int]:
    """(images/s, p50 ms, p99 ms, non-200 answers) of ``clients`` concurrent clients sharing ``payloads``,
    against the service running in a process of its own (clients and server do not share a GIL)."""
    import multiprocessing

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = multiprocessing.get_context("spawn").Process(target=_serve_child,
                                                         args=(str(home_root), port, max_batch, knn), daemon=True)
    child.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not child.is_alive():
            sys.exit("serve.py: the service did not start")
        time.sleep(0.2)
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    token = {"Authorization": "Bearer bench", "Content-Type": "image/png"}

    def client(k: int) -> None:
        with httpx.Client(timeout=300) as http:
            for payload in payloads[k::clients]:
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/score?category={category}", content=payload, headers=token)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    failures[0] += r.status_code != 200

    try:
        with httpx.Client() as http:  # warm-up
            http.post(f"{url}/v1/score?category={category}", content=payloads[0], headers=token, timeout=300)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        child.terminate()
        child.join(timeout=30)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return len(payloads) / wall, 1000 * statistics.median(latencies), 1000 * p99, failures[0]


def exported_ms(home, sessions, out: Path, fmt: str, arrays: list[np.ndarray], category: str) -> float:
    """Milliseconds per image of an exported file run by onnxruntime or torch.jit (after one warm-up)."""
    from app.services.line.export import export_version
    from app.services.line.exported import ExportedModel

    export_version(home, sessions, out, fmt)
    model = ExportedModel.load(out)
    model.score(arrays[0], category)
    t0 = time.perf_counter()
    for array in arrays:
        model.score(array, category)
    return 1000 * (time.perf_counter() - t0) / len(arrays)


def predict_cli(home: Path, folder: Path) -> float:
    """Seconds of `dmad predict` on a folder, as a user runs it (a new process: imports and model load included)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "app.cli", "predict", "--home", str(home), str(folder), "--category",
                    "tiles", "-o", str(folder / "out.jsonl")], check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, help="a trained home (default: a procedural one in a temporary folder)")
    ap.add_argument("--category", default="tiles")
    ap.add_argument("--requests", type=int, default=48, help="images per measurement")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--size", type=int, default=256, help="side of the procedural images")
    ap.add_argument("--max-batch", type=int, nargs="+", default=[1, 4, 16], help="serve's batch bounds to try")
    args = ap.parse_args()

    from app.home_folder import Home
    from app.services.database import open_database
    from app.services.line.prediction import LineModel

    with tempfile.TemporaryDirectory(prefix="dmad-serve-bench-") as tmp:
        home_root = args.home or build_home(Path(tmp), args.size)
        home = Home.at(home_root)
        sessions = open_database(home)
        payloads = images(args.requests, args.size)
        arrays = [np.asarray(PIL.Image.open(io.BytesIO(p)).convert("RGB")) for p in payloads]
        line = LineModel.load(home, sessions)
        knn = LineModel.load(home, sessions, knn_baseline=True)
        by_batch = {b: backbone_ms(line, arrays, b) for b in (1, 4, 16)}
        base = min(by_batch.values())
        print("backbone forward alone: " + ", ".join(f"batch {b}: {ms:.1f} ms an image" for b, ms in by_batch.items())
              + f"; the fastest ({base:.1f} ms, {1000 / base:.1f} images/s) is the 1.00x below")
        print("| path | scorer | clients | images/s | p50 ms | p99 ms | per image vs backbone | non-200 |")
        print("|---|---|---|---|---|---|---|---|")
        for name, model in (("kNN baseline", knn), ("DMAD", line)):
            for batch in (1, 4, 16):
                ms = in_process(model, payloads, args.category, batch)
                print(f"| in process, batch {batch} | {name} | - | {1000 / ms:.1f} | - | - | {ms / base:.2f}x | - |")
        for name, knn_flag in (("kNN baseline", True), ("DMAD", False)):
            for max_batch in args.max_batch:
                for clients in args.clients:
                    rate, p50, p99, bad = over_http(home_root, payloads, clients, args.category, max_batch, knn_flag)
                    print(f"| dmad serve, max batch {max_batch} | {name} | {clients} | {rate:.1f} | {p50:.0f} | {p99:.0f} | "
                          f"{1000 / rate / base:.2f}x | {bad} |", flush=True)
        for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".pt")):
            exported = exported_ms(home, sessions, Path(tmp) / f"model{suffix}", fmt, arrays, args.category)
            print(f"| exported {fmt} ({'onnxruntime' if fmt == 'onnx' else 'torch.jit'}), batch 1 | DMAD | - | "
                  f"{1000 / exported:.1f} | - | - | {exported / base:.2f}x | - |", flush=True)
        folder = Path(tmp) / "predict"
        folder.mkdir()
        for i, p in enumerate(payloads):
            (folder / f"{i:03d}.png").write_bytes(p)
        seconds = predict_cli(home_root, folder)
        print(f"| dmad predict (new process, {len(payloads)} files) | DMAD | - | {len(payloads) / seconds:.1f} | - | - | "
              f"{1000 * seconds / len(payloads) / base:.2f}x | - |")
        print(f"peak memory of this process: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
