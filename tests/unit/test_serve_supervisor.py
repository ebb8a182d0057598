"""`dmad serve`'s supervisor (app/api/supervised.py): a crashed serving process is replaced while the
listening socket stays open, so the line's next request is answered instead of refused; serve stops whole
on SIGTERM; a first serving process that cannot start ends serve with its error instead of a restart loop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.processes import answers, dmad, free_port, wait_until
from tests.ui_fixtures import PreparedHome, ui_home, ui_template  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the supervisor forks (Linux)")


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_a_crashed_serving_process_is_replaced_and_the_socket_never_closes(ui_home: PreparedHome,  # noqa: F811
                                                                          tmp_path: Path) -> None:
    home = ui_home.home
    home.write_secret("serve_token", "crash-token")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(dmad("serve", "--home", str(home.root), "--port", str(port), "--no-feed"),
                                  env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer crash-token"}

    try:
        assert wait_until(lambda: answers(f"{url}/v1/health"), timeout=180, every=0.5), log_path.read_text()[-2000:]
        first = children(server.pid)
        assert len(first) == 1, first  # one serving process under the supervisor
        before = httpx.get(f"{url}/v1/version", headers=auth, timeout=30).json()

        os.kill(first[0], signal.SIGKILL)  # a crash: the OOM killer, a segfault in native code
        # sent at once: the connection waits in the listen backlog for the new serving process (a refused
        # connection would raise ConnectError here)
        after = httpx.get(f"{url}/v1/version", headers=auth, timeout=120)
        assert after.status_code == 200 and after.json()["model_version"] == before["model_version"]
        second = children(server.pid)
        assert len(second) == 1 and second != first and server.poll() is None
        assert "killed by signal 9" in log_path.read_text()

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert not Path(f"/proc/{second[0]}").exists() or "zombie" in Path(f"/proc/{second[0]}/status").read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)


def test_supervisor_restarts_a_killed_serving_process_but_not_one_that_never_started(tmp_path: Path) -> None:
    from app.api.supervised import STARTUP_FAILED, run_supervised

    starts = tmp_path / "starts"

    def crash_once(sock: object) -> bool:  # runs in the forked child
        with open(starts, "a") as f:
            f.write("x")
        if len(starts.read_text()) == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the first serving process crashes
        return True  # the second serves, then stops on its own

    assert run_supervised(crash_once, "127.0.0.1", free_port()) == 0
    assert starts.read_text() == "xx"

    assert run_supervised(lambda sock: False, "127.0.0.1", free_port()) == STARTUP_FAILED  # no restart loop


def test_serve_without_an_active_version_says_so_and_exits(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    home = tmp_path / "home"
    assert subprocess.run(dmad("init", "--home", str(home), "--no-hint"), env=env, capture_output=True,
                          timeout=120).returncode == 0
    done = subprocess.run(dmad("serve", "--home", str(home), "--port", str(free_port())), env=env,
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode != 0
    assert "no active model version" in done.stderr and "Traceback" not in done.stderr
    assert "starting a new one" not in done.stderr  # not restarted in a loop
