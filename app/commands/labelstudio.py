"""`dmad labelstudio start|stop|status|push|sync` and `dmad webhook`: the inspectors' side of the loop.

`start` also makes sure the home's project and its webhook exist, so inspectors can begin at once;
`push` sends the active model's highest-scoring pool images with their heat map as a pre-annotation;
`webhook` runs the receiver (annotations in, images out) in the foreground; `sync` pulls whatever the
receiver missed.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
from dataclasses import asdict
from typing import Any

import numpy as np

from dmad_core.errors import Conflict, Unavailable
from app.home import DEFAULT_HOME, Home

log = logging.getLogger(__name__)

WEBHOOK_SECRET = "webhook_secret"
PIXEL_THRESHOLD_KEY = "pixel_threshold"  # in a model version's config: heat-map value that marks a defect


def register(sub: argparse._SubParsersAction) -> None:
    """Adds this area's subcommands; each sets handler via set_defaults."""
    ls = sub.add_parser("labelstudio", help="run Label Studio and exchange tasks and annotations with it")
    ls_sub = ls.add_subparsers(dest="labelstudio_command", required=True, metavar="ACTION")

    p = ls_sub.add_parser("start", help="start Label Studio (detached) and set up the project and webhook")
    _common(p)
    p.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: the home's setting)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for it to answer")
    p.set_defaults(handler=cmd_start)

    p = ls_sub.add_parser("stop", help="stop the home's Label Studio")
    _common(p)
    p.set_defaults(handler=cmd_stop)

    p = ls_sub.add_parser("status", help="is Label Studio running and answering?")
    _common(p)
    p.set_defaults(handler=cmd_status)

    p = ls_sub.add_parser("push", help="send the active model's top pool images as tasks with pre-annotations")
    _common(p)
    p.add_argument("--top", "--limit", dest="limit", type=int, default=50,
                   help="how many of the highest-scoring images not yet sent (default 50)")
    p.add_argument("--category", default=None, help="only this product class")
    p.add_argument("--min-score", type=float, default=None, help="only images scoring at least this")
    p.set_defaults(handler=cmd_push)

    p = ls_sub.add_parser("sync", help="pull every annotation from Label Studio (what webhooks missed)")
    _common(p)
    p.set_defaults(handler=cmd_sync)

    p = sub.add_parser("webhook", help="run the annotation receiver and image server in the foreground")
    p.add_argument("--home", default=str(DEFAULT_HOME), help="home folder (default ./dmad-home)")
    p.add_argument("--port", type=int, default=None, help="port (default: the home's webhook_port)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.set_defaults(handler=cmd_webhook)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", default=str(DEFAULT_HOME), help="home folder (default ./dmad-home)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _print(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    print(json.dumps(result, default=str) if args.json else text)


def webhook_secret(home: Home) -> str:
    """The secret Label Studio sends in X-DMAD-Secret; created (0600) on first use."""
    secret = home.read_secret(WEBHOOK_SECRET)
    if not secret:
        secret = secrets.token_hex(20)
        home.write_secret(WEBHOOK_SECRET, secret)
    return secret


def webhook_base_url(home: Home) -> str:
    return f"http://127.0.0.1:{home.load_settings().webhook_port}"


def _server(home: Home, port: int | None = None) -> Any:
    from annotation.server import LabelStudioServer

    return LabelStudioServer(home, port=port)


def _project(home: Home, server: Any) -> tuple[Any, int]:
    """(client, project id), with the project's config and webhook brought up to date. The project is
    the home's own (its title is the `label_studio_project` setting), so several homes can share one
    Label Studio."""
    from annotation.project import STATE_FILE, ensure_project, ensure_webhook

    if not server.healthy():
        raise Unavailable(f"Label Studio is not running at {server.url}; start it with "
                        f"`dmad labelstudio start --home {home.root}` (and `dmad webhook` so images show)")
    client = server.client()
    settings = home.load_settings()
    project_id = ensure_project(client, settings.label_studio_project, settings.defect_labels,
                                state_path=home.labelstudio_dir / STATE_FILE)
    ensure_webhook(client, project_id, f"{webhook_base_url(home)}/webhook", webhook_secret(home))
    return client, project_id


def has_project(home: Home) -> bool:
    """Has this home ever created its Label Studio project (so a sync has something to pull)?"""
    from annotation.project import STATE_FILE, read_state

    return bool(read_state(home.labelstudio_dir / STATE_FILE).get("project_id"))


def connect_project(home: Home) -> tuple[Any, int]:
    """(client, project id) of the home's running Label Studio; a clear error when it is not running."""
    return _project(home, _server(home))


def _database(home: Home) -> Any:
    """A session factory on the home's database, upgraded to the newest schema."""
    from app.services.database import open_database

    return open_database(home)


# -- start / stop / status ------------------------------------------------------------------------
def cmd_start(args: argparse.Namespace) -> int:
    home = Home.at(args.home)
    server = _server(home, args.port)
    if not args.json:
        print(f"starting Label Studio at {server.url} (the first start takes about a minute) ...")
    status = server.start(timeout=args.timeout)
    _client, project_id = _project(home, server)
    result = {**asdict(status), "project_id": project_id, "log": str(server.log_path)}
    _print(args, result, f"Label Studio is running at {status.url} (pid {status.pid}), project {project_id}.\n"
                         f"Sign in as admin@dmad.local; the password is in {home.secrets_dir / 'labelstudio_password'}.\n"
                         f"Run `dmad webhook --home {home.root}` so annotations arrive and images show.")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    home = Home.at(args.home)
    stopped = _server(home).stop()
    _print(args, {"stopped": stopped}, "Label Studio stopped." if stopped else "Label Studio was not running.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import requests

    from annotation.project import STATE_FILE, read_state

    home = Home.at(args.home)
    status = _server(home).status()
    receiver = webhook_base_url(home)
    try:
        receiver_ok = requests.get(f"{receiver}/health", timeout=2).status_code == 200
    except requests.RequestException:
        receiver_ok = False
    project_id = read_state(home.labelstudio_dir / STATE_FILE).get("project_id")
    result = {**asdict(status), "project_id": project_id, "webhook_url": receiver, "webhook_healthy": receiver_ok}
    state = "running" if status.running else "not running"
    health = " and answering" if status.healthy else (" but not answering" if status.running else "")
    _print(args, result, f"Label Studio: {state}{health} at {status.url}"
                         + (f" (pid {status.pid})" if status.pid else "")
                         + f"; project {project_id}; webhook receiver at {receiver}: "
                         + ("answering" if receiver_ok else "not answering"))
    return 0 if status.running else 3


# -- push / sync / webhook ------------------------------------------------------------------------
def heatmap_mask(patch_map: np.ndarray, height: int, width: int, threshold: float,
                 sigma: float | None = None) -> np.ndarray:
    """The model's heat map at the image's size, thresholded: the patch grid made into the same
    smoothed map the version's pixel threshold was calibrated on (256 px, Gaussian), so the
    pre-annotation marks what the threshold means and not the raw grid's blocky peaks. The backbone
    sees the whole image resized to a square, so the grid covers it all."""
    from dmad_core.config import ScoreConfig
    from dmad_core.model import anomaly_maps

    grid = np.asarray(patch_map, dtype=np.float32)[None]
    heat = anomaly_maps(grid, (height, width), ScoreConfig().gaussian_sigma if sigma is None else sigma)[0]
    return heat >= threshold


def cmd_push(args: argparse.Namespace) -> int:
    from annotation.project import push_tasks
    from app.services.labelstudio_tasks import task_items
    from app.services.versions import active_version
    from db.repositories import top_pool_scores

    home = Home.at(args.home)
    sessions = _database(home)
    client, project_id = _project(home, _server(home))
    with sessions() as session:
        version = active_version(session)
        if version is None:
            raise Conflict("no active model version; train one first (`dmad train`)")
        threshold = (version.config or {}).get(PIXEL_THRESHOLD_KEY)
        rows = top_pool_scores(session, version.id, limit=args.limit, category=args.category,
                               min_score=args.min_score, unannotated=True)
        if not rows:
            raise Conflict(f"model {version.name} has no unannotated pool images to send "
                            "(all are annotated, or none match the filters)")
        items = task_items(version, rows, webhook_base_url(home))
    label = home.load_settings().defect_labels[0]
    result = push_tasks(client, project_id, items, label=label)
    note = "" if threshold is not None else (
        f" (model {version.name} records no {PIXEL_THRESHOLD_KEY}: tasks carry the score, not a mask)")
    _print(args, {**asdict(result), "project_id": project_id, "model_version": version.name,
                  "pre_annotation_masks": threshold is not None},
           f"pushed {result.created} new tasks to project {project_id}, "
           f"{result.skipped_existing} already there{note}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from annotation.sink import DatabaseSink
    from annotation.sync import sync_annotations

    home = Home.at(args.home)
    sessions = _database(home)
    client, project_id = _project(home, _server(home))
    report = sync_annotations(client, project_id, DatabaseSink(home, sessions))
    text = (f"sync of project {project_id}: {report.created} created, {report.updated} updated, "
            f"{report.unchanged} unchanged, {report.deleted} deleted")
    if report.failed:
        text += f", {len(report.failed)} could not be stored:\n  " + "\n  ".join(report.failed)
    _print(args, {**asdict(report), "project_id": project_id}, text)
    return 0 if not report.failed else 1


def cmd_webhook(args: argparse.Namespace) -> int:
    from annotation.sink import DatabaseSink
    from annotation.webhook import make_webhook_server

    home = Home.at(args.home)
    port = args.port if args.port is not None else home.load_settings().webhook_port
    sink = DatabaseSink(home, _database(home))
    server = make_webhook_server(args.host, port, sink, webhook_secret(home), image_path=sink.image_path)
    print(f"receiving Label Studio webhooks at {server.url}/webhook and serving images at {server.url}/images/ "
          "(Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
