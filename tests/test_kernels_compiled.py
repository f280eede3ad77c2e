"""The compile tier: every Triton kernel compiled ahead of time for sm_80 (A100) and sm_90 (H100/H200) on this CPU-only
machine, with the triton this project pins and with torch 2.11's (the GPU image bench/device/ is written for), at
every shape and dtype the dispatcher sends to it (smartedit.kernels.ahead_of_time). What the interpreter cannot
show: shared memory per block against the card's limit, register spills, and TF32 in fp32 products. Nothing runs; no GPU is needed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")

GPU_IMAGE_TRITON = "3.6.0"  # torch 2.11's triton, the one in the GPU image bench/device/ is written for
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smartedit-tests"


def _site_with_triton(version: str) -> Path | None:
    """A folder holding triton==version for PYTHONPATH (None: the installed one is that version). Installed once
    into the user's cache with pip (which keeps ptxas's execute bit); skipped with the reason if PyPI is out of reach."""
    if version == triton.__version__:
        return None
    site = CACHE / f"triton-{version}"
    if not (site / "triton" / "__init__.py").is_file():
        staging = CACHE / f".triton-{version}.partial"
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--upgrade",
                            "--target", str(staging), f"triton=={version}"], capture_output=True, text=True,
                           timeout=600)
        if r.returncode != 0:
            pytest.skip(f"cannot install triton=={version} to compile with it: {r.stderr.strip()[-300:]}")
        staging.rename(site)
    return site


@pytest.fixture(scope="module", params=["pinned", GPU_IMAGE_TRITON])
def compiled(request, tmp_path_factory):
    """-> (triton version, records) of `python -m smartedit.kernels.ahead_of_time --arch 80,90`."""
    site = _site_with_triton(triton.__version__ if request.param == "pinned" else request.param)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
    out = tmp_path_factory.mktemp("aot") / "compiled.json"
    r = subprocess.run([sys.executable, "-m", "smartedit.kernels.ahead_of_time", "--arch", "80,90", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert out.is_file(), f"nothing compiled:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    res = json.loads(out.read_text())
    print(r.stdout)  # the table: registers, spills, shared memory per shape (shown with -s or on failure)
    return res["triton"], res["records"]


def test_it_is_the_triton_asked_for(compiled):
    version, _ = compiled
    assert version in (triton.__version__, GPU_IMAGE_TRITON)


def test_every_dispatched_shape_compiles_for_both_cards(compiled):
    from smartedit.kernels.ahead_of_time import bim_attention_shapes

    _, records = compiled
    got = {(r["arch"], r["shape"], r["dtype"]) for r in records if r["dispatched"]}
    want = {(arch, f"{nq}x{nk}x{d}", dt) for arch in (80, 90) for nq, nk, d in bim_attention_shapes()
            for dt in ("float16", "bfloat16")}
    assert got == want
    assert {(90, "77x77x128", "float16"), (90, "77x256x64", "float16"),
                (90, "256x77x64", "float16")} <= got  # the 7b BIM's three attentions


def test_shared_memory_fits_the_card(compiled):
    _, records = compiled
    over = [f"sm_{r['arch']} {r['shape']} {r['dtype']}: {r['shared_bytes']:,} B > {r['shared_limit']:,} B"
            for r in records if r["dispatched"] and r["shared_bytes"] > r["shared_limit"]]
    assert not over, "would raise OutOfResources at launch:\n" + "\n".join(over)


def test_no_register_spills(compiled):
    _, records = compiled
    spills = [f"sm_{r['arch']} {r['shape']} {r['dtype']}: {r['spill_stores']} B stores / {r['spill_loads']} B loads, "
              f"{r['registers']} registers, config {r['config']}"
              for r in records if r["dispatched"] and (r["spill_stores"] or r["spill_loads"])]
    assert not spills, "spills to local memory:\n" + "\n".join(spills)


def test_fp32_products_are_not_tf32(compiled):
    """Triton's tl.dot takes fp32 inputs as TF32 on CUDA unless told otherwise; the interpreter always computes in
    fp32, so only the compiled PTX shows it."""
    _, records = compiled
    fp32 = [r for r in records if r["dtype"] == "float32"]
    assert fp32 and not [r["shape"] for r in fp32 if r["tf32"]]
    assert all(r["matmul"] in ("mma", "wgmma") for r in records if r["dispatched"])  # fp16/bf16 on tensor cores


def test_auto_dispatch_keeps_fp32_on_pytorch():
    import torch

    from smartedit.kernels import bim_attention as ka

    q = torch.empty(1, 8, 77, 128)
    assert "fp16/bf16" in ka.kernel_unusable(q, "auto")
    assert ka.kernel_unusable(q.half(), "auto") == "tensors are on cpu, not CUDA"
