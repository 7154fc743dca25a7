#!/usr/bin/env bash
# The main job on the embedded default: build a tiny teacher/student/task in code, train the teacher
# briefly, distil it with X-KD through `axolotl train` on the CPU, and print where the outputs went.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
rm -rf runs/tiny
python -m axolotl_xkd.tiny --out runs/tiny --teacher-steps "${XKD_TEACHER_STEPS:-800}"
axolotl train example_configs/xkd_tiny.yml
OUT=runs/tiny/xkd_student
test -f "$OUT/model.safetensors" && test -f "$OUT/xkd_reward_head.safetensors"
echo
echo "X-KD student (plain Hugging Face model): $ROOT/$OUT"
echo "Reward head: $ROOT/$OUT/xkd_reward_head.safetensors (+ xkd_reward_head.json)"
