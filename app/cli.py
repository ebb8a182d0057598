"""The `dmad` command line. Each area of the product registers its subcommands from one module in
`app/commands/`, so a reader finds a command next to the code it drives."""

from __future__ import annotations

import argparse
import logging
import sys

from app.commands import engine, labelstudio, loop, ui
from app.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmad",
        description="Active-learning visual anomaly detection with a dual memory bank (DMAD).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (engine, loop, labelstudio, ui):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # schema upgrades at every start are routine, not news
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:  # an error the user can fix: one clear line, no traceback
        print(f"dmad: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
