"""`dmad up`, `dmad down` and `dmad demo`: the whole product from one command, on 127.0.0.1.

The commands parse their arguments; `app/supervisor.py` starts, watches and stops the processes.
"""

from __future__ import annotations

import argparse

from app.home_folder import DEFAULT_HOME, Home
from app.supervisor import down, ensure_initialised, prepare_demo, serve


def register(sub: argparse._SubParsersAction) -> None:
    """Adds this area's subcommands; each sets handler via set_defaults."""
    for name, help_text, handler in (
        ("up", "start everything (worker, webhook receiver, Label Studio, UI) on 127.0.0.1; Ctrl-C stops it",
         cmd_up),
        ("demo", "synthetic data into <home>/demo-data, init, ingest, train, then `dmad up`", cmd_demo),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--home", default=str(DEFAULT_HOME), help="home folder (default ./dmad-home)")
        p.add_argument("--port", type=int, default=None, help="UI port (default: the home's streamlit_port)")
        p.add_argument("--no-labelstudio", action="store_true", help="do not start Label Studio")
        p.add_argument("--no-worker", action="store_true", help="do not start a worker (run `dmad worker` yourself)")
        if name == "demo":
            p.add_argument("--epochs", type=int, default=None,
                           help="mapper epochs of the first training (default: the preset's)")
        p.set_defaults(handler=handler)

    p = sub.add_parser("down", help="stop what a `dmad up` of this home started (if it was killed)")
    p.add_argument("--home", default=str(DEFAULT_HOME), help="home folder (default ./dmad-home)")
    p.set_defaults(handler=cmd_down)


def cmd_up(args: argparse.Namespace) -> int:
    home = Home.at(args.home)
    ensure_initialised(home)
    return serve(home, port=args.port, labelstudio=not args.no_labelstudio, worker=not args.no_worker)


def cmd_down(args: argparse.Namespace) -> int:
    """Stops the children recorded in `<home>/run` (after a `dmad up` was killed without cleaning up)."""
    result = down(Home.at(args.home))
    if result.asked_pid is not None:
        print(f"asked `dmad up` (pid {result.asked_pid}) to stop")
    else:
        print("stopped: " + ", ".join(result.stopped) if result.stopped else "nothing was running")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    home = Home.at(args.home)
    prepare_demo(home, args.epochs)
    return serve(home, port=args.port, labelstudio=not args.no_labelstudio, worker=not args.no_worker)
