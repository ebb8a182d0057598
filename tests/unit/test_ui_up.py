"""`dmad up`'s orchestration with real child processes (small Python programs standing in for the
services): start, readiness, a dying child stopping the rest, Ctrl-C, SIGKILL after the grace period,
busy ports, one `dmad up` per home."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app import supervisor as up
from app.home_folder import Home, HomeSettings
from dmad_core.data.synthetic import DEMO_CATEGORIES
from dmad_core.errors import UserError
from tests.processes import alive, free_port


def python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


SLEEPER = python("import time\nwhile True: time.sleep(0.1)")
STUBBORN = python("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ignoring SIGTERM', "
                  "flush=True)\nwhile True: time.sleep(0.1)")


def http_server(port: int) -> tuple[str, ...]:
    return (sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1")


@pytest.fixture
def home(tmp_path: Path) -> Home:
    home = Home.at(tmp_path / "home")
    home.create()
    return home


def supervise_in_thread(supervisor: up.Supervisor, stop: threading.Event, grace: float = 5.0,
                        **kwargs: object) -> tuple[threading.Thread, dict[str, int]]:
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", up.supervise(supervisor, stop, grace=grace,
                                                                                    **kwargs)))
    thread.start()
    return thread, result


def wait_for(predicate, timeout: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- the plan -------------------------------------------------------------------------------------------
def test_plan_starts_every_service_on_localhost_with_the_home_settings(home: Home) -> None:
    home.save_settings(HomeSettings(webhook_port=9001, label_studio_port=9002, streamlit_port=9003))
    services = {s.name: s for s in up.plan_services(home, streamlit_port=9003)}
    assert list(services) == ["webhook", "worker", "streamlit", "labelstudio-start"]
    assert services["webhook"].port == 9001 and services["webhook"].health_url == "http://127.0.0.1:9001/health"
    assert services["labelstudio-start"].port == 9002 and services["labelstudio-start"].oneshot
    ui = services["streamlit"]
    assert ui.port == 9003 and dict(ui.env)["DMAD_HOME"] == str(home.root)
    assert ui.argv[ui.argv.index("--server.address") + 1] == "127.0.0.1"
    assert ui.argv[ui.argv.index("--server.maxUploadSize") + 1] == "64"  # MB: `dmad serve`'s bound, not 200
    assert ui.argv[ui.argv.index("--client.toolbarMode") + 1] == "minimal"  # no Deploy button on any page
    assert Path(ui.argv[ui.argv.index("run") + 1]).is_file()
    for service in services.values():
        assert str(home.root) in service.argv or service is ui

    bare = up.plan_services(home, streamlit_port=9003, labelstudio=False, worker=False)
    assert [s.name for s in bare] == ["webhook", "streamlit"]
    running = {s.name: s for s in up.plan_services(home, streamlit_port=9003, labelstudio_running=True)}
    assert running["labelstudio-start"].port is None  # ours already runs there: no port check


def test_a_worker_started_by_up_is_found_by_its_pid_file(home: Home) -> None:
    """`dmad annotate` says the worker `dmad up` started takes the retrain, instead of "run `dmad worker`"."""
    from app.commands.loop import _who_takes_jobs

    assert up.service_pid(home, "worker") is None
    assert "run `dmad worker`" in _who_takes_jobs(home)
    child = subprocess.Popen(SLEEPER)
    try:
        (home.run_dir / "worker.pid").write_text(f"{child.pid}\n")
        assert up.service_pid(home, "worker") == child.pid
        assert _who_takes_jobs(home) == f": the worker `dmad up` started (pid {child.pid}) takes it"
    finally:
        child.kill()
        child.wait()
    assert up.service_pid(home, "worker") is None  # a dead worker's pid file counts as none


def test_busy_ports_are_named_with_how_to_move_them(home: Home) -> None:
    port = free_port()
    services = up.plan_services(home, streamlit_port=port, labelstudio=False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        from annotation.server import port_in_use

        taken = up.busy_ports(services, port_in_use)
        assert [s.name for s in taken] == ["streamlit"]
        message = str(up.port_error(home, taken))
    assert f"port {port} on 127.0.0.1 (streamlit) is already in use" in message
    assert "streamlit_port" in message and str(home.settings_path) in message and "--port" in message
    assert up.busy_ports(services, port_in_use) == []


# -- supervising ----------------------------------------------------------------------------------------
def test_ready_then_ctrl_c_stops_every_child_and_cleans_up(home: Home) -> None:
    port = free_port()
    services = [up.Service("web", http_server(port), port=port, health_url=f"http://127.0.0.1:{port}/"),
                up.Service("sleeper", SLEEPER)]
    out = io.StringIO()
    supervisor = up.Supervisor(home, services, out=out)
    stop = threading.Event()
    ready = threading.Event()
    thread, result = supervise_in_thread(supervisor, stop, ready_note=ready.set)
    assert ready.wait(20), out.getvalue()
    pids = [r.process.pid for r in supervisor.running]
    assert sorted(p.name for p in home.run_dir.glob("*.pid")) == ["sleeper.pid", "web.pid"]
    assert (home.logs_dir / "web.log").exists() and (home.logs_dir / "sleeper.log").exists()
    stop.set()  # what the SIGINT handler does
    thread.join(30)
    assert result["code"] == 0
    assert not any(alive(pid) for pid in pids)
    assert list(home.run_dir.glob("*.pid")) == []
    assert "stopping" in out.getvalue() and "killed" not in out.getvalue()


def test_a_dying_child_stops_the_rest_and_shows_its_log(home: Home) -> None:
    services = [up.Service("sleeper", SLEEPER),
                up.Service("crasher", python("import sys, time\ntime.sleep(0.5)\nprint('database is locked')\n"
                                             "sys.exit(3)"))]
    out = io.StringIO()
    supervisor = up.Supervisor(home, services, out=out)
    stop = threading.Event()
    thread, result = supervise_in_thread(supervisor, stop)
    wait_for(lambda: len(supervisor.running) == 2)
    sleeper = supervisor.running[0].process.pid
    thread.join(30)
    assert result["code"] == 1
    assert not alive(sleeper)
    text = out.getvalue()
    assert "crasher exited unexpectedly (exit 3); stopping everything" in text and "database is locked" in text


def test_one_shot_children_may_finish_or_fail_without_stopping_the_rest(home: Home) -> None:
    services = [up.Service("sleeper", SLEEPER),
                up.Service("setup", python("print('ok')"), oneshot=True),
                up.Service("optional", python("import sys\nprint('no label-studio here')\nsys.exit(2)"), oneshot=True)]
    out = io.StringIO()
    supervisor = up.Supervisor(home, services, out=out)
    stop = threading.Event()
    thread, result = supervise_in_thread(supervisor, stop, done_notes={"setup": "all set"})
    wait_for(lambda: "optional failed" in out.getvalue() and "setup finished" in out.getvalue())
    assert [r.service.name for r in supervisor.running] == ["sleeper"]
    stop.set()
    thread.join(30)
    assert result["code"] == 0
    text = out.getvalue()
    assert "setup finished: all set" in text
    assert "optional failed (exit 2); the rest keeps running" in text and "no label-studio here" in text


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period(home: Home) -> None:
    out = io.StringIO()
    supervisor = up.Supervisor(home, [up.Service("stubborn", STUBBORN)], out=out)
    stop = threading.Event()
    thread, result = supervise_in_thread(supervisor, stop, grace=1.0)
    log = home.logs_dir / "stubborn.log"
    # The child's own line, not the supervisor's header (which quotes the child's code, this text included):
    # SIGTERM sent before the child has set SIG_IGN would kill it at once.
    wait_for(lambda: log.exists() and "ignoring SIGTERM" in log.read_text().splitlines())
    pid = supervisor.running[0].process.pid
    started = time.monotonic()
    stop.set()
    thread.join(30)
    assert not alive(pid) and time.monotonic() - started >= 1.0
    assert "killed after 1 s: stubborn" in out.getvalue() and result["code"] == 0


def test_one_dmad_up_per_home(home: Home) -> None:
    other = subprocess.Popen(SLEEPER)
    try:
        (home.run_dir / up.SUPERVISOR_PID).write_text(f"{other.pid}\n")
        with pytest.raises(UserError, match=rf"already runs for .* \(pid {other.pid}\).*dmad down"):
            up.claim_home(home)
    finally:
        other.kill()
        other.wait()
    path = up.claim_home(home)  # the pid file of a dead `dmad up` is stale: taken over
    assert path.read_text().strip() == str(os.getpid())


def test_demo_data_is_written_under_the_home_once(home: Home, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    folders = up.demo_folders(home)
    assert [f.parent for f in folders] == [home.root / up.DEMO_DATA] * len(DEMO_CATEGORIES)
    assert all(any((f / "test").glob("*/*.png")) for f in folders)
    stamp = [(f / "train").stat().st_mtime_ns for f in folders]
    assert up.demo_folders(home) == folders
    assert [(f / "train").stat().st_mtime_ns for f in folders] == stamp  # not rewritten
    assert list(cwd.iterdir()) == []
