"""How `dmad serve` runs (``ServeConfig``) and where its token lives: read by the app factory
(``scoring.create_app``), its dependencies (``deps.py``) and its routes."""

from __future__ import annotations

from dataclasses import dataclass

from app.services.line.inference import MAX_PIXELS, MAX_UPLOAD_BYTES
from app.services.line.tokens import TOKEN_SECRET  # noqa: F401 (one definition, the tokens service's; imported from here)

API_VERSION = "1"


@dataclass(frozen=True)
class ServeConfig:
    """How `dmad serve` runs: where it listens, how it batches, what it accepts."""

    host: str = "127.0.0.1"  # loopback: another machine reaches it only when the engineer says so
    port: int = 8000
    max_batch: int = 4  # images per backbone call: 4 is the fastest on 2 CPU cores (benchmarks/serve.py)
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_queue: int = 64  # requests waiting past this get 503
    max_upload_bytes: int = MAX_UPLOAD_BYTES  # the Inspect page's upload widget has the same bound
    max_pixels: int = MAX_PIXELS
    feed: bool = True  # scored images join the pool
    poll_s: float = 2.0  # how often a promotion is looked for
