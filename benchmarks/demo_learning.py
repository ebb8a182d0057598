"""The demo's learning, as a newcomer would see it: the bundled synthetic data, a first (normal-only) model,
then masks of the hard class's defects drawn in the order Review offers them (hottest first), one retrain
by the real worker after each batch, and what each version bought on the same evaluation images.

    .venv/bin/python benchmarks/demo_learning.py [--masks 1 5] [--screenshot docs/images/demo-metrics.png]

Everything runs through the product's CLI in a temporary home (init, ingest, train, annotate, worker), as
`dmad demo` does. It prints, per step, the hard class's image AUROC before and after on the same images
(the version's change record) and the seconds from the annotations to the new active version. With
--screenshot the Metrics page of the final home is captured in headless Chromium (Debian's `chromium`).
Nothing is written to the working directory unless --screenshot names a file there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.cli import main as dmad  # noqa: E402
from app.home_folder import Home  # noqa: E402
from app.services.database import open_database  # noqa: E402
from app.services.loop.version_change import CHANGE_KEY, change_lines  # noqa: E402
from app.services.loop.versions import active_version  # noqa: E402
from db.models import Annotation, Image, PoolScore  # noqa: E402
from dmad_core.data import DEMO_HARD_CATEGORY, make_demo_dataset  # noqa: E402


def run(*argv: object) -> None:
    if dmad([str(a) for a in argv]) != 0:
        sys.exit(f"demo_learning.py: dmad {' '.join(map(str, argv))} failed")


def hottest_unannotated(home: Home, category: str, n: int) -> list[tuple[str, str]]:
    """(image, ground-truth mask) of the ``n`` hottest defective pool images of ``category`` under the active
    version that no annotation touched: what an inspector finds at the top of Review, filtered by class."""
    with open_database(home)() as session:
        version = active_version(session)
        annotated = set(session.scalars(select(Annotation.image_id)))
        rows = session.execute(select(Image.id, Image.path, Image.gt_mask_path, Image.gt_label)
                               .join(PoolScore, PoolScore.image_id == Image.id)
                               .where(PoolScore.version_id == version.id, Image.role == "pool")
                               .where(Image.category.has(name=category)).order_by(PoolScore.score.desc())).all()
    # the inspector opens the hottest images of the class and draws the defects among them
    chosen = [(path, mask) for image_id, path, mask, label in rows if image_id not in annotated and label == 1]
    return chosen[:n]


def screenshot(home: Home, out: Path) -> None:
    """The Metrics page of ``home`` in headless Chromium."""
    from playwright.sync_api import sync_playwright

    from tests.processes import free_port, wait_until

    port = free_port()
    env = {**os.environ, "DMAD_HOME": str(home.root)}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "ui" / "Home.py"),
                             "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless",
                             "true", "--server.fileWatcherType", "none"], cwd=home.root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import requests

        def up() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).ok
            except requests.RequestException:
                return False

        if not wait_until(up, 120, 0.5):
            sys.exit("demo_learning.py: the UI did not answer")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                         args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}/Metrics")
            page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for()
            page.get_by_text("What each version bought").wait_for()
            page.wait_for_timeout(1500)  # the charts paint
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--masks", nargs="+", type=int, default=[5],
                    help="cumulative masks of the hard class after which the worker retrains (default: 5)")
    ap.add_argument("--screenshot", type=Path, help="save the final Metrics page here (PNG)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dmad-demo-learning-") as tmp:
        home = Home.at(Path(tmp) / "home")
        t0 = time.perf_counter()
        folders = make_demo_dataset(Path(tmp) / "data")
        run("init", "--home", home.root, "--no-hint")
        run("ingest", "--home", home.root, "--no-hint", *folders)
        run("train", "--home", home.root)
        print(f"first model: {time.perf_counter() - t0:.1f} s", flush=True)
        drawn = 0
        for target in sorted(args.masks):
            for path, mask in hottest_unannotated(home, DEMO_HARD_CATEGORY, target - drawn):
                run("annotate", "--home", home.root, path, "--mask", mask)
                drawn += 1
            t0 = time.perf_counter()
            run("worker", "--home", home.root, "--once", "--sync-every", 0)
            seconds = time.perf_counter() - t0
            with open_database(home)() as session:
                version = active_version(session)
                change = (version.config or {}).get(CHANGE_KEY)
            print(f"\n{drawn} masks of {DEMO_HARD_CATEGORY}: {version.name}, annotations -> active and the pool "
                  f"re-ranked in {seconds:.1f} s", flush=True)
            for line in change_lines(change):
                print(f"  {line}")
        if args.screenshot:
            screenshot(home, args.screenshot)
            print(f"\nMetrics page saved to {args.screenshot}")


if __name__ == "__main__":
    main()
