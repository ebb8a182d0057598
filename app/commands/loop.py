"""`dmad init | ingest | train | annotate | worker | status | versions | promote | rollback`:
the active-learning loop from the command line. Every command takes `--home DIR` (default
./dmad-home); the ones that report take `--json`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from app.home_folder import DEFAULT_HOME, Home
from dmad_core.config import PRESETS, SCORERS
from dmad_core.errors import Invalid, NotFound, UserError

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    p.add_argument("--home", default=str(DEFAULT_HOME), help="home folder (default ./dmad-home)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the result as JSON")


def _hint_flag(p: argparse.ArgumentParser) -> None:
    """``--no-hint``: leave out the "next: dmad ..." line, for a caller that runs the next step itself
    (`dmad demo`); hidden from --help, a person running the step by hand wants the hint."""
    p.add_argument("--no-hint", dest="hint", action="store_false", help=argparse.SUPPRESS)


def register(sub: argparse._SubParsersAction) -> None:
    """Adds this area's subcommands; each sets handler via set_defaults."""
    p = sub.add_parser("init", help="create a home: settings, folders and the database at the newest schema")
    _common(p)
    p.add_argument("--db", default=None, help="database URL (default: SQLite file <home>/dmad.db), "
                   "e.g. postgresql+psycopg://user@127.0.0.1:5432/dmad")
    p.add_argument("--preset", choices=PRESETS, default=None, help="engine preset (default offline)")
    p.add_argument("--weights", default=None, help="backbone weights file (for --preset paper without the hub)")
    p.add_argument("--outliers", default=None, help="folder of outlier textures (DTD-like); default procedural")
    p.add_argument("--train-epochs", type=int, default=None, help="mapper epochs when training from scratch")
    p.add_argument("--retrain-epochs", type=int, default=None, help="mapper epochs of a warm-started retrain")
    p.add_argument("--scorer", choices=SCORERS, default=None,
                   help="classifier (default: kNN distance + per-class defect classifiers) or mapper (the "
                        "paper's loop: abnormal bank + score mapper retrained on every annotation; see "
                        "docs/results.md for why it is not the default)")
    p.add_argument("--false-alarm-rate", type=float, default=None, metavar="RATE",
                   help="OK/NG: the share of a class's validation normals a new version may call NG (default 0.01; "
                        "n validation normals can check about 1/(n+1) at best)")
    p.add_argument("--validation-fraction", type=float, default=None, metavar="SHARE",
                   help="share of each class's normal training images held out to calibrate its threshold "
                        "(default: the preset's, 0.1)")
    _hint_flag(p)
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("ingest", help="add category folders: train/good -> normal data, test -> the pool")
    _common(p)
    p.add_argument("folders", nargs="+", metavar="DIR",
                   help="one folder per product class: MVTec AD (train/good, test/<defect>), MVTec 3D-AD "
                        "(train/good/rgb, test/<defect>/rgb), or a flat folder of normal images with --category")
    p.add_argument("--category", default=None, metavar="NAME",
                   help="the class of a flat folder of images (dataset layouts are named after their folder)")
    p.add_argument("--pool", action="store_true",
                   help="unlabelled line images: score each flat folder with the active version and add it to the "
                        "pool that Review offers (needs --category), instead of the normal training data")
    p.add_argument("--all-normal", action="store_true",
                   help="a flat folder that is much larger than the class's training set, or whose images often "
                        "score NG, becomes normal training data only with this flag (otherwise: use --pool)")
    _hint_flag(p)
    p.set_defaults(handler=cmd_ingest)

    p = sub.add_parser("train", help="train a version from scratch and make it active (runs in the foreground)")
    _common(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("annotate", help="record an inspector's verdict on an ingested image; queues a retrain")
    _common(p)
    p.add_argument("image", help="image id, file path, or a prefix (8+ hex) of its content hash")
    verdict = p.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--mask", help="PNG defect mask at the image's own size (nonzero = defect)")
    verdict.add_argument("--normal", action="store_true", help="a false alarm: the image is normal")
    verdict.add_argument("--defect", action="store_true", help="defective, without a mask")
    p.add_argument("--category", default=None, help="the image's category (checked; needed if a file is in two)")
    p.set_defaults(handler=cmd_annotate)

    p = sub.add_parser("worker", help="run queued jobs (retrains, uploads, Label Studio sync)")
    _common(p, json_flag=False)
    p.add_argument("--once", action="store_true", help="run what is queued now, then exit")
    p.add_argument("--lease-seconds", type=float, default=60.0, help="job lease; a dead worker's job is retried after it")
    p.add_argument("--poll-seconds", type=float, default=1.0)
    p.add_argument("--sync-every", type=float, default=60.0, help="seconds between Label Studio syncs (0: never)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on 127.0.0.1:PORT/metrics")
    p.add_argument("--metrics-file", default=None, help="write Prometheus metrics to this file after each job "
                   "(node-exporter textfile collector)")
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("status", help="active version, job queue and per-class metric history")
    _common(p)
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("versions", help="list model versions")
    _common(p)
    p.set_defaults(handler=cmd_versions)

    p = sub.add_parser("promote", help="make a version the active one")
    _common(p)
    p.add_argument("version", help="version name (v0003) or id")
    p.set_defaults(handler=cmd_promote)

    p = sub.add_parser("rollback", help="go back to the version that was active before this one")
    _common(p)
    p.set_defaults(handler=cmd_rollback)


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, indent=2, default=str) if getattr(args, "json", False) else text)


def _open(args: argparse.Namespace) -> tuple[Home, Any]:
    from app.services.database import open_database

    home = Home.at(args.home)
    return home, open_database(home)


# -- init / ingest --------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    import pydantic

    from app.home_folder import describe_errors
    from app.services.database import open_database, redact_url

    home = Home.at(args.home)
    settings = home.load_settings()
    changes = {k: v for k, v in {
        "db_url": args.db, "preset": args.preset, "weights_path": str(Path(args.weights).resolve()) if args.weights else None,
        "outliers_dir": str(Path(args.outliers).resolve()) if args.outliers else None,
        "train_epochs": args.train_epochs, "retrain_epochs": args.retrain_epochs,
        "false_alarm_rate": args.false_alarm_rate, "validation_fraction": args.validation_fraction,
        "scorer": args.scorer}.items()
        if v is not None}
    if args.outliers and not Path(args.outliers).is_dir():
        raise Invalid(f"--outliers {args.outliers} is not a folder")
    if args.weights and not Path(args.weights).is_file():
        raise Invalid(f"--weights {args.weights} is not a file")
    try:  # the ranges are HomeSettings' own (validated wherever settings are built), named here as flags
        settings = replace(settings, **changes)
    except pydantic.ValidationError as exc:
        flags = {"db_url": "db", "weights_path": "weights", "outliers_dir": "outliers"}
        raise Invalid("; ".join(f"--{flags.get(key, key).replace('_', '-')}:{rest}" for key, _, rest in
                                (part.partition(":") for part in describe_errors(exc).split("; ")))) from exc
    home.create()
    home.save_settings(settings)
    open_database(home, create=True)
    _emit(args, {"home": str(home.root), "db": redact_url(home.db_url()), "settings": asdict(settings)},
          f"home ready at {home.root} (database {redact_url(home.db_url())}, preset {settings.preset}, "
          f"scorer {settings.scorer})."
          + (f"\nnext: dmad ingest --home {args.home} DATA/<category> ..." if args.hint else ""))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from app.services.loop.ingest import ingest_folders

    home, sessions = _open(args)
    if args.pool:
        return _ingest_pool(args, home, sessions)
    if args.category and not args.all_normal:
        from app.services.loop.unlabelled import guard

        for folder in args.folders:
            if Path(folder).is_dir():  # anything else is read_folder's to refuse
                verdict = guard(home, sessions, folder, args.category)
                if verdict.refused:
                    raise Invalid(verdict.message(folder, args.category))
    with sessions() as session:
        report = ingest_folders(session, args.folders, category=args.category)
    lines = [f"{c.name} ({c.layout}): {c.train_normal} normal training images, {c.pool} pool images "
             f"({c.with_masks} with ground-truth masks), {c.already_known} already known, {c.skipped} skipped"
             for c in report.categories]
    lines += [f"skipped {path}: {reason}" for path, reason in report.skipped]
    if args.hint:
        lines.append(f"next: dmad train --home {args.home}")
    _emit(args, asdict(report), "\n".join(lines))
    return 0


def _ingest_pool(args: argparse.Namespace, home: Home, sessions: Any) -> int:
    from app.services.loop.unlabelled import ingest_to_pool

    if not args.category:
        raise Invalid("--pool needs --category NAME: the class the folder's images are of")
    reports = [ingest_to_pool(home, sessions, folder, args.category) for folder in args.folders]
    lines = [f"{r.category}: {r.scored} images scored by {r.version} ({r.ng} NG), {r.added} new in the pool, "
             f"{r.known} already there, {len(r.skipped)} skipped" for r in reports]
    lines += [f"skipped {path}: {reason}" for r in reports for path, reason in r.skipped]
    _emit(args, [asdict(r) for r in reports], "\n".join(lines))
    return 0


# -- train / worker -------------------------------------------------------------------------------
PRINT_EVERY_S = 5.0  # within one step ("normal bank coreset: ...") a progress line at most this often


def _progress_printer(enabled: bool, every_s: float = PRINT_EVERY_S, bars: bool | None = None) -> Any:
    """Prints progress reports: the first of each step (the text before its first ':'), then at most one
    every ``every_s`` seconds, so a step that reports twenty times in a second leaves one line.

    ``bars`` (default: whether stderr is a terminal): the engine draws its own progress bars there, so
    only the first report of each step is printed; the repeats printed the feature bar's count a second
    time under the bar itself."""
    state: dict[str, Any] = {"step": None, "at": 0.0}
    repeat = not (sys.stderr.isatty() if bars is None else bars)

    def show(fraction: float, message: str) -> None:
        step, now = message.split(":")[0], time.monotonic()
        if enabled and (step != state["step"] or (repeat and now - state["at"] >= every_s)):
            print(f"[{fraction * 100:5.1f}%] {message}", flush=True)
            state["step"], state["at"] = step, now
    return show


def cmd_train(args: argparse.Namespace) -> int:
    """Queues a 'train' job and runs it here, so the UI sees its progress like any other job."""
    from app.worker import train_in_foreground

    home, sessions = _open(args)
    ok, job = train_in_foreground(
        home, sessions, on_progress=_progress_printer(not args.json),
        on_claimed=lambda job_id: print(f"training from scratch (job {job_id}); most of it is the backbone reading each image once",
                                        flush=True))
    if not ok:
        raise UserError(f"training failed: {(job.error or job.message).splitlines()[0]}")
    _rerank_in_foreground(home, sessions, quiet=args.json)
    from app.services.read.status import home_status

    status = home_status(home, sessions)
    _emit(args, status, f"{job.message}\n" + _metrics_text(status))
    return 0


def _rerank_in_foreground(home: Any, sessions: Any, quiet: bool) -> None:
    """Rank the pool under the new version here and now (running workers share the chunks), so that
    `dmad train` leaves a home whose Review page is complete."""
    from app.services.loop import versions
    from app.services.loop.reranking import rerank_progress
    from app.worker import rerank_now

    with sessions() as session:
        p = rerank_progress(session, versions.active_version(session).id)
    if p.complete:
        return
    if not quiet:
        print(f"ranking {p.pool - p.scored} pool images under the new version ({p.chunks_open} chunks)", flush=True)
    rerank_now(home, sessions)


def cmd_worker(args: argparse.Namespace) -> int:
    from app.signals import install_stop_signals
    from app.worker import WorkerOptions, run_worker

    home, sessions = _open(args)
    stop = threading.Event()
    install_stop_signals(stop, second_interrupts=True)
    options = WorkerOptions(once=args.once, lease_seconds=args.lease_seconds, poll_seconds=args.poll_seconds,
                            sync_every_seconds=args.sync_every or None, metrics_port=args.metrics_port,
                            metrics_file=args.metrics_file)
    print(f"worker on {home.root}" + (" (once)" if args.once else " (Ctrl-C to stop)"), flush=True)
    n = run_worker(home, sessions, options, stop)
    print(f"worker stopped: {n} job(s) succeeded", flush=True)
    return 0


# -- annotate -------------------------------------------------------------------------------------
def _read_mask(path: str) -> Any:
    import numpy as np
    import PIL.Image

    try:
        with PIL.Image.open(path) as im:
            return np.asarray(im.convert("L")) > 0
    except FileNotFoundError as exc:
        raise NotFound(f"mask file {path} does not exist") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder error is the same user problem
        raise Invalid(f"mask file {path} is not a readable image: {exc}") from exc


def cmd_annotate(args: argparse.Namespace) -> int:
    from app.services.loop.annotations import record_annotation

    home, sessions = _open(args)
    mask = _read_mask(args.mask) if args.mask else None
    kind = "defect_mask" if mask is not None else "normal" if args.normal else "defect_no_mask"
    with sessions() as session:
        result = record_annotation(session, home, image=args.image, kind=kind, mask=mask, source="cli",
                                   category=args.category)
    _emit(args, asdict(result), f"annotation {result.annotation_id} {result.outcome}"
          + (f"; retrain job {result.job_id} queued{_who_takes_jobs(home)}" if result.job_id else ""))
    return 0


def _who_takes_jobs(home: Home) -> str:
    """Who will run a queued job: the worker `dmad up` started, or a hint to start one."""
    from app.supervisor import service_pid

    pid = service_pid(home, "worker")
    if pid is not None:
        return f": the worker `dmad up` started (pid {pid}) takes it"
    return " (run `dmad worker`, or `dmad up`, to take it)"


# -- status / versions ----------------------------------------------------------------------------
def _metrics_text(status: dict[str, Any]) -> str:
    lines = []
    for category, history in sorted(status["metrics"].items()):
        for row in history:
            vals = "  ".join(f"{k} {v * 100:5.1f}" for k, v in row["values"].items()
                             if k in ("image_auroc", "pixel_auroc", "pro") and v is not None)
            lines.append(f"  {category:<12} {row['version']:<6} {vals}")
    return "metrics (%):\n" + "\n".join(lines) if lines else "no metrics yet"


def _change_text(change: dict[str, Any] | None) -> list[str]:
    """What the active version bought against its parent, a line a class."""
    from app.services.loop.version_change import pool_decisions_text

    if not change:
        return []
    lines = [f"what it bought against {change['parent']} (same evaluation images):",
             *(f"  {line}" for line in change["lines"])]
    flips = pool_decisions_text(change.get("pool_decisions"))
    return lines + ([f"  {flips}"] if flips else [])


def _ranking_text(ranking: dict[str, Any] | None) -> list[str]:
    if ranking is None:
        return []
    line = f"pool ranked under {ranking['version']}: {ranking['scored']:,} of {ranking['pool']:,} images"
    if not ranking["complete"]:
        line += f" ({ranking['chunks_open']} chunks open, {ranking['chunks_failed']} failed)"
    return [line]


def cmd_status(args: argparse.Namespace) -> int:
    from app.services.read.status import home_status

    home, sessions = _open(args)
    status = home_status(home, sessions)
    active = status["active_version"]
    q = status["queue"]
    text = [f"home {home.root}",
            f"active version: {active['name']} ({active['mode']})" if active else "no active version: run `dmad train`",
            f"scorer: {status['scorer']}" + ("" if not active or active["scorer"] in (None, status["scorer"])
                                             else f" (the active version was trained with {active['scorer']})"),
            f"jobs: {q['queued']} queued, {q['running']} running, {q['failed']} failed",
            *_ranking_text(status["pool_ranking"]),
            *_change_text(status["change"]),
            _metrics_text(status)]
    _emit(args, status, "\n".join(text))
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    from app.services.read.read_models import version_info
    from app.services.read.status import version_dict
    from app.services.loop.versions import list_versions

    _home, sessions = _open(args)
    with sessions() as session:
        rows = [version_dict(version_info(v)) for v in list_versions(session)]
    text = "\n".join(f"{'*' if r['status'] == 'active' else ' '} {r['name']}  {r['status']:<9} {r['created_at']:%Y-%m-%d %H:%M:%S}  "
                     f"{r['mode'] or '':<10} annotations {r['annotations']:>3}  {r['message']}" for r in rows)
    _emit(args, rows, text or "no versions yet: run `dmad train`")
    return 0


def _rerank_note(session: Any, version: Any) -> str:
    """What is left of the pool's re-ranking under a newly active version, and who runs it."""
    from app.services.loop.reranking import rerank_progress

    p = rerank_progress(session, version.id)
    if p.complete:
        return ""
    return (f"; {p.pool - p.scored} of {p.pool} pool images wait to be re-ranked under it ({p.chunks_open} "
            "chunks queued): a running `dmad worker` (or `dmad up`) takes them")


def cmd_promote(args: argparse.Namespace) -> int:
    from app.services.loop import versions
    from app.services.read.read_models import version_info
    from app.services.read.status import version_dict

    home, sessions = _open(args)
    with sessions() as session:
        version = versions.promote(session, versions.get_version(session, args.version).id, home.load_settings().rerank_chunk_images)
        _emit(args, version_dict(version_info(version)), f"{version.name} is active" + _rerank_note(session, version))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from app.services.loop import versions
    from app.services.read.read_models import version_info
    from app.services.read.status import version_dict

    home, sessions = _open(args)
    with sessions() as session:
        version = versions.rollback(session, home.load_settings().rerank_chunk_images)
        _emit(args, version_dict(version_info(version)), f"rolled back: {version.name} is active" + _rerank_note(session, version))
    return 0
