#!/usr/bin/env bash
# check.sh's GPU run rehearsed on a CPU machine with the versions of the CUDA 13 GPU image it is written for (Python
# 3.12, torch 2.11.0+cu130, triton 3.6.0, numpy 2.5.2, transformers 5.17.0, onnxruntime 1.30.0), so that an API that
# moved since, a numpy-2 behaviour or a triton-3.6 difference shows on the CPU, not on the GPU.
#
#     bash bench/device/rehearse.sh [RESULT.md]   # default bench/results/rehearsal-cpu-device-versions.md
#
# 1. a virtual environment with those versions (cached in ~/.cache/smartedit-rehearsal; ~5 GB, the first time
#    ~10 minutes: PyPI's torch 2.11 is the CUDA build, which runs on a CPU);
# 2. the wheels of .whl/ (fetch_wheels.sh), installed by check.sh as on the GPU;
# 3. `check.sh --cpu` in that environment: the run's steps on the tiny preset;
# 4. every test check.sh's pytest step runs (-m "cuda or kernels") collected there (the cuda-marked ones run in the
#    dry run and skip with their reason), and the kernel tests' variants compiled for sm_90 as the GPU compiles them, counted
#    and timed (bench/device/kernel_compiles.py);
# 5. a Markdown report of each step's exit status, time and the versions seen.
# Not a CI test: the environment is gigabytes and minutes; its last result is committed.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
RESULT=${1:-bench/results/rehearsal-cpu-device-versions.md}
CACHE=${SMARTEDIT_REHEARSAL_CACHE:-$HOME/.cache/smartedit-rehearsal}
PY=${SMARTEDIT_REHEARSAL_PYTHON:-$(command -v python3.12 || ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3 2>/dev/null | tail -1)}
# those versions, and what else the run imports that such an image holds (check.sh installs only .whl/)
DEVICE=(torch==2.11.0 triton==3.6.0 numpy==2.5.2 transformers==5.17.0 onnxruntime==1.30.0 onnx==1.23.1
        onnxscript==0.7.2 safetensors==0.8.0 tokenizers==0.23.2 sentencepiece==0.2.2 pillow matplotlib protobuf
        tqdm requests accelerate pytest pytest-xdist pytest-timeout)
[ -x "$PY" ] || { echo "rehearse.sh: no Python 3.12 here (set SMARTEDIT_REHEARSAL_PYTHON)" >&2; exit 2; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
REPORT=$WORK/report.md
row() { printf '| %s | %s | %s s | %s |\n' "$1" "$2" "$3" "$4" >>"$REPORT"; }
timed() {  # timed NAME LOG COMMAND...: run, then one report row
    local name=$1 log=$2 t0=$SECONDS; shift 2
    "$@" >"$log" 2>&1
    local rc=$?
    row "$name" "$([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc)")" "$((SECONDS - t0))" "$(tail -n 1 "$log" | tr '|' '/' | cut -c1-160)"
    return $rc
}
echo "| step | result | time | last line |" >"$REPORT"
echo "|---|---|---|---|" >>"$REPORT"

mkdir -p "$CACHE"
[ -x "$CACHE/venv/bin/python3" ] || "$PY" -m venv "$CACHE/venv"
# pip installs only what is missing or of another version: seconds once the cache holds them
timed "environment ($CACHE)" "$WORK/env.log" "$CACHE/venv/bin/pip" install -q "${DEVICE[@]}" \
    || { cat "$WORK/env.log" >&2; exit 1; }
VENV_BIN=$CACHE/venv/bin
VERSIONS=$("$VENV_BIN/python3" -c 'import sys, torch, triton, numpy, transformers, onnxruntime; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}, transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}")')

timed "fetch_wheels.sh" "$WORK/wheels.log" bash bench/device/fetch_wheels.sh
mkdir -p "$WORK/out"
# the dry run, with this environment's python3 first on PATH (check.sh calls python3) and the wheels installed as on
# the GPU (check.sh --cpu installs .whl/ when it is there)
timed "check.sh --cpu" "$WORK/check.log" env PATH="$VENV_BIN:$PATH" OUT="$WORK/out" bash bench/device/check.sh --cpu
for f in "$WORK"/out/*-check.log; do
    grep -E "^== .*: exit" "$f" | sed 's/^== /    /' >>"$WORK/steps.txt"
done
grep -qE "exit [1-9]" "$WORK/steps.txt" && row "check.sh --cpu steps" "FAILED" 0 "$(grep -E 'exit [1-9]' "$WORK/steps.txt" | tr '\n' ';')"
# what check.sh's pytest step runs: collected with these versions, the kernels run under the interpreter
SITE=$(mktemp -d -p "$WORK")
"$VENV_BIN/python3" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl >/dev/null 2>&1
"$VENV_BIN/python3" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . \
    >/dev/null 2>&1
# (TRITON_INTERPRET=1 only makes tests/conftest.py collect tests/kernels/, as a GPU does; nothing runs)
(cd "$WORK" && timed "pytest -m 'cuda or kernels' (collect)" "$WORK/collect.log" env PYTHONPATH="$SITE" TRITON_INTERPRET=1 \
    "$VENV_BIN/python3" -m pytest --collect-only -q -p no:cacheprovider -m "cuda or kernels" --rootdir "$REPO" \
    "$REPO/tests")
# the kernel tests as the GPU runs them: compiled (for sm_90, with triton 3.6, nothing runs), counting the variants
# and timing them: the sizing of check.sh's pytest step. (Under TRITON_INTERPRET=1 they cannot run with these
# versions: triton 3.6's interpreter calls int() on a 1-element array, which numpy 2.5 refuses; the GPU compiles.)
timed "tests/kernels' variants compiled for sm_90" "$WORK/kernels.log" env PYTHONPATH="$SITE" \
    "$VENV_BIN/python3" bench/device/kernel_compiles.py
KERNELS=$(grep -E '^\{"variants"' "$WORK/kernels.log" | tail -1)

{
    echo "# check.sh's GPU run rehearsed on the CPU with the GPU image's versions"
    echo
    echo "Run $(date -u +%F) by \`bash bench/device/rehearse.sh\` on this project's CPU machine ($(nproc) cores, no GPU):"
    echo "$VERSIONS. Nothing here is a GPU result: the run's steps ran on the tiny preset on the CPU."
    echo
    cat "$REPORT"
    echo
    echo "The kernel tests' variants, compiled for sm_90 here (\`bench/device/kernel_compiles.py\`): $KERNELS."
    echo "The GPU's 12 workers compile them in parallel (check.sh's pytest step). Not run here: the kernel tests under"
    echo "TRITON_INTERPRET=1, which cannot run with these versions (triton 3.6's interpreter calls int() on a 1-element"
    echo "array, triton/runtime/interpreter.py:888, which numpy 2.5 refuses); the GPU compiles the kernel instead, and CI"
    echo "runs the interpreter with triton 3.9 and numpy 1.26."
    echo
    echo "The dry run's steps (\`check.sh --cpu\`):"
    echo
    cat "$WORK/steps.txt" 2>/dev/null
    echo
    echo "Failures, if any (the last lines of each failing log):"
    echo
    for log in env check collect kernels; do
        if grep -qE "FAILED|Error|error:" "$WORK/$log.log" 2>/dev/null; then
            echo "    [$log]"
            grep -E "FAILED|Error|error:" "$WORK/$log.log" | head -n 20 | sed 's/^/    /'
        fi
    done
} >"$RESULT"
cat "$RESULT"
grep -q "FAILED" "$REPORT" && exit 1 || exit 0
