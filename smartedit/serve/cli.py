"""`smartedit-serve`: the edit as a service on NVIDIA Triton Inference Server (KServe v2 over HTTP and gRPC)."""

from __future__ import annotations

import argparse
import os

from smartedit.arguments import add_model_source, model_source, positive
from smartedit.config import RUN_PRECISIONS, check_device
from smartedit.engines import registry
from smartedit.errors import run_command

from .repository import LOW_PRIORITY_WAIT_S, MAX_QUEUE, PRIORITY_LEVELS, STREAM_MODEL, check_queue_delay_ms
from .server import Endpoints, Features, TritonServer, serve, settings_for, shares_dev_shm
from .settings import MAX_VARIANTS, WARM_UPS, ServeSettings

EXAMPLE = """example:
  smartedit-serve --preset tiny --random-weights            # eager PyTorch on the CPU, http :8000 grpc :8001
  curl -s localhost:8000/v2/health/ready -o /dev/null -w '%{http_code}\\n'
  smartedit-serve --model smartedit-7b/ --backend cudagraph --device cuda --precision fp16 --instances 1
  smartedit-serve --model smartedit-7b/ --backend onnxruntime --artifacts out/
  smartedit-serve --preset tiny --random-weights --stream --cache-mb 512   # + smartedit_stream, a response cache
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="smartedit-serve", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLE,
        description="Serve SmartEdit on NVIDIA Triton Inference Server: one model, `smartedit`, taking an encoded "
                    "image (PNG/JPEG bytes) and an instruction (optional seed, steps, guidance_scale, "
                    "image_guidance_scale, resolution) and returning the edited PNG (`edited`) and the request's "
                    "stage timings (`timings`, JSON). Requests that share resolution and steps are batched.")
    add_model_source(p)
    p.add_argument("--backend", choices=list(registry.BACKENDS), default="eager", help="what runs the graphs "
                   "(default eager): " + "; ".join(f"{b.name}: {b.summary}" for b in registry.BACKENDS.values()))
    p.add_argument("--artifacts", help="smartedit-export output folder, for the backends that run exported graphs")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--precision", choices=sorted(RUN_PRECISIONS), default="fp32",
                   help="the precision the graphs run in (default fp32)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only; the "
                   "ports serve health, metadata and inference to anyone who reaches them: see the README before "
                   "binding another address)")
    p.add_argument("--http-port", type=int, default=8000, help="(default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="(default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics (default 8002)")
    p.add_argument("--max-batch", type=positive, default=ServeSettings.max_batch, help="requests run as one batch, at "
                   f"most (default {ServeSettings.max_batch}; 1: no dynamic batching; an exported backend's profile "
                   "may lower it)")
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0,
                   help="how long a request may wait for others to batch with (default 5 ms)")
    p.add_argument("--max-queue", type=positive, default=MAX_QUEUE, help="requests that may wait for the model, at "
                   f"most, per priority level (default {MAX_QUEUE}); more are refused at once with UNAVAILABLE (HTTP "
                   "503)")
    p.add_argument("--instances", type=positive, default=1, help="model instances, each with its own copy of the "
                   "model (default 1)")
    p.add_argument("--max-steps", type=positive, default=ServeSettings.max_steps, help="largest `steps` a request may "
                   f"ask for (default {ServeSettings.max_steps}; at most the sampler's bound)")
    p.add_argument("--max-megapixels", type=float, default=ServeSettings.max_megapixels, help="largest input image "
                   f"(default {ServeSettings.max_megapixels:g} MP)")
    p.add_argument("--max-variants", type=positive, default=MAX_VARIANTS, help="variants (seeds, guidance scales) "
                   f"one request may ask for, at most (default {MAX_VARIANTS}; at most --max-batch: they run as one "
                   "batch)")
    p.add_argument("--max-unet-evaluations", type=positive, default=None, help="UNet evaluations one request may "
                   "cost, at most (steps x the guidance schedule's branches x variants; default: what --max-steps "
                   "and --max-variants allow)")
    p.add_argument("--stream", action="store_true", help=f"also serve `{STREAM_MODEL}`, the edit as a gRPC stream "
                   "(progress after every step, previews): a second model process with its own copy of the graphs "
                   "(twice the model's memory)")
    p.add_argument("--cache-mb", type=int, default=0, help="Triton's response cache, MiB (default 0: none): a repeated "
                   "request (same image, instruction, seed and settings) is answered from it; requests must then "
                   "name their seed")
    p.add_argument("--priority-levels", type=int, default=PRIORITY_LEVELS, help="the batcher's priority levels "
                   f"(default {PRIORITY_LEVELS}; a request's `priority` 1 is the highest and the default)")
    p.add_argument("--low-priority-wait-s", type=float, default=LOW_PRIORITY_WAIT_S, help="longest wait in the queue "
                   "of a request below priority 1: started by then or refused with HTTP 503 (default "
                   f"{LOW_PRIORITY_WAIT_S:g} s)")
    p.add_argument("--warm-up", choices=WARM_UPS, default=None, help="the one-step edit before the server is ready: "
                   "at the smallest request, or at the largest it admits (--max-batch images at the profile's largest "
                   "resolution), so that one too large for the device's memory stops the start, not the service "
                   "(default: max on a GPU, min on the CPU)")
    a = p.parse_args(argv)
    source = model_source(p, a)

    def body() -> None:
        check_queue_delay_ms(a.max_queue_delay_ms)
        features = Features(a.stream, a.cache_mb, a.priority_levels, a.low_priority_wait_s).check()
        check_device(a.device)
        settings = settings_for(source, a.backend, a.artifacts, a.device, a.precision, a.max_steps, a.max_megapixels,
                                a.max_batch, a.warm_up, a.max_variants, a.max_unet_evaluations)
        endpoints = Endpoints(a.host, a.http_port, a.grpc_port, a.metrics_port)
        endpoints.check()  # before the model is loaded

        def ready(server: TritonServer) -> None:
            e = server.endpoints
            also = (f" and `{STREAM_MODEL}`" if a.stream else "") + (f", a {a.cache_mb} MiB response cache"
                                                                       if a.cache_mb else "")
            print(f"smartedit-serve: ready: model `smartedit`{also} ({a.backend}, {a.device}, {a.precision}) on "
                  f"http://{e.http_url} and grpc {e.grpc_url}, metrics {e.metrics_url}; server log {server.log}",
                  flush=True)
            if os.geteuid() == 0:
                print("smartedit-serve: note: running as root, so the server's model code runs as root: start it as "
                      "a user of its own", flush=True)
            if shares_dev_shm(server.proc.pid):
                print("smartedit-serve: note: the server shares this machine's /dev/shm, where Triton's Python backend "
                      "keeps each request's tensors readable by every local user (mode 644); run it as root (it then "
                      "gets a /dev/shm of its own) or in a container", flush=True)

        print(f"smartedit-serve: starting Triton Inference Server ({source}, backend {a.backend}) ...", flush=True)
        code = serve(settings, endpoints, settings.max_batch, a.max_queue_delay_ms, a.instances,
                     gpu=a.device.startswith("cuda"), on_ready=ready, max_queue=a.max_queue, features=features)
        print(f"smartedit-serve: stopped (status {code})", flush=True)
        if code:
            raise SystemExit(code)

    run_command("smartedit-serve", body)


if __name__ == "__main__":
    main()
