"""`smartedit-export --target aoti` and the AOTInductor runtime backend, on the CPU with the tiny preset.

The packages are compiled by Inductor ahead of time (C++ for the CPU here); each is checked against fp32 PyTorch at
export, again by smartedit-verify, and end to end in an edit against the eager pipeline.
"""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SMALL_PROFILE
from smartedit.export.graphs import GRAPH_NAMES
from smartedit.export.run import ExportError, run_export, sha256_file
from smartedit.export.spec import ProfileOptions


def test_every_graph_is_packaged_and_verified(aoti_export):
    manifest = json.loads((aoti_export / "manifest.json").read_text())
    report = json.loads((aoti_export / "report.json").read_text())
    assert set(manifest["aoti"]) == set(GRAPH_NAMES)
    assert not (aoti_export / "onnx").exists()  # AOTInductor compiles from torch.export, not from ONNX
    for g, e in manifest["aoti"].items():
        f = aoti_export / e["file"]
        assert f.suffix == ".pt2" and sha256_file(f) == e["sha256"] and f.stat().st_size == e["bytes"]
        assert e["device"] == {"type": "cpu"} and e["torch"] == torch.__version__ and e["verified"] is True
        comps = report["aoti"][g]["comparisons"]
        assert report["aoti"][g]["passed"] and len({str(c["point"]) for c in comps}) == 2  # opt + a second shape
        assert all(c["max_abs_err"] <= c["bound"] and c["cosine"] > 0.9999 for c in comps)
    assert not list(aoti_export.rglob(".*tmp-*"))  # no temporary build folders left


def test_rerun_skips_unchanged_packages(aoti_export):
    said = []
    run_export(aoti_export, preset="tiny", target="aoti", precision="fp32", profile=ProfileOptions(**SMALL_PROFILE),
               progress=said.append)
    assert said == [f"{g}: AOTInductor package up to date, skipped" for g in GRAPH_NAMES]


def _edit(tmp_path, image, *extra):
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}.png"
    r = subprocess.run([shutil.which("smartedit-edit"), "--preset", "tiny", "--random-weights", "--image", str(image),
                        "--instruction", "make it blue", "--out", str(out), "--steps", "3", "--quiet", *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.asarray(Image.open(out), dtype=np.float64)


def test_edit_through_the_packages_matches_eager(aoti_export, tmp_path, test_image):
    src = tmp_path / "in.png"
    test_image.save(src)
    eager = _edit(tmp_path, src)
    aoti = _edit(tmp_path, src, "--backend", "aoti", "--artifacts", str(aoti_export))
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
    from smartedit.engines.aoti import AOTIBackend

    def other_torch(m):
        m["aoti"]["unet"]["torch"] = "2.0.0"

    def for_cuda(m):
        m["aoti"]["unet"]["device"] = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}

    with pytest.raises(ValueError,
                       match=r"compiled with torch 2\.0\.0; this is torch " + re.escape(torch.__version__)):
        AOTIBackend(_copy(aoti_export, tmp_path / "a", other_torch))
    with pytest.raises(ValueError, match=r"compiled for \{'type': 'cuda'.*this run is on \{'type': 'cpu'\}"):
        AOTIBackend(_copy(aoti_export, tmp_path / "b", for_cuda))
    damaged = _copy(aoti_export, tmp_path / "c")
    (damaged / "aoti" / "vae_decoder.pt2").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="vae_decoder.pt2 is missing or differs from the manifest"):
        AOTIBackend(damaged)
    with pytest.raises(ValueError, match="holds no AOTInductor packages"):
        AOTIBackend(_copy(aoti_export, tmp_path / "d", lambda m: m.pop("aoti")))
    backend = AOTIBackend(aoti_export)
    with pytest.raises(ValueError, match=r"dimension h = 72 is outside the exported profile \[32, 64\]"):
        backend.run("vae_decoder", {"latents": torch.zeros(1, 4, 72, 72)})  # a 576 px image; exported up to 512


def test_export_argument_errors(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: no CUDA GPU here"):
            run_export(tmp_path, preset="tiny", target="aoti", device="cuda", progress=lambda m: None)
    with pytest.raises(ValueError, match="compiled for cpu or cuda, got --device meta"):
        run_export(tmp_path, preset="tiny", target="aoti", device="meta", progress=lambda m: None)
    with pytest.raises(ExportError, match="not implemented"):
        run_export(tmp_path, preset="tiny", target="tflite", progress=lambda m: None)


def test_failed_compile_leaves_no_package(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("C++ compiler failed (simulated)")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        run_export(tmp_path, preset="tiny", target="aoti", precision="fp32", graph_names="vae_encoder",
                   profile=ProfileOptions(**SMALL_PROFILE), progress=lambda m: None)
    assert not list((tmp_path / "aoti").iterdir())  # neither a package nor a temporary folder
    assert "vae_encoder" not in (json.loads((tmp_path / "manifest.json").read_text()).get("aoti", {})
                                 if (tmp_path / "manifest.json").exists() else {})


def test_verify_rechecks_packages_and_catches_damage(aoti_export, tmp_path):
    verify = shutil.which("smartedit-verify")
    r = subprocess.run([verify, str(aoti_export), "--preset", "tiny", "--random-weights"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("AOTInductor package vs PyTorch PASS") == len(GRAPH_NAMES)
    damaged = _copy(aoti_export, tmp_path / "v")
    blob = bytearray((damaged / "aoti" / "qformer_bim.pt2").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (damaged / "aoti" / "qformer_bim.pt2").write_bytes(bytes(blob))
    r = subprocess.run([verify, str(damaged)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "qformer_bim: 1 files DAMAGED" in r.stdout and "integrity of qformer_bim" in r.stderr


def test_bench_measures_the_aoti_backend(aoti_export):
    from smartedit.bench.run import run_bench

    res = run_bench(preset="tiny", backends=("eager", "aoti"), resolutions=(256,), steps=2, repeats=1, warmup=1,
                    dtype="fp32", artifacts=str(aoti_export), progress=lambda m: None)
    assert {r["backend"] for r in res["runs"]} == {"eager", "aoti"} and not res["skipped"]
    row = [r for r in res["runs"] if r["backend"] == "aoti"][0]
    assert row["stage_ms"]["unet_step"] > 0 and row["speedup_vs_eager"] > 0
