"""Label Studio process management, against a stand-in `label-studio` executable (fast, no Django).

The stand-in behaves like the real one where it matters here: it takes `start --port N`, prints
Django's "Starting development server at ..." line, answers /health, and its behaviour is switched by
FAKE_LS_MODE (leaking its token to stdout, moving to another port, ignoring SIGTERM, never answering).
The real server is exercised in tests/integration/test_labelstudio_*.py.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

import pytest

from annotation import server as server_module
from annotation.server import (
    BIN_ENV,
    PASSWORD_SECRET,
    TOKEN_SECRET,
    find_label_studio_bin,
    port_in_use,
    redact,
)
from app.home_folder import Home
from app.services.labelstudio.home import label_studio_server
from dmad_core.errors import UserError
from tests.processes import alive, free_port

FAKE = """#!{python}
import http.server, json, os, signal, sys, time
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
mode = os.environ.get("FAKE_LS_MODE", "ok")
print("fake label-studio", " ".join(args), flush=True)
with open("fake_env.json", "w") as f:
    json.dump({{k: v for k, v in os.environ.items() if k.startswith(("LABEL_STUDIO_", "SSRF"))}}, f)
if mode == "leak":
    print("token is", os.environ.get("LABEL_STUDIO_USER_TOKEN"), flush=True)
    sys.exit(3)
if mode == "ignore_term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "moved":
    port += 1
if mode == "silent":
    time.sleep(3600)
open("label_studio.sqlite3", "a").close()
print(f"Starting development server at http://127.0.0.1:{{port}}/", flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b'{{"status": "UP"}}')
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "label-studio"
    path.parent.mkdir()
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(0o755)
    return path


def test_lifecycle(tmp_path: Path, fake_bin: Path) -> None:
    home = Home.at(tmp_path / "home")
    srv = label_studio_server(home, port=free_port(), bin=fake_bin)
    assert srv.status().running is False
    with pytest.raises(UserError, match="dmad labelstudio start"):
        srv.token()

    status = srv.start(timeout=30)
    try:
        assert status.running and status.healthy and status.url == srv.url
        pid = status.pid
        assert pid is not None and srv.pid_path.read_text().strip() == str(pid)
        assert os.getpgid(pid) == pid  # its own process group
        token = srv.token()
        assert len(token) == 40
        for name in (TOKEN_SECRET, PASSWORD_SECRET):
            assert stat.S_IMODE((home.secrets_dir / name).stat().st_mode) == 0o600
        env = json.loads((home.labelstudio_dir / "fake_env.json").read_text())
        assert env["LABEL_STUDIO_USER_TOKEN"] == token
        assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
        assert env["SSRF_PROTECTION_ENABLED"] == "false"
        assert env["LABEL_STUDIO_BASE_DATA_DIR"] == str(home.labelstudio_dir)
        assert token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert token not in srv.log_path.read_text()

        again = label_studio_server(home, port=srv.port, bin=fake_bin).start(timeout=30)  # already running
        assert again.pid == pid
        assert label_studio_server(home).port == srv.port  # the running server's port, not the setting
        with pytest.raises(UserError, match="already runs on port"):
            label_studio_server(home, port=srv.port + 1, bin=fake_bin).start(timeout=30)
    finally:
        assert srv.stop() is True
    assert not alive(pid) and not srv.pid_path.exists() and not srv.port_path.exists()
    assert label_studio_server(home).port == home.load_settings().label_studio_port
    assert srv.status().running is False
    assert srv.stop() is False

    # a later start keeps the credentials and passes none of them
    other = label_studio_server(home, port=srv.port, bin=fake_bin)
    other.start(timeout=30)
    try:
        env = json.loads((home.labelstudio_dir / "fake_env.json").read_text())
        assert "LABEL_STUDIO_USER_TOKEN" not in env and "LABEL_STUDIO_PASSWORD" not in env
        assert other.token() == token
    finally:
        other.stop()


def test_port_in_use_is_refused_before_anything_starts(tmp_path: Path, fake_bin: Path) -> None:
    home = Home.at(tmp_path / "home")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert port_in_use(port)
        with pytest.raises(UserError, match=f"port {port} .* already in use"):
            label_studio_server(home, port=port, bin=fake_bin).start(timeout=30)
    assert not (home.run_dir / "labelstudio.pid").exists()
    assert not (home.labelstudio_dir / "fake_env.json").exists()
    assert home.read_secret(TOKEN_SECRET) is None


def test_early_exit_reports_the_log_without_secrets(tmp_path: Path, fake_bin: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LS_MODE", "leak")
    home = Home.at(tmp_path / "home")
    srv = label_studio_server(home, port=free_port(), bin=fake_bin)
    with pytest.raises(UserError) as info:
        srv.start(timeout=30)
    message = str(info.value)
    assert "exited with code 3" in message and "token is ***" in message
    assert home.read_secret(TOKEN_SECRET) not in message
    assert not srv.pid_path.exists()


def test_a_moved_port_is_detected_and_the_server_stopped(tmp_path: Path, fake_bin: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LS_MODE", "moved")
    srv = label_studio_server(Home.at(tmp_path / "home"), port=free_port(), bin=fake_bin)
    with pytest.raises(UserError, match="moved to"):
        srv.start(timeout=30)
    assert srv.status().running is False


def test_no_answer_within_the_timeout(tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LS_MODE", "silent")
    srv = label_studio_server(Home.at(tmp_path / "home"), port=free_port(), bin=fake_bin)
    with pytest.raises(UserError, match="did not answer"):
        srv.start(timeout=2)
    assert srv.status().running is False


def test_stop_kills_a_server_that_ignores_sigterm(tmp_path: Path, fake_bin: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LS_MODE", "ignore_term")
    srv = label_studio_server(Home.at(tmp_path / "home"), port=free_port(), bin=fake_bin)
    pid = srv.start(timeout=30).pid
    assert pid is not None
    time.sleep(0.3)  # let it install its SIGTERM handler
    started = time.monotonic()
    assert srv.stop(timeout=1.0) is True
    assert time.monotonic() - started < 8
    assert not alive(pid)


def test_stale_pid_file_is_not_trusted(tmp_path: Path, fake_bin: Path) -> None:
    home = Home.at(tmp_path / "home")
    home.create()
    (home.run_dir / "labelstudio.pid").write_text(f"{os.getpid()}\n")  # alive, but not Label Studio
    srv = label_studio_server(home, port=free_port(), bin=fake_bin)
    assert srv.pid() is None and srv.status().running is False


def test_executable_lookup_order(tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other" / "label-studio"
    other.parent.mkdir()
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    monkeypatch.setenv(BIN_ENV, str(other))
    assert find_label_studio_bin(fake_bin) == fake_bin  # explicit first
    assert find_label_studio_bin() == other  # then the environment variable
    monkeypatch.setenv(BIN_ENV, str(tmp_path / "missing"))
    with pytest.raises(UserError, match=BIN_ENV):
        find_label_studio_bin()  # a wrong explicit choice is an error, not a fallback

    monkeypatch.delenv(BIN_ENV)
    repo = tmp_path / "repo"
    in_repo = repo / ".venv-labelstudio" / "bin" / "label-studio"
    in_repo.parent.mkdir(parents=True)
    in_repo.write_text("#!/bin/sh\n")
    in_repo.chmod(0o755)
    monkeypatch.setattr(server_module, "_REPO_ROOT", repo)
    monkeypatch.setenv("PATH", str(other.parent))
    assert find_label_studio_bin() == in_repo  # then the repository's own venv
    in_repo.unlink()
    assert find_label_studio_bin() == other  # then PATH
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="scripts/setup.sh"):
        find_label_studio_bin()


def test_redact() -> None:
    assert redact("a secret-token b", ["secret-token", ""]) == "a *** b"
