#!/usr/bin/env bash
# Set up (scripts/setup.sh --browser, skipping what is done) and run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
# Exits non-zero when a test fails, and also when no tests were collected (pytest's exit code 5).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/setup.sh --browser

# The type checker first (its configuration and the packages it checks: [tool.mypy] in pyproject.toml), so a
# type error fails CI as a failing test does.
echo "test: .venv/bin/python -m mypy"
if ! .venv/bin/python -m mypy; then
    echo "test: FAILED: mypy found type errors" >&2
    exit 1
fi

echo "test: .venv/bin/python -m pytest -q --timeout 900 $*"
rc=0
.venv/bin/python -m pytest -q --timeout 900 "$@" || rc=$?

case "$rc" in
    0) echo "test: passed" ;;
    5) echo "test: FAILED: no tests were collected (pytest exit code 5)" >&2 ;;
    *) echo "test: FAILED (pytest exit code $rc)" >&2 ;;
esac
exit "$rc"
