#!/usr/bin/env bash
# Install everything needed (see setup.sh) and run the whole test suite, end-to-end tests included.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
python -m pytest -q "$@" tests
