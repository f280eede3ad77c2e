#!/usr/bin/env bash
# The benchmark of one GPU machine without a package index: what the project runs on a CUDA GPU, checked and timed
# in one run whose steps total at most 480 s (`--plan`), the most valuable step first. Every step runs under its own
# time limit and writes its results under $OUT as it goes, so a run cut short keeps what it measured:
#     install        the wheels of .whl/ and the project, into /tmp/smartedit-site (the machine's own torch, triton,
#                    transformers and numpy are used as they are)
#     bench          smartedit-bench 7b (random weights): official, eager, cudagraph at 256 and 512 px, 100 steps,
#                    then the loop's levers (a sampler at 25 steps, DeepCache, both with a guidance interval) at 256
#     pytest         the cuda-marked tests and tests/kernels/ (on 12 pytest-xdist workers where it is installed)
#     bench-kernels  smartedit-bench-kernels: the 7b BIM attention shapes and the BIM forward, batch 1 and 8
# TensorRT is not among them (its wheels are not in .whl/, and TensorRT-RTX has no SM90 target): the run measures the
# PyTorch backends and the Triton kernels. The machine needs Python 3.12 with a CUDA torch, triton, transformers, numpy
# and pytest; the rest are pure-Python wheels (`--wheels` lists them) that fetch_wheels.sh puts in .whl/ where a
# package index is reachable, and that travel with the repository. Without them the run stops before its first step.
#
#     bash bench/device/check.sh --plan             # the steps, their limits and (last line) the total in seconds
#     bash bench/device/check.sh --wheels           # the wheels it installs, as pip requirement specifiers
#     bash bench/device/fetch_wheels.sh             # those wheels, into .whl/ (~7 MB; needs a package index)
#     OUT=DIR bash bench/device/check.sh            # the run, on the GPU machine
#     OUT=DIR bash bench/device/check.sh --cpu      # dry run on a CPU (tiny preset): the plumbing, not the GPU
#     OUT=DIR bash bench/device/check.sh --follow-up  # after the run, on the same machine: cudagraph at batch 4
#                                                   #   (at most 140 s; the run's install is reused)
#     OUT=DIR bash bench/device/check.sh --compile  # a run of its own: eager vs torch.compile
#     OUT=DIR bash bench/device/check.sh --serve    # a run of its own: smartedit-serve under load (needs
#                                                   #   `fetch_wheels.sh --serve`: the server, ~54 MB)
# --plan, --wheels and --cpu combine with a mode.
#
# At most 7 files are written under $OUT: <card>-7b.{json,md,png} (smartedit-bench), <card>-bim-kernels.{json,md},
# <card>-pytest.log, <card>-check.log. Only OUT is read from the environment; everything else is this script's own.
set -uo pipefail

MODE=gpu PLAN= DRY= WHEELS=
for arg in "$@"; do
    case "$arg" in
        --plan) PLAN=1 ;;
        --cpu) DRY=1 ;;
        --wheels) WHEELS=1 ;;
        --compile) MODE=compile ;;
        --serve) MODE=serve ;;
        --follow-up) MODE=follow-up ;;
        *) echo "check.sh: unknown option $arg" >&2
           echo "usage: bash bench/device/check.sh [--compile | --serve | --follow-up] [--plan | --cpu | --wheels]" >&2
           exit 2 ;;
    esac
done

# name|limit in seconds|what: the one list that --plan and the run read
if [ "$MODE" = serve ]; then
    STEPS=("install|90|install the wheels of .whl/, the project and the tritonserver unpacked from .whl/"
           "serve-bench|390|smartedit-bench --serve 7b: cudagraph fp16 on Triton, gRPC, concurrency 1 and 4, 256 px")
elif [ "$MODE" = compile ]; then
    STEPS=("install|40|install the wheels of .whl/ and the project"
           "bench-compile|440|smartedit-bench 7b: eager and compile at 256, 100 steps")
elif [ "$MODE" = follow-up ]; then
    STEPS=("install|10|the first run's install, kept in /tmp/smartedit-site (installed again only if it is gone)"
           "bench-batch|130|smartedit-bench 7b: cudagraph at batch 4, 256 px, 100 steps (throughput)")
else
    STEPS=("install|40|install the wheels of .whl/ and the project"
           "bench|300|smartedit-bench 7b: official, eager, cudagraph at 256 and 512, 100 steps; then eager and cudagraph at 256 with the loop's levers (a sampler at 25 steps, DeepCache every 3 steps, the sampler with a guidance interval and DeepCache)"
           "pytest|100|the cuda-marked tests and tests/kernels/ on 12 workers (88 kernel variants, ~1.6 s each)"
           "bench-kernels|40|smartedit-bench-kernels: 7b BIM attention shapes and the BIM forward, batch 1 and 8")
fi
PLAN_MAX=480

# the wheels installed beside the machine's own torch / triton / transformers (pip requirement specifiers), for
# fetch_wheels.sh and the preflight below
if [ "$MODE" = serve ]; then
    NEEDED=(diffusers==0.42.1 importlib-metadata==8.7.0 tritonclient==2.73.0 grpcio==1.85.3 python-rapidjson
            ml-dtypes==0.5.4)
else
    NEEDED=(diffusers==0.42.1 importlib-metadata==8.7.0 segment-anything==1.0 peft==0.21.2)
fi
[ -n "$WHEELS" ] && { echo "${NEEDED[*]}"; exit 0; }

limit_of() { local s; for s in "${STEPS[@]}"; do IFS='|' read -r n l _ <<<"$s"; [ "$n" = "$1" ] && echo "$l"; done; }
plan_total() { local s t=0; for s in "${STEPS[@]}"; do IFS='|' read -r _ l _ <<<"$s"; t=$((t + l)); done; echo $t; }

REPO=$(cd "$(dirname "$0")/../.." && pwd)

missing_wheels() {  # the NEEDED wheels (and the server archive in serve mode) absent from $REPO/.whl, one per line
    local spec name version
    for spec in "${NEEDED[@]}"; do
        name=${spec%%==*} version=${spec#*==}
        [ "$version" = "$spec" ] && version='*'
        compgen -G "$REPO/.whl/${name//-/_}-$version-*.whl" >/dev/null || echo "$spec"
    done
    [ "$MODE" = serve ] && ! [ -f "$REPO/.whl/tritonserver.tar.xz" ] && echo "tritonserver.tar.xz"
    return 0
}

if [ -n "$PLAN" ]; then
    for s in "${STEPS[@]}"; do
        IFS='|' read -r n l what <<<"$s"
        printf '%-15s %4d s  %s\n' "$n" "$l" "$what"
    done
    echo "budget $PLAN_MAX s"
    echo "total $(plan_total)"
    exit 0
fi

OUT=${OUT:?set OUT to the folder for results}
if [ -z "$DRY" ]; then  # before anything else: a run without its wheels would fail every step on `import diffusers`
    missing=$(missing_wheels)
    if [ -n "$missing" ]; then
        echo "check.sh: .whl/ lacks $(echo $missing): nothing was run (fill it with" \
             "bash bench/device/fetch_wheels.sh$([ "$MODE" = serve ] && echo ' --serve') where a package index is reachable)" >&2
        exit 2
    fi
fi
# LEVERS: settings of the denoising loop measured against the official loop on the same backend (smartedit-bench
# --settings; smartedit/bench/settings.py): the frontier's fast sampler, DeepCache every third step (the model's default
# branch 0), and a fast sampler with a guidance interval and DeepCache every second step
if [ -n "$DRY" ]; then
    DEV=cpu PRESET=tiny STEPS_N=2 RES=64 REPEATS=1 SITE=$(mktemp -d) WORKERS=2
    LEVERS="dpm-solver++:2 euler-ancestral:2:deepcache=2 dpm-solver++:2:guided=0-0.6:deepcache=2"
else
    DEV=cuda PRESET=7b STEPS_N=100 RES=256,512 REPEATS=3 SITE=/tmp/smartedit-site WORKERS=12
    LEVERS="dpm-solver++:25 euler-ancestral:100:deepcache=3 dpm-solver++:25:guided=0-0.6:deepcache=2"
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
    timeout --kill-after=5 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (cut at its limit)')"
    [ $rc = 0 ] || FAILED="$FAILED $name"
    return $rc
}
FAILED=

install() {
    if [ "$MODE" = follow-up ] && [ -f "$SITE/.installed" ]; then
        return 0
    fi
    # the NEEDED wheels (fetch_wheels.sh; built for Python 3.12): always there in a GPU run (the preflight), and used
    # by a dry run that finds them (rehearse.sh), so both install the same way
    if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$REPO"/.whl/*.whl || return 1
    fi
    if [ -z "$DRY" ] && [ -f "$REPO/.whl/tritonserver.tar.xz" ]; then  # fetch_wheels.sh --serve: the server
        tar -C "$SITE" -xJf "$REPO/.whl/tritonserver.tar.xz" || return 1
    fi
    # the project without its dependencies: the machine's torch / transformers / triton are used as they are
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" \
        "$REPO" >/dev/null && touch "$SITE/.installed"
}
export -f install
export REPO SITE DRY MODE

main() {
echo "== $CARD, mode $MODE${DRY:+ (CPU dry run)}; $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
step install bash -c install || { echo "installing the project failed: nothing else can run"; return 1; }
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH SMARTEDIT_TRITONSERVER=$SITE/tritonserver
cd /tmp  # not the repo root: the installed copy is what runs (its smartedit/ folder would shadow it)
python3 -c 'import torch, triton, transformers, diffusers, numpy; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__, "numpy", numpy.__version__)'

BENCH=(python3 -m smartedit.bench.cli --preset "$PRESET" --random-weights --device "$DEV" --steps "$STEPS_N"
       --repeats "$REPEATS" --out "$OUT")
if [ "$MODE" = serve ]; then
    if [ "$DEV" = cuda ] && ! [ -x "$SITE/tritonserver/bin/tritonserver" ]; then
        echo "serve-bench: skipped: no tritonserver (bench/device/fetch_wheels.sh --serve puts it in .whl/)"
        return 0
    fi
    [ "$DEV" = cpu ] && unset SMARTEDIT_TRITONSERVER  # the dry run uses the installed PyTriton
    # --no-serve-features: the features' second server (a stream twin: a second copy of 7b) does not fit the limit
    step serve-bench python3 -m smartedit.bench.cli --serve --preset "$PRESET" --random-weights --device "$DEV" \
        --backends "$([ "$DEV" = cuda ] && echo cudagraph || echo eager)" --steps "$STEPS_N" --resolution "${RES%%,*}" \
        --concurrency 1,4 --requests 8 --protocols grpc --max-batch 4 --no-serve-features --out "$OUT"
    [ -n "$DRY" ] && rm -rf "$SITE"
    ls -la "$OUT"
    return 0
fi
if [ "$MODE" = compile ]; then
    step bench-compile "${BENCH[@]}" --backends eager,compile --resolution 256
    ls -la "$OUT"
    return 0
fi
if [ "$MODE" = follow-up ]; then
    step bench-batch "${BENCH[@]}" --backends "$([ "$DEV" = cuda ] && echo cudagraph || echo eager)" \
        --resolution "${RES%%,*}" --batch 4
    ls -la "$OUT"
    return 0
fi
step bench "${BENCH[@]}" --backends official,eager,cudagraph --resolution "$RES" --settings "$LEVERS"
# one pytest for both sets: the workers compile the kernel's variants in parallel (pytest-xdist, where installed);
# -v logs each test as it ends, so a run cut at its limit still names what ran and what failed. On the CPU (dry
# run) tests/kernels/ is not collected (tests/conftest.py) and the cuda-marked tests skip with their reason.
XDIST=$(python3 -c 'import xdist' 2>/dev/null && echo "-n $WORKERS")
step pytest python3 -m pytest -v -rfEs -p no:cacheprovider $XDIST -m "cuda or kernels" --rootdir "$REPO" \
    "$REPO/tests" > "$OUT/$CARD-pytest.log" 2>&1
grep -E " (PASSED|FAILED|ERROR|SKIPPED)" "$OUT/$CARD-pytest.log" | awk '{print $NF}' | sort | uniq -c
tail -n 15 "$OUT/$CARD-pytest.log"
step bench-kernels python3 -m smartedit.bench.kernels --out "$OUT"
[ -n "$DRY" ] && rm -rf "$SITE"
ls -la "$OUT"
[ -z "$FAILED" ] || { echo "== failed steps:$FAILED"; return 1; }
}
main 2>&1 | tee -a "$LOG"
