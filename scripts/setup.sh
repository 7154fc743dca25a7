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

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.axolotl_xkd_installed"
WANT="$( (cat "$ROOT/pyproject.toml"; echo "axolotl=$XKD_AXOLOTL") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  # pip runs quietly (-q), so say what is happening: a first install runs for minutes without a line of pip's own.
  SETUP_START=$SECONDS
  echo "setup.sh: installing into $VENV: torch 2.13.0, then axolotl ${XKD_AXOLOTL:-(>=0.19,<0.22)} with" \
    "transformers, deepspeed and the rest of its stack, and this package with its test tools (pytest, tokenizers," \
    "matplotlib). A first install takes minutes (about 6 on a 2-core machine, ~4 GB) and pip prints nothing" \
    "meanwhile; later runs skip it while pyproject.toml is unchanged." >&2
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q ${PIN[@]+"${PIN[@]}"} -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
  echo "setup.sh: install done in $((SECONDS - SETUP_START)) s ($VENV)." >&2
fi
