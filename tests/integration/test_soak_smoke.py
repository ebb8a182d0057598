"""The soak's smoke run (benchmarks/soak.py; issue 23): the whole stack on a PostgreSQL server of its own,
real images posted to `dmad serve` and annotations to the webhook for 1.25 minutes, while every fault of
the schedule strikes once (a worker SIGKILLed mid-job, serve SIGKILLed, the webhook restarted, PostgreSQL
stopped 10 s, the home's tmpfs filled 8 s). Nothing lost, nothing half-published, no 5xx, no process left.

Took 2.5 minutes on 2 shared cores (a 30 s training, 1.25 min of load, the processes' starts). Skips
with the reason when PostgreSQL's binaries are absent; uses procedural images when ../shared/data is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.own_postgres import binaries

ROOT = Path(__file__).resolve().parents[2]


def test_soak_smoke_loses_nothing_under_every_fault(tmp_path: Path) -> None:
    if binaries() is None:
        pytest.skip("no PostgreSQL binaries under /usr/lib/postgresql/*/bin: the soak needs a server of its own")
    out = tmp_path / "soak.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "1.25", "--rate", "1", "--clients", "2",
            "--annotate-every", "15", "--outage-seconds", "10", "--full-seconds", "8", "--drain-seconds", "240",
            "--disk-mb", "256", "--train-images", "6", "--test-images", "6", "--json", str(out)]
    if not (ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle").exists():
        argv.append("--synthetic")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    print(json.dumps(result, indent=2))
    assert result["images_answered_200"] > 0 and result["annotations_acknowledged"] > 0
    # checked first: a check on a home still draining would read as a loss
    assert result["drained"], f"the queue and the spool did not drain in 240 s: {result.get('drain_s')}"
    assert result["lost_images"] == 0 and result["lost_annotations"] == 0
    assert result["half_published_versions"] == 0 and result["server_errors_5xx"] == 0
    assert result["leaked_processes"] == 0 and result["disk"]["spool_files_left"] == 0
    expected = 6 if result["home_on_tmpfs"] else 5  # without a tmpfs (not root) the full disk is left out
    assert result["faults_injected"] == expected and result["versions_published"] >= 2
    assert result["serve_crash_killed_pid"] is not None  # a serving process was there to crash, and was replaced
    assert done.returncode == 0, done.stdout[-3000:]
