"""How many kernel variants the GPU's kernel tests compile, and how long one takes here: the sizing of check.sh's
pytest step. Every call of tests/kernels/test_bim_attention.py's main grid is launched for sm_90 through Triton's own
launch path (smartedit.kernels.ahead_of_time: a stand-in driver, nothing runs), and Triton's JIT cache counts the
distinct variants it compiled (argument specialisation, block shapes, dtype).

    python bench/device/kernel_compiles.py        # prints one JSON line: variants, seconds, seconds per variant
"""

import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "kernels"))


def main() -> None:
    from test_bim_attention import LENGTHS, _qkv  # the grid the GPU runs

    from smartedit.kernels import ahead_of_time as aot
    from smartedit.kernels import bim_attention as ka

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="smartedit-kernel-compiles-")  # no earlier compiles
    t0 = time.perf_counter()
    with aot._compiling_for(90):
        os.environ.pop("TRITON_ALWAYS_COMPILE", None)  # the JIT's cache then holds one entry per distinct variant
        for dtype, b, d, nk, nq in itertools.product((torch.float32, torch.float16), (1, 3), (64, 128), LENGTHS,
                                                     LENGTHS):
            q, k, v = _qkv(b, 8, nq, nk, d, dtype)
            o = torch.empty_like(q)
            ka._launch(ka._bim_attention_kernel, q, k, v, o, d**-0.5, warmup=True)
        variants = sum(len(c[0]) for c in ka._bim_attention_kernel.device_caches.values())
    seconds = time.perf_counter() - t0
    print(json.dumps({"variants": variants, "seconds": round(seconds, 1),
                      "seconds_per_variant": round(seconds / max(variants, 1), 2), "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
