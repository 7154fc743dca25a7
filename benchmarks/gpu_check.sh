#!/usr/bin/env bash
# GPU check of the paths CI cannot run (it has no GPU), in one call of under 10 minutes on one H100: five named checks,
# each trained for real with `axolotl train` on tiny models (benchmarks/gpu_check.py, docs/benchmarks.md "GPU check"):
#   1 flash_packing    flash_attention_2 + bf16 + sample packing: the first losses of the sdpa / fp32 packed run, within
#                      2% (skipped when flash_attn is not installed: PyPI ships it as source only)
#   2 qlora            adapter: qlora + load_in_4bit (bitsandbytes), in-process teacher, bf16: trains, finite losses,
#                      adapter and reward head saved; `axolotl merge-lora` result loads and runs (time permitting)
#   3 zero3            DeepSpeed ZeRO-3 on one GPU (nccl, example_configs/deepspeed/zero3.json), bf16: trains, the
#                      gathered student and the reward head are saved, the head loads
#   4 cross_tokenizer  in-process Gemma 3 teacher -> Llama 3 student (real tokenizers, tiny random bodies),
#                      cross_tokenizer: true, bf16: vocabularies and coverage (>= 90%) logged, finite losses
#   5 throughput       X-KD (precomputed top-k, format axolotl_kd_v2) against Axolotl's KD plugin on the same rows,
#                      student and steps, bf16, packing: speed ratio (step time; train_samples_per_second)
# Each prints `gpu_check: NAME PASS|FAIL|SKIP (s) ...`; results in WORKDIR/gpu_check.json; a failing check does not stop
# the next; exit 1 when any check failed (2: nothing could run).
#
# Needs a CUDA GPU and PyTorch. Axolotl, DeepSpeed, bitsandbytes (QLoRA), liger-kernel (the KD plugin) and the rest
# that the GPU machine lacks are installed here from carried wheels (--no-index --no-deps) when axolotl is missing;
# the GPU machine has no network, so two steps first, on the CPU machine (repository root):
#   XKD_TOKENIZER_CACHE=runs/tokenizers .venv/bin/python -c "from benchmarks.real_tokenizers import FAMILIES, fetch; [fetch(n) for n in FAMILIES]"
#   bash benchmarks/gpu_wheels.sh      # runs/wheels: the wheels (~36 MB) + tokenizers.tar.xz (Gemma 3, Llama 3: ~5 MB)
# then the device run, one call (the device tool's `run`):
#   command: set -o pipefail; bash benchmarks/gpu_check.sh runs/gpu_check --copy-to $OUT 2>&1 | tee $OUT/gpu_check.log
#            (--copy-to: gpu_check.json and a failed check's logs land in $OUT after every check)
#   carry:   ["runs/wheels"]       timeout_s: 600
# (runs/ is git-ignored, hence carried. The 42 MB runs/tokenizers itself need not travel: the tokenizers come packed
# in runs/wheels/tokenizers.tar.xz and are unpacked into $XKD_TOKENIZER_CACHE, default runs/tokenizers, when
# missing; carrying runs/tokenizers/gemma3-3.7.2 and runs/tokenizers/llama3-3.7.2 instead also works.)
# flash-attn is not on the GPU machine and has no wheel on PyPI: put a wheel built for its torch / CUDA / Python into
# runs/wheels to run check 1 (else it is skipped, and check 5 compares both runs with sdpa).
# Usage (repository root):  bash benchmarks/gpu_check.sh [WORKDIR] [--checks NAME ...] [--dry-run]
#   --dry-run (CPU is enough): builds the assets small, writes every check's config and validates it with Axolotl's
#   config loader; trains nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
WORK=runs/gpu_check
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then WORK=$1; shift; fi
WHEELS=${XKD_GPU_WHEELS:-runs/wheels}
export XKD_TOKENIZER_CACHE=${XKD_TOKENIZER_CACHE:-runs/tokenizers}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
started=$SECONDS

if ! "$PYTHON" -c "import axolotl" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: axolotl is not installed and $WHEELS holds no wheels: run benchmarks/gpu_wheels.sh on the CPU" \
         "machine and carry $WHEELS (this script's header)" >&2
    exit 2
  fi
  echo "gpu_check: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS (--no-index --no-deps)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    "$WHEELS"/*.whl || { echo "gpu_check: installing the wheels failed" >&2; exit 2; }
fi
if ! "$PYTHON" -c "import axolotl_xkd" 2>/dev/null; then
  echo "gpu_check: installing this checkout (pip install -e . --no-deps)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --disable-pip-version-check -e . \
    || { echo "gpu_check: installing axolotl-xkd failed" >&2; exit 2; }
fi
for family in gemma3-3.7.2 llama3-3.7.2; do
  if [ ! -f "$XKD_TOKENIZER_CACHE/$family/tokenizer.json" ] && [ -f "$WHEELS/tokenizers.tar.xz" ]; then
    mkdir -p "$XKD_TOKENIZER_CACHE" && tar -C "$XKD_TOKENIZER_CACHE" -xJf "$WHEELS/tokenizers.tar.xz"
  fi
done
# The console scripts (axolotl, accelerate) next to the interpreter come first on PATH.
export PATH="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')"):$PATH"
echo "gpu_check: set up in $((SECONDS - started)) s"

# The checks' budget: what is left of about 9 minutes once the set-up is done.
export XKD_GPU_BUDGET_S=${XKD_GPU_BUDGET_S:-$((540 - (SECONDS - started)))}
"$PYTHON" -m benchmarks.gpu_check --work "$WORK" "$@"
