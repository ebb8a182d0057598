"""`dmad serve`'s feed spool: an image answered 200 is on the home's disk before its answer leaves, so a
database that is away (or a serve that is killed) never loses it.

Each scored batch is written to ``<home>/spool/<time>-<id>.npz`` (the images' bytes, scores, patch maps
and top patches; a temporary name, fsynced, renamed) *before* its requests are answered. Then the batch
is fed to the pool (``app/services/line/feed.py``) and its spool file removed. When the database does not
answer, the file stays; ``replay`` feeds what is left, oldest first, once the database is back: on the
next batch, from serve's poller every few seconds, and when serve starts again. Feeding is idempotent
(one image per class and content hash; a version's score of an image replaced), so a file fed twice (a
kill between the feed and the unlink) stores nothing twice. If the spool cannot be written (a full
disk) the batch's requests get 503 with Retry-After: an image the service cannot keep is never answered.

A full disk need not stop the line at once: the spool holds a reserve, a file of
``HomeSettings.spool_reserve_bytes`` (64 MiB: a minute of a busy line's images) that it deletes when a write
finds the disk full, and writes again once there is room. Until the reserve is spent the line is answered
(and its images kept); after, 503. The same idea as a database's reserved blocks or a "ballast file": the
space the line needs is taken while there is space to take.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.home_folder import Home
from app.services.line.prediction import LineImage, LineResult
from app.services.loop.versions import _fsync_dir  # the one way the home makes a rename durable
from dmad_core.errors import Unavailable

log = logging.getLogger(__name__)

SPOOL_RETRY_AFTER_S = 5
RESERVE_NAME = ".reserve"


class SpoolFull(Unavailable):
    """The spool could not be written (the home's disk is full or failing): the batch is refused."""

    def __init__(self, message: str, retry_after: int = SPOOL_RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class SpooledBatch:
    path: Path
    version_id: int
    images: list[LineImage]
    results: list[LineResult]


class FeedSpool:
    """The spool folder of one home (see the module docstring). ``lock`` serialises feeding, so a batch
    and a replay never feed the same file at once."""

    def __init__(self, home: Home, reserve_bytes: int = 0):
        self.folder = home.spool_dir
        self.lock = threading.Lock()
        self.reserve_bytes = reserve_bytes
        self.reserve = self.folder / RESERVE_NAME
        self._last_failure: str | None = None  # why the last feed failed (logged once, not at every retry)

    def reserve_held(self) -> int:
        """Bytes of the reserve on disk now (0 after a full disk took it, until there is room again)."""
        try:
            return self.reserve.stat().st_size
        except OSError:
            return 0

    def ensure_reserve(self) -> bool:
        """Write the reserve when it is missing and the disk has room for it twice over (never the last
        bytes a disk has); True when it is in place. Called at start and by the replayer's every tick."""
        if self.reserve_bytes <= 0:
            return False
        if self.reserve_held() >= self.reserve_bytes:
            return True
        tmp = self.folder / f"{RESERVE_NAME}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.folder).free < 2 * self.reserve_bytes:
                return False
            with open(tmp, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, self.reserve_bytes)  # blocks really taken, not a sparse file
                os.fsync(f.fileno())
            tmp.replace(self.reserve)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.debug("the spool's reserve not written yet: %s", exc)
            return False
        log.info("the spool holds %d MB in reserve for a full disk", self.reserve_bytes // 2**20)
        return True

    def _release_reserve(self) -> bool:
        """Give the reserve's space back to the spool (the disk is full); False when there is none left."""
        held = self.reserve_held()
        if not held:
            return False
        self.reserve.unlink(missing_ok=True)
        log.warning("the home's disk is full: the line is answered from the spool's reserve (%d MB); free space "
                    "under %s before it is spent, or serve answers 503", held // 2**20, self.folder.parent)
        return True

    def pending(self) -> list[Path]:
        """Spooled batches not yet fed, oldest first."""
        if not self.folder.exists():
            return []
        return sorted(p for p in self.folder.iterdir() if p.suffix == ".npz" and not p.name.startswith("."))

    def write(self, version_id: int, images: Sequence[LineImage], results: Sequence[LineResult]) -> Path:
        """The batch on disk (fsynced) under its final name; SpoolFull when it cannot be written whole."""
        meta = {"version_id": int(version_id), "images": [
            {"category": img.category, "content_hash": img.content_hash, "source": img.source,
             "score": r.score, "decision": r.decision, "threshold": r.threshold, "threshold_source": r.threshold_source,
             "version": r.version, "width": r.width, "height": r.height, "top_patches": r.top_patches}
            for img, r in zip(images, results, strict=True)]}
        arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
        for i, (img, r) in enumerate(zip(images, results, strict=True)):
            arrays[f"data_{i}"] = np.frombuffer(img.data or b"", np.uint8)
            arrays[f"map_{i}"] = np.asarray(r.patch_map, np.float32)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        try:
            return self._write_file(buffer)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) and self._release_reserve():
                try:
                    return self._write_file(buffer)
                except OSError as again:
                    exc = again
            raise SpoolFull(f"cannot keep the scored image on the home's disk ({exc.strerror or exc}); "
                            f"free space under {self.folder.parent} and retry") from exc

    def _write_file(self, buffer: io.BytesIO) -> Path:
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz"
        tmp = self.folder / f".{name}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            final = tmp.with_name(name)
            tmp.replace(final)
            _fsync_dir(self.folder)
            return final
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def read(path: Path) -> SpooledBatch:
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            images, results = [], []
            for i, m in enumerate(meta["images"]):
                data = z[f"data_{i}"].tobytes()
                images.append(LineImage(np.zeros((0, 0, 3), np.uint8), m["category"], m["content_hash"], m["source"], data))
                results.append(LineResult(m["source"], m["category"], m["score"], m["decision"], m["threshold"],
                                          m["threshold_source"], m["version"], m["content_hash"], m["width"],
                                          m["height"], m["top_patches"], z[f"map_{i}"]))
        return SpooledBatch(path, int(meta["version_id"]), images, results)

    def feed_file(self, path: Path, feed_batch: Callable[[int, list[LineImage], list[LineResult]], object],
                  wait: bool = True) -> int | None:
        """Feed one spooled batch and remove its file: the number of images fed (0 when another thread fed
        it first), or None (file kept) when feeding failed. With ``wait=False`` (the batcher's thread) a
        spool busy with a replay is left alone and 0 returned: the replayer feeds the file at its next pass,
        and the line's next batch is not held behind a backlog (the soak's 6.6 s gap after an outage)."""
        if not self.lock.acquire(blocking=wait):
            return 0
        try:
            try:
                batch = self.read(path)
            except FileNotFoundError:
                return 0  # fed meanwhile
            except (OSError, ValueError, KeyError) as exc:  # unreadable: set aside, never deleted
                log.error("spooled batch %s is unreadable (%s); moved aside", path, exc)
                path.replace(path.with_suffix(".bad"))
                return 0
            try:
                feed_batch(batch.version_id, batch.images, batch.results)
            except Exception as exc:  # noqa: BLE001 - the database away, a full disk: kept for the next try
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                # one warning per cause, not one per file and retry (the replayer retries every few seconds)
                (log.warning if why != self._last_failure else log.debug)("spooled batch %s not fed yet: %s",
                                                                           path.name, why)
                self._last_failure = why
                return None
            self._last_failure = None
            path.unlink(missing_ok=True)
            return len(batch.images)
        finally:
            self.lock.release()

    def replay(self, feed_batch: Callable[[int, list[LineImage], list[LineResult]], object], limit: int = 64) -> int:
        """Feed up to ``limit`` spooled batches, oldest first (stopping after 3 failures: the database is
        away); returns the number of images fed."""
        fed, failures = 0, 0
        for path in self.pending()[:limit]:
            n = self.feed_file(path, feed_batch)
            if n is None:  # kept for the next round; one batch that fails never holds back the others,
                failures += 1  # but the database away fails them all: stop after a few
                if failures >= 3:
                    break
                continue
            fed += n
        return fed

    def count_images(self) -> int:
        """Images waiting in the spool (the metrics' gauge): read from each file's metadata."""
        total = 0
        for path in self.pending():
            try:
                with np.load(path) as z:
                    total += len(json.loads(z["meta"].tobytes().decode())["images"])
            except (OSError, ValueError, KeyError):
                continue
        return total


class SpooledFeed:
    """The feed of `dmad serve` through the spool: ``keep`` before a batch is answered, the pool after."""

    def __init__(self, home: Home, sessions: Callable[[], object], on_failure: Callable[[], None] = lambda: None,
                 on_replayed: Callable[[float], None] = lambda n: None):
        self.home, self.sessions = home, sessions
        self.spool = FeedSpool(home, home.load_settings().spool_reserve_bytes)
        self.on_failure, self.on_replayed = on_failure, on_replayed

    def _feed(self, version_id: int, images: list[LineImage], results: list[LineResult]) -> None:
        from app.services.line.feed import feed

        with self.sessions() as session:  # type: ignore[attr-defined]
            feed(session, self.home, version_id, images, results)

    def keep(self, version_id: int, images: Sequence[LineImage], results: Sequence[LineResult]) -> Callable[[], None]:
        """Spool the batch (SpoolFull when it cannot be); returns the step run after the answers: feed the
        batch, then whatever an outage left in the spool."""
        path = self.spool.write(version_id, images, results)

        def after() -> None:  # a backlog is the replayer thread's, never this (the batcher's) thread's
            if self.spool.feed_file(path, self._feed, wait=False) is None:
                self.on_failure()
        return after

    def replay(self) -> int:
        fed = self.spool.replay(self._feed)
        if fed:
            log.info("fed %d spooled images to the pool", fed)
            self.on_replayed(fed)
        return fed

    def run_replayer(self, stop: threading.Event, every_s: float) -> None:
        """Replay the spool every ``every_s`` seconds until ``stop`` (a thread of serve): at start, what a
        killed serve or an outage left; later, what waits for the database."""
        while True:
            try:
                if self.spool.pending():
                    self.replay()
                self.spool.ensure_reserve()
            except Exception:  # noqa: BLE001 - tried again at the next tick
                log.exception("replaying the feed spool failed")
            if stop.wait(every_s):
                return
