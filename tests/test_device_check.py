"""bench/device/check.sh, the one prepared call for a GPU machine: it must fit the GPU machine's limits with margins
(a plan of at most 480 s sent with a 540 s timeout, a follow-up of at most 150 s, at most 7 files back where the
tool returns 8) and run as written. Its GPU steps cannot run here; the --cpu dry run checks the plumbing (install
into a target folder, the import path, every step and its log) on the tiny preset."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "device" / "check.sh"
PLAN_MAX_S = 480  # the call's timeout is 540 s: torch's import, kill-afters and transfers fall outside the steps
FOLLOW_UP_S = 150
FILES_BACK = 7  # the GPU machine's runner returns at most 8 files from $OUT: one spare for anything unplanned


def _run(*args, env=None, timeout=60, script=SCRIPT):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ))


def _plan(*mode) -> tuple[list[tuple[str, int]], int]:
    r = _run("--plan", *mode)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    steps = [(m.group(1), int(m.group(2))) for ln in lines if (m := re.match(r"^(\S+)\s+(\d+) s  ", ln))]
    total = int(re.fullmatch(r"total (\d+)", lines[-1]).group(1))  # the last line is the total
    assert total == sum(limit for _, limit in steps) and all(limit > 0 for _, limit in steps), r.stdout
    return steps, total


def test_plan_fits_one_device_call_with_margin_most_valuable_step_first():
    for mode in ((), ("--compile",), ("--serve",)):
        steps, total = _plan(*mode)
        assert total <= PLAN_MAX_S, (mode, total)
        assert steps[0][0] == "install" and "bench" in steps[1][0], steps
    steps, total = _plan("--follow-up")
    assert total <= FOLLOW_UP_S - 10, total


def test_the_call_is_printed_and_refused_without_its_wheels(tmp_path):
    """--call names the exact device call and its follow-up; without the wheels in .whl/ it says what is missing
    instead. A GPU-mode run without them stops at once, naming them, before it runs or writes anything (it would
    otherwise spend the machine's time failing every step on `import diffusers`)."""
    bare = tmp_path / "repo" / "bench" / "device"
    bare.mkdir(parents=True)
    shutil.copy(SCRIPT, bare / "check.sh")
    r = _run("--call", script=bare / "check.sh")
    assert r.returncode == 2 and "lacks diffusers==0.42.1" in r.stderr and "fetch_wheels.sh" in r.stderr, r.stderr
    out = tmp_path / "out"
    r = _run(env=dict(os.environ, OUT=str(out)), script=bare / "check.sh")
    assert r.returncode == 2 and "nothing was run" in r.stderr and "peft==0.21.2" in r.stderr, r.stderr
    assert not out.exists() and r.stdout == ""
    wheels = tmp_path / "repo" / ".whl"
    wheels.mkdir()
    for spec in _run("--wheels").stdout.split():
        name, version = spec.split("==")
        (wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    r = _run("--call", script=bare / "check.sh")
    assert r.returncode == 0, r.stderr
    assert 'run(command="bash bench/device/check.sh", carry=[".whl"], timeout_s=540)' in r.stdout
    assert 'run(command="bash bench/device/check.sh --follow-up", carry=[".whl"], timeout_s=150)' in r.stdout


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
    assert {"cpu-check.log", "cpu-pytest.log", "cpu-tiny.json"} <= set(files), files
    res = json.loads((out / "cpu-tiny.json").read_text())
    assert (res["steps"], res["repeats"]) == (2, 1) and res["device"].startswith("cpu")
    assert {(r["backend"], r["resolution"]) for r in res["runs"]} == {("official", 64), ("eager", 64)}
    log = (out / "cpu-check.log").read_text()
    for step in ("install", "bench", "bench-kernels"):
        assert re.search(rf"== {step}: exit 0 after \d+ s", log), f"step {step} did not finish cleanly:\n{log[-3000:]}"
    # pytest: every cuda-marked test collected and skipped with its reason, one line each (-v)
    assert re.search(r"== pytest: exit 0 after \d+ s", log), log[-3000:]
    pytest_log = (out / "cpu-pytest.log").read_text()
    assert len(re.findall(r"SKIPPED", pytest_log)) >= 5 and "needs a CUDA GPU" in pytest_log, pytest_log[-2000:]


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
