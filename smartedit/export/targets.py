"""The export targets, in one table.

A target is one file in this package: its producer, its options (a TargetOptions: its own flags, parsed and checked
there) and its `Target` entry (job.py), plus the backend that runs its artifacts in smartedit.engines, if any; adding
one is those two files and a line each in TARGETS below and in the engines' registry.
"""

from __future__ import annotations

from smartedit.errors import InputError

from . import aoti, onnx, triton, trt
from .job import Target

TARGETS: dict[str, Target] = {t.name: t for t in (onnx.TARGET, trt.TARGET, trt.TARGET_RTX, aoti.TARGET,
                                                  triton.TARGET)}


def get(name: str) -> Target:
    if name not in TARGETS:
        raise InputError(f"unknown export target {name!r}; choose one of {list(TARGETS)}")
    return TARGETS[name]
