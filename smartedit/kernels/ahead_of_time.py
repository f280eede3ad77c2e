"""Compile the Triton kernels for a GPU that is not here: what the interpreter cannot show, on a CPU-only machine.

    python -m smartedit.kernels.ahead_of_time --arch 80,90 [--json out.json]

The interpreter (TRITON_INTERPRET=1) checks the kernels' numerics but not whether they fit the card: shared memory per
block, registers, spills. Here each kernel goes through Triton's own launch path (`JITFunction.warmup`: the same
argument specialisation, launch parameters and compiler passes as a real launch on that GPU) with a stand-in driver
that names the target architecture, and ptxas's own report (registers, stack frame, spill bytes) is read from the
compile. Nothing runs. The shapes are every one the dispatcher sends to a kernel in a 7b or tiny edit.

Limits (CUDA C Programming Guide, compute capabilities table: maximum shared memory per block, opt-in):
sm_80 (A100) 163 KB = 166,912 B; sm_90 (H100/H200) 227 KB = 232,448 B.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from dataclasses import asdict, dataclass

import torch

SHARED_LIMIT = {80: 166_912, 90: 232_448}  # bytes per block, opt-in maximum
CARDS = {80: "A100", 90: "H100/H200"}


@dataclass
class Compiled:
    kernel: str
    arch: int
    shape: str  # "Nq x Nk x head dim"
    dtype: str
    dispatched: bool  # whether the "auto" dispatcher sends this dtype to the kernel (False: a forced-mode record)
    config: dict
    shared_bytes: int
    shared_limit: int
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    matmul: str  # what tl.dot became in the PTX: "wgmma" (Hopper warpgroup), "mma" (mma.sync) or "fma" (no tensor core)
    tf32: bool  # whether any product runs in TF32 (must not for fp32: the kernel stands in for fp32 PyTorch)


class _TargetDriver:
    """Stands in for Triton's CUDA driver: reports the target GPU, owns no device. The device number is the
    architecture, so each target gets its own entry in the JIT's per-device caches."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch, self.target = arch, GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self) -> bool:
        return True


@contextlib.contextmanager
def _compiling_for(arch: int):
    from triton.runtime.driver import driver

    saved = {k: os.environ.get(k) for k in ("TRITON_DUMP_PTXAS_LOG", "TRITON_ALWAYS_COMPILE")}
    os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")  # a cached kernel would print no report
    previous = driver._active  # None on a machine without a GPU (reset_active() would raise there)
    driver.set_active(_TargetDriver(arch))
    try:
        yield
    finally:
        driver._active = previous
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ptxas_report(text: str) -> tuple[int, int, int, int]:
    """ptxas -v output -> (registers, stack frame bytes, spill store bytes, spill load bytes)."""
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs or not spills:
        raise RuntimeError(f"no ptxas report in the compile output:\n{text[-2000:]}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2)), int(spills.group(3))


def bim_attention_shapes(presets: tuple[str, ...] = ("7b", "tiny")) -> list[tuple[int, int, int]]:
    """(Nq, Nk, head dim) of the BIM's attentions: token self-attention, token -> image, image -> token."""
    from smartedit.config import PRESETS

    shapes = []
    for name in presets:
        cfg = PRESETS[name]
        nq, nk, b = cfg.qformer.num_queries, cfg.vision.num_patches, cfg.bim
        self_d, cross_d = b.dim // b.num_heads, b.dim // b.attention_downsample_rate // b.num_heads
        shapes += [(nq, nq, self_d), (nq, nk, cross_d), (nk, nq, cross_d)]
    return sorted(set(shapes))


def compile_bim_attention(arch: int, nq: int, nk: int, d: int, dtype: torch.dtype, heads: int = 8) -> Compiled:
    """Compile the BIM attention kernel as the BIM launches it: q/k/v head-split views of [B, N, H*D] projections,
    the output in the merged-heads layout (bim_attention_op)."""
    from smartedit.kernels import bim_attention as ka

    def heads_of(n: int) -> torch.Tensor:  # [1, H, N, D] view of a [1, N, H*D] tensor (no memory is touched)
        return torch.empty(1, n, heads * d, dtype=dtype).view(1, n, heads, d).transpose(1, 2)

    q, k, v, o = heads_of(nq), heads_of(nk), heads_of(nk), heads_of(nq)
    log = io.StringIO()
    with _compiling_for(arch), contextlib.redirect_stdout(log):  # Triton prints ptxas's -v report
        kernel = ka._launch(ka._bim_attention_kernel, q, k, v, o, d**-0.5, warmup=True)
    regs, stack, st, ld = _ptxas_report(log.getvalue())
    ptx = kernel.asm["ptx"]
    matmul = "wgmma" if "wgmma" in ptx else "mma" if re.search(r"\bmma\.", ptx) else "fma"
    return Compiled("bim_attention", arch, f"{nq}x{nk}x{d}", str(dtype).removeprefix("torch."),
                    dtype in ka.KERNEL_DTYPES, asdict(ka.launch_config(nq, nk, d, dtype)), kernel.metadata.shared,
                    SHARED_LIMIT[arch], regs, stack, st, ld, matmul, "tf32" in ptx)


def compile_all(archs: tuple[int, ...] = (80, 90), dtypes=(torch.float16, torch.bfloat16, torch.float32)
                ) -> list[Compiled]:
    return [compile_bim_attention(arch, nq, nk, d, dt)
            for arch in archs for dt in dtypes for nq, nk, d in bim_attention_shapes()]


def to_markdown(rows: list[Compiled], triton_version: str) -> str:
    lines = [f"BIM attention kernel compiled ahead of time with triton {triton_version} (ptxas report per thread)", "",
             "| arch | shape Nq x Nk x D | dtype | dispatched | BLOCK_M/N/D | warps | stages | shared B | limit B | "
             "registers | spill st/ld B | matmul |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.config
        lines.append(f"| sm_{r.arch} | {r.shape} | {r.dtype} | {'yes' if r.dispatched else 'forced only'} | "
                     f"{c['block_m']}/{c['block_n']}/{c['block_d']} | {c['num_warps']} | {c['num_stages']} | "
                     f"{r.shared_bytes:,} | {r.shared_limit:,} | {r.registers} | {r.spill_stores}/{r.spill_loads} | "
                     f"{r.matmul}{' tf32' if r.tf32 else ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m smartedit.kernels.ahead_of_time", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="80,90", help="compute capabilities to compile for (80: A100, 90: H100/H200)")
    p.add_argument("--dtypes", default="float16,bfloat16,float32")
    p.add_argument("--json", help="write the records here")
    a = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    import triton

    archs = tuple(int(x) for x in a.arch.split(","))
    unknown = [x for x in archs if x not in SHARED_LIMIT]
    if unknown:
        p.error(f"unknown architecture(s) {unknown}; known: {sorted(SHARED_LIMIT)}")
    rows = compile_all(archs, tuple(getattr(torch, n) for n in a.dtypes.split(",")))
    print(to_markdown(rows, triton.__version__))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "records": [asdict(r) for r in rows]}, f, indent=2)
    if any(r.shared_bytes > r.shared_limit for r in rows if r.dispatched):
        sys.exit(1)


if __name__ == "__main__":
    main()
