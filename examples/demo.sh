#!/usr/bin/env bash
# The whole demo on a CPU, one command: export the trained tiny model (models/tiny-shapes) to ONNX and to
# AOTInductor, verify both against PyTorch, edit examples/shapes.png with every CPU backend, benchmark them side by
# side, and list where each output went. About 8 minutes on 2 cores.
#
#     bash examples/demo.sh [OUT]          # OUT defaults to demo/ (created; an existing export in it is reused)
#
# The model is the tiny architecture trained on 64 px pictures of coloured shapes (tools/train_tiny.py): it edits
# such pictures, nothing else.
set -euo pipefail
OUT=${1:-demo}
OUT=${OUT%/}  # demo/ and demo name the same folder
HERE="$(cd "$(dirname "$0")" && pwd -P)"
IMG="$HERE/shapes.png"
ARTS="$OUT/artifacts"
MODEL=(--model "$HERE/../models/tiny-shapes")
PROFILE=(--precision fp32 --max-batch 4 --min-res 64 --opt-res 64 --max-res 320 --max-prompt 400)  # fp32 on a CPU
                                                                    # (fp16 is emulated there); small profiles
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "1/5 export to ONNX, each graph checked in ONNX Runtime against PyTorch"
smartedit-export "${MODEL[@]}" --target onnx "${PROFILE[@]}" --out "$ARTS"
step "2/5 export to AOTInductor packages for this CPU"
smartedit-export "${MODEL[@]}" --target aoti "${PROFILE[@]}" --out "$ARTS"
step "3/5 verify every artifact: files against the manifest's sha256, outputs against PyTorch"
smartedit-verify "$ARTS" "${MODEL[@]}"
step "4/5 edit $IMG with every CPU backend (20 steps at 64 px)"
for backend in eager official onnxruntime aoti; do
    smartedit-edit "${MODEL[@]}" --backend "$backend" --artifacts "$ARTS" --image "$IMG" \
        --instruction "make the triangle purple" --resolution 64 --steps 20 --seed 0 --quiet --out "$OUT/edit-$backend.png"
done
step "5/5 benchmark the four backends side by side (10 steps at 64 px, 5 timed edits each)"
smartedit-bench "${MODEL[@]}" --backends eager,official,onnxruntime,aoti --artifacts "$ARTS" --steps 10 \
    --resolution 64 --out "$OUT/bench"

step "outputs"
echo "artifacts (ONNX, AOTInductor, manifest.json, verify.json): $ARTS"
for backend in eager official onnxruntime aoti; do echo "edit with $backend: $OUT/edit-$backend.png"; done
echo "benchmark (JSON, Markdown table, chart): $(ls "$OUT"/bench/*.md | tr '\n' ' ')"
