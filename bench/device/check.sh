#!/usr/bin/env bash
# Everything a lent GPU checks and times, in ONE device call of at most 540 s (the lease is 15 minutes in all, a
# machine start costs one or two of them, and one command may run 600 s). Most valuable step first; every step has
# its own time limit and writes its results under $OUT as it goes, so a run cut short returns what it measured.
#
#     bash bench/device/check.sh --plan      # the steps, their limits and (last line) the total in seconds
#     bash bench/device/fetch_wheels.sh      # here: the wheels the GPU image lacks, into .whl/
#     device tool: run(command="bash bench/device/check.sh", carry=[".whl"], timeout_s=570)
#     bash bench/device/check.sh --cpu       # dry run on this CPU machine (tiny preset): the plumbing, not the GPU
#     bash bench/device/check.sh --compile   # a second call, if the lease allows: eager vs torch.compile (max-autotune)
#     bash bench/device/check.sh --serve     # or: smartedit-serve (7b, cudagraph) under the load test at concurrency
#                                            # 1 and 4; needs `fetch_wheels.sh --serve` here (the server, ~54 MB)
#
# At most 8 files come back from $OUT; a default run writes 8: <card>-7b.{json,md,png} (smartedit-bench),
# <card>-bim-kernels.{json,md}, <card>-pytest-cuda.log, <card>-pytest-kernels.log, <card>-check.log.
# Only OUT is read from the environment (the device tool sets it); everything else is this script's own setting.
set -uo pipefail

MODE=gpu PLAN= DRY=
for arg in "$@"; do
    case "$arg" in
        --plan) PLAN=1 ;;
        --cpu) DRY=1 ;;
        --compile) MODE=compile ;;
        --serve) MODE=serve ;;
        *) echo "usage: bash bench/device/check.sh [--compile | --serve] [--plan | --cpu]" >&2; exit 2 ;;
    esac
done

# name|limit in seconds|what: the one list that both --plan and the run read
if [ "$MODE" = serve ]; then
    STEPS=("install|90|install the carried wheels, the project and the unpacked tritonserver"
           "serve-bench|440|smartedit-bench --serve 7b: cudagraph fp16 on Triton, gRPC, concurrency 1 and 4, 256 px")
elif [ "$MODE" = compile ]; then
    STEPS=("install|60|install the carried wheels and the project"
           "bench-compile|450|smartedit-bench 7b: eager and compile at 256, 100 steps")
else
    STEPS=("install|60|install the carried wheels and the project"
           "bench|270|smartedit-bench 7b: official, eager, cudagraph at 256 and 512, 100 steps"
           "pytest-cuda|80|the cuda-marked tests (tiny preset on the GPU; no -x: every failure is listed)"
           "pytest-kernels|80|tests/kernels/ on the GPU (Triton kernel vs fp64, compile/export of the op)"
           "bench-kernels|50|smartedit-bench-kernels: 7b BIM attention shapes and the BIM forward, batch 1 and 8")
fi
BUDGET=540

limit_of() { local s; for s in "${STEPS[@]}"; do IFS='|' read -r n l _ <<<"$s"; [ "$n" = "$1" ] && echo "$l"; done; }

if [ -n "$PLAN" ]; then
    total=0
    for s in "${STEPS[@]}"; do
        IFS='|' read -r n l what <<<"$s"
        printf '%-15s %4d s  %s\n' "$n" "$l" "$what"
        total=$((total + l))
    done
    echo "budget $BUDGET s"
    echo "total $total"
    exit 0
fi

REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:?set OUT to the folder for results (the device tool sets it)}
if [ -n "$DRY" ]; then
    DEV=cpu PRESET=tiny STEPS_N=2 RES=64 REPEATS=1 SITE=$(mktemp -d)
else
    DEV=cuda PRESET=7b STEPS_N=100 RES=256,512 REPEATS=3 SITE=/tmp/smartedit-site
fi
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
mkdir -p "$OUT" "$SITE"
CARD=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
LOG="$OUT/$CARD-check.log"

step() {  # step NAME COMMAND...: runs under the step's limit from STEPS, reports exit status and seconds
    local name=$1 limit; shift
    limit=$(limit_of "$name")
    echo "== $name (limit $limit s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    return $rc
}

install() {
    if [ -z "$DRY" ] && compgen -G "$REPO/.whl/*.whl" >/dev/null; then  # (built for the GPU image's Python 3.12)  # what the GPU image lacks (fetch_wheels.sh)
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$REPO"/.whl/*.whl || return 1
    fi
    if [ -z "$DRY" ] && [ -f "$REPO/.whl/tritonserver.tar.xz" ]; then  # fetch_wheels.sh --serve: PyTriton's server, one Python
        tar -C "$SITE" -xJf "$REPO/.whl/tritonserver.tar.xz" || return 1
    fi
    # the project without its dependencies: the image's torch / transformers / triton are used as they are
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" \
        "$REPO" >/dev/null
}
export -f install
export REPO SITE DRY

main() {
echo "== $CARD, mode $MODE${DRY:+ (CPU dry run)}; $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
step install bash -c install || { echo "installing the project failed: nothing else can run"; return 1; }
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH SMARTEDIT_TRITONSERVER=$SITE/tritonserver
cd /tmp  # not the repo root: the installed copy is what runs (its smartedit/ folder would shadow it)
python3 -c 'import torch, triton, transformers, diffusers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)'

BENCH=(python3 -m smartedit.bench.cli --preset "$PRESET" --random-weights --device "$DEV" --steps "$STEPS_N"
       --repeats "$REPEATS" --out "$OUT")
if [ "$MODE" = serve ]; then
    if [ "$DEV" = cuda ] && ! [ -x "$SITE/tritonserver/bin/tritonserver" ]; then
        echo "serve-bench: skipped: no tritonserver (run bench/device/fetch_wheels.sh --serve, carry .whl)"
        return 0
    fi
    [ "$DEV" = cpu ] && unset SMARTEDIT_TRITONSERVER  # the dry run uses the installed PyTriton
    step serve-bench python3 -m smartedit.bench.cli --serve --preset "$PRESET" --random-weights --device "$DEV" \
        --backends "$([ "$DEV" = cuda ] && echo cudagraph || echo eager)" --steps "$STEPS_N" --resolution "${RES%%,*}" \
        --concurrency 1,4 --requests 8 --protocols grpc --max-batch 4 --out "$OUT"
    [ -n "$DRY" ] && rm -rf "$SITE"
    ls -la "$OUT"
    return 0
fi
if [ "$MODE" = compile ]; then
    step bench-compile "${BENCH[@]}" --backends eager,compile --resolution 256
    ls -la "$OUT"
    return 0
fi
step bench "${BENCH[@]}" --backends official,eager,cudagraph --resolution "$RES"
step pytest-cuda python3 -m pytest -q -p no:cacheprovider -m cuda --rootdir "$REPO" "$REPO/tests" \
    > "$OUT/$CARD-pytest-cuda.log" 2>&1
tail -n 30 "$OUT/$CARD-pytest-cuda.log"
# pytest-xdist (on the GPU image) compiles the kernel's variants in parallel: one compile per block shape and dtype
XDIST=$(python3 -c 'import xdist' 2>/dev/null && echo "-n 4")
step pytest-kernels python3 -m pytest -q -p no:cacheprovider $XDIST --rootdir "$REPO" "$REPO/tests/kernels" \
    > "$OUT/$CARD-pytest-kernels.log" 2>&1
tail -n 30 "$OUT/$CARD-pytest-kernels.log"
step bench-kernels python3 -m smartedit.bench.kernels --out "$OUT"
[ -n "$DRY" ] && rm -rf "$SITE"
ls -la "$OUT"
}
main 2>&1 | tee -a "$LOG"
