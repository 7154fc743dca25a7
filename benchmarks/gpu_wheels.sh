#!/usr/bin/env bash
# What a GPU device session needs that its machine lacks, gathered on the CPU machine (which reaches PyPI):
# the GPU machine has Python 3.12 with PyTorch, Triton, transformers, accelerate, peft, numpy, pandas, pyarrow,
# tokenizers, safetensors ... but not Axolotl, and no network. This writes into OUT (default runs/wheels, git-ignored):
#   - cp312 / manylinux x86_64 wheels of axolotl 0.19.0 and what it imports at train time that the GPU machine lacks,
#     each installed there with --no-deps (the pins are this venv's, the versions the suite runs);
#   - wheels built here of the three that PyPI ships only as source (deepspeed, axolotl-contribs-lgpl/-mit: pure Python);
#   - bitsandbytes, wandb, mistral-common and pycountry with the files a check never reads left out (other CUDA
#     builds, wandb's service binaries, Mistral's tokenizer data, translations): the carried tree must stay under
#     64 MiB;
#   - tokenizers.tar.xz: the Gemma 3 and Llama 3 tokenizers from $XKD_TOKENIZER_CACHE (default runs/tokenizers),
#     about 5 MB instead of 42 MB (fetch them first: the command below).
# The list is what `axolotl train` (LoRA, packing, in-process teacher), `axolotl merge-lora`, DeepSpeed, bitsandbytes
# and Axolotl's KD plugin imported here, less the GPU machine's packages (/work/.library/device/KINDS.md); a train run
# in a venv holding only those packages plus this list passed on the CPU.
# Usage (repository root, CPU machine):
#   XKD_TOKENIZER_CACHE=runs/tokenizers .venv/bin/python -c "from benchmarks.real_tokenizers import FAMILIES, fetch; [fetch(n) for n in FAMILIES]"
#   bash benchmarks/gpu_wheels.sh [OUT]
# then carry OUT to the device run (benchmarks/gpu_check.sh's header). About 41 MB (36 of wheels); a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/wheels}
PY=${PYTHON:-.venv/bin/python}
TOKENIZERS=${XKD_TOKENIZER_CACHE:-runs/tokenizers}
mkdir -p "$OUT"
rm -f "$OUT"/*.whl

PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
          --platform manylinux1_x86_64 --platform any)
BINARY=(
  axolotl==0.19.0 transformers==5.16.1 accelerate==1.13.0 peft==0.20.0 trl==1.9.0 datasets==4.8.4
  dill==0.4.1 multiprocess==0.70.19 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.8.0
  typing-inspection==0.4.5 pydantic-extra-types==2.11.1 fire==0.7.1 termcolor==3.3.0 addict==2.4.0 hjson==3.1.0
  bitsandbytes==0.50.2 liger-kernel==0.8.1 torchao==0.17.0 kernels==0.16.2 kernels-data==0.16.2
  posthog==6.7.11 backoff==2.2.1 distro==1.9.0 fastcore==2.2.41 evaluate==0.4.1 python-dotenv==1.0.1
  mistral-common==1.11.5 pycountry==26.2.16 wandb==0.31.0 platformdirs==4.14.9 cwevals==0.0.1b1
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp-common==0.66b2
  setuptools==84.2.1
)
SOURCE_ONLY=(deepspeed==0.19.8 axolotl-contribs-lgpl==0.0.7 axolotl-contribs-mit==0.0.6)

echo "gpu_wheels: downloading ${#BINARY[@]} wheels for cp312 / x86_64 into $OUT"
"$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$OUT" "${BINARY[@]}"
echo "gpu_wheels: building ${SOURCE_ONLY[*]} (source only on PyPI, pure Python)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "${SOURCE_ONLY[@]}"

"$PY" - "$OUT" <<'PY'
"""Rewrite four wheels without the files no check reads (and their RECORD lines)."""
import fnmatch, sys, zipfile
from pathlib import Path

DROP = {
    "bitsandbytes-*.whl": ["bitsandbytes/libbitsandbytes_cuda1[12]*.so", "bitsandbytes/libbitsandbytes_rocm*.so",
                           "bitsandbytes/libbitsandbytes_xpu*.so"],  # keeps the CPU, CUDA 13.0 and 13.2 builds
    "wandb-*.whl": ["wandb/bin/*"],  # the service binaries; report_to: none never starts them
    "mistral_common-*.whl": ["mistral_common/data/*"],  # Mistral's tokenizer files
    "pycountry-*.whl": ["pycountry/locales/*"],  # translations of country names
}
out = Path(sys.argv[1])
for pattern, drops in DROP.items():
    for wheel in out.glob(pattern):
        src = zipfile.ZipFile(wheel)
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if any(fnmatch.fnmatch(info.filename, d) for d in drops):
                    continue
                data = src.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = ("\n".join(l for l in lines if not any(fnmatch.fnmatch(l.split(",")[0], d)
                                                                   for d in drops)) + "\n").encode()
                dst.writestr(info, data)
        src.close()
        before = wheel.stat().st_size
        tmp.replace(wheel)
        print(f"gpu_wheels: {wheel.name}: {before >> 20} MiB -> {wheel.stat().st_size >> 20} MiB")
PY

families=(gemma3-3.7.2 llama3-3.7.2)
missing=0
for f in "${families[@]}"; do [ -f "$TOKENIZERS/$f/tokenizer.json" ] || missing=1; done
if [ "$missing" = 1 ]; then
  echo "gpu_wheels: $TOKENIZERS lacks ${families[*]}: fetch them first (the command in this script's header);" \
       "check 4 (cross_tokenizer) of gpu_check.sh needs them" >&2
  exit 1
fi
tar -C "$TOKENIZERS" -cJf "$OUT/tokenizers.tar.xz" "${families[@]}"
echo "gpu_wheels: $(ls "$OUT"/*.whl | wc -l) wheels and tokenizers.tar.xz, $(du -sh "$OUT" | cut -f1) in $OUT"
