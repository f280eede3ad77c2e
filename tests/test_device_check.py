"""bench/device/check.sh, the one prepared call for a lent GPU: it must fit the device tool's limits (one command of at
most 540 s planned, at most 8 files back) and run as written. Its GPU steps cannot run here; the --cpu dry run checks
the plumbing (install into a target folder, the import path, every step and its log) on the tiny preset."""

import json
import os
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "device" / "check.sh"
DEVICE_CALL_S = 540  # one device command may run 600 s; the lease is 15 minutes, a machine start costs 1-2 of them
FILES_BACK = 8  # the device tool returns at most 8 files from $OUT


def _run(*args, env=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ))


def test_plan_fits_one_device_call_most_valuable_step_first():
    for mode in ((), ("--compile",), ("--serve",)):
        r = _run("--plan", *mode)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        steps = [(m.group(1), int(m.group(2))) for ln in lines if (m := re.match(r"^(\S+)\s+(\d+) s  ", ln))]
        total = int(re.fullmatch(r"total (\d+)", lines[-1]).group(1))  # the last line is the total
        assert total == sum(limit for _, limit in steps) <= DEVICE_CALL_S, r.stdout
        assert steps[0][0] == "install" and "bench" in steps[1][0], steps
        assert all(limit > 0 for _, limit in steps)


def test_unknown_option_is_refused():
    r = _run("--gpu-please")
    assert r.returncode == 2 and "usage: bash bench/device/check.sh" in r.stderr


def test_cpu_dry_run_ignores_the_environment_and_returns_few_files(tmp_path):
    """Variables a user's shell may hold (DEVICE, PRESET, STEPS, ...) must not change what the script runs: the dry
    run stays the tiny preset on the CPU even with the 7b/CUDA settings in the environment."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), DEVICE="cuda", PRESET="7b", STEPS="100", RES="256,512", REPEATS="9",
               COMPILE="1")
    r = _run("--cpu", env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= FILES_BACK and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert {"cpu-check.log", "cpu-pytest-cuda.log", "cpu-pytest-kernels.log", "cpu-tiny.json"} <= set(files)
    res = json.loads((out / "cpu-tiny.json").read_text())
    assert (res["steps"], res["repeats"]) == (2, 1) and res["device"].startswith("cpu")
    assert {(r["backend"], r["resolution"]) for r in res["runs"]} == {("official", 64), ("eager", 64)}
    log = (out / "cpu-check.log").read_text()
    for step in ("install", "bench", "pytest-cuda", "pytest-kernels", "bench-kernels"):
        assert re.search(rf"== {step}: exit 0 after \d+ s", log), f"step {step} did not finish cleanly:\n{log[-3000:]}"


def test_serve_dry_run_loads_the_server_and_checks_every_answer(tmp_path):
    """check.sh --serve --cpu: the load test's step as the GPU runs it (installed copy, gRPC, concurrency 1 and 4),
    on the tiny preset with eager on this CPU."""
    out = tmp_path / "out"
    r = _run("--serve", "--cpu", env=dict(os.environ, OUT=str(out)), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= FILES_BACK and "serve-cpu-tiny-eager.json" in files, files
    res = json.loads((out / "serve-cpu-tiny-eager.json").read_text())
    assert [(x["protocol"], x["concurrency"]) for x in res["levels"]] == [("grpc", 1), ("grpc", 4)]
    assert res["all_answered"] and res["all_match_offline"]
    assert re.search(r"== serve-bench: exit 0 after \d+ s", (out / "cpu-check.log").read_text())
