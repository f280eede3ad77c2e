"""bench/device/check.sh, the benchmark of one GPU machine without a package index: its plan keeps within its own
limits (steps of at most 480 s, a follow-up of at most 140 s, at most 7 files under $OUT), a run without its wheels is
refused before it starts, and it runs as written. Its GPU steps cannot run on a CPU; the --cpu dry run checks the
plumbing (install into a target folder, the import path, every step and its log) on the tiny preset."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "device" / "check.sh"
PLAN_MAX_S = 480  # the steps' limits; torch's import and the steps' kill-afters (5 s each) fall outside them
FOLLOW_UP_MAX_S = 140
FILES_MAX = 7  # what one run writes under $OUT at most


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


def test_plan_keeps_within_its_limit_most_valuable_step_first():
    for mode in ((), ("--compile",), ("--serve",)):
        steps, total = _plan(*mode)
        assert total <= PLAN_MAX_S, (mode, total)
        assert steps[0][0] == "install" and "bench" in steps[1][0], steps
    steps, total = _plan("--follow-up")
    assert total <= FOLLOW_UP_MAX_S, total


def _fake_wheels(folder: Path, specs: list[str]) -> None:
    """Empty files named as `pip download` names the wheels of `specs` (name==version, dashes as underscores)."""
    folder.mkdir(exist_ok=True)
    for spec in specs:
        name, version = spec.split("==")
        (folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")


def test_a_run_without_its_wheels_is_refused_before_it_starts(tmp_path):
    """A GPU-mode run whose .whl/ lacks a wheel of `--wheels` stops at once, naming exactly the missing ones and
    fetch_wheels.sh, before it runs or writes anything (it would otherwise fail every step on `import diffusers`)."""
    bare = tmp_path / "repo" / "bench" / "device"
    bare.mkdir(parents=True)
    shutil.copy(SCRIPT, bare / "check.sh")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out))
    wheels = _run("--wheels").stdout.split()
    assert "diffusers==0.42.1" in wheels and "peft==0.21.2" in wheels, wheels
    r = _run(env=env, script=bare / "check.sh")
    assert r.returncode == 2 and "nothing was run" in r.stderr and "fetch_wheels.sh" in r.stderr, r.stderr
    assert f"lacks {' '.join(wheels)}:" in r.stderr, r.stderr
    assert not out.exists() and r.stdout == ""
    _fake_wheels(tmp_path / "repo" / ".whl", wheels[:-1])  # all but the last, named as pip names them
    r = _run(env=env, script=bare / "check.sh")
    assert r.returncode == 2 and f"lacks {wheels[-1]}:" in r.stderr, r.stderr
    # --serve needs its own wheels and the server's archive
    r = _run("--serve", env=env, script=bare / "check.sh")
    serve_wheels = _run("--serve", "--wheels").stdout.split()
    missing = [w for w in serve_wheels if w not in wheels[:-1]] + ["tritonserver.tar.xz"]
    assert r.returncode == 2 and f"lacks {' '.join(missing)}:" in r.stderr and "--serve" in r.stderr, r.stderr
    assert not out.exists()


def test_unknown_option_is_refused_by_name():
    for bad in ("--gpu-please", "--call"):
        r = _run(bad)
        assert r.returncode == 2 and f"unknown option {bad}" in r.stderr, r.stderr
        assert "usage: bash bench/device/check.sh" in r.stderr and r.stdout == ""


def test_cpu_dry_run_ignores_the_environment_and_returns_few_files(tmp_path):
    """Variables a user's shell may hold (DEVICE, PRESET, STEPS, ...) must not change what the script runs: the dry
    run stays the tiny preset on the CPU even with the 7b/CUDA settings in the environment."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), DEVICE="cuda", PRESET="7b", STEPS="100", RES="256,512", REPEATS="9",
               COMPILE="1")
    r = _run("--cpu", env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= FILES_MAX and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
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
    assert len(files) <= FILES_MAX and "serve-cpu-tiny-eager.json" in files, files
    res = json.loads((out / "serve-cpu-tiny-eager.json").read_text())
    assert [(x["protocol"], x["concurrency"]) for x in res["levels"]] == [("grpc", 1), ("grpc", 4)]
    assert res["all_answered"] and res["all_match_offline"]
    assert re.search(r"== serve-bench: exit 0 after \d+ s", (out / "cpu-check.log").read_text())
