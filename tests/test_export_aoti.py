"""`smartedit-export --target aoti` and the AOTInductor runtime backend, on the CPU with the tiny preset.

The packages are compiled by Inductor ahead of time (C++ for the CPU here); each is checked against fp32 PyTorch at
export, again by smartedit-verify, and end to end in an edit against the eager pipeline.
"""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import AOTI_CACHE_BRANCH, SMALL_PROFILE, run_cli
from PIL import Image

from smartedit.engines.aoti import AOTIRunner
from smartedit.engines.artifacts import Artifacts
from smartedit.errors import ArtifactError, InputError
from smartedit.export.aoti import AotiOptions
from smartedit.export.run import run_export
from smartedit.files import sha256_file
from smartedit.graphs import DEEPCACHE_GRAPHS, GRAPH_NAMES
from smartedit.graphs.spec import ProfileOptions
from smartedit.weights import ModelSource


def test_every_graph_is_packaged_and_verified(aoti_export):
    manifest = json.loads((aoti_export / "manifest.json").read_text())
    report = json.loads((aoti_export / "report.json").read_text())
    assert set(manifest["artifacts"]) == {"aoti"}
    assert set(manifest["artifacts"]["aoti"]) == set(GRAPH_NAMES + DEEPCACHE_GRAPHS)  # the fixture's --deepcache pair
    entries = manifest["artifacts"]["aoti"]
    assert {entries[g]["options"]["cache_branch"] for g in DEEPCACHE_GRAPHS} == {AOTI_CACHE_BRANCH}
    assert not (aoti_export / "onnx").exists()  # AOTInductor compiles from torch.export, not from ONNX
    for g, e in manifest["artifacts"]["aoti"].items():
        [(rel, meta)] = e["files"].items()
        f = aoti_export / rel
        assert f.suffix == ".pt2" and sha256_file(f) == meta["sha256"] and f.stat().st_size == meta["bytes"]
        assert e["requires"] == {"torch": torch.__version__, "device": {"type": "cpu"}} and e["verified"] is True
        comps = report["aoti"][g]["comparisons"]
        assert report["aoti"][g]["passed"] and len({str(c["point"]) for c in comps}) == 2  # opt + a second shape
        assert all(c["max_abs_err"] <= c["bound"] and c["cosine"] > 0.9999 for c in comps)
    assert not list(aoti_export.rglob(".*tmp-*"))  # no temporary build folders left


def test_rerun_skips_unchanged_packages(aoti_export):
    said = []
    run_export(aoti_export, ModelSource(preset="tiny"), target="aoti", precision="fp32", profile=ProfileOptions(**SMALL_PROFILE),
               progress=said.append, cache_branch=AOTI_CACHE_BRANCH)
    assert said == [f"{g}: AOTInductor package up to date, skipped" for g in GRAPH_NAMES + DEEPCACHE_GRAPHS]


def _edit(tmp_path, image, **kw):
    from smartedit.cli import edit
    from smartedit.edit_options import EditOptions
    from smartedit.weights import ModelSource

    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}.png"
    edit(ModelSource(preset="tiny"), str(image), "make it blue", str(out), EditOptions(steps=3), progress=False, **kw)
    return np.asarray(Image.open(out), dtype=np.float64)


def test_edit_through_the_packages_matches_eager(aoti_export, tmp_path, test_image):
    src = tmp_path / "in.png"
    test_image.save(src)
    eager = _edit(tmp_path, src)
    aoti = _edit(tmp_path, src, backend="aoti", artifacts=str(aoti_export))
    psnr = 10 * np.log10(255**2 / max(((eager - aoti) ** 2).mean(), 1e-12))
    assert psnr >= 60, f"AOTInductor fp32 edit vs eager fp32: PSNR {psnr:.1f} dB"


def _copy(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit:
        m = json.loads((dst / "manifest.json").read_text())
        edit(m)
        (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_backend_refuses_what_it_cannot_run(aoti_export, tmp_path):
    def other_torch(m):
        m["artifacts"]["aoti"]["unet"]["requires"]["torch"] = "2.0.0"

    def for_cuda(m):
        m["artifacts"]["aoti"]["unet"]["requires"]["device"] = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3",
                                                                 "capability": "9.0"}

    def runner(folder):
        return AOTIRunner(Artifacts(folder, "aoti"))

    with pytest.raises(ArtifactError, match=r"unet \(aoti\) was built for torch 2\.0\.0; this machine has "
                                            + re.escape(torch.__version__)):
        runner(_copy(aoti_export, tmp_path / "a", other_torch))
    with pytest.raises(ArtifactError, match=r"was built for device \{'type': 'cuda'.*this machine has \{'type': 'cpu'\}"):
        runner(_copy(aoti_export, tmp_path / "b", for_cuda))
    damaged = _copy(aoti_export, tmp_path / "c")
    (damaged / "aoti" / "vae_decoder.pt2").write_bytes(b"truncated")
    with pytest.raises(ArtifactError, match="vae_decoder.pt2 is missing or does not match its manifest entry"):
        runner(damaged)
    flipped = _copy(aoti_export, tmp_path / "e")  # one bit inside the package, same size: only the sha256 sees it
    data = bytearray((flipped / "aoti" / "unet.pt2").read_bytes())
    data[len(data) // 2] ^= 0x01
    (flipped / "aoti" / "unet.pt2").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="unet.pt2 is missing or does not match its manifest entry"):
        runner(flipped).run("unet", {})  # checked when the graph is first opened, before anything is loaded
    with pytest.raises(ArtifactError, match="holds no aoti artifacts"):
        runner(_copy(aoti_export, tmp_path / "d", lambda m: m["artifacts"].pop("aoti")))
    backend = runner(aoti_export)
    with pytest.raises(InputError, match=r"image height 576 px is outside the exported range 256-512 px"):
        backend.run("vae_decoder", {"latents": torch.zeros(1, 4, 72, 72)})  # a 576 px image; exported up to 512


def test_export_argument_errors(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--device cuda: no CUDA GPU here"):
            run_export(tmp_path, ModelSource(preset="tiny"), target="aoti", target_options=AotiOptions(device="cuda"),
                       progress=lambda m: None)
    with pytest.raises(InputError, match="compiled for cpu or cuda, got --device meta"):
        run_export(tmp_path, ModelSource(preset="tiny"), target="aoti", target_options=AotiOptions(device="meta"),
                   progress=lambda m: None)
    with pytest.raises(InputError, match="unknown export target 'tflite'"):
        run_export(tmp_path, ModelSource(preset="tiny"), target="tflite", progress=lambda m: None)
    assert not (tmp_path / "manifest.json").exists()  # refused before any work


def test_failed_compile_leaves_no_package(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("C++ compiler failed (simulated)")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        run_export(tmp_path, ModelSource(preset="tiny"), target="aoti", precision="fp32", graph_names="vae_encoder",
                   profile=ProfileOptions(**SMALL_PROFILE), progress=lambda m: None)
    assert not (tmp_path / "aoti").exists() or not list((tmp_path / "aoti").iterdir())  # no package, no temp folder
    assert "vae_encoder" not in (json.loads((tmp_path / "manifest.json").read_text())["artifacts"].get("aoti", {})
                                 if (tmp_path / "manifest.json").exists() else {})


def test_verify_rechecks_packages_and_catches_damage(aoti_export, tmp_path, capsys):
    from smartedit.export.verify import main as verify

    code, out, err = run_cli(verify, [aoti_export, "--preset", "tiny", "--random-weights"], capsys)
    assert code == 0, err[-2000:]
    assert out.count(" aoti vs PyTorch at 2 shapes: PASS") == len(GRAPH_NAMES) + len(DEEPCACHE_GRAPHS)  # the pair too
    assert "aoti/unet_shallow aoti vs PyTorch at 2 shapes: PASS" in out
    damaged = _copy(aoti_export, tmp_path / "v")
    blob = bytearray((damaged / "aoti" / "qformer_bim.pt2").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (damaged / "aoti" / "qformer_bim.pt2").write_bytes(bytes(blob))
    code, out, err = run_cli(verify, [damaged, "--preset", "tiny", "--random-weights"], capsys)
    assert code == 1 and "aoti/qformer_bim: 1 files DAMAGED" in out and "integrity of aoti/qformer_bim" in err
    assert "aoti/qformer_bim aoti vs PyTorch" not in out and "aoti/llava aoti vs PyTorch" in out  # damaged: not run


def test_bench_measures_the_aoti_backend(aoti_export):
    from smartedit.bench.run import run_bench
    from smartedit.weights import ModelSource

    res = run_bench(ModelSource(preset="tiny"), backends=("eager", "aoti"), resolutions=(256,), steps=2, repeats=1,
                    warmup=1, dtype="fp32", artifacts=str(aoti_export), progress=lambda m: None)
    assert {r["backend"] for r in res["runs"]} == {"eager", "aoti"} and not res["skipped"]
    row = [r for r in res["runs"] if r["backend"] == "aoti"][0]
    assert row["phase_ms"]["unet_step"] > 0 and row["speedup_vs_eager"] > 0
