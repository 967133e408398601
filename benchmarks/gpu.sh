#!/usr/bin/env bash
# The DP-SGD figures on a GPU machine that has CUDA torch and torchvision but not fedray's
# environment, and no network: the few pure-Python and binary wheels fedray's training code
# needs beyond torch (`make gpu-wheels` gathers them here) are installed into a folder of
# their own, and fedray runs from this checkout.
#
#     bash benchmarks/gpu.sh WHEELS RESULTS      (e.g. bash benchmarks/gpu.sh .gpu-wheels out)
#
# Writes RESULTS/dp_overhead_gpu_resnet18_64.json and RESULTS/dp_overhead_gpu_resnet50_224.json
# (benchmarks/dp_overhead.py with --device cuda) and RESULTS/gpu.txt (the device and versions).
# FEDRAY_BENCH_DEVICE=cpu runs the same steps on the CPU, to check the script without a GPU;
# FEDRAY_BENCH_ARGS adds arguments to every dp_overhead.py run (e.g. "--repeats 1 --batch 4").
set -euo pipefail
wheels=${1:?usage: bash benchmarks/gpu.sh WHEELS RESULTS}
out=${2:?usage: bash benchmarks/gpu.sh WHEELS RESULTS}
py=${PYTHON:-python3}
device=${FEDRAY_BENCH_DEVICE:-cuda}
cd "$(dirname "$0")/.."
mkdir -p "$out"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$wheels"/*.whl
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
"$py" - > "$out/gpu.txt" <<'PY'
import opacus, torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "opacus", opacus.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
PY
cat "$out/gpu.txt"
read -r -a extra <<< "${FEDRAY_BENCH_ARGS:-}"
"$py" benchmarks/dp_overhead.py --device "$device" --steps 8 --modes hooks ghost bk \
    --images-per-patient 0 --output "$out/dp_overhead_gpu_resnet18_64.json" "${extra[@]}"
"$py" benchmarks/dp_overhead.py --device "$device" --steps 8 --modes hooks ghost bk \
    --backbone resnet50 --size 224 --images-per-patient 0 \
    --output "$out/dp_overhead_gpu_resnet50_224.json" "${extra[@]}"
