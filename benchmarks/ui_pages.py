"""How long each Streamlit page takes to load with a production-sized pool: a prepared home plus 10,000
generated, scored pool images (real files, real rows), every page run headless through Streamlit's
AppTest (the same script run a browser session triggers, without the websocket and drawing).

    .venv/bin/python benchmarks/ui_pages.py [--pool 10000] [--repeats 5] [--browser] [--keep]

Prints, per page, the first load of a new session with the crop cache empty ("cold") and the median of
later loads ("warm"), then the Review queries alone. With --browser, also the time a real Streamlit
server takes to show each page in headless Chromium (navigation until the page's script has finished).
The home is trained with the real CLI first (a few minutes). Everything is written under a temporary
folder, removed afterwards unless --keep. Figures only, no thresholds: the target is under a second.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the prepared-home builders live in tests/ui_fixtures.py

PAGES = {
    "Home": REPO / "app" / "ui" / "Home.py",
    "Review": REPO / "app" / "ui" / "pages" / "1_Review.py",
    "Inspect": REPO / "app" / "ui" / "pages" / "2_Inspect.py",
    "Training": REPO / "app" / "ui" / "pages" / "3_Training.py",
    "Metrics": REPO / "app" / "ui" / "pages" / "4_Metrics.py",
}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_page(path: Path, query: dict[str, str] | None = None) -> float:
    """Seconds for one run of the page in a new session; fails loudly if the page raised."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(path), default_timeout=120)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    seconds = timed(at.run)
    if at.exception:
        raise RuntimeError(f"{path.name} raised: {[e.message for e in at.exception]}")
    return seconds


def browser_figures(home_root: Path, image_id: int, repeats: int) -> None:
    """Each page served by a real Streamlit server, loaded in headless Chromium: seconds from navigation
    until the page's script has finished and its title shows."""
    import socket
    import subprocess

    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(PAGES["Home"]), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
         "--server.fileWatcherType", "none"], cwd=home_root, env={**os.environ, "DMAD_HOME": str(home_root)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    urls = {"Home": "", "Review": "Review", "Inspect": f"Inspect?image_id={image_id}", "Training": "Training",
            "Metrics": "Metrics"}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            done = '[data-testid="stApp"][data-test-script-state="notRunning"]'
            deadline = time.monotonic() + 60
            while True:  # the server is up once its first page loads
                try:
                    page.goto(f"http://127.0.0.1:{port}/", timeout=5000)
                    page.locator("h1").first.wait_for(timeout=30000)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            print(f"\n{'page in Chromium':<22}{'first (s)':>10}{'median (s)':>12}{'max (s)':>10}")
            for name, path in urls.items():
                times = []
                for _ in range(repeats + 1):
                    start = time.perf_counter()
                    page.goto(f"http://127.0.0.1:{port}/{path}")
                    page.locator("h1").first.wait_for()
                    page.locator(done).wait_for()
                    times.append(time.perf_counter() - start)
                print(f"{name:<22}{times[0]:>10.3f}{statistics.median(times[1:]):>12.3f}{max(times[1:]):>10.3f}")
            # moving between pages in the sidebar (no new page load: what a user does most)
            print(f"\n{'sidebar navigation':<22}{'median (s)':>12}{'max (s)':>10}")
            nav = {name: [] for name in urls}
            for _ in range(repeats):
                for name in [*list(urls)[1:], "Home"]:
                    link = page.locator('[data-testid="stSidebarNav"] a').filter(has_text=name).first
                    start = time.perf_counter()
                    link.click()
                    target = "/" + urls[name].split("?")[0]
                    page.wait_for_url(lambda url, target=target: urlsplit(url).path.rstrip("/") == target.rstrip("/"))
                    page.locator(done).wait_for()
                    page.locator("h1").first.wait_for()
                    nav[name].append(time.perf_counter() - start)
            for name, times in nav.items():
                print(f"{name:<22}{statistics.median(times):>12.3f}{max(times):>10.3f}")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=int, default=10_000, help="generated pool images to add (default 10000)")
    ap.add_argument("--repeats", type=int, default=5, help="warm loads per page (default 5)")
    ap.add_argument("--browser", action="store_true", help="also time pages served by Streamlit in headless Chromium")
    ap.add_argument("--keep", action="store_true", help="keep the temporary home and print its path")
    args = ap.parse_args()

    import streamlit as st

    from app.services.read import ui_queries as queries
    from tests.ui_fixtures import add_bulk_pool, build_home

    tmp = Path(tempfile.mkdtemp(prefix="dmad-ui-bench-"))
    try:
        t0 = time.perf_counter()
        print("training a home with the real CLI (a few minutes) ...", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):
            prepared = build_home(tmp)
        seconds = add_bulk_pool(prepared, n=args.pool)
        print(f"prepared home with {len(prepared.pool_ids) + args.pool} scored pool images "
              f"({args.pool} generated in {seconds:.1f} s; {time.perf_counter() - t0:.1f} s in all)")
        os.environ["DMAD_HOME"] = str(prepared.home.root)
        version_id = prepared.version_ids[-1]
        with prepared.sessions()() as session:
            top_id = queries.top_image_id(session, version_id)

        load_page(PAGES["Home"])  # imports Streamlit's and the app's modules once, outside the figures
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("streamlit"):  # AppTest's bare-mode warnings are noise here
                logging.getLogger(name).setLevel(logging.ERROR)
        print(f"\n{'page':<22}{'cold (s)':>10}{'warm median (s)':>17}{'warm max (s)':>14}")
        for name, path in PAGES.items():
            query = {"image_id": str(top_id)} if name == "Inspect" else None
            st.cache_data.clear()  # crops and Label Studio status not cached: a new server's first visitor
            cold = load_page(path, query)
            warm = [load_page(path, query) for _ in range(args.repeats)]
            print(f"{name:<22}{cold:>10.3f}{statistics.median(warm):>17.3f}{max(warm):>14.3f}")

        print(f"\n{'Review query':<34}{'seconds':>10}")
        sessions = prepared.sessions()
        with sessions() as session:
            everything = queries.ReviewFilter(version_id)
            one_class = queries.ReviewFilter(version_id, ("tiles",))
            lo, hi = queries.score_range(session, version_id)
            high = queries.ReviewFilter(version_id, min_score=(lo + hi) / 2)
            figures = {
                "count, all classes": lambda: queries.review_count(session, everything),
                "first page (50)": lambda: queries.review_page(session, everything, 50),
                "page 200 (offset 9,950)": lambda: queries.review_page(session, everything, 50, 9_950),
                "one class, first page": lambda: queries.review_page(session, one_class, 50),
                "score above the middle": lambda: queries.review_page(session, high, 50),
                "score range": lambda: queries.score_range(session, version_id),
                "overview (Home)": lambda: queries.overview(session),
            }
            for label, fn in figures.items():
                fn()
                print(f"{label:<34}{statistics.median(timed(fn) for _ in range(args.repeats)):>10.4f}")
        if args.browser:
            browser_figures(prepared.home.root, top_id, args.repeats)
    finally:
        if args.keep:
            print(f"\nkept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
