"""The whole loop in a real browser: `dmad up` on a trained home (worker, webhook receiver, Label Studio,
Streamlit), headless Chromium driven by Playwright. Open Review, send the top patch's image to Label
Studio, create the inspector's annotation through Label Studio's API, watch the retrain job's progress
on Training, and find the new version in Metrics. A screenshot of every page is saved under
`test-artefacts/e2e/` (or `$DMAD_TEST_ARTEFACTS/e2e/`).

Skips, saying why, without Debian's chromium, Playwright or a `label-studio` executable.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import requests
from sklearn.metrics import roc_auc_score

from annotation.rle import brush_result
from app.services.loop import review_queue
from app.services.read import ui_queries as queries
from app.services.labelstudio.home import label_studio_server
from db.models import Annotation, Image, Job
from tests.labelstudio_fixtures import label_studio_bin_or_skip
from tests.ui_fixtures import PreparedHome, copy_prepared, ui_template  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ARTEFACTS = Path(os.environ.get("DMAD_TEST_ARTEFACTS") or REPO / "test-artefacts") / "e2e"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
START_TIMEOUT = 420  # Label Studio's first start: about a minute alone, several on a busy 2-core box
RETRAIN_TIMEOUT = 300


def chromium_or_skip() -> str:
    path = Path("/usr/bin/chromium") if Path("/usr/bin/chromium").is_file() else shutil.which("chromium")
    if not path:
        pytest.skip("no chromium: install Debian's package (`apt-get install -y chromium`) for the browser tests")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class App:
    prepared: PreparedHome
    process: subprocess.Popen[bytes]
    output: Path
    ui: str  # http://127.0.0.1:<port>

    def log(self) -> str:
        return self.output.read_text(errors="replace")


def wait_for(condition, timeout: float, what: str, app: App | None = None, every: float = 0.5):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if app is not None and app.process.poll() is not None:
            raise AssertionError(f"dmad up exited while waiting for {what}:\n{app.log()}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f":\n{app.log()}" if app else ""))


@pytest.fixture
def app(ui_template: PreparedHome, tmp_path: Path) -> Iterator[App]:  # noqa: F811
    """`dmad up` on a full copy of the trained home (feature cache and models: the worker retrains),
    on free ports; stopped with SIGINT, as Ctrl-C does."""
    label_studio_bin_or_skip()
    chromium_or_skip()
    prepared = copy_prepared(ui_template, tmp_path / "home", full=True)
    home = prepared.home
    settings = home.load_settings()
    home.save_settings(replace(settings, webhook_port=free_port(), label_studio_port=free_port(),
                               streamlit_port=free_port()))
    output = tmp_path / "dmad-up.out"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with open(output, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--home", str(home.root)], cwd=cwd,
                                   stdout=out, stderr=subprocess.STDOUT)
    running = App(prepared, process, output, f"http://127.0.0.1:{home.load_settings().streamlit_port}")
    try:
        wait_for(lambda: "the UI is at" in running.log(), 120, "the UI", running)
        wait_for(lambda: "labelstudio-start finished" in running.log() or "labelstudio-start failed" in running.log(),
                 START_TIMEOUT, "Label Studio", running, every=2)
        assert "labelstudio-start failed" not in running.log(), running.log()
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        label_studio_server(home).stop()  # only acts if `dmad up` did not stop it
        if ARTEFACTS.is_dir():  # what `dmad up` printed, next to the screenshots
            shutil.copy(output, ARTEFACTS / "dmad-up.out")


def test_review_send_annotate_retrain_metrics(app: App) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    prepared = app.prepared
    sessions = prepared.sessions()
    server = label_studio_server(prepared.home)

    def settle(page) -> None:  # noqa: ANN001
        """Waits until the page's script has finished (Streamlit marks its root), then checks that it
        shows no exception."""
        page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for()
        page.wait_for_timeout(300)  # the last deltas paint
        assert page.locator('[data-testid="stException"]').count() == 0, page.locator(
            '[data-testid="stException"]').first.inner_text()

    def shot(page, name: str) -> None:  # noqa: ANN001
        if "127.0.0.1:" + app.ui.rsplit(":", 1)[1] in page.url:
            settle(page)
            # the UI runs on the factory's machine: no "Deploy" to Streamlit's cloud on any page
            assert page.get_by_role("button", name="Deploy").count() == 0
        page.screenshot(path=str(ARTEFACTS / f"{name}.png"), full_page=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_or_skip(), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        # expect() keeps its own 5 s default: on a loaded 2-core CI box a push to Label Studio (heat maps,
        # RLE, its API) or a page's first script run takes longer than that.
        expect.set_options(timeout=60_000)
        try:
            # Home: the overview, with Label Studio answering
            page.goto(app.ui)
            expect(page.get_by_text("Label Studio is running at")).to_be_visible()
            expect(page.get_by_text("v0002").first).to_be_visible()
            expect(page.get_by_text("Active model")).to_be_visible()
            shot(page, "01-home")

            # Review: pick the top crop and send its image to Label Studio
            page.goto(f"{app.ui}/Review")
            labels = page.locator("label").filter(has_text=re.compile(r"^select image \d+$"))
            expect(labels.first).to_be_visible()
            settle(page)  # the whole grid drawn by the finished script run, not a partial or stale one
            shown = [int(text.rsplit(" ", 1)[1]) for text in labels.all_inner_texts()]
            with sessions() as session:
                active = queries.active_version_info(session)
                offered = review_queue.offer(session, prepared.home, queries.ReviewFilter(active.id), limit=len(shown))
            ranked = [item.image for item in offered]
            # the grid is the Review queue's order of the unreviewed pool, each image with its reason and its
            # score against its class's OK/NG threshold
            assert shown == [row.image_id for row in ranked]
            for reason in {item.reason for item in offered}:
                expect(page.get_by_text(reason).first).to_be_visible()
            assert {"hottest of tiles", "hottest of fabric"} <= {item.reason for item in offered}
            expect(page.get_by_text(re.compile(r"\d+\.\dx the threshold")).first).to_be_visible()
            # and that ranking puts defects above normal images more often than not; the fixture's model
            # (two epochs, six images a class) is too small to promise more, on every CPU, than that
            defect = [image_id in prepared.defect_ids for image_id in shown]
            assert 0 < sum(defect) < len(defect), shown
            assert roc_auc_score(defect, [row.score for row in ranked]) > 0.5, (shown, prepared.defect_ids)
            image_id = next(i for i, is_defect in zip(shown, defect) if is_defect)  # its mask is the annotation
            first = labels.nth(shown.index(image_id))
            expect(page.locator("img").nth(3)).to_be_visible()
            shot(page, "02-review")
            first.click()
            send = page.get_by_role("button", name="Send to Label Studio")
            expect(send).to_be_enabled()
            send.click()
            expect(page.get_by_text(re.compile(r"1 new task\(s\) in Label Studio project \d+"))).to_be_visible()
            link = page.get_by_role("link", name=re.compile(r"^task \d+$"))
            href = link.get_attribute("href")
            task_id = int(re.search(r"task=(\d+)", href).group(1))
            assert href.startswith(server.url) and "/projects/" in href
            # the sent image stays in the grid, marked as waiting in Label Studio until it is annotated
            expect(page.get_by_text(re.compile(rf"waiting in Label Studio \(task {task_id}\)"))).to_have_count(1)
            shot(page, "03-review-sent")

            # the link opens the task in Label Studio (signed in as the home's admin)
            ls_page = browser.new_page(viewport={"width": 1400, "height": 1000})
            ls_page.goto(href)
            if "/user/login" in ls_page.url:
                ls_page.fill("input[name=email]", "admin@dmad.local")
                ls_page.fill("input[name=password]", prepared.home.read_secret("labelstudio_password") or "")
                ls_page.locator("button[type=submit], input[type=submit]").first.click()
                ls_page.wait_for_load_state("networkidle")
                ls_page.goto(href)
            ls_page.wait_for_load_state("networkidle")
            assert f"task={task_id}" in ls_page.url
            # the verdict's buttons are above the fold of a 1400 x 1000 window (below the image, they were not)
            verdict = ls_page.get_by_text("defect", exact=True).last
            expect(verdict).to_be_visible()
            box = verdict.bounding_box()
            assert box is not None and box["y"] + box["height"] <= 1000, box
            expect(ls_page.get_by_text(re.compile(r"[0-9a-f]{64}"))).to_have_count(0)  # no content hash shown
            shot(ls_page, "04-labelstudio-task")
            ls_page.close()

            # the inspector's mask, created through Label Studio's API; its webhook queues a retrain
            with sessions() as session:
                image = session.get(Image, image_id)
                with PIL.Image.open(image.gt_mask_path) as im:
                    mask = np.asarray(im.convert("L")) > 127
                height, width = image.height, image.width
            response = requests.post(
                f"{server.url}/api/tasks/{task_id}/annotations/", timeout=30,
                headers={"Authorization": f"Token {server.token()}"},
                json={"result": [brush_result(mask, "defect", "image", "defect", height=height, width=width)]})
            assert response.status_code == 201, response.text

            def retrain_job() -> Job | None:
                with sessions() as session:
                    has_annotation = session.query(Annotation).filter_by(image_id=image_id, kind="defect_mask",
                                                                        source="labelstudio").count()
                    job = session.query(Job).filter_by(type="retrain").order_by(Job.id.desc()).first()
                    return job if has_annotation and job is not None else None

            job = wait_for(retrain_job, 30, "the webhook's annotation and its retrain job", app)

            # Training: the job's progress bar, live, then the new version
            page.goto(f"{app.ui}/Training")
            bar = page.get_by_text(re.compile(rf"#{job.id} retrain · (queued|running)"))
            expect(bar).to_be_visible()
            shot(page, "05-training-progress")
            # A retrain now takes seconds (the classifier scorer), often less than the page's 2 s poll, so its
            # running state may never be drawn; its progress bar rendering is tested in test_ui_pages.
            def running_or_done() -> bool:
                if page.get_by_text(re.compile(rf"#{job.id} retrain · running · \S")).count():
                    return True
                with sessions() as session:
                    return not queries.job(session, job.id).active

            assert wait_for(running_or_done, RETRAIN_TIMEOUT, "the retrain to run", app)
            expect(bar).to_have_count(0, timeout=RETRAIN_TIMEOUT * 1000)  # done: the page redraws itself
            with sessions() as session:
                finished = queries.job(session, job.id)
                active = queries.active_version_info(session)
            assert finished.status == "succeeded", (finished.message, finished.error)
            assert active.name == "v0003" and active.trained_on["categories"]
            shot(page, "06-training-done")

            # Metrics: v0003's values and the annotation count it was trained on
            page.goto(f"{app.ui}/Metrics")
            expect(page.get_by_text("Latest values (v0003)")).to_be_visible()
            expect(page.locator("[data-testid=stVegaLiteChart], .vega-embed").first).to_be_visible()
            shot(page, "07-metrics")

            # Inspect: the image with its new annotation and its score under three versions
            page.goto(f"{app.ui}/Inspect?image_id={image_id}")
            expect(page.get_by_text(re.compile(r"defect_mask.* from labelstudio"))).to_be_visible()
            expect(page.get_by_text("Score (v0003)")).to_be_visible()
            expect(page.get_by_text("Score history")).to_be_visible()
            shot(page, "08-inspect")
        finally:
            browser.close()

    # Ctrl-C stops everything, Label Studio included
    app.process.send_signal(signal.SIGINT)
    assert app.process.wait(timeout=90) == 0, app.log()
    assert "dmad up: stopped" in app.log() and "Label Studio stopped" in app.log()
    assert label_studio_server(prepared.home).pid() is None
    assert list(prepared.home.run_dir.glob("*.pid")) == []
