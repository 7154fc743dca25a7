#!/usr/bin/env bash
# Create .venv (if needed) and install the project with its test extra. Sourced by demo.sh and test.sh.
# torch 2.13.0 goes first: it is the CPU build on disk here; any other request downloads a CUDA build.
#
# XKD_AXOLOTL=0.21 installs Axolotl 0.21.0 instead, into .venv-axolotl-0.21 (CI's second stage). Axolotl 0.20+
# declare Python >= 3.12 and this machine has 3.11, where their code runs all the same, so pip is told
# --ignore-requires-python and the dependencies whose newest releases have no 3.11 wheel (numpy 2.5, scipy 1.18,
# contourpy 1.4) are held back. Real users of 0.21 run Python 3.12 and need none of this: `pip install -e .`
# there resolves Axolotl 0.21 by itself.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
XKD_AXOLOTL="${XKD_AXOLOTL:-}"
if [ -n "$XKD_AXOLOTL" ]; then
  VENV="${XKD_VENV:-$ROOT/.venv-axolotl-$XKD_AXOLOTL}"
  PIN=(--ignore-requires-python "axolotl==$XKD_AXOLOTL.*" "numpy<2.5" "scipy<1.18" "contourpy<1.4")
else
  VENV="${XKD_VENV:-$ROOT/.venv}"
  PIN=()
fi
PYTHON="${PYTHON:-python3}"
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

SETUP_START=$SECONDS
# Each step says what it installs as it starts (on stderr, with the seconds since setup began); pip prints its own
# progress on the long ones: a line per package as it is resolved, downloaded and installed, and a download bar
# where the output is a terminal (pip's --progress-bar auto; none in CI logs).
setup_step() { echo "setup.sh [$((SECONDS - SETUP_START)) s]: $*" >&2; }
if [ ! -x "$VENV/bin/python" ]; then
  setup_step "creating the virtual environment $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.axolotl_xkd_installed"
WANT="$( (cat "$ROOT/pyproject.toml"; echo "axolotl=$XKD_AXOLOTL") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  setup_step "installing into $VENV (a first install takes minutes: about 6 on a 2-core machine, ~4 GB; later runs" \
    "skip it while pyproject.toml is unchanged). Step 1 of 3: upgrading pip"
  python -m pip install -q --upgrade pip
  setup_step "step 2 of 3: torch 2.13.0 (the CPU build where it is on disk, as here; seconds)"
  python -m pip install "torch==2.13.0"
  setup_step "step 3 of 3: axolotl ${XKD_AXOLOTL:-(>=0.19,<0.22)} with transformers, deepspeed and the rest of its" \
    "stack, then this package (editable) with its test tools (pytest, tokenizers, matplotlib); the longest step"
  python -m pip install ${PIN[@]+"${PIN[@]}"} -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
  setup_step "install done in $((SECONDS - SETUP_START)) s ($VENV)."
fi
