"""Secret files (API tokens, passwords, the webhook secret): one file per secret in a folder of mode
0700, each file 0600 from its first byte, so there is no window in which others could read it.

Example::

    write_secret(Path("dmad-home/secrets"), "labelstudio_token", token)
    read_secret(Path("dmad-home/secrets"), "labelstudio_token")  # the token, or None when unset
"""

from __future__ import annotations

import os
from pathlib import Path


def write_secret(folder: Path, name: str, value: str) -> Path:
    """Writes ``value`` to ``folder/name`` (0600; the folder 0700, created if needed); returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return path


def read_secret(folder: Path, name: str) -> str | None:
    """The secret's value without surrounding whitespace, or None when it was never written."""
    path = folder / name
    return path.read_text().strip() if path.exists() else None
