"""smartedit-export's output folder under failure: bad profile flags, folders it does not own, a second writer,
leftovers of a killed export, an interrupted re-export. One table; each case runs the CLI in this process and
asserts the exit status, one stderr line naming the value (no traceback), inputs left as they were, and nothing
half-written left that passes for valid.

Cost: one small export (vae_decoder, 128-192 px, fp32) shared by the cases that need an existing export folder, one
static-profile export; the interrupted cases replace the exporter, so they load the model but trace nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from conftest import run_cli

pytest.importorskip("onnxruntime")

from smartedit.engines.artifacts import Artifacts  # noqa: E402
from smartedit.errors import ArtifactError  # noqa: E402
from smartedit.export.cli import main as export_main  # noqa: E402
from smartedit.export.run import LOCK_FILE  # noqa: E402
from smartedit.export.verify import main as verify_main  # noqa: E402

TINY = ["--preset", "tiny", "--random-weights"]
SMALL = ["--graphs", "vae_decoder", "--min-res", "128", "--opt-res", "128", "--max-res", "192", "--max-batch", "2",
         "--precision", "fp32"]


@pytest.fixture(scope="module")
def base_export(tmp_path_factory):
    """A finished export of the cheapest graph (vae_decoder, seed 0), copied by the cases that need one."""
    out = tmp_path_factory.mktemp("base") / "out"
    export_main([*TINY, *SMALL, "--out", str(out)])
    assert json.loads((out / "manifest.json").read_text())["artifacts"]["onnx"]["vae_decoder"]["verified"] is True
    return out


def snapshot(path: Path) -> dict[str, str]:
    """Every file (hidden ones too) and folder under `path` (or `path` itself, a file) -> its sha256 / "dir"."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}


def staging_left(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob(".*.tmp-*")]


def lock_is_free(out: Path) -> bool:
    fd = os.open(out / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def graph_loads(out: Path, graph: str = "vae_decoder") -> bool:
    """Whether a runtime would load `graph` from `out` (manifest entry present, its files intact)."""
    try:
        Artifacts(out, "onnx").entry(graph)
        return True
    except ArtifactError:
        return False


HOLD = """
import fcntl, json, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}).encode())
print("locked", flush=True)
sys.stdin.read()
"""


@dataclass
class Case:
    id: str
    argv: list[str]  # after TINY and --out
    code: int
    names: list[str]  # in the one stderr error line (code != 0), or in stdout (code 0)
    setup: Callable[[Path, Path], None] = lambda out, base: None  # (out, base export)
    after: Callable[[Path, dict], None] = lambda out, ctx: None  # further checks
    unchanged: bool = True  # the folder (or file) at --out is exactly as before
    interrupt: str | None = None  # "export": the exporter is replaced by one that writes half a file and is killed
    ctx: dict = field(default_factory=dict)


def _copy_base(out: Path, base: Path) -> None:
    shutil.copytree(base, out)


def _user_files(out: Path, base: Path) -> None:
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "a.jpg").write_bytes(b"\xff\xd8 a photo")
    (out / "notes.txt").write_text("mine")


def _foreign_manifest(out: Path, base: Path) -> None:
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "other-tool", "files": ["model.bin"]}))
    (out / "model.bin").write_bytes(b"weights")


def _foreign_in_target_folder(out: Path, base: Path) -> None:
    (out / "onnx").mkdir(parents=True)
    (out / "onnx" / "my_model.onnx").write_bytes(b"someone else's model")


def _beside_our_export(out: Path, base: Path) -> None:
    _copy_base(out, base)
    (out / "notes.txt").write_text("mine")


def _a_file(out: Path, base: Path) -> None:
    out.write_text("not a folder")


def _leftovers(out: Path, base: Path) -> None:
    """What a SIGKILL leaves: staging folders and files beside the destinations, and the write probe."""
    _copy_base(out, base)
    (out / "onnx" / ".vae_decoder.onnx.tmp-ab12cd34").mkdir()
    (out / "onnx" / ".vae_decoder.onnx.tmp-ab12cd34" / "vae_decoder.onnx").write_bytes(b"half an onnx")
    (out / ".manifest.json.tmp-x9y8z7w6").mkdir()
    (out / ".manifest.json.tmp-x9y8z7w6" / "manifest.json").write_text("{")
    (out / ".write-probe").write_bytes(b"x" * 10)
    (out / "onnx" / "notes.tmp-1").write_text("not a staging name: kept")


def _check_leftovers_removed(out: Path, ctx: dict) -> None:
    assert staging_left(out) == [] and not (out / ".write-probe").exists()
    assert (out / "onnx" / "notes.tmp-1").read_text() == "not a staging name: kept"
    assert "vae_decoder: up to date, skipped" in ctx["stdout"]
    assert graph_loads(out) and lock_is_free(out)


def _check_static(out: Path, ctx: dict) -> None:
    import onnx
    import torch

    from smartedit.engines.onnxruntime import OnnxRuntimeRunner

    dims = [d.dim_param or d.dim_value for d in onnx.load(str(out / "onnx" / "vae_decoder.onnx")).graph.input[0]
            .type.tensor_type.shape.dim]
    assert dims == [1, 4, 16, 16]  # B, channels, h, w: one size, exported static
    entry = json.loads((out / "manifest.json").read_text())["artifacts"]["onnx"]["vae_decoder"]
    assert entry["verified"] is True
    image = OnnxRuntimeRunner(Artifacts(out, "onnx")).run("vae_decoder", {"latents": torch.randn(1, 4, 16, 16)})
    assert image["image"].shape == (1, 3, 128, 128)


def _check_other_model_interrupted(out: Path, ctx: dict) -> None:
    at_replace = ctx["manifest_at_replace"]
    assert at_replace["source"]["seed"] == 1 and at_replace["artifacts"] == {}  # the old model's entry went first
    assert (out / "onnx" / "vae_decoder.onnx").read_bytes() == b"half"  # the kill came after the file was replaced
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["seed"] == 1 and "vae_decoder" not in manifest.get("artifacts", {}).get("onnx", {})
    assert not graph_loads(out)
    _check_verify_refuses(out, ctx)


def _check_same_model_interrupted(out: Path, ctx: dict) -> None:
    at_replace = ctx["manifest_at_replace"]
    assert at_replace["source"]["seed"] == 0 and "vae_decoder" not in at_replace["artifacts"].get("onnx", {})
    assert (out / "onnx" / "vae_decoder.onnx").read_bytes() == b"half"
    assert not graph_loads(out)
    _check_verify_refuses(out, ctx)


def _check_verify_refuses(out: Path, ctx: dict) -> None:
    """smartedit-verify against the model the folder held before: the half-written graph is not passed."""
    code, stdout, err = run_cli(verify_main, [out, *TINY], ctx["capsys"])
    verify = json.loads((out / "verify.json").read_text()) if (out / "verify.json").exists() else {}
    intact = verify.get("integrity", {}).get("onnx/vae_decoder", {"bad": ["absent"]})
    assert intact["bad"] and "vae_decoder" not in verify.get("parity", {}).get("onnx", {})
    assert "onnx/vae_decoder: 1 files intact" not in stdout and "Traceback" not in err
    assert code in (0, 1, 2)  # 2: the folder is another model's now; 1: the set is incomplete; 0: nothing to check
    assert staging_left(out) == [] and lock_is_free(out)


CASES = [
    Case("narrow-res-unet", ["--max-res", "320"], 2,
         ["--min-res 256 --opt-res 256 --max-res 320", "unet", "what works: --max-res 384",
          "--min-res 256 --opt-res 256 --max-res 256"]),
    Case("min-above-opt", ["--min-res", "512"], 2, ["--min-res 512 is above --opt-res 256"]),
    Case("opt-above-max", ["--opt-res", "1024"], 2, ["--opt-res 1024 is above --max-res 768"]),
    Case("res-not-multiple-of-64", ["--max-res", "700"], 2, ["--max-res must be a multiple of 64", "got 700"]),
    Case("max-batch-0", ["--max-batch", "0"], 2, ["--max-batch must be an integer >= 1, got 0"]),
    Case("max-prompt-0", ["--max-prompt", "0"], 2, ["--max-prompt must be >= 33", "got 0"]),
    Case("fold-cfg-batch-2", ["--fold-cfg", "--max-batch", "2"], 2, ["--max-batch 2", "what works: --max-batch 3"]),
    Case("aoti-static-batch", ["--target", "aoti", "--max-batch", "1"], 2, ["--max-batch 1", "--target aoti"]),
    Case("out-is-a-file", SMALL, 2, ["exists and is not a folder"], setup=_a_file),
    Case("user-files", SMALL, 2, ["did not write", "notes.txt", "photos/", "use an empty folder"],
         setup=_user_files),
    Case("foreign-manifest", SMALL, 2, ["manifest.json (not an smartedit-export manifest)", "model.bin"],
         setup=_foreign_manifest),
    Case("foreign-file-in-onnx-folder", SMALL, 2, ["onnx/my_model.onnx"], setup=_foreign_in_target_folder),
    Case("user-file-beside-our-export", SMALL, 2, ["notes.txt"], setup=_beside_our_export),
    Case("lock-held", SMALL, 1, ["is in use by another smartedit-export", "pid {pid}"], setup=_copy_base),
    Case("staging-leftovers-removed", SMALL, 0,
         ["removed the leftovers", "onnx/.vae_decoder.onnx.tmp-ab12cd34/", ".manifest.json.tmp-x9y8z7w6/"],
         setup=_leftovers, after=_check_leftovers_removed, unchanged=False),
    Case("static-profile-min-eq-max", ["--graphs", "vae_decoder", "--min-res", "128", "--opt-res", "128",
                                       "--max-res", "128", "--max-batch", "1", "--precision", "fp32"], 0,
         ["vae_decoder: exporting"], after=_check_static, unchanged=False),
    Case("other-model-interrupted-after-replace", [*SMALL, "--seed", "1"], 130, ["interrupted"], setup=_copy_base,
         after=_check_other_model_interrupted, unchanged=False, interrupt="export"),
    Case("same-model-new-options-interrupted", [*SMALL, "--opset", "19"], 130, ["interrupted"], setup=_copy_base,
         after=_check_same_model_interrupted, unchanged=False, interrupt="export"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_export_output_folder(case: Case, tmp_path, capsys, monkeypatch, request):
    out = tmp_path / "out"
    needs_base = case.setup in (_copy_base, _beside_our_export, _leftovers)
    case.setup(out, request.getfixturevalue("base_export") if needs_base else None)
    before = snapshot(out)
    ctx = {"capsys": capsys}
    holder = None
    if case.id == "lock-held":
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / LOCK_FILE)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        ctx["pid"] = holder.pid
        before = snapshot(out)
    if case.interrupt == "export":
        import smartedit.export.onnx as onnx_mod

        def killed_mid_replace(model, spec, path, precision, opset=18):
            ctx["manifest_at_replace"] = json.loads((out / "manifest.json").read_text())
            assert not lock_is_free(out)  # held for the whole export
            Path(path).write_bytes(b"half")  # the file is replaced, and the process dies before its entry is back
            raise KeyboardInterrupt

        monkeypatch.setattr(onnx_mod, "export_onnx", killed_mid_replace)
    try:
        code, stdout, err = run_cli(export_main, [*TINY, "--out", out, *case.argv], capsys)
    finally:
        if holder is not None:
            holder.stdin.close()
            holder.wait(timeout=30)
    ctx["stdout"] = stdout
    assert code == case.code, (code, err[-2000:])
    assert "Traceback" not in err
    names = [n.format(**ctx) for n in case.names]
    if code != 0:
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and lines[0].startswith("smartedit-export: error: "), err
        for n in names:
            assert n in lines[0], (n, lines[0])
        if code in (1, 2) and case.interrupt is None:
            assert len(err.strip().splitlines()) == 1, err  # refused before any work: nothing else said
    else:
        for n in names:
            assert n in stdout, (n, stdout[-2000:])
    if case.unchanged:
        assert snapshot(out) == before  # not even a lock file in a folder it refused
    if out.is_dir():
        assert staging_left(out) == []
    case.after(out, ctx)


# -- what an export folder's JSON may hold, and what its check found wrong, before any runner ---------------------------
#
# Every reader of manifest.json (smartedit-verify, the runners the edit, the benchmark and the server load, the export
# itself) reads it within bounds: at most 64 MB, nested at most 64 levels (the C++ reader's limits, its rows in
# test_reliability_cpp.py). An entry whose check failed at export (verified: false) is refused by every runner, by
# name; one the export did not check (verified: null, --no-verify) runs, and the runner says so.

DEEP = "[" * 100_000 + "]" * 100_000


def _deep_manifest(out: Path) -> None:
    text = json.dumps({**json.loads((out / "manifest.json").read_text()), "artifacts": "@"})
    (out / "manifest.json").write_text(text.replace('"@"', DEEP))


def _deep_record(out: Path) -> None:  # valid at the top, 100000 deep inside an entry's informative record
    m = json.loads((out / "manifest.json").read_text())
    m["artifacts"]["onnx"]["unet"]["record"] = {"log": "@"}
    (out / "manifest.json").write_text(json.dumps(m).replace('"@"', DEEP))


def _big_manifest(out: Path) -> None:
    (out / "manifest.json").write_text((out / "manifest.json").read_text() + " " * (65 << 20))


def _verified(graph: str, value, target: str = "onnx"):
    def change(out: Path) -> None:
        m = json.loads((out / "manifest.json").read_text())
        m["artifacts"][target][graph]["verified"] = value
        (out / "manifest.json").write_text(json.dumps(m))
    return change


def _all_unchecked(out: Path) -> None:
    m = json.loads((out / "manifest.json").read_text())
    for e in m["artifacts"]["onnx"].values():
        e["verified"] = None  # what smartedit-export --no-verify records
    (out / "manifest.json").write_text(json.dumps(m))


def _as_trt_rtx(out: Path) -> None:
    """The onnx entries also recorded as trt-rtx plans (the files are not plans: the refusal comes before any is
    read), the unet's failed."""
    m = json.loads((out / "manifest.json").read_text())
    m["artifacts"]["trt-rtx"] = {g: {**e, "target": "trt-rtx", "verified": g != "unet"}
                                 for g, e in m["artifacts"]["onnx"].items()}
    (out / "manifest.json").write_text(json.dumps(m))


def _edit(out: Path, w: Path, backend: str = "onnxruntime") -> tuple:
    from PIL import Image

    from smartedit.cli import edit_cli

    Image.new("RGB", (64, 64), (90, 20, 200)).save(w / "in.png")
    return edit_cli, [*TINY, "--backend", backend, "--artifacts", out, "--image", w / "in.png", "--instruction",
                      "make it blue", "--steps", 1, "--out", w / "edited.png"]


def _verify(out: Path, w: Path) -> tuple:
    return verify_main, [out, *TINY]


def _serve(out: Path, w: Path) -> tuple:
    from smartedit.serve.cli import main as serve_main
    from smartedit.serve.server import free_endpoints

    e = free_endpoints()
    return serve_main, [*TINY, "--backend", "onnxruntime", "--artifacts", out, "--http-port", e.http,
                        "--grpc-port", e.grpc, "--metrics-port", e.metrics]


def _bench(out: Path, w: Path) -> tuple:
    from smartedit.bench.cli import main as bench_main

    return bench_main, [*TINY, "--backends", "onnxruntime", "--artifacts", out, "--steps", 1, "--repeats", 1,
                        "--warmup", 0, "--out", w / "bench"]


def _export_again(out: Path, w: Path) -> tuple:
    return export_main, [*TINY, "--max-batch", 3, "--max-res", 512, "--max-prompt", 400, "--graphs", "vae_decoder",
                         "--out", out]


def _triton_build(out: Path, w: Path) -> tuple:
    """--target triton over the export, only vae_decoder (re)exported: the repository would pack the others as they
    are, the unet's failed entry among them."""
    return export_main, [*TINY, "--max-batch", 3, "--max-res", 512, "--max-prompt", 400, "--graphs", "vae_decoder",
                         "--target", "triton", "--graph-models", "python", "--out", out]


def _backend_load(backend: str, target: str):
    """A backend's own loader, as the registry calls it once the machine has what it needs (TensorRT needs a GPU
    this machine lacks: the artifacts are refused before the runner is made)."""
    def run(out: Path, w: Path) -> tuple:
        import torch

        from smartedit.engines import registry
        from smartedit.errors import run_command
        from smartedit.weights import ModelSource

        def main(argv) -> None:
            b = registry.get(backend)
            run_command(f"load {backend}", lambda: b.load(ModelSource(preset="tiny"), torch.device("cuda"),
                                                           torch.float32, out))
        return main, []
    return run


@dataclass
class Unrun:
    id: str
    change: Callable[[Path], None]  # what is done to a copy of the session's export
    run: Callable[[Path, Path], tuple]  # (export folder, work folder) -> (main, argv)
    code: int
    says: list[str]  # in the one stderr line (code != 0), or on stderr (code 0)
    export: str = "onnx"  # the session's fp16 onnx export, or its aoti one
    ran: Callable[[Path, str, str], None] | None = None  # code 0: (work folder, stdout, stderr) -> further checks


def _edited(work: Path, stdout: str, err: str) -> None:
    assert (work / "edited.png").is_file()


def _skipped_by_the_bench(work: Path, stdout: str, err: str) -> None:
    """The benchmark's rule for a backend that cannot run here: listed as skipped with the reason, never timed."""
    result = json.loads(next((work / "bench").glob("*.json")).read_text())
    assert "failed its check at export" in result["skipped"]["onnxruntime"]
    assert not [r for r in result["runs"] if r.get("backend") == "onnxruntime"]


UNRUN = [
    Unrun("verify-manifest-100k-deep", _deep_manifest, _verify, 2, ["manifest.json is nested deeper than 64 levels"]),
    Unrun("verify-record-100k-deep", _deep_record, _verify, 2, ["nested deeper than 64 levels"]),
    Unrun("verify-manifest-over-64-mb", _big_manifest, _verify, 2, ["manifest.json is over 64 MB"]),
    Unrun("edit-manifest-100k-deep", _deep_manifest, _edit, 2, ["nested deeper than 64 levels"]),
    Unrun("serve-manifest-100k-deep", _deep_manifest, _serve, 2, ["--backend onnxruntime", "nested deeper than 64"]),
    Unrun("export-into-a-manifest-100k-deep", _deep_manifest, _export_again, 2,
          ["manifest.json (not an smartedit-export manifest)"]),
    Unrun("verify-verified-not-a-boolean", _verified("unet", "yes"), _verify, 2,
          ["[onnx][unet]: malformed manifest entry", "verified must be true, false or null, got 'yes'"]),
    Unrun("edit-unet-failed-its-check", _verified("unet", False), _edit, 2,
          ["onnx/unet failed its check at export (it did not match PyTorch; verified: false"]),
    Unrun("edit-aoti-failed-its-check", _verified("vae_decoder", False, "aoti"), lambda o, w: _edit(o, w, "aoti"), 2,
          ["aoti/vae_decoder failed its check at export"], export="aoti"),
    Unrun("serve-unet-failed-its-check", _verified("unet", False), _serve, 2,
          ["--backend onnxruntime", "onnx/unet failed its check at export"]),
    Unrun("bench-skips-a-failed-unet", _verified("unet", False), _bench, 0,
          ["onnxruntime: skipped (", "onnx/unet failed its check at export"], ran=_skipped_by_the_bench),
    Unrun("onnxruntime-backend-unet-failed", _verified("unet", False), _backend_load("onnxruntime", "onnx"), 2,
          ["onnx/unet failed its check at export"]),
    Unrun("tensorrt-backend-unet-failed", _as_trt_rtx, _backend_load("trt-rtx", "trt-rtx"), 2,
          ["trt-rtx/unet failed its check at export"]),
    Unrun("triton-build-beside-a-failed-unet", _verified("unet", False), _triton_build, 2,
          ["onnx/unet failed its check at export"]),
    Unrun("verify-reports-a-failed-entry-failed", _verified("vae_encoder", False), _verify, 1,
          ["FAILED: onnx/vae_encoder"]),
    Unrun("edit-unchecked-entries-run-and-say-so", _all_unchecked, _edit, 0,
          ["onnx/llava, onnx/qformer_bim, onnx/unet, onnx/vae_encoder, onnx/vae_decoder were not checked at export"],
          ran=_edited),
]


@pytest.mark.parametrize("row", UNRUN, ids=[r.id for r in UNRUN])
def test_runners_read_the_manifest_within_bounds_and_never_run_a_failed_entry(row, onnx_export, tmp_path, capsys,
                                                                              caplog, request, monkeypatch):
    """The status, one stderr line naming the value and no traceback; the export folder and everything else as it
    was (no image, no verify.json, no repository, no lock left held); nothing a refused entry holds was opened."""
    from smartedit.engines import onnxruntime as ort_backend

    source = request.getfixturevalue("aoti_export") if row.export == "aoti" else onnx_export("fp16")
    out, work = tmp_path / "out", tmp_path / "work"
    shutil.copytree(source, out)
    work.mkdir()
    row.change(out)
    main, argv = row.run(out, work)
    before = snapshot(out)
    opened = []
    if row.code != 0:  # a refused folder: no graph is opened
        real = ort_backend.session
        monkeypatch.setattr(ort_backend, "session", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    code, stdout, err = run_cli(main, argv, capsys)
    for _ in range(3):  # free_endpoints' ports can be taken by another server before this one checks them
        if row.run is not _serve or "in use" not in err:
            break
        main, argv = row.run(out, work)
        code, stdout, err = run_cli(main, argv, capsys)
    assert code == row.code, (code, err[-2000:])
    assert "Traceback" not in err
    if code != 0:
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1, err[-2000:]
        for s in row.says:
            assert s in lines[0], (s, lines[0])
        assert opened == [] and not (work / "edited.png").exists()
        after = snapshot(out)
        if row.id.startswith("verify-reports"):  # verify writes its report, and only that
            assert {k for k in after if after[k] != before.get(k)} == {"verify.json", LOCK_FILE}  # its report, its lock
            result = json.loads((out / "verify.json").read_text())
            assert result["parity"]["onnx"]["vae_encoder"] == {"passed": False, "error": result["parity"]["onnx"][
                "vae_encoder"]["error"]} and "failed its check at export" in result["parity"]["onnx"]["vae_encoder"][
                "error"]
            assert any("no runner opens a target holding an entry that failed" in n for n in result["not_run"])
        else:
            if row.run is _triton_build:  # refused under the export's lock: the lock file records its last holder
                after.pop(LOCK_FILE), before.pop(LOCK_FILE)
            assert after == before, [k for k in after if after[k] != before.get(k)]
    else:
        said = stdout + err + caplog.text  # a runner's warning is logged (stderr outside pytest)
        for s in row.says:
            assert s in said, (s, said[-2000:])
        assert snapshot(out) == before
        row.ran(work, stdout, err)
    if (out / LOCK_FILE).exists():
        assert lock_is_free(out)
