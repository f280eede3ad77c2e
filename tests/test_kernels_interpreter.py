"""Runs tests/kernels/ on the CPU under TRITON_INTERPRET=1 (the variable must be set before triton compiles the
kernel, i.e. in a fresh process). On a GPU machine tests/kernels/ runs directly instead."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, tests/kernels/ runs on the device directly")
def test_kernels_under_the_triton_interpreter():
    tests = Path(__file__).parent / "kernels"
    # a plain run in one process (-n 0): this test already holds one of the suite's xdist workers
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")} | {"TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", str(tests)],
                       capture_output=True, text=True, timeout=1800, env=env, cwd=Path(__file__).parent.parent)
    tail = "\n".join(r.stdout.splitlines()[-15:])
    assert r.returncode == 0, f"kernel tests failed under TRITON_INTERPRET=1:\n{tail}\n{r.stderr[-2000:]}"
    assert " passed" in tail and "failed" not in tail, tail
