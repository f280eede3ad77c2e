#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the pure-Python wheels the lent GPU machine lacks (its image has torch 2.11,
# transformers 5.17, triton 3.6, peft, onnx, matplotlib; no diffusers, no segment-anything). Run here, before
# `run` with carry [".whl"]; bench/device/check.sh installs them there. ~7 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
# diffusers needs importlib_metadata (8.7: no further deps); segment-anything is the BIM's test reference;
# peft at our pin (the image's version is unknown)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 importlib-metadata==8.7.0 segment-anything==1.0 peft==0.21.2
ls -la .whl
