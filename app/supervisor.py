"""The process supervisor of `dmad up`, `dmad down` and `dmad demo`: the whole product from one
command, on 127.0.0.1 (the commands themselves are in `app/commands/processes.py`).

`up` runs, as child processes of itself, a worker (`dmad worker`), the webhook receiver (`dmad webhook`),
Label Studio (`dmad labelstudio start`, which detaches it) and the Streamlit UI, on the home's embedded
default database (SQLite; a PostgreSQL URL in settings.json is used as it is). Each child gets its own
process group, a log under `<home>/logs` and a pid file under `<home>/run`. Ctrl-C (or SIGTERM) stops
them all: SIGTERM to each group, SIGKILL to any still alive after a grace period. A child that dies
stops the rest, with the tail of its log, so nothing half-runs unnoticed.

`demo` writes a small synthetic dataset into `<home>/demo-data`, then runs init, ingest and train (each
skipped when already done) and `up`, so a new user sees the whole loop in a few minutes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from app.home_folder import Home
from app.signals import install_stop_signals
from dmad_core.errors import Conflict, UserError

HOST = "127.0.0.1"
STOP_GRACE_SECONDS = 20.0  # a worker finishes its current step before it exits
READY_TIMEOUT_SECONDS = 90.0
SUPERVISOR_PID = "up.pid"
DEMO_DATA = "demo-data"
UI_SCRIPT = Path(__file__).resolve().parent / "ui" / "Home.py"


# -- the children -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Service:
    """One child process of `dmad up`."""

    name: str  # also the log and pid file name
    argv: tuple[str, ...]
    port: int | None = None  # must be free before the start
    health_url: str | None = None  # answers 200 once the service is ready
    oneshot: bool = False  # runs to completion (its exit is no failure unless non-zero)
    env: tuple[tuple[str, str], ...] = ()


def dmad_argv(*args: str) -> tuple[str, ...]:
    """A `dmad` subcommand run with this interpreter (works without the venv on PATH)."""
    return (sys.executable, "-m", "app.cli", *args)


def plan_services(home: Home, *, streamlit_port: int, labelstudio: bool = True, worker: bool = True,
                  labelstudio_running: bool = False) -> list[Service]:
    """What `dmad up` starts for this home, in start order; fast services first so the UI is up while
    Label Studio (about a minute the first time) is still starting."""
    from app.services.line.inference import MAX_UPLOAD_BYTES

    settings = home.load_settings()
    root = str(home.root)
    services = [
        Service("webhook", dmad_argv("webhook", "--home", root), port=settings.webhook_port,
                health_url=f"http://{HOST}:{settings.webhook_port}/health"),
    ]
    if worker:
        services.append(Service("worker", dmad_argv("worker", "--home", root)))
    services.append(Service(
        "streamlit",
        (sys.executable, "-m", "streamlit", "run", str(UI_SCRIPT), "--server.address", HOST,
         "--server.port", str(streamlit_port), "--server.headless", "true", "--server.fileWatcherType", "none",
         "--server.runOnSave", "false", "--browser.gatherUsageStats", "false",
         "--client.toolbarMode", "minimal",  # no Deploy button: this UI runs on the factory's machine
         # the upload widget's bound (in MB) is `dmad serve`'s, so it does not promise Streamlit's 200 MB
         "--server.maxUploadSize", str(MAX_UPLOAD_BYTES // 2**20)),
        port=streamlit_port, health_url=f"http://{HOST}:{streamlit_port}/_stcore/health",
        env=(("DMAD_HOME", root),)))
    if labelstudio:
        services.append(Service("labelstudio-start", dmad_argv("labelstudio", "start", "--home", root),
                                port=None if labelstudio_running else settings.label_studio_port, oneshot=True))
    return services


def busy_ports(services: Sequence[Service], in_use: Callable[[int], bool]) -> list[Service]:
    """The services whose port is already taken."""
    return [s for s in services if s.port is not None and in_use(s.port)]


def port_error(home: Home, taken: Sequence[Service]) -> UserError:
    """One clear message naming every busy port and how to free or move it."""
    settings_key = {"webhook": "webhook_port", "streamlit": "streamlit_port",
                    "labelstudio-start": "label_studio_port"}
    lines = [f"port {s.port} on {HOST} ({s.name.removesuffix('-start')}) is already in use by another process"
             for s in taken]
    keys = ", ".join(settings_key[s.name] for s in taken if s.name in settings_key)
    return Conflict("; ".join(lines) + f". Stop what uses it (is `dmad up` already running?), or change {keys} "
                     f"in {home.settings_path}" + (" or pass --port" if any(s.name == "streamlit" for s in taken)
                                                   else ""))


@dataclass
class Running:
    service: Service
    process: subprocess.Popen[bytes]
    log_path: Path


class Supervisor:
    """Starts the services as children in their own process groups, watches them, stops them all."""

    def __init__(self, home: Home, services: Sequence[Service], out: IO[str] | None = None) -> None:
        self.home = home
        self.services = list(services)
        self.out = out or sys.stdout
        self.running: list[Running] = []

    def say(self, text: str) -> None:
        print(f"dmad up: {text}", file=self.out, flush=True)

    def pid_path(self, name: str) -> Path:
        return self.home.run_dir / f"{name}.pid"

    def start(self, service: Service) -> Running:
        self.home.logs_dir.mkdir(parents=True, exist_ok=True)
        self.home.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.home.logs_dir / f"{service.name}.log"
        env = {**os.environ, **dict(service.env), "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log:
            log.write(f"\n==== dmad up: {' '.join(service.argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(service.argv, cwd=self.home.root, env=env, stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_path(service.name).write_text(f"{process.pid}\n")
        running = Running(service, process, log_path)
        self.running.append(running)
        self.say(f"started {service.name} (pid {process.pid}; log {log_path})")
        return running

    def start_all(self) -> None:
        for service in self.services:
            self.start(service)

    def exited(self) -> list[tuple[Running, int]]:
        """Children that have exited since the last call, with their exit codes (forgotten once told)."""
        done = [(r, code) for r in self.running if (code := r.process.poll()) is not None]
        for r, _ in done:
            self.running.remove(r)
            self.pid_path(r.service.name).unlink(missing_ok=True)
        return done

    def wait_ready(self, running: Running, timeout: float, stop: threading.Event) -> bool:
        """Polls the service's health URL until it answers 200; False if it exits, `stop` is set or
        time runs out."""
        import requests

        if running.service.health_url is None:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop.is_set():
            if running.process.poll() is not None:
                return False
            try:
                if requests.get(running.service.health_url, timeout=1).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            stop.wait(0.3)
        return False

    def stop_all(self, grace: float = STOP_GRACE_SECONDS) -> list[str]:
        """SIGTERM every child's group, then SIGKILL any still alive after `grace` seconds; returns the
        names of those that had to be killed."""
        for r in self.running:
            _signal_group(r.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for r in self.running:
            try:
                r.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        killed = []
        for r in self.running:
            if r.process.poll() is None:
                killed.append(r.service.name)
                _signal_group(r.process.pid, signal.SIGKILL)
                r.process.wait(timeout=10)
            self.pid_path(r.service.name).unlink(missing_ok=True)
        self.running.clear()
        return killed


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # started with start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def claim_home(home: Home) -> Path:
    """Writes `<home>/run/up.pid`; refuses when another `dmad up` of this home is alive."""
    home.run_dir.mkdir(parents=True, exist_ok=True)
    path = home.run_dir / SUPERVISOR_PID
    if path.exists():
        text = path.read_text().strip()
        if text.isdigit() and int(text) != os.getpid() and _pid_alive(int(text)):
            raise Conflict(f"`dmad up` already runs for {home.root} (pid {text}); stop it with Ctrl-C in its "
                            f"terminal or `dmad down --home {home.root}`")
    path.write_text(f"{os.getpid()}\n")
    return path


# -- preparing a home ---------------------------------------------------------------------------------
def run_step(argv: Sequence[str], what: str) -> None:
    """A preparation command in the foreground, its output on the terminal; a UserError if it fails."""
    print(f"dmad: {what} ...", flush=True)
    code = subprocess.call(list(argv), stdin=subprocess.DEVNULL)
    if code != 0:
        raise UserError(f"{what} failed (exit {code}); see its output above")


def is_initialised(home: Home) -> bool:
    return home.settings_path.exists() or home.db_path.exists()


def ensure_initialised(home: Home, extra: Sequence[str] = ()) -> None:
    if not is_initialised(home):
        run_step(dmad_argv("init", "--home", str(home.root), *extra), f"creating the home {home.root}")


def has_active_version(home: Home) -> bool:
    from app.services.loop.versions import active_version
    from db.engine import cached_engine, session_factory

    with session_factory(cached_engine(home.db_url()))() as session:
        return active_version(session) is not None


def serve(home: Home, *, port: int | None = None, labelstudio: bool = True, worker: bool = True,
          stop: threading.Event | None = None) -> int:
    """Runs the services until Ctrl-C/SIGTERM (or `stop`), then stops them all; 1 if a child died."""
    from annotation.server import port_in_use
    from app.services.labelstudio.home import label_studio_server

    settings = home.load_settings()
    streamlit_port = port or settings.streamlit_port
    ls_server = label_studio_server(home)
    ls_was_running = labelstudio and ls_server.pid() is not None
    services = plan_services(home, streamlit_port=streamlit_port, labelstudio=labelstudio, worker=worker,
                             labelstudio_running=ls_was_running)
    taken = busy_ports(services, port_in_use)
    if taken:
        raise port_error(home, taken)
    claim = claim_home(home)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        install_stop_signals(stop)
    supervisor = Supervisor(home, services)
    notes = {"labelstudio-start": f"Label Studio is at {ls_server.url}; sign in as admin@dmad.local with the "
                                  f"password in {home.secrets_dir / 'labelstudio_password'}"}
    try:
        code = supervise(supervisor, stop, ready_note=lambda: supervisor.say(
            f"the UI is at http://{HOST}:{streamlit_port} (Ctrl-C stops everything)"
            + (f"; Label Studio is starting at {ls_server.url} (about a minute the first time)"
               if labelstudio and not ls_was_running else "")), done_notes=notes)
    finally:
        if labelstudio and not ls_was_running and ls_server.stop():
            supervisor.say("Label Studio stopped")
        claim.unlink(missing_ok=True)
        supervisor.say("stopped")
    return code


def supervise(supervisor: Supervisor, stop: threading.Event, ready_note: Callable[[], None] | None = None,
              done_notes: dict[str, str] | None = None, grace: float = STOP_GRACE_SECONDS) -> int:
    """Starts the services, tells the user once all with a health URL answer, watches them
    until `stop` is set, then stops them all. Returns 0, or 1 when a long-running child died (which
    stops the rest); a failed one-shot child (Label Studio's start) is reported and the rest go on."""
    code = 0
    try:
        supervisor.start_all()
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        ready = all(supervisor.wait_ready(r, deadline - time.monotonic(), stop) for r in list(supervisor.running))
        if ready and ready_note is not None:
            ready_note()
        while not stop.is_set():
            for r, exit_code in supervisor.exited():
                name = r.service.name
                if r.service.oneshot and exit_code == 0:
                    supervisor.say(f"{name} finished" + (f": {done_notes[name]}" if done_notes and name in done_notes
                                                         else ""))
                elif r.service.oneshot:
                    supervisor.say(f"{name} failed (exit {exit_code}); the rest keeps running. "
                                   f"Last lines of {r.log_path}:\n{log_tail(r.log_path)}")
                else:
                    supervisor.say(f"{name} exited unexpectedly (exit {exit_code}); stopping everything. "
                                   f"Last lines of {r.log_path}:\n{log_tail(r.log_path)}")
                    code = 1
                    stop.set()
            stop.wait(0.3)
    finally:
        supervisor.say("stopping ...")
        killed = supervisor.stop_all(grace)
        if killed:
            supervisor.say(f"killed after {grace:.0f} s: {', '.join(killed)}")
    return code


@dataclass(frozen=True)
class DownResult:
    asked_pid: int | None  # a live `dmad up` that was asked to stop (it cleans up after itself)
    stopped: list[str]  # otherwise: what was still running and got stopped


def service_pid(home: Home, name: str) -> int | None:
    """The pid of the live process that `dmad up` started as ``name`` ("worker", "webhook", ...), from its
    pid file under `<home>/run`; None when there is none or it has died."""
    path = home.run_dir / f"{name}.pid"
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text.isdigit() and _pid_alive(int(text)) else None


def down(home: Home) -> DownResult:
    """Stops the children recorded in `<home>/run` (after a `dmad up` was killed without cleaning up);
    a `dmad up` still alive is only asked to stop."""
    from app.services.labelstudio.home import label_studio_server

    supervisor_pid = home.run_dir / SUPERVISOR_PID
    if supervisor_pid.exists() and (text := supervisor_pid.read_text().strip()).isdigit() and _pid_alive(int(text)):
        os.kill(int(text), signal.SIGTERM)  # a live `dmad up` cleans up after itself
        return DownResult(int(text), [])
    stopped = []
    for name in ("webhook", "worker", "streamlit", "labelstudio-start"):
        pid = service_pid(home, name)
        if pid is not None:
            _signal_group(pid, signal.SIGTERM)
            stopped.append(name)
        (home.run_dir / f"{name}.pid").unlink(missing_ok=True)
    if label_studio_server(home).stop():
        stopped.append("labelstudio")
    supervisor_pid.unlink(missing_ok=True)
    return DownResult(None, stopped)


def demo_folders(home: Home) -> list[Path]:
    """The bundled synthetic categories under `<home>/demo-data`, written once."""
    from dmad_core.data.synthetic import DEMO_CATEGORIES, make_demo_dataset

    root = home.root / DEMO_DATA
    folders = [root / name for name, _texture in DEMO_CATEGORIES]
    if all((f / "train").is_dir() and (f / "test").is_dir() for f in folders):
        return folders
    return make_demo_dataset(root, overwrite=True)


def prepare_demo(home: Home, epochs: int | None = None) -> None:
    """Demo data, init, ingest and a first training, each skipped when already done."""
    home.create()
    folders = demo_folders(home)
    print(f"dmad: demo data in {home.root / DEMO_DATA} ({', '.join(f.name for f in folders)})", flush=True)
    # imported here: every `dmad` command loads this module, and the generator pulls in scipy (0.4 s of a
    # cold `dmad serve`)
    from dmad_core.data.synthetic import DEMO_FALSE_ALARM_RATE, DEMO_HARD_CATEGORY, DEMO_VALIDATION_FRACTION

    # --no-hint: the demo runs the next step itself, so no "next: dmad ..." line; its false-alarm rate is one
    # its validation normals can check (dmad_core/data/synthetic.py)
    init = ("--no-hint", "--false-alarm-rate", str(DEMO_FALSE_ALARM_RATE),
            "--validation-fraction", str(DEMO_VALIDATION_FRACTION))
    ensure_initialised(home, init if epochs is None else (*init, "--train-epochs", str(epochs)))
    root = str(home.root)
    run_step(dmad_argv("ingest", "--home", root, "--no-hint", *map(str, folders)), "ingesting the demo categories")
    if has_active_version(home):
        print("dmad: a model is already active: skipping training (`dmad train` retrains from scratch)")
    else:
        run_step(dmad_argv("train", "--home", root), "training the first (unsupervised) model")
    print("dmad: next, in the UI: Review the most anomalous patches, send some to Label Studio, draw or "
          "correct the defect masks there, and watch the retrain on the Training and Metrics pages.", flush=True)
    print(f"dmad: to see the learning pay, choose the class '{DEMO_HARD_CATEGORY}' in Review: its defects are faint "
          "orange tints on unevenly lit film, which the first model ranks poorly. Draw the tint's outline on "
          f"five of them; after the retrain, Metrics shows {DEMO_HARD_CATEGORY}'s image AUROC rise (about 60 % -> "
          "80 %) and Training says what the masks bought.", flush=True)
