#!/usr/bin/env bash
# Install everything needed (see setup.sh) and run the tests: with no arguments the whole suite, end-to-end tests
# included; arguments go to pytest (e.g. `-m "not e2e"` for the fast tier, or test paths).
# XKD_AXOLOTL=0.21 runs them on Axolotl 0.21 in its own venv (see setup.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
python -m pytest -q "$@"
