"""Progress bars that show on a terminal and in a log file alike.

tqdm's ``disable=None`` hides a bar whenever stderr is not a terminal, so a CI log, a ``nohup`` run or a
supervised worker saw nothing for a 30-minute evaluation. Here a bar is always on: on a terminal it is
tqdm's usual bar, redrawn in place; elsewhere it writes whole lines, at most one every
``LOG_INTERVAL_S`` seconds per bar, and nothing at all for a step that ends within ``LOG_DELAY_S``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 10.0  # the most a log file gets from one bar: a line every this many seconds
LOG_DELAY_S = 3.0  # a step shorter than this leaves no line in a log file
REPORTS_PER_STEP = 20  # Progress callbacks per long step: a retrain's log gets a line per 5 %, not per item


class _LineStream:
    """Turns tqdm's in-place redraws ("\\r" + text) into whole lines for a stream that is not a terminal."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def make_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str, unit: str,
             enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr: in place on a terminal, bounded whole lines otherwise.

    Args:
        iterable: what to iterate over (or None and ``update`` by hand).
        total: the number of steps when ``iterable`` has no length.
        desc: what the step is doing, e.g. ``"features: normal"``.
        unit: what one step is, e.g. ``"img"``.
        enabled: False for a silent bar (same interface, no output).

    Returns:
        The tqdm bar; close it (or use it as a context manager) when the step ends.

    Example:
        >>> for _ in make_bar(range(3), desc="epochs", unit="epoch"):
        ...     pass
    """
    stream = sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=not enabled, file=stream)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=True, disable=not enabled, ascii=True,
                file=_LineStream(stream), mininterval=LOG_INTERVAL_S, delay=LOG_DELAY_S)


def is_report_step(done: int, total: int, reports: int = REPORTS_PER_STEP) -> bool:
    """Whether the ``done``-th of ``total`` items (counted from 1) is one of about ``reports`` evenly spaced
    points at which a long step calls its Progress callback; the last item always is.

    Example:
        >>> [d for d in range(1, 101) if is_report_step(d, 100, reports=4)]
        [25, 50, 75, 100]
    """
    every = max(1, -(-total // reports))
    return done % every == 0 or done == total
