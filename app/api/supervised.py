"""`dmad serve` as two processes: a small supervisor that holds the listening socket, and the serving
process it forks, which holds the model and answers. When the serving process dies (a crash, the
kernel's OOM killer, a SIGKILL), the supervisor forks a new one at once.

Why: a serve that dies and is started again by systemd is down for the whole cold start (process start,
importing torch and the app, loading the model, the first batch): about 3 s on an idle 2-core machine, 5 s
beside busy workers, far more under heavy load. Here the
supervisor has imported everything before its first fork, so a new serving process only builds the app
and loads the model (about a second), and the socket never closes: clients that connect meanwhile wait
in the kernel's listen backlog instead of being refused. This is gunicorn's ``--preload`` with one worker,
written out (gunicorn does not run uvicorn's ASGI server with a socket of its own, and uvicorn's
``--workers`` spawns fresh interpreters, which import everything again).

The serving process dies with the supervisor (``PR_SET_PDEATHSIG``): a supervisor killed outright never
leaves a serving process behind, so the next ``dmad serve`` can bind the port. Forking needs a POSIX
system; elsewhere serve runs in one process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# a serving process that dies again within this long of its start is crash-looping: wait before the next
CRASH_LOOP_S = 10.0
MAX_BACKOFF_S = 30.0
BIND_WAIT_S = 15.0
STARTUP_FAILED = 3  # the serving process's exit code when its app did not start (uvicorn's own code)


def can_fork() -> bool:
    return hasattr(os, "fork") and sys.platform.startswith("linux")


def listening_socket(host: str, port: int, backlog: int, wait_s: float = BIND_WAIT_S) -> socket.socket:
    """The socket every serving process answers on, bound once by the supervisor. A port still held is
    waited for up to ``wait_s`` (the serving process of a serve killed a moment ago drains its last
    requests before it exits); then the OS's error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            break
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def _die_with_parent() -> None:
    """Ask the kernel to send this (forked) process SIGTERM when its parent dies (Linux)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run_supervised(serve_once: Callable[[socket.socket], bool], host: str, port: int, backlog: int = 2048) -> int:
    """Bind ``host:port``, then run ``serve_once(sock)`` in a forked serving process, forking a new one
    whenever it dies by a signal or an unexpected exit, until the supervisor gets SIGTERM or SIGINT (passed
    on to the serving process, which drains and exits). Returns the exit code.

    The first serving process failing to start (no active version, a bad setting) ends serve with its
    error, as a one-process serve would; a later one that fails to start (the database away while it
    loads) is retried, backing off, since the line was being served.

    Args:
        serve_once: runs the server on the socket until told to stop and returns whether it started
            (uvicorn's ``Server.run`` and ``Server.started``); called in the child only, so nothing it
            builds (threads, database connections) is ever forked.

    Example:
        >>> run_supervised(lambda sock: uvicorn.Server(config).run(sockets=[sock]), "127.0.0.1", 8000)  # doctest: +SKIP
    """
    sock = listening_socket(host, port, backlog)
    stopping = False
    child = 0

    def on_stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if child:
            try:
                os.kill(child, signum)  # SIGTERM or SIGINT, passed on as it came
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    backoff = 0.5
    served = False  # whether a serving process has started its app yet
    try:
        while True:
            started = time.monotonic()
            sys.stdout.flush()
            sys.stderr.flush()
            child = os.fork()
            if child == 0:  # the serving process
                for s, handler in previous.items():
                    signal.signal(s, handler)
                code = 1
                try:
                    _die_with_parent()
                    if os.getppid() == 1:  # the supervisor died between the fork and the prctl
                        os._exit(0)
                    code = 0 if serve_once(sock) else STARTUP_FAILED
                except SystemExit as exc:  # uvicorn exits with STARTUP_FAILED when the app cannot start
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:  # noqa: BLE001 - reported, then the supervisor decides
                    log.exception("the serving process failed")
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            log.info("serving process %d started", child)
            status = _wait(child)
            child = 0
            if stopping:
                return 0
            exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            if exit_code == 0:
                return 0  # it stopped on its own (asked to): so does serve
            if exit_code == STARTUP_FAILED and not served:
                return STARTUP_FAILED  # its error is printed: nothing a restart would mend
            served = served or exit_code != STARTUP_FAILED
            how = f"exited with code {exit_code}" if exit_code is not None else f"killed by signal {os.WTERMSIG(status)}"
            lived = time.monotonic() - started
            if lived >= CRASH_LOOP_S:  # at once after a long life
                pause, backoff = 0.0, 0.5
            else:  # after a quick death, a pause that doubles with each one, up to MAX_BACKOFF_S
                pause = backoff = min(MAX_BACKOFF_S, backoff * 2)
            print(f"dmad serve: the serving process {how} after {lived:.1f} s; starting a new one"
                  + (f" in {pause:.1f} s" if pause else ""), file=sys.stderr, flush=True)
            time.sleep(pause)
            if stopping:
                return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()


def _wait(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return status
        except InterruptedError:
            continue
        except ChildProcessError:
            return 0
