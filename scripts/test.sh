#!/usr/bin/env bash
# Install everything needed (see setup.sh) and run the tests: with no arguments the whole suite, end-to-end tests
# included; arguments go to pytest (e.g. `-m "not e2e"` for the fast tier, or test paths).
# XKD_AXOLOTL=0.21 runs them on Axolotl 0.21 in its own venv (see setup.sh).
# Tests run in parallel, one pytest worker per core up to 4 (XKD_TEST_WORKERS overrides; 0 runs them in this
# process), a test module's tests on one worker (--dist loadscope) so its shared training runs happen once. Most of
# an end-to-end test is single-threaded (imports, dataset preparation, Python between tiny kernels), so two
# workers on two cores take about half the time. Parallel workers compute with one thread each (OMP_NUM_THREADS=1,
# as torchrun gives its ranks) rather than oversubscribe the cores. The 20 slowest tests are listed at the end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
CORES="$(nproc)"
WORKERS="${XKD_TEST_WORKERS:-$((CORES < 4 ? CORES : 4))}"
if [ "$WORKERS" -le 1 ]; then WORKERS=0; else export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi
python -m pytest -q -n "$WORKERS" --dist loadscope --durations=20 "$@"
