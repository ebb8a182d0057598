"""A PostgreSQL server of one's own, from the machine's binaries (initdb, pg_ctl), in a temporary folder on a
spare port on 127.0.0.1: something a test or the soak (benchmarks/soak.py) may stop and start again
without touching the machine's own server. As root it runs as the ``postgres`` user (initdb refuses root).

    with OwnPostgres.create() as pg:      # initdb + start; stop and remove on exit
        url = pg.url("dmad")              # postgresql+psycopg://postgres@127.0.0.1:PORT/dmad (created)
        pg.stop(); pg.start()
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

RUN_AS = "postgres"


def binaries() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin holding initdb and pg_ctl, or None."""
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")
             if (Path(p) / "initdb").exists() and (Path(p) / "pg_ctl").exists()]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnPostgres:
    """One private server (see the module docstring)."""

    def __init__(self, bin_dir: Path, root: Path, port: int):
        self.bin_dir, self.root, self.port = bin_dir, root, port
        self.data, self.log = root / "data", root / "postgres.log"
        self.as_other = os.geteuid() == 0

    @staticmethod
    def create(port: int | None = None, timeout: float = 120) -> OwnPostgres:
        """initdb in a new temporary folder and start the server; RuntimeError when it cannot."""
        bin_dir = binaries()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
        root = Path(tempfile.mkdtemp(prefix="dmad-own-pg-"))
        pg = OwnPostgres(bin_dir, root, port or _free_port())
        try:
            if pg.as_other:
                user = pwd.getpwnam(RUN_AS)
                os.chown(root, user.pw_uid, user.pw_gid)
            pg._run("initdb", "-D", str(pg.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8",
                    timeout=timeout)
            pg.start(timeout)
        except BaseException:
            pg.close()
            raise
        return pg

    def _run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / tool), *args]
        if self.as_other:
            command = ["runuser", "-u", RUN_AS, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        return done

    def start(self, timeout: float = 120) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", str(int(timeout)),
                  "start", timeout=timeout + 10)

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop the server (``fast``: disconnect clients, shut down cleanly; ``immediate``: like a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(int(timeout)), "stop",
                  timeout=timeout + 10)

    @property
    def running(self) -> bool:
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "status"]
        if self.as_other:
            command = ["runuser", "-u", RUN_AS, "--", *command]
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0

    def url(self, database: str = "postgres") -> str:
        """The URL of ``database`` on this server, created when it does not exist yet."""
        if database != "postgres":
            import psycopg

            with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                                 autocommit=True, connect_timeout=10) as conn:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None:
                    conn.execute(f'CREATE DATABASE "{database}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def close(self) -> None:
        """Stop the server (if running) and remove its folder."""
        try:
            if self.data.exists() and self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> OwnPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
