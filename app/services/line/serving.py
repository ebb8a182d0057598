"""What `dmad serve` needs between HTTP and the model: the active version held and swapped without
dropping a request, and concurrent requests batched for the backbone behind a bounded queue.

- ``ActiveLineModel`` holds the active version's ``LineModel``. A poller notices a promotion (or a new
  threshold override) and loads the new one beside the old; the swap is one reference assignment. A
  request takes the model in force when it arrives and is scored by it, so a promotion never changes a
  request half-way.
- ``LineBatcher`` scores requests in batches: one thread takes up to ``max_batch`` queued requests that
  arrived within ``max_wait_s`` of the first and share a model, and scores them in one backbone call. The
  queue is bounded: past ``max_queue`` waiting requests ``submit`` raises ``QueueFull`` (HTTP 503 with
  Retry-After), never an unbounded backlog. After answering, a batch joins the pool (``feed``).

Why by hand: a model server (Triton, TorchServe, Ray Serve) would batch too, but it would hold the model
outside the home's version registry and database; the batching here is a queue and a thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.home_folder import Home
from app.services.line.inference import Inferencer
from app.services.line.prediction import LineImage, LineModel, LineResult
from db.engine import DATABASE_AWAY
from db.models import ModelVersion, ThresholdOverride
from dmad_core.errors import Unavailable

log = logging.getLogger(__name__)


class QueueFull(Unavailable):
    """More requests are waiting than the service takes; the client should retry after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


def _state(session: Session) -> tuple[int | None, int]:
    """(active version id, newest threshold override id): what a reload depends on."""
    active = session.scalar(select(ModelVersion.id).where(ModelVersion.status == "active"))
    newest = session.scalar(select(func.max(ThresholdOverride.id))) or 0
    return active, int(newest)


class ActiveLineModel:
    """The active version's LineModel, reloaded when the active version or a threshold changes."""

    def __init__(self, home: Home, sessions: sessionmaker[Session],
                 loader: Callable[[Home, sessionmaker[Session]], LineModel] = LineModel.load):
        self.home = home
        self.sessions = sessions
        self.loader = loader
        self._lock = threading.Lock()  # one reload at a time
        with sessions() as session:
            self._seen = _state(session)
        self._model = loader(home, sessions)  # Conflict when no version is active

    @property
    def current(self) -> LineModel:
        return self._model

    def refresh(self) -> bool:
        """Load the active version again if it (or a threshold override) changed; True when swapped."""
        with self._lock:
            with self.sessions() as session:
                state = _state(session)
            if state == self._seen or state[0] is None:
                return False
            model = self.loader(self.home, self.sessions)  # the old one keeps serving meanwhile
            self._model, self._seen = model, state
        log.info("serving %s now", model.version)
        return True

    def poll(self, stop: threading.Event, every_s: float = 2.0) -> None:
        """Refresh every ``every_s`` seconds until ``stop`` is set (run in a thread)."""
        while not stop.wait(every_s):
            try:
                self.refresh()
            except DATABASE_AWAY as exc:  # the database away: one line, tried again at the next tick
                log.warning("the database does not answer (%s); still serving %s", type(exc.orig or exc).__name__,
                            self._model.version)
            except Exception:  # a failed load keeps the version in force, and is tried again
                log.exception("could not load the newly active version; still serving %s", self._model.version)


@dataclass
class _Request:
    model: Inferencer
    image: LineImage
    future: Future[LineResult] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


class LineBatcher:
    """Scores submitted images in batches on one thread (see the module docstring)."""

    def __init__(self, max_batch: int = 16, max_wait_s: float = 0.01, max_queue: int = 64,
                 on_batch: Callable[[Inferencer, Sequence[LineImage], Sequence[LineResult]], None] | None = None,
                 keep: Callable[[int, Sequence[LineImage], Sequence[LineResult]], Callable[[], None]] | None = None):
        """``keep`` (the feed spool, app/services/line/spool.py) makes a scored batch durable *before* its
        answers leave, and returns the step run after them; when it raises (a full disk) the batch's
        requests get its error, not an answer whose image would be lost."""
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.on_batch, self.keep = on_batch, keep
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="line-batcher", daemon=True)
        self._held: _Request | None = None  # taken from the queue for a later batch (another model)

    def start(self) -> LineBatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, model: Inferencer, image: LineImage) -> Future[LineResult]:
        """Queue one image for ``model``; QueueFull when the queue is at its bound."""
        request = _Request(model, image)
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"the scoring queue is full ({self.max_queue} waiting); retry shortly") from None
        return request.future

    def _take(self) -> list[_Request] | None:
        first = self._held or self._queue.get()
        self._held = None
        if first is None:
            return None
        batch = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)  # stop after this batch
                break
            if nxt.model is not first.model:
                self._held = nxt  # a request on the newer version starts the next batch
                break
            batch.append(nxt)
        return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            model = batch[0].model
            images = [r.image for r in batch]
            try:
                results = model.score(images)
                after = self.keep(model.version_id, images, results) if self.keep is not None else None
            except BaseException as exc:  # every waiting request gets the error, the thread goes on
                for r in batch:
                    r.future.set_exception(exc)
                continue
            for r, result in zip(batch, results, strict=True):
                r.future.set_result(result)
            if after is not None:
                try:
                    after()
                except Exception:
                    log.exception("could not add a scored batch to the pool (it stays in the spool)")
            if self.on_batch is not None:
                try:
                    self.on_batch(model, images, results)
                except Exception:
                    log.exception("could not add a scored batch to the pool")
