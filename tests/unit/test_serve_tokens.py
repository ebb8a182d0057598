"""Tokens a factory can manage: `dmad token rotate` against a running `dmad serve` process (over HTTPS with
a self-signed certificate, uvicorn's --ssl-certfile/--ssl-keyfile passed through), taken up without a
restart; the old token works through its grace period and not after."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from app.services.line.tokens import ServeTokens, rotate
from tests.processes import answers, dmad, free_port, wait_until
from tests.ui_fixtures import PreparedHome, ui_home, ui_template  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def test_rotation_grace_and_atomic_files(tmp_path: Path) -> None:
    from app.home_folder import Home

    home = Home.at(tmp_path / "home")
    home.create()
    home.write_secret("serve_token", "first")
    tokens = ServeTokens(home)
    assert tokens.accepts("first") and not tokens.accepts("second")
    rotation = rotate(home, keep_old_seconds=60, now=1000.0)
    new = home.read_secret("serve_token")
    assert new and new != "first" and rotation.previous_valid_until == 1060.0
    assert tokens.accepts(new) and tokens.accepts("first", now=1059.0) and not tokens.accepts("first", now=1061.0)
    rotate(home)  # no grace: the one before is refused at once
    assert not tokens.accepts(new) and tokens.accepts(home.read_secret("serve_token") or "x")
    assert sorted(p.name for p in home.secrets_dir.iterdir()) == ["serve_token", "serve_token_previous"]  # no temp left
    assert {oct(p.stat().st_mode & 0o777) for p in home.secrets_dir.iterdir()} == {"0o600"}
    assert ServeTokens(home, fixed="pinned").accepts("pinned") and not ServeTokens(home, fixed="pinned").accepts(new)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_token_rotate_takes_effect_on_a_running_https_serve(ui_home: PreparedHome, tmp_path: Path) -> None:  # noqa: F811
    home = ui_home.home
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    home.write_secret("serve_token", "first-token")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(dmad("serve", "--home", str(home.root), "--port", str(port), "--no-feed",
                                   "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)),
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"https://127.0.0.1:{port}"
    tls = ssl.create_default_context(cafile=str(cert))

    def status(token: str) -> int:
        return httpx.get(f"{url}/v1/version", headers={"Authorization": f"Bearer {token}"}, verify=tls, timeout=30).status_code

    try:
        assert wait_until(lambda: answers(f"{url}/v1/health", verify=tls), timeout=120, every=0.5), (tmp_path / "serve.log").read_text()[-2000:]
        assert status("first-token") == 200 and status("wrong") == 401
        out = subprocess.run(dmad("token", "--home", str(home.root), "rotate", "--keep-old", "3600", "--print"),
                             env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        second = out.stdout.strip()
        assert second and second != "first-token" and "accepted until" in out.stderr
        assert status(second) == 200 and status("first-token") == 200  # the new one at once; the old in its grace
        out = subprocess.run(dmad("token", "--home", str(home.root), "rotate", "--print"),
                             env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        third = out.stdout.strip()
        assert out.returncode == 0 and "refused from now on" in out.stderr
        assert status(third) == 200 and status(second) == 401 and status("first-token") == 401
        assert server.poll() is None  # the same process throughout: no restart
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
