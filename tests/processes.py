"""Helpers for tests that run the product's commands as real processes."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a reaped-later child still answers kill 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def dmad(*args: str) -> list[str]:
    """The command line of `dmad ARGS` with this interpreter (no installed entry point needed)."""
    return [sys.executable, "-m", "app.cli", *args]


def wait_until(condition: Callable[[], Any], timeout: float, every: float) -> bool:
    """Polls ``condition`` every ``every`` seconds for up to ``timeout`` seconds; its last answer, as a bool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())


def answers(url: str, **kwargs: Any) -> bool:
    """``GET url`` answers 200 (a service's health route); False while it refuses or fails. ``kwargs`` go to
    httpx (``verify=`` for HTTPS)."""
    import httpx

    try:
        return httpx.get(url, timeout=5, **kwargs).status_code == 200
    except httpx.HTTPError:
        return False
