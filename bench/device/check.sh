#!/usr/bin/env bash
# Everything the lent GPU checks and times, in one run (planned at ~6 min on an H100; every step has its own time
# limit and writes as it goes, so a cut-short run still returns what it measured). From the repo root, here:
#     bash bench/device/fetch_wheels.sh
# then the device tool: run(command="bash bench/device/check.sh", carry=[".whl"], timeout_s=480)
# and copy the returned files into bench/results/. Dry run on the CPU (checks the plumbing, not the GPU):
#     OUT=/tmp/dev DEVICE=cpu PRESET=tiny STEPS=2 RES=64 bash bench/device/check.sh
# Steps: 1 GPU-marked tests (CUDA graphs vs eager, tiny CUDA fp16); 2 smartedit-bench official/eager/cudagraph at
# 256 and 512, 100 steps, 7b random weights; 3 the Triton kernel tests on the GPU; 4 smartedit-bench-kernels;
# 5 (COMPILE=1) the torch.compile backend, last because max-autotune compiles for minutes.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:?set OUT to the folder for results}
DEVICE=${DEVICE:-cuda} PRESET=${PRESET:-7b} STEPS=${STEPS:-100} RES=${RES:-256,512} REPEATS=${REPEATS:-3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" /tmp/smartedit-site
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then  # what the image lacks (fetch_wheels.sh)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/smartedit-site \
        "$REPO"/.whl/*.whl || exit 1
fi
# the project itself, without its dependencies (the image's torch/transformers/triton are used as they are)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/smartedit-site \
    "$REPO" >/dev/null || { echo "installing the project failed"; exit 1; }
export PYTHONPATH=/tmp/smartedit-site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/smartedit-site/bin:$PATH
cd /tmp  # not the repo root: its smartedit/ folder would shadow the installed package (engines/, export/ map into it)
CARD=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
echo "== $CARD; $(python3 -c 'import torch, triton, transformers, diffusers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null

step() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit} s)"; local t0=$SECONDS
    timeout "$limit" "$@"; echo "== $name: exit $? after $((SECONDS - t0)) s"; }

step "GPU-marked tests" 150 python3 -m pytest -q -p no:cacheprovider -m cuda --rootdir "$REPO" "$REPO/tests" \
    2>&1 | tee "$OUT/$CARD-pytest-cuda.log" | tail -25
step "smartedit-bench" 330 python3 -m smartedit.bench.cli --preset "$PRESET" --random-weights --device "$DEVICE" \
    --backends official,eager,cudagraph --resolution "$RES" --steps "$STEPS" --repeats "$REPEATS" --out "$OUT"
step "Triton kernel tests" 120 python3 -m pytest -q -p no:cacheprovider -x --rootdir "$REPO" "$REPO/tests/kernels" \
    2>&1 | tail -5
[ "$DEVICE" = cuda ] && step "smartedit-bench-kernels" 90 python3 -m smartedit.bench.kernels --out "$OUT"
if [ "${COMPILE:-0}" = 1 ]; then
    mkdir -p "$OUT/compile"
    step "smartedit-bench compile" 300 python3 -m smartedit.bench.cli --preset "$PRESET" --random-weights \
        --device "$DEVICE" --backends eager,compile --resolution "$RES" --steps "$STEPS" --repeats "$REPEATS" \
        --out "$OUT/compile"
fi
ls -la "$OUT"
