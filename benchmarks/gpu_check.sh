#!/usr/bin/env bash
# GPU check of the paths CI cannot run (it has no GPU): the tiny X-KD config with flash_attention_2 + bf16 +
# sample packing gives the same first losses as the sdpa / fp32 packed run. Needs a CUDA GPU, axolotl and
# flash-attn installed.
# Usage (repository root, venv active):  bash benchmarks/gpu_check.sh [WORKDIR]
# Writes WORKDIR/gpu_check.json and exits non-zero when the losses differ by more than 2% (bf16).
set -euo pipefail
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
WORK=${1:-runs/gpu_check}
mkdir -p "$WORK"
python -c "import torch, flash_attn; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(), flash_attn.__version__)"
[ -d "$WORK/tiny/teacher" ] || python -m axolotl_xkd.tiny --out "$WORK/tiny" --teacher-steps 300

python - "$WORK" <<'PY'
import sys, yaml
from pathlib import Path
work = Path(sys.argv[1])
base = yaml.safe_load(Path("example_configs/xkd_tiny.yml").read_text())
tiny = work / "tiny"
base.update(base_model=str(tiny / "student"), tokenizer_config=str(tiny / "tokenizer"),
            datasets=[{**base["datasets"][0], "path": str(tiny / "data" / "train.jsonl")}],
            sample_packing=True, pad_to_sequence_len=True, sequence_len=128, micro_batch_size=2,
            max_steps=4, logging_steps=1, save_steps=4, use_tensorboard=False)
base["xkd"]["teacher"]["path"] = str(tiny / "teacher")
runs = {
    "sdpa_fp32": {"attn_implementation": "sdpa", "bf16": False},
    "flash_bf16": {"attn_implementation": "flash_attention_2", "flash_attention": True, "bf16": True},
}
for name, over in runs.items():
    cfg = {**base, **over, "output_dir": str(work / name), "dataset_prepared_path": str(work / "prepared")}
    (work / f"{name}.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
PY

for name in sdpa_fp32 flash_bf16; do
  axolotl train "$WORK/$name.yml" > "$WORK/$name.log" 2>&1 || { tail -50 "$WORK/$name.log"; exit 1; }
done

python - "$WORK" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
def losses(name):
    ckpt = max((work / name).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return {e["step"]: e["loss"] for e in json.loads((ckpt / "trainer_state.json").read_text())["log_history"] if "loss" in e}
ref, flash = losses("sdpa_fp32"), losses("flash_bf16")
rel = {s: abs(flash[s] - ref[s]) / abs(ref[s]) for s in ref}
result = {"sdpa_fp32": ref, "flash_bf16": flash, "max_rel_diff": max(rel.values()), "tolerance": 0.02}
(work / "gpu_check.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
sys.exit(0 if result["max_rel_diff"] <= 0.02 else 1)
PY
