#!/usr/bin/env bash
# The set-up of a fresh machine: the README's install command, which CI runs too. Two parts:
#  - Debian's `prometheus` package (promtool and a Prometheus server), which tests/test_kubernetes.py runs against the
#    autoscaling rule of smartedit-k8s (apt-get, as root or through sudo; skipped where it is already installed);
#  - this package with its test extras, and the CPU build of torch 2.13.0 (see the README for other builds).
set -euo pipefail
cd "$(dirname "$0")"
if ! { command -v promtool && command -v prometheus; } >/dev/null; then
    if command -v apt-get >/dev/null; then
        SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
        $SUDO apt-get install -y -q prometheus || { $SUDO apt-get update -q && $SUDO apt-get install -y -q prometheus; } ||
            echo "install.sh: could not install Debian's prometheus package: tests/test_kubernetes.py skips its" \
                 "promtool and Prometheus checks (install it, then run the tests again)" >&2
    else
        echo "install.sh: no apt-get here: install Prometheus (promtool and prometheus on PATH) for" \
             "tests/test_kubernetes.py, which skips those checks without it" >&2
    fi
fi
pip install torch==2.13.0 -e ".[test]"
