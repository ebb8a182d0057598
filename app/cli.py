"""The `dmad` command line. Each area of the product registers its subcommands from one module in
`app/commands/`, so a reader finds a command next to the code it drives."""

from __future__ import annotations

import argparse
import logging
import sys

from app.commands import engine, labelstudio, line, loop, processes
from dmad_core.errors import Conflict, Invalid, NotFound, Unavailable, UserError

# The CLI's edge of the error types (dmad_core/errors.py): every error the user can fix is one line on
# stderr, no traceback, and exit code 2, whatever its kind, so scripts tell it from a crash (1) and from
# Ctrl-C (130); the message says what to do.
EXIT_CODES: dict[type[UserError], int] = {NotFound: 2, Invalid: 2, Conflict: 2, Unavailable: 2, UserError: 2}


def error_line(exc: UserError) -> str:
    """What the CLI prints for an error the user can fix."""
    return f"dmad: error: {exc}"


def exit_code(exc: UserError) -> int:
    """The exit code of an error the user can fix (the most specific type in EXIT_CODES)."""
    return next(code for kind, code in EXIT_CODES.items() if isinstance(exc, kind))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmad",
        description="Active-learning visual anomaly detection with a dual memory bank (DMAD).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (engine, loop, line, labelstudio, processes):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # Schema upgrades at every start are routine, not news; faiss's INFO "Could not load library with
        # AVX2 support due to: ModuleNotFoundError(...)" only says it uses its generic build, yet reads
        # like an error; `dmad export`'s ONNX writer (onnxscript, onnx_ir) logs each of its ~60 passes.
        for name in ("alembic", "faiss.loader", "onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:  # an error the user can fix: one clear line, no traceback
        print(error_line(exc), file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
