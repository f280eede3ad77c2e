"""DeepCache: the UNet split at a skip branch (smartedit/unet.py), its schedule (smartedit/deepcache.py), its two graphs
(unet_deep, unet_shallow) exported and run by every backend that runs on the CPU, and its refusals.

The deep path is checked against diffusers' own forward (the independent reference), the shallow path against the
deep path's eps given the deep path's feature (the same operations on the same inputs: equal bit for bit on the CPU),
the loop at interval 1 against the plain loop (bit for bit, per backend), and the trained model's DeepCache edit
against the renderer's ground truth."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TRAINED_MODEL, run_cli

from smartedit.config import SmartEditConfig, UNetConfig
from smartedit.deepcache import DeepCache
from smartedit.errors import InputError
from smartedit.guidance import GuidanceSchedule
from smartedit.pipeline import SmartEditPipeline
from smartedit.unet import SmartEditUNet
from smartedit.weights import ModelSource

STEPS = 10


def _unet_inputs(cfg: SmartEditConfig, b: int = 2, side: int = 16):
    g = torch.Generator().manual_seed(0)
    u = cfg.unet
    return (torch.randn(3 * b, u.in_channels, side, side, generator=g), torch.tensor([421.0]),
            torch.randn(3 * b, 77, u.cross_attention_dim, generator=g),
            torch.randn(b, cfg.unet_residual_channels, 16, 16, generator=g))


@pytest.mark.parametrize("unet_cfg", [
    None,  # the tiny preset: 2 levels, 1 layer per block (branches 0, 1)
    UNetConfig(block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=8, attention_head_dim=8,
               cross_attention_dim=32),  # SD's layout, small: 3 levels, 2 layers per block (branches 0, 1, 2)
], ids=["tiny", "three-levels"])
def test_deep_is_diffusers_forward_and_shallow_reuses_its_feature(unet_cfg):
    cfg = SmartEditConfig.from_name("tiny")
    u_cfg = unet_cfg or cfg.unet
    torch.manual_seed(0)
    unet = SmartEditUNet(u_cfg).eval()
    cfg = dataclasses.replace(cfg, unet=u_cfg)
    x, t, p, r = _unet_inputs(cfg)
    with torch.no_grad():
        ref = unet(x, t, p, r)  # diffusers' UNet2DConditionModel.forward, with the residual hook
        for k in range(u_cfg.layers_per_block + 1):
            eps, feature = unet.deep(x, t, p, r, k)
            assert torch.equal(eps, ref), k
            channels = u_cfg.block_out_channels[0 if k < u_cfg.layers_per_block else 1]
            assert feature.shape == (x.shape[0], channels, *x.shape[2:]), k
            assert torch.equal(unet.shallow(x, t, p, r, feature, k), ref), k
            # the shallow path reads the feature: another feature gives another eps
            assert not torch.allclose(unet.shallow(x, t, p, r, feature + 1, k), ref), k


def test_whole_steps_follow_the_interval_and_the_cfg_batch():
    assert DeepCache(1).whole_steps((3,) * 5) == (True,) * 5
    assert DeepCache(3).whole_steps((3,) * 7) == (True, False, False, True, False, False, True)
    # a step with more branches than the cached batch runs whole; fewer reuse its rows
    assert DeepCache(4).whole_steps((1, 3, 3, 2, 3)) == (True, True, False, False, True)
    for bad in (0, -1, 1001, 2.0, True, "3"):
        with pytest.raises(InputError, match="DeepCache interval must be an integer in \\[1, 1000\\]"):
            DeepCache(bad)
    with pytest.raises(InputError, match="DeepCache branch must be an integer >= 0"):
        DeepCache(3, -1)


def _latents(pipe, image, text, resolution: int = 64, **kw):
    """The denoised latents of one edit (the VAE decoder's input)."""
    got = []
    decode = pipe.decode
    pipe.decode = lambda x: (got.append(x.clone()), decode(x))[1]
    try:
        pipe(image, text, steps=STEPS, resolution=resolution, seed=3, **kw)
    finally:
        pipe.decode = decode
    return got[0]


@pytest.fixture(scope="module")
def trained_case():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import synthetic_edits as task

    ex = task.example(1_000_002)
    return ex.image, ex.instruction


def test_eager_and_cudagraph_loops(trained_case):
    from smartedit.engines.cudagraph import CudaGraphRunner

    pipe = SmartEditPipeline.from_pretrained(TRAINED_MODEL)
    image, text = trained_case
    plain = _latents(pipe, image, text)
    assert torch.equal(_latents(pipe, image, text, deepcache=DeepCache(1)), plain)
    cached = _latents(pipe, image, text, deepcache=DeepCache(3))
    assert not torch.equal(cached, plain)
    # branch 1 keeps more of the UNet fresh than branch 0: closer to the plain loop
    deeper = _latents(pipe, image, text, deepcache=DeepCache(3, 1))
    assert (deeper - plain).abs().mean() < (cached - plain).abs().mean()
    # the CUDA-graph runner's program (run eagerly: capture "none") is the pipeline's loop, with a guidance schedule
    schedule = GuidanceSchedule((0.0, 0.6))
    loop = _latents(pipe, image, text, deepcache=DeepCache(3, 1), guidance_schedule=schedule)
    pipe.runner = CudaGraphRunner(pipe.stages, pipe.config, capture="none")
    assert torch.equal(_latents(pipe, image, text, deepcache=DeepCache(3, 1), guidance_schedule=schedule), loop)
    with pytest.raises(InputError, match=r"DeepCache branch must be an integer in \[0, 1\].*got 2"):
        pipe(image, text, steps=STEPS, resolution=64, deepcache=DeepCache(3, 2))


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_exported_graphs_run_the_loop(backend, trained_export, aoti_export, trained_case, test_image):
    """The shared exports hold the DeepCache pair (ONNX: the trained model at branch 1; AOTInductor: tiny at
    branch 0): each passed its parity check at export, runs the plain loop bit for bit at interval 1, and follows
    eager's DeepCache loop at interval 3."""
    from conftest import AOTI_CACHE_BRANCH

    from smartedit.graphs.manifest import Manifest

    if backend == "onnxruntime":
        folder, source, branch, (image, text) = trained_export, ModelSource(model=TRAINED_MODEL), 1, trained_case
        res = 64
    else:  # the small profile's smallest side is 256
        folder, source, branch, image, text = aoti_export, ModelSource(preset="tiny"), AOTI_CACHE_BRANCH, \
            test_image, "make it blue"
        res = 256
    entries = Manifest.read(folder).entries("onnx" if backend == "onnxruntime" else "aoti")
    for g in ("unet_deep", "unet_shallow"):
        assert entries[g].verified is True and entries[g].options["cache_branch"] == branch, g
    assert "cache_branch" not in entries["unet"].options
    eager = SmartEditPipeline.from_weights(source.load())
    want = _latents(eager, image, text, res, deepcache=DeepCache(3, branch))
    pipe = SmartEditPipeline.on_backend(backend, source, artifacts=folder)
    assert pipe.runner.cache_branch == branch
    plain = _latents(pipe, image, text, res)
    assert torch.equal(_latents(pipe, image, text, res, deepcache=DeepCache(1)), plain)
    got = _latents(pipe, image, text, res, deepcache=DeepCache(3))
    assert not torch.equal(got, plain) and (got - want).abs().max() < 0.05
    with pytest.raises(InputError, match=f"runs graphs exported at branch {branch}"):
        pipe(image, text, steps=STEPS, resolution=res, deepcache=DeepCache(3, 1 - branch))


def test_the_trained_deepcache_edit_succeeds(trained_export):
    """The shipped model's held-out edits with DeepCache every 2 steps (branch 1) on ONNX Runtime, judged against the
    renderer's ground truth (the same cases test_trained_model.py judges the plain loop on; every 3 steps loses one
    of them, 'remove the square' of 1000004, every 5 steps two)."""
    import test_trained_model as trained

    images, texts, seeds = trained._all_edits()
    pipe = SmartEditPipeline.on_backend("onnxruntime", ModelSource(model=TRAINED_MODEL), artifacts=trained_export)
    outputs = []
    for i in range(0, len(images), 4):  # the export's largest batch
        outputs += pipe(images[i:i + 4], texts[i:i + 4], seed=seeds[i:i + 4], steps=trained.STEPS, resolution=64,
                        deepcache=DeepCache(2))
    trained._check(outputs, "onnxruntime with DeepCache every 2 steps")


def test_refusals(onnx_export, tmp_path, capsys, test_image):
    from smartedit.cli import edit_cli as edit_main
    from smartedit.export.run import run_export

    pipe = SmartEditPipeline.on_backend("onnxruntime", ModelSource(preset="tiny"), artifacts=onnx_export("fp16"))
    with pytest.raises(InputError, match="has no DeepCache graphs: export them with smartedit-export --deepcache"):
        pipe(test_image, "x", steps=2, resolution=256, deepcache=DeepCache(2))
    with pytest.raises(InputError, match=r"DeepCache branch must be an integer in \[0, 1\].*got 5"):
        run_export(tmp_path / "a", ModelSource(preset="tiny"), cache_branch=5, progress=lambda m: None)
    with pytest.raises(InputError, match="--precision int8 quantizes the unet graph only"):
        run_export(tmp_path / "b", ModelSource(preset="tiny"), precision="int8", cache_branch=0, progress=lambda m: None)
    with pytest.raises(InputError, match="the DeepCache graphs are exported with --deepcache"):
        run_export(tmp_path / "c", ModelSource(preset="tiny"), graph_names="unet_deep", progress=lambda m: None)
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))
    image = tmp_path / "in.png"
    test_image.save(image)
    for flags, says in ((["--deepcache", "0"], "DeepCache interval must be an integer in [1, 1000]"),
                        (["--deepcache-branch", "1"], "--deepcache-branch needs --deepcache N")):
        code, out, err = run_cli(edit_main, ["--preset", "tiny", "--random-weights", "--image", image,
                                             "--instruction", "x", "--out", tmp_path / "o.png", *flags], capsys)
        assert code == 2 and err.count("error:") == 1 and says in err, err
        assert not (tmp_path / "o.png").exists()


def test_tensorrt_rtx_engines_of_both_graphs_build(tmp_path):
    """TensorRT-RTX engines of unet_deep and unet_shallow (the trained model, fp16, SM86) build on this CPU."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (pip install -e '.[test]')")
    from conftest import TRAINED_PROFILE

    from smartedit.export.run import run_export
    from smartedit.export.trt import BuildOptions
    from smartedit.graphs.spec import ProfileOptions

    manifest = run_export(tmp_path, ModelSource(model=TRAINED_MODEL), target="trt-rtx", graph_names="unet_deep,unet_shallow",
                          cache_branch=1, profile=ProfileOptions(**TRAINED_PROFILE), verify=False,
                          target_options=BuildOptions(compute_capabilities=("86",), static_res=(64,)),
                          progress=lambda m: None)
    entries = manifest.entries("trt-rtx")
    assert sorted(entries) == ["unet_deep", "unet_shallow"]
    for g, e in entries.items():
        assert e.options["cache_branch"] == 1 and (tmp_path / "trt-rtx" / f"{g}.plan").stat().st_size > 0
        assert [t.name for t in e.spec.outputs] == (["eps", "cached_feature"] if g == "unet_deep" else ["eps"])
