"""Subcommands of this area (registered by app.cli)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Adds this area's subcommands; each sets handler via set_defaults."""
