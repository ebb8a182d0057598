"""`dmad up` as a user runs it: a real process tree (worker, webhook receiver, Streamlit), stopped by
Ctrl-C; and a clear error, not a half-started product, when a port is taken."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from app.home_folder import Home, HomeSettings
from tests.processes import alive, dmad, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def home(tmp_path: Path) -> Home:
    home = Home.at(tmp_path / "home")
    subprocess.run(dmad("init", "--home", str(home.root)), check=True, capture_output=True, timeout=120)
    settings = home.load_settings()
    home.save_settings(HomeSettings(**{**settings.__dict__, "webhook_port": free_port(),
                                       "streamlit_port": free_port(), "label_studio_port": free_port()}))
    return home


def test_up_serves_the_ui_and_ctrl_c_stops_everything(home: Home, tmp_path: Path) -> None:
    settings = home.load_settings()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.Popen(dmad("up", "--home", str(home.root), "--no-labelstudio"), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "dmad up exited early:\n" + "".join(lines)
            lines.append(line)
            if "the UI is at" in line:
                break
        assert f"http://127.0.0.1:{settings.streamlit_port}" in lines[-1]
        assert requests.get(f"http://127.0.0.1:{settings.streamlit_port}/_stcore/health", timeout=5).ok
        assert requests.get(f"http://127.0.0.1:{settings.webhook_port}/health", timeout=5).ok
        pids = {p.stem: int(p.read_text()) for p in home.run_dir.glob("*.pid")}
        assert set(pids) == {"up", "webhook", "worker", "streamlit"} and pids["up"] == proc.pid
        assert all(alive(pid) for pid in pids.values())
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "dmad up: stopped" in out and "killed" not in out
    assert not any(alive(pid) for pid in pids.values())
    assert list(home.run_dir.glob("*.pid")) == []
    assert {p.name for p in home.logs_dir.iterdir()} >= {"webhook.log", "worker.log", "streamlit.log"}
    assert list(cwd.iterdir()) == []  # nothing written to the working directory


def test_up_refuses_a_busy_port_with_a_clear_error(home: Home) -> None:
    settings = home.load_settings()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", settings.webhook_port))
        listener.listen()
        result = subprocess.run(dmad("up", "--home", str(home.root), "--no-labelstudio"), capture_output=True,
                                text=True, timeout=60)
    assert result.returncode == 2
    assert f"port {settings.webhook_port} on 127.0.0.1 (webhook) is already in use" in result.stderr
    assert "webhook_port" in result.stderr and "Traceback" not in result.stderr
    assert not list(home.run_dir.glob("*.pid"))  # nothing was started
