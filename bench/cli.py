"""`smartedit-bench`: a thin argparse shell over smartedit.bench.run.run_bench."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .run import BACKENDS, run_bench, to_markdown, write_outputs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="smartedit-bench", description="Latency of every SmartEdit backend against eager "
                                "(and the official-style baseline), side by side, in one run on one device.",
                                epilog="Example (GPU): smartedit-bench --preset 7b --random-weights --device cuda "
                                       "--backends official,eager,cudagraph --resolution 256,512 --out bench/results")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a converted SmartEdit folder")
    src.add_argument("--preset", choices=["tiny", "7b", "13b"], help="random weights of this preset")
    p.add_argument("--random-weights", action="store_true", help="required with --preset (latency does not depend "
                   "on weight values)")
    p.add_argument("--backends", default="official,eager", help=f"comma-separated, from {','.join(BACKENDS)}")
    p.add_argument("--resolution", default="256", help="comma-separated image sides, e.g. 256,512")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed edits per backend and resolution")
    p.add_argument("--warmup", type=int, default=1, help="untimed-in-the-stats edits first (reported separately)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default="fp16")
    p.add_argument("--artifacts", help="smartedit-export output folder for onnxruntime / trt / trt-rtx")
    p.add_argument("--out", default="bench/results", help="folder for <device>-<model>.{json,md,png}")
    a = p.parse_args(argv)
    if a.preset and not a.random_weights:
        p.error("--preset builds random weights: add --random-weights")
    logging.basicConfig(level=logging.ERROR)
    try:
        res = run_bench(a.model, a.preset, backends=tuple(b.strip() for b in a.backends.split(",") if b.strip()),
                        resolutions=tuple(int(r) for r in a.resolution.split(",")), steps=a.steps, batch=a.batch,
                        repeats=a.repeats, warmup=a.warmup, device=a.device, dtype=a.dtype, artifacts=a.artifacts,
                        progress=lambda m: print(m, flush=True),
                        checkpoint=lambda r: write_outputs(r, Path(a.out)))  # partial results survive a kill
    except ValueError as e:
        print(f"smartedit-bench: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    paths = write_outputs(res, Path(a.out))
    print(to_markdown(res))
    print("wrote " + ", ".join(str(x) for x in paths))


if __name__ == "__main__":
    main()
