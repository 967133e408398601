#!/usr/bin/env bash
# fedray's GPU figures on an offline GPU machine that has CUDA torch and torchvision but not
# fedray's environment: the wheels `make gpu-wheels` gathers (and Ray without its Java workers,
# as a .tar.xz) are installed into a folder of their own, and fedray runs from this checkout.
#
#     bash benchmarks/gpu.sh WHEELS RESULTS      (e.g. bash benchmarks/gpu.sh .gpu-wheels out)
#
# Writes to RESULTS, each step under a time limit of its own, going on after one that fails:
#   gpu.txt                              the device, the versions, each step's exit status
#   dp_overhead_gpu_resnet18_64.json     benchmarks/dp_overhead.py --device cuda, resnet18 64 px
#   gpu_recipe.json                      benchmarks/gpu_recipe.py: the paper recipe's shape end
#                                        to end, then `fedray serve` of its model
#   dp_overhead_gpu_resnet50_224.json    dp_overhead.py, resnet50 at 224 px
#   logs.tar.gz                          every step's output, the run's and the service's logs
# FEDRAY_BENCH_DEVICE=cpu runs the same steps on the CPU, to check the script without a GPU;
# FEDRAY_BENCH_ARGS adds arguments to every dp_overhead.py run (e.g. "--repeats 1 --batch 4"),
# FEDRAY_RECIPE_ARGS to gpu_recipe.py (e.g. "--n 240 --size 64 --backbone smallcnn"), and
# FEDRAY_GPU_LIMITS sets the steps' limits in seconds: "DP RECIPE RUN" (default "75 400 270").
set -uo pipefail
wheels=${1:?usage: bash benchmarks/gpu.sh WHEELS RESULTS}
out=${2:?usage: bash benchmarks/gpu.sh WHEELS RESULTS}
py=${PYTHON:-python3}
device=${FEDRAY_BENCH_DEVICE:-cuda}
read -r dp_limit recipe_limit run_limit <<< "${FEDRAY_GPU_LIMITS:-75 400 270}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
shopt -s nullglob
whl=("$wheels"/*.whl)
if ((${#whl[@]})); then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "${whl[@]}" || exit 1
fi
for archive in "$wheels"/*.tar.xz; do  # (Python's lzma: the machine may have no xz)
    "$py" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
        "$archive" "$site" || exit 1
done
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
"$py" - > "$out/gpu.txt" <<'PY'
import opacus, pydantic, ray, torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "opacus",
      opacus.__version__, "ray", ray.__version__, "pydantic", pydantic.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
PY
cat "$out/gpu.txt"
mkdir -p "$site/logs"

step() {  # step NAME LIMIT COMMAND...: run it under its limit (Ctrl-C, then kill), note its status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout -s INT -k 30 "$limit" "$@" > "$site/logs/$name.log" 2>&1
    local code=$?
    echo "step $name: exit $code after $((SECONDS - start))s (limit ${limit}s)" | tee -a "$out/gpu.txt"
    tail -n 4 "$site/logs/$name.log"
}

read -r -a extra <<< "${FEDRAY_BENCH_ARGS:-}"
read -r -a recipe_extra <<< "${FEDRAY_RECIPE_ARGS:-}"
step dp_resnet18_64 "$dp_limit" "$py" benchmarks/dp_overhead.py --device "$device" --steps 8 \
    --modes hooks ghost bk --images-per-patient 0 \
    --output "$out/dp_overhead_gpu_resnet18_64.json" "${extra[@]}"
step recipe "$recipe_limit" "$py" benchmarks/gpu_recipe.py --device "$device" \
    --train-timeout "$run_limit" --keep "$site/work" --output "$out/gpu_recipe.json" \
    "${recipe_extra[@]}"
step dp_resnet50_224 "$dp_limit" "$py" benchmarks/dp_overhead.py --device "$device" --steps 8 \
    --modes hooks ghost bk --backbone resnet50 --size 224 --images-per-patient 0 \
    --output "$out/dp_overhead_gpu_resnet50_224.json" "${extra[@]}"
cp "$site"/work/*.log "$site/logs/" 2>/dev/null
tar -czf "$out/logs.tar.gz" -C "$site" logs
