"""The process NVIDIA Model Optimizer's ONNX quantizer runs in: `python -m smartedit.export.quantizer JOB FD`.

quantize.modelopt_quantize starts it in a session of its own, in a scratch folder (its working folder and TMPDIR),
and kills it on Ctrl-C or any failure of its own, so that a C++ library interrupted mid-call (ONNX Runtime inside
the calibration) never takes the export down with it and nothing it half-wrote outlives the scratch folder. It
imports only what the quantizer needs (not the model or the pipeline), and it reports on the pipe FD, one JSON
object a line: {"phase": text} when Model Optimizer logs the start of a phase, {"call": k, "calls": n, "pass": p} for
each calibration call it reads, {"error": line} when it fails (the traceback goes to its log, stdout and stderr).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

# Model Optimizer's log messages that start a phase of its step, and how progress names them
PHASES = (("Preprocessing the model", "preparing the graph (shape inference, opset, node names)"),
          ("Analyzing MHA", "finding the attention MatMuls it keeps unquantized"),
          ("Starting INT8 quantization", "choosing the nodes to quantize"),
          ("Starting FP8 quantization", "choosing the nodes to quantize"),
          ("Starting static quantization", "calibrating"),
          ("Starting post-processing", "writing the Q/DQ graph"),
          ("Quantized onnx model is saved", "saved; checking the graph"))


def run(job_file: str, fd: int) -> int:
    """Run modelopt's quantize on the job (JSON, written by quantize.modelopt_quantize), its progress as JSON lines
    on the pipe `fd`; exit when the parent goes (a parent killed by SIGKILL included). -> the exit status."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    pipe = os.fdopen(fd, "w", buffering=1)

    def say(**msg) -> None:
        pipe.write(json.dumps(msg) + "\n")
        pipe.flush()

    parent = os.getppid()

    def orphaned() -> None:  # its own session: a Ctrl-C goes to the parent, which kills it; a dead parent ends it too
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    job = json.loads(Path(job_file).read_text())

    class Phases(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            for prefix, phase in PHASES:
                if text.startswith(prefix):
                    say(phase=phase)

    logging.getLogger().addHandler(Phases(logging.INFO))  # modelopt replaces its own logger's handlers
    arrays = {name: np.load(path, mmap_mode="r") for name, path in job["arrays"].items()}

    class Calls(CalibrationDataReader):
        """Every kept UNet call, one at a time, read from the memory-mapped arrays."""

        def __init__(self) -> None:
            self.i, self.passes = 0, 0

        def call(self, i: int) -> dict[str, np.ndarray]:
            return {name: np.ascontiguousarray(a[i]) for name, a in arrays.items()}

        def get_first(self) -> dict[str, np.ndarray]:
            return self.call(0)

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= job["calls"]:
                return None
            if self.i == 0:
                self.passes += 1
            self.i += 1
            say(call=self.i, calls=job["calls"], **{"pass": self.passes})
            return self.call(self.i - 1)

        def rewind(self) -> None:
            self.i = 0

    try:
        from modelopt.onnx.quantization import quantize

        quantize(onnx_path=job["src"], quantize_mode=job["mode"], calibration_data_reader=Calls(),
                 calibration_shapes=job["shapes"], calibration_method=job["calibrator"],
                 calibration_eps=job["eps"], nodes_to_exclude=job["exclude"], high_precision_dtype="fp16",
                 use_external_data_format=job["external"], output_path=job["dst"], log_level="INFO")
    except Exception as e:  # noqa: BLE001  (modelopt and ONNX Runtime raise many kinds): one line, the log has more
        import traceback

        traceback.print_exc()
        text = str(e).strip()
        say(error=f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], int(sys.argv[2])))
