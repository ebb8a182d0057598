"""Stop signals of the product's long-running processes (`dmad worker`, `dmad up`)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


def install_stop_signals(stop: threading.Event, *, second_interrupts: bool = False) -> None:
    """SIGTERM and SIGINT (Ctrl-C) set ``stop``: the process finishes its current step and stops.

    A second signal while stopping raises KeyboardInterrupt with ``second_interrupts`` (a worker: a
    second Ctrl-C kills at once); otherwise it is ignored, so `dmad up` never leaves its children behind.
    Call from the main thread.
    """
    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set() and second_interrupts:
            raise KeyboardInterrupt
        log.info("stopping after the current step (signal %s)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
