"""Factory scale (issue 15): the loop's costs with pools of 1,000, 10,000 and 100,000 images and 100 versions.

    .venv/bin/python benchmarks/pool_scale.py [--sizes 1000 10000 100000] [--chunks 3] [--worker-threads N]
                                              [--browser] [--keep]
    .venv/bin/python benchmarks/pool_scale.py --cache-effect   # what keeping pool images' features buys

For each pool size, on a copy of one trained home (the UI tests' home: two synthetic classes, v0002 active):
1. N generated pool images are added (real 48 px BMP files, registered with one bulk insert, each with a
   v0002 score row templated from the home's real ones: scoring 100,000 images for real would take an hour
   and is what step 4 measures), and 98 more versions (database rows with metrics: the Metrics and Training
   pages at 100 versions; they hold no pool scores, as retention would leave them).
2. A real `dmad worker` process is started and left idle.
3. `dmad annotate` (a real process) records a defect mask on a pool image; the clock runs from its start
   until the database names a new active version: annotation -> active with an idle worker.
4. The worker re-ranks the pool under the new version; the rate is measured over `--chunks` chunks after the
   first (which loads the model). A second `dmad annotate` is then made while the worker is in a chunk:
   annotation -> active with a busy worker (the retrain waits for the chunk). A second worker process joins
   and the rate with 2 workers is measured over the next chunks. The time to re-rank the whole pool is
   N / rate (computed from the measured rate; at 1,000 the chunks measured are most of the pool).
5. The feature cache's disk use, the database's size and, with --browser, each page's time in headless
   Chromium (benchmarks/ui_pages.py's figures) with the workers stopped.

Procedural images are fine for timing, not for quality. Figures only; the targets (annotation -> active
under 60 s, within 1.5x of its time at 1,000) are read off the table, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the prepared-home builders live in tests/ui_fixtures.py
sys.path.insert(0, str(REPO / "benchmarks"))


def dmad(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


def du_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def add_versions(prepared, n: int) -> None:  # noqa: ANN001 - tests.ui_fixtures.PreparedHome
    """`n` retired versions (rows only, numbered after the real ones, dated before them), each with the active
    version's metrics."""
    from sqlalchemy import select

    from db.models import Metric, ModelVersion, utcnow

    with prepared.sessions()() as session:
        active = session.get(ModelVersion, prepared.version_ids[-1])
        metrics = list(session.scalars(select(Metric).where(Metric.version_id == active.id)))
        start = utcnow() - timedelta(days=n)
        for k in range(n):
            version = ModelVersion(name=f"v{len(prepared.version_ids) + 1 + k:04d}", folder=active.folder, config=dict(active.config),
                                   status="retired", trained_on=dict(active.trained_on), message="benchmark row",
                                   created_at=start + timedelta(days=k), activated_at=start + timedelta(days=k))
            session.add(version)
            session.flush()
            for m in metrics:
                session.add(Metric(version_id=version.id, category_id=m.category_id, name=m.name,
                                   value=None if m.value is None else m.value * (0.9 + 0.1 * k / n)))
        session.commit()


class Worker:
    """A real `dmad worker` process, its log in a file."""

    def __init__(self, home: Path, log: Path, threads: int | None = None):
        self.log = log
        env = dict(os.environ)
        if threads:  # one core per worker: what a worker on its own machine of that size would have
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.process = subprocess.Popen(dmad("worker", "--home", str(home), "--sync-every", "0"),
                                        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "ready" not in self.log.read_text():
            if time.monotonic() > deadline or self.process.poll() is not None:
                sys.exit(f"pool_scale.py: the worker did not start; see {self.log}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()


def active_name(sessions) -> str:  # noqa: ANN001
    from app.services.loop.versions import active_version

    with sessions() as session:
        return active_version(session).name


def annotate_until_active(home: Path, sessions, image_path: str, mask_path: str) -> float:  # noqa: ANN001
    """Seconds from the start of `dmad annotate` until another version is active."""
    before = active_name(sessions)
    start = time.perf_counter()
    subprocess.run(dmad("annotate", "--home", str(home), image_path, "--mask", mask_path), check=True,
                   stdout=subprocess.DEVNULL)
    while active_name(sessions) == before:
        time.sleep(0.1)
    return time.perf_counter() - start


def chunks_done(sessions, version: str) -> list[tuple[int, float]]:  # noqa: ANN001
    """(images, finished at) of the succeeded re-ranking chunks of `version`, in finishing order."""
    from sqlalchemy import select

    from db.queue import JobType
    from db.models import Job

    with sessions() as session:
        jobs = session.scalars(select(Job).where(Job.type == JobType.RERANK, Job.status == "succeeded"))
        rows = [(len(j.payload["image_ids"]), j.finished_at.timestamp()) for j in jobs
                if j.payload.get("version") == version]
    return sorted(rows, key=lambda r: r[1])


def rate(sessions, version: str, skip: int, count: int, timeout: float = 1800) -> tuple[float, int]:  # noqa: ANN001
    """Images per second over chunks skip+1 .. skip+count of `version` (finishing order), waiting for them;
    (rate, chunks measured)."""
    deadline = time.monotonic() + timeout
    while True:
        done = chunks_done(sessions, version)
        open_left = _open_chunks(sessions)
        if len(done) >= skip + count or not open_left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    window = done[skip:skip + count]
    if len(window) < 2:
        return float("nan"), len(window)
    images = sum(n for n, _ in window[1:])
    return images / (window[-1][1] - window[0][1]), len(window) - 1


def _open_chunks(sessions) -> int:  # noqa: ANN001
    from sqlalchemy import func, select

    from db.queue import JobType
    from db.models import Job

    with sessions() as session:
        return int(session.scalar(select(func.count(Job.id)).where(Job.type == JobType.RERANK,
                                                                   Job.status.in_(("queued", "running")))))


def wait_in_chunk(sessions, version: str) -> bool:  # noqa: ANN001
    """Until a chunk of `version` is running (so the next annotation meets a busy worker); False when none is
    left to run."""
    from sqlalchemy import select

    from db.queue import JobType
    from db.models import Job

    while True:
        with sessions() as session:
            running = [j for j in session.scalars(select(Job).where(Job.type == JobType.RERANK, Job.status == "running"))
                       if j.payload.get("version") == version]
        if running:
            return True
        if not _open_chunks(sessions):
            return False
        time.sleep(0.1)


def measure(base, size: int, root: Path, args: argparse.Namespace) -> dict:  # noqa: ANN001
    from sqlalchemy import select

    from db.models import Image
    from tests.ui_fixtures import add_bulk_pool, copy_prepared

    prepared = copy_prepared(base, root / f"home-{size}", full=True)
    home = prepared.home
    home.save_settings(replace(home.load_settings(), feature_cache_max_bytes=args.cache_budget))
    t0 = time.perf_counter()
    add_bulk_pool(prepared, n=size, category=f"bulk{size}")
    add_versions(prepared, 98)
    setup = time.perf_counter() - t0
    sessions = prepared.sessions()
    with sessions() as session:
        targets = [(img.path, img.gt_mask_path) for img in session.scalars(
            select(Image).where(Image.role == "pool", Image.gt_label == 1, Image.id.not_in(prepared.annotated_ids))
            .order_by(Image.id))][:2]
    w1 = Worker(home.root, root / f"worker1-{size}.log", args.worker_threads)
    w2 = None
    try:
        w1.wait_ready()
        idle = annotate_until_active(home.root, sessions, *targets[0])
        first = active_name(sessions)
        chunks = -(-(size + len(prepared.pool_ids)) // home.load_settings().rerank_chunk_images)
        one, n_one = rate(sessions, first, 1, max(1, min(args.chunks, chunks - 2)))  # leave a chunk to be busy in
        in_chunk = wait_in_chunk(sessions, first)
        busy = annotate_until_active(home.root, sessions, *targets[1]) if in_chunk else float("nan")
        second = active_name(sessions)
        w2 = Worker(home.root, root / f"worker2-{size}.log", args.worker_threads)
        w2.wait_ready()
        skip = len(chunks_done(sessions, second)) + 1  # from now on both workers run chunks
        two, n_two = rate(sessions, second, skip, 2 * args.chunks)
    finally:
        w1.stop()
        if w2 is not None:
            w2.stop()
    entry = next(home.features_dir.rglob("*.npy")).stat().st_size
    out = {"entry_bytes": entry, "size": size, "setup_s": setup, "idle_s": idle, "busy_s": busy, "rate1": one, "chunks1": n_one,
           "rate2": two, "chunks2": n_two, "cache_bytes": du_bytes(home.features_dir),
           "db_bytes": home.db_path.stat().st_size, "pool": size + len(prepared.pool_ids)}
    if args.browser:
        from ui_pages import browser_figures

        with sessions() as session:
            from app.services.read import ui_queries

            top = ui_queries.top_image_id(session, prepared.version_ids[-1])
        print(f"\n-- pages in Chromium, pool of {out['pool']:,} images, {len(prepared.version_ids) + 100} versions --")
        browser_figures(home.root, top, 3)
    return out


def cache_effect(base, root: Path, n: int = 512) -> None:  # noqa: ANN001
    """Per-image cost of scoring pool images under the active version with their features read by the
    backbone (and stored) against read back from the feature cache: what keeping pool features buys."""
    from sqlalchemy import select

    from app.services.home_model import image_item, load_model
    from app.services.loop.versions import active_version
    from db.models import Image
    from tests.ui_fixtures import add_bulk_pool, copy_prepared

    prepared = copy_prepared(base, root / "home-cache", full=True)
    add_bulk_pool(prepared, n=n, category="cache")
    with prepared.sessions()() as session:
        model = load_model(prepared.home, active_version(session))
        items = [image_item(img) for img in session.scalars(select(Image).join(Image.category)
                                                              .where(Image.role == "pool").order_by(Image.id.desc())
                                                              .limit(n))]
    model.predict(items[:16], progress_bar=False)  # warm up (threads, first-call costs); 16 images stored
    items = items[16:]
    timings = {}
    for label in ("backbone (features computed and stored)", "feature cache (features read back)"):
        start = time.perf_counter()
        model.predict(items, progress_bar=False)
        timings[label] = (time.perf_counter() - start) / len(items) * 1000
    print(f"\n{'scoring a pool image':<42}{'ms/image':>10}")
    for label, ms in timings.items():
        print(f"{label:<42}{ms:>10.1f}")
    first, second = timings.values()
    print(f"ratio: {first / second:.1f}x ({len(items)} images, offline preset; an entry is "
          f"{next(prepared.home.features_dir.rglob('*.npy')).stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--chunks", type=int, default=3, help="chunks per rate measurement (default 3)")
    ap.add_argument("--cache-budget", type=int, default=0,
                    help="feature cache budget in bytes (default 0: every chunk reads the backbone, so that the rates "
                         "with 1 and 2 workers compare the same work; the home's default is 20 GiB)")
    ap.add_argument("--worker-threads", type=int, default=None,
                    help="CPU threads per worker (OMP_NUM_THREADS); 1 on a 2-core machine stands for two one-core "
                         "machines, so that 2 workers have their own cores")
    ap.add_argument("--cache-effect", action="store_true",
                    help="only measure scoring pool images from the backbone against from the feature cache")
    ap.add_argument("--browser", action="store_true", help="also time every page in headless Chromium")
    ap.add_argument("--keep", action="store_true", help="keep the temporary homes and print their folder")
    args = ap.parse_args()

    from tests.ui_fixtures import build_home

    tmp = Path(tempfile.mkdtemp(prefix="dmad-pool-scale-"))
    rows = []
    try:
        print("training the base home with the real CLI ...", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):
            base = build_home(tmp / "base")
        if args.cache_effect:
            cache_effect(base, tmp)
            return
        for size in args.sizes:
            print(f"\n== pool of {size:,} generated images ==", flush=True)
            rows.append(measure(base, size, tmp, args))
            r = rows[-1]
            print(f"setup {r['setup_s']:.0f} s; annotation -> active: idle worker {r['idle_s']:.1f} s, busy worker "
                  f"{r['busy_s']:.1f} s; re-rank {r['rate1']:.1f} img/s (1 worker), {r['rate2']:.1f} img/s (2)", flush=True)
        base_idle = rows[0]["idle_s"]
        print(f"\n{'pool':>8} {'annot->active idle (s)':>23} {'x vs first':>10} {'annot->active busy (s)':>23} "
              f"{'re-rank 1 worker':>17} {'re-rank 2 workers':>18} {'2w/1w':>6} {'cache GB':>9} {'db MB':>7}")
        for r in rows:
            whole1 = r["pool"] / r["rate1"] if r["rate1"] == r["rate1"] else float("nan")
            whole2 = r["pool"] / r["rate2"] if r["rate2"] == r["rate2"] else float("nan")
            print(f"{r['pool']:>8,} {r['idle_s']:>23.1f} {r['idle_s'] / base_idle:>10.2f} {r['busy_s']:>23.1f} "
                  f"{whole1 / 60:>12.1f} min {whole2 / 60:>13.1f} min {r['rate2'] / r['rate1']:>6.2f} "
                  f"{r['cache_bytes'] / 1e9:>9.2f} {r['db_bytes'] / 1e6:>7.1f}")
        print(f"\nfeature cache entry: {rows[0]['entry_bytes'] / 1e6:.2f} MB an image (the pool's features: "
              + ", ".join(f"{r['pool'] * r['entry_bytes'] / 1e9:.1f} GB at {r['pool']:,}" for r in rows) + ")")
        print("re-rank columns: the whole pool at the rate measured over "
              f"{args.chunks} chunks (1 worker) and {2 * args.chunks} chunks (2 workers), after each worker's first")
    finally:
        if args.keep:
            print(f"\nkept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
