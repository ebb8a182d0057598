"""The whole stack under load and faults (issue 23): `dmad serve`, two `dmad worker`s and the webhook
receiver on a PostgreSQL server of its own, for ``--minutes M``, with every end-of-run check a number.

    .venv/bin/python benchmarks/soak.py --minutes 60 --rate 2 --clients 4 --annotate-every 60 --json soak.json

- **Its own PostgreSQL** (benchmarks/own_postgres.py: initdb and pg_ctl from /usr/lib/postgresql/*/bin, a
  spare port, a temporary folder): stopping it harms nothing else.
- **The home** on a tmpfs of ``--disk-mb`` mounted for the run (root needed; without it the home is a plain
  temporary folder and the full-disk fault is left out, which the JSON says). Trained at the start on a
  few real images of ../shared/data (MVTec AD bottle; procedural images when it is absent or with
  ``--synthetic``).
- **Load:** ``--clients`` threads post real images (the class's images that did not train it) to
  ``/v1/score`` at ``--rate`` images per second in all; every ``--annotate-every`` seconds a Label
  Studio-shaped payload with a pool image's ground-truth mask (brush RLE) goes to the webhook, which
  records it and queues a retrain; the workers retrain, promote and re-rank the pool as in production.
- **Faults**, on a schedule printed at the start: SIGKILL a worker in the middle of a job and start it
  again; SIGKILL serve's serving process (a crash: serve's supervisor starts another, app/api/supervised.py);
  SIGKILL the whole serve, supervisor and all, and start it again (a cold start); restart the webhook
  receiver; stop PostgreSQL for ``--outage-seconds`` then start it; fill the home's file system for
  ``--full-seconds``.
- **At the end** (after the load stops, the queue and the spool drain, bounded by ``--drain-seconds``),
  each check is a number in ``--json OUT``: lost_images, lost_annotations, half_published_versions,
  server_errors_5xx (503 with Retry-After during the database outage and the full disk left out, counted
  apart), max_serving_gap_s outside the database outage (and the longest gap around each fault), p50 and
  p99 latency, peak RSS per process, the home's disk use against its retention bounds, leaked processes,
  faults_injected.

Loopback addresses only; every loop is bounded in count and time. The machine is usually shared: the
latencies are only comparable within one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.own_postgres import OwnPostgres  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle"
CATEGORY_REAL = "bottle"
CATEGORY_SYNTH = "tiles"
TOKEN = "soak-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def now() -> float:
    return time.monotonic()


# -- the data ---------------------------------------------------------------------------------------
def prepare_data(root: Path, synthetic: bool, n_train: int, n_test: int) -> tuple[Path, str, list[bytes]]:
    """An MVTec-layout class folder (symlinks into ../shared/data, never copies), its name, and the image
    bytes the clients post (images of the class that are not in that folder)."""
    folder = root / "data"
    if synthetic or not DATA.exists():
        from dmad_core.data.synthetic import make_synthetic_category

        path = make_synthetic_category(folder, CATEGORY_SYNTH, n_train=n_train, n_test_good=n_test // 2,
                                       n_test_defect=n_test - n_test // 2, texture="grid", seed=5)
        extra = make_synthetic_category(root / "extra", CATEGORY_SYNTH, n_train=40, n_test_good=0, n_test_defect=0,
                                        texture="grid", seed=11)
        posts = [p.read_bytes() for p in sorted((extra / "train" / "good").glob("*.png"))]
        return path, CATEGORY_SYNTH, posts
    target = folder / CATEGORY_REAL
    train = sorted((DATA / "train" / "good").glob("*.png"))
    (target / "train" / "good").mkdir(parents=True)
    for p in train[:n_train]:
        (target / "train" / "good" / p.name).symlink_to(p)
    chosen: list[Path] = []
    for defect in ("good", "broken_large", "contamination"):
        files = sorted((DATA / "test" / defect).glob("*.png"))[: max(1, n_test // 3)]
        (target / "test" / defect).mkdir(parents=True)
        for p in files:
            (target / "test" / defect / p.name).symlink_to(p)
            mask = DATA / "ground_truth" / defect / f"{p.stem}_mask.png"
            if mask.exists():
                (target / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                (target / "ground_truth" / defect / mask.name).symlink_to(mask)
            chosen.append(p)
    posts = [p.read_bytes() for p in train[n_train:]]  # real bottles the model never saw
    return target, CATEGORY_REAL, posts


# -- processes ---------------------------------------------------------------------------------------
class Managed:
    """One product process (restartable), logging to a file; its pids over restarts are kept."""

    def __init__(self, name: str, argv: list[str], logs: Path, env: dict[str, str]):
        self.name, self.argv, self.logs, self.env = name, argv, logs, env
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []
        self.peak_rss_mb = 0.0
        self.starts = 0

    def start(self) -> None:
        log = open(self.logs / f"{self.name}.log", "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", *self.argv], stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=self.logs, start_new_session=True)
        log.close()
        self.pids.append(self.proc.pid)
        self.starts += 1

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.sample()
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30) -> None:
        if self.proc and self.proc.poll() is None:
            self.sample()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def children(self) -> list[int]:
        """The process's children (serve's serving process under its supervisor)."""
        if self.proc is None:
            return []
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def kill_child(self) -> int | None:
        """SIGKILL the process's child (serve's serving process: a crash), leaving the supervisor; its pid."""
        kids = self.children()
        if not kids:
            return None
        self.sample()
        os.kill(kids[0], signal.SIGKILL)
        return kids[0]

    def sample(self) -> None:
        """The peak RSS so far (VmHWM) of the process or of its child (serve's serving process, which holds
        the model), kept as the maximum over restarts."""
        if self.proc is None:
            return
        for pid in (self.proc.pid, *self.children()):
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_rss_mb = max(self.peak_rss_mb, int(line.split()[1]) / 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass


def wait_for(condition: Any, timeout: float, every: float = 0.5) -> bool:
    deadline = now() + timeout
    while now() < deadline:
        try:
            if condition():
                return True
        except Exception:  # noqa: BLE001 - not yet
            pass
        time.sleep(every)
    return False


def http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def postgres_rss_mb(pg: OwnPostgres) -> float:
    """The server's resident memory now: the postmaster and its children, summed."""
    try:
        master = int((pg.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            pid = int(status.parent.name)
            if pid == master or int(fields.get("PPid", "0").strip()) == master:
                total += int(fields.get("VmRSS", "0 kB").split()[0])
        except (OSError, ValueError):
            continue
    return total / 1024


# -- load -------------------------------------------------------------------------------------------
@dataclass
class Answer:
    started: float
    ended: float
    status: int  # 0: no answer (connection refused or reset)
    retry_after: bool = False
    sha256: str | None = None


@dataclass
class Log:
    answers: list[Answer] = field(default_factory=list)
    annotations: dict[str, int] = field(default_factory=dict)  # external id -> status of its acknowledged post
    annotation_tries: int = 0
    annotation_refusals: int = 0
    windows: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # fault -> [(start, end)]
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(url: str, category: str, images: list[bytes], interval: float, until: float, log: Log, seed: int) -> None:
    import httpx

    rng = random.Random(seed)
    next_at = now() + rng.random() * interval
    with httpx.Client(timeout=60) as http:
        while now() < until:
            time.sleep(max(0.0, next_at - now()))
            next_at += interval
            t0 = now()
            try:
                r = http.post(f"{url}/v1/score?category={category}", content=rng.choice(images),
                              headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"})
                answer = Answer(t0, now(), r.status_code, "retry-after" in r.headers,
                                r.json().get("sha256") if r.status_code == 200 else None)
            except (httpx.HTTPError, ValueError):
                answer = Answer(t0, now(), 0)
            with log.lock:
                log.answers.append(answer)


def annotation_payload(ann_id: int, image_id: int, mask: Any) -> dict[str, Any]:
    """A payload shaped like Label Studio's ANNOTATION_CREATED (the mask as brush RLE)."""
    from annotation.rle import brush_result

    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return {"action": "ANNOTATION_CREATED",
            "annotation": {"id": ann_id, "result": [brush_result(mask, "defect", "image", "defect")],
                           "task": 50_000 + ann_id, "was_cancelled": False, "created_at": stamp,
                           "updated_at": stamp, "project": 1},
            "task": {"id": 50_000 + ann_id, "data": {"image": "soak", "image_id": image_id}, "project": 1},
            "project": {"id": 1}}


def annotator_loop(url: str, secret: str, targets: list[tuple[int, Any]], every: float, until: float, log: Log) -> None:
    """Every ``every`` s a new annotation; one refused (503 during an outage) or unanswered is posted
    again at the next tick, as Label Studio's next sync would bring it."""
    import httpx

    pending: list[tuple[int, int, Any]] = []
    next_id = 1
    next_at = now() + every / 2
    with httpx.Client(timeout=30) as http:
        while now() < until:
            time.sleep(max(0.0, min(next_at, until) - now()))
            if now() >= until:
                break
            next_at += every
            image_id, mask = targets[(next_id - 1) % len(targets)]
            pending.append((next_id, image_id, mask))
            next_id += 1
            still: list[tuple[int, int, Any]] = []
            for ann_id, image_id, mask in pending[:20]:
                log.annotation_tries += 1
                try:
                    r = http.post(f"{url}/webhook", json=annotation_payload(ann_id, image_id, mask),
                                  headers={"X-DMAD-Secret": secret})
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0
                if 200 <= status < 300:
                    log.annotations[str(ann_id)] = status
                else:
                    log.annotation_refusals += 1
                    still.append((ann_id, image_id, mask))
            pending = still + pending[20:]


# -- faults -----------------------------------------------------------------------------------------
def fill_disk(folder: Path) -> Path:
    filler = folder / ".soak-filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12):
            block = b"\0" * size
            for _ in range(1 << 16):  # bounded: 64 Gi of 1 MiB blocks at most
                try:
                    if os.write(fd, block) < size:
                        break
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def running_job_of(sessions: Any, pid: int) -> bool:
    from sqlalchemy import select

    from db.models import Job

    with sessions() as session:
        return session.scalars(select(Job.id).where(Job.status == "running",
                                                    Job.lease_owner.contains(f":{pid}:"))).first() is not None


# -- checks -----------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def overlaps(start: float, end: float, windows: list[tuple[float, float]]) -> bool:
    return any(start <= b and end >= a for a, b in windows)


def _gaps_apart(succ: list[float], *excluded: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(start, length) of the gaps between successive answers that overlap none of the excluded windows."""
    return [(p, n - p) for p, n in zip(succ, succ[1:]) if not any(overlaps(p, n, windows) for windows in excluded)]


def inside(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(a <= t <= b for a, b in windows)


def checks(home: Any, sessions: Any, log: Log, category: str) -> dict[str, Any]:
    from sqlalchemy import func, select

    from db.models import Annotation, Image, ModelVersion, PoolScore

    ok = [a for a in log.answers if a.status == 200]
    hashes = sorted({a.sha256 for a in ok if a.sha256})
    with sessions() as session:
        rows = dict(session.execute(select(Image.content_hash, func.count(Image.id))
                                    .where(Image.content_hash.in_(hashes)).group_by(Image.content_hash)).all())
        pooled = set(session.scalars(select(Image.content_hash).where(Image.content_hash.in_(hashes), Image.role == "pool")
                                     .where(Image.id.in_(select(PoolScore.image_id)))))
        files_ok = {h for h, p in session.execute(select(Image.content_hash, Image.path).where(Image.content_hash.in_(hashes)))
                    if Path(p).is_file()}
        anns = session.execute(select(Annotation.id, Annotation.external_id).where(
            Annotation.source == "labelstudio", Annotation.external_id.in_(list(log.annotations)))).all()
        versions = session.execute(select(ModelVersion.name, ModelVersion.status, ModelVersion.folder,
                                          ModelVersion.trained_on)).all()
    why_lost = {"no_image_row": sum(1 for h in hashes if h not in rows),
                "more_than_one_row": sum(1 for h in hashes if rows.get(h, 0) > 1),
                "no_file": sum(1 for h in hashes if h in rows and h not in files_ok),
                "no_pool_score": sum(1 for h in hashes if h in rows and h not in pooled)}
    lost_images = sum(1 for h in hashes if rows.get(h) != 1 or h not in pooled or h not in files_ok)
    per_external: dict[str, list[int]] = {}
    for ann_id, external in anns:
        per_external.setdefault(str(external), []).append(ann_id)
    published = [v for v in versions if v.status in ("active", "retired")]
    reached = {a for v in published for a in (v.trained_on or {}).get("annotation_ids", [])}
    lost_annotations = sum(1 for ext in log.annotations
                           if len(per_external.get(ext, [])) != 1 or per_external[ext][0] not in reached)
    half = sum(1 for v in versions if v.status in ("active", "retired", "candidate")
               and not (Path(v.folder).is_dir() and (Path(v.folder) / "model.json").exists()))
    tmp_left = [p.name for p in home.models_dir.iterdir() if p.name.startswith(".tmp-")]

    outage = log.windows.get("postgres_stop", [])
    disk = log.windows.get("disk_full", [])
    fault_windows = {f: w for f, w in log.windows.items() if f != "postgres_stop"}
    excused = [a for a in log.answers if a.status == 503 and a.retry_after and
               (inside(a.started, outage) or inside(a.ended, outage) or inside(a.started, disk) or inside(a.ended, disk))]
    errors = [a for a in log.answers if a.status >= 500 and a not in excused]
    succ = sorted(a.ended for a in ok)
    gaps_outside = _gaps_apart(succ, outage)
    gap_by_fault: dict[str, float] = {}  # the longest gap that overlaps each fault's window
    for start, gap in gaps_outside:
        for fault, windows in fault_windows.items():
            if overlaps(start, start + gap, windows):
                gap_by_fault[fault] = max(gap_by_fault.get(fault, 0.0), gap)
    apart_from_cold = _gaps_apart(succ, outage, fault_windows.get("serve_kill", []))
    latencies = [a.ended - a.started for a in ok]
    return {
        "lost_images": lost_images,
        "lost_images_why": why_lost,  # an image can be counted under more than one reason
        "images_answered_200": len(ok),
        "distinct_images_answered_200": len(hashes),
        "lost_annotations": lost_annotations,
        "annotations_acknowledged": len(log.annotations),
        "annotation_posts": log.annotation_tries,
        "annotation_posts_refused_or_unanswered": log.annotation_refusals,
        "half_published_versions": half + len(tmp_left),
        "versions_published": len(published),
        "versions_failed": sum(1 for v in versions if v.status == "failed"),
        "server_errors_5xx": len(errors),
        "refused_503_retry_after_in_outage_or_full_disk": len(excused),
        "no_answer_connection_errors": sum(1 for a in log.answers if a.status == 0),
        "client_errors_4xx": sum(1 for a in log.answers if 400 <= a.status < 500),
        "max_serving_gap_s": round(max((g for _, g in gaps_outside), default=0.0), 2),
        "serving_gap_by_fault_s": {f: round(g, 2) for f, g in sorted(gap_by_fault.items())},
        "max_serving_gap_s_apart_from_serve_kill": round(max((g for _, g in apart_from_cold), default=0.0), 2),
        "latency_p50_s": round(percentile(latencies, 0.5) or 0, 3),
        "latency_p99_s": round(percentile(latencies, 0.99) or 0, 3),
    }


def disk_use(home: Any) -> dict[str, Any]:
    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0

    settings = home.load_settings()
    with_images = sum(1 for p in home.images_dir.rglob("*") if p.is_file()) if home.images_dir.exists() else 0
    return {
        "home_bytes": size(home.root),
        "features_bytes": size(home.features_dir), "features_bound_bytes": settings.feature_cache_max_bytes,
        "line_images": with_images, "line_images_bound": settings.line_pool_max_images,
        "models_bytes": size(home.models_dir), "spool_files_left": len(list(home.spool_dir.glob("*.npz")))
        if home.spool_dir.exists() else 0,
        "within_bounds": (settings.feature_cache_max_bytes is None or size(home.features_dir) <= settings.feature_cache_max_bytes)
        and (settings.line_pool_max_images is None or with_images <= settings.line_pool_max_images),
    }


def leaked(procs: list[Managed], pg: OwnPostgres) -> list[str]:
    """Processes still alive after the stop: every pid the run started, and any process naming its folders."""
    alive = []
    for m in procs:
        for pid in m.pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(f"{m.name}:{pid}")
            except FileNotFoundError:
                pass
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmd.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(pg.root) in text and "soak.py" not in text:
            alive.append(f"postgres:{cmd.parent.name}")
    return alive


# -- the run ----------------------------------------------------------------------------------------
def schedule(minutes: float) -> list[tuple[float, str]]:
    total = minutes * 60
    return [(0.15 * total, "worker_kill"), (0.22 * total, "serve_crash"), (0.30 * total, "serve_kill"),
            (0.45 * total, "webhook_restart"), (0.60 * total, "postgres_stop"), (0.80 * total, "disk_full")]


def mount_tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=2.0, help="images per second, all clients together")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--annotate-every", type=float, default=60.0, help="seconds between annotations")
    ap.add_argument("--outage-seconds", type=float, default=30.0)
    ap.add_argument("--full-seconds", type=float, default=15.0)
    ap.add_argument("--drain-seconds", type=float, default=300.0, help="at most this long for the queue and spool to drain")
    ap.add_argument("--disk-mb", type=int, default=768, help="the home's tmpfs")
    ap.add_argument("--train-images", type=int, default=12)
    ap.add_argument("--test-images", type=int, default=9)
    ap.add_argument("--synthetic", action="store_true", help="procedural images instead of ../shared/data")
    ap.add_argument("--json", type=Path, help="write the checks here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs) even when every check passes")
    args = ap.parse_args(argv)

    import httpx  # noqa: F401 - fail early when the test extra is absent

    started_wall = datetime.now(UTC)
    work = Path(tempfile.mkdtemp(prefix="dmad-soak-"))
    logs = work / "logs"
    logs.mkdir()
    mount = work / "disk"
    mounted = mount_tmpfs(mount, args.disk_mb)
    plan = [(t, f) for t, f in schedule(args.minutes) if f != "disk_full" or mounted]
    print(f"soak: {args.minutes:g} min, {args.rate:g} images/s from {args.clients} clients, an annotation every "
          f"{args.annotate_every:g} s; work folder {work}; home on "
          + (f"a {args.disk_mb} MB tmpfs" if mounted else "the machine's disk (no tmpfs: the full-disk fault is left out)"),
          flush=True)
    print("soak: fault schedule (seconds after the load starts):", flush=True)
    for t, f in plan:
        extra = {"postgres_stop": f" for {args.outage_seconds:g} s", "disk_full": f" for {args.full_seconds:g} s"}.get(f, "")
        print(f"  {t:7.1f} s  {f}{extra}", flush=True)

    pg = OwnPostgres.create()
    procs: list[Managed] = []
    log = Log()
    faults: dict[str, int] = {f: 0 for _, f in schedule(args.minutes)}
    result: dict[str, Any] = {}
    try:
        from app.cli import main as dmad
        from app.home_folder import Home
        from app.services.database import open_database
        from app.services.labelstudio.home import webhook_secret

        home = Home.at(mount / "home")
        folder, category, posts = prepare_data(work, args.synthetic, args.train_images, args.test_images)
        t_setup = now()
        for step in (["init", "--home", str(home.root), "--db", pg.url("dmad"), "--no-hint"],
                     ["ingest", "--home", str(home.root), str(folder), "--no-hint"]):
            if dmad(step) != 0:
                raise SystemExit(f"soak: dmad {step[0]} failed")
        home.save_settings(replace(home.load_settings(), evaluation_max_per_label=3, rerank_chunk_images=16))
        if dmad(["train", "--home", str(home.root)]) != 0:
            raise SystemExit("soak: dmad train failed")
        home.write_secret("serve_token", TOKEN)
        secret = webhook_secret(home)
        import logging

        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
        sessions = open_database(home)
        from sqlalchemy import select

        from db.models import Image

        import numpy as np
        import PIL.Image

        with sessions() as session:
            masked = session.execute(select(Image.id, Image.gt_mask_path).where(
                Image.role == "pool", Image.gt_mask_path.is_not(None))).all()
        targets = []
        for image_id, mask_path in masked:
            with PIL.Image.open(mask_path) as m:
                mask = np.asarray(m.convert("L")) > 0
            if mask.any():
                targets.append((image_id, mask))
        if not targets:
            raise SystemExit("soak: no pool image with a ground-truth mask to annotate")
        setup_s = now() - t_setup
        print(f"soak: home trained in {setup_s:.0f} s; {len(posts)} images to post, {len(targets)} to annotate",
              flush=True)

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        serve_port, hook_port = free_port(), free_port()
        serve = Managed("serve", ["serve", "--home", str(home.root), "--port", str(serve_port)], logs, env)
        hook = Managed("webhook", ["webhook", "--home", str(home.root), "--port", str(hook_port)], logs, env)
        workers = [Managed(f"worker{i}", ["worker", "--home", str(home.root), "--sync-every", "0", "--lease-seconds", "20",
                                          "--poll-seconds", "0.5", "--metrics-port", str(free_port())], logs, env)
                   for i in (1, 2)]
        procs = [serve, hook, *workers]
        for m in procs:
            m.start()
        serve_url, hook_url = f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{hook_port}"
        if not (wait_for(lambda: http_ok(f"{serve_url}/v1/health"), 300) and wait_for(lambda: http_ok(f"{hook_url}/health"), 120)):
            raise SystemExit("soak: serve or the webhook did not start (see the logs in the work folder)")

        t0 = now()
        until = t0 + args.minutes * 60
        threads = [threading.Thread(target=client_loop, args=(serve_url, category, posts, args.clients / args.rate,
                                                              until, log, k), daemon=True) for k in range(args.clients)]
        threads.append(threading.Thread(target=annotator_loop, args=(hook_url, secret, targets, args.annotate_every,
                                                                       until, log), daemon=True))
        for t in threads:
            t.start()

        pg_peak = 0.0
        for at, fault in plan:
            while now() < t0 + at:  # sample memory while waiting for the fault's time
                for m in procs:
                    m.sample()
                pg_peak = max(pg_peak, postgres_rss_mb(pg))
                time.sleep(min(2.0, max(0.0, t0 + at - now())))
            t_fault = now()
            print(f"soak: {t_fault - t0:7.1f} s  {fault}", flush=True)
            if fault == "worker_kill":
                victim = next((w for w in workers if w.proc and running_job_of(sessions, w.proc.pid)), None)
                if victim is None and wait_for(lambda: any(w.proc and running_job_of(sessions, w.proc.pid) for w in workers),
                                               min(120, args.minutes * 6), 0.2):
                    victim = next((w for w in workers if w.proc and running_job_of(sessions, w.proc.pid)), None)
                victim = victim or workers[0]
                mid_job = bool(victim.proc and running_job_of(sessions, victim.proc.pid))
                victim.kill()
                victim.start()
                result["worker_killed_mid_job"] = mid_job
            elif fault == "serve_crash":  # the serving process dies; serve's supervisor starts another
                victim_pid = serve.kill_child()
                result["serve_crash_killed_pid"] = victim_pid
                wait_for(lambda: bool(set(serve.children()) - {victim_pid}) and http_ok(f"{serve_url}/v1/health"),
                         300, 0.1)
            elif fault == "serve_kill":  # the whole serve (supervisor and serving process), started again
                serve.kill()
                serve.start()
                wait_for(lambda: http_ok(f"{serve_url}/v1/health"), 300, 0.2)
            elif fault == "webhook_restart":
                hook.stop()
                hook.start()
                wait_for(lambda: http_ok(f"{hook_url}/health"), 120, 0.2)
            elif fault == "postgres_stop":
                pg.stop()
                time.sleep(args.outage_seconds)
                pg.start()
            elif fault == "disk_full":
                filler = fill_disk(mount)
                time.sleep(args.full_seconds)
                filler.unlink()
            log.windows.setdefault(fault, []).append((t_fault, now()))
            faults[fault] += 1
        while now() < until:
            for m in procs:
                m.sample()
            pg_peak = max(pg_peak, postgres_rss_mb(pg))
            time.sleep(min(2.0, max(0.0, until - now())))
        for t in threads:
            t.join(timeout=120)

        # drain: every annotation's retrain, the re-ranking and the spool (bounded)
        from sqlalchemy import func

        from db.models import Job

        def drained() -> bool:
            with sessions() as session:
                open_jobs = session.scalar(select(func.count(Job.id)).where(Job.status.in_(("queued", "running"))))
            return open_jobs == 0 and not list(home.spool_dir.glob("*.npz"))
        t_drain = now()
        drained_ok = wait_for(drained, args.drain_seconds, 1.0)
        for m in procs:
            m.sample()
        result.update(checks(home, sessions, log, category))
        result["drained"] = drained_ok
        result["drain_s"] = round(now() - t_drain, 1)
        result["disk"] = disk_use(home)
        for m in procs:
            m.stop()
        result["peak_rss_mb"] = {m.name: round(m.peak_rss_mb, 1) for m in procs} | {"postgres": round(pg_peak, 1)}
        result["process_starts"] = {m.name: m.starts for m in procs}
    finally:
        for m in procs:
            m.stop(timeout=15)
        pg.close()
        if mounted:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    time.sleep(1)
    result["leaked_processes"] = len(leaked(procs, pg))
    result["faults_injected"] = sum(faults.values())
    result["faults"] = faults
    result["faults_left_out"] = [f for f, n in faults.items() if n == 0]
    result.update({"minutes": args.minutes, "rate": args.rate, "clients": args.clients,
                   "annotate_every_s": args.annotate_every, "outage_s": args.outage_seconds,
                   "home_on_tmpfs": mounted, "images": "synthetic" if args.synthetic or not DATA.exists() else "real (MVTec AD bottle)",
                   "started_utc": started_wall.isoformat(timespec="seconds"), "work": str(work),
                   "machine": f"{os.cpu_count()} cores, shared"})
    print(json.dumps(result, indent=2), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    bad = [k for k in ("lost_images", "lost_annotations", "half_published_versions", "server_errors_5xx",
                       "leaked_processes") if result.get(k)]
    if bad or args.keep:
        print(f"soak: the processes' logs are in {logs}", flush=True)
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
