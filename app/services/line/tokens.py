"""`dmad serve`'s API token: rotated by `dmad token rotate`, taken up by a running service without a restart.

The token lives in the home's secret ``serve_token``. A rotation writes the new one under a temporary
name (0600 from its first byte) and renames it over the old, so a reader never sees half a token; the old
one can stay valid for a grace period (``serve_token_previous``: the token and the Unix time it expires),
so the line's clients can switch over without a refused image. The service checks the file's identity
(inode and modification time) on each request and reads it again only when it changed.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from annotation.secret_files import write_secret
from app.home_folder import Home

TOKEN_SECRET = "serve_token"
PREVIOUS_SECRET = "serve_token_previous"


@dataclass(frozen=True)
class Rotation:
    path: Path  # where the new token is
    previous_valid_until: float | None  # Unix time the old token stops working; None: at once


def _replace_secret(home: Home, name: str, value: str) -> Path:
    """Write a secret atomically: a temporary 0600 file, renamed over the old one."""
    tmp = write_secret(home.secrets_dir, f".{name}.{secrets.token_hex(4)}.tmp", value)
    final = home.secrets_dir / name
    os.replace(tmp, final)
    return final


def rotate(home: Home, keep_old_seconds: float = 0.0, now: float | None = None) -> Rotation:
    """A new serve token; the old one is accepted for ``keep_old_seconds`` more (0: refused at once).

    Args:
        home: the home whose ``serve_token`` is replaced.
        keep_old_seconds: the grace period of the old token.
        now: the current Unix time (tests).
    Returns:
        Where the new token is and until when the old one works.
    """
    if keep_old_seconds < 0:
        raise ValueError("keep_old_seconds must be 0 or more")
    now = time.time() if now is None else now
    old = home.read_secret(TOKEN_SECRET)
    until = now + keep_old_seconds if (old and keep_old_seconds > 0) else None
    # the grace entry first: a service that sees the new token already knows the old one's grace
    _replace_secret(home, PREVIOUS_SECRET, json.dumps({"token": old, "until": until} if until else {}))
    path = _replace_secret(home, TOKEN_SECRET, secrets.token_urlsafe(32))
    return Rotation(path, until)


class ServeTokens:
    """The tokens a running service accepts: the fixed one it was given, or the home's current token and
    the previous one during its grace period, re-read when their files change."""

    def __init__(self, home: Home, fixed: str | None = None):
        self.home, self.fixed = home, fixed
        self._lock = threading.Lock()
        self._seen: tuple[tuple[int, int] | None, ...] = ()
        self._current: str | None = fixed
        self._previous: tuple[str, float] | None = None
        if fixed is None:
            self._reload()

    def _identity(self) -> tuple[tuple[int, int] | None, ...]:
        out: list[tuple[int, int] | None] = []
        for name in (TOKEN_SECRET, PREVIOUS_SECRET):
            try:
                st = os.stat(self.home.secrets_dir / name)
                out.append((st.st_ino, st.st_mtime_ns))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def _reload(self) -> None:
        with self._lock:
            identity = self._identity()
            if identity == self._seen:
                return
            current = self.home.read_secret(TOKEN_SECRET)
            if current:  # never an empty token (a file being written by hand): keep the last good one
                self._current = current
            try:
                grace = json.loads(self.home.read_secret(PREVIOUS_SECRET) or "{}")
                self._previous = (str(grace["token"]), float(grace["until"])) if grace.get("token") else None
            except (ValueError, KeyError, TypeError):
                self._previous = None
            self._seen = identity

    @property
    def configured(self) -> bool:
        return bool(self._current)

    def accepts(self, presented: str, now: float | None = None) -> bool:
        """Whether ``presented`` is the current token (or the previous one within its grace period)."""
        if self.fixed is None:
            self._reload()
        ok = bool(self._current) and hmac.compare_digest(presented.encode(), (self._current or "").encode())
        if self._previous is not None:
            token, until = self._previous
            in_grace = (time.time() if now is None else now) < until
            ok = hmac.compare_digest(presented.encode(), token.encode()) and in_grace or ok
        return ok
