"""Seconds from an annotation to the new active model version, on this machine, against training that
version from scratch in the same run. Everything goes through the real CLI in its own processes, as a
user or the Label Studio receiver would call it.

    .venv/bin/python benchmarks/annotation_latency.py [--data DIR ...] [--outliers DIR] [--annotate N]

With ../shared/data present it uses tire + bottle (MVTec 3D-AD, MVTec AD) in one model, DTD textures
as outliers, and annotates N (default 10) defective tire images with the dataset's own masks. Steps:

1. `init`, `ingest`, `train`: the first, unsupervised version (cold feature cache).
2. N `annotate --mask` calls, then `worker --once`: the semi-supervised version; per-class metrics of
   both versions side by side, as `status --json` records them.
3. A worker running in the background; ONE more `annotate` call; the seconds until `status` shows a new
   active version (the latency an inspector sees).
4. The same data trained from scratch: `train` in the same home (features cached) and in a fresh home
   (nothing cached). Ratios against the latency of step 3.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages are importable from the checkout
SHARED = ROOT.parent / "shared" / "data"
METRICS = ("image_auroc", "pixel_auroc", "pro")


def dmad(home: Path, *argv: str, quiet: bool = True) -> str:
    """Runs `dmad <argv> --home HOME` in a new process; returns stdout, raises with stderr on failure."""
    cmd = [sys.executable, "-m", "app.cli", *argv, "--home", str(home)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`dmad {' '.join(argv)}` failed ({done.returncode}):\n{done.stderr[-3000:]}")
    if not quiet:
        print(done.stdout, end="")
    return done.stdout


def status(home: Path) -> dict:
    return json.loads(dmad(home, "status", "--json"))


@functools.lru_cache(maxsize=None)
def _sessions(home: Path):
    from app.home_folder import Home
    from app.services.database import open_database

    return open_database(Home.at(home))


def active_name(home: Path) -> str | None:
    """Read straight from the database (a `dmad status` process per poll would steal CPU from the
    worker on a 2-core machine and inflate the latency it measures)."""
    from app.services.loop.versions import active_version

    with _sessions(home)() as session:
        version = active_version(session)
        return version.name if version else None


def defects_with_masks(category: Path, n: int, seed: int) -> list[tuple[Path, Path]]:
    """N (image, mask) pairs drawn with a seed from an MVTec 3D-AD (rgb/gt) or MVTec AD layout."""
    pairs = [(img, img.parent.parent / "gt" / img.name) for img in sorted(category.glob("test/*/rgb/*.png"))
             if img.parent.parent.name != "good"]
    pairs += [(img, category / "ground_truth" / img.parent.name / f"{img.stem}_mask.png")
              for img in sorted(category.glob("test/*/*.png")) if img.parent.name != "good"]
    pairs = [(img, mask) for img, mask in pairs if mask.exists()]
    if len(pairs) < n + 1:
        raise SystemExit(f"{category} has {len(pairs)} defective images with masks; {n + 1} are needed")
    return random.Random(seed).sample(pairs, n + 1)


def metric_table(home: Path, names: list[str]) -> str:
    history = status(home)["metrics"]
    lines = [f"{'class':<10}{'metric':<13}" + "".join(f"{n:>9}" for n in names)]
    for category, rows in sorted(history.items()):
        per_version = {row["version"]: row["values"] for row in rows}
        for metric in METRICS:
            cells = []
            for name in names:
                value = per_version.get(name, {}).get(metric)
                cells.append(f"{100 * value:9.1f}" if value is not None else f"{'-':>9}")
            lines.append(f"{category:<10}{metric:<13}" + "".join(cells))
    return "\n".join(lines)


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="*", type=Path, help="category folders (default: tire + bottle)")
    ap.add_argument("--outliers", type=Path, default=SHARED / "dtd" / "images")
    ap.add_argument("--annotate", type=int, default=10, help="annotations of the first semi-supervised version")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="where the homes go (default: a temporary folder)")
    args = ap.parse_args()
    data = args.data or [SHARED / "mvtec_3d_ad" / "tire", SHARED / "mvtec_ad" / "bottle"]
    missing = [d for d in data if not d.is_dir()]
    if missing:
        raise SystemExit(f"no such category folder: {missing[0]} (pass --data DIR ...)")
    work = args.work or Path(tempfile.mkdtemp(prefix="dmad-latency-"))
    home, fresh = work / "home", work / "scratch-home"
    init = ["init", "--preset", "offline"] + (["--outliers", str(args.outliers)] if args.outliers.is_dir() else [])
    chosen = defects_with_masks(data[0], args.annotate, args.seed)
    burst, last = chosen[:-1], chosen[-1]
    print(f"homes under {work}; annotating {len(burst)} + 1 images of {data[0].name}", flush=True)

    dmad(home, *init)
    t_ingest, _ = timed(dmad, home, "ingest", *map(str, data))
    t_first, _ = timed(dmad, home, "train")
    v1 = active_name(home)
    print(f"[1] ingest {t_ingest:.1f} s; first version {v1} from scratch (cold cache) {t_first:.1f} s", flush=True)

    t0 = time.perf_counter()
    for image, mask in burst:
        dmad(home, "annotate", str(image), "--mask", str(mask))
    t_annotate = time.perf_counter() - t0
    t_worker, _ = timed(dmad, home, "worker", "--once", "--sync-every", "0")
    v2 = active_name(home)
    print(f"[2] {len(burst)} annotate calls {t_annotate:.1f} s ({t_annotate / len(burst):.2f} s each); "
          f"worker --once -> {v2} in {t_worker:.1f} s", flush=True)
    print(metric_table(home, [v1, v2]), flush=True)

    log = open(work / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--home", str(home), "--poll-seconds",
                               "0.5", "--sync-every", "0"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        # an idle, ready worker is the steady state on a line: wait for it to have loaded the engine
        while "ready" not in (work / "worker.log").read_text():
            if worker.poll() is not None:
                raise SystemExit(f"the worker exited ({worker.returncode}); see {work / 'worker.log'}")
            time.sleep(0.2)
        t0 = time.perf_counter()
        dmad(home, "annotate", str(last[0]), "--mask", str(last[1]))
        while (v3 := active_name(home)) == v2:
            if worker.poll() is not None:
                raise SystemExit(f"the worker exited ({worker.returncode}); see {work / 'worker.log'}")
            time.sleep(0.2)
        latency = time.perf_counter() - t0
    finally:
        worker.terminate()
        worker.wait(30)
    print(f"[3] one annotation -> {v3} active in {latency:.1f} s (background worker)", flush=True)

    t_scratch_cached, _ = timed(dmad, home, "train")
    dmad(fresh, *init)
    dmad(fresh, "ingest", *map(str, data))
    for image, mask in chosen:
        dmad(fresh, "annotate", str(image), "--mask", str(mask))
    t_scratch_cold, _ = timed(dmad, fresh, "train")
    print(f"[4] the same data from scratch: {t_scratch_cached:.1f} s with cached features, "
          f"{t_scratch_cold:.1f} s in a fresh home", flush=True)

    print("\nsummary")
    print(f"  annotation -> active version     {latency:7.1f} s   (target < 60 s)")
    print(f"  from scratch, cached features    {t_scratch_cached:7.1f} s   {t_scratch_cached / latency:5.1f}x slower")
    print(f"  from scratch, fresh home         {t_scratch_cold:7.1f} s   {t_scratch_cold / latency:5.1f}x slower")
    print(f"  burst of {len(burst)} annotations, worker --once {t_worker:7.1f} s")


if __name__ == "__main__":
    main()
