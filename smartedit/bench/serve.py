"""`smartedit-bench --serve`: the load test of smartedit-serve, on the real Triton Inference Server.

Starts the server on free loopback ports and sends a bounded number of requests at each concurrency, over HTTP and
gRPC (tritonclient, one client per sending thread). Per level: throughput, p50/p95/p99 latency (client side, send to
answer), and the average executed batch from Triton's own metrics (Δ nv_inference_count / Δ nv_inference_exec_count).
Then the same server without dynamic batching (max batch 1) at the highest concurrency: the gain from batching is the
ratio of the two throughputs, measured in the same run.

Every response is checked against the offline pipeline's result for the same request, run alone in this process:
the requests cycle through DISTINCT (seed, instruction, guidance) combinations, so each is computed offline once.
Batched and alone differ only by the batched kernels' float rounding (a batch of 3 runs other matmul blockings, and
prompts are padded to the batch's longest, masked), so pixels are compared with a tolerance of `tolerance` grey
levels of 255; the number of byte-identical answers is reported too.

Then (features=True) a server with the stream twin, Triton's response cache and two priority levels, on which
measure_features() reports: the streaming overhead (the same requests one at a time through `smartedit` and through
`smartedit_stream`, without and with previews), the latency of priority-1 requests alone, under a flood of
priority-2 requests, and under the same flood with no priority between them; and cache misses against hits (the
same requests sent twice at one concurrency: throughput and latency).
"""

from __future__ import annotations

import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from smartedit.config import dtype_named
from smartedit.errors import InputError
from smartedit.files import write_atomic, write_json
from smartedit.pipeline import SmartEditPipeline
from smartedit.serve.client import connect, edit, stream
from smartedit.weights import ModelSource

from .run import write_figure
from smartedit.serve.server import Features, read_metrics, running, settings_for
from smartedit.serve.settings import ServeSettings

PROTOCOLS = ("http", "grpc")
# (seed, instruction, guidance_scale, image_guidance_scale): two prompt lengths, two guidance pairs
DISTINCT = tuple((seed, ("make it blue", "replace the smaller cat with a rabbit wearing a red hat")[seed % 2],
                  (7.5, 5.0)[seed // 2 % 2], (1.5, 1.2)[seed // 2 % 2]) for seed in range(8))


def _percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "max": float(a.max())}


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png), formats=["PNG"]).convert("RGB"), dtype=np.int16)


def level(url: str, protocol: str, metrics, concurrency: int, n: int, image: bytes, steps: int, resolution: int,
          expected: list[bytes], timeout_s: float) -> dict[str, Any]:
    """One level of the load test against a running server: `n` requests (the DISTINCT ones in turn) from
    `concurrency` clients, each answer compared with `expected` (the offline pipeline's PNG of that request)."""
    local = threading.local()

    def one(i: int) -> tuple[float, int | None, bool, str | None]:
        if not hasattr(local, "client"):
            local.client = connect(protocol, url, timeout_s)
        seed, text, g, gi = DISTINCT[i % len(DISTINCT)]
        t0 = time.perf_counter()
        try:
            png, _ = edit(local.client, image, text, seed=seed, steps=steps, resolution=resolution,
                          guidance_scale=g, image_guidance_scale=gi)
        except Exception as e:  # tritonclient's InferenceServerException, a timeout: recorded, the level goes on
            return (time.perf_counter() - t0) * 1e3, None, False, f"{type(e).__name__}: {e}"
        ms = (time.perf_counter() - t0) * 1e3
        want = expected[i % len(DISTINCT)]
        diff = int(np.abs(_pixels(png) - _pixels(want)).max())
        return ms, diff, png == want, None

    before = metrics()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    after = metrics()
    execs = after.get("nv_inference_exec_count", 0) - before.get("nv_inference_exec_count", 0)
    count = after.get("nv_inference_count", 0) - before.get("nv_inference_count", 0)
    ok = [d for d in done if d[3] is None]
    return {"protocol": protocol, "concurrency": concurrency, "requests": n, "answered": len(ok),
            "throughput_rps": len(ok) / wall, "wall_s": wall, "latency_ms": _percentiles([d[0] for d in ok] or [0]),
            "avg_batch": count / execs if execs else None, "executions": int(execs),
            "max_pixel_diff": max((d[1] for d in ok), default=None), "byte_identical": sum(d[2] for d in ok),
            "errors": sorted({d[3] for d in done if d[3]})}


def run_load_test(source: ModelSource, backend: str = "eager",
                  artifacts: str | None = None, device: str = "cpu", dtype: str = "fp32",
                  concurrency: tuple[int, ...] = (1, 2, 4, 8), protocols: tuple[str, ...] = PROTOCOLS,
                  requests: int = 16, steps: int = 2, resolution: int = 256, max_batch: int = 8,
                  queue_delay_ms: float = 20.0, tolerance: int = 1, timeout_s: float = 600.0,
                  progress: Callable[[str], None] = print, checkpoint: Callable[[dict], None] | None = None,
                  features: bool = True, flood_clients: int = 4) -> dict:
    """The load test's result (see the module doc); `checkpoint(result)` after every level."""
    if not concurrency or min(concurrency) < 1 or requests < 1 or steps < 1 or max_batch < 1:
        raise InputError(f"concurrency ({list(concurrency)}), requests ({requests}), steps ({steps}) and max batch "
                         f"({max_batch}) must all be >= 1")
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise InputError(f"protocols must be from {list(PROTOCOLS)}, got {list(protocols)}")
    settings = settings_for(source, backend, artifacts, device, dtype, max_steps=max(steps, ServeSettings.max_steps),
                            max_batch=max_batch)
    rng = np.random.RandomState(0)
    buf = io.BytesIO()
    Image.fromarray((rng.rand(192, 256, 3) * 255).astype(np.uint8)).save(buf, format="PNG")
    image = buf.getvalue()

    progress(f"offline: {len(DISTINCT)} distinct requests, each alone ({backend}, {device}, {dtype}) ...")
    pipe = SmartEditPipeline.on_backend(backend, source, device, dtype_named(dtype), artifacts)
    expected = []
    for s, text, g, gi in DISTINCT:
        out = io.BytesIO()
        pipe(Image.open(io.BytesIO(image)), text, steps=steps, resolution=resolution, seed=s, guidance_scale=g,
             image_guidance_scale=gi).save(out, format="PNG")
        expected.append(out.getvalue())
    del pipe

    res: dict[str, Any] = {
        "kind": "serve", "device": f"cpu ({os.cpu_count()} cores)" if device == "cpu" else device,
        "model": source.preset or source.model.name, "source": str(source), "backend": backend, "dtype": dtype, "steps": steps, "resolution": resolution,
        "max_batch": max_batch, "queue_delay_ms": queue_delay_ms, "requests_per_level": requests,
        "tolerance_grey_levels": tolerance, "levels": [], "unbatched": None}

    def measure(server, batched: bool, levels) -> None:
        e = server.endpoints
        for protocol in protocols if batched else protocols[:1]:
            url = e.http_url if protocol == "http" else e.grpc_url
            edit(connect(protocol, url, timeout_s), image, "warm up", seed=0, steps=1, resolution=resolution)
            for c in levels:
                progress(f"{'batched' if batched else 'max batch 1'}: {protocol}, concurrency {c}, {requests} "
                         "requests ...")
                r = level(url, protocol, lambda: read_metrics(e), c, requests, image, steps, resolution, expected,
                           timeout_s)
                progress(f"    {r['throughput_rps']:.2f} req/s, p50 {r['latency_ms']['p50']:.0f} ms, p99 "
                         f"{r['latency_ms']['p99']:.0f} ms, avg batch {r['avg_batch'] or 0:.2f}, max diff "
                         f"{r['max_pixel_diff']} grey levels" + (f", errors {r['errors']}" if r["errors"] else ""))
                if batched:
                    res["levels"].append(r)
                else:
                    res["unbatched"] = r
                if checkpoint:
                    checkpoint(res)

    gpu = device.startswith("cuda")
    with running(settings, max_batch=max_batch, queue_delay_ms=queue_delay_ms, gpu=gpu) as server:
        measure(server, True, concurrency)
    with running(settings, max_batch=1, queue_delay_ms=0, gpu=gpu) as server:
        measure(server, False, (max(concurrency),))
    if features:
        progress("features: a server with smartedit_stream, a response cache and two priority levels ...")
        with running(settings, max_batch=max_batch, queue_delay_ms=queue_delay_ms, gpu=gpu,
                     features=Features(stream=True, cache_mb=FEATURES_CACHE_MB)) as server:
            res["features"] = measure_features(server.endpoints, image, steps, resolution, requests, max(concurrency),
                                               flood_clients, timeout_s, progress)
        if checkpoint:
            checkpoint(res)
    top = [r for r in res["levels"] if r["protocol"] == protocols[0] and r["concurrency"] == max(concurrency)]
    if top and res["unbatched"] and res["unbatched"]["throughput_rps"]:
        res["batching_gain"] = top[0]["throughput_rps"] / res["unbatched"]["throughput_rps"]
    checked = res["levels"] + [res["unbatched"]]
    res["all_answered"] = all(r["answered"] == r["requests"] for r in checked)
    res["all_match_offline"] = all(r["max_pixel_diff"] is not None and r["max_pixel_diff"] <= tolerance
                                   for r in checked)
    return res


FEATURES_CACHE_MB = 64
FEATURE_SEEDS = 1_000_000  # the features' requests draw seeds from here on: never a cache hit of the levels' requests


def _timed(call: Callable[[], Any]) -> tuple[float, str | None]:
    t0 = time.perf_counter()
    try:
        call()
    except Exception as e:  # tritonclient's InferenceServerException, a timeout: recorded, the run goes on
        return (time.perf_counter() - t0) * 1e3, f"{type(e).__name__}: {str(e)[:200]}"
    return (time.perf_counter() - t0) * 1e3, None


def _summary(done: list[tuple[float, str | None]], wall_s: float | None = None) -> dict[str, Any]:
    ok = [ms for ms, err in done if err is None]
    out = {"requests": len(done), "answered": len(ok), "latency_ms": _percentiles(ok or [0]),
           "errors": sorted({err for _, err in done if err})}
    if wall_s:
        out["throughput_rps"] = len(ok) / wall_s
    return out


def measure_features(e, image: bytes, steps: int, resolution: int, requests: int, concurrency: int,
                     flood_clients: int, timeout_s: float = 600.0,
                     progress: Callable[[str], None] = print) -> dict[str, Any]:
    """On a running server with the stream twin, a response cache and two priority levels (endpoints `e`): the
    streaming overhead, priority-1 latency under a flood of priority-2 requests, and cache hits against misses (see
    the module doc). Every request names a new seed, except the cache's repeats."""
    seeds = iter(range(FEATURE_SEEDS, FEATURE_SEEDS + 10**6))
    grpc_url = e.grpc_url
    out: dict[str, Any] = {"steps": steps, "resolution": resolution, "requests": requests,
                           "concurrency": concurrency, "flood_clients": flood_clients}

    def one_edit(priority: int = 0, seed: int | None = None, client=None) -> None:
        edit(client or connect("grpc", grpc_url, timeout_s), image, "make it blue", priority=priority,
             seed=next(seeds) if seed is None else seed, steps=steps, resolution=resolution)

    def one_stream(preview_every: int = 0) -> None:
        for _ in stream(connect("grpc", grpc_url, timeout_s), image, "make it blue", seed=next(seeds), steps=steps,
                        resolution=resolution, preview_every=preview_every):
            pass

    one_edit()  # warm: both models' first requests
    one_stream()
    progress(f"features: streaming overhead, {requests} requests one at a time ...")
    every = max(1, steps // 2)
    stream_rows = {"edit": [_timed(one_edit) for _ in range(requests)],
                   "stream": [_timed(one_stream) for _ in range(requests)],
                   f"stream, a preview every {every} steps": [_timed(lambda: one_stream(every))
                                                              for _ in range(requests)]}
    out["stream"] = {k: _summary(v) for k, v in stream_rows.items()}
    base = out["stream"]["edit"]["latency_ms"]["p50"]
    for k, v in out["stream"].items():
        v["p50_over_edit"] = v["latency_ms"]["p50"] / base if base else None

    def under_flood(high_priority: int, low_priority: int, flood: bool) -> dict[str, Any]:
        stop, lows = threading.Event(), []

        def flooder() -> None:
            client = connect("grpc", grpc_url, timeout_s)
            while not stop.is_set():
                lows.append(_timed(lambda: one_edit(low_priority, client=client)))

        threads = [threading.Thread(target=flooder) for _ in range(flood_clients if flood else 0)]
        for t in threads:
            t.start()
        time.sleep(1.0 if flood else 0.0)  # the flood queues before the first measured request
        client = connect("grpc", grpc_url, timeout_s)
        highs = [_timed(lambda: one_edit(high_priority, client=client)) for _ in range(requests)]
        stop.set()
        for t in threads:
            t.join(timeout=timeout_s)
        row = _summary(highs)
        row["flood"] = _summary(lows) if flood else None
        return row

    progress("features: priority-1 requests alone ...")
    alone = under_flood(1, 2, flood=False)
    progress(f"features: priority-1 requests under a flood of priority 2 from {flood_clients} clients ...")
    prioritised = under_flood(1, 2, flood=True)
    progress("features: the same flood, all at priority 1 (no priority between them) ...")
    unprioritised = under_flood(1, 1, flood=True)
    out["priority"] = {"alone": alone, "over a priority-2 flood": prioritised, "in a flood of its level":
                       unprioritised}

    progress(f"features: cache misses, then the same {requests} requests again (hits), concurrency {concurrency} ...")
    asked = [next(seeds) for _ in range(requests)]
    before = read_metrics(e)
    rows = {}
    for name in ("miss", "hit"):
        local = threading.local()

        def cached(seed: int) -> tuple[float, str | None]:
            if not hasattr(local, "client"):
                local.client = connect("grpc", grpc_url, timeout_s)
            return _timed(lambda: one_edit(seed=seed, client=local.client))

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            done = list(pool.map(cached, asked))
        rows[name] = _summary(done, time.perf_counter() - t0)
    after = read_metrics(e)
    rows["nv_cache_num_hits"] = int(after.get("nv_cache_num_hits_per_model", 0)
                                    - before.get("nv_cache_num_hits_per_model", 0))
    rows["nv_cache_num_misses"] = int(after.get("nv_cache_num_misses_per_model", 0)
                                      - before.get("nv_cache_num_misses_per_model", 0))
    miss, hit = rows["miss"], rows["hit"]
    rows["hit_throughput_over_miss"] = hit["throughput_rps"] / miss["throughput_rps"] if miss["throughput_rps"] else None
    out["cache"] = rows
    return out


def _features_markdown(f: dict) -> list[str]:
    lines = ["", f"## Streaming, priorities, response cache ({f['steps']} steps at {f['resolution']} px, gRPC)", "",
             "| path | requests | p50 ms | p99 ms | p50 vs the edit |", "|---|---|---|---|---|"]
    for name, r in f["stream"].items():
        lat = r["latency_ms"]
        lines.append(f"| {name} | {r['answered']}/{r['requests']} | {lat['p50']:.0f} | {lat['p99']:.0f} | "
                     f"{r['p50_over_edit']:.2f}x |")
    lines += ["", f"Priority-1 requests, one at a time, beside {f['flood_clients']} clients flooding the server:", "",
              "| setting | answered | p50 ms | p99 ms | flood answered | flood refused |", "|---|---|---|---|---|---|"]
    for name, r in f["priority"].items():
        lat, flood = r["latency_ms"], r["flood"]
        lines.append(f"| {name} | {r['answered']}/{r['requests']} | {lat['p50']:.0f} | {lat['p99']:.0f} | "
                     + (f"{flood['answered']} | {flood['requests'] - flood['answered']} |" if flood else "- | - |"))
    c = f["cache"]
    lines += ["", f"The same {f['requests']} requests twice at concurrency {f['concurrency']} (Triton's counters: "
              f"{c['nv_cache_num_misses']} misses, {c['nv_cache_num_hits']} hits):", "",
              "| | req/s | p50 ms | p99 ms |", "|---|---|---|---|"]
    for name in ("miss", "hit"):
        r = c[name]
        lines.append(f"| {name} | {r['throughput_rps']:.2f} | {r['latency_ms']['p50']:.1f} | "
                     f"{r['latency_ms']['p99']:.1f} |")
    if c["hit_throughput_over_miss"]:
        lines.append(f"\nHits: {c['hit_throughput_over_miss']:.0f}x the throughput of misses.")
    return lines


def to_markdown(res: dict) -> str:
    lines = [f"# smartedit-serve load test: {res['source']}, {res['backend']} {res['dtype']} on {res['device']}", "",
             f"Triton Inference Server (PyTriton's tritonserver build), one `smartedit` instance, dynamic batching up "
             f"to {res['max_batch']} with a {res['queue_delay_ms']:g} ms queue delay; {res['steps']} steps at "
             f"{res['resolution']} px; {res['requests_per_level']} requests per level, latency measured by the "
             "client (send to answer); average batch from Triton's metrics.", "",
             "| protocol | concurrency | req/s | p50 ms | p95 ms | p99 ms | avg batch | max diff vs offline | "
             "byte-identical |", "|---|---|---|---|---|---|---|---|---|"]
    rows = [(r, "") for r in res["levels"]] + ([(res["unbatched"], " (max batch 1)")] if res["unbatched"] else [])
    for r, tag in rows:
        lat = r["latency_ms"]
        lines.append(f"| {r['protocol']}{tag} | {r['concurrency']} | {r['throughput_rps']:.2f} | {lat['p50']:.0f} | "
                     f"{lat['p95']:.0f} | {lat['p99']:.0f} | {r['avg_batch'] or 0:.2f} | {r['max_pixel_diff']} | "
                     f"{r['byte_identical']}/{r['answered']} |")
    lines.append("")
    if "batching_gain" in res:
        lines.append(f"Dynamic batching gain at concurrency {res['unbatched']['concurrency']}: "
                     f"{res['batching_gain']:.2f}x throughput (same run, same server build).")
    lines.append(f"Every answer vs the offline pipeline alone: {'within' if res['all_match_offline'] else 'NOT within'}"
                 f" {res['tolerance_grey_levels']} grey level(s) of 255; all answered: {res['all_answered']}.")
    if res.get("features"):
        lines += _features_markdown(res["features"])
    return "\n".join(lines) + "\n"


def write_outputs(res: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    name = f"serve-{res['device'].split(' (')[0]}-{res['model']}-{res['backend']}".replace(" ", "-").replace("/", "-")
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    write_json(paths[0], res)
    write_atomic(paths[1], to_markdown(res))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (thr, lat) = plt.subplots(1, 2, figsize=(9, 3.5))
    for protocol in dict.fromkeys(r["protocol"] for r in res["levels"]):
        rs = [r for r in res["levels"] if r["protocol"] == protocol]
        cs = [r["concurrency"] for r in rs]
        thr.plot(cs, [r["throughput_rps"] for r in rs], marker="o", label=protocol)
        lat.errorbar(cs, [r["latency_ms"]["p50"] for r in rs],
                     yerr=[[0] * len(rs), [r["latency_ms"]["p99"] - r["latency_ms"]["p50"] for r in rs]],
                     marker="o", capsize=3, label=f"{protocol} p50 (bar to p99)")
    if res["unbatched"]:
        u = res["unbatched"]
        thr.scatter([u["concurrency"]], [u["throughput_rps"]], marker="x", color="k", label="max batch 1")
    thr.set_xlabel("concurrency")
    thr.set_ylabel("requests / s")
    lat.set_xlabel("concurrency")
    lat.set_ylabel("latency, ms")
    thr.legend(fontsize=7)
    lat.legend(fontsize=7)
    fig.suptitle(f"smartedit-serve: {res['model']}, {res['backend']} on {res['device']}, {res['steps']} steps at "
                 f"{res['resolution']} px", fontsize=9)
    write_figure(fig, paths[2])
    return paths
