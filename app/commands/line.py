"""`dmad predict | serve | export | thresholds`: the model on the production line.

`predict` scores files, folders or globs with a version (the active one by default, or a file from
`dmad export` with ``--model``) and writes one record per image (JSON Lines or CSV); `serve` answers the
same over HTTP; `export` writes a version's scorer as one ONNX or TorchScript file; `thresholds` shows and
overrides each class's OK/NG threshold. Exit codes of `predict`: 0 done, 2 nothing usable (or a usage
error), 3 with ``--fail-on-ng`` when any image was NG, so that it fits a shell pipeline.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import IO, Any

from app.home_folder import DEFAULT_HOME, Home
from dmad_core.errors import Invalid

EXIT_NG = 3
CSV_FIELDS = ("path", "class", "score", "decision", "threshold", "threshold_source", "model_version", "sha256",
              "width", "height", "top_patches")


def _home(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", default=str(DEFAULT_HOME), help="home folder (default ./dmad-home)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="score image files, folders or globs: score and OK/NG per image, as JSON Lines or CSV")
    _home(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--category", help="the class of every image (default: the nearest parent folder named like a class)")
    p.add_argument("--version", help="model version to score with (default: the active one)")
    p.add_argument("--output", "-o", type=Path, help="write here (.csv: CSV, else JSON Lines); default: JSON Lines on stdout")
    p.add_argument("--heatmaps", type=Path, metavar="DIR", help="also write a heat-map overlay PNG per image here")
    p.add_argument("--fail-on-ng", action="store_true", help=f"exit {EXIT_NG} when any image is NG")
    p.add_argument("--ingest", action="store_true", help="add the scored images to the pool (the Review page)")
    p.add_argument("--batch-size", type=int, default=4, help="images per backbone call (default 4: the fastest "
                   "on 2 CPU cores, benchmarks/serve.py)")
    p.add_argument("--model", type=Path, metavar="FILE",
                   help="score with a file from `dmad export` (torch.jit / onnxruntime) instead of the home's version")
    p.set_defaults(handler=cmd_predict)

    p = sub.add_parser("export", help="write a version's whole scorer as one ONNX or TorchScript file")
    _home(p)
    p.add_argument("output", type=Path, metavar="OUT")
    p.add_argument("--format", choices=["onnx", "torchscript"], default=None,
                   help="default: from OUT's suffix (.onnx: ONNX, else TorchScript)")
    p.add_argument("--version", help="model version (default: the active one)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("serve", help="an HTTP scoring service for the line (FastAPI): POST /v1/score with an image")
    _home(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=4, help="images per backbone call (default 4)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503 (default 64)")
    p.add_argument("--no-feed", dest="feed", action="store_false", help="do not add scored images to the pool")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this PEM certificate (chain) file (uvicorn's option)")
    p.add_argument("--ssl-keyfile", help="... and this PEM private key file")
    p.add_argument("--one-process", action="store_true",
                   help="no supervisor: a crash ends serve (default on Linux: a supervisor holds the socket and "
                        "starts a new serving process within seconds when one dies)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("token", help="manage `dmad serve`'s API token")
    _home(p)
    action = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = action.add_parser("rotate", help="a new token, taken up by a running `dmad serve` without a restart")
    r.add_argument("--keep-old", type=float, default=0.0, metavar="SECONDS",
                   help="accept the old token this much longer, while the line's clients switch (default 0)")
    r.add_argument("--print", dest="show", action="store_true", help="print the new token on stdout")
    p.set_defaults(handler=cmd_token)

    p = sub.add_parser("thresholds", help="each class's OK/NG threshold of a version; override or reset one")
    _home(p)
    p.add_argument("--version", help="model version (default: the active one)")
    p.add_argument("--json", action="store_true", help="print the thresholds as JSON")
    action = p.add_subparsers(dest="action", metavar="ACTION")
    s = action.add_parser("set", help="override a class's threshold (recorded with a note)")
    s.add_argument("category")
    s.add_argument("threshold", type=float)
    s.add_argument("--note", default="", help="why (kept in the threshold's history)")
    r = action.add_parser("reset", help="return a class to its calibrated threshold")
    r.add_argument("category")
    r.add_argument("--note", default="")
    p.set_defaults(handler=cmd_thresholds)


# -- predict --------------------------------------------------------------------------------------
class _Writer:
    """One record per scored image, as JSON Lines or CSV, flushed per batch (a pipeline sees results as
    they come)."""

    def __init__(self, stream: IO[str], as_csv: bool):
        self.stream = stream
        self.csv = csv.DictWriter(stream, CSV_FIELDS) if as_csv else None
        if self.csv:
            self.csv.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        if self.csv:
            self.csv.writerow({**record, "top_patches": json.dumps(record["top_patches"])})
        else:
            self.stream.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        self.stream.flush()


def cmd_predict(args: argparse.Namespace) -> int:
    from app.services.database import open_database
    from app.services.line.prediction import find_images, load_inferencer, predict_files
    from dmad_core.progress_bar import make_bar

    if args.batch_size < 1:
        raise Invalid("--batch-size must be at least 1")
    if args.model and (args.ingest or args.version):
        raise Invalid("--model scores with the exported file alone: --ingest and --version need the home's model")
    home = Home.at(args.home)
    sessions = None if args.model else open_database(home)
    files, problems = find_images(args.paths)
    for spec, reason in problems:
        print(f"dmad predict: {spec}: {reason}", file=sys.stderr)
    if not files:
        raise Invalid("no image to score: pass image files, folders or glob patterns")
    line = load_inferencer(home, sessions, args.version, args.model)
    if args.category:
        line.check_category(args.category)

    out = open(args.output, "w", newline="") if args.output else sys.stdout
    writer = _Writer(out, as_csv=bool(args.output and args.output.suffix.lower() == ".csv"))
    bar = make_bar(total=len(files), desc=f"predict ({line.version})", unit="img")

    def write(results: list) -> None:
        for result in results:
            writer.write(result.record())
        writer.flush()

    try:
        report = predict_files(line, files, write, category=args.category, batch_size=args.batch_size,
                               ingest_into=(home, sessions) if args.ingest else None, heatmaps=args.heatmaps,
                               on_skip=lambda reason: bar.write(f"dmad predict: skipped {reason}", file=sys.stderr),
                               on_batch=bar.update)
    finally:
        bar.close()
        if args.output:
            out.close()
    print(f"dmad predict: {report.scored} scored with {line.version} ({report.ng} NG, {report.scored - report.ng} OK), "
          f"{report.skipped} skipped" + (f", {report.fed} new in the pool" if args.ingest else "")
          + (f"; written to {args.output}" if args.output else ""), file=sys.stderr)
    if report.scored == 0:
        raise Invalid("no image could be scored (see the lines above)")
    return EXIT_NG if args.fail_on_ng and report.ng else 0


# -- serve ----------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress
    import secrets
    import socket

    import uvicorn

    from app.api.scoring import TOKEN_SECRET, ServeConfig, create_app
    from app.api.supervised import STARTUP_FAILED, can_fork, run_supervised
    from app.services.database import open_database
    from app.services.loop import versions

    home = Home.at(args.home)
    sessions = open_database(home)
    if not home.read_secret(TOKEN_SECRET):
        home.write_secret(TOKEN_SECRET, secrets.token_urlsafe(32))
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise Invalid("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    config = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                         feed=args.feed)
    with sessions() as session:  # a clear one-line error now, not a traceback from the serving process
        versions.version_or_active(session, None)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"dmad serve: listening on {args.host}: other machines can reach it (the token still guards it)",
              file=sys.stderr)
    scheme = "https" if args.ssl_certfile else "http"
    print(f"dmad serve: {scheme}://{args.host}:{args.port}/v1/score (API docs at /docs); token in "
          f"{home.secrets_dir / TOKEN_SECRET}; scored images {'join' if args.feed else 'do not join'} the pool",
          file=sys.stderr, flush=True)

    backlog = 2048  # not a toy server's 5: a burst of clients queues in the kernel, not in resets

    def serve_once(sock: socket.socket | None) -> bool:
        """Run the app until SIGTERM; whether it started. Under the supervisor (``sock`` given: the forked
        serving process) on the supervisor's socket, with a pool of its own, never the supervisor's
        connections; alone, binding the port itself."""
        if sock is not None:
            sessions.kw["bind"].dispose(close=False)
        server = uvicorn.Server(uvicorn.Config(
            create_app(home, sessions, config), host=args.host, port=args.port, backlog=backlog, log_level="warning",
            ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile))
        server.run(sockets=None if sock is None else [sock])
        return bool(server.started)

    if args.one_process or not can_fork():
        return 0 if serve_once(None) else STARTUP_FAILED
    return run_supervised(serve_once, args.host, args.port, backlog=backlog)


def cmd_token(args: argparse.Namespace) -> int:
    import datetime as dt

    from app.services.line.tokens import rotate

    home = Home.at(args.home)
    if not home.root.exists():
        raise Invalid(f"no home at {home.root}")
    rotation = rotate(home, args.keep_old)
    until = ("refused from now on" if rotation.previous_valid_until is None else "accepted until "
             + dt.datetime.fromtimestamp(rotation.previous_valid_until, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))
    print(f"dmad token: new serve token in {rotation.path}; a running `dmad serve` takes it at its next request; "
          f"the old token is {until}", file=sys.stderr)
    if args.show:
        print(home.read_secret("serve_token"))
    return 0


# -- export ---------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from app.services.database import open_database
    from app.services.line.export import export_version

    home = Home.at(args.home)
    fmt = args.format or ("onnx" if args.output.suffix.lower() == ".onnx" else "torchscript")
    print(f"dmad export: tracing {args.version or 'the active version'} as {fmt} (a minute on a CPU)...",
          file=sys.stderr, flush=True)
    report = export_version(home, open_database(home), args.output, fmt, args.version)
    print(f"dmad export: {report.version} -> {report.path} ({report.format}, {report.bytes / 1e6:.1f} MB, classes "
          f"{', '.join(report.categories)}); run it with `dmad predict --model {report.path} FILES`")
    return 0


# -- thresholds -----------------------------------------------------------------------------------
def cmd_thresholds(args: argparse.Namespace) -> int:
    from app.services.line import decisions
    from app.services.loop import versions
    from app.services.database import open_database

    home = Home.at(args.home)
    sessions = open_database(home)
    with sessions() as session:
        version = versions.version_or_active(session, args.version)
        if args.action == "set":
            decisions.set_threshold(session, version, args.category, args.threshold, args.note)
        elif args.action == "reset":
            decisions.set_threshold(session, version, args.category, None, args.note)
        rows = []
        for t, rates in decisions.thresholds_with_rates(session, version, home.load_settings().false_alarm_rate):
            rows.append({"class": t.category, "threshold": t.threshold, "source": t.source,
                         "calibrated": t.calibrated, "false_alarm_target": t.false_alarm_target,
                         "validation_normals": t.validation_normals,
                         "supported_false_alarm_rate": t.supported_false_alarm_rate, "warning": t.warning,
                         "note": t.note,
                         "validation_false_alarm_rate": rates.validation.false_alarm_rate,
                         "annotated_false_alarm_rate": rates.annotated.false_alarm_rate,
                         "annotated_miss_rate": rates.annotated.miss_rate,
                         "annotated_normals": rates.annotated.normals, "annotated_defects": rates.annotated.defects})
    if args.json:
        print(json.dumps({"version": version.name, "thresholds": rows}, indent=2, default=str))
        return 0
    print(f"OK/NG thresholds of {version.name} (NG when the score is above the threshold):")
    for r in rows:
        def pct(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:.1f} %"
        print(f"  {r['class']}: {r['threshold']:.4f} ({r['source']}"
              + (f", calibrated {r['calibrated']:.4f}" if r["source"] == "override" and r["calibrated"] is not None else "")
              + f") · false alarms: {pct(r['validation_false_alarm_rate'])} of {r['validation_normals']} validation "
              f"normals, {pct(r['annotated_false_alarm_rate'])} of {r['annotated_normals']} confirmed normals · misses: "
              f"{pct(r['annotated_miss_rate'])} of {r['annotated_defects']} annotated defects"
              + (f" · note: {r['note']}" if r["note"] else ""))
        if r["warning"]:
            print(f"    warning: {r['warning']}")
    return 0
