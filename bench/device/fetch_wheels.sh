#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the pure-Python wheels for Python 3.12 that bench/device/check.sh installs beside a
# GPU machine's own torch, transformers, triton and onnx, as `check.sh --wheels` lists them (diffusers,
# segment-anything, peft, ...). Needs a package index; the GPU machine needs none: .whl/ travels with the repository
# and check.sh installs from it. ~7 MB.
#
# bash bench/device/fetch_wheels.sh --serve   also the load test's server and clients (for check.sh --serve; ~57 MB):
#     tritonclient with its gRPC deps, and the tritonserver of PyTriton's wheel unpacked to what one Python 3.12
#     needs (binary, Python backend and its 3.12 stub, libraries), xz-packed
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
GET=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64)
# the list is check.sh's (one place: its preflight refuses a run without them): diffusers needs importlib_metadata
# (8.7: no further deps); segment-anything is the BIM's test reference; peft at the project's pin, whichever the
# machine has
if [ "${1:-}" = --serve ]; then
    "${GET[@]}" -d .whl $(bash bench/device/check.sh --serve --wheels)
    tmp=$(mktemp -d)
    "${GET[@]}" -d "$tmp" nvidia-pytriton==0.7.0
    (cd "$tmp" && python3 -m zipfile -e nvidia_pytriton-*.whl wheel)
    srv="$tmp/wheel/pytriton/tritonserver"
    mkdir -p "$tmp/tritonserver/python_backend_stubs"
    cp -r "$srv/bin" "$srv/backends" "$tmp/tritonserver/"
    cp -r "$srv/python_backend_stubs/3.12" "$tmp/tritonserver/python_backend_stubs/"
    cp -r "$tmp/wheel/nvidia_pytriton.libs" "$tmp/tritonserver/lib"
    tar -C "$tmp" -cf - tritonserver | xz -T0 -6 > .whl/tritonserver.tar.xz
    rm -rf "$tmp"
else
    "${GET[@]}" -d .whl $(bash bench/device/check.sh --wheels)
fi
ls -la .whl
