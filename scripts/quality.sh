#!/usr/bin/env bash
# The quality study (benchmarks/quality/study.py) from a fresh clone: set up, add the benchmark extra, run.
# Then the X-KD variant sweep (benchmarks/quality/sweep.py: tuned on the dev split, reported on the test split)
# and the TRL GKDTrainer / MiniLLMTrainer baselines (benchmarks/quality/trl_baselines.py), MiniLLM's learning
# rate tuned on the dev split.
# Resumable: rerun to continue; arguments go to study.py (e.g. --seeds 3 --jobs 2).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
. "$ROOT/scripts/setup.sh"
python -m pip install -q -e "$ROOT[bench]"
cd "$ROOT"
python -m benchmarks.quality.study "$@"
python -m benchmarks.quality.sweep
python -m benchmarks.quality.trl_baselines
python -m benchmarks.quality.trl_baselines --tune-minillm
