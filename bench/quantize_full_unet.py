"""The INT8 export at the full UNet size on the CPU: a quantized graph over protobuf's 2 GB (external data), timed.

    python bench/quantize_full_unet.py --work /tmp/full-unet --results bench/results/cpu-quantize-full-unet.md

1. a model folder with random weights: the tiny preset's vision tower, LLM, BIM and VAE, and the 7b preset's UNet
   (SD-1.5: blocks 320/640/1280/1280, cross-attention 768; the QFormer 768 wide, as the UNet's condition needs) with
   `--layers-per-block` resnets a block (default 3, SD-1.5 has 2), so that its fp16 graph passes 2 GiB: 2.28 GB
   against the 7b UNet's 1.72 GB, which protobuf would still hold in one file;
2. `smartedit-export --precision int8` on it with the smallest calibration (1 edit x 1 step, 1 report edit), one
   static 256 px profile at batch 1 and --no-verify (the parity check would hold the fp32 model as well; the quality
   report still runs, fp16 graph against quantized), the resident memory of the export and of the quantizer's
   process sampled every 0.5 s;
3. the results file: the command, the machine, the time to each phase (the export's progress lines), the peak
   memory, the files written and their sizes, the quality report.

Takes 10-30 minutes and 20 GB of disk on a 2-core CPU, and Model Optimizer's process holds about 12x the fp16 graph
(20 GB at the 7b UNet's size): on a 24 GB machine the OOM killer stops it, which the results file then records. Not
part of the test suite (tests/test_quantize.py forces external data on the tiny graph instead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


def write_model(folder: Path, layers_per_block: int) -> dict:
    """The model folder (fp16 random weights) -> its config as a dict."""
    from dataclasses import replace

    from smartedit.config import PRESETS, QFormerConfig, UNetConfig
    from smartedit.model import build_stages
    from smartedit.pipeline import SmartEditPipeline
    from smartedit.tokenizer import build_offline_tokenizer

    tiny = PRESETS["tiny"]
    cfg = replace(tiny, name="tiny-llm-full-unet", unet=UNetConfig(layers_per_block=layers_per_block),
                  qformer=QFormerConfig(hidden_size=768, num_layers=2, num_heads=12, intermediate_size=256))
    stages = build_stages(cfg, "cpu", torch.float16, init=True, seed=0)
    null = torch.randn(1, cfg.qformer.num_queries, cfg.qformer.hidden_size,
                       generator=torch.Generator().manual_seed(0)).half()
    pipe = SmartEditPipeline(cfg, build_offline_tokenizer(), stages, null, random_weights=True)
    pipe.save_pretrained(folder, source={"random": "bench/quantize_full_unet.py"})
    return cfg.to_dict()


def tree_rss(pid: int) -> dict[int, int]:
    """Resident bytes of `pid` and its descendants (Linux /proc)."""
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                out[p] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return out


def run_export(cmd: list[str], log: Path) -> dict:
    """Run the export, each output line into `log` with the seconds since the start and the peak resident memory of
    the export's process tree since the line before; -> wall time, exit status, peak memory."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"tree": 0, "export": 0, "quantizer": 0, "since_line": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = tree_rss(proc.pid)
            peak["tree"] = max(peak["tree"], sum(rss.values()))
            peak["since_line"] = max(peak["since_line"], sum(rss.values()))
            peak["export"] = max(peak["export"], rss.get(proc.pid, 0))
            peak["quantizer"] = max([peak["quantizer"]] + [v for p, v in rss.items() if p != proc.pid])
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    with open(log, "w") as f:
        for line in proc.stdout:
            f.write(f"{time.perf_counter() - t0:7.1f} s {peak['since_line'] / 2**30:5.1f} GiB  {line}")
            peak["since_line"] = 0
            f.flush()
            print(line, end="", flush=True)
    proc.wait()
    done.set()
    return {"wall_s": time.perf_counter() - t0, "returncode": proc.returncode, "peak_bytes": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="a folder for the model and the export (about 20 GB)")
    p.add_argument("--results", default="bench/results/cpu-quantize-full-unet.md")
    p.add_argument("--layers-per-block", type=int, default=3)
    p.add_argument("--external-data-gib", type=float, default=None,
                   help="write the fp16 graphs with external data from this size on (the ONNX export's rule is 90%% "
                        "of 2 GiB): external data at a size protobuf would still hold")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model, out = work / "model", work / "export"
    t0 = time.perf_counter()
    if not (model / "config.json").exists():
        write_model(model, a.layers_per_block)
    write_s = time.perf_counter() - t0
    flags = ["--model", str(model), "--precision", "int8", "--calibration-edits", "1", "--calibration-steps", "1",
             "--report-edits", "1", "--min-res", "256", "--opt-res", "256", "--max-res", "256", "--max-batch", "1",
             "--no-verify", "--out", str(out)]
    rule = "" if a.external_data_gib is None else \
        f"import smartedit.export.onnx as o; o.TWO_GB = int({a.external_data_gib} * 2**30 / 0.9); "
    cmd = [sys.executable, "-c", f"{rule}from smartedit.export.cli import main; main({flags!r})"]
    run = run_export(cmd, work / "export.log")
    files = {str(f.relative_to(out)): f.stat().st_size for f in sorted((out / "onnx").iterdir())} \
        if (out / "onnx").is_dir() else {}
    report = {}
    if (out / "report.json").exists():
        report = json.loads((out / "report.json").read_text()).get("onnx", {}).get("unet", {}).get("quantization", {})
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    entry = manifest.get("artifacts", {}).get("onnx", {}).get("unet", {})
    lines = [
        "# INT8 export at the full UNet size on the CPU (external data)",
        "",
        f"Made by `python bench/quantize_full_unet.py --work {a.work} --results {a.results} --layers-per-block "
        f"{a.layers_per_block}" + (f" --external-data-gib {a.external_data_gib:g}" if a.external_data_gib else "")
        + f"` on a CPU machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"Python {platform.python_version()}, torch {torch.__version__}, shared with other work.",
        "",
        f"The model: the tiny preset with the 7b UNet's dimensions and {a.layers_per_block} resnets a block "
        "(random weights, fp16). The export: "
        f"`{' '.join(['smartedit-export'] + flags)}`"
        + (f", the fp16 graphs with external data from {a.external_data_gib:g} GiB on." if a.external_data_gib
           else "."),
        "",
        f"- exit status {run['returncode']}, {run['wall_s']:.0f} s (writing the model folder before it: "
        f"{write_s:.0f} s)",
        f"- peak resident memory: {run['peak_bytes']['tree'] / 2**30:.1f} GiB for the export and its quantizer "
        f"together (export {run['peak_bytes']['export'] / 2**30:.1f} GiB, Model Optimizer's process "
        f"{run['peak_bytes']['quantizer'] / 2**30:.1f} GiB)",
        f"- the unet entry: verified {entry.get('verified')}, files "
        + ", ".join(f"`{k}` ({v['bytes'] / 1e9:.2f} GB)" for k, v in entry.get("files", {}).items()),
        f"- quality report (1 edit, 1 step, 256 px): worst PSNR {report.get('worst_psnr_db')} dB, SSIM "
        f"{report.get('worst_ssim')}, eps error {report.get('eps_rel_error_max')}",
        "",
        "Files in OUT/onnx:",
        "",
        *[f"    {k:32s} {v / 1e9:8.3f} GB" for k, v in files.items()],
        "",
        "The export's progress (seconds since the start, the peak resident memory of the export and its quantizer "
        "since the line before, then the export's own line):",
        "",
        *["    " + line.rstrip() for line in (work / "export.log").read_text().splitlines()
          if not any(noise in line for noise in ("torchvision", "FutureWarning", "return cls", "W:onnxruntime"))],
        "",
    ]
    Path(a.results).write_text("\n".join(lines))
    print(f"wrote {a.results}")
    sys.exit(run["returncode"])


if __name__ == "__main__":
    main()
