"""Kernel benchmark: the 7b BIM's attention shapes and the whole BIM forward, Triton kernel vs PyTorch's
scaled_dot_product_attention vs eager math, medians from triton.testing.do_bench, on a CUDA GPU.

    smartedit-bench-kernels --out bench/results/      (writes <card>-bim-kernels.json and .md)

Each row carries the FLOP and byte counts and the fraction of the card's peak measured in the same run (a large
fp16 matmul for FLOP/s, a large copy for bytes/s), so the distance to the hardware limit shows.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# (name, Nq, Nk, head dim) of one 7b BIM forward (dim 1024, 8 heads; cross-attention at dim 512)
SHAPES = [("token self-attn", 77, 77, 128), ("token->image", 77, 256, 64), ("image->token", 256, 77, 64)]
HEADS = 8


def measured_peaks(do_bench) -> dict[str, float]:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    ms = do_bench(lambda: a @ a)
    x = torch.empty(2**28, device="cuda", dtype=torch.uint8)
    ms_copy = do_bench(lambda: x.clone())
    return {"fp16_matmul_tflops": 2 * 8192**3 / ms / 1e9, "copy_GBps": 2 * x.numel() / ms_copy / 1e6}


def run(batches=(1, 8)) -> dict:
    import functools

    import triton.testing

    do_bench = functools.partial(triton.testing.do_bench, return_mode="median")  # its default is the mean

    from smartedit.bim import BIM
    from smartedit.config import PRESETS
    from smartedit.kernels.bim_attention import attention_ref, attention_triton

    peaks = measured_peaks(do_bench)
    rows = []
    for b in batches:
        for name, nq, nk, d in SHAPES:
            q, k, v = (torch.randn(b, HEADS, n, d, device="cuda", dtype=torch.float16) for n in (nq, nk, nk))
            scale = d**-0.5
            flops = 4 * b * HEADS * nq * nk * d
            nbytes = 2 * b * HEADS * (2 * nq + 2 * nk) * d
            times = {"triton": do_bench(lambda: attention_triton(q, k, v, scale)),
                     "sdpa": do_bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)),
                     "eager": do_bench(lambda: attention_ref(q, k, v, scale))}
            t = times["triton"]
            rows.append({"what": name, "batch": b, "Nq": nq, "Nk": nk, "head_dim": d, "flop": flops, "bytes": nbytes,
                         **{f"{k}_ms": v for k, v in times.items()},
                         "triton_tflops": flops / t / 1e9, "triton_GBps": nbytes / t / 1e6,
                         "frac_peak_flops": flops / t / 1e9 / peaks["fp16_matmul_tflops"],
                         "frac_peak_bytes": nbytes / t / 1e6 / peaks["copy_GBps"],
                         "speedup_vs_eager": times["eager"] / t, "speedup_vs_sdpa": times["sdpa"] / t})
        bim = BIM(PRESETS["7b"].bim, 768, 320).cuda().half().eval()
        qq = torch.randn(b, 77, 768, device="cuda", dtype=torch.float16)
        feats = torch.randn(b, 256, 1024, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            t_k = do_bench(lambda: bim.set_kernels("auto")(qq, feats))
            t_e = do_bench(lambda: bim.set_kernels("off")(qq, feats))
        rows.append({"what": "whole BIM forward", "batch": b, "triton_ms": t_k, "eager_ms": t_e,
                     "speedup_vs_eager": t_e / t_k})
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "python": platform.python_version(),
            "peaks": peaks, "rows": rows, "command": sys.argv}


def to_markdown(res: dict) -> str:
    lines = [f"# BIM attention kernels on {res['device']}", "",
             f"torch {res['torch']}, triton {res['triton']}; measured peaks: "
             f"{res['peaks']['fp16_matmul_tflops']:.0f} TFLOP/s fp16 matmul, {res['peaks']['copy_GBps']:.0f} GB/s copy",
             "", "| what | batch | triton ms | sdpa ms | eager ms | x eager | x sdpa | % peak FLOP/s | % peak bytes/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        f = lambda k, fmt="{:.4f}": fmt.format(r[k]) if k in r else "-"  # noqa: E731
        lines.append(f"| {r['what']} | {r['batch']} | {f('triton_ms')} | {f('sdpa_ms')} | {f('eager_ms')} | "
                     f"{f('speedup_vs_eager', '{:.2f}')} | {f('speedup_vs_sdpa', '{:.2f}')} | "
                     f"{f('frac_peak_flops', '{:.1%}')} | {f('frac_peak_bytes', '{:.1%}')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="smartedit-bench-kernels", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results", help="folder for <card>-bim-kernels.json / .md")
    p.add_argument("--batches", default="1,8")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("smartedit-bench-kernels: skipped: no CUDA GPU here (the kernels' speed is only measurable on a GPU)")
        return
    res = run(tuple(int(x) for x in a.batches.split(",")))
    card = res["device"].replace(" ", "-").replace("/", "-")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{card}-bim-kernels.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{card}-bim-kernels.md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
