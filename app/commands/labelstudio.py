"""`dmad labelstudio start|stop|status|push|sync` and `dmad webhook`: the inspectors' side of the loop.

`start` also makes sure the home's project and its webhook exist, so inspectors can begin at once;
`push` sends the active model's highest-scoring pool images with their heat map as a pre-annotation;
`webhook` runs the receiver (annotations in, images out) in the foreground; `sync` pulls whatever the
receiver missed. The work is done by `app.services.labelstudio.home` and `app.services.labelstudio.tasks`.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from typing import Any

from app.home_folder import DEFAULT_HOME, Home

log = logging.getLogger(__name__)


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


# -- start / stop / status ------------------------------------------------------------------------
def cmd_start(args: argparse.Namespace) -> int:
    from app.services.labelstudio import home as labelstudio

    home = Home.at(args.home)
    if not args.json:
        print(f"starting Label Studio at {labelstudio.label_studio_server(home, args.port).url} "
              "(the first start takes about a minute) ...")
    started = labelstudio.start(home, args.port, timeout=args.timeout)
    status = started.status
    result = {**asdict(status), "project_id": started.project_id, "log": started.log}
    _print(args, result, f"Label Studio is running at {status.url} (pid {status.pid}), project {started.project_id}.\n"
                         f"Sign in as admin@dmad.local; the password is in {home.secrets_dir / 'labelstudio_password'}.\n"
                         f"Run `dmad webhook --home {home.root}` so annotations arrive and images show.")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from app.services.labelstudio.home import label_studio_server

    stopped = label_studio_server(Home.at(args.home)).stop()
    _print(args, {"stopped": stopped}, "Label Studio stopped." if stopped else "Label Studio was not running.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from app.services.labelstudio.home import health

    found = health(Home.at(args.home))
    status = found.server
    result = {**asdict(status), "project_id": found.project_id, "webhook_url": found.webhook_url,
              "webhook_healthy": found.webhook_healthy}
    _print(args, {**result, "state": status.state}, f"Label Studio: {status.state} at {status.url}"
                         + (f" (pid {status.pid})" if status.pid else "")
                         + f"; project {found.project_id}; webhook receiver at {found.webhook_url}: "
                         + ("answering" if found.webhook_healthy else "not answering"))
    return 0 if status.running else 3


# -- push / sync / webhook ------------------------------------------------------------------------
def cmd_push(args: argparse.Namespace) -> int:
    from app.services.database import open_database
    from app.services.labelstudio.home import PIXEL_THRESHOLD_KEY
    from app.services.labelstudio.tasks import push_top

    home = Home.at(args.home)
    result = push_top(home, open_database(home), limit=args.limit, category=args.category,
                      min_score=args.min_score)
    note = "" if result.pre_annotation_masks else (
        f" (model {result.model_version} records no {PIXEL_THRESHOLD_KEY}: tasks carry the score, not a mask)")
    _print(args, asdict(result), f"pushed {result.created} new tasks to project {result.project_id}, "
                                 f"{result.skipped_existing} already there{note}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from app.services.database import open_database
    from app.services.labelstudio.home import sync_project

    home = Home.at(args.home)
    report, project_id = sync_project(home, open_database(home))
    text = (f"sync of project {project_id}: {report.created} created, {report.updated} updated, "
            f"{report.unchanged} unchanged, {report.deleted} deleted")
    if report.failed:
        text += f", {len(report.failed)} could not be stored:\n  " + "\n  ".join(report.failed)
    _print(args, {**asdict(report), "project_id": project_id}, text)
    return 0 if not report.failed else 1


def cmd_webhook(args: argparse.Namespace) -> int:
    from app.services.database import open_database
    from app.services.labelstudio.home import webhook_receiver

    home = Home.at(args.home)
    server = webhook_receiver(home, open_database(home), args.host, args.port)
    print(f"receiving Label Studio webhooks at {server.url}/webhook and serving images at {server.url}/images/ "
          "(Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
