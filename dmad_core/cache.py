"""On-disk feature cache: no image goes through the backbone twice for the same extractor configuration.

Each image's patch features are one float16 ``.npy`` file (memory-mapped on read), keyed by the SHA-256 of
the image file's bytes and the extractor configuration's key:
``<root>/<config key>/<hash[:2]>/<hash>.npy``. Files are written to a temporary name and renamed, so a
killed process never leaves a half-written entry that a later read would trust.

The cache can be held to a size budget (``evict``): least recently used entries go first (a read touches
its entry), never a protected one (the caller names them: the normal bank's images, the annotated ones).
An entry evicted while a job still wants it is only a miss for that job: its features are computed again
(a file already memory-mapped stays readable after its removal).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def content_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the file's bytes: the identity of an image everywhere in the product."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


@dataclass(frozen=True)
class EvictionReport:
    entries_before: int
    bytes_before: int
    evicted: int
    bytes_after: int
    protected: int  # protected entries present (never evicted)


@dataclass
class FeatureCache:
    root: Path
    config_key: str
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def path_for(self, image_hash: str) -> Path:
        return self.root / self.config_key / image_hash[:2] / f"{image_hash}.npy"

    def get(self, image_hash: str) -> np.ndarray | None:
        """The cached (gh, gw, C) float16 features, memory-mapped, or None (counted as a miss)."""
        path = self.path_for(image_hash)
        if not path.exists():
            self.stats.misses += 1
            return None
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError):  # unreadable entry: treat as missing, it will be rewritten
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        try:
            os.utime(path)  # recently used: the last to be evicted
        except OSError:
            pass
        return arr

    def put(self, image_hash: str, features: np.ndarray) -> None:
        path = self.path_for(image_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp.npy")
        try:
            np.save(tmp, np.asarray(features, dtype=np.float16))
            os.replace(tmp, path)
        except BaseException:  # a full disk: no half-written file left behind, under any name
            tmp.unlink(missing_ok=True)
            raise

    def __contains__(self, image_hash: str) -> bool:
        return self.path_for(image_hash).exists()

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, path) of every entry of this configuration."""
        out = []
        for path in (self.root / self.config_key).glob("*/*.npy"):
            if path.name.startswith("."):
                continue  # a write in progress
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, path))
        return out

    def evict(self, budget_bytes: int, protected: set[str] | frozenset[str] = frozenset()) -> EvictionReport:
        """Remove least recently used entries until this configuration's entries fit ``budget_bytes``,
        never one whose image hash is in ``protected`` (which may alone exceed the budget)."""
        entries = sorted(self.entries())
        total = before = sum(size for _, size, _ in entries)
        evicted = kept = 0
        for _, size, path in entries:
            if path.stem in protected:
                kept += 1
                continue
            if total <= budget_bytes:
                continue
            path.unlink(missing_ok=True)
            total -= size
            evicted += 1
        return EvictionReport(len(entries), before, evicted, total, kept)
