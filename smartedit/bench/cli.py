"""`smartedit-bench`: a thin argparse shell over smartedit.bench.run.run_bench."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from smartedit.arguments import (
    add_denoise_levers,
    add_model_source,
    counts,
    deepcache,
    guidance_schedule,
    model_source,
    names,
    non_negative,
    positive,
    resolutions,
)
from smartedit.config import DEFAULT_STEPS, RUN_PRECISIONS, check_device, dtype_named
from smartedit.engines.registry import BACKENDS
from smartedit.errors import InputError, run_command
from smartedit.files import check_writable_parent

from .run import run_bench, to_markdown, write_outputs
from .settings import FRONTIER_SETTINGS, Setting, parse_settings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="smartedit-bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Latency of every SmartEdit backend against eager "
                                "(and the official-style baseline), side by side, in one run on one device.",
                                epilog="Example (GPU): smartedit-bench --preset 7b --random-weights --device cuda "
                                       "--backends official,eager,cudagraph --resolution 256,512 --out bench/results")
    add_model_source(p)
    p.add_argument("--backends", type=names, default="official,eager",
                   help=f"comma-separated, from {','.join(BACKENDS)}")
    p.add_argument("--resolution", type=resolutions, default=(256,), help="comma-separated image sides, e.g. 256,512")
    p.add_argument("--steps", type=positive, default=DEFAULT_STEPS, help="steps of every row (with --sampler and the "
                   "guidance levers: the first setting)")
    p.add_argument("--batch", type=positive, default=1)
    p.add_argument("--repeats", type=positive, default=5, help="timed edits per backend and resolution (the report "
                   "gives their spread, and warns above 20%%)")
    p.add_argument("--warmup", type=non_negative, default=1, help="untimed-in-the-stats edits first (reported separately)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=sorted(RUN_PRECISIONS), default=None,
                   help="the precision the graphs run in; default: fp16 on a GPU, fp32 on the CPU (where fp16 is "
                        "emulated and slow)")
    p.add_argument("--artifacts", help="smartedit-export output folder, for the backends that run exported graphs: "
                   + ", ".join(b.name for b in BACKENDS.values() if b.target))
    p.add_argument("--out", default="bench/results", help="folder for <device>-<model>.{json,md,png}")
    add_denoise_levers(p)
    p.add_argument("--settings", help="further settings of the denoising loop, each a row per backend at the first "
                   "--resolution (not for official): SAMPLER:STEPS[:guided=START-END][:text-only=START-END] separated "
                   "by spaces, e.g. 'dpm-solver++:20 euler-ancestral:100:guided=0-0.6'")
    f = p.add_argument_group("the quality frontier of the loop's levers (--frontier)")
    f.add_argument("--frontier", action="store_true", help="instead: edit a fixed set with the official loop and "
                   "each setting (--settings, default: every sampler at 10-50 steps, each guidance lever and some "
                   "combinations) on the first of --backends other than official (default: eager), at the first "
                   "resolution; report UNet evaluations, FLOPs, time ratios and PSNR/SSIM against the default's "
                   "images and the ground truth; writes frontier-<model>.{json,md,png}")
    f.add_argument("--edits", help="the fixed set: a JSON list of {\"image\": FILE, \"instruction\": TEXT, "
                   "\"target\": FILE (optional ground truth)}, paths relative to the JSON file (default: the bench's "
                   "random image with one instruction, no ground truth)")
    s = p.add_argument_group("load test of smartedit-serve (--serve)")
    s.add_argument("--serve", action="store_true", help="instead: start smartedit-serve (Triton Inference Server) "
                   "on free loopback ports with one backend (--backends) at one --resolution, and load it over HTTP "
                   "and gRPC; writes serve-<device>-<model>-<backend>.{json,md,png}")
    s.add_argument("--concurrency", type=counts, default=(1, 2, 4, 8), help="requests in flight, per level")
    s.add_argument("--requests", type=positive, default=16, help="requests per level (bounded)")
    s.add_argument("--max-batch", type=positive, default=8, help="the server's dynamic batch limit")
    s.add_argument("--max-queue-delay-ms", type=float, default=20.0, help="the server's batching delay")
    s.add_argument("--protocols", type=names, default="http,grpc", help="comma-separated: http, grpc")
    s.add_argument("--serve-features", action=argparse.BooleanOptionalAction, default=True, help="then a server with "
                   "the stream model, a response cache and two priority levels: streaming overhead, priority-1 "
                   "latency under a priority-2 flood, cache hits against misses (default on)")
    s.add_argument("--flood-clients", type=positive, default=4, help="clients flooding the server with priority-2 "
                   "requests (default 4)")
    a = p.parse_args(argv)
    source = model_source(p, a)
    logging.basicConfig(level=logging.ERROR)

    def dtype() -> str:
        return a.precision or ("fp32" if a.device == "cpu" else "fp16")

    def serve_body() -> None:
        from smartedit.serve.repository import check_queue_delay_ms

        from . import serve

        backends = a.backends
        if len(backends) != 1 or len(a.resolution) != 1:
            raise InputError(f"--serve load-tests one backend at one resolution, got --backends {','.join(backends)} "
                             f"and --resolution {','.join(map(str, a.resolution))}: run it once per pair")
        check_queue_delay_ms(a.max_queue_delay_ms)
        backend = backends[0]
        res = serve.run_load_test(source, backend=backend, artifacts=a.artifacts, device=a.device,
                                  dtype=dtype(), concurrency=a.concurrency, protocols=a.protocols,
                                  requests=a.requests, steps=a.steps, resolution=a.resolution[0],
                                  max_batch=a.max_batch, queue_delay_ms=a.max_queue_delay_ms,
                                  features=a.serve_features, flood_clients=a.flood_clients,
                                  progress=lambda m: print(m, flush=True),
                                  checkpoint=lambda r: serve.write_json(Path(a.out) / "serve-partial.json", r))
        paths = serve.write_outputs(res, Path(a.out))
        (Path(a.out) / "serve-partial.json").unlink(missing_ok=True)
        print(serve.to_markdown(res))
        print("wrote " + ", ".join(str(x) for x in paths))
        if not (res["all_answered"] and res["all_match_offline"]):
            raise SystemExit(1)

    def first_setting() -> Setting:
        return Setting(a.sampler or source.sampler(), a.steps, guidance_schedule(a) or Setting().guidance,
                       deepcache(a))

    def frontier_body() -> None:
        from smartedit.pipeline import SmartEditPipeline

        from . import frontier

        backends = [b for b in a.backends if b != "official"] or ["official"]
        settings = parse_settings(a.settings) if a.settings else FRONTIER_SETTINGS
        edits = frontier.read_edits(a.edits) if a.edits else frontier.default_edits()
        pipe = SmartEditPipeline.on_backend(backends[0], source, a.device, dtype_named(dtype()), a.artifacts)
        res = frontier.run_frontier(pipe, edits, settings, resolution=a.resolution[0], seed=a.seed,
                                    repeats=a.repeats, model=a.model or f"{a.preset} (random weights)",
                                    progress=lambda m: print(m, flush=True),
                                    checkpoint=lambda r: frontier.write_outputs(r, Path(a.out)))
        paths = frontier.write_outputs(res, Path(a.out))
        print(frontier.to_markdown(res))
        print("wrote " + ", ".join(str(x) for x in paths))

    def body() -> None:
        out = Path(a.out)
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} is a file; give a folder for the results")
        check_writable_parent(out / "results.json", "--out")
        check_device(a.device)
        unknown = [b for b in a.backends if b not in BACKENDS]
        if unknown:
            raise InputError(f"--backends: unknown backend(s) {unknown}; choose from {','.join(BACKENDS)}")
        if a.serve:
            return serve_body()
        if a.frontier:
            return frontier_body()
        extra = parse_settings(a.settings) if a.settings else ()
        res = run_bench(source, backends=a.backends, resolutions=a.resolution, steps=a.steps, batch=a.batch,
                        repeats=a.repeats, warmup=a.warmup, device=a.device, dtype=dtype(), artifacts=a.artifacts,
                        progress=lambda m: print(m, flush=True),
                        checkpoint=lambda r: write_outputs(r, Path(a.out)),  # partial results survive a kill
                        settings=(first_setting(),) + tuple(x for x in extra if x != first_setting()))
        paths = write_outputs(res, Path(a.out))
        print(to_markdown(res))
        print("wrote " + ", ".join(str(x) for x in paths))

    run_command("smartedit-bench", body)


if __name__ == "__main__":
    main()
