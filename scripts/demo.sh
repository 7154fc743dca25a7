#!/usr/bin/env bash
# The main job on the embedded default: build a tiny teacher/student/task in code, train the teacher briefly, then
# the case distillation is for (a strong teacher, many prompts, few gold answers): plain SFT on the few labelled
# rows, X-KD on the same rows, and plain SFT and X-KD on the teacher's answers to every prompt (the same stored
# text), through `axolotl train` on the CPU with the same student and budget; compare the models' exact match
# (docs/demo.md).
# Deletes and rewrites the demo folder: XKD_DEMO_OUT, default runs/tiny (the folder the example configs use).
# XKD_TEACHER_STEPS (default 800) sets the tiny teacher's training steps; XKD_DEMO_SEED (default 0) seeds the tiny
# models and data (and, as 42 + seed, the training runs): docs/demo.md reports seeds 0, 1 and 2. XKD_DEMO_STEPS
# (default 256, scripts/demo.py STEPS) sets every student's optimizer steps (the CI-sized test runs a few).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
OUT="${XKD_DEMO_OUT:-runs/tiny}"
START=$SECONDS
step() { echo; echo "=== demo [$((SECONDS - START)) s]: $*"; }

step "building the tiny tokenizer, teacher, student and data in $OUT (deleted first); training the teacher"
rm -rf "$OUT"
SEED="${XKD_DEMO_SEED:-0}"
python -m axolotl_xkd.tiny --out "$OUT" --teacher-steps "${XKD_TEACHER_STEPS:-800}" --seed "$SEED"
python -m scripts.demo configs --out "$OUT" --seed "$((42 + SEED))" ${XKD_DEMO_STEPS:+--steps "$XKD_DEMO_STEPS"}
step "plain SFT on the 32 labelled rows: axolotl train $OUT/sft.yml (the X-KD config without the plugin and xkd: block)"
axolotl train "$OUT/sft.yml"
step "X-KD on the same 32 labelled rows: axolotl train $OUT/xkd.yml (example_configs/xkd_tiny.yml, paths under $OUT)"
axolotl train "$OUT/xkd.yml"
test -f "$OUT/xkd_student/model.safetensors" && test -f "$OUT/xkd_student/xkd_reward_head.safetensors"
step "the teacher answers every prompt once, its top-k stored: axolotl xkd precompute $OUT/xkd_teacher.yml"
axolotl xkd precompute "$OUT/xkd_teacher.yml"
python -m scripts.demo answers --out "$OUT"
step "plain SFT on the same teacher answers as text: axolotl train $OUT/sft_teacher.yml (no plugin, as sft.yml)"
axolotl train "$OUT/sft_teacher.yml"
step "X-KD on the teacher's answers to every prompt: axolotl train $OUT/xkd_teacher.yml"
axolotl train "$OUT/xkd_teacher.yml"
step "plotting the X-KD run's loss terms"
PLOT="$(axolotl xkd plot "$OUT/xkd_teacher_student" --out "$OUT/xkd_loss_terms.png" | tail -n 1)"
step "greedy exact match on the eval rows"
python -m scripts.demo report --out "$OUT"

cat <<NEXT

X-KD students (plain Hugging Face models): $OUT/xkd_teacher_student (teacher's answers), $OUT/xkd_student (same data)
Reward head: $OUT/xkd_teacher_student/xkd_reward_head.safetensors (+ xkd_reward_head.json)
Loss terms plot: $PLOT
Table as JSON: $OUT/exact_match.json
Demo took $((SECONDS - START)) s.

Try next (first: cd $ROOT && . ${XKD_VENV:-.venv}/bin/activate):
  Score answers with the student's reward head:
    axolotl xkd score --model $OUT/xkd_teacher_student --prompts $OUT/data/eval.jsonl --responses $OUT/data/eval.jsonl --out scored.jsonl
  Let the student answer the prompts itself and the teacher grade every token (on-policy distillation):
    example_configs/xkd_tiny_on_policy.yml (xkd.sequences: on_policy; docs/teachers.md)
  Add X-KD to your own Axolotl config: copy the plugins: line and the xkd: block of example_configs/xkd_tiny.yml
  (docs/getting_started.md).
Running this demo again deletes and rewrites $OUT.
NEXT
