"""The `smartedit` model Triton runs (Python backend): the whole edit per request, batched across requests; and its
decoupled twin `smartedit_stream` (the same code; its config says decoupled), which answers each request as a stream.

Triton loads this through the one-line model.py that smartedit writes into a model repository
(smartedit/export/triton.py). Its settings (serve/settings.py: ServeSettings, read back from the model config's
"settings" parameter with the bounds smartedit-serve checks; never from a request) say where the weights are, what
the requests may ask for, and what runs the graphs:
    runner "registry": the graphs in this process, on a backend of smartedit.engines.registry (smartedit-serve)
    runner "bls": the graphs as graph models of the same Triton, through BLS calls (the container repository)
A config whose settings are out of bounds is refused at load, naming the value. Loading checks the artifacts (every
file against its manifest sha256; through BLS, every file of the repository against the sha256 the export recorded,
and nothing unrecorded beside them), loads them and runs a one-step edit at the smallest profile: Triton reports the
model ready only after that. (Through BLS, Triton itself loads the graph models first; BLS calls are not allowed
while loading, so there is no warm-up edit.) A failure refuses the load with one line naming the cause, and
tritonserver exits non-zero.

Answers: a bad request is the client's error (INVALID_ARG: HTTP 400, gRPC INVALID_ARGUMENT), an edit whose clients
all left is CANCELLED, a request that arrives once the server drains is UNAVAILABLE (HTTP 503: nothing was computed,
send it again), anything else INTERNAL (HTTP 500). An error keeps only its message: its traceback would hold the
request's tensors for as long as the error lives. A stream sends `progress` after every denoising step (and a
`preview` at the request's interval), then the answer or the error, which ends it.

With Triton's response cache on (the config enables it and the server runs with a cache: CACHE_ENV), a request
must name its seed (without one its answer is random, and a repeat would get the first one's image), and an edit
whose client left is finished rather than stopped: Triton Inference Server 2.51 keeps every answer of the model in
the cache, errors included, as an answer without outputs (a repeat of a cancelled request would get that instead of
an image); the finished edit is kept for the client's retry.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from smartedit.config import dtype_named
from smartedit.errors import Cancelled, InputError, RunError, SmartEditError
from smartedit.graphs import DEEPCACHE_SHALLOW, DENOISER, graph_with_role
from smartedit.graphs.spec import GraphSpec
from smartedit.pipeline import SmartEditPipeline

from .admin import GRAPH_KEY, GRAPH_KEY_ENV, draining
from .repository import CACHE_ENV, REQUEST_INPUTS, STREAM_INPUTS
from .service import EditService, Progress, timings_json
from .settings import ServeSettings

log = logging.getLogger(__name__)
OUTCOMES = ("ok", "refused", "cancelled", "unavailable", "failed")
_NP = {torch.float16: np.float16, torch.float32: np.float32, torch.int64: np.int64, torch.bfloat16: np.float32}


def build_service(settings: ServeSettings, version_dir: Path, seed_required: bool = False) -> EditService:
    """The service of a model config's settings: checked, loaded and warmed up. `seed_required`: answers are
    cached (see the module doc)."""
    source = settings.model_source(version_dir)
    device, dtype = settings.device, dtype_named(settings.dtype)
    if settings.runner == "bls":
        from .repository import MODEL, check_repository

        # __pycache__ aside: Triton imports the graph models' model.py (which writes it) while this one loads; the
        # launcher removed every __pycache__ and checked the whole repository before the server started. The stream
        # twin lives in a repository of its own and names the exported one.
        repo = Path(settings.repository or version_dir.parent.parent)
        check_repository(repo, settings.files, own=[f"{MODEL}/config.pbtxt"], bytecode=False)
        pipe = SmartEditPipeline.from_weights(source.load(device, dtype, only=[]), BLSRunner(settings.graphs, device))
    else:
        # exported backends open their folder through engines.artifacts.Artifacts: every file against its sha256
        pipe = SmartEditPipeline.on_backend(settings.backend, source, device, dtype, settings.artifacts)
    limits = EditService.limits_for(pipe, settings.max_steps, settings.max_megapixels, settings.max_batch,
                                    max_variants=settings.max_variants, max_evaluations=settings.max_evaluations,
                                    seed_required=seed_required)
    service = EditService(pipe, limits)
    if settings.runner != "bls":  # BLS calls are allowed only in execute; Triton loads the graph models itself
        _warm_up(pipe, limits, settings.warm_up)
    return service


def _warm_up(pipe: SmartEditPipeline, limits, at: str = "min") -> None:
    """One edit of one step: every graph loads (sessions, packages, engines) now. At "max", a batch of the largest
    size at the largest resolution the server admits, so a request that would not fit the device's memory (the
    attention of an exported UNet grows with the square of its latent pixels) stops the start with one line rather
    than the first such request the service."""
    from PIL import Image

    side, n = (limits.max_resolution, limits.max_batch) if at == "max" else (limits.min_resolution, 1)
    img = Image.new("RGB", (side, side), (128, 128, 128))
    try:
        pipe([img] * n, ["warm up"] * n, steps=1, resolution=side, seed=list(range(n)))
    except (RuntimeError, MemoryError) as e:  # out of memory: torch and ONNX Runtime raise RuntimeError kinds
        if isinstance(e, SmartEditError):
            raise
        raise RunError(f"the largest request this server admits ({n} x {side} px) failed at warm-up: "
                       f"{' '.join(str(e).split())[:300]}; lower --max-batch or the export's --max-res") from None


class BLSRunner:
    """The graphs as graph models of the same Triton server, called through Business Logic Scripting. CPU tensors
    travel as numpy arrays; CUDA tensors through DLPack, without a host copy."""

    name = "bls"

    def __init__(self, graphs: dict[str, dict], device: str):
        self.specs = {g: GraphSpec.from_dict(v["spec"]) for g, v in graphs.items()}
        self.precision = {g: v["precision"] for g, v in graphs.items()}
        self.fold_cfg = bool(graphs.get(graph_with_role(DENOISER), {}).get("fold_cfg", False))
        # DeepCache's skip branch; None: no such graphs
        self.cache_branch = graphs.get(graph_with_role(DEEPCACHE_SHALLOW), {}).get("cache_branch")
        self.device = torch.device(device)
        self.key = {GRAPH_KEY: os.environ.get(GRAPH_KEY_ENV, "")}  # the Python graph models answer only these calls

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import triton_python_backend_utils as pb

        spec = self.specs[graph]
        spec.check_inputs(inputs)
        tensors = []
        for t in spec.inputs:
            x = inputs[t.name].to(self.device, t.torch_dtype(self.precision[graph])).contiguous()
            if x.is_cuda:
                tensors.append(pb.Tensor.from_dlpack(t.name, torch.utils.dlpack.to_dlpack(x)))
            else:
                tensors.append(pb.Tensor(t.name, x.numpy()))
        response = pb.InferenceRequest(model_name=graph, requested_output_names=[o.name for o in spec.outputs],
                                       inputs=tensors, parameters=self.key).exec()
        if response.has_error():
            raise RunError(f"graph model {graph}: {response.error().message()}")
        out = {}
        for o in spec.outputs:
            t = pb.get_output_tensor_by_name(response, o.name)
            out[o.name] = (torch.utils.dlpack.from_dlpack(t.to_dlpack()) if not t.is_cpu()
                           else torch.from_numpy(t.as_numpy().copy())).to(self.device)
        return out


def _values(request, name: str) -> list | None:
    """The request's values of input `name`, flattened (bytes for BYTES inputs, Python numbers for the rest), or
    None when it was not sent."""
    import triton_python_backend_utils as pb

    t = pb.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    return [v if isinstance(v, (bytes, bytearray)) else v.item() for v in t.as_numpy().reshape(-1)]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb

        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.decoupled = pb.using_decoupled_model_transaction_policy(config)
        self.cached = bool(config.get("response_cache", {}).get("enable")) and os.environ.get(CACHE_ENV) == "1"
        self.inputs = [name for name, *_ in REQUEST_INPUTS] + ([n for n, *_ in STREAM_INPUTS] if self.decoupled
                                                               else [])
        try:
            settings = ServeSettings.from_json(config["parameters"]["settings"]["string_value"],
                                               f"{args['model_name']}/config.pbtxt")
            if args.get("model_instance_kind") == "GPU":  # KIND_GPU: Triton gives each instance its device
                settings = dataclasses.replace(settings, device=f"cuda:{args['model_instance_device_id']}")
            self.service = build_service(settings, version_dir, seed_required=self.cached)
        except SmartEditError as e:  # one line in tritonserver's log, which smartedit-serve prints
            raise RuntimeError(f"smartedit: {type(e).__name__}: {e}") from None
        self.metric_family, self.outcomes = _outcome_counters(args["model_name"])  # the family outlives its metrics

    def execute(self, requests: list) -> list | None:
        import triton_python_backend_utils as pb

        send = [r.get_response_sender() for r in requests] if self.decoupled else None
        if draining():  # nothing is started once the server stops: the client may send it again, elsewhere
            self.outcomes["unavailable"].increment(len(requests))
            error = (pb.TritonError.UNAVAILABLE, "Unavailable: the server is stopping; nothing was computed: send the "
                     "request again", "unavailable")
            return self._answer(requests, [error] * len(requests), send, count=False)
        parsed: list = []
        for r in requests:
            try:
                params = json.loads(r.parameters() or "{}")
                if params:
                    raise InputError(f"unknown request parameters {sorted(params)}: this model takes none")
                parsed.append(self.service.parse({name: _values(r, name) for name in self.inputs}))
            except SmartEditError as e:
                parsed.append(_error(e))
        good = [i for i, p in enumerate(parsed) if not isinstance(p, tuple)]
        watch = None
        if send is not None:
            def watch(j: int, progress: Progress) -> None:
                send[good[j]].send(_progress_response(progress))
        # cached answers: an edit is finished for the retry of a client that left (see the module doc)
        gone = [(lambda: False) if self.cached else _gone(requests[i]) for i in good]
        results = self.service.run([parsed[i] for i in good], gone=gone, watch=watch)
        for i, res in zip(good, results):
            parsed[i] = _error(res) if isinstance(res, SmartEditError) else res
        return self._answer(requests, parsed, send)

    def _answer(self, requests: list, answers: list, send: list | None, count: bool = True) -> list | None:
        """Each request's answer (an EditResult or an error tuple): returned as responses, or, for a stream, sent
        as its last message."""
        import triton_python_backend_utils as pb

        responses = []
        for a in answers:
            if count:
                self.outcomes[a[2] if isinstance(a, tuple) else "ok"].increment(1)
            if isinstance(a, tuple):
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(a[1], a[0])))
            else:
                responses.append(pb.InferenceResponse(output_tensors=[  # UINT8 rows: see REQUEST_OUTPUTS
                    pb.Tensor("edited", _row(a.png)), pb.Tensor("timings", _row(timings_json(a)))]))
        if send is None:
            return responses
        for sender, response in zip(send, responses):
            sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None


def _row(data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8).reshape(1, -1)


def _progress_response(progress: Progress):
    """A stream's message after a denoising step: `progress` (JSON), and `preview` when previews are due."""
    import triton_python_backend_utils as pb

    tensors = [pb.Tensor("progress", _row(progress.to_json()))]
    if progress.previews:
        tensors.append(pb.Tensor("preview", _row(b"".join(progress.previews))))
    return pb.InferenceResponse(output_tensors=tensors)


def _gone(request) -> Callable[[], bool]:
    """Whether nobody waits for `request` any more: its gRPC call was cancelled (Triton's HTTP frontend does not
    report a closed connection), or its own timeout (the KServe `timeout` parameter, microseconds) has passed since
    it reached the model (the queue policy rejects it earlier if it expires while queued)."""
    timeout_us = request.timeout()
    deadline = time.monotonic() + timeout_us / 1e6 if timeout_us else None
    return lambda: request.is_cancelled() or (deadline is not None and time.monotonic() > deadline)


def _outcome_counters(model: str) -> tuple[Any, dict]:
    """smartedit_requests_total{model, outcome}: ok, refused (the client's error), cancelled, unavailable (the server
    was stopping), failed. Triton Inference Server's own nv_inference_request_success counts every request a Python
    model answered, refusals included (its Python backend reports an error response as a success, and a raised
    exception as neither); these counters, on the same metrics port, tell them apart."""
    import triton_python_backend_utils as pb

    family = pb.MetricFamily(name="smartedit_requests_total", description="SmartEdit requests by outcome: ok, "
                             "refused (a bad request), cancelled (the client left), unavailable (the server was "
                             "stopping), failed", kind=pb.MetricFamily.COUNTER)
    return family, {o: family.Metric(labels={"model": model, "outcome": o}) for o in OUTCOMES}


def _error(e: SmartEditError) -> tuple[int, str, str]:
    """(Triton's error code, one line, the outcome counted) of an error, which is then dropped with its traceback
    (whose frames hold the request's image and text: kept, they leaked ~20 MB a refused request)."""
    import triton_python_backend_utils as pb

    if isinstance(e, InputError):
        return pb.TritonError.INVALID_ARG, f"{type(e).__name__}: {e}", "refused"
    if isinstance(e, Cancelled):
        return pb.TritonError.CANCELLED, f"{type(e).__name__}: {e}", "cancelled"
    return pb.TritonError.INTERNAL, f"{type(e).__name__}: {e}", "failed"
