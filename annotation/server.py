"""The Label Studio server process: found, started detached, checked, and stopped by the project.

Label Studio lives in its own virtual environment (its pins clash with ours), so we only ever run its
``label-studio`` executable, bound to 127.0.0.1. Facts this module is built around:

* Credentials are given through environment variables on the *first* start (no database yet): the
  admin user, its password and a legacy API token we generate, so we know the token without scraping
  output. They never go on a command line (visible in ``ps``) nor into a log line we write.
* A busy port makes Label Studio silently move to the next one, so we check the port before starting
  and, after the start, that it answers on the port we asked for.
* Webhooks to 127.0.0.1 are refused unless ``SSRF_PROTECTION_ENABLED=false``; our receiver runs there.

The server knows only the folders it writes to (:class:`ServerPaths`), not the app's home folder
(``app.services.labelstudio.home.label_studio_server`` builds one for a home).

Example::

    paths = ServerPaths(data_dir=root / "labelstudio", run_dir=root / "run", logs_dir=root / "logs",
                        secrets_dir=root / "secrets")
    server = LabelStudioServer(paths, default_port=8080)
    server.start()            # about 50 s the first time (migrations), 10 s later
    client = server.client()  # label_studio_sdk.LabelStudio with our token
    server.stop()
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from annotation.secret_files import read_secret, write_secret
from dmad_core.errors import Conflict, Invalid, Unavailable

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

log = logging.getLogger(__name__)

BIN_ENV = "DMAD_LABEL_STUDIO_BIN"
TOKEN_SECRET = "labelstudio_token"
PASSWORD_SECRET = "labelstudio_password"
ADMIN_EMAIL = "admin@dmad.local"
HOST = "127.0.0.1"
START_SECONDS = 180.0  # how long a start may take before the server counts as not answering
_PID_FILE = "labelstudio.pid"
_PORT_FILE = "labelstudio.port"
_LOG_FILE = "labelstudio.log"
_DB_FILE = "label_studio.sqlite3"
_REPO_ROOT = Path(__file__).resolve().parents[1]
_INSTALL_HINT = (
    "Label Studio is not installed. Run scripts/setup.sh (it creates .venv-labelstudio), or install it "
    "into a separate virtual environment (`python -m venv ~/ls && ~/ls/bin/pip install label-studio`) "
    f"and set {BIN_ENV}=~/ls/bin/label-studio."
)


def find_label_studio_bin(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The ``label-studio`` executable: the explicit argument, ``$DMAD_LABEL_STUDIO_BIN``,
    ``<repo>/.venv-labelstudio/bin/label-studio``, then ``label-studio`` on PATH.

    An explicit choice that does not exist is an error rather than a silent fallback.
    """
    for origin, value in (("the given path", explicit), (BIN_ENV, os.environ.get(BIN_ENV))):
        if value:
            path = Path(value).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise Invalid(f"{origin} names {path}, which is not an executable label-studio")
            return path
    in_repo = _REPO_ROOT / ".venv-labelstudio" / "bin" / "label-studio"
    if in_repo.is_file() and os.access(in_repo, os.X_OK):
        return in_repo
    on_path = shutil.which("label-studio")
    if on_path:
        return Path(on_path)
    raise Unavailable(_INSTALL_HINT)


def redact(text: str, secret_values: list[str]) -> str:
    """``text`` with every secret replaced by ``***`` (for log lines and error messages)."""
    for value in secret_values:
        if value:
            text = text.replace(value, "***")
    return text


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when something listens on host:port (a connect succeeds, or a bind fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        if s.connect_ex((host, port)) == 0:
            return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else: not ours
        return False
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state != "Z"
    return True


def _is_label_studio(pid: int) -> bool:
    """Guards against a stale pid file whose pid now belongs to another program."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():
        return _pid_alive(pid)
    try:
        return b"label-studio" in cmdline.read_bytes() or b"label_studio" in cmdline.read_bytes()
    except OSError:
        return False


@dataclass(frozen=True)
class ServerPaths:
    """Where one Label Studio keeps its files, and how messages name it."""

    data_dir: Path  # Label Studio's own data folder (its SQLite database)
    run_dir: Path  # pid and port files of the running server
    logs_dir: Path
    secrets_dir: Path  # API token and admin password, 0600
    owner: str = ""  # what messages call the owner of this server (e.g. the home folder)
    start_command: str = "dmad labelstudio start"  # what a user runs to start it


@dataclass(frozen=True)
class ServerStatus:
    """What `dmad labelstudio status` reports."""

    running: bool
    pid: int | None
    url: str
    healthy: bool
    starting: bool = False  # running, not answering yet, and started less than START_SECONDS ago

    @property
    def state(self) -> str:
        """In two words or fewer, the same on every page and in the terminal: "running", "starting",
        "not answering" (running past its start time without answering) or "not running"."""
        if self.healthy:
            return "running"
        if self.starting:
            return "starting"
        return "not answering" if self.running else "not running"


class LabelStudioServer:
    """Starts, checks and stops the Label Studio that keeps its files in ``paths``.

    ``port`` defaults to the port of the running server of these paths, else ``default_port``;
    ``bin`` defaults to :func:`find_label_studio_bin`.
    """

    def __init__(self, paths: ServerPaths, port: int | None = None, bin: str | os.PathLike[str] | None = None,
                 default_port: int = 8080) -> None:
        self.paths = paths
        self._bin = bin
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = int(port) if port is not None else self._running_port() or int(default_port)

    def _running_port(self) -> int | None:
        """The port recorded by the start of the server that is running now, if any."""
        if self.pid() is None:
            return None
        try:
            return int(self.port_path.read_text().strip())
        except (OSError, ValueError):
            return None

    # -- where things are -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid_path(self) -> Path:
        return self.paths.run_dir / _PID_FILE

    @property
    def port_path(self) -> Path:
        return self.paths.run_dir / _PORT_FILE

    @property
    def log_path(self) -> Path:
        return self.paths.logs_dir / _LOG_FILE

    @property
    def database_path(self) -> Path:
        return self.paths.data_dir / _DB_FILE

    def token(self) -> str:
        """The admin's API token (send as ``Authorization: Token <token>``)."""
        token = read_secret(self.paths.secrets_dir, TOKEN_SECRET)
        if not token:
            raise Unavailable(
                f"no Label Studio token in {self.paths.secrets_dir}: start it once with "
                f"`{self.paths.start_command}`"
            )
        return token

    def client(self) -> LabelStudio:
        """An SDK client for this server, authenticated with our token."""
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=self.token())

    # -- state ------------------------------------------------------------------------------------
    def pid(self) -> int | None:
        """The pid of our running Label Studio, or None (a stale pid file counts as none)."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) and _is_label_studio(pid) else None

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            response = requests.get(f"{self.url}/health", timeout=timeout)
        except requests.RequestException:
            return False
        return response.status_code == 200

    def status(self) -> ServerStatus:
        pid = self.pid()
        healthy = pid is not None and self.healthy()
        return ServerStatus(running=pid is not None, pid=pid, url=self.url, healthy=healthy,
                            starting=pid is not None and not healthy and self._started_within(START_SECONDS))

    def _started_within(self, seconds: float) -> bool:
        """Whether our pid file (written when the server was started) is younger than ``seconds``."""
        try:
            return time.time() - self.pid_path.stat().st_mtime < seconds
        except OSError:
            return False

    # -- start / stop -----------------------------------------------------------------------------
    def start(self, timeout: float = START_SECONDS) -> ServerStatus:
        """Starts Label Studio detached (own process group) and waits until it answers on ``self.port``.

        Does nothing when our server is already running. Raises ``UserError`` when the port is taken by
        another process, when the server exits, or when it does not answer within ``timeout`` seconds.
        """
        for folder in (self.paths.data_dir, self.paths.run_dir, self.paths.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        if self.pid() is not None:
            running_port = self._running_port()
            if running_port is not None and running_port != self.port:
                owner = self.paths.owner or self.paths.data_dir
                raise Conflict(f"Label Studio of {owner} already runs on port {running_port}; "
                                "stop it first to move it to another port")
            log.info("Label Studio already running (pid %s) at %s", self.pid(), self.url)
            return self.status()
        if port_in_use(self.port):
            raise Conflict(
                f"port {self.port} on {HOST} is already in use by another process; stop it or choose "
                f"another port (label_studio_port in the settings of {self.paths.owner or self.paths.data_dir})"
            )
        executable = find_label_studio_bin(self._bin)
        first_start = not self.database_path.exists()
        env = self._environment(first_start)
        secret_values = [env.get("LABEL_STUDIO_USER_TOKEN", ""), env.get("LABEL_STUDIO_PASSWORD", "")]
        cmd = [str(executable), "start", "--no-browser", "--internal-host", HOST, "--port", str(self.port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logfile:
            offset = logfile.tell()
            note = f"dmad: starting {' '.join(cmd)} (first start: {first_start})\n"
            logfile.write(redact(note, secret_values).encode())
            logfile.flush()
            self._proc = subprocess.Popen(
                cmd, env=env, cwd=self.paths.data_dir, stdin=subprocess.DEVNULL,
                stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        self.pid_path.write_text(f"{self._proc.pid}\n")
        self.port_path.write_text(f"{self.port}\n")
        log.info("Label Studio starting (pid %s) at %s; log: %s", self._proc.pid, self.url, self.log_path)
        try:
            self._wait_until_up(timeout, offset)
        except BaseException:
            self.stop()
            raise
        return self.status()

    def _environment(self, first_start: bool) -> dict[str, str]:
        """The server's environment. Credentials are generated, stored 0600 and passed only on the first
        start: Label Studio applies them when it creates its database and ignores them afterwards."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "HEARTEX_"))}
        env.update({
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.paths.data_dir),
            "SSRF_PROTECTION_ENABLED": "false",  # our webhook receiver is on 127.0.0.1
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "false",  # images come from our receiver
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "CONVERTER_DOWNLOAD_RESOURCES": "false",
            # No error reports to sentry.io (no network at run time). An empty DSN also skips
            # sentry_sdk.init, which Label Studio 1.23 calls with an option sentry-sdk 3 removed.
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "PYTHONUNBUFFERED": "1",
        })
        for name in ("PORT", "HOST", "USERNAME", "PASSWORD", "USER_TOKEN", "DATABASE_NAME"):
            env.pop(name, None)  # get_env() would also read the bare names
        if first_start:
            token = secrets.token_hex(20)
            password = secrets.token_urlsafe(18)
            write_secret(self.paths.secrets_dir, TOKEN_SECRET, token)
            write_secret(self.paths.secrets_dir, PASSWORD_SECRET, password)
            env.update({
                "LABEL_STUDIO_USERNAME": ADMIN_EMAIL,
                "LABEL_STUDIO_PASSWORD": password,
                "LABEL_STUDIO_USER_TOKEN": token,
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            })
        elif not read_secret(self.paths.secrets_dir, TOKEN_SECRET):
            raise Conflict(
                f"Label Studio's database exists ({self.database_path}) but its API token is missing from "
                f"{self.paths.secrets_dir}; delete {self.paths.data_dir} to start over"
            )
        return env

    def _wait_until_up(self, timeout: float, log_offset: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise Unavailable(
                    f"Label Studio exited with code {self._proc.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self._log_tail(log_offset)}"
                )
            moved = self._moved_port(log_offset)
            if moved is not None:
                raise Conflict(
                    f"port {self.port} was taken while Label Studio started (it moved to {moved}); "
                    "stop the other process or choose another port"
                )
            if self.healthy(timeout=1.0) and self._proc.poll() is None:
                return
            time.sleep(0.5)
        raise Unavailable(
            f"Label Studio did not answer on {self.url} within {timeout:.0f} s; "
            f"last lines of {self.log_path}:\n{self._log_tail(log_offset)}"
        )

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_tail(self, offset: int, lines: int = 20) -> str:
        secret_values = [read_secret(self.paths.secrets_dir, TOKEN_SECRET) or "",
                         read_secret(self.paths.secrets_dir, PASSWORD_SECRET) or ""]
        return redact("\n".join(self._log_since(offset).splitlines()[-lines:]), secret_values)

    def _moved_port(self, offset: int) -> int | None:
        """The port Django says it serves on, when that is not ours (Label Studio moved on a busy port)."""
        marker = "Starting development server at http://"
        for line in self._log_since(offset).splitlines():
            if marker in line:
                address = line.split(marker, 1)[1].strip().rstrip("/")
                try:
                    port = int(address.rsplit(":", 1)[1])
                except (IndexError, ValueError):
                    return None
                return port if port != self.port else None
        return None

    def stop(self, timeout: float = 20.0) -> bool:
        """SIGTERM to the server's process group, SIGKILL after ``timeout``; True if one was running."""
        pid = self.pid()
        if pid is None:
            self.pid_path.unlink(missing_ok=True)
            self.port_path.unlink(missing_ok=True)
            return False
        self._signal_group(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            log.warning("Label Studio (pid %s) ignored SIGTERM for %.0f s; killing it", pid, timeout)
            self._signal_group(pid, signal.SIGKILL)
            self._wait_exit(pid, 10.0)
        self.pid_path.unlink(missing_ok=True)
        self.port_path.unlink(missing_ok=True)
        self._proc = None
        log.info("Label Studio stopped (pid %s)", pid)
        return True

    @staticmethod
    def _signal_group(pid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pid, sig)  # started with start_new_session: its pgid is its pid
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(pid, sig)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                if self._proc.poll() is not None:
                    return True
            elif not _pid_alive(pid):
                return True
            time.sleep(0.2)
        return False
